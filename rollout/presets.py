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

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def cache_dir() -> Path:
    return Path(os.environ.get("ROLLOUT_CACHE", Path.home() / ".cache" / "rollout"))


def byte_level_tokenizer():
    """A byte-level tokenizer: one token per byte (ids 0-255), then the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def make_checkpoint(path: str | Path, architecture: str = "Qwen3ForCausalLM", seed: int = 0,
                    dtype: str = "float32", with_tokenizer: bool = True,
                    **config) -> Path:
    """Write a random-weight Hugging Face checkpoint (config.json + model.safetensors, and a
    byte-level tokenizer) built by transformers itself, so it is the real format."""
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
    if with_tokenizer:
        byte_level_tokenizer().save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": SPECIAL_TOKENS[0], "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def preset_path(name: str = DEFAULT_PRESET) -> Path:
    """The preset's checkpoint directory, written on first use (atomically)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    target = cache_dir() / "presets" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = dict(PRESETS[name])
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        make_checkpoint(tmp, spec.pop("architecture"), seed=0, dtype=spec.pop("dtype"), **spec)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
