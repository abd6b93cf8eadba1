"""The fastest plain torch ops, for `deterministic=False`: results may vary with the batch."""

import torch
import torch.nn.functional as F

from kernels.cpu import store_kv  # noqa: F401  (a scatter has no reduction to reorder)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           splits: tuple[int, ...] | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.to(torch.float32), dim=-1)


def softmax_parts(x: torch.Tensor):
    x = x.to(torch.float32)
    z = x - x.amax(-1, keepdim=True)
    e = torch.exp(z)
    return z, e, e.sum(-1)


def _gather(k_cache, v_cache, block_tables):
    n, blocks = block_tables.shape
    flat = block_tables.reshape(-1)
    k = k_cache.index_select(0, flat).unflatten(0, (n, blocks)).permute(0, 2, 1, 4, 3)
    v = v_cache.index_select(0, flat).unflatten(0, (n, blocks)).transpose(1, 2)
    kv_heads, size, d = v.shape[1], v.shape[3], v.shape[4]
    return (k.reshape(n, kv_heads, blocks * size, d), v.reshape(n, kv_heads, blocks * size, d))


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    k, v = _gather(k_cache, v_cache, block_tables)
    mask = torch.arange(k.shape[2], device=q.device) < context_lens.unsqueeze(-1)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype),
                                         attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


def prefill_attention(q, k_cache, v_cache, block_table, positions, scale):
    k, v = _gather(k_cache, v_cache, block_table.unsqueeze(0))
    mask = torch.arange(k.shape[2], device=q.device) <= positions.unsqueeze(-1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.to(q.dtype),
                                         v.to(q.dtype), attn_mask=mask[None, None],
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
