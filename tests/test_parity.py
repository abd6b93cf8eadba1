"""The engine computes what transformers computes: same argmax, log-probs within 1e-4."""

import pytest
import torch
import transformers

from rollout import Engine, SamplingParams
from tests.conftest import CHECKPOINTS


def reference_logprobs(model, prompt: list[int], completion: list[int]):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return logits, torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_continuous_batch_matches_transformers(checkpoints, name):
    path = checkpoints(name)
    engine = Engine(str(path), block_size=16, num_kv_blocks=128, max_num_batched_tokens=64)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 70, (16,), generator=g).tolist()
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True)
              for m in torch.randint(1, 40, (16,), generator=g)]
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert engine.scheduler.stats.steps < sum(p.max_tokens for p in params)  # batched

    hf = getattr(transformers, CHECKPOINTS[name][0]).from_pretrained(path, dtype=torch.float32)
    compared = 0
    for prompt, params_i, out in zip(prompts, params, outputs):
        completion = out.outputs[0]
        assert len(completion.token_ids) == params_i.max_tokens
        logits, logprobs = reference_logprobs(hf, prompt, completion.token_ids)
        for i, token in enumerate(completion.token_ids):
            top2 = logits[i].topk(2).values
            if top2[0] - top2[1] >= 1e-4:
                assert logits[i].argmax().item() == token
            assert abs(logprobs[i, token].item() - completion.logprobs[i]) <= 1e-4
            compared += 1
    assert compared == sum(p.max_tokens for p in params)
