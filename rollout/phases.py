"""Where an engine's time goes: wall-clock totals per phase of the step loop, for `rollout bench`.

Off (the default), `span()` hands back one shared do-nothing context, so the hooks in the loop
cost an attribute check each. On, every span adds its wall time to its phase (after a device
synchronize on CUDA, so the time is the work's, not the launch's). Spans may nest: the attention
spans are part of the forward they run in.
"""

import time
from collections import defaultdict
from contextlib import nullcontext

import torch

_OFF = nullcontext()


class _Span:
    __slots__ = ("timer", "name", "start")

    def __init__(self, timer: "PhaseTimer", name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.timer.sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timer.sync()
        self.timer.seconds[self.name] += time.perf_counter() - self.start
        self.timer.calls[self.name] += 1


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.enabled = False
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def span(self, name: str):
        return _Span(self, name) if self.enabled else _OFF

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        """Forget earlier totals and start measuring."""
        self.seconds.clear()
        self.calls.clear()
        self.enabled = True

    def stop(self) -> dict[str, float]:
        """Stop measuring; the totals in seconds per phase."""
        self.enabled = False
        return dict(self.seconds)


NO_TIMER = PhaseTimer(torch.device("cpu"))  # never started: for contexts built outside a runner
