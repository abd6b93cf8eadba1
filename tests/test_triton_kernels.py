"""Each Triton kernel, under TRITON_INTERPRET=1 on the CPU (natively on CUDA when present).

The interpreter computes `tl.dot` and `tl.sum` with numpy, so on the CPU these tests assert only
what it can show: results close to the CPU ops, and that every launch uses the same tile shapes
whatever the batch. Bitwise batch invariance of the kernels is asserted where they really run,
on CUDA."""

import pytest
import torch

from kernels import cpu

triton_ops = pytest.importorskip("kernels.triton_ops")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


class LaunchRecorder:
    """Stands in front of a Triton kernel and records the compile-time (tile) arguments of every
    launch, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.tiles = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tiles.append({k: v for k, v in kwargs.items() if k.isupper()})
            return self.kernel[grid](*args, **kwargs)
        return launch


def same_or_close(a, b, atol):
    """Bitwise on CUDA; close under the interpreter."""
    return torch.equal(a, b) if ON_GPU else torch.allclose(a, b, atol=atol)


def test_tile_shapes_never_depend_on_the_batch(monkeypatch):
    recorders = {name: LaunchRecorder(getattr(triton_ops, name))
                 for name in ("_gemm_kernel", "_row_sum_kernel", "_paged_attention_kernel")}
    for name, rec in recorders.items():
        monkeypatch.setattr(triton_ops, name, rec)
    for rows in (1, 3, 70):
        x = rand(rows, 96)
        triton_ops.linear(x, rand(40, 96, seed=1))
        triton_ops.log_softmax(x)
        triton_ops.causal_attention(rand(rows, 4, 32), rand(rows, 2, 32, seed=1),
                                    rand(rows, 2, 32, seed=2), 0.2, 16)
    for name, rec in recorders.items():
        assert len(rec.tiles) >= 3 and all(t == rec.tiles[0] for t in rec.tiles), name


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_matmul_close_and_row_invariant():
    x, w = rand(70, 96), rand(40, 96, seed=1)
    full = triton_ops.linear(x, w, bias=rand(40, seed=2))
    ref = cpu.linear(x.cpu(), w.cpu(), rand(40, seed=2).cpu())
    assert torch.allclose(full.cpu(), ref, atol=1e-4)
    for rows in ((0, 1), (3, 4), (30, 67), (69, 70)):
        part = triton_ops.linear(x[rows[0]:rows[1]], w, bias=rand(40, seed=2))
        assert same_or_close(part, full[rows[0]:rows[1]], 1e-5)


@pytest.mark.parametrize("k, splits", [(64, (48, 48)), (210, (232, 232)), (210, (384, 128, 128))])
def test_a_fused_linear_gives_each_part_the_separate_product_bitwise(k, splits):
    """A trainer runs q/k/v (gate/up) as separate projections; the engine's fused weight must
    give each part those bits, whatever the widths (Triton specializes sizes divisible by 16)."""
    x, w = rand(20, k), rand(sum(splits), k, seed=3)
    bias = rand(sum(splits), seed=4)
    start = 0
    for part, width in zip(triton_ops.linear(x, w, bias, splits), splits):
        alone = triton_ops.linear(x, w[start:start + width].clone(),
                                  bias[start:start + width].clone())
        assert torch.equal(part, alone)  # the same kernel on the same bits: bitwise everywhere
        start += width


def test_row_reductions_close_and_invariant():
    x = rand(9, 1500)
    norm = triton_ops.rms_norm(x, rand(1500, seed=4), 1e-6)
    assert torch.allclose(norm.cpu(), cpu.rms_norm(x.cpu(), rand(1500, seed=4).cpu(), 1e-6),
                          atol=1e-5)
    logp = triton_ops.log_softmax(x)
    assert torch.allclose(logp.cpu(), torch.log_softmax(x.cpu(), -1), atol=1e-5)
    for i in (0, 4, 8):
        assert same_or_close(triton_ops.rms_norm(x[i:i + 1], rand(1500, seed=4), 1e-6)[0],
                             norm[i], 1e-6)
        assert same_or_close(triton_ops.log_softmax(x[i:i + 1])[0], logp[i], 1e-6)


def test_paged_attention_close_to_cpu_and_same_in_decode_prefill_and_scoring():
    heads, kv_heads, d, split, length = 4, 2, 32, 16, 37
    q, k, v = rand(length, heads, d), rand(length, kv_heads, d, seed=5), rand(length, kv_heads,
                                                                              d, seed=6)
    dense = triton_ops.causal_attention(q, k, v, 0.2, split)
    assert torch.allclose(dense.cpu(), cpu.causal_attention(q.cpu(), k.cpu(), v.cpu(), 0.2,
                                                            split), atol=1e-5)
    k_cache = torch.zeros(8, kv_heads, d, split, device=DEVICE)
    v_cache = torch.zeros(8, kv_heads, split, d, device=DEVICE)
    blocks = torch.tensor([6, 2, 5], device=DEVICE)
    pos = torch.arange(length, device=DEVICE)
    triton_ops.store_kv(k, v, k_cache, v_cache, blocks[pos // split] * split + pos % split)
    chunks = [triton_ops.prefill_attention(q[a:b], k_cache, v_cache, blocks, pos[a:b], 0.2)
              for a, b in ((0, 16), (16, 32), (32, length))]
    assert same_or_close(torch.cat(chunks), dense, 1e-6)
    other = torch.tensor([1, 3, 0], device=DEVICE)
    decode = triton_ops.decode_attention(torch.stack([q[20], q[36], q[3]]), k_cache, v_cache,
                                         torch.stack([blocks, other, blocks]),
                                         torch.tensor([21, 40, 4], device=DEVICE), 0.2)
    assert same_or_close(decode[0], dense[20], 1e-6) and same_or_close(decode[2], dense[3], 1e-6)


def test_engine_and_trainer_agree_on_the_triton_kernels(qwen3_path):
    """The whole GPU path (engine forward, sampling, scoring, trainer mode) on Triton kernels:
    bitwise on CUDA, close under the interpreter."""
    import transformers

    import kernels
    from rollout import Engine, SamplingParams
    engine = Engine(str(qwen3_path), device=DEVICE, block_size=32, num_kv_blocks=32,
                    kernel_backend="triton")
    prompts = [[1, 2, 3, 4, 5, 6, 7], list(range(40, 80))]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    sequences = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    scores = engine.score(sequences, [len(p) for p in prompts])
    for score, out in zip(scores, outs):
        assert same_or_close(torch.tensor(score), torch.tensor(out.outputs[0].logprobs), 1e-5)

    model = transformers.Qwen3ForCausalLM.from_pretrained(
        qwen3_path, dtype=torch.float32, attn_implementation=kernels.HF_ATTENTION).to(DEVICE)
    width = max(map(len, sequences))
    ids = torch.zeros(2, width, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
    with kernels.batch_invariant_mode(backend="triton"), torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids.to(DEVICE)).logits, -1)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        response = torch.tensor(out.outputs[0].token_ids, device=DEVICE)
        rows = logprobs[i, len(prompt) - 1:len(prompt) - 1 + len(response)]
        trainer = rows.gather(1, response.unsqueeze(1)).squeeze(1).cpu()
        assert same_or_close(trainer, torch.tensor(out.outputs[0].logprobs), 1e-5)
