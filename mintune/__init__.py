"""mintune: a minimal, readable fine-tuning trainer for GPT-style language models.

    model = mintune.load_model("hf_dir", dtype=torch.bfloat16, device="cuda")
    tok = mintune.load_tokenizer("hf_dir")
    logits = model(input_ids, attention_mask=mask)            # (B, T, vocab)
    text = mintune.generate(model, tok, "prompt", max_new_tokens=50)
    mintune.save_pretrained(model, "out/model")                # the family's own Hugging Face layout
"""
from pathlib import Path

from .config import ConfigError, ModelConfig
from .generation import generate
from .hf import CheckpointError, load_model, save_pretrained
from .model import GPT, KVCache
from .tokenizer import Tokenizer, load_tokenizer



def datasets_dir() -> Path:
    """The folder of the datasets shipped with mintune (sentiment/, instructions/, quotes/)."""
    return Path(__file__).parent / "datasets"


__all__ = ["datasets_dir", "ConfigError", "ModelConfig", "CheckpointError", "load_model", "save_pretrained", "GPT", "KVCache",
           "Tokenizer", "load_tokenizer", "generate"]
