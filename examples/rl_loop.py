"""A minimal on-policy RL loop in plain PyTorch, with the engine as the sampler.

Each step: the engine samples a GRPO group per prompt (with log-probs); the trainer recomputes
those log-probs under `kernels.batch_invariant_mode()` (the sampler-trainer KL is exactly 0),
takes a policy-gradient step with a toy reward, and pushes the new weights into the engine in
place. The trainer runs on the engine's device. Runs on the CPU in seconds with the small
built-in preset:

    python examples/rl_loop.py --steps 3
"""

import argparse

import torch
import transformers

import kernels
import weight_sync
from rollout import Engine, SamplingParams
from rollout.presets import preset_path


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: small preset)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--group", type=int, default=4)
    args = parser.parse_args()
    path = args.model or str(preset_path("qwen3-tiny-random"))

    engine = Engine(path, block_size=kernels.DEFAULT_SPLIT_SIZE)
    device = engine.config.device  # the trainer runs where the engine does: the same kernels
    policy = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=kernels.HF_ATTENTION).to(device)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    prompts = [[1, 2, 3, 4, 5, 6], [40, 41, 42], [7] * 12]
    params = SamplingParams(temperature=1.0, n=args.group, max_tokens=16, ignore_eos=True)

    for step in range(args.steps):
        outputs = engine.generate(prompts, params, use_tqdm=False)
        rows, starts, rollout_logprobs, rewards = [], [], [], []
        for prompt, out in zip(prompts, outputs):
            for c in out.outputs:
                rows.append(prompt + c.token_ids)
                starts.append(len(prompt))
                rollout_logprobs.append(torch.tensor(c.logprobs, device=device))
                rewards.append(float(sum(t % 2 == 0 for t in c.token_ids)))  # toy reward
        rewards = torch.tensor(rewards, device=device)
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)

        ids, mask = (t.to(device) for t in right_padded(rows))
        # expect: the engine's block size and thread count are checked, not assumed
        with kernels.batch_invariant_mode(expect=engine.determinism_report()):
            logprobs = torch.log_softmax(policy(input_ids=ids, attention_mask=mask).logits, -1)
            picked = [logprobs[i, s - 1:len(r) - 1]
                      .gather(1, torch.tensor(r[s:], device=device).unsqueeze(1)).squeeze(1)
                      for i, (r, s) in enumerate(zip(rows, starts))]
            kl = max((p.detach() - q).abs().max().item() for p, q in zip(picked, rollout_logprobs))
            loss = -sum(a * p.sum() for a, p in zip(advantages, picked)) / len(picked)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()

        version = engine.update_weights(policy.named_parameters())
        same = engine.weights_checksum() == weight_sync.checksum(policy.named_parameters())
        print(f"step {step}: mean reward {rewards.mean():.2f}, max |sampler - trainer| log-prob "
              f"{kl:.1e}, engine now at weight version {version} (checksum match: {same})")


if __name__ == "__main__":
    main()
