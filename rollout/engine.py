"""The engine: requests in, completions with log-probs out.

One loop drives everything (`step`: schedule, run, postprocess); it runs on a background thread
whenever there is work, so synchronous `generate`, asyncio callers and control calls (weight
updates, memory release) all meet at the same scheduler, one step at a time.
"""

import asyncio
import itertools
import numbers
import secrets
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Sequence as Seq
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tqdm.auto import tqdm

from rollout.block_manager import BlockManager
from rollout.config import EngineConfig, ModelConfig
from rollout.determinism import DeterminismReport, blas, machine
from rollout.model_runner import ModelRunner
from rollout.outputs import CompletionOutput, RequestOutput
from rollout.sampling_params import SamplingParams
from rollout.scheduler import Scheduler
from rollout.sequence import Sequence
from rollout.tokenizer import load_tokenizer
from weight_sync.buckets import (DEFAULT_BUCKET_BYTES, Bucket, TensorMeta, dtype_from_name,
                                 dtype_name)

PAUSE_MODES = ("abort", "retract", "in_place")
MEMORY_TAGS = ("weights", "kv_cache")

Prompt = str | list[int]


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    on_update: Callable[[RequestOutput | None, BaseException | None], None]
    stream: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class _Waiter:
    """Completion handle for a synchronous caller."""

    def __init__(self):
        self.event = threading.Event()
        self.output: RequestOutput | None = None
        self.error: BaseException | None = None

    def __call__(self, output, error):
        if error is not None or output.finished:
            self.output, self.error = output, error
            self.event.set()

    def result(self) -> RequestOutput:
        self.event.wait()
        if self.error is not None:
            raise self.error
        return self.output


class ScoringAborted(RuntimeError):
    """A `score` request was aborted (`abort()`, `pause_generation("abort")`) before every
    position was scored."""


class Engine:
    """A rollout engine over one Hugging Face checkpoint.

    `Engine(path)` loads the model onto the device (CUDA when present, else CPU);
    `Engine()` uses the built-in preset model (random weights, realistic shape).
    Keyword arguments are the fields of `EngineConfig`.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, **kwargs):
        if model is None:
            from rollout.presets import preset_path
            model = str(preset_path())
        self.config = EngineConfig(model=str(model), **kwargs)
        self.model_config = ModelConfig.from_pretrained(model)
        limit = self.model_config.max_position_embeddings
        self.max_model_len = self.config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({limit})")
        self.tokenizer_path = str(tokenizer or model)
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.runner = ModelRunner(self.config, self.model_config, self.max_model_len)
        report = self.determinism_report()
        if self.config.deterministic and not report.guaranteed:
            warnings.warn("this engine cannot guarantee batch invariance on this machine:\n"
                          + report.format(), RuntimeWarning, stacklevel=2)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs,
                                   self.config.max_num_batched_tokens, self.max_model_len,
                                   self.model_config.eos_token_ids,
                                   self.tokenizer.decode if self.tokenizer else None)
        self.weights = self.runner.weights
        self._requests: dict[str, _Request] = {}
        self._cond = threading.Condition(threading.RLock())
        self._waiting_controls = 0
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._paused = False
        self._receiver = None
        self._groups: dict = {}

    def determinism_report(self) -> DeterminismReport:
        """Per op and shape: what runs, and whether batch invariance is guaranteed here."""
        c = self.config
        return DeterminismReport(machine(), blas(), c.device, str(self.runner.dtype)[6:],
                                 c.deterministic, c.kernel_backend, c.block_size,
                                 self.runner.kernel_verdicts)

    @property
    def weight_version(self) -> int | str:
        return self.weights.version

    # ------------------------------------------------------------------ the loop

    def step(self) -> None:
        """Schedule, run, postprocess: one forward pass over the running batch."""
        timer = self.runner.timer
        with timer.span("schedule"):
            batch = self.scheduler.schedule()
        if not batch:
            return
        samples, scores = self.runner.run(batch, self.model_config.eos_token_ids)
        with timer.span("postprocess"):
            sampled = {s.request_id for s in batch.sampling}  # before postprocess advances them
            finished, copies = self.scheduler.postprocess(batch, samples, scores,
                                                          self.weight_version)
            self.runner.copy_blocks(copies)
            self._emit(sampled | {s.request_id for s in finished})

    def _can_step(self) -> bool:
        return (not self._paused and self.weights.txn is None and self.weights.broken is None
                and not self._released())

    def _released(self) -> list[str]:
        return [tag for tag, arena in self._arenas().items() if not arena.resident]

    def _arenas(self) -> dict:
        return {"weights": self.runner.weights_arena, "kv_cache": self.runner.kv_arena}

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._waiting_controls:  # let control calls in between steps
                    self._cond.wait(0.001)
                if not self.scheduler.has_work():
                    self._thread = None
                    return
                if not self._can_step():
                    self._cond.wait(0.05)
                    continue
                try:
                    self.step()
                except Exception as e:  # fail what was running, keep serving
                    self._fail_all(e)

    def _drive(self, waiters: list["_Waiter"], on_done: Callable[[int], None] = lambda n: None):
        """Step the engine in the calling thread until `waiters` are done, as vLLM's offline
        `LLM.generate` does. Another caller's background loop may step too (steps are
        serialized). Why not leave it to the loop thread: torch's OpenMP runtime (libgomp) keeps
        a thread team per thread that ran parallel work; with the caller's (from loading) and
        the loop thread's both alive there are more OpenMP threads than cores, libgomp then
        barely spin-waits between parallel regions, and steps ran up to 2x slower here."""
        done = 0
        while done < len(waiters):
            with self._cond:
                while self._waiting_controls:  # let control calls in between steps
                    self._cond.wait(0.001)
                if not self.scheduler.has_work() or not self._can_step():
                    self._cond.wait(0.05)  # another thread's work or a pause
                else:
                    try:
                        self.step()
                    except Exception as e:  # fail what was running, keep serving
                        self._fail_all(e)
            now = sum(w.event.is_set() for w in waiters)
            if now > done:
                on_done(now - done)
                done = now

    @contextmanager
    def _control(self):
        """Run a control call between two steps (the loop yields to waiting callers)."""
        with self._count_lock:
            self._waiting_controls += 1
        try:
            self._cond.acquire()
        finally:
            with self._count_lock:
                self._waiting_controls -= 1
        try:
            yield
        finally:
            self._cond.notify_all()
            self._cond.release()

    def _kick(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rollout-engine", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ requests

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {prompt[:40]!r} is a string, but the model at "
                                 f"{self.config.model!r} has no tokenizer; pass token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: the tokenizer takes none
                raise ValueError(f"prompt is not valid Unicode text: {e.reason} at character "
                                 f"{e.start} ({prompt[e.start]!r})") from None
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"a prompt must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        for i, t in enumerate(prompt):
            if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                raise ValueError(f"prompt token {i} is {t!r} ({type(t).__name__}): token ids are "
                                 f"integers")
        return None, [int(t) for t in prompt]

    def _check_ids(self, token_ids: list[int], what: str) -> None:
        vocab = self.model_config.vocab_size
        bad = [(i, t) for i, t in enumerate(token_ids) if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} token id {bad[0][1]} at position {bad[0][0]} is out of range "
                             f"[0, {vocab})")

    def _check_drawable(self, params: SamplingParams) -> None:
        """While min_tokens holds them back, EOS and the stop ids must leave a token to draw."""
        held = set(params.stop_token_ids)
        if not params.ignore_eos:
            held |= set(self.model_config.eos_token_ids)
        if params.min_tokens and len(held) >= self.model_config.vocab_size:
            raise ValueError(f"min_tokens={params.min_tokens} holds back every token of the "
                             f"vocabulary ({self.model_config.vocab_size}): stop_token_ids and EOS "
                             "cover it all, so no token could be drawn")

    def check_prompt(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, checked as generation checks them (a tokenizer for text,
        ids in the vocabulary, room for a token in the context); ValueError names what is
        wrong. For callers that answer without generating (SGLang's max_new_tokens 0)."""
        _, token_ids = self._tokenize(prompt)
        self._validate(token_ids, SamplingParams(max_tokens=1))
        return token_ids

    def _validate(self, token_ids: list[int], params: SamplingParams) -> SamplingParams:
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        self._check_ids(token_ids, "prompt")
        self._check_ids(params.stop_token_ids, "stop_token_ids")
        self._check_drawable(params)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop!r} need the checkpoint's tokenizer, and "
                             f"the model at {self.config.model!r} has none; pass stop_token_ids")
        return self._fit(token_ids, params)

    def _fit(self, token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """`params` with max_tokens set where it was None, once the prompt and its response fit
        the context and the KV cache."""
        room = self.max_model_len - len(token_ids)
        if params.max_tokens is None:  # as many as the context and the KV cache hold
            limit = min(self.max_model_len,
                        self.block_manager.num_blocks * self.config.block_size)
            what = ("the model's context" if limit == self.max_model_len
                    else "the KV cache (raise kv_cache_memory)")
            if len(token_ids) >= limit:
                raise ValueError(f"prompt of {len(token_ids)} tokens leaves no room in {what} "
                                 f"of {limit} tokens")
            if params.min_tokens > limit - len(token_ids):
                raise ValueError(f"prompt ({len(token_ids)} tokens) + min_tokens "
                                 f"({params.min_tokens}) exceeds {what} of {limit} tokens")
            params = SamplingParams(**{**params.__dict__, "max_tokens": limit - len(token_ids)})
        elif params.max_tokens > room:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens})"
                             f" exceeds the model's context of {self.max_model_len} tokens")
        blocks = -(-(len(token_ids) + params.max_tokens) // self.config.block_size)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"the request needs {blocks} KV blocks but the cache holds only "
                             f"{self.block_manager.num_blocks}; lower max_tokens or raise "
                             "kv_cache_memory")
        return params

    def _prepare(self, prompt: Prompt, params: SamplingParams | None, request_id: str | None
                 ) -> tuple[str | None, str | None, list[int], SamplingParams]:
        """(request id, or None for one `_submit` numbers, text, token ids, params)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got "
                             f"{type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        params = self._validate(token_ids, params)
        return request_id or None, text, token_ids, params

    def _submit(self, prepared: list, on_update: list, stream: bool = False,
                score_from: list[int] | None = None, drive: bool = False,
                prefix: str = "req") -> list[str]:
        """Queue requests together, so that the loop sees them in one batch, and return their
        ids: those without one get `prefix`-N, an N no request in flight or in this batch
        holds (a caller may have named its own "req-7"). `drive`: the caller steps the engine
        itself (`_drive`); else the loop thread starts."""
        with self._control():
            self._check_can_generate()
            given = [request_id for request_id, *_ in prepared if request_id is not None]
            taken = [r for r in given if r in self._requests] + [r for r in set(given)
                                                                if given.count(r) > 1]
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already in use")
            ids = [request_id or self._free_id(prefix, given) for request_id, *_ in prepared]
            prepared = [(rid, *rest) for rid, (_, *rest) in zip(ids, prepared)]
            requests = []  # all made before any is queued: all or nothing
            for k, ((request_id, text, token_ids, params), callback) in enumerate(
                    zip(prepared, on_update)):
                seqs = []
                for i in range(params.n):
                    seed = (secrets.randbits(63) if params.seed is None
                            else (params.seed + i) % 2**63)
                    seqs.append(Sequence(next(self._ids), request_id, i, token_ids, params, seed,
                                         self.config.block_size))
                seqs[0].forks = seqs[1:]
                if score_from is not None:
                    seqs[0].score_from = score_from[k]
                requests.append(_Request(request_id, text, token_ids, seqs, callback, stream))
            for req in requests:
                self._requests[req.request_id] = req
                self.scheduler.add(req.seqs[0])
            if not drive:
                self._kick()
            return ids

    def _free_id(self, prefix: str, reserved: list[str]) -> str:
        while True:
            request_id = f"{prefix}-{next(self._ids)}"
            if request_id not in self._requests and request_id not in reserved:
                reserved.append(request_id)
                return request_id

    def _check_can_generate(self) -> None:
        """States that refuse new work: released memory, incomplete weights."""
        released = self._released()
        if released:
            raise RuntimeError(f"engine memory is released ({', '.join(released)}); call "
                               f"resume_memory() before generating")
        self.weights.check_complete()

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.text  # cut at the stop string that ended it
            if self.tokenizer is not None and not isinstance(seq.stop_reason, str):
                text = self.tokenizer.decode(seq.output_token_ids)
            outs.append(CompletionOutput(
                index=seq.index, token_ids=seq.output_token_ids,
                logprobs=list(seq.logprobs) if seq.params.logprobs else None,
                finish_reason=seq.finish_reason, cached_tokens=seq.num_cached_tokens,
                seed=seq.seed, weight_version=seq.weight_version,
                weight_versions=list(seq.weight_versions),
                text=text if self.tokenizer is not None else None,
                top_logprobs=list(seq.top_logprobs) if seq.params.top_logprobs else None,
                stop_reason=seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             req.finished)

    def _emit(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            req = self._requests.get(rid)
            if req is None:
                continue
            if req.finished:
                del self._requests[rid]
                req.on_update(self._output(req), None)
            elif req.stream:
                req.on_update(self._output(req), None)

    def _fail_all(self, error: BaseException) -> None:
        for req in list(self._requests.values()):
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
            del self._requests[req.request_id]
            req.on_update(None, error)

    def abort(self, request_id: str) -> bool:
        """End a request now; its completions keep the tokens made so far (finish "abort")."""
        with self._control():
            req = self._requests.get(request_id)
            if req is None:
                return False
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
            self._emit({request_id})
            return True

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (token-id lists or strings); outputs in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]  # one prompt of token ids
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            sampling_params = [sampling_params] * len(prompts)
        elif len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} "
                             "prompts; pass one, or one per prompt")
        prepared = [self._prepare(p, sp, None) for p, sp in zip(prompts, sampling_params)]
        waiters = [_Waiter() for _ in prepared]
        self._submit(prepared, waiters, drive=True)
        with tqdm(total=len(waiters), disable=not use_tqdm, desc="generate") as bar:
            self._drive(waiters, bar.update)
        return [waiter.result() for waiter in waiters]

    def score(self, sequences: Seq[list[int]], response_start: int | Seq[int],
              temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log-probs of each sequence's tokens from `response_start` on, in one
        pass through the same kernels as generation: what a trainer's old-log-prob recompute
        gives, and bitwise the log-probs generation returned for those tokens. Raises
        `ScoringAborted` where a sequence was aborted before it was scored whole."""
        prepared, starts = self._prepare_scores(sequences, response_start, temperature)
        waiters = [_Waiter() for _ in prepared]
        self._submit(prepared, waiters, score_from=starts, drive=True, prefix="score")
        self._drive(waiters)
        return _scored([w.result() for w in waiters])

    async def score_async(self, sequences: Seq[list[int]], response_start: int | Seq[int],
                          temperature: float = 1.0,
                          request_ids: Seq[str] | None = None) -> list[list[float]]:
        """`score` from asyncio, stepped by the engine's loop thread (no thread waits on it);
        `request_ids` name the sequences for `abort()`. A cancelled call aborts them."""
        return _scored(await self.score_outputs_async(sequences, response_start, temperature,
                                                      request_ids))

    async def score_outputs_async(self, sequences: Seq[list[int]],
                                  response_start: int | Seq[int], temperature: float = 1.0,
                                  request_ids: Seq[str] | None = None) -> list[RequestOutput]:
        """`score_async`'s requests as outputs: each one's log-probs, the weight versions that
        priced them (`weight_versions`), and finish reason abort where it was aborted midway
        (its log-probs then short)."""
        prepared, starts = self._prepare_scores(sequences, response_start, temperature)
        if request_ids is not None:
            if len(request_ids) != len(prepared):
                raise ValueError(f"got {len(request_ids)} request ids for {len(prepared)} "
                                 "sequences")
            prepared = [(rid, *rest) for rid, (_, *rest) in zip(request_ids, prepared)]
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in prepared]

        def settle(future: asyncio.Future):
            def on_update(output, error):
                if error is not None or output.finished:
                    loop.call_soon_threadsafe(_resolve, future, output, error)
            return on_update

        ids = self._submit(prepared, [settle(f) for f in futures], score_from=starts,
                           prefix="score")
        try:
            return await asyncio.gather(*futures)
        finally:
            for rid in ids:
                if rid in self._requests:
                    self.abort(rid)

    def _prepare_scores(self, sequences, response_start, temperature) -> tuple[list, list]:
        sequences = [self._tokenize(list(s))[1] for s in sequences]
        starts = ([response_start] * len(sequences) if isinstance(response_start, int)
                  else list(response_start))
        if len(starts) != len(sequences):
            raise ValueError(f"got {len(starts)} response starts for {len(sequences)} sequences")
        params = SamplingParams(temperature=temperature, max_tokens=1, logprobs=True)
        prepared = []
        for i, (tokens, start) in enumerate(zip(sequences, starts)):
            if (not isinstance(start, numbers.Integral) or isinstance(start, bool)
                    or not 1 <= start < len(tokens)):
                raise ValueError(f"response_start {start!r} of sequence {i} must be an int in "
                                 f"[1, {len(tokens)}): at least one prompt and one response token")
            self._check_ids(tokens, f"sequence {i}")
            self._fit(tokens[:-1], params)
            prepared.append((None, None, tokens, params))
        return prepared, starts

    async def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                             request_id: str | None = None) -> RequestOutput:
        """Generate for one prompt from asyncio; other requests may join while it runs."""
        final = None
        async for out in self.generate_stream(prompt, sampling_params, request_id, _final=True):
            final = out
        return final

    async def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                              request_id: str | None = None,
                              _final: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that adds tokens; the last is final."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if isinstance(prompt, str):  # a long text takes seconds to tokenize: not on the loop
            prepared = await asyncio.to_thread(self._prepare, prompt, sampling_params,
                                               request_id)
        else:
            prepared = self._prepare(prompt, sampling_params, request_id)

        def on_update(output, error):
            loop.call_soon_threadsafe(queue.put_nowait, (output, error))

        (rid,) = self._submit([prepared], [on_update], stream=not _final)
        try:
            while True:
                output, error = await queue.get()
                if error is not None:
                    raise error
                yield output
                if output.finished:
                    return
        finally:
            if rid in self._requests:
                self.abort(rid)

    # ------------------------------------------------------------------ generation control

    def pause_generation(self, mode: str = "abort") -> None:
        """Stop stepping. In-flight requests: "abort" ends them now (finish "abort", partial
        tokens and log-probs kept); "retract" puts them back in the queue, their KV cache freed,
        to be recomputed later; "in_place" keeps them as they are. New requests queue."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} is not one of {', '.join(PAUSE_MODES)}")
        with self._control():
            self._paused = True
            if mode == "abort":
                for rid in list(self._requests):
                    self.abort(rid)
            elif mode == "retract":
                self.scheduler.retract_all()

    def continue_generation(self) -> None:
        with self._control():
            self._paused = False
            if self.scheduler.has_work():
                self._kick()

    # ------------------------------------------------------------------ weight updates

    def begin_weight_update(self, version: int | str | None, manifest: list[TensorMeta]) -> None:
        """Open a transaction (the manifest is checked first; refused: weights untouched).
        Stepping stops until it commits; transports call this, then load and commit.
        Released weights are taken back first (restored from a backup if there is one)."""
        with self._control():
            self.weights.check_begin(version, manifest)  # a refusal takes no memory back
            self._resume_weights()
            self.weights.begin(version, manifest)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        with self._control():
            self.weights.load(named_tensors)

    def commit_weight_update(self) -> int | str:
        with self._control():
            version = self.weights.commit()
            self.scheduler.forget_cached_prefixes()  # cached K/V came from the old weights
            if self.scheduler.has_work():
                self._kick()
            return version

    def abort_weight_update(self, reason: str) -> None:
        with self._control():
            self.weights.abort(reason)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Iterable[Bucket],
                       version: int | str | None = None) -> int | str:
        """In-process update from (Hugging Face name, tensor) pairs or flat buckets.
        Returns the new version."""
        items = list(named_tensors)
        pairs = ([p for b in items for p in b.tensors()] if items and isinstance(items[0], Bucket)
                 else items)
        self.begin_weight_update(version, [TensorMeta.of(n, t) for n, t in pairs])
        try:
            self.load_weights(pairs)
        except BaseException as e:
            self.abort_weight_update(f"{type(e).__name__} while loading")
            raise
        return self.commit_weight_update()

    def update_weights_from_disk(self, path: str, version: int | str | None = None) -> int | str:
        """Load a safetensors checkpoint directory into the existing weights."""
        from rollout.loader import checkpoint_manifest, iter_checkpoint
        self.begin_weight_update(version, checkpoint_manifest(path))
        try:
            for name, tensor in iter_checkpoint(path):
                self.load_weights([(name, tensor)])
        except BaseException as e:
            self.abort_weight_update(f"{type(e).__name__} while reading {path}")
            raise
        return self.commit_weight_update()

    def start_weight_receiver(self, address: str = "tcp://127.0.0.1:0",
                              timeout_s: float = 60.0) -> str:
        """Bind a ZMQ receiver for `weight_sync.ZmqWeightSender`; returns the bound address with
        the receiver's token ("tcp://host:port#token=<hex>"): a sender needs all of it."""
        from weight_sync.zmq_transport import ZmqWeightReceiver
        if self._receiver is not None:
            raise RuntimeError(f"a weight receiver is already bound at {self._receiver.endpoint}")
        self._receiver = ZmqWeightReceiver(_Sink(self), address, self.runner.device, timeout_s)
        return self._receiver.address

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str | None = None,
                                  timeout_s: float = 300.0) -> None:
        """Join a process group with the trainer (rank 0); this engine is rank `rank_offset`.
        Blocks until every member joined. backend: 'nccl' on GPU, 'gloo' on CPU by default."""
        from weight_sync.collective import WeightUpdateGroup
        if group_name in self._groups:
            raise ValueError(f"weight update group {group_name!r} already exists")
        backend = backend or ("nccl" if self.runner.device.type == "cuda" else "gloo")
        self._groups[group_name] = WeightUpdateGroup(master_address, master_port, rank_offset,
                                                     world_size, group_name, backend, timeout_s)

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list,
                                        group_name: str, version: int | str | None = None,
                                        bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int | str:
        """Receive the trainer's broadcast of these tensors (same order, same bucket size as the
        trainer's `WeightUpdateGroup.send`). A refused update still takes the whole broadcast,
        so that the trainer never hangs and the next update's bytes are the next update's; where
        the broadcast cannot be followed (a manifest with no sizes, a broken collective) the
        group is closed, and the error says to make it again."""
        group = self._groups.get(group_name)
        if group is None:
            raise ValueError(f"no weight update group {group_name!r}; "
                             f"groups: {sorted(self._groups)}")
        try:
            manifest = _manifest(names, dtypes, shapes)
        except ValueError as e:
            self._close_group(group_name)
            raise ValueError(f"{e}; without sizes this engine cannot follow the broadcast, so "
                             f"group {group_name!r} is closed: init_weights_update_group again"
                             ) from None
        refused = None
        try:
            self.begin_weight_update(version, manifest)
        except (ValueError, RuntimeError) as e:
            refused = e
        try:
            for bucket in group.receive(manifest, bucket_bytes):
                if refused is None:
                    try:
                        self.load_weights(bucket)
                    except Exception as e:
                        self.abort_weight_update(f"{type(e).__name__} while loading")
                        refused = e
        except BaseException as e:
            if refused is None:
                self.abort_weight_update(f"{type(e).__name__} during the broadcast")
            self._close_group(group_name)
            raise RuntimeError(f"the broadcast of group {group_name!r} failed ({type(e).__name__}:"
                               f" {e}); the group is closed: init_weights_update_group again"
                               ) from e
        if refused is not None:
            raise refused
        return self.commit_weight_update()

    def _close_group(self, group_name: str) -> None:
        group = self._groups.pop(group_name, None)
        if group is not None:
            group.destroy()

    def destroy_weights_update_group(self, group_name: str) -> None:
        if group_name not in self._groups:
            raise ValueError(f"no weight update group {group_name!r}")
        self._close_group(group_name)

    def shutdown(self) -> None:
        """Stop the weight receiver and leave update groups (requests in flight are aborted)."""
        self.pause_generation("abort")
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        for name in list(self._groups):
            self.destroy_weights_update_group(name)

    def weights_checksum(self) -> str:
        """Equal to `weight_sync.checksum(model.named_parameters(), dtype=<engine dtype>)` on the
        trainer when the weights are the same."""
        with self._control():
            if not self.runner.weights_arena.resident:
                raise RuntimeError("weights are released; call resume_memory(['weights']) first")
            return self.weights.checksum()

    # ------------------------------------------------------------------ memory

    def _tags(self, tags) -> list[str]:
        tags = list(MEMORY_TAGS) if tags is None else [tags] if isinstance(tags, str) else list(tags)
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            raise ValueError(f"unknown memory tag(s) {unknown}; tags: {', '.join(MEMORY_TAGS)}")
        return tags

    def release_memory(self, tags: Seq[str] | str | None = None, weights: str = "backup",
                       pause_mode: str = "retract") -> None:
        """Give device memory back (tags "weights", "kv_cache"; None: both). Returns once it is
        freed. weights="backup" keeps a copy off the device (pinned host memory on CUDA, an
        unlinked temporary file on the CPU); "discard" drops them because an update follows.
        Requests in flight are paused first with `pause_mode` ("abort" or "retract"; "in_place"
        only when the KV cache stays). Releasing what is released already does nothing."""
        tags = self._tags(tags)
        if weights not in ("backup", "discard"):
            raise ValueError(f"weights={weights!r}: choose 'backup' or 'discard'")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {pause_mode!r} is not one of {', '.join(PAUSE_MODES)}")
        with self._control():
            arenas = {"weights": self.runner.weights_arena, "kv_cache": self.runner.kv_arena}
            tags = [t for t in tags if arenas[t].resident]
            if not tags:  # released already: nothing to pause requests for
                return
            if "weights" in tags and self.weights.txn is not None:
                raise RuntimeError(f"an update to weight version {self.weights.txn.version} is "
                                   "open: release the weights after it commits or aborts")
            busy = self.scheduler.has_work()
            if self.scheduler.running and pause_mode == "in_place" and "kv_cache" in tags:
                raise ValueError("pause_mode='in_place' cannot keep requests across a kv_cache "
                                 "release; use 'retract' or 'abort'")
            if busy and pause_mode == "abort":
                for rid in list(self._requests):
                    self.abort(rid)
            elif busy and pause_mode == "retract":
                self.scheduler.retract_all()
            if "kv_cache" in tags:
                self.block_manager.reset_prefix_cache()
                self.runner.kv_arena.release(backup=False)
            if "weights" in tags:
                self.runner.weights_arena.release(backup=weights == "backup")
                if weights == "discard":
                    self.weights.mark_discarded()

    def resume_memory(self, tags: Seq[str] | str | None = None) -> None:
        """Take the memory back (None: both). Weights come back from their backup, or, after a
        discard, wait for a weight update before generation resumes. The KV cache comes back
        empty. Resuming what is resident already does nothing."""
        tags = self._tags(tags)
        with self._control():
            if "weights" in tags:
                self._resume_weights()
            if "kv_cache" in tags:
                self.runner.kv_arena.resume()
            if self.scheduler.has_work() and self._can_step():
                self._kick()

    def _resume_weights(self) -> None:
        arena = self.runner.weights_arena
        if not arena.resident and not arena.resume() and self.weights.broken is None:
            self.weights.mark_discarded()

    def memory_stats(self) -> dict:
        """Bytes held now per kind of device memory, and bytes released."""
        arenas = self._arenas()
        return {
            **{tag: arena.nbytes if arena.resident else 0 for tag, arena in arenas.items()},
            "other": self.runner.other_bytes(),
            "released": {tag: 0 if arena.resident else arena.nbytes
                         for tag, arena in arenas.items()},
        }


def _resolve(future: asyncio.Future, output, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(output)


def _scored(outputs: list[RequestOutput]) -> list[list[float]]:
    """The log-probs of scored requests; refused where one was aborted midway (its list would
    be short, and look whole)."""
    aborted = [i for i, o in enumerate(outputs) if o.outputs[0].finish_reason == "abort"]
    if aborted:
        raise ScoringAborted(f"scoring of sequence(s) {aborted} was aborted (abort() or "
                             "pause_generation('abort')) before every position was scored")
    return [o.outputs[0].logprobs for o in outputs]


def _manifest(names: list[str], dtypes: list, shapes: list) -> list[TensorMeta]:
    """A broadcast's manifest from SGLang's three lists, each entry with a known size."""
    for label, value in (("names", names), ("dtypes", dtypes), ("shapes", shapes)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{label} must be a list, got {type(value).__name__} {value!r:.80}")
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes "
                         f"({len(shapes)}) differ in length")
    return [_meta(n, d, s) for n, d, s in zip(names, dtypes, shapes)]


def _meta(name, dtype, shape) -> TensorMeta:
    if not isinstance(name, str):
        raise ValueError(f"tensor name {name!r} is not a string")
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    if not isinstance(dtype, str):
        raise ValueError(f"{name}: dtype {dtype!r} is not a dtype name")
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0
            for x in shape):
        raise ValueError(f"{name}: shape {shape!r} is not a list of sizes")
    # an unknown dtype is refused here, by name ("torch.float32" is float32)
    return TensorMeta(name, dtype_name(dtype_from_name(dtype)), tuple(int(x) for x in shape))


class _Sink:
    """Adapts the engine to weight_sync's receiver protocol."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def begin(self, version, manifest):
        self.engine.begin_weight_update(version, manifest)

    def load(self, named_tensors):
        self.engine.load_weights(named_tensors)

    def commit(self):
        return self.engine.commit_weight_update()

    def abort(self, reason):
        self.engine.abort_weight_update(reason)
