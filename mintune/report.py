"""What a training run writes and shows: metrics.jsonl, the plot, sample answers and the summary.

    OUT/metrics.jsonl   one JSON object per line: {"kind": "train", "step", "loss", "lr", "grad_norm",
                        "tokens_per_s", "epoch", "peak_memory_mib"} every log_every steps, and
                        {"kind": "eval", "step", "<task>/<metric>": value, ...} at each evaluation
    OUT/metrics.png     training loss and every evaluation metric by step (when matplotlib is installed)
    OUT/summary.json    the run's summary (`format_summary` prints it)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .files import disk_full_named, read_text, write_text

SHOWN = ("accuracy", "macro_f1", "loss", "exact_match", "perplexity")  # metrics in one-line summaries


class MetricsLog:
    """metrics.jsonl, appended a line at a time, and the rows of this run kept in memory for the plot.
    Without a path (the processes other than 0 of a distributed run) nothing is read or written."""

    def __init__(self, path: Path | None):
        self.path, self.rows = path, []

    def start(self) -> None:
        """A new run: no rows."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.rows = []

    def resume(self, step: int, log=print) -> None:
        """A resumed run: keep the rows up to `step` (those after it belong to the lost part of the run).
        A line that is not a whole row (the last one, torn by a kill) is dropped with a warning."""
        if self.path is None:
            return
        lines = read_text(self.path).splitlines() if self.path.exists() else []
        kept = []
        for n, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
                if row["step"] <= step:
                    kept.append(row)
            except (ValueError, KeyError, TypeError):
                log(f"warning: {self.path} line {n} is not a whole row (a write cut short?); dropped: {line[:80]!r}")
        write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self.rows = kept

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is None:
            return
        line = json.dumps(row) + "\n"
        with disk_full_named(self.path, len(line)), open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def scalars(metrics: dict) -> dict:
    """The numeric metrics (a confusion matrix left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def brief(metrics: dict) -> str:
    """'task/accuracy 0.9, task/loss 0.31, ...' for the metrics worth a line."""
    keys = [k for k in metrics if k.rsplit("/", 1)[-1] in SHOWN]
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)


def peak_memory_mib(device: torch.device) -> float:
    """The process's peak memory so far: CUDA's allocator peak, or the peak resident set on Linux."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def sample_answers(model, tok, tasks, n: int) -> list[dict]:
    """A few test (or validation) prompts answered by the model, next to the reference answer."""
    from .generation import generate_ids

    out = []
    stops = set(tok.stop_ids) | set(model.cfg.eos_token_ids)
    for task in tasks:
        if task.cfg.kind not in ("instruction", "chat", "classification") or n <= 0:
            continue
        if task.cfg.kind == "classification" and task.cfg.classifier == "head":
            continue
        for ex in (task.test or task.validation)[:n]:
            prompt = torch.tensor([ex.input_ids[:ex.prompt_len]], device=model.embed_tokens.weight.device)
            new = generate_ids(model, prompt, max_new_tokens=32, eos_ids=stops, pad_id=tok.pad_id)[0].tolist()
            end = next((j for j, x in enumerate(new) if x in stops), len(new))
            out.append({"task": task.cfg.name, "input": ex.shown,
                        "generated": tok.decode(new[:end], skip_special_tokens=True).strip(),
                        "reference": tok.decode([x for x in ex.input_ids[ex.prompt_len:] if x not in stops],
                                                skip_special_tokens=True).strip()})
    return out


def plot_metrics(rows: list[dict], path: Path) -> bool:
    """Training loss and evaluation metrics by step, as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [h for h in rows if h["kind"] == "train"]
    evals = [h for h in rows if h["kind"] == "eval"]
    keys = sorted({k for h in evals for k in h if k not in ("kind", "step") and isinstance(h[k], (int, float))})
    fig, axes = plt.subplots(1, 1 + bool(keys), figsize=(6 + 6 * bool(keys), 4), squeeze=False)
    axes[0][0].plot([h["step"] for h in train], [h["loss"] for h in train])
    axes[0][0].set(xlabel="step", ylabel="training loss")
    for k in keys:
        pts = [(h["step"], h[k]) for h in evals if k in h]
        axes[0][1].plot(*zip(*pts), marker="o", label=k)
    if keys:
        axes[0][1].set(xlabel="step", ylabel="evaluation")
        axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def format_summary(s: dict) -> str:
    """The run's summary as the lines printed at its end."""
    lines = ["", "== summary", f"model {s['model']}, method {s['method']}; {s['trainable']}",
             f"{s.get('steps', 0)} steps in {s.get('train_seconds', 0)} s ({s.get('tokens_per_s', 0)} tokens/s), "
             f"peak memory {s.get('peak_memory_mib')} MiB; stopped by {s.get('stop_reason')}"]
    if s.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite loss): {s['skipped_steps']}")
    for split in ("validation", "test"):
        b, a = s.get(f"{split}_before", {}), s.get(f"{split}_after", {})
        for k in a:
            if k.rsplit("/", 1)[-1] in SHOWN:
                before = f"{b[k]:.4f}" if k in b else "-"
                lines.append(f"{split:10s} {k:32s} before {before:>8s}   after {a[k]:.4f}")
    for sample in s.get("samples", []):
        lines.append(f"sample ({sample['task']}): {sample['input'][:100]!r}\n   -> generated {sample['generated']!r}, "
                     f"reference {sample['reference']!r}")
    lines.append(f"saved: {s.get('saved')}" + (f"; plot: {s['plot']}" if s.get("plot") else ""))
    return "\n".join(lines)
