"""mintune: a minimal, readable fine-tuning trainer for GPT-style language models.

    model = mintune.load_model("hf_dir", dtype=torch.bfloat16, device="cuda")
    tok = mintune.load_tokenizer("hf_dir")
    text = mintune.generate(model, tok, "prompt", max_new_tokens=50)
"""
from .config import ConfigError, ModelConfig
from .hf import CheckpointError, load_model, save_pretrained
from .model import GPT, KVCache

__all__ = ["ConfigError", "ModelConfig", "CheckpointError", "load_model", "save_pretrained", "GPT", "KVCache"]
