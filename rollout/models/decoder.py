"""Llama-family decoder (Llama, Qwen2, Qwen3), written against our kernels.

Parameters are fused (q/k/v, gate/up) and allocated once; `weight_targets()` maps every Hugging
Face checkpoint name onto the rows of the parameter it lands in, which is all that loading and
in-place updates need. The op sequence per layer is the one transformers runs, so a trainer under
`kernels.batch_invariant_mode()` computes the same bits.
"""

from dataclasses import dataclass

import torch
from torch import nn

from kernels import Ops
from rollout.config import ModelConfig
from rollout.layers.attention import PagedAttention
from rollout.layers.linear import Linear
from rollout.layers.norm import RMSNorm
from rollout.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor lives: rows [start, end) of `param` (all rows: 0, len)."""
    param: nn.Parameter
    start: int
    end: int
    shape: tuple[int, ...]

    def view(self) -> torch.Tensor:
        return self.param.data[self.start:self.end]


class Attention(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = Linear(ops, cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size),
                               cfg.qkv_bias)
        self.o_proj = Linear(ops, cfg.q_size, (cfg.hidden_size,), cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(ops, cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(ops, cfg.head_dim, cfg.rms_norm_eps)
        self.rotary = rotary
        self.attn = PagedAttention(ops, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        q, k, v = self.qkv_proj(x)
        q = q.reshape(-1, cfg.num_heads, cfg.head_dim)
        k = k.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(-1, cfg.q_size))


class MLP(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(ops, cfg.hidden_size,
                                   (cfg.intermediate_size, cfg.intermediate_size), cfg.mlp_bias)
        self.down_proj = Linear(ops, cfg.intermediate_size, (cfg.hidden_size,), cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(self.ops.silu_and_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, ops: Ops, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(ops, cfg, rotary)
        self.post_attention_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(ops, cfg)

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderForCausalLM(nn.Module):
    # our fused module -> the checkpoint modules it holds, in row order
    packed_modules_mapping = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(self, ops: Ops, cfg: ModelConfig, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        rotary = RotaryEmbedding(ops, cfg.head_dim, max_positions, cfg.rope, dtype)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(ops, cfg, rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size),
                                        requires_grad=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head_weight)

    def prepare_kernels(self, split: int, dtype: torch.dtype) -> list:
        """Let the kernels decide (and prove) every shape the forward runs; their verdicts."""
        cfg = self.cfg
        linears = [(m.weight, m.splits) for m in self.modules() if isinstance(m, Linear)]
        lengths = [cfg.hidden_size, cfg.vocab_size] + ([cfg.head_dim] if cfg.qk_norm else [])
        return self.ops.prepare(linears + [(self.lm_head_weight, None)], lengths,
                                cfg.head_dim, split, dtype)

    def weight_targets(self) -> dict[str, WeightTarget]:
        """Every checkpoint tensor name this model takes, and the rows it lands in."""
        targets: dict[str, WeightTarget] = {}
        for name, param in self.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            parent, _, proj = module_name.rpartition(".")
            parts = self.packed_modules_mapping.get(proj)
            if parts is None:
                hf_name = "lm_head.weight" if name == "lm_head" else f"model.{name}"
                targets[hf_name] = WeightTarget(param, 0, param.shape[0], tuple(param.shape))
                continue
            offset = 0
            for part, size in zip(parts, self.get_submodule(module_name).splits):
                targets[f"model.{parent}.{part}.{leaf}"] = WeightTarget(
                    param, offset, offset + size, (size, *param.shape[1:]))
                offset += size
        if self.cfg.tie_word_embeddings:
            targets["lm_head.weight"] = targets["model.embed_tokens.weight"]
        return targets
