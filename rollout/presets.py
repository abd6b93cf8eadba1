"""Random-weight checkpoints: the built-in default model, and the small ones tests build.

Nothing can be downloaded on our machines, so the default model is a preset of realistic shape
(Qwen3-0.6B's) with random weights from a fixed seed, written once as an ordinary Hugging Face
checkpoint directory and then loaded through the same path as any real checkpoint.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rollout.toy_tokenizer import SPECIAL_TOKENS, byte_level_tokenizer

DEFAULT_PRESET = "qwen3-0.6b-random"

PRESETS: dict[str, dict] = {
    "qwen3-0.6b-random": dict(
        architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, dtype="bfloat16"),
    "qwen3-tiny-random": dict(
        architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, dtype="float32"),
}

# Bump when what a preset directory holds changes (the tokenizer, the files), so that a cached
# preset written by an older version is rebuilt instead of reused.
PRESET_FORMAT = 2


def cache_dir() -> Path:
    return Path(os.environ.get("ROLLOUT_CACHE", Path.home() / ".cache" / "rollout"))


def make_checkpoint(path: str | Path, architecture: str = "Qwen3ForCausalLM", seed: int = 0,
                    dtype: str = "float32", tokenizer: str | None = "bytes",
                    **config) -> Path:
    """Write a random-weight Hugging Face checkpoint (config.json + model.safetensors, and a
    byte-level tokenizer) built by transformers itself, so it is the real format.
    tokenizer: "bytes" (byte and special tokens only), "vocab" (also merged tokens, so every id
    of the model's vocabulary decodes to text) or None."""
    if tokenizer not in ("bytes", "vocab", None):
        raise ValueError(f"tokenizer={tokenizer!r}: choose 'bytes', 'vocab' or None")
    import transformers
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    eos = 256  # the first special token of the byte-level tokenizer
    config.setdefault("eos_token_id", eos)
    config.setdefault("bos_token_id", eos)
    hf_config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, architecture)(hf_config)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    if tokenizer is not None:
        vocab_size = hf_config.vocab_size if tokenizer == "vocab" else None
        byte_level_tokenizer(vocab_size).save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": SPECIAL_TOKENS[0], "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def _fingerprint(name: str) -> dict:
    return {"preset": name, "format": PRESET_FORMAT, "spec": PRESETS[name]}


def _is_current(target: Path, name: str) -> bool:
    marker = target / "preset.json"
    return marker.is_file() and json.loads(marker.read_text()) == _fingerprint(name)


def preset_path(name: str = DEFAULT_PRESET) -> Path:
    """The preset's checkpoint directory, written on first use (atomically). A cached one
    written by another version of this code (no or another `preset.json`) is rebuilt."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    target = cache_dir() / "presets" / name
    if _is_current(target, name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = dict(PRESETS[name])
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    stale = Path(f"{tmp}-stale")
    try:
        make_checkpoint(tmp, spec.pop("architecture"), seed=0, dtype=spec.pop("dtype"),
                        tokenizer="vocab", **spec)
        (tmp / "preset.json").write_text(json.dumps(_fingerprint(name)))
        if target.exists():
            os.replace(target, stale)
        os.replace(tmp, target)
    except OSError:
        if not _is_current(target, name):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return target
