"""GGUF file -> Hugging Face checkpoint directory, through transformers' own GGUF reader.

transformers dequantizes the GGUF tensors, undoes llama.cpp's Q/K row permutation and builds
the tokenizer and chat template from the GGUF metadata.  A model loaded that way refuses
``save_pretrained``, so its state dict is copied into a plain model built from the same config
and that model is saved (float32 safetensors), with the tokenizer and a generation config.
"""

from __future__ import annotations

import json
import pathlib

import torch

# config.json keys that describe the GGUF source, not the converted checkpoint: left in, they
# would make transformers treat the float32 safetensors as a quantized GGUF model.
_SOURCE_ONLY_KEYS = ("quantization_config", "_model_name_or_path")


def load_gguf_reference(gguf_path: pathlib.Path, with_tokenizer: bool = True):
    """(model, tokenizer or None) as transformers' GGUF loader builds them (float32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = pathlib.Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name) if with_tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files to out_dir."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = pathlib.Path(out_dir)
    source, tokenizer = load_gguf_reference(gguf_path)
    config = source.config
    config.architectures = [type(source).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(source.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{gguf_path.name}: state dict mismatch (missing {missing}, unexpected {unexpected})")
    if config.tie_word_embeddings:
        plain.tie_weights()
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    config.eos_token_id, config.bos_token_id = eos, bos
    plain.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    plain.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "config.json"
    raw = json.loads(config_path.read_text())
    for key in _SOURCE_ONLY_KEYS:
        raw.pop(key, None)
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)
    return out_dir
