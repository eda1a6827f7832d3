"""Perplexity against transformers' own language-model loss, and the evaluate command line."""
import math
import subprocess
import sys

import torch

import mintune
from commands import python_m
from mintune.evaluate import perplexity, token_nll
from tiny_hf import save_chat_model


def test_token_nll_matches_transformers_loss(tmp_path):
    hf = save_chat_model(tmp_path)
    model, tok = mintune.load_model(tmp_path), mintune.load_tokenizer(tmp_path)
    texts = ["The tram rattles down the hill.", "Numbers like 2024 appear in ledgers, receipts and old diaries.",
             "Who's there?", "x"]
    expected_nll, expected_n = 0.0, 0
    for t in texts:  # one text at a time, unpadded: transformers' mean loss times the predicted tokens
        ids = torch.tensor([tok.encode(t)])
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = hf(input_ids=ids, labels=ids).loss.item()
        expected_nll += loss * (ids.shape[1] - 1)
        expected_n += ids.shape[1] - 1
    nll, n = token_nll(model, [tok.encode(t) for t in texts], batch_size=3)  # padded batches
    assert n == expected_n
    assert abs(nll - expected_nll) <= 1e-4 * expected_nll
    assert math.isclose(perplexity(model, tok, texts, batch_size=2), math.exp(expected_nll / expected_n), rel_tol=1e-5)


def test_command_line(tmp_path):
    save_chat_model(tmp_path / "m")
    model, tok = mintune.load_model(tmp_path / "m"), mintune.load_tokenizer(tmp_path / "m")
    rows = ["Small robots wave at passers-by.", "She said: don't forget the umbrella!"]
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "{r}"}}\n' for r in rows))
    out = subprocess.run([sys.executable, "-m", "mintune.evaluate", "--model", str(tmp_path / "m"), "--data",
                          str(tmp_path / "d.jsonl")], capture_output=True, text=True, check=True)
    assert f"perplexity {perplexity(model, tok, rows):.3f}" in out.stdout
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    out = subprocess.run([sys.executable, "-m", "mintune.evaluate", "--model", str(tmp_path / "m"), "--data",
                          str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert out.returncode == 2 and "bad.jsonl line 2" in out.stderr


def test_command_line_quantize_int8(tmp_path, capsys, monkeypatch):
    """--quantize int8 takes the int8 path: the perplexity printed is the library's int8 model's, which
    differs from the float model's at the three decimals printed."""
    from transformers import AutoTokenizer

    save_chat_model(tmp_path / "m")
    tok = mintune.load_tokenizer(tmp_path / "m")
    rows = ["Small robots wave at passers-by.", "She said: don't forget the umbrella!"]
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "{r}"}}\n' for r in rows))
    int8 = perplexity(mintune.load_model(tmp_path / "m", quantize="int8"), tok, rows)
    assert f"{int8:.3f}" != f"{perplexity(mintune.load_model(tmp_path / 'm'), tok, rows):.3f}"
    predicted = sum(len(ids) - 1 for ids in AutoTokenizer.from_pretrained(tmp_path / "m")(rows).input_ids)
    command = ["--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--quantize", "int8"]
    status, out, _ = python_m("evaluate", command, capsys, monkeypatch)
    assert (status, out) == (0, f"{tmp_path / 'd.jsonl'}: perplexity {int8:.3f} over {predicted} predicted tokens in "
                                "2 texts\n")
