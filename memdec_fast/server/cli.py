"""``memdec-fast serve``: the OpenAI-compatible HTTP server over the continuous-batching engine.

    memdec-fast serve [--base B --memory M | --memory NAME=M ...] [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--max-queue 256]

Arguments are checked, and the port bound, before any model loads. SIGTERM or
Ctrl-C drains: new requests get 503, the requests in flight finish within
--drain-timeout (the rest are cancelled), and the process exits 0. A second
signal stops at once. FastAPI, uvicorn and torch are imported only when the
command runs, so ``memdec-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading

from memdec_fast.cli.args import KNN_TEMP_HELP, LMBDA_HELP, common_flags, memory_flags, resolve_device
from memdec_fast.server import MAX_BODY_BYTES

__all__ = ["cmd_serve", "register"]


def register(subparsers) -> None:
    """Add ``serve`` to the ``memdec-fast`` parser."""
    # each numeric flag gets its range from memdec_fast.ranges.FLAGS["serve"] when the parser is built
    p = subparsers.add_parser("serve", parents=[common_flags()], help="OpenAI-compatible HTTP server (/v1/completions)",
                              description="Serve the pair over HTTP with OpenAI's completions API. "
                                          "Needs the serve extra: pip install 'memdec_fast[serve]'.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    p.add_argument("--served-model-name", type=_name, default="memdec-fast",
                   help="the `model` clients send; with --memory NAME=PATH, the base alone, and "
                        "'<served-model-name>:NAME' picks a memory")
    p.add_argument("--lmbda", type=float, help=LMBDA_HELP + "; a request may send its own")
    p.add_argument("--knn-temp", type=float, help=KNN_TEMP_HELP)
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a batch slot before new ones get 429")
    p.add_argument("--prefill-chunk", type=int,
                   help="prompt tokens prefilled per engine step, summed over requests: the most one step delays "
                        "the running streams for new prompts (default: the engine's, 512)")
    p.add_argument("--prefill-steps", type=float,
                   help="while requests decode, prefill only about as many prompt tokens per step as cost this many "
                        "decode steps (measured as the engine runs): a tighter p99 time between tokens, at a cost in "
                        "tokens/s and time to first token on a CPU (default: off, up to --prefill-chunk)")
    p.add_argument("--max-context", type=int,
                   help="positions per request and cache slot (default: the models' context); caps the caches, "
                        "which hold max-batch x max-context positions per model")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="the largest request body; larger ones get 413 before they are read")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds the requests in flight get to finish after SIGTERM")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="the HTTP server's (uvicorn's) log level (default: info)")
    p.set_defaults(func=cmd_serve)


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: {err.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot bind ({err.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM or Ctrl-C; returns 0 after a drain, 1 if the server failed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as err:
        raise ValueError(f"serve needs {err.name}: pip install 'memdec_fast[serve]'") from None

    base, memory = memory_flags(args)
    device = resolve_device(args.device)
    sock = _bind(args.host, args.port)
    try:
        engine = _load_engine(args, base, memory, device)
    except BaseException:
        sock.close()
        raise

    from memdec_fast.server.app import build_app

    app = build_app(engine, args.served_model_name, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="off", timeout_graceful_shutdown=args.drain_timeout + 5)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as err:  # noqa: BLE001 (reported below; SystemExit from a failed startup included)
            failure.append(err)

    engine.start()
    closer: threading.Thread | None = None
    signals = 0

    def close_then_exit(timeout: float) -> None:
        engine.close(timeout=timeout)
        server.should_exit = True  # only now: until the engine is done, new connections get the documented 503

    def drain(signum: int, _frame) -> None:
        nonlocal closer, signals
        signals += 1
        name = signal.Signals(signum).name
        if signals == 1:
            print(f"memdec-fast serve: {name}, draining (up to {args.drain_timeout:g} s)", file=sys.stderr, flush=True)
            app.state.draining = True
            # the engine finishes the running and waiting requests within the deadline and fails the rest, while
            # the server keeps answering: the streams end with [DONE], new requests get 503
            closer = threading.Thread(target=close_then_exit, args=(args.drain_timeout,), daemon=True)
            closer.start()
        elif signals == 2:
            print(f"memdec-fast serve: {name} again, stopping now: open requests get an error", file=sys.stderr,
                  flush=True)
            threading.Thread(target=close_then_exit, args=(0,), daemon=True).start()
        else:
            server.force_exit = True

    old = {s: signal.signal(s, drain) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=run, name="uvicorn")
    thread.start()
    try:
        announced = False
        while thread.is_alive():
            thread.join(0.1)
            if server.started and not announced:
                announced = True
                _announce(args, sock)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if closer is None:
            engine.close(timeout=0)
        else:
            closer.join(args.drain_timeout + 10)
        sock.close()
    if failure and not (isinstance(failure[0], SystemExit) and failure[0].code in (0, None)):
        print(f"memdec-fast serve: error: the HTTP server failed: {failure[0]!r}", file=sys.stderr)
        return 1
    return 0


def _load_engine(args: argparse.Namespace, base: str, memory: str | dict[str, str], device):
    """One memory (a path), or several over one base ({name: path}: each its own model id)."""
    import torch

    from memdec_fast.engine import Engine

    dtype = getattr(torch, args.dtype) if args.dtype else None
    extra = {k: v for k, v in (("prefill_chunk", args.prefill_chunk), ("prefill_steps", args.prefill_steps),
                               ("max_context", args.max_context)) if v is not None}
    memories = {"memories": memory} if isinstance(memory, dict) else {"memory": memory}
    return Engine.from_pretrained(base, **memories, memory_type=args.memory_type, lmbda=args.lmbda,
                                  knn_temp=args.knn_temp, device=device, dtype=dtype, max_batch=args.max_batch,
                                  max_queue=args.max_queue, **extra)


def _announce(args: argparse.Namespace, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}/v1"
    if args.json:
        print(json.dumps({"url": url, "host": host, "port": port, "model": args.served_model_name}), flush=True)
    else:
        print(f"memdec-fast serve: serving {args.served_model_name!r} at {url}", file=sys.stderr, flush=True)
