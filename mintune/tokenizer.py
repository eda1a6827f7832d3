"""Tokenizer: a thin wrapper over the `tokenizers` library that reads and writes Hugging Face tokenizer folders.

What it reads, in order of preference:
  - ``tokenizer.json`` (the `tokenizers` serialization), else GPT-2 style ``vocab.json`` + ``merges.txt``
    (byte-level BPE, rebuilt here the way transformers' GPT2Tokenizer builds it);
  - ``tokenizer_config.json`` (special tokens, ``add_bos_token``/``add_eos_token``, padding side, chat template),
    ``special_tokens_map.json`` (legacy), ``chat_template.jinja`` and ``additional_chat_templates/*.jinja``;
  - ``config.json`` / ``generation_config.json`` for token ids the tokenizer files do not name, and for stop ids.

Behaviour follows transformers 5.x (checked against 5.23 by tests/test_tokenizer.py):
  - BOS/EOS: with a ``tokenizer.json``, its post-processor alone decides which special tokens ``encode`` adds;
    transformers 5 drops ``add_bos_token``/``add_eos_token`` from the config in that case. Only the legacy
    vocab/merges format, which has no post-processor, takes them from the config (both default to False).
  - Padding: a model without a pad token pads with its eos token (else unk). transformers leaves ``pad_token``
    unset instead; mintune picks one so batches can always be built, which is safe because every consumer masks
    padding through ``attention_mask``, never by comparing ids with ``pad_id``.
  - Chat templates render in a sandboxed jinja2 environment set up like transformers' (trim_blocks, lstrip_blocks,
    loop controls, a ``tojson`` that keeps non-ASCII text, ``raise_exception``, ``strftime_now`` and a
    ``{% generation %}`` block that renders its body).

Reference: https://huggingface.co/docs/tokenizers (the backend) and transformers' ``tokenization_utils_base.py``.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from .files import read_json, read_text, write_text

# The special-token names transformers knows; their values also become chat-template variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json writes a huge number (1e30) to mean "no limit"; mintune says None instead.
_NO_LIMIT = 10**18
_GPT2_DEFAULT_SPECIAL = "<|endoftext|>"


class ChatTemplateError(ValueError):
    """A chat template failed to compile or raised while rendering (e.g. through ``raise_exception``)."""


class Tokenizer:
    """Encodes, decodes, pads and renders chat templates; see the module docstring for the rules it follows."""

    def __init__(
        self,
        backend: Backend,
        special_tokens: dict[str, str] | None = None,
        extra_special_tokens: list[str | AddedToken] | None = None,
        chat_templates: dict[str, str] | None = None,
        padding_side: str = "right",
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        extra_stop_ids: list[int] | None = None,
        path: str | Path | None = None,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backend = backend
        # Padding and truncation baked into a tokenizer.json would silently change encode(); batch_encode does both.
        self.backend.no_padding()
        self.backend.no_truncation()
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.path = Path(path) if path is not None else None
        # Named special tokens missing from the added vocabulary are added, as transformers does, so that they are
        # matched whole inside text and dropped by skip_special_tokens.
        present = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        for token in [*self.special_tokens.values(), *(extra_special_tokens or [])]:
            content = str(token.content if isinstance(token, AddedToken) else token)
            if content not in present:
                added = token if isinstance(token, AddedToken) else AddedToken(content, special=True, normalized=False)
                self.backend.add_special_tokens([added])
                present.add(content)

        self.bos_token, self.bos_id = self._named("bos_token")
        self.eos_token, self.eos_id = self._named("eos_token")
        self.unk_token, self.unk_id = self._named("unk_token")
        self.pad_token, self.pad_id = self._named("pad_token")
        if self.pad_token is None:  # the documented fallback: eos, else unk, else no padding possible
            fallback = "eos_token" if self.eos_token is not None else "unk_token"
            self.pad_token, self.pad_id = self._named(fallback)
        stops = [self.eos_id, *(extra_stop_ids or [])]
        self.stop_ids: list[int] = [i for n, i in enumerate(stops) if i is not None and i not in stops[:n]]

    def _named(self, name: str) -> tuple[str | None, int | None]:
        token = self.special_tokens.get(name)
        return (token, self.backend.token_to_id(token)) if token is not None else (None, None)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r})")

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def check_fits(self, vocab_size: int, model: str | Path) -> None:
        """Every id this tokenizer can produce has a row in a model of `vocab_size` (a model may have more)."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer of {self.path} has {self.vocab_size} tokens, but the model ({model}) "
                             f"has vocab_size = {vocab_size}: ids from {vocab_size} on have no embedding; use "
                             "the tokenizer that belongs to the model")

    # ---- encode / decode -------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no special tokens added) and each token's (start, end) character span."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.reshape(-1).tolist()
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # transformers skips this cleanup for BPE models: there it would delete real spaces before punctuation.
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def _encode_truncated(self, text: str, add_special_tokens: bool, max_length: int, side: str) -> list[int]:
        # Truncate the text's tokens, then add the special tokens, so a BOS/EOS is never the part cut off.
        room = max_length - (self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0)
        if room < 0:
            raise ValueError(f"max_length={max_length} leaves no room next to the special tokens this tokenizer adds")
        encoding = self.backend.encode(text, add_special_tokens=False)
        encoding.truncate(room, direction=side)
        return self.backend.post_process(encoding, add_special_tokens=add_special_tokens).ids

    def batch_encode(
        self,
        texts: list[str] | list[list[int]],
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Encode (strings) or take (lists of ids, used as they are) each row, truncate to max_length, and pad.

        Returns input_ids and attention_mask, both LongTensor (B, T) with T the longest row; padding goes on
        ``padding_side`` (default: this tokenizer's ``padding_side``) and has attention_mask 0.
        """
        side = padding_side or self.padding_side
        for name, value in (("padding_side", side), ("truncation_side", truncation_side)):
            if value not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
        if isinstance(texts, (str, torch.Tensor)) or len(texts) == 0:
            raise ValueError("batch_encode expects a non-empty list of strings or of id lists")
        rows: list[list[int]] = []
        for i, item in enumerate(texts):
            if isinstance(item, str):
                row = (self.encode(item, add_special_tokens) if max_length is None
                       else self._encode_truncated(item, add_special_tokens, max_length, truncation_side))
            elif isinstance(item, (list, tuple, torch.Tensor)):
                row = [int(t) for t in item]
                if max_length is not None and len(row) > max_length:
                    row = row[:max_length] if truncation_side == "right" else row[len(row) - max_length:]
            else:
                raise TypeError(f"batch_encode row {i}: expected a str or a list of ids, got {type(item).__name__}")
            rows.append(row)

        width = max(len(r) for r in rows)
        if self.pad_id is None and any(len(r) < width for r in rows):
            raise ValueError(f"rows need padding but the tokenizer from {self.path} has no pad, eos or unk token; "
                             "set pad_token in its tokenizer_config.json")
        input_ids = torch.full((len(rows), width), self.pad_id if self.pad_id is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            input_ids[i, cols] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- chat templates --------------------------------------------------------------------------------------

    def _select_template(self, chat_template: str | None, has_tools: bool) -> str:
        names = sorted(self.chat_templates)
        if chat_template is None:
            if has_tools and "tool_use" in self.chat_templates:
                return self.chat_templates["tool_use"]
            if self.chat_template is not None:
                return self.chat_template
            if names:
                raise ValueError(f"the tokenizer from {self.path} has chat templates named {names} but none named "
                                 "'default'; pass chat_template=<name>")
            raise ValueError(f"the tokenizer from {self.path} has no chat template (looked for chat_template.jinja "
                             "and a 'chat_template' entry in tokenizer_config.json)")
        if chat_template in self.chat_templates:
            return self.chat_templates[chat_template]
        if "{" in chat_template:  # the text of a template rather than a name
            return chat_template
        raise ValueError(f"unknown chat template name {chat_template!r} for the tokenizer from {self.path}; "
                         f"it has {names}")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        **extra_template_vars: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the model's chat template; with tokenize=True return the ids of the text.

        ``chat_template`` picks a named template of this tokenizer or gives the text of one. Extra keyword
        arguments become template variables (e.g. ``tools=[...]``, ``enable_thinking=False``).
        """
        if not isinstance(messages, (list, tuple)) or len(messages) == 0:
            raise ValueError("apply_chat_template expects a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise TypeError(f"message {i} should be a dict with 'role' and 'content', got {type(message).__name__}")
        # Keys set to None are dropped, as transformers does: templates test `'key' in message`, not for None.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        for i, message in enumerate(messages):
            if not isinstance(message.get("content", ""), str):
                raise ValueError(f"message {i}: 'content' should be a string, got "
                                f"{type(message['content']).__name__}")
        template = self._select_template(chat_template, bool(extra_template_vars.get("tools")))
        variables = {**self.special_tokens, "tools": None, "documents": None, **extra_template_vars,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            text = _compile_chat_template(template).render(**variables)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template of {self.path} does not compile: {e.message} "
                                    f"(template line {e.lineno})") from e
        except jinja2.TemplateError as e:  # raise_exception(...) in the template lands here
            raise ChatTemplateError(f"chat template of {self.path} raised: {e}") from e
        _check_roles(messages, template, self.path)
        # The template writes the special tokens itself, so none are added on top (as transformers does).
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- save ------------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (chat template included) so that load_tokenizer and
        transformers.AutoTokenizer both read back this tokenizer. Each file is written to a temp file, then renamed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # The fast-tokenizer class reads tokenizer.json verbatim; the post-processor in it carries BOS/EOS adding.
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                                  "padding_side": self.padding_side,
                                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if set(self.chat_templates) == {"default"}:
            config["chat_template"] = self.chat_template
        elif self.chat_templates:
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
        write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        # Template files from an earlier save would win over the config on load (in transformers too): remove them.
        for stale in [directory / "chat_template.jinja", *(directory / "additional_chat_templates").glob("*.jinja")]:
            stale.unlink(missing_ok=True)


# Roles every chat template is written for; others count as known when the template compares with them.
STANDARD_ROLES = ("system", "user", "assistant", "tool")


def _check_roles(messages: list[dict[str, Any]], template: str, path) -> None:
    """A role the template neither tests for nor is standard renders as text the model never saw (a
    template that raises on unknown roles has already said so)."""
    known = set(STANDARD_ROLES) | set(re.findall(r"==\s*['\"]([\w-]+)['\"]", template))
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or role not in known:
            raise ChatTemplateError(f"message {i}: role {role!r} is not one the chat template of {path} knows "
                                    f"({', '.join(sorted(known))})")


# ---- loading -------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model folder (see the module docstring for the files it reads)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist or is not a directory")
    config = _read_json_object(folder / "tokenizer_config.json") or {}
    model_config = _read_json_object(folder / "config.json") or {}
    generation_config = _read_json_object(folder / "generation_config.json") or {}

    special = _named_tokens(config, folder / "tokenizer_config.json")
    extra: list[str | AddedToken] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key)
        if isinstance(value, dict):  # transformers 5 names model-specific tokens this way
            special.update(_named_tokens(value, folder / "tokenizer_config.json"))
        elif isinstance(value, list):
            extra += [_added_token(v, folder / "tokenizer_config.json", special=True) for v in value]
    # transformers reads special_tokens_map.json only for configs without added_tokens_decoder, and lets it win.
    if "added_tokens_decoder" not in config:
        token_map = _read_json_object(folder / "special_tokens_map.json") or {}
        special.update(_named_tokens(token_map, folder / "special_tokens_map.json"))
        extra += [_added_token(v, folder / "special_tokens_map.json", special=True)
                  for v in token_map.get("additional_special_tokens") or []]

    padding_side = config.get("padding_side")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"{folder / 'tokenizer_config.json'}: padding_side should be 'left' or 'right', "
                         f"got {padding_side!r}")
    legacy = False
    if (folder / "tokenizer.json").is_file():
        backend = _load_tokenizer_json(folder / "tokenizer.json")
        if backend.padding is not None:  # transformers takes these two defaults from a padded tokenizer.json
            special.setdefault("pad_token", backend.padding["pad_token"])
            padding_side = padding_side or backend.padding["direction"]
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _load_vocab_merges(folder, add_prefix_space=bool(config.get("add_prefix_space", False)))
        legacy = True
        # This format is GPT-2's, whose tokenizer class defaults these three to <|endoftext|>.
        for name in ("bos_token", "eos_token", "unk_token"):
            special.setdefault(name, _GPT2_DEFAULT_SPECIAL)
    else:
        raise FileNotFoundError(f"no tokenizer files in {folder}: looked for tokenizer.json, "
                                "and for vocab.json together with merges.txt")

    _add_declared_tokens(backend, config.get("added_tokens_decoder") or {}, folder / "tokenizer_config.json")
    # Last resort for names the tokenizer files leave out: the ids in the model's config.json.
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token_id = model_config.get(f"{name}_id")
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        token = backend.id_to_token(token_id) if isinstance(token_id, int) and token_id >= 0 else None
        if name not in special and token is not None:
            special[name] = token

    max_length = config.get("model_max_length")
    stop_ids = []
    for source in (generation_config, model_config):
        value = source.get("eos_token_id")
        stop_ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    tok = Tokenizer(
        backend,
        special_tokens=special,
        extra_special_tokens=extra,
        chat_templates=_load_chat_templates(folder, config),
        padding_side=padding_side or "right",
        model_max_length=int(max_length) if isinstance(max_length, (int, float)) and max_length < _NO_LIMIT else None,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        extra_stop_ids=stop_ids,
        path=folder,
    )
    if legacy:
        tok.backend.post_processor = _bos_eos_processor(tok, bool(config.get("add_bos_token", False)),
                                                        bool(config.get("add_eos_token", False)))
    return tok


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None if the file is missing; errors name the file and the line."""
    if not path.is_file():
        return None
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(value).__name__}")
    return value


def _token_text(value: Any, source: Path, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} should be a string or an object with 'content', got {value!r}")


def _named_tokens(entries: dict[str, Any], source: Path) -> dict[str, str]:
    # Any other "*_token" string (image_token, ...) is a model-specific special token in transformers 5.
    return {key: _token_text(value, source, key) for key, value in entries.items() if value is not None
            and (key in SPECIAL_TOKEN_NAMES or (key.endswith("_token") and isinstance(value, str)))}


def _added_token(value: Any, source: Path, special: bool) -> AddedToken:
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        return AddedToken(value["content"], **({"special": special} | flags))
    raise ValueError(f"{source}: expected a token string or an object with 'content', got {value!r}")


def _add_declared_tokens(backend: Backend, declared: dict[str, Any], source: Path) -> None:
    """Add the tokens of tokenizer_config's added_tokens_decoder that the backend lacks, checking their ids."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    for index, value in sorted(declared.items(), key=lambda kv: int(kv[0])):
        token = _added_token(value, source, special=bool(isinstance(value, dict) and value.get("special")))
        if token.content in present:
            continue
        backend.add_tokens([token])
        # The backend assigns ids itself; a silent mismatch would shift every id the model sees.
        if backend.token_to_id(token.content) != int(index):
            raise ValueError(f"{source}: added token {token.content!r} is declared with id {index} but the "
                             f"vocabulary gives it id {backend.token_to_id(token.content)}")


def _load_tokenizer_json(path: Path) -> Backend:
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # the Rust error is terse: say which file, and where the JSON breaks if it does
        _read_json_object(path)
        raise ValueError(f"{path} could not be loaded by the tokenizers library: {e}") from e


def _load_vocab_merges(folder: Path, add_prefix_space: bool) -> Backend:
    """A GPT-2 style byte-level BPE from vocab.json + merges.txt, built as transformers' GPT2Tokenizer builds it."""
    vocab = _read_json_object(folder / "vocab.json")
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(read_text(folder / "merges.txt").splitlines(), start=1):
        if line.startswith("#version") or not line.strip():
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{folder / 'merges.txt'} line {n}: expected two space-separated tokens, got {line!r}")
        merges.append((pair[0], pair[1]))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def _bos_eos_processor(tok: Tokenizer, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """The post-processor transformers builds from add_bos_token/add_eos_token (a flag without its token is off)."""
    add_bos, add_eos = add_bos and tok.bos_token is not None, add_eos and tok.eos_token is not None
    bos, eos = (f"{tok.bos_token}:0 " if add_bos else ""), (f" {tok.eos_token}:0" if add_eos else "")
    bos1, eos1 = (f" {tok.bos_token}:1" if add_bos else ""), (f" {tok.eos_token}:1" if add_eos else "")
    specials = ([(tok.bos_token, tok.bos_id)] if add_bos else []) + ([(tok.eos_token, tok.eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=f"{bos}$A:0{eos}", pair=f"{bos}$A:0{eos}{bos1} $B:1{eos1}",
                                         special_tokens=specials)


def _load_chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    # Template files (transformers 5 writes them) replace whatever tokenizer_config.json holds.
    templates: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = read_text(folder / "chat_template.jinja")
    for file in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        templates[file.name.removesuffix(".jinja")] = read_text(file)
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template should be a string or a list of "
                     "{'name', 'template'} objects")


# ---- jinja environment ---------------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text in some templates; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters and non-ASCII text, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> jinja2.Template:
    # Chat templates come with downloaded models: untrusted code, hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
