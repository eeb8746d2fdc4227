"""Load test of `overfill serve` on loopback: N chat requests from C concurrent clients, then the
same requests one at a time, against one server.

    python -m benchmarks.serve_load --full smollm2-135m-instruct --requests 200 --concurrency 16 \
        --max-tokens 32 --out benchmarks/serve_load.json

The server runs as a subprocess (`python -m overfill.cli serve ...` on 127.0.0.1). Requests are
the first user turns of ShareGPT chats, sent with the official `openai` client, streaming with
usage, greedy (temperature 0), so both passes ask for exactly the same work and should get the
same text. The JSON records throughput (requests/s, completion tokens/s), latency and time to
first token percentiles, errors, the server's mean batch size, and how many outputs the
concurrent pass changed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench"


@dataclass
class Result:
    prompt: int
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None


def sharegpt_prompts(n: int, max_chars: int) -> list[str]:
    """The first user turns of the first `n` ShareGPT chats that open with one of at most `max_chars`."""
    from overfill.data import Conversation, iter_records

    prompts: list[str] = []
    for record in iter_records("sharegpt"):
        if isinstance(record, Conversation) and record.messages and record.messages[0]["role"] == "user":
            text = record.messages[0]["content"]
            if 16 <= len(text) <= max_chars:
                prompts.append(text)
                if len(prompts) == n:
                    return prompts
    raise SystemExit(f"only {len(prompts)} usable ShareGPT prompts, {n} asked")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int, log_file, full: str | None = None, extra: list[str] = ()) -> subprocess.Popen:
    """`overfill serve` of `full` (default args.full) and args.decoder, with `extra` flags; waits for /health."""
    command = [sys.executable, "-m", "overfill.cli", "serve", "--full", full or args.full, "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(args.max_batch), "--model-name", MODEL_NAME, *extra]
    if args.decoder:
        command += ["--decoder", args.decoder]
    env = {k: v for k, v in os.environ.items() if k != "OVERFILL_API_KEY"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}; see {log_file.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"the server did not answer within {args.startup_timeout}s; see {log_file.name}")


GREEDY = {"temperature": 0}
OPENAI_SAMPLING = ("temperature", "top_p", "seed")
"""Sampling fields of OpenAI's API; others (top_k) go in the body as extras."""


async def ask(client: openai.AsyncOpenAI, index: int, prompt: str, max_tokens: int,
              extra_body: dict | None = None, sampling: dict = GREEDY) -> Result:
    result, start = Result(index), time.perf_counter()
    given = {k: v for k, v in sampling.items() if k in OPENAI_SAMPLING}
    extra = {**(extra_body or {}), **{k: v for k, v in sampling.items() if k not in OPENAI_SAMPLING}}
    try:
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True}, extra_body=extra or None, **given)
        pieces = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                result.ttft_s = result.ttft_s or time.perf_counter() - start
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                result.prompt_tokens, result.completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
        result.text = "".join(pieces)
    except Exception as e:  # counted, never fatal: the point is to see whether any happen
        result.error = f"{type(e).__name__}: {e}"
    result.latency_s = time.perf_counter() - start
    return result


async def run_pass(base_url: str, prompts: list[str], concurrency: int, max_tokens: int,
                   extra_body: dict | None = None, samplings: list[dict] | None = None) -> tuple[list[Result], float]:
    """All prompts through `concurrency` clients working off one queue; the results in prompt order.
    Each request is greedy, or samples with `samplings[i]` (fields as the API takes them)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=600,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=concurrency)))
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        todo.put_nowait(i)
    results: list[Result] = []

    async def worker():
        while not todo.empty():
            i = todo.get_nowait()
            results.append(await ask(client, i, prompts[i], max_tokens, extra_body,
                                     samplings[i] if samplings else GREEDY))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return sorted(results, key=lambda r: r.prompt), wall


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def percentiles(values: list[float]) -> dict:
    return {f"p{q}": round(percentile(values, q), 3) if values else None for q in (10, 50, 95, 99)}


def summary(results: list[Result], wall: float, concurrency: int, server_stats: dict) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    latencies, ttfts = [r.latency_s for r in ok], [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3),
        "completion_tokens": tokens, "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "completion_tokens_per_s": round(tokens / wall, 2),
        "latency_s": {"mean": round(statistics.fmean(latencies), 3) if latencies else None,
                      **percentiles(latencies)},
        "ttft_s": percentiles(ttfts),
        "server_mean_batch": None if server_stats["mean_batch"] is None else round(server_stats["mean_batch"], 2),
        "server_decode_steps": server_stats["steps"],
    }


def pass_stats(base: str, before: dict) -> dict:
    """The server's counters over one pass."""
    now = httpx.get(base + "/health", timeout=30).json()
    steps, row_steps = now["steps"] - before["steps"], now["row_steps"] - before["row_steps"]
    return {"steps": steps, "mean_batch": row_steps / max(steps, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", default="smollm2-135m-instruct")
    parser.add_argument("--decoder", default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-chars", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the server (0: torch's default); the client uses another core")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--server-flags", default="", help="more `overfill serve` flags, e.g. '--no-compile'")
    parser.add_argument("--out", default="benchmarks/serve_load.json")
    args = parser.parse_args(argv)

    prompts = sharegpt_prompts(args.requests, args.max_prompt_chars)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w", prefix="serve_load_", suffix=".log", delete=False) as log_file:
        print(f"server log: {log_file.name}", flush=True)
        server = start_server(args, port, log_file, extra=shlex.split(args.server_flags))
        try:
            asyncio.run(run_pass(base + "/v1", prompts[:2], 1, args.max_tokens))  # warm-up
            passes = {}
            for name, concurrency in (("concurrent", args.concurrency), ("sequential", 1)):
                before = httpx.get(base + "/health", timeout=30).json()
                results, wall = asyncio.run(run_pass(base + "/v1", prompts, concurrency, args.max_tokens))
                stats = pass_stats(base, before)
                passes[name] = (results, summary(results, wall, concurrency, stats))
                print(name, json.dumps(passes[name][1]), flush=True)
        finally:
            server.terminate()
            server.wait(60)
    Path(log_file.name).unlink()

    (concurrent, c), (sequential, s) = passes["concurrent"], passes["sequential"]
    same = sum(a.text == b.text for a, b in zip(concurrent, sequential) if a.error is None and b.error is None)
    report = {
        "command": "python -m benchmarks.serve_load " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "server": {"full": args.full, "decoder": args.decoder, "max_batch": args.max_batch,
                   "torch_threads": args.threads or "default", "flags": args.server_flags},
        "workload": {"requests": args.requests, "source": "sharegpt first user turns",
                     "max_prompt_chars": args.max_prompt_chars, "max_tokens": args.max_tokens,
                     "temperature": 0, "stream": True},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "concurrent": c, "sequential": s,
        "speedup": {"requests_per_s": round(c["requests_per_s"] / s["requests_per_s"], 2),
                    "completion_tokens_per_s": round(c["completion_tokens_per_s"] / s["completion_tokens_per_s"], 2)},
        "identical_outputs": f"{same}/{args.requests}",
        "examples": [asdict(r) for r in concurrent[:3]],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("speedup", "identical_outputs")}))
    return 0 if c["errors"] == 0 and s["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
