"""Hugging Face checkpoint directories: config, safetensors shards, model construction."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from kernels import Ops
from rollout.config import ModelConfig
from rollout.models import MODEL_CLASSES, DecoderForCausalLM

IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(path)!r} (only safetensors "
                                "checkpoints are supported)")
    return files


def iter_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if not name.endswith(IGNORED_SUFFIXES):
                        yield name, f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"cannot read checkpoint file {str(file)!r}: {e} "
                             "(the file is truncated or corrupt)") from e
        except Exception as e:  # safetensors raises its own SafetensorError type
            if type(e).__name__ != "SafetensorError":
                raise
            raise ValueError(f"cannot read checkpoint file {str(file)!r}: {e} "
                             "(the file is truncated or corrupt)") from e


def checkpoint_manifest(path: str | Path):
    """Names, dtypes and shapes of a checkpoint's tensors, read from the file headers only."""
    from weight_sync.buckets import TensorMeta, dtype_name
    manifest = []
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if not name.endswith(IGNORED_SUFFIXES):
                        sl = f.get_slice(name)
                        manifest.append(TensorMeta(name, dtype_name(_dtype_of(sl)),
                                                   tuple(sl.get_shape())))
        except Exception as e:
            raise ValueError(f"cannot read checkpoint file {str(file)!r}: {e} "
                             "(the file is truncated or corrupt)") from e
    return manifest


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _dtype_of(tensor_slice) -> torch.dtype:
    kind = tensor_slice.get_dtype()
    if kind not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {kind}")
    return _SAFETENSORS_DTYPES[kind]


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cfg: ModelConfig, ops: Ops, device: torch.device, dtype: torch.dtype,
                max_positions: int) -> DecoderForCausalLM:
    """Allocate the model's parameters once, uninitialized, on the device."""
    with _default_dtype(dtype), torch.device(device):
        return MODEL_CLASSES[cfg.architecture](ops, cfg, dtype, max_positions)
