"""Offline batch rollouts over a `ray.data.Dataset`: a callable class for `map_batches`, so
Ray runs it as a pool of actors, one engine each.

    ds.map_batches(BatchRollout, fn_constructor_kwargs={"model": path,
                   "sampling_params": SamplingParams(max_tokens=64)},
                   batch_size=64, concurrency=4, num_cpus=1)

adds the columns `token_ids`, `logprobs` and `finish_reason` (per sample lists when n > 1).
"""

import numpy as np
import torch

from rollout import Engine, RequestOutput, SamplingParams

OUTPUT_COLUMNS = ("token_ids", "logprobs", "finish_reason")


class BatchRollout:
    def __init__(self, model: str | None = None, sampling_params: SamplingParams | None = None,
                 prompt_column: str = "prompt", torch_threads: int = 1, **engine_options):
        torch.set_num_threads(torch_threads)
        self.engine = Engine(model, **engine_options)
        self.params = sampling_params or SamplingParams()
        self.prompt_column = prompt_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.prompt_column not in batch:
            raise KeyError(f"the batch has no prompt column {self.prompt_column!r}; columns: "
                           f"{sorted(batch)} (set prompt_column)")
        # rows as they are (an array row as a list): the engine refuses floats, bools, bytes
        prompts = [p.tolist() if isinstance(p, np.ndarray) else p
                   for p in batch[self.prompt_column]]
        outputs = self.engine.generate(prompts, self.params, use_tqdm=False)
        return {**batch, **{name: _column(outputs, name) for name in OUTPUT_COLUMNS}}


def _column(outputs: list[RequestOutput], field: str) -> np.ndarray:
    column = np.empty(len(outputs), dtype=object)  # ragged lists: one object per row
    for row, out in enumerate(outputs):
        values = [getattr(c, field) for c in out.outputs]
        column[row] = values[0] if len(values) == 1 else values
    return column
