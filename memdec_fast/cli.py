"""The ``memdec-fast`` command line: generate, ppl, bench and info (plus train and demo when installed).

Every subcommand takes --base, --memory and --memory-type, defaulting to the
embedded demo pair, and --json for one JSON object on stdout. Bad arguments
give a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from memdec_fast.cli_bench import run_bench

DEMO_DIR = Path(__file__).parent / "data" / "demo"
_DTYPES = ("float32", "float16", "bfloat16")
_OPTIONAL_COMMANDS = ("memdec_fast.train.cli", "memdec_fast.demo")
_LMBDA_HELP = "weight of the memory (default: the memory's memdec_config.json, else 0.55)"
_KNN_TEMP_HELP = "memory softmax temperature (default: the memory's memdec_config.json, else 1.0)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(ValueError):
    """An argument the parser accepted but the command cannot use."""


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model pair")
    g.add_argument("--base", metavar="PATH", help="base LM: directory or hub name (default: the embedded demo base)")
    g.add_argument("--memory", metavar="PATH", help="memory: directory or hub name (default: the embedded demo memory)")
    g.add_argument("--memory-type", choices=("auto", "decoder", "mlp"), default="auto")
    g.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--dtype", choices=_DTYPES, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def _unit_float(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return v


def _non_negative_float(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with train and demo when their modules are present."""
    parser = _Parser(prog="memdec-fast", description="Fast inference for a base LM mixed with a pretrained memory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    g = sub.add_parser("generate", parents=[common], help="generate text from a prompt")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 disables")
    g.add_argument("--top-p", type=_unit_float, default=1.0)
    g.add_argument("--min-p", type=_unit_float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--lmbda", type=_unit_float, help=_LMBDA_HELP)
    g.add_argument("--knn-temp", type=_positive_float, help=_KNN_TEMP_HELP)
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", parents=[common], help="perplexity of base, memory and mixture on a text file")
    p.add_argument("file", help="UTF-8 text file, tokenized line by line")
    p.add_argument("--lmbda", type=_unit_float, nargs="+", help="one or several (a sweep in one pass); " + _LMBDA_HELP)
    p.add_argument("--knn-temp", type=_positive_float, help=_KNN_TEMP_HELP)
    p.add_argument("--block-size", type=_positive_int, help="window length (default: min(1024, model context))")
    p.add_argument("--stride", type=_positive_int, help="window step (default: block size / 2)")
    p.add_argument("--batch-size", type=_positive_int, help="windows per forward (default: 1 on CPU, 8 on CUDA)")
    p.set_defaults(func=cmd_ppl)

    b = sub.add_parser("bench", parents=[common], help="end-to-end generation latency table")
    b.add_argument("--prompt-tokens", type=_positive_int, nargs="+", default=[128])
    b.add_argument("--new-tokens", type=_positive_int, default=64)
    b.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1])
    b.add_argument("--lmbda", type=_unit_float, help=_LMBDA_HELP)
    b.add_argument("--repeats", type=_positive_int, default=3)
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
    return parser


def _pair(args: argparse.Namespace) -> tuple[str, str]:
    base = args.base or str(DEMO_DIR / "base")
    memory = args.memory or str(DEMO_DIR / "memory")
    for flag, given, path in (("--base", args.base, base), ("--memory", args.memory, memory)):
        if given is None and not (Path(path) / "config.json").is_file():
            raise UsageError(f"{flag}: not given, and the embedded demo pair is missing ({path}); pass --base and --memory")
    return base, memory


def _mixture(args: argparse.Namespace) -> tuple[list[float], float]:
    """(lmbdas, knn_temp): the flags, else the memory directory's memdec_config.json, else 0.55 and 1.0.

    A memory trained by memdec_fast.train (the demo pair included) stores the
    lmbda and knn_temp it was tuned for in memdec_config.json.
    """
    from memdec_fast.models.checkpoint import read_mixing

    saved = read_mixing(_pair(args)[1])
    lmbda = args.lmbda if args.lmbda is not None else saved["lmbda"]
    knn_temp = getattr(args, "knn_temp", None)
    return (lmbda if isinstance(lmbda, list) else [float(lmbda)]), float(
        knn_temp if knn_temp is not None else saved["knn_temp"]
    )


def _load(args: argparse.Namespace):
    import torch

    from memdec_fast.generator import JointGenerator

    (lmbda, *_), knn_temp = _mixture(args)
    base, memory = _pair(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return JointGenerator.from_pretrained(
        base, memory, memory_type=args.memory_type, lmbda=lmbda, knn_temp=knn_temp, device=args.device, dtype=dtype
    )


def _emit(args: argparse.Namespace, obj: dict, text: str) -> None:
    print(json.dumps(obj) if args.json else text)


def cmd_generate(args: argparse.Namespace) -> int:
    """``memdec-fast generate PROMPT``: the completion, or with --json {"prompt", "text", "token_ids", ...}."""
    if args.stream and args.json:
        raise UsageError("--stream and --json cannot be combined")
    gen = _load(args)
    kw = {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "seed": args.seed,
    }
    if args.stream:
        for piece in gen.stream(args.prompt, max_new_tokens=args.max_new_tokens, **kw):
            print(piece, end="", flush=True)
        print()
        return 0
    res = gen.generate(args.prompt, max_new_tokens=args.max_new_tokens, **kw)
    obj = {
        "prompt": args.prompt, "text": res.texts[0], "token_ids": res.token_ids[0], "logprobs": res.logprobs[0],
        "finish_reason": res.finish_reasons[0],
    }
    _emit(args, obj, args.prompt + res.texts[0])
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    """``memdec-fast ppl FILE``: perplexities; with --json, :meth:`PerplexityResult.to_dict`."""
    from memdec_fast.ppl import perplexity

    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    lmbdas, knn_temp = _mixture(args)
    gen = _load(args)
    block = args.block_size or min(1024, gen.max_context)
    stride = args.stride or max(1, block // 2)
    res = perplexity(
        gen, None, Path(args.file), lmbda=lmbdas, knn_temp=knn_temp, block_size=block, stride=stride,
        batch_size=args.batch_size,
    )
    lines = [f"tokens scored  {res.tokens}", f"base PPL       {res.base_ppl:.4f}", f"memory PPL     {res.memory_ppl:.4f}"]
    lines += [f"joint PPL      {ppl:.4f}  (lmbda {lm:g})" for lm, ppl in res.joint_ppl.items()]
    _emit(args, res.to_dict(), "\n".join(lines))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``memdec-fast bench``: prefill and per-token decode latency over prompt lengths and batch sizes."""
    gen = _load(args)
    rows = run_bench(gen, args.prompt_tokens, args.batch_sizes, args.new_tokens, args.repeats)
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
        "pair": {"base": args.base or str(DEMO_DIR / "base"), "memory": args.memory or str(DEMO_DIR / "memory"),
                 "memory_type": args.memory_type},
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
    except KeyboardInterrupt:
        return 130


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
