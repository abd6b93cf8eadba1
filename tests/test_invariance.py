"""The proofs behind batch invariance: which BLAS row tiles an op may use is measured on this
machine, a BLAS whose row bits depend on the row's position is caught, and the op then falls back
to an order of our own that keeps every output bitwise invariant."""

import gc
import random

import pytest
import torch
import transformers

import kernels
from kernels import cpu, invariance
from rollout import Engine, SamplingParams
from tests.test_trainer_parity import right_padded


def reversed_on_odd_rows(product):
    """A vendor BLAS as it could be: rows at odd positions of a call are summed in the reverse
    order of k, so their bits depend on where they sit in the call."""
    def bad(a, b, *out):
        res = product(a, b)
        if a.shape[-2] > 1:
            res[..., 1::2, :] = product(a[..., 1::2, :].flip(-1).contiguous(),
                                        b.flip(-2).contiguous())
        if out:
            out[0].copy_(res)
        return res
    return bad


@pytest.fixture
def fresh_plans():
    cpu.reset()
    yield
    cpu.reset()


def test_every_row_of_a_proven_tile_has_the_bits_it_has_alone(fresh_plans):
    """Literal check of the chosen class on the backend's real BLAS call: every position of
    every tile, against the same row alone in an otherwise zero tile of the smallest size."""
    gen = torch.Generator().manual_seed(5)
    for k, n in ((80, 240), (384, 1), (96, 176)):
        w_t = torch.randn(n, k, generator=gen).t()
        plan = cpu.mm_plan(w_t)
        assert plan.blas, f"no BLAS tile proved invariant for K={k} N={n} on this machine"
        rows = torch.randn(max(plan.tiles), k, generator=gen)

        def alone(row):
            tile = torch.zeros(plan.tiles[0], k)
            tile[0] = row
            return cpu.blas_mm(tile, w_t)[0]

        expected = torch.stack([alone(r) for r in rows])
        for t in plan.tiles:
            for shift in range(t):
                got = cpu.blas_mm(rows[:t].roll(shift, 0), w_t).roll(-shift, 0)
                assert torch.equal(got, expected[:t]), (k, n, t, shift)


def test_rows_are_cut_into_tiles_at_the_least_measured_cost():
    """Any cut is bitwise the same within a proven class, so the plan picks the cheapest by the
    costs measured in the proof: one padded tile of 64 rather than 32+16+8+4 when a call of 64
    costs barely more than one of 4, the cheapest row for long runs, and always an exact cover."""
    plan = invariance.Plan((4, 8, 16, 32, 64, 128), (1.0, 1.1, 1.3, 1.8, 2.9, 6.0))
    assert plan.chunks(60) == ((0, 60, 64),)
    assert plan.chunks(3) == ((0, 3, 4),)
    assert plan.chunks(60) is plan.chunks(60)  # worked out once
    long = plan.chunks(64 * 100 + 1)
    assert sorted(t for _, _, t in long) == [4] + [64] * 100
    for rows in range(1, 700):
        chunks = plan.chunks(rows)
        assert [start for start, _, _ in chunks] == [sum(r for _, r, _ in chunks[:i])
                                                      for i in range(len(chunks))]
        assert sum(r for _, r, _ in chunks) == rows
        assert all(r <= t and t in plan.tiles for _, r, t in chunks)
        assert all(r == t for _, r, t in chunks[:-1])  # only the last tile is padded


def test_the_prover_rejects_tiles_whose_rows_depend_on_their_position(fresh_plans):
    w_t = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)).t()
    bad = reversed_on_odd_rows(torch.mm)

    def bad_product(a, b):
        return bad(a[0], b).unsqueeze(0)

    assert invariance.prove_tiles(bad_product, w_t, candidates=(2, 4, 8, 16)).tiles == ()
    assert invariance.prove_tiles(bad_product, w_t).tiles == (1,)  # one row: no odd rows
    assert 16 in invariance.prove_tiles(lambda a, b: torch.mm(a[0], b).unsqueeze(0), w_t).tiles


def test_among_several_classes_the_one_covering_decode_and_prefill_rows_best_is_chosen(
        fresh_plans):
    """oneDNN's AMX kernels on Intel Xeon sum rows 1-32, 40-176 and 192-512 of one shape three
    ways. The class with the largest tile would pad every decode batch of 64 rows to 192; the
    plan takes the class whose tiles cover 1 to 2048 rows at the least modeled cost, by tile
    sizes only, so every process (engine and trainer) takes the same one."""
    gen = torch.Generator().manual_seed(3)
    w_t = torch.randn(48, 32, generator=gen).t()
    orders = [torch.randperm(32, generator=gen) for _ in range(3)]

    def three_kernels(a, b):
        order = orders[(a.shape[1] > 32) + (a.shape[1] > 176)]
        return cpu.owned_mm(a[..., order], b[order])  # each row alone, in the class's order

    plan = invariance.prove_tiles(three_kernels, w_t)
    assert (plan.tiles[0], plan.tiles[-1]) == (36, 176)
    assert invariance.modeled_cost([192, 256, 512]) > invariance.modeled_cost(plan.tiles)
    assert 64 in plan.tiles  # a decode batch of 64 rows in one call, unpadded


def test_a_failed_proof_falls_back_to_our_own_order_and_stays_bitwise(
        qwen3_path, monkeypatch, fresh_plans, cpu_kernels):
    monkeypatch.setattr(cpu, "blas_mm", reversed_on_odd_rows(torch.mm))
    monkeypatch.setattr(cpu, "blas_bmm", reversed_on_odd_rows(torch.bmm))
    monkeypatch.setattr(invariance, "TILE_CANDIDATES", (4, 8, 16))
    engine = Engine(str(qwen3_path), device="cpu", block_size=kernels.DEFAULT_SPLIT_SIZE,
                    num_kv_blocks=64)
    report = engine.determinism_report()
    blas_ops = [v for v in report.verdicts if v.op in ("linear", "row_sum") or "." in v.op]
    # with the C kernels, row sums and attention never call BLAS: they own their order anyway
    assert blas_ops and all(v.method.startswith("owned") for v in blas_ops)
    assert all(v.method.startswith("owned reduction order") for v in blas_ops
               if v.op == "linear" or cpu_kernels == "torch")
    assert report.guaranteed and "GUARANTEED" in report.format()

    target = [(i * 37 + 11) % 512 for i in range(40)]
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=8, ignore_eos=True)
    rng = random.Random(0)
    seen = set()
    for bs in (1, 2, 5, 9):
        others = [[rng.randrange(512) for _ in range(rng.choice([3, 20, 50]))]
                  for _ in range(bs - 1)]
        out = engine.generate([*others, target], params, use_tqdm=False)[-1].outputs[0]
        seen.add((tuple(out.token_ids), torch.tensor(out.logprobs).numpy().tobytes()))
    assert len(seen) == 1
    tokens, logprob_bytes = seen.pop()
    score = engine.score([target + list(tokens)], len(target), temperature=1.0)[0]
    assert torch.tensor(score).numpy().tobytes() == logprob_bytes

    model = transformers.Qwen3ForCausalLM.from_pretrained(
        qwen3_path, dtype=torch.float32, attn_implementation=kernels.HF_ATTENTION)
    ids, mask = right_padded([target + list(tokens), target[:7]])
    with kernels.batch_invariant_mode(), torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
    rows = logprobs[0, len(target) - 1:len(target) - 1 + len(tokens)]
    trainer = rows.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    assert trainer.numpy().tobytes() == logprob_bytes


FORWARD_OPS = {("cpu", "native"): {"linear", "row_sum", "attention"},  # one C kernel
               ("cpu", "torch"): {"linear", "row_sum", "attention q.k", "attention p.v"},
               ("cuda", "native"): {"linear", "row_sum", "attention"}}  # one Triton kernel


@pytest.mark.parametrize("device", ["cpu"] + ["cuda"] * torch.cuda.is_available())
def test_the_report_names_every_op_the_forward_runs(qwen3_path, device, cpu_kernels):
    report = Engine(str(qwen3_path), device=device, num_kv_blocks=16).determinism_report()
    ops = FORWARD_OPS[device, "native" if device == "cuda" else cpu_kernels]
    assert ops <= {v.op for v in report.verdicts}
    assert report.guaranteed
    fast = Engine(str(qwen3_path), device=device, num_kv_blocks=16,
                  deterministic=False).determinism_report()
    assert not fast.guaranteed and "NOT GUARANTEED (deterministic=False)" in fast.format()


def test_packed_weight_copies_give_the_plain_weights_bits(qwen3_path):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, n=3)
    prompts = [[(i * 31 + j) % 512 for j in range(5 + 9 * i)] for i in range(4)]
    runs = []
    for packed in (True, False):
        cpu.forget_packed()
        engine = Engine(str(qwen3_path), device="cpu", num_kv_blocks=64, packed_weights=packed)
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert bool(cpu._packed) == packed  # the default engine really ran the packed copies
        runs.append([(c.token_ids, torch.tensor(c.logprobs).numpy().tobytes())
                     for o in outs for c in o.outputs])
    assert runs[0] == runs[1]


def test_packed_weight_copies_go_with_their_engine(qwen3_path):
    engine = Engine(str(qwen3_path), device="cpu", num_kv_blocks=16)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert cpu._packed
    del engine
    gc.collect()
    assert not cpu._packed


amx = pytest.mark.skipif(kernels.native.amx() is None,
                         reason="this CPU (or build) has no AMX tiles for the bfloat16 kernel")


def cancelling(m: int, k: int, n: int, gen: torch.Generator):
    """bfloat16 rows x [m, k] and w_t [k, n] over many binades whose products cancel in pairs
    along k: the exact products are 0, so the bits are the rounding of the partial sums and
    any change of summation order shows."""
    perm = torch.randperm(k, generator=gen)
    first, second = perm[:k // 2], perm[k // 2:2 * (k // 2)]

    def spread(*shape):
        return torch.randn(*shape, generator=gen) * torch.randint(-8, 9, shape, generator=gen
                                                                   ).float().exp2()
    x, w_t = spread(m, k), spread(k, n)
    x[:, second], w_t[second] = x[:, first], -w_t[first]
    return x.to(torch.bfloat16), w_t.to(torch.bfloat16)


@amx
def test_the_amx_linear_gives_a_row_the_same_bits_at_every_row_count_and_thread_count():
    """kernels/native.c's AMX linear: each row's bits depend on that row alone (its place among
    1..300 rows, the thread count), for K past one chunk of 1024 and shapes not multiples of
    the tiles; close to the float64 product."""
    gen = torch.Generator().manual_seed(2)
    threads = torch.get_num_threads()
    for k, n in ((2500, 80), (96, 176), (210, 1000)):
        x, w_t = cancelling(300, k, n, gen)
        packed = cpu.amx_pack(w_t)
        alone = torch.cat([cpu.amx_linear(x[i:i + 1], packed, n) for i in range(0, 300, 7)])
        for m in (1, 15, 17, 33, 300):
            got = cpu.amx_linear(x[:m], packed, n)
            assert torch.equal(got[::7], alone[:len(got[::7])]), (k, n, m)
        try:
            torch.set_num_threads(1)
            assert torch.equal(cpu.amx_linear(x, packed, n)[::7], alone)
        finally:
            torch.set_num_threads(threads)
        x = torch.randn(16, k, generator=gen).to(torch.bfloat16)
        w_t = (torch.randn(k, n, generator=gen) / k ** 0.5).to(torch.bfloat16)
        exact = x.double() @ w_t.double()
        got = cpu.amx_linear(x, cpu.amx_pack(w_t), n).double()
        assert (got - exact).abs().max() <= 0.02 * exact.abs().max()


@amx
def test_only_onednn_tiles_that_agree_with_the_amx_order_are_taken(fresh_plans):
    """oneDNN takes whole tiles of a long prefill only where the proof saw its bits equal the
    kernel's; a product summing in another order is refused, and the linear gives every row
    the kernel's bits whatever the row count."""
    gen = torch.Generator().manual_seed(3)
    x, w_t = cancelling(2100, 1024, 256, gen)
    packed = cpu.amx_pack(w_t)

    def reference(a, b):
        return cpu.amx_linear(a, cpu.amx_pack(b), b.shape[1])

    def other_order(a, b):  # the k halves summed separately, then added
        return (torch.mm(a[:, :512], b[:512]).float() + torch.mm(a[:, 512:], b[512:]).float()
                ).to(torch.bfloat16)

    assert invariance.agreeing_tiles(other_order, reference, w_t, (512, 1024)) == ()
    tiles = cpu._amx_decided(w_t)[0]
    x = x[:max(tiles, default=560) + 40]
    assert torch.equal(cpu.matmul(x, w_t), cpu.amx_linear(x, packed, 256))
    assert cpu.matmul(x[:0], w_t).shape == (0, 256)  # no rows: an empty product, no error
    assert "AMX tiles" in cpu._amx_decided(w_t)[1].method
