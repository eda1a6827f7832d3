"""mintune: a minimal, readable fine-tuning trainer for GPT-style language models.

    model = mintune.load_model("hf_dir", dtype=torch.bfloat16, device="cuda")
    tok = mintune.load_tokenizer("hf_dir")
    logits = model(input_ids, attention_mask=mask)            # (B, T, vocab)
    text = mintune.generate(model, tok, "prompt", max_new_tokens=50)
    mintune.save_pretrained(model, "out/model")                # the family's own Hugging Face layout
    mintune.export_gguf(model, tok, "out/model.gguf", type="q8_0")  # one file for llama.cpp
"""
from pathlib import Path

from .config import ConfigError, ModelConfig
from .adapters import apply_adapters
from .generation import generate
from .gguf_export import export_gguf
from .heads import add_classification_head, classify, fit_classification_head
from .hf import ModelFileError, load_model, save_pretrained
from .lora import apply_lora, merge_lora, unmerge_lora
from .adapter_files import load_adapter, save_adapter
from .methods import apply_method, check_gradient_flow, freeze_partial, full_finetune, print_trainable_parameters
from .model import GPT, KVCache
from .prompts import apply_prefix_tuning, apply_prompt_tuning
from .tokenizer import Tokenizer, load_tokenizer



def datasets_dir() -> Path:
    """The folder of the datasets shipped with mintune (sentiment/, instructions/, quotes/)."""
    return Path(__file__).parent / "datasets"


__all__ = [
    "datasets_dir", "ConfigError", "ModelConfig", "ModelFileError", "load_model", "save_pretrained", "GPT",
    "KVCache", "Tokenizer", "load_tokenizer", "generate", "export_gguf",
    "apply_method", "full_finetune", "freeze_partial", "apply_lora", "merge_lora", "unmerge_lora",
    "apply_prompt_tuning", "apply_prefix_tuning", "apply_adapters", "add_classification_head", "classify",
    "fit_classification_head", "print_trainable_parameters", "check_gradient_flow", "save_adapter", "load_adapter",
]
