"""Models: tiny Llama-style presets built from scratch, and loading of any local Hugging Face causal-LM folder.

Presets are sized so that a teacher trains on two CPU cores in minutes and a student is clearly weaker; the
same code loads a 1B-parameter folder on GPUs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from core.errors import ModelError

# name -> (layers, hidden, heads, mlp width). Measured sizes and quality on the embedded task: see README.md.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "student": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128),
    "teacher-small": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=352),
    "teacher": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=704),
    "teacher-large": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=6, intermediate_size=1024),
}


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase, max_positions: int = 512) -> LlamaConfig:
    if name not in PRESETS:
        raise ModelError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} or pass a model folder")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        **PRESETS[name],
    )


def build_model(name: str, tokenizer: PreTrainedTokenizerBase, seed: int, max_positions: int = 512) -> LlamaForCausalLM:
    """A freshly initialised preset; the initialisation depends only on `seed`."""
    config = preset_config(name, tokenizer, max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def is_model_dir(path: str | Path) -> bool:
    return Path(path, "config.json").is_file()


def load_model(path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """Load any local causal-LM folder written by save_pretrained (safetensors preferred)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    if not is_model_dir(path):
        raise ModelError(f"{path} is not a model folder (no config.json); pass a folder written by save_pretrained")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load a causal LM from {path}: {exc}") from exc


def build_or_load(
    spec: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    max_positions: int = 512,
    teacher_folder: str | Path | None = None,
    keep: list[int] | None = None,
) -> PreTrainedModel:
    """`spec` is a preset name, a model folder, or prune:K (the K layers `keep` of the model in `teacher_folder`;
    default evenly spaced: core.pretrained.kept_layers; the recipe passes those --prune-rule chose)."""
    from core.pretrained import parse_prune, prune_layers

    k = parse_prune(spec)
    if k is not None:
        if teacher_folder is None:
            raise ModelError(f"--student {spec} prunes the teacher, but this run has no teacher folder to prune")
        return prune_layers(load_model(teacher_folder), k, keep)
    if spec in PRESETS:
        return build_model(spec, tokenizer, seed, max_positions)
    if Path(spec).exists():
        model = load_model(spec)
        if model.config.vocab_size < len(tokenizer):
            raise ModelError(
                f"model {spec} has {model.config.vocab_size} embeddings but the tokenizer has {len(tokenizer)} tokens"
            )
        return model
    raise ModelError(f"--student/--teacher {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
