"""Language-model evaluation: perplexity of a model on texts, computed batch by batch so that only one
batch's logits exist at a time.

    python -m mintune.evaluate --model DIR --data held_out.jsonl notes.txt

    perplexity = exp( sum of -log p(token | tokens before it) / number of predicted tokens )

Each text is scored on its own (no packing across texts): the first token of a text is conditioned
on, not predicted, and texts longer than `max_length` are cut.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .cli import add_model_options, load_model_from, run_command
from .data import IGNORE, collate, read_rows, row_field
from .generation import generate_ids
from .heads import classify
from .loss import batch_loss, lm_loss_sum
from .model import GPT, KVCache


def check_sizes(batch_size: int, max_length: int | None) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a single token predicts nothing), got {max_length}")


def check_texts(token_lists: list[list[int]], source: str = "") -> None:
    """A perplexity needs a text of two tokens or more (a text's first token is conditioned on, not predicted)."""
    if not any(len(ids) >= 2 for ids in token_lists):
        raise ValueError(f"{source}none of the {len(token_lists)} texts has two tokens or more: there is "
                         "nothing to predict")


@torch.no_grad()
def token_nll(model: GPT, token_lists: list[list[int]], batch_size: int = 8,
              max_length: int | None = None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (nats) over all texts, and how many tokens were predicted
    (at least one: texts of a single token predict nothing, and are refused when no text has more)."""
    check_sizes(batch_size, max_length)
    check_texts(token_lists)
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(token_lists), batch_size):
            rows = [ids[:max_length] if max_length else ids for ids in token_lists[i:i + batch_size]]
            rows = [r for r in rows if len(r) >= 2]  # a single token predicts nothing
            if not rows:
                continue
            width = max(len(r) for r in rows)  # right padding: positions are unaffected
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r, device=device)
                mask[j, :len(r)] = 1
            loss, n = lm_loss_sum(model, ids, mask, ids.masked_fill(mask == 0, IGNORE))
            total, count = total + loss.item(), count + n
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: GPT, tok, texts: list[str], batch_size: int = 8, max_length: int | None = None) -> float:
    """Perplexity of `model` on `texts` (each encoded with the tokenizer's special tokens, e.g. a BOS)."""
    if not texts:
        raise ValueError("perplexity needs at least one text")
    nll, n = token_nll(model, [tok.encode(t) for t in texts], batch_size, max_length)
    return math.exp(nll / n)


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts from a .jsonl file (the `field` of each row) or a plain text file (one text per paragraph)."""
    return [str(row_field(row, field, str(path), n, object)) for n, row in read_rows(str(path))]


def _batches(examples, batch_size):
    for i in range(0, len(examples), batch_size):
        yield examples[i:i + batch_size]


def eval_loss(model: GPT, examples, pad_id: int, batch_size: int = 8) -> dict:
    """Mean loss over the labelled tokens (or the rows, for a classification head) and its perplexity."""
    return _mean_loss(*eval_loss_sum(model, examples, pad_id, batch_size))


def _mean_loss(total: float, count: int) -> dict:
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


@torch.no_grad()
def eval_loss_sum(model: GPT, examples, pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(sum of the losses, number of predictions) over the examples (0, 0 for none)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model.embed_tokens.weight.device
    try:
        for chunk in _batches(examples, batch_size):
            b = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            loss, n = batch_loss(model, b)
            total, count = total + loss.item(), count + n
    finally:
        model.train(was_training)
    return total, count


def predict_classes(model: GPT, examples, pad_id: int, batch_size: int = 8) -> list[int]:
    """The predicted class of every classification example: from the head, or, for label-word examples,
    the label whose response tokens (EOS included) the model finds most likely after the prompt."""
    return class_scores(model, examples, pad_id, batch_size).argmax(-1).tolist()


@torch.no_grad()
def class_scores(model: GPT, examples, pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """(N, classes): the head's logits, or log p(label's response tokens | prompt) for label-word examples."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    try:
        if examples[0].choices is None:
            out = []
            for chunk in _batches(examples, batch_size):
                b = collate(chunk, pad_id)
                out.append(classify(model, b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
            return torch.cat(out)
        # the prompt goes through the model once, into a KV cache; each label's response tokens then
        # continue from it (the cache is rewound to the prompt before the next label)
        k = len(examples[0].choices)
        scores = torch.empty(len(examples), k)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            prompts = [e.input_ids[:e.prompt_len] for e in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            longest = max(len(c) for e in chunk for c in e.choices)
            cache = KVCache(model.cfg.n_layer, width + longest + (model.prompt.n_tokens if model.prompt else 0))
            first = torch.log_softmax(model.lm_head(model.hidden_states(ids, mask, cache=cache)[:, -1]).float(), -1)
            prompt_len = cache.length
            for c in range(k):
                answers = [e.choices[c] for e in chunk]
                L = max(map(len, answers))
                cont = torch.tensor([a + [pad_id] * (L - len(a)) for a in answers], device=device)
                cmask = torch.tensor([[1] * len(a) + [0] * (L - len(a)) for a in answers], device=device)
                total = first.gather(-1, cont[:, :1]).squeeze(-1)                 # the answer's first token
                if L > 1:
                    cache.length = prompt_len
                    h = model.hidden_states(cont[:, :-1], torch.cat([mask, cmask[:, :-1]], 1), cache=cache)
                    logp = torch.log_softmax(model.lm_head(h).float(), -1)      # (B, L-1, V)
                    rest = logp.gather(-1, cont[:, 1:].unsqueeze(-1)).squeeze(-1) * cmask[:, 1:]
                    total = total + rest.sum(-1)                                 # log p(answer | prompt)
                scores[start:start + len(chunk), c] = total.cpu()
        return scores
    finally:
        model.train(was_training)


def classification_metrics(pred: list[int], gold: list[int], labels: list[str]) -> dict:
    """Accuracy, macro precision / recall / F1 and the confusion matrix (rows: true label, columns:
    predicted label)."""
    return confusion_metrics(confusion_matrix(pred, gold, len(labels)))


def confusion_matrix(pred: list[int], gold: list[int], k: int) -> list[list[int]]:
    """confusion[true label][predicted label]: how many examples."""
    confusion = [[0] * k for _ in range(k)]
    for p, g in zip(pred, gold):
        confusion[g][p] += 1
    return confusion


def confusion_metrics(confusion: list[list[int]]) -> dict:
    """classification_metrics from a confusion matrix (summed over processes, it gives the same numbers)."""
    k = len(confusion)
    precision, recall, f1 = [], [], []
    for c in range(k):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(k))
        actual = sum(confusion[c])
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"accuracy": sum(confusion[c][c] for c in range(k)) / max(sum(map(sum, confusion)), 1),
            "precision": sum(precision) / k, "recall": sum(recall) / k, "macro_f1": sum(f1) / k,
            "confusion": confusion}


@torch.no_grad()
def exact_match(model: GPT, tok, examples, batch_size: int = 8, max_new_tokens: int | None = None) -> dict:
    """Greedy answers to the prompts of instruction examples, compared (stripped) with the references."""
    device = model.embed_tokens.weight.device
    stops = set(tok.stop_ids) | set(model.cfg.eos_token_ids)
    hits, samples = 0, []
    for chunk in _batches(examples, batch_size):
        prompts = [e.input_ids[:e.prompt_len] for e in chunk]
        refs = [tok.decode([t for t in e.input_ids[e.prompt_len:] if t not in stops], skip_special_tokens=True)
                for e in chunk]
        limit = max_new_tokens or max(len(e.input_ids) - e.prompt_len for e in chunk) + 8
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = generate_ids(model, ids, mask, max_new_tokens=limit, eos_ids=stops, pad_id=tok.pad_id)
        for row, ref in zip(out.tolist(), refs):
            end = next((j for j, t in enumerate(row) if t in stops), len(row))
            answer = tok.decode(row[:end], skip_special_tokens=True)
            hits += answer.strip() == ref.strip()
            if len(samples) < 3:
                samples.append({"answer": answer.strip(), "reference": ref.strip()})
    return {"exact_match": hits / max(len(examples), 1), "hits": hits, "samples": samples}


def task_metrics(task, exact_match_limit: int) -> list[str]:
    """The metrics `evaluate_tasks` measures for a task, by their names after "<task>/"."""
    kind = task.cfg.kind
    return (["loss"] + (["perplexity"] if kind == "causal_lm" else [])
            + (["accuracy", "precision", "recall", "macro_f1", "confusion"] if kind == "classification" else [])
            + (["exact_match"] if kind == "instruction" and exact_match_limit else []))


def metric_names(tasks, exact_match_limit: int, retention: bool) -> list[str]:
    """Every number `evaluate_tasks` reports on the validation split ("<task>/<metric>")."""
    names = [f"{t.cfg.name}/{m}" for t in tasks for m in task_metrics(t, exact_match_limit) if m != "confusion"]
    return names + (["retention/perplexity"] if retention else [])


class Share:
    """Which part of an evaluation this process takes, and how the parts' sums are added up. One process
    takes everything as it is; distributed.py gives each process of a run its slice and an all-reduce,
    so that N processes report the numbers one process would."""

    def take(self, items: list) -> list:
        return items

    def add_up(self, sums: list[float]) -> list[float]:
        return sums


def evaluate_tasks(model: GPT, tok, tasks, split: str = "validation", *, batch_size: int = 16,
                   exact_match_limit: int = 64, retention: list[str] = (), max_length: int | None = None,
                   share: Share = Share()) -> dict:
    """Every metric of every task on a split ("validation" or "test"), as {"<task>/<metric>": value}:
    loss (and perplexity for causal LM), classification metrics, exact match of up to
    `exact_match_limit` generated answers for instruction tasks, and the perplexity of the
    `retention` texts (general text: how much the model forgets). Leaves the RNG where it was.
    Each metric comes from sums over the examples (losses and counts, a confusion matrix, exact-match
    hits): `share` says which examples this process sums over, and adds the processes' sums up."""
    metrics = {}
    with torch.random.fork_rng(devices=[]):
        for task in tasks:
            examples = task.validation if split == "validation" else task.test
            if not examples or (task.cfg.classifier == "head" and model.head is None
                                and task.cfg.kind == "classification"):
                continue  # nothing to evaluate (a head that feature-based transfer has not fitted yet)
            sums = share.add_up(_task_sums(model, tok, task, examples, share, batch_size, exact_match_limit))
            metrics.update(_task_metrics(task, sums, exact_match_limit))
        if retention:
            mine = [tok.encode(x) for x in share.take(retention)]
            sums = token_nll(model, mine, batch_size, max_length) if any(len(x) >= 2 for x in mine) else (0.0, 0)
            nll, n = share.add_up(list(sums))
            metrics["retention/perplexity"] = math.exp(nll / n)
    return metrics


def _task_sums(model: GPT, tok, task, examples, share: Share, batch_size: int, exact_match_limit: int) -> list:
    """This process's sums for one task: [loss sum, predictions, the confusion matrix row by row
    (classification), exact-match hits and answers asked (instructions)]."""
    wanted = task_metrics(task, exact_match_limit)
    mine = share.take(examples)
    sums = list(eval_loss_sum(model, mine, tok.pad_id, batch_size))
    if "accuracy" in wanted:
        pred = predict_classes(model, mine, tok.pad_id, batch_size) if mine else []
        confusion = confusion_matrix(pred, [e.class_label for e in mine], len(task.labels))
        sums += [n for row in confusion for n in row]
    if "exact_match" in wanted:
        asked = share.take(examples[:exact_match_limit])
        sums += [exact_match(model, tok, asked, batch_size)["hits"], len(asked)]
    return sums


def _task_metrics(task, sums: list, exact_match_limit: int) -> dict:
    """A task's metrics from its sums (as `_task_sums` lists them, added up over the processes)."""
    name, wanted = task.cfg.name, task_metrics(task, exact_match_limit)
    loss = _mean_loss(sums[0], sums[1])
    metrics = {f"{name}/loss": loss["loss"]}
    if "perplexity" in wanted:
        metrics[f"{name}/perplexity"] = loss["perplexity"]
    rest = sums[2:]
    if "accuracy" in wanted:
        k = len(task.labels)
        confusion = [[int(n) for n in rest[i * k:(i + 1) * k]] for i in range(k)]
        metrics.update({f"{name}/{key}": v for key, v in confusion_metrics(confusion).items()})
        rest = rest[k * k:]
    if "exact_match" in wanted:
        metrics[f"{name}/exact_match"] = rest[0] / max(rest[1], 1)
    return metrics


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mintune.evaluate",
                                 description="Perplexity of a model on a text file or a JSONL file.")
    add_model_options(ap)
    ap.add_argument("--data", required=True, nargs="+",
                    help=".jsonl files (one text per row) or plain text files (one text per paragraph)")
    ap.add_argument("--field", default="text", help="the JSONL field holding the text")
    ap.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")
    ap.add_argument("--max-length", type=int, default=None, help="cut texts to this many tokens")
    args = ap.parse_args(argv)
    return run_command(lambda: _evaluate_files(args))


def _evaluate_files(args) -> None:
    check_sizes(args.batch_size, args.max_length)
    model, tok = load_model_from(args)
    for path in args.data:
        token_lists = [tok.encode(t) for t in read_texts(path, args.field)]
        check_texts(token_lists, f"{path}: ")
        nll, n = token_nll(model, token_lists, args.batch_size, args.max_length)
        print(f"{path}: perplexity {math.exp(nll / n):.3f} over {n} predicted tokens in {len(token_lists)} texts")


if __name__ == "__main__":
    sys.exit(main())
