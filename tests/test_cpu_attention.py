"""The CPU attention kernels against the trainer's dense attention, bitwise, in both
implementations (the C kernel and the torch ops of a machine without a compiler): decode reads
the paged cache in runs of nearby blocks (shared prompts, scattered tails, gaps both under and
over a run's reach, reader counts in different slot classes); prefill meets a chunk's splits in
batched products."""

import pytest
import torch

from kernels import cpu, native

HEADS, KV_HEADS, D, SPLIT = 4, 2, 32, 16
SCALE = D ** -0.5
pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _rand(*shape, seed, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _groups():
    """(prompt length, readers, tail lengths): prompts shared by 1, 3 and 8 sequences."""
    return [(40, 1, [9]), (33, 3, [1, 17, 30]), (64, 8, [2, 5, 16, 16, 20, 31, 33, 47])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_in_runs_of_scattered_blocks_equals_dense_attention(dtype):
    num_blocks = 160
    k_cache = torch.zeros(num_blocks, KV_HEADS, D, SPLIT, dtype=dtype)
    v_cache = torch.zeros(num_blocks, KV_HEADS, SPLIT, D, dtype=dtype)
    # block ids: some adjacent, some a few apart (inside a run), some far apart (new runs)
    free = [3, 4, 5, 9, 10, 30, 31, 33, 40, 41, 42, 43, 70, 71, 90, 97, 99, 120, 121, 122, 123,
            124, 125, 126, 127, 128, 129, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159,
            60, 61, 62, 63, 64, 65]
    tables, lengths, queries, dense = [], [], [], []
    seed = 0
    for prompt_len, readers, tails in _groups():
        shared = [free.pop(0) for _ in range(prompt_len // SPLIT)]
        seed += 1
        prompt_k = _rand(prompt_len, KV_HEADS, D, seed=seed, dtype=dtype)
        prompt_v = _rand(prompt_len, KV_HEADS, D, seed=seed + 100, dtype=dtype)
        for r in range(readers):
            seed += 1
            length = prompt_len + tails[r]
            k = torch.cat([prompt_k, _rand(tails[r], KV_HEADS, D, seed=seed, dtype=dtype)])
            v = torch.cat([prompt_v, _rand(tails[r], KV_HEADS, D, seed=seed + 100, dtype=dtype)])
            q = _rand(length, HEADS, D, seed=seed + 200, dtype=dtype)
            table = shared + [free.pop(0) for _ in range(-(-length // SPLIT) - len(shared))]
            pos = torch.arange(len(shared) * SPLIT, length)  # the prompt's full blocks: stored once
            slots = torch.tensor(table)[pos // SPLIT] * SPLIT + pos % SPLIT
            cpu.store_kv(k[pos], v[pos], k_cache, v_cache, slots)
            if r == 0:
                pos = torch.arange(len(shared) * SPLIT)
                slots = torch.tensor(table)[pos // SPLIT] * SPLIT + pos % SPLIT
                cpu.store_kv(k[pos], v[pos], k_cache, v_cache, slots)
            tables.append(table)
            lengths.append(length)
            queries.append(q[-1])
            dense.append(cpu.causal_attention(q, k, v, SCALE, SPLIT)[-1])
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    context_lens = torch.tensor(lengths)
    out = cpu.decode_attention(torch.stack(queries), k_cache, v_cache, block_tables,
                               context_lens, SCALE)
    for i, row in enumerate(dense):
        assert torch.equal(out[i], row), i
        alone = cpu.decode_attention(queries[i][None], k_cache, v_cache, block_tables[i:i + 1],
                                     context_lens[i:i + 1], SCALE)
        assert torch.equal(alone[0], row), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_in_chunks_equals_dense_attention(dtype):
    length = 150  # several prefill chunks of PREFILL_CHUNK positions, ten splits
    q = _rand(length, HEADS, D, seed=1, dtype=dtype)
    k, v = _rand(length, KV_HEADS, D, seed=2, dtype=dtype), _rand(length, KV_HEADS, D, seed=3,
                                                                  dtype=dtype)
    dense = cpu.causal_attention(q, k, v, SCALE, SPLIT)
    table = torch.tensor([7, 2, 11, 0, 5, 9, 1, 12, 3, 8])
    k_cache = torch.zeros(13, KV_HEADS, D, SPLIT, dtype=dtype)
    v_cache = torch.zeros(13, KV_HEADS, SPLIT, D, dtype=dtype)
    pos = torch.arange(length)
    cpu.store_kv(k, v, k_cache, v_cache, table[pos // SPLIT] * SPLIT + pos % SPLIT)
    for a, b in ((0, length), (0, 70), (70, 71), (71, length)):
        part = cpu.prefill_attention(q[a:b], k_cache, v_cache, table, pos[a:b], SCALE)
        assert torch.equal(part, dense[a:b]), (a, b)


@pytest.mark.parametrize("heads,kv_heads,d,split", [(16, 8, 128, 32), (4, 1, 64, 16),
                                                    (16, 1, 64, 32), (6, 2, 48, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_alone_equals_the_row_among_others(heads, kv_heads, d, split, dtype):
    """The C kernel attends up to 8 queries at a time (rows of a chunk, heads of a kv head); a
    row's bits are the same alone, in any chunk, and in the trainer's causal attention. Shapes:
    the kernel's specialized ones, one kv head (g = 4 and 16), and an unvectorized one."""
    length = 45
    q = _rand(length, heads, d, seed=1, dtype=dtype)
    k, v = _rand(length, kv_heads, d, seed=2, dtype=dtype), _rand(length, kv_heads, d, seed=3,
                                                                  dtype=dtype)
    dense = cpu.causal_attention(q, k, v, d ** -0.5, split)
    blocks = -(-length // split)
    table = torch.randperm(blocks + 3, generator=torch.Generator().manual_seed(0))[:blocks]
    k_cache = torch.zeros(blocks + 3, kv_heads, d, split, dtype=dtype)
    v_cache = torch.zeros(blocks + 3, kv_heads, split, d, dtype=dtype)
    pos = torch.arange(length)
    cpu.store_kv(k, v, k_cache, v_cache, table[pos // split] * split + pos % split)
    for a, b in ((0, length), (3, 10), (44, 45), (9, 10)):
        part = cpu.prefill_attention(q[a:b], k_cache, v_cache, table, pos[a:b], d ** -0.5)
        assert torch.equal(part, dense[a:b]), (a, b)
    rows = torch.tensor([44, 9, 30])
    out = cpu.decode_attention(q[rows], k_cache, v_cache, table.expand(3, -1), rows + 1,
                               d ** -0.5)
    assert torch.equal(out, dense[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_the_thread_count(dtype):
    length = 100
    q = _rand(length, HEADS, D, seed=1, dtype=dtype)
    k, v = _rand(length, KV_HEADS, D, seed=2, dtype=dtype), _rand(length, KV_HEADS, D, seed=3,
                                                                  dtype=dtype)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(cpu.causal_attention(q, k, v, SCALE, SPLIT))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@pytest.mark.parametrize("heads,kv_heads,d,split", [(16, 8, 128, 32), (4, 1, 64, 64),
                                                    (4, 2, 32, 16), (6, 2, 48, 8)])
def test_bfloat16_attention_is_attention(heads, kv_heads, d, split):
    """bfloat16 K/V are widened in pairs of vectors (even and odd elements, put back in order)
    where the kernel's vectors come in pairs: the result is still attention over the same keys
    in the same places (every test above compares the kernel with itself)."""
    length = 70
    q, k, v = (_rand(length, h, d, seed=s, dtype=torch.bfloat16)
               for s, h in ((1, heads), (2, kv_heads), (3, kv_heads)))
    scale = d ** -0.5
    out = cpu.causal_attention(q, k, v, scale, split)
    reference = cpu._reference_causal(q.float(), k.float(), v.float(), scale)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=2e-2, rtol=2e-2)


def test_causal_attention_gradients_are_those_of_attention():
    """Against torch's own scaled_dot_product_attention in float64 (the C kernels' backward
    runs our differentiable reference: compared with itself, a wrong gradient passed)."""
    length = 40
    q, k, v = (_rand(length, h, D, seed=s, dtype=torch.float32).requires_grad_()
               for s, h in ((1, HEADS), (2, KV_HEADS), (3, KV_HEADS)))
    out = cpu.causal_attention(q, k, v, SCALE, SPLIT)
    weights = _rand(length, HEADS, D, seed=4, dtype=torch.float32)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    heads_first = [t.transpose(0, 1).unsqueeze(0) for t in leaves]  # [1, heads, L, D]
    reference = torch.nn.functional.scaled_dot_product_attention(
        *heads_first, is_causal=True, scale=SCALE, enable_gqa=True)[0].transpose(0, 1)
    assert torch.allclose(out.double(), reference, atol=1e-5)
    expected = torch.autograd.grad((reference * weights.double()).sum(), leaves)
    for got, want in zip(grads, expected):
        assert torch.allclose(got.double(), want, atol=1e-4)


def test_without_a_compiler_the_torch_ops_attend(monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLOUT_CPU_KERNELS", "native")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("ROLLOUT_KERNEL_CACHE", str(tmp_path / "kernels"))
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no-such-cc"):
            assert native.library() is None
        monkeypatch.setenv("ROLLOUT_CPU_KERNELS", "c")
        native.library.cache_clear()
        with pytest.raises(ValueError, match="ROLLOUT_CPU_KERNELS='c'"):
            native.library()
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("width", [1, 7, 64, 100, 1024, 5000])
def test_a_row_sum_does_not_depend_on_the_other_rows(width):
    x = _rand(300, width, seed=width, dtype=torch.float32) * 100
    batch = cpu.row_sum(x)
    for i in (0, 1, 150, 299):
        assert torch.equal(cpu.row_sum(x[i:i + 1].clone())[0], batch[i]), i
    error = (batch.double() - x.double().sum(-1)).abs()
    assert (error <= 1e-6 * x.double().abs().sum(-1)).all()  # within float32's rounding


@pytest.mark.parametrize("shape", [(300, 1024), (40, 16, 128), (3, 7), (2, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_torch_sequence_a_trainer_runs(shape, dtype):
    """The C RMSNorm, one pass, against the op-by-op torch sequence transformers runs (under the
    mode only its mean is ours), bitwise: tiny, unit and huge rows (rounding at every step)."""
    from kernels import composite
    weight = _rand(shape[-1], seed=7, dtype=torch.float32).mul(0.5).add(1).to(dtype)
    for scale in (1e-20, 1.0, 1e4):
        x = (_rand(*shape, seed=len(shape), dtype=torch.float32) * scale).to(dtype)
        out = cpu.rms_norm(x, weight, 1e-6)
        assert out.dtype == dtype
        assert torch.equal(out, composite.rms_norm(cpu.row_sum, x, weight, 1e-6)), scale
        assert torch.equal(cpu.rms_norm(x[1:2], weight, 1e-6), out[1:2])


@pytest.mark.parametrize("shape", [(70, 16, 128), (3, 2, 6), (1, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_the_torch_sequence_a_trainer_runs(shape, dtype):
    """The C rotary embedding, one pass, bitwise against x * cos + rotate_half(x) * sin as
    transformers computes it (each product and sum rounded to the dtype)."""
    x = _rand(*shape, seed=5, dtype=torch.float32).mul(30).to(dtype)
    angle = _rand(shape[0], 1, shape[2], seed=6, dtype=torch.float32).mul(40)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    half = shape[2] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    out = cpu.rotate(x, cos, sin)
    assert out.dtype == dtype
    assert torch.equal(out, x * cos + rotated_half * sin)
    assert torch.equal(cpu.rotate(x[:1], cos[:1], sin[:1]), out[:1])


def test_reads_outside_the_cache_are_refused_with_the_bad_values():
    k_cache = torch.zeros(4, KV_HEADS, D, SPLIT)
    v_cache = torch.zeros(4, KV_HEADS, SPLIT, D)
    q = _rand(1, HEADS, D, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="block ids 0..9 outside the cache's 4 blocks"):
        cpu.decode_attention(q, k_cache, v_cache, torch.tensor([[0, 9]]), torch.tensor([20]),
                             SCALE)
    with pytest.raises(ValueError, match="positions 39..39 need 3 blocks; the block tables hold 1"):
        cpu.decode_attention(q, k_cache, v_cache, torch.tensor([[0]]), torch.tensor([40]), SCALE)
    with pytest.raises(ValueError, match="positions 0..39 need 3 blocks"):
        cpu.prefill_attention(_rand(40, HEADS, D, seed=3, dtype=torch.float32), k_cache,
                              v_cache, torch.tensor([0, 1]), torch.arange(40), SCALE)
    k = _rand(1, KV_HEADS, D, seed=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="slots 64..64 outside the cache's 64"):
        cpu.store_kv(k, k, k_cache, v_cache, torch.tensor([64]))

