"""`rollout generate | bench | doctor` (and `serve`, in integrations/)."""

import argparse
import gc
import json
import os
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory (default: the built-in preset model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (instead of bytes)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's)")
    p.add_argument("--no-packed-weights", dest="packed_weights", action="store_false",
                   help="CPU: linears on the plain weights (half the weight memory, slower)")


def _engine_kwargs(args) -> dict:
    kwargs = {"dtype": args.dtype}
    if not args.packed_weights:
        kwargs["packed_weights"] = False
    if args.device:
        kwargs["device"] = args.device
    for name in ("max_num_batched_tokens", "kv_cache_memory", "num_kv_blocks", "max_num_seqs",
                 "max_model_len"):
        if getattr(args, name) is not None:  # 0 too: the engine refuses it, naming it
            kwargs[name] = getattr(args, name)
    return kwargs


def _token_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} {text!r}: give token ids separated by commas, such as "
                         "'1,2,3'") from None


def _token_id_list(text: str) -> list[int]:
    try:
        return _token_ids(text, "--stop-token-ids")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def cmd_generate(args) -> int:
    from rollout import Engine, SamplingParams
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, max_tokens=args.max_tokens,
                            min_tokens=args.min_tokens, n=args.n, seed=args.seed,
                            stop=args.stop or [], stop_token_ids=args.stop_token_ids or [],
                            ignore_eos=args.ignore_eos, top_logprobs=args.top_logprobs)
    # checked before the engine loads (the preset takes seconds)
    prompt = args.prompt if args.prompt_ids is None else _token_ids(args.prompt_ids)
    engine = Engine(args.model, **_engine_kwargs(args))
    out = engine.generate([prompt], params, use_tqdm=False)[0]
    if args.json:
        print(json.dumps({"prompt_token_ids": out.prompt_token_ids,
                          "outputs": [c.__dict__ for c in out.outputs]}))
        return 0
    for c in out.outputs:
        header = f"[{c.index}] " if len(out.outputs) > 1 else ""
        print(f"{header}{c.text!r}" if c.text is not None else header.rstrip())
        print(f"    token_ids={c.token_ids}\n    finish_reason={c.finish_reason} seed={c.seed} "
              f"weight_version={c.weight_version}")
        if c.top_logprobs:
            print(f"    top_logprobs={c.top_logprobs}")
    return 0


def cmd_bench(args) -> int:
    from rollout import bench
    from rollout.determinism import machine
    from rollout.presets import DEFAULT_PRESET
    suites = args.suites or list(bench.SUITES)
    unknown = [s for s in suites if s not in bench.SUITES]
    if unknown:
        print(f"unknown bench suite(s) {unknown}; suites: {', '.join(bench.SUITES)}",
              file=sys.stderr)
        return 2
    if args.json:
        _check_writable(args.json)  # before the run, not after it
    workload = bench.Workload(args.num_prompts, args.n, args.min_prompt_len,
                              args.max_prompt_len, args.max_tokens, args.seed)
    options = bench.BenchOptions(tuple(args.baseline or ()), args.hf_prompts_per_call,
                                 not args.no_progress, args.vllm_python, args.repeat)
    report = {"machine": machine(), "model": args.model or f"built-in preset {DEFAULT_PRESET}",
              "command": "rollout " + " ".join(sys.argv[1:]), "suites": {}}
    print(f"machine: {report['machine']}\nmodel: {report['model']}")
    for name in suites:
        result = bench.SUITES[name](args.model, workload, options, **_engine_kwargs(args))
        print("\n".join(result.lines), flush=True)
        report["suites"][name] = result.data
        gc.collect()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _check_writable(path: str) -> None:
    """Refuse a path the report could not be written to (a directory, no such directory, no
    permission: `os.access` says root may write anywhere)."""
    target = os.path.realpath(path)  # a link's target is what gets written
    existed = os.path.exists(target)
    try:
        open(target, "a").close()
    except OSError as e:
        raise ValueError(f"--json {path}: {e.strerror}") from None
    if not existed:
        os.remove(target)


OPTIONAL_PACKAGES = ("triton", "fastapi", "uvicorn", "ray", "verl", "vllm", "openai",
                     "torch_memory_saver")


def _versions(names) -> list[str]:
    from importlib import metadata
    out = []
    for name in names:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return out


def cmd_doctor(args) -> int:
    """The environment, and per op and shape what the engine runs and whether batch invariance
    is guaranteed on this machine. Exit status 1 when it is not."""
    import platform

    import torch

    from rollout import Engine
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print("packages: " + ", ".join(_versions(OPTIONAL_PACKAGES)))
    kwargs = _engine_kwargs(args)
    kwargs.setdefault("num_kv_blocks", 16)
    engine = Engine(args.model, deterministic=not args.fast, **kwargs)
    report = engine.determinism_report()
    print(f"model: {args.model or 'built-in preset'} (kernel proofs at start: "
          f"{engine.runner.kernel_prepare_seconds:.1f} s)")
    print(report.format())
    return 0 if report.guaranteed else 1


def cmd_serve(args) -> int:
    try:
        from integrations.http.serve import serve
    except ImportError as e:
        print(f"error: rollout serve needs the serve extra ({e}); pip install "
              "'rollout-engine[serve]'", file=sys.stderr)
        return 2
    from rollout import Engine
    serve(Engine(args.model, **_engine_kwargs(args)), args.host, args.port, args.api_key,
          args.served_model_name, args.log_level)
    return 0


def _bench_defaults():
    from rollout.bench_workload import BenchOptions, Workload
    return Workload(), BenchOptions()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rollout", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    _engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma separated")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--stop-token-ids", type=_token_id_list, default=None,
                     help="token ids that end the response, comma separated")
    gen.add_argument("--top-logprobs", type=int, default=0,
                     help="also list this many likeliest tokens per position")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print the full output as JSON")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks, each against a baseline in the same run")
    _engine_args(bench)
    bench.add_argument("suites", nargs="*", help="suites to run (default: all)")
    bench.add_argument("--baseline", action="append", choices=["hf", "vllm"],
                       help="also run the throughput workload through transformers generate "
                            "(hf) or vLLM's offline LLM.generate (vllm, when installed); "
                            "repeatable")
    bench.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    w, o = _bench_defaults()
    bench.add_argument("--num-prompts", type=int, default=w.num_prompts)
    bench.add_argument("--n", type=int, default=w.n, help="samples per prompt")
    bench.add_argument("--min-prompt-len", type=int, default=w.min_prompt_len)
    bench.add_argument("--max-prompt-len", type=int, default=w.max_prompt_len)
    bench.add_argument("--max-tokens", type=int, default=w.max_tokens,
                       help="longest response; lengths spread over [max/4, max]")
    bench.add_argument("--seed", type=int, default=w.seed)
    bench.add_argument("--hf-prompts-per-call", type=int, default=o.hf_prompts_per_call,
                       help="prompts per transformers generate call (x n sequences)")
    bench.add_argument("--vllm-python", metavar="PYTHON",
                       help="a Python interpreter with vllm installed, for --baseline vllm "
                            "(vLLM's CPU build wants its own transformers: give it its own "
                            "venv); default: this interpreter")
    bench.add_argument("--repeat", type=int, default=o.repeat,
                       help="run the workload this many rounds (each: the engine with "
                            "deterministic=True, then False, then each baseline) and report "
                            "each system's fastest run")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(func=cmd_bench)

    doctor = sub.add_parser("doctor", help="what runs on this machine, and whether batch "
                                           "invariance is guaranteed")
    _engine_args(doctor)
    doctor.add_argument("--fast", action="store_true",
                        help="report on deterministic=False (vendor kernels) instead")
    doctor.set_defaults(func=cmd_doctor)

    serve = sub.add_parser("serve", help="SGLang's native HTTP API and the OpenAI API")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=_port, default=30000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every call")
    serve.add_argument("--served-model-name", default=None,
                       help="the model's name in the OpenAI API (default: the checkpoint "
                            "directory's name)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
