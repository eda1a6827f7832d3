"""Print mintune's max |logit difference| against transformers for every tiny family config of the test
suite (tests/tiny_hf.py), on a padded batch in float32, and whether 20 greedy tokens agree.

    python tools/parity_report.py        # needs the test extra: pip install -e ".[test]"
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny configs live there

import mintune  # noqa: E402
from mintune.generation import generate_ids  # noqa: E402
from tiny_hf import PAD_ID, TINY, save_hf_model  # noqa: E402


def main():
    print(f"{'config':26s} {'family':9s} {'max |logit diff|':>17s}  greedy 20 tokens (cache / no cache)")
    for name, (family, _) in TINY.items():
        with tempfile.TemporaryDirectory() as d:
            hf = save_hf_model(name, d)
            model = mintune.load_model(d)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, model.cfg.vocab_size, (3, 13), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0   # left padding
        mask[2, 10:] = 0  # right padding
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            diff = (model(ids, mask) - hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits)[mask.bool()]
        prompt, pmask = ids[:2, :10], mask[:2, :10]
        theirs = hf.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=20, do_sample=False,
                             pad_token_id=PAD_ID, eos_token_id=None)[:, 10:].tolist()
        same = [generate_ids(model, prompt, pmask, max_new_tokens=20, use_cache=c).tolist() == theirs
                for c in (True, False)]
        print(f"{name:26s} {family:9s} {diff.abs().max().item():17.2e}  {same[0]} / {same[1]}")


if __name__ == "__main__":
    main()
