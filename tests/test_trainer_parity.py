"""A trainer running the Hugging Face model under `kernels.batch_invariant_mode()` computes
bitwise the log-probs the rollout returned: sampler-trainer KL is exactly 0. The trainer runs on
the engine's device (CUDA when present: the Triton kernels on both sides)."""

import pytest
import torch
import transformers

import kernels
from rollout import Engine, SamplingParams
from tests.conftest import CHECKPOINTS


def right_padded(sequences: list[list[int]]):
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["qwen3", "llama-untied", "llama-tied"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_equal_rollout_bitwise(checkpoints, name, temperature):
    path = checkpoints(name)
    engine = Engine(str(path), block_size=kernels.DEFAULT_SPLIT_SIZE, num_kv_blocks=128,
                    max_num_batched_tokens=96)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist()
               for n in (3, 17, 40, 70, 5, 33, 64, 9, 120)]
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, seed=1,
                                                   max_tokens=24, ignore_eos=True),
                           use_tqdm=False)
    ids, mask = right_padded([p + o.outputs[0].token_ids for p, o in zip(prompts, outs)])

    device = engine.config.device
    model = getattr(transformers, CHECKPOINTS[name][0]).from_pretrained(
        path, dtype=torch.float32, attn_implementation=kernels.HF_ATTENTION).to(device)
    model.train()
    with kernels.batch_invariant_mode():
        picked = _picked(model, ids.to(device), mask.to(device), prompts, outs, temperature)
        (-torch.cat(picked).mean()).backward()
    for trainer, out in zip(picked, outs):  # bitwise: the bytes, not |difference| == 0
        rollout = torch.tensor(out.outputs[0].logprobs, dtype=torch.float32)
        assert trainer.detach().cpu().numpy().tobytes() == rollout.numpy().tobytes()
    # the gradients are attention's: those of the same loss through transformers' sdpa
    reference = getattr(transformers, CHECKPOINTS[name][0]).from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa").to(device)
    reference.train()
    picked = _picked(reference, ids.to(device), mask.to(device), prompts, outs, temperature)
    (-torch.cat(picked).mean()).backward()
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(),
                                                      reference.parameters())]
    assert all(g is not None for _, g, _ in grads)
    for n, got, want in grads:
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6), n


def _picked(model, ids, mask, prompts, outs, temperature: float) -> list[torch.Tensor]:
    """Each response's log-probs under `model` (right-padded rows)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    picked = []
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        response = torch.tensor(out.outputs[0].token_ids, device=ids.device)
        rows = logprobs[i, len(prompt) - 1:len(prompt) - 1 + len(response)]
        picked.append(rows.gather(1, response.unsqueeze(1)).squeeze(1))
    return picked


def test_transformers_runs_normally_beside_our_kernels_package(qwen3_path):
    """transformers probes for an unrelated hub package also named `kernels`."""
    from transformers.utils import import_utils
    assert not import_utils.is_kernels_available()
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen3_path, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_the_mode_checks_the_engines_block_size_and_thread_count(qwen3_path):
    """The conditions under which the trainer reproduces the rollout are checked when the
    engine's report is given, not assumed: either one differing changed the log-probs
    silently."""
    engine = Engine(str(qwen3_path), block_size=16, num_kv_blocks=64)
    report = engine.determinism_report()
    assert kernels.batch_invariant_mode(expect=report).split_size == 16
    with pytest.raises(ValueError, match="split_size 32 differs from the engine's block size 16"):
        kernels.batch_invariant_mode(split_size=32, expect=report)
    with kernels.batch_invariant_mode(expect=report):
        pass
    threads = torch.get_num_threads()
    served = {"device": "cpu", "page_size": 16, "threads": threads + 1}  # /server_info's fields
    with pytest.raises(RuntimeError, match=f"the engine ran on {threads + 1} torch threads, "
                                           f"this process on {threads}"):
        with kernels.batch_invariant_mode(expect=served):
            pass


def test_the_mode_refuses_batches_that_are_not_right_padded(qwen3_path):
    """Its attention reads each row as one sequence's tokens, then padding: left padding and
    packed rows were attended as if right-padded (log-probs off by several nats, silently)."""
    model = transformers.Qwen3ForCausalLM.from_pretrained(
        qwen3_path, dtype=torch.float32, attn_implementation=kernels.HF_ATTENTION)
    ids, mask = right_padded([[5, 6, 7, 8, 9], [5, 6, 7]])
    verl_positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the padding keeps the last position
    packed = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    with torch.no_grad(), kernels.batch_invariant_mode():
        model(input_ids=ids, attention_mask=mask)  # right-padded: fine
        model(input_ids=ids, attention_mask=mask, position_ids=verl_positions)
        model(input_ids=ids, attention_mask=mask, position_ids=verl_positions * mask)
        for kwargs in ({"attention_mask": mask.flip(1)}, {"position_ids": packed},
                       {"position_ids": packed, "use_cache": False}):
            with pytest.raises(ValueError, match="takes right-padded batches"):
                model(input_ids=ids, **kwargs)
