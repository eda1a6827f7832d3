"""Tiny tokenizers trained here, with the `tokenizers` library, on text written for these tests."""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The lighthouse keeper counted 12345 gulls before breakfast, then 3.14 more after tea.",
    "Tabs\tand   spaces\t\tlive together here; newlines too.\n\nA blank line sat between them.",
    "In the café the naïve poet ordered crème brûlée and wrote about the rain in Zürich.",
    "Small robots 🙂 wave at passers-by 👍🏽 while the tram rattles down the hill.",
    "日本語のテキストを少しだけ書きます。東京の朝はとても静かでした。",
    "def add(a, b):\n    return a + b  # four spaces of indentation\n",
    "Numbers like 2024, 1999 and 007 appear in ledgers, receipts and old diaries.",
    "She said: \"Don't forget the umbrella!\" and he didn't, for once.",
    "Who's there? We're here, under the old bridge.",
]

# Strings that tokenizers get wrong first: digits, whitespace runs, newlines, accents, emoji, CJK, special tokens.
TRICKY_STRINGS = [
    "Hello world", "12345 3.14", "a  b   c\t\td", "line one\n\nline two\n", "café naïve crème brûlée",
    "🙂👍🏽 ok", "日本語のテキスト", "", " leading space", "   three leading", "trailing  ", "Ω≈√ unseen ÿ",
    "x<|endoftext|>y", "<s>hi</s> there", "<|im_start|>user\nhi<|im_end|>\n", "mixed\t \n \t end",
    "<|begin_of_text|>A<think>b</think>",
]

CHATML = """{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def train_bpe(tok: Backend, vocab_size: int, special: list[str], alphabet: list[str] | None = None) -> Backend:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=alphabet or [])
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def gpt2_backend() -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    train_bpe(tok, 400, ["<|endoftext|>"], pre_tokenizers.ByteLevel.alphabet())
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def llama2_backend() -> Backend:
    tok = Backend(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    train_bpe(tok, 600, ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def chatml_backend() -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    train_bpe(tok, 420, ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"],
           pre_tokenizers.ByteLevel.alphabet())
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
                                      special_tokens=[("<|begin_of_text|>", 0)]),
    ])
    return tok
