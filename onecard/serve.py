"""`onecard serve RUN_DIR`: the model behind an OpenAI-compatible API and a web chat page.

FastAPI and uvicorn are an optional extra (`pip install -e '.[serve]'`). The server binds to
127.0.0.1 unless told otherwise, answers at once (503 while the weights load in the background),
and decodes up to --max-concurrent requests at a time; more wait in a queue (429 when it is full).
The app itself is onecard/server.py; this module turns flags into its settings.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit

from onecard.args import ONE_DECODE_STEP, add_threads_argument, gigabytes, non_negative_int, positive_int, text_arg
from onecard.errors import UsageError

KINDS = ("auto", "chat", "base")


def port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def origin(text: str) -> str:
    """A web origin as browsers send it: scheme://host[:port], no path; or '*'."""
    parts = urlsplit(text)
    if text != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc
                        or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise argparse.ArgumentTypeError(f"expected an origin such as http://localhost:3000 (no path), or '*'; "
                                         f"got {text!r}")
    return text.rstrip("/")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=text_arg, help="an onecard run (SFT or base) or a nanochat checkpoint directory")
    p.add_argument("--host", type=text_arg, default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                        "network, with --api-key)")
    p.add_argument("--port", type=port, default=8000, help="default 8000; 0 picks a free port")
    p.add_argument("--api-key", type=text_arg, default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $ONECARD_API_KEY, else none)")
    p.add_argument("--allow-origin", type=origin, action="append", default=[], metavar="ORIGIN",
                   help="a web page elsewhere that may use the API, e.g. http://localhost:3000 (repeatable; '*' for "
                        "any). The server's own page and programs need none; other pages get 403")
    p.add_argument("--max-concurrent", type=positive_int, default=4,
                   help="requests decoded at the same time (default 4)")
    p.add_argument("--max-queued", type=positive_int, default=64,
                   help="requests that may wait for a turn; more get 429 (default 64)")
    p.add_argument("--cache-memory", type=gigabytes, metavar="GIB",
                   help="memory for the KV caches of the requests decoded at once, e.g. 6GiB: a request waits until "
                        "its cache fits, and one that needs more than all of it gets 400 (default: on a card, what "
                        "is free once the weights are loaded; on a CPU, no limit)")
    p.add_argument("--name", type=text_arg, help="the model's id in the API (default: the directory's name)")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help="chat (both endpoints) or base (/v1/completions only); default: from the run")
    p.add_argument("--limit", action="append", metavar="NAME=VALUE",
                   help="change a request limit, e.g. max_tokens=8192 (names: max_messages, max_message_chars, "
                        "max_total_chars, max_tokens, max_top_k, max_n, max_stops, max_body_bytes, "
                        "body_timeout_s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="cpu, cuda or auto (default)")
    p.add_argument("--tokenizer", type=text_arg, help="tokenizer.pkl or directory, for a nanochat checkpoint kept "
                                                      "elsewhere")
    add_threads_argument(p, 1, ONE_DECODE_STEP + ", and --max-concurrent requests already run side by side")
    p.add_argument("--log-level", choices=("warning", "info", "debug"), default="warning",
                   help="info also logs every request (default warning)")


def model_kind(path: Path, asked: str) -> str:
    """chat or base: what the directory says it holds (run.model_phase); chat when it does not say."""
    from onecard.run import model_phase

    if asked != "auto":
        return asked
    return "base" if model_phase(path) == "base" else "chat"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def announce(host: str, bound_port: int, api_key: str | None, path: Path) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(f"onecard serve: {path} at http://{shown}:{bound_port}/ (chat page) and "
          f"http://{shown}:{bound_port}/v1 (OpenAI API); loading the weights...", flush=True)
    if is_loopback(host):
        print("listening on this machine only (--host 0.0.0.0 to share it, with --api-key)", flush=True)
    elif api_key is None:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the "
              "model", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if find_spec("fastapi") is None or find_spec("uvicorn") is None:
        raise UsageError("onecard serve needs FastAPI and uvicorn: pip install -e '.[serve]'")
    from onecard.openai_api import Limits
    from onecard.server import Backend, bind, create_app, uvicorn_server

    path = Path(args.run_dir)
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory: give an onecard run or a nanochat checkpoint directory")
    try:
        limits = Limits().with_overrides(args.limit)
    except ValueError as error:
        raise UsageError(str(error)) from None
    kind = model_kind(path, args.kind)
    api_key = args.api_key or os.environ.get("ONECARD_API_KEY") or None
    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and " " not in api_key):
        raise UsageError("--api-key (or ONECARD_API_KEY): use printable ASCII characters without spaces, as an "
                         "HTTP Authorization header carries them")
    try:
        sock = bind(args.host, args.port)
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    cache_memory = None if args.cache_memory is None else int(args.cache_memory * 2**30)
    backend = Backend(args.name or path.resolve().name, workers=args.max_concurrent, max_queued=args.max_queued,
                      cache_memory=cache_memory)
    server = uvicorn_server(create_app(backend, limits, api_key, allow_origins=tuple(args.allow_origin)),
                            args.log_level)
    announce(args.host, sock.getsockname()[1], api_key, path)
    loader = threading.Thread(target=_load, args=(backend, server, path, kind, args), daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        backend.close()
        sock.close()
    if backend.status == "failed":
        raise UsageError(backend.error)
    return 0


def _load(backend, server, path: Path, kind: str, args: argparse.Namespace) -> None:
    """Load the weights while the server answers 503; stop the server if they cannot be loaded."""
    def loader():
        from onecard.device import resolve_device, use_threads
        from onecard.weights import load_weights

        device = resolve_device(args.device)
        # measured: the demo model decodes 441 tokens/s on 1 thread, 29 on 2 of a busy machine
        use_threads(args.threads, device)
        model, tokenizer, _ = load_weights(path, device, tokenizer_path=args.tokenizer)
        return model, tokenizer, kind
    backend.load(loader)
    if backend.status == "ready":
        memory = "" if backend.cache_memory is None else f", {backend.cache_memory / 2**30:.3g} GiB for their KV caches"
        print(f"ready: {backend.name} ({kind} model trained on {backend.trained_context:,} tokens of context, taking "
              f"up to {backend.context:,}; {args.max_concurrent} at a time{memory})", flush=True)
    else:
        server.should_exit = True
