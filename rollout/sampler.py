"""Token sampling with per-request randomness and trainer-exact log-probs.

Randomness comes from no global RNG: the uniform for (seed, output position) is a counter-based
hash, and the token is drawn by inverse CDF over the (truncated) distribution of that row alone.
So a sample depends only on its own logits row, seed and position: never on the batch, and a
returned seed replays it exactly.
"""

from dataclasses import dataclass

import torch

from kernels.composite import tree_sum
from rollout.scheduler import Sample

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """A float32-exact uniform in (0, 1) for (seed, position)."""
    h = splitmix64(splitmix64(seed) ^ position)
    return ((h >> 40) + 0.5) / (1 << 24)


@dataclass(frozen=True)
class SampleSpec:
    """What to draw from one logits row."""
    row: int
    seq_id: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    position: int
    suppress: tuple[int, ...] = ()
    top_logprobs: int = 0


def divide_by_temperature(logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """Row i of float32 `logits` divided by temperatures[i] (0, greedy, counts as 1), with the
    bits a trainer's `logits / temperature` (a Python float) gets on this device: the CPU divides,
    CUDA multiplies by the float32 reciprocal of a scalar divisor (PyTorch's div kernel does)."""
    temps = torch.tensor([t if t > 0 else 1.0 for t in temperatures], dtype=torch.float32)
    if bool((temps == 1.0).all()):
        return logits  # x / 1 and x * 1 are x
    if logits.is_cuda:
        inverse = (torch.ones_like(temps) / temps).to(logits.device)  # as 1.0f / t on the GPU
        return logits * inverse.unsqueeze(1)
    return logits / temps.unsqueeze(1)


class Sampler:
    def __init__(self, softmax_parts):
        self.softmax_parts = softmax_parts

    def __call__(self, logits: torch.Tensor, specs: list[SampleSpec]) -> dict[int, Sample]:
        if not specs:
            return {}
        device = logits.device
        rows = [s.row for s in specs]
        if rows != list(range(logits.shape[0])):
            logits = logits.index_select(0, torch.tensor(rows, device=device))
        scaled = divide_by_temperature(logits.to(torch.float32), [s.temperature for s in specs])
        z, e, total = self.softmax_parts(scaled)
        log_total = torch.log(total)
        tokens = torch.empty(len(specs), dtype=torch.long, device=device)
        greedy = [i for i, s in enumerate(specs) if s.temperature == 0]
        if greedy:
            g = scaled[greedy]
            for j, i in enumerate(greedy):
                if specs[i].suppress:
                    g[j, list(specs[i].suppress)] = float("-inf")
            tokens[greedy] = g.argmax(-1)
        rand = [i for i, s in enumerate(specs) if s.temperature > 0]
        if rand:
            probs = e if len(rand) == len(specs) else e[rand]  # e is not read after this
            held = [j for j, i in enumerate(rand) if specs[i].suppress]
            if held:  # min_tokens: EOS and stop ids out, the rest renormalized (as vLLM's -inf)
                probs[held] = self._without(scaled[[rand[j] for j in held]],
                                            [specs[rand[j]].suppress for j in held])
            tokens[rand] = _draw(_truncate(probs, [specs[i] for i in rand]),
                                 [specs[i] for i in rand])
        # log_softmax(x)[t] = z[t] - log(sum(exp(z))): bitwise the trainer's log_softmax element
        chosen = z.gather(1, tokens.unsqueeze(1)).squeeze(1) - log_total
        token_list, chosen_list = tokens.tolist(), chosen.tolist()
        asked = [i for i, s in enumerate(specs) if s.top_logprobs]
        tops = dict(zip(asked, _top_logprobs(z, log_total, asked, specs))) if asked else {}
        return {s.seq_id: Sample(token_list[i], chosen_list[i], tops.get(i))
                for i, s in enumerate(specs)}

    def _without(self, scaled: torch.Tensor, suppressed: list[tuple[int, ...]]) -> torch.Tensor:
        """exp(x - max) of each row with its `suppressed` tokens at -inf (written into
        `scaled`, the caller's copy): the max is over the tokens allowed, so where a suppressed
        one led by far the rest do not underflow to 0 (the draw found no mass and took token
        0). Rows whose max is allowed get the bits e had."""
        for j, tokens in enumerate(suppressed):
            scaled[j, list(tokens)] = float("-inf")
        return self.softmax_parts(scaled)[1]

    def score(self, logits: torch.Tensor, targets: list[int], temperature: float) -> list[float]:
        """log_softmax(logits / temperature)[target] per row, the same bits sampling reports."""
        scaled = divide_by_temperature(logits.to(torch.float32), [temperature] * len(targets))
        z, _, total = self.softmax_parts(scaled)
        index = torch.tensor(targets, device=logits.device).unsqueeze(1)
        return (z.gather(1, index).squeeze(1) - torch.log(total)).tolist()


def _top_logprobs(z: torch.Tensor, log_total: torch.Tensor, rows: list[int],
                  specs: list[SampleSpec]) -> list[dict[int, float]]:
    """Each row's k largest log-probs, highest first, ties by the lower token id. torch.topk
    breaks ties differently for different k (bfloat16 logits tie often), so its order is not
    used: one call at the largest k + 1 finds each row's set, and where tokens tie across a row's
    cut (which of them are in?) the tied ones are taken in token order."""
    if rows == list(range(z.shape[0])):
        logprobs = z - log_total.unsqueeze(1)
    else:
        logprobs = z[rows] - log_total[rows].unsqueeze(1)
    width = min(max(specs[i].top_logprobs for i in rows) + 1, logprobs.shape[1])
    top = torch.topk(logprobs, width, dim=-1)
    out = []
    for j, (values, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        k = specs[rows[j]].top_logprobs
        pairs = list(zip(ids[:k], values[:k]))
        if k < len(values) and values[k - 1] == values[k]:
            cut = values[k - 1]
            pairs = [(i, v) for i, v in pairs if v > cut]
            tied = torch.nonzero(logprobs[j] == cut).squeeze(1)[:k - len(pairs)].tolist()
            pairs += [(i, cut) for i in tied]
        out.append(dict(sorted(pairs, key=lambda p: (-p[1], p[0]))))
    return out


_CDF_BLOCK = 1024


def _draw(weights: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """Inverse-CDF draw from unnormalized weights, one uniform per row: first find the block of
    `_CDF_BLOCK` tokens holding the target mass, then the token inside it."""
    rows, vocab = weights.shape
    full = vocab // _CDF_BLOCK
    block_mass = tree_sum(weights[:, :full * _CDF_BLOCK].view(rows, full, _CDF_BLOCK))
    if vocab % _CDF_BLOCK:  # the last block, padded with zeros
        last = torch.nn.functional.pad(weights[:, full * _CDF_BLOCK:],
                                       (0, _CDF_BLOCK - vocab % _CDF_BLOCK))
        block_mass = torch.cat([block_mass, tree_sum(last.unsqueeze(1))], dim=1)
    block_cdf = torch.cumsum(block_mass, dim=-1)
    u = torch.tensor([uniform(s.seed, s.position) for s in specs], device=weights.device,
                     dtype=torch.float32)
    target = u * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target.unsqueeze(1), right=True).squeeze(1)
    block = torch.minimum(block, _last_nonzero(block_mass))
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0).unsqueeze(1))
                         .squeeze(1), torch.zeros_like(target))
    columns = block.unsqueeze(1) * _CDF_BLOCK + torch.arange(_CDF_BLOCK, device=weights.device)
    inside = weights.gather(1, columns.clamp(max=vocab - 1)).masked_fill_(columns >= vocab, 0.0)
    cdf = torch.cumsum(inside, dim=-1)
    idx = torch.searchsorted(cdf, (target - before).unsqueeze(1), right=True).squeeze(1)
    idx = torch.minimum(idx, _last_nonzero(inside))
    return block * _CDF_BLOCK + idx


def _last_nonzero(x: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(x.shape[-1], device=x.device)
    return torch.where(x > 0, positions, -1).amax(-1).clamp(min=0)


def _truncate(probs: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """Zero the tokens under min-p, then outside top-k, then outside top-p (of the renormalized
    rest): vLLM's order."""
    min_p = torch.tensor([s.min_p for s in specs], device=probs.device, dtype=probs.dtype)
    if bool((min_p > 0).any()):
        threshold = probs.amax(-1, keepdim=True) * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    # past the vocabulary top-k keeps every token (and 2**63 would not fit the tensor)
    k = torch.tensor([min(s.top_k, probs.shape[1]) for s in specs], device=probs.device)
    if bool((k > 0).any()):
        kmax = int(k.max())
        values = torch.topk(probs, min(kmax, probs.shape[1]), dim=-1).values
        kth = values.gather(1, (k.clamp(min=1, max=values.shape[1]) - 1).unsqueeze(1))
        keep = (probs >= kth) | (k == 0).unsqueeze(1)
        probs = probs * keep
    p = torch.tensor([s.top_p for s in specs], device=probs.device, dtype=probs.dtype)
    if bool((p < 1).any()):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        # only rows that ask for top-p: with p = 1 the test would still drop the tokens too
        # small to move the rounded running sum, so a row's draw would depend on its batch mates
        drop_sorted = (cum - sorted_p >= p.unsqueeze(1) * cum[:, -1:]) & (p < 1).unsqueeze(1)
        drop_sorted[:, 0] = False  # the most likely token stays (a top_p under float32's
        # smallest number is 0 here, and would drop every token)
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs
