"""Load on `onecard serve`: concurrent streaming clients, then a storm of malformed requests.

    python benchmarks/serve_load.py RUN_DIR [--clients 32] [--seconds 60] [--max-concurrent 4]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 ...   # a server that already runs

1. Load: `--clients` clients each send streaming chat requests one after another for `--seconds`
   (those in flight at the end finish). A request fails unless it answers 200 and its stream
   ends with `data: [DONE]`. Recorded: requests, failures, time to first token (the first event
   after the role chunk: text or the end) at p50/p95, latency, and completion tokens per second
   over the phase, all clients together.
2. Storm: bad JSON, bodies over the limit, wrong types, a deep nesting, slow clients that send
   half a body and wait, for `--storm-seconds`, while /health is polled; then a normal request.
   Recorded: the statuses each kind got, /health's answers and slowest reply, and whether the
   server still answers.

Writes benchmarks/results/serve_load_<date>.json with the command, machine, date and commit. The
clients run on the same machine as the server, so they share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this is loaded
from common import commit  # noqa: E402

HERE = Path(__file__).resolve().parent
QUESTIONS = ["What does `json.dumps` do?", "What is 123 * 45?", "What does `os.path.join` do?",
             "What is 17 + 25?", "What does `re.compile` do?", "What does `str.split` do?",
             "What is 9 * 9?", "What does `collections.Counter` do?"]


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


# ---------------------------------------------------------------- the server

def start_server(run_dir: str, max_concurrent: int, max_queued: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`onecard serve` on a free port; its output goes to a file (a pipe nobody reads would fill up and
    stall the server when it logs)."""
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "onecard.cli", "serve", run_dir, "--port", "0",
                                    "--max-concurrent", str(max_concurrent), "--max-queued", str(max_queued)],
                                   stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while not (found := re.search(r"(http://[^ ]+?)/ \(chat page\)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"onecard serve did not start: {log.read_text()}")
        time.sleep(0.2)
    url = found.group(1)
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"onecard serve stopped: {log.read_text()}")
        time.sleep(0.5)
    process.kill()
    raise SystemExit("onecard serve did not load its model within 180 s")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    return process.returncode


def rss_mib(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------- load

async def one_request(client: httpx.AsyncClient, url: str, number: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTIONS[number % len(QUESTIONS)]}], "stream": True,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    started, first, tokens, done = time.perf_counter(), None, 0, False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "why": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if first is None and (choice["delta"].get("content") or choice["finish_reason"]):
                        first = time.perf_counter() - started
    except (httpx.HTTPError, ValueError) as error:
        return {"ok": False, "why": f"{type(error).__name__}: {error}"}
    if not done:
        return {"ok": False, "why": "the stream ended without [DONE]"}
    return {"ok": True, "ttft": first, "latency": time.perf_counter() - started, "tokens": tokens}


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30), limits=limits) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def user(index: int) -> None:
            number = index
            while time.perf_counter() < deadline:
                results.append(await one_request(client, url, number, max_tokens))
                number += clients
        await asyncio.gather(*(user(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    good = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in good if r["ttft"] is not None]
    latency = [r["latency"] for r in good]
    tokens = sum(r["tokens"] for r in good)
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(results),
            "failed": len(results) - len(good),
            "failures": dict(Counter(r["why"] for r in results if not r["ok"]).most_common(5)),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "latency_p50_s": percentile(latency, 0.5), "latency_p95_s": percentile(latency, 0.95),
            "completion_tokens": tokens, "tokens_per_s": tokens / elapsed,
            "mean_tokens_per_reply": statistics.mean([r["tokens"] for r in good]) if good else None}


# ---------------------------------------------------------------- storm

async def slow_client(host: str, port: int, hold: float) -> str:
    """Promise a 1,000-byte body, send 10 bytes, and wait: the server must not wait with everything else."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"message")
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(200), hold)
            status = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
        except TimeoutError:
            status = "still waiting"
        writer.close()
        return status
    except OSError as error:
        return type(error).__name__


async def answer(client: httpx.AsyncClient, method: str, url: str, **kw) -> int | str:
    """The status, or what went wrong instead."""
    try:
        return (await client.request(method, url, **kw)).status_code
    except httpx.HTTPError as error:
        return type(error).__name__


async def storm(url: str, seconds: float) -> dict:
    host, port = url.split("//")[1].split(":")
    kinds = {
        "bad JSON": lambda i: b'{"messages": [' + str(i).encode(),
        "wrong types": lambda i: json.dumps({"messages": "hello", "temperature": "hot", "n": [i]}).encode(),
        "bad values": lambda i: json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -i,
                                            "top_k": 10_000}).encode(),
        "deep nesting": lambda i: b"[" * 50_000,
        "huge body": lambda i: b'{"x": "' + b"a" * 2_000_000 + b'"}',
    }
    statuses: dict[str, Counter] = {kind: Counter() for kind in kinds}
    health: list[tuple[int, float]] = []
    deadline = time.perf_counter() + seconds

    async with httpx.AsyncClient(timeout=30) as client:
        async def attacker(kind: str) -> None:
            i = 0
            while time.perf_counter() < deadline:
                try:
                    response = await client.post(url + "/v1/chat/completions", content=kinds[kind](i),
                                                 headers={"Content-Type": "application/json"})
                    statuses[kind][str(response.status_code)] += 1
                except httpx.HTTPError as error:
                    statuses[kind][type(error).__name__] += 1
                i += 1

        async def watch() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    code = (await client.get(url + "/health")).status_code
                except httpx.HTTPError:
                    code = 0
                health.append((code, time.perf_counter() - started))
                await asyncio.sleep(0.5)
        slow = [slow_client(host, int(port), seconds) for _ in range(20)]
        results = await asyncio.gather(*(attacker(k) for k in kinds for _ in range(2)), watch(), *slow)
        after, final = await answer(client, "POST", url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 16}), \
            await answer(client, "GET", url + "/health")
    return {"seconds": seconds, "statuses": {k: dict(v) for k, v in statuses.items()},
            "slow_clients": dict(Counter(r for r in results if isinstance(r, str))),
            "health_polls": len(health), "health_ok": sum(code == 200 for code, _ in health),
            "health_slowest_s": max((s for _, s in health), default=None),
            "request_after_storm": after, "health_after_storm": final}


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="the model to serve (an `onecard sft` run: the CPU demo model)")
    p.add_argument("--url", help="a server that already runs, instead of starting one")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--storm-seconds", type=float, default=15)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-concurrent", type=int, default=4)
    p.add_argument("--max-queued", type=int, default=64)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if not args.url and not args.run_dir:
        p.error("give RUN_DIR (a server is started for it) or --url")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    server_log = Path(tempfile.gettempdir()) / f"serve_load_server_{stamp}.log"
    process, url = (None, args.url) if args.url else start_server(args.run_dir, args.max_concurrent, args.max_queued,
                                                                   server_log)
    load_before = os.getloadavg()
    try:
        print(f"load: {args.clients} streaming clients for {args.seconds:g} s against {url}", flush=True)
        loaded = asyncio.run(load(url, args.clients, args.seconds, args.max_tokens))
        rss = rss_mib(process.pid if process else None)
        print(json.dumps(loaded, indent=1), flush=True)
        print(f"storm: {args.storm_seconds:g} s of malformed requests and slow clients", flush=True)
        stormed = asyncio.run(storm(url, args.storm_seconds))
        print(json.dumps(stormed, indent=1), flush=True)
    finally:
        exit_code = stop_server(process) if process else None
    record = {"command": "benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(), "commit": commit(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
                         "clients and server on the same machine",
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "server": {"url": url, "run_dir": args.run_dir, "max_concurrent": args.max_concurrent,
                         "max_queued": args.max_queued, "rss_mib_after_load": rss, "exit_code": exit_code,
                         "log_lines": len(server_log.read_text().splitlines()) if server_log.exists() else None},
              "load": loaded, "storm": stormed}
    path = args.out / f"serve_load_{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
