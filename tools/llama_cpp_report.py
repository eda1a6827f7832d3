"""Run mintune's GGUF exports in llama.cpp itself (through llama-cpp-python) and print how far its logits and
tokens are from mintune's, for the tiny model of every exported family (tests/tiny_hf.py) and, with --smollm2,
for the real SmolLM2-135M-Instruct: llama.cpp's perplexity on the held-out quotes, a greedy chat answer, and
whether llama.cpp's own Q8_0 quantizer (llama_model_quantize) writes the same bytes as mintune's q8_0 file.

    pip install llama-cpp-python      # not a mintune dependency: it builds llama.cpp from source (long on 2 cores)
    python tools/llama_cpp_report.py [--smollm2]

For q8_0 files llama.cpp also quantizes the activations to 8 bits inside its matmuls, so its logits move
further from mintune's (which dequantizes the weights and computes in float32) than the weights alone explain.
"""
import argparse
import ctypes
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny configs live there

import mintune  # noqa: E402
from mintune.gguf import convert  # noqa: E402
from tiny_hf import make_hf_model  # noqa: E402
from tiny_tokenizers import TRICKY_STRINGS, gpt2_backend  # noqa: E402

# llama.cpp computes GELU's tanh approximation: the GELU families are checked with it
FAMILIES = {"llama": {}, "llama-smollm": {}, "mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False},
            "qwen3": {}, "gpt2": {}, "gpt_neox": {"hidden_act": "gelu_new"},
            "gpt_neox-sequential": {"hidden_act": "gelu_new"}}
TEXTS = ["The lighthouse keeper counted 12345 gulls", "café naïve crème brûlée 🙂", "Who's there? We're here"]


def llama(path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=2, type_k=0, type_v=0, **kw)  # f32 cache


def compare(path, model, tok, texts) -> tuple[float, int]:
    """max |logit difference| over the texts, and how many TRICKY_STRINGS llama.cpp tokenizes differently."""
    llm, worst = llama(path, logits_all=True), 0.0
    for text in texts:
        ids = tok.encode(text)
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        worst = max(worst, float(np.abs(np.array(llm.scores[:len(ids)]) - ours).max()))
    bad = sum(llm.tokenize(s.encode(), add_bos=False, special=True) != tok.encode(s, add_special_tokens=False)
              for s in TRICKY_STRINGS)
    return worst, bad


def export_and_compare(name, d, model, tok, types, texts):
    for type in types:
        path = mintune.export_gguf(model, tok, d / f"{name}.{type}.gguf", type=type, overwrite=True)
        # the reference for a rounded file is mintune reading that file back, so the weights are the same
        ref = model if type == "f32" else mintune.load_model(convert(path, d / f"{name}.{type}", overwrite=True))
        diff, bad = compare(path, ref, tok, texts)
        print(f"{name:22s} {type:5s} {path.stat().st_size / 1e6:8.2f} MB  max |logit diff| {diff:.2e}  "
              f"tokenization differences {bad}/{len(TRICKY_STRINGS)}", flush=True)


def smollm2(d):
    from mintune.evaluate import read_texts
    from mintune.fetch import fetch

    import llama_cpp

    src = fetch("smollm2")
    model, tok = mintune.load_model(src), mintune.load_tokenizer(src)
    texts = read_texts(mintune.datasets_dir() / "quotes" / "validation.jsonl")
    export_and_compare("SmolLM2-135M-Instruct", d, model, tok, ("f32", "f16", "q8_0"), TEXTS)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for type in ("f32", "f16", "q8_0"):
        llm, nll, n = llama(d / f"SmolLM2-135M-Instruct.{type}.gguf", logits_all=True), 0.0, 0
        for text in texts:
            ids = tok.encode(text)
            llm.reset()
            llm.eval(ids)
            logp = torch.log_softmax(torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float64), -1)
            nll -= logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
            n += len(ids) - 1
        answer = llama(d / f"SmolLM2-135M-Instruct.{type}.gguf").create_chat_completion(
            messages=messages, max_tokens=20, temperature=0.0)["choices"][0]["message"]["content"]
        print(f"SmolLM2 {type:5s} llama.cpp perplexity {math.exp(nll / n):.3f} ({n} tokens); chat: {answer!r}")
    print(f"mintune float32 chat: {mintune.generate(model, tok, messages, max_new_tokens=20)!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 2
    theirs = d / "llama-quantize.q8_0.gguf"
    llama_cpp.llama_model_quantize(str(d / "SmolLM2-135M-Instruct.f32.gguf").encode(), str(theirs).encode(),
                                   ctypes.byref(params))
    a = mintune.gguf.read_gguf(d / "SmolLM2-135M-Instruct.q8_0.gguf")
    b = mintune.gguf.read_gguf(theirs)
    same = sum(1 for n, t in a.tensors.items() if t.type_id == b.tensors[n].type_id
               and _bytes(a.path, t) == _bytes(b.path, b.tensors[n]))
    print(f"llama.cpp's own Q8_0 quantizer: {same} of {len(a.tensors)} tensors byte-identical to mintune's q8_0 file")


def _bytes(path, t) -> bytes:
    with open(path, "rb") as f:
        f.seek(t.start)
        return f.read(t.nbytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", action="store_true", help="also the real SmolLM2-135M-Instruct (fetched once)")
    args = ap.parse_args()
    backend = gpt2_backend()
    V = backend.get_vocab_size()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, overrides in FAMILIES.items():
            (d / name).mkdir()
            make_hf_model(name, vocab_size=V + 3, **overrides).save_pretrained(d / name)
            backend.save(str(d / name / "tokenizer.json"))
            (d / name / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
            model, tok = mintune.load_model(d / name), mintune.load_tokenizer(d / name)
            export_and_compare(name, d, model, tok, ("f32", "q8_0"), TEXTS)
        if args.smollm2:
            smollm2(d)


if __name__ == "__main__":
    main()
