"""Engine and model configuration: frozen dataclasses, validated on construction."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels import DEFAULT_SPLIT_SIZE

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: dict = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {self.rope['rope_type']!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        config_file = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"model path {str(path)!r} does not exist")
        if not config_file.is_file():
            raise FileNotFoundError(f"model path {str(path)!r} has no config.json; expected a "
                                    "Hugging Face checkpoint directory")
        return cls.from_hf_dict(_read_json(config_file), _eos_from_generation_config(path))

    @classmethod
    def from_hf_dict(cls, hf: dict, generation_eos: tuple[int, ...] = ()) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; supported: 'silu'")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = generation_eos or (tuple(eos) if isinstance(eos, list) else
                                     (eos,) if isinstance(eos, int) else ())
        is_llama = arch == "LlamaForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or (is_llama or arch == "Qwen3ForCausalLM")
            and bool(hf.get("attention_bias", False)),
            o_bias=(is_llama or arch == "Qwen3ForCausalLM") and bool(hf.get("attention_bias", False)),
            mlp_bias=is_llama and bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            rope=_rope_parameters(hf),
            eos_token_ids=eos_ids,
            checkpoint_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )


def _rope_parameters(hf: dict) -> dict:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return rope


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a {type(data).__name__}, not a JSON object")
    return data


def _eos_from_generation_config(path: Path) -> tuple[int, ...]:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return ()
    eos = _read_json(gen).get("eos_token_id")
    if isinstance(eos, int):
        return (eos,)
    return tuple(eos or ())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. Sizes in tokens unless named otherwise."""
    model: str
    device: str = field(default_factory=default_device)
    dtype: str = "auto"
    block_size: int = DEFAULT_SPLIT_SIZE  # also the attention split: trainers use the same
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    deterministic: bool = True
    kernel_backend: str = "auto"
    # CPU: linears through a packed copy of each weight (faster at decode's few rows, the same
    # bits; the weights take twice their size in host memory while the engine runs)
    packed_weights: bool = True

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose 'auto' or one of "
                             f"{', '.join(DTYPES)}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r} is not a torch device: {e}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: this engine runs on 'cpu' or 'cuda'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available here (torch "
                             f"{torch.__version__}); use 'cpu'")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_backend {self.kernel_backend!r} is not one of auto, torch, "
                             "triton")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                             f"least block_size ({self.block_size}): prefill chunks are whole blocks")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive byte count, got "
                             f"{self.kv_cache_memory}")

    def torch_dtype(self, checkpoint_dtype: str) -> torch.dtype:
        """'auto' is the checkpoint's dtype on CUDA and float32 on the CPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if torch.device(self.device).type == "cpu":
            return torch.float32
        return DTYPES.get(checkpoint_dtype, torch.bfloat16)
