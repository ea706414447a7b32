"""The ``memdec-fast`` command line: generate, ppl, bench and info (plus train, demo and serve when installed).

Every subcommand takes --base, --memory and --memory-type, defaulting to the embedded demo pair, and --json for
JSON on stdout. Bad arguments give a one-line error on stderr and exit status 2; they are checked before any model
loads, and nothing heavy (torch, transformers) is imported before a command runs. Every numeric flag takes its
type and range from :mod:`memdec_fast.ranges`, whose entries the ops check too (see ``args.apply_ranges``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from memdec_fast.cli.args import (
    KNN_TEMP_HELP,
    LMBDA_HELP,
    Parser,
    UsageError,
    apply_ranges,
    common_flags,
    pair_paths,
    resolve_device,
)

_OPTIONAL_COMMANDS = ("memdec_fast.train.cli", "memdec_fast.cli.demo", "memdec_fast.server.cli")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with train and demo when their modules are present."""
    parser = Parser(prog="memdec-fast", description="Fast inference for a base LM mixed with a pretrained memory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_flags()

    g = sub.add_parser("generate", parents=[common_flags("print JSON on stdout: one object per prompt, one per line")],
                       help="generate text from one or more prompts")
    g.add_argument("prompt", nargs="+", help="each prompt is completed on its own (batched); prints prompt + completion")
    g.add_argument("--max-new-tokens", type=int, help="default: 64, or half the context when that is shorter")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 disables")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the likeliest tokens holding this mass")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the likeliest's probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="HF's rule, on the mixture")
    g.add_argument("--seed", type=int, help="the same seed gives the same tokens (default: none, a fresh draw)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string; repeat for several")
    g.add_argument("--lmbda", type=float, help=LMBDA_HELP)
    g.add_argument("--knn-temp", type=float, help=KNN_TEMP_HELP)
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", parents=[common], help="perplexity of base, memory and mixture on a text file")
    p.add_argument("file", help="UTF-8 text file, tokenized line by line")
    p.add_argument("--lmbda", type=float, nargs="+", help="one or several (a sweep in one pass); " + LMBDA_HELP)
    p.add_argument("--knn-temp", type=float, help=KNN_TEMP_HELP)
    p.add_argument("--block-size", type=int, help="window length (default: min(1024, model context))")
    p.add_argument("--stride", type=int,
                   help="window step, at most the block size (equal: disjoint windows) (default: block size / 2)")
    p.add_argument("--batch-size", type=int, help="windows per forward (default: 1 on CPU, 8 on CUDA)")
    p.set_defaults(func=cmd_ppl)

    b = sub.add_parser("bench", parents=[common], help="end-to-end generation latency table")
    b.add_argument("--prompt-tokens", type=int, nargs="+",
                   help="prompt lengths (default: 128, or half the context when that is shorter)")
    b.add_argument("--new-tokens", type=int,
                   help="tokens per request (default: 64, or what the context leaves after the longest prompt)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="requests generated together")
    b.add_argument("--lmbda", type=float, help=LMBDA_HELP)
    b.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is shown")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", parents=[common], help="build, devices and versions")
    i.set_defaults(func=cmd_info)

    for name in _OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise  # the module exists but something it imports is missing: a real error
            continue
        module.register(sub)
    apply_ranges(parser)
    return parser


def _context(args: argparse.Namespace) -> int:
    """The pair's context window in tokens, from the config files and weight names alone (no weights loaded).

    An MLP Memory reads one hidden state at a time and has no context of its own (the trainer's upstream-format
    config says n_positions=1), so only the base bounds the context then. A --memory-type that contradicts the
    memory's weights is refused here, before anything loads.
    """
    from memdec_fast.models.checkpoint import load_config
    from memdec_fast.models.checks import resolve_memory_type

    base, memory = pair_paths(args)
    kind = resolve_memory_type(memory, args.memory_type, key="--memory-type")
    sizes = []
    for path in (base,) if kind == "mlp" else (base, memory):
        config = load_config(path)
        sizes += [v for k in ("n_positions", "max_position_embeddings") if isinstance(v := config.get(k), int)][:1]
    return min(sizes) if sizes else 2**31 - 1


def _load(args: argparse.Namespace):
    """The JointGenerator of the pair; lmbda and knn_temp are the flags, else those stored with the memory."""
    import torch

    from memdec_fast import JointGenerator

    device = resolve_device(args.device)
    lmbda = args.lmbda[0] if isinstance(args.lmbda, list) else args.lmbda
    base, memory = pair_paths(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return JointGenerator.from_pretrained(base, memory, memory_type=args.memory_type, lmbda=lmbda,
                                          knn_temp=getattr(args, "knn_temp", None), device=device, dtype=dtype)


def _utf8(name: str, text: str) -> str:
    # argv bytes that are not UTF-8 arrive as lone surrogates
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError(f"{name}: not valid UTF-8 (byte {err.start} of the argument)") from None
    return text


def _emit(args: argparse.Namespace, obj: dict, text: str) -> None:
    print(json.dumps(obj) if args.json else text)


def cmd_generate(args: argparse.Namespace) -> int:
    """``memdec-fast generate PROMPT...``: each prompt followed by its completion (streamed with --stream), or with
    --json one object per prompt and line: {"prompt", "text", "token_ids", "logprobs", "finish_reason"}."""
    if args.stream and args.json:
        raise UsageError("--stream and --json cannot be combined")
    prompts = [_utf8("prompt", p) for p in args.prompt]
    stops = [_utf8("--stop", s) for s in args.stop or []]
    if any(not p for p in prompts):
        raise UsageError("prompt: empty prompt")
    if any(not s for s in stops):
        raise UsageError("--stop: empty stop string")
    context = _context(args)
    args.max_new_tokens = args.max_new_tokens or max(1, min(64, context // 2))
    if args.max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context of "
                         f"{context} tokens")
    gen = _load(args)
    kw = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed, "stop": stops or None,
        "repetition_penalty": args.repetition_penalty,
    }
    if args.stream:
        for prompt in prompts:
            print(prompt, end="", flush=True)
            for piece in gen.stream(prompt, **kw):
                print(piece, end="", flush=True)
            print()
        return 0
    res = gen.generate(prompts, **kw)
    for i, prompt in enumerate(prompts):
        obj = {
            "prompt": prompt, "text": res.texts[i], "token_ids": res.token_ids[i], "logprobs": res.logprobs[i],
            "finish_reason": res.finish_reasons[i],
        }
        _emit(args, obj, prompt + res.texts[i])
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    """``memdec-fast ppl FILE``: perplexities; with --json, :meth:`PerplexityResult.to_dict`."""
    from memdec_fast import perplexity

    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    context = min(1024, _context(args))
    if args.block_size is not None and args.block_size > context:
        raise UsageError(f"--block-size {args.block_size} exceeds the model's context of {context} tokens")
    block = args.block_size or context
    if args.stride is not None and args.stride > block:
        raise UsageError(f"--stride {args.stride} must not exceed the block size {block} (equal: disjoint windows)")
    gen = _load(args)
    res = perplexity(gen, None, Path(args.file), lmbda=args.lmbda, knn_temp=args.knn_temp, block_size=block,
                     stride=args.stride, batch_size=args.batch_size)
    lines = [f"tokens scored  {res.tokens}", f"base PPL       {res.base_ppl:.4f}", f"memory PPL     {res.memory_ppl:.4f}"]
    lines += [f"joint PPL      {ppl:.4f}  (lmbda {lm:g})" for lm, ppl in res.joint_ppl.items()]
    _emit(args, res.to_dict(), "\n".join(lines))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``memdec-fast bench``: prefill and per-token decode latency over prompt lengths and batch sizes."""
    from memdec_fast.cli.bench import bench_lengths, run_bench

    prompt_tokens, new_tokens = bench_lengths(_context(args), args.prompt_tokens, args.new_tokens)
    gen = _load(args)
    rows = run_bench(gen, prompt_tokens, args.batch_sizes, new_tokens, args.repeats)
    head = f"{'batch':>5} {'prompt':>6} {'new':>4} {'TTFT ms':>9} {'ms/token':>9} {'tokens/s':>9}"
    body = [
        f"{r['batch']:>5} {r['prompt_tokens']:>6} {r['new_tokens']:>4} {r['ttft_ms']:>9.2f} "
        f"{r['decode_ms_per_token']:>9.2f} {r['tokens_per_s']:>9.1f}"
        for r in rows
    ]
    _emit(args, {"device": str(gen.device), "rows": rows}, "\n".join([f"device {gen.device}", head, *body]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``memdec-fast info``: the build, the visible devices, versions, and the model pair that would load."""
    import platform

    import torch
    import transformers

    import memdec_fast
    from memdec_fast.models.checkpoint import load_config

    base, memory = pair_paths(args)
    for path in (base, memory):
        load_config(path)  # the pair must exist: a missing directory or config.json is an error, not a success
    devices = [{"name": "cpu", "threads": torch.get_num_threads()}]
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        devices.append({
            "name": f"cuda:{i}", "model": prop.name, "capability": f"{prop.major}.{prop.minor}",
            "memory_gib": round(prop.total_memory / 2**30, 1),
        })
    info = {
        "version": memdec_fast.__version__,
        "build": memdec_fast.build_info(),
        "devices": devices,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "pair": {"base": base, "memory": memory, "memory_type": args.memory_type},
    }
    b = info["build"]
    kind = "CUDA + CPU" if b.get("cuda") else "CPU only" if b.get("compiled") else "not compiled (reference ops)"
    lines = [
        f"memdec_fast {info['version']}: {kind}" + (f", archs {' '.join(b['cuda_archs'])}" if b.get("cuda") else ""),
        "devices: " + ", ".join(d.get("model", d["name"]) if d["name"] != "cpu" else f"cpu ({d['threads']} threads)"
                                for d in devices),
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"pair: base {info['pair']['base']}, memory {info['pair']['memory']} ({args.memory_type})",
    ]
    _emit(args, info, "\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Example
    -------
    >>> main(["ppl", "wiki.test.txt", "--base", "gpt2", "--memory", "Clover-Hill/MemoryDecoder-gpt2-small"])
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad arguments, missing or unreadable files
        print(f"memdec-fast {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except ImportError as err:  # an optional dependency of this command
        print(f"memdec-fast {args.command}: error: needs {err.name or err} (pip install 'memdec_fast[train]' for "
              "training, 'memdec_fast[serve]' for serving)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__
