"""The two reliability targets of `overfill serve` (issue #14), on loopback.

(a) A huge request holds nobody up: one client streams a greedy chat completion and the gaps
    between its text chunks are timed, alone and while another client sends large chat bodies
    back to back: 10 MB (over the body limit) and just under the limit (refused by the
    character bound). Target: every chunk less than 100 ms later than alone, i.e. the largest
    gap under load less than 100 ms above the largest gap alone. /health latency is timed too.
(b) Requests without `max_tokens` are batched: N concurrent greedy chat requests that leave
    it out. Target: a mean decode batch (from /health's counters) of 8 or more for N = 16.
(c) Mixed sampling under load (issue #30): 200 streamed chat requests from 32 clients, the
    samplings in turn (temperature left out as OpenAI clients do, greedy, temperature with top-p,
    top-k, seeded), every tenth prompt long enough to grow the KV cache. Target: 0 errors, and 0
    graphs compiled after the warm-up (/health's `compiles`); p50/p99 time to first token reported.

    python -m benchmarks.serve_reliability --out /tmp/serve_reliability.json          # tiny random model
    python -m benchmarks.serve_reliability --full smollm2-135m-instruct \\
        --out benchmarks/serve_reliability.json                                        # the real one
    python -m benchmarks.serve_reliability --full smollm2-135m-instruct --decoder /tmp/pruned45 \\
        --targets c --out benchmarks/serve_reliability_mixed_cpu.json                   # (c), real pair

The server runs as a subprocess (`python -m overfill.cli serve`), as in `serve_load.py`. The
tiny model is a random 2-layer Llama with SmolLM2's tokenizer and a 512-token window (as in
the tests): it never stops early, so a request without max_tokens runs to the window.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.serve_load import MODEL_NAME, free_port, pass_stats, run_pass, start_server, summary

TINY = "tiny"
TARGET_EXTRA_DELAY_S = 0.100
TARGET_MEAN_BATCH = 8


def tiny_model(out: Path, window: int) -> str:
    """A tiny random Llama with SmolLM2's tokenizer, saved to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from overfill.hub import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=window,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init gives near-uniform logits; widen them
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def chat_body(text: str, **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


# ---------------------------------------------------------------------------- (a)

def stream_gaps(base: str, max_tokens: int) -> list[float]:
    """Seconds between consecutive text chunks of one greedy stream (time to first token left out)."""
    body = chat_body("Write a long story about a lighthouse keeper.", max_tokens=max_tokens, stream=True)
    stamps = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content"' in line and '"role"' not in line:
                stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


class Background:
    """A thread doing `work` over and over until stopped; it records what each round returned."""

    def __init__(self, work):
        self.work, self.results, self._stop = work, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.results.append(self.work())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(600)


def timed_health(base: str) -> float:
    time.sleep(0.05)
    start = time.perf_counter()
    httpx.get(base + "/health", timeout=600).raise_for_status()
    return time.perf_counter() - start


def big_sender(base: str, body: bytes):
    def send() -> int:
        try:
            return httpx.post(base + "/v1/chat/completions", content=body, timeout=600,
                              headers={"content-type": "application/json"}).status_code
        except httpx.HTTPError as e:
            return f"{type(e).__name__}"
    return send


def loaded_stream(base: str, max_tokens: int, body: bytes | None) -> dict:
    """One stream's gaps and /health's latency, with `body` sent over and over meanwhile (None: alone)."""
    with Background(lambda: timed_health(base)) as health:
        if body is None:
            gaps, statuses = stream_gaps(base, max_tokens), []
        else:
            with Background(big_sender(base, body)) as sender:
                while not sender.results:  # the load is on before the stream starts
                    time.sleep(0.01)
                gaps = stream_gaps(base, max_tokens)
            statuses = sender.results
    return {"max_gap_s": max(gaps), "p50_gap_s": statistics.median(gaps), "chunks": len(gaps) + 1,
            "max_health_s": max(health.results), "big_requests": len(statuses),
            "big_statuses": sorted({str(s) for s in statuses})}


def target_a(base: str, args, max_body_bytes: int) -> dict:
    over = json.dumps(chat_body("word " * (10_000_000 // 5))).encode()  # 10 MB
    under = json.dumps(chat_body("w" * (max_body_bytes - 1000))).encode()
    loads = {"10MB": over, "under_the_limit": under}
    runs: dict[str, list[dict]] = {"alone": [], **{name: [] for name in loads}}
    for _ in range(args.rounds):  # interleaved, so that a change in the machine's load hits all alike
        runs["alone"].append(loaded_stream(base, args.stream_tokens, None))
        for name, body in loads.items():
            runs[name].append(loaded_stream(base, args.stream_tokens, body))
    alone = max(r["max_gap_s"] for r in runs["alone"])
    result = {"stream_tokens": args.stream_tokens, "rounds": args.rounds,
              "body_bytes": {name: len(body) for name, body in loads.items()}, "runs": runs,
              "max_gap_alone_s": round(alone, 4)}
    for name in loads:
        extra = max(r["max_gap_s"] for r in runs[name]) - alone
        result[f"max_extra_delay_{name}_s"] = round(extra, 4)
    result["max_extra_delay_s"] = max(result[f"max_extra_delay_{name}_s"] for name in loads)
    result["target_met"] = result["max_extra_delay_s"] < TARGET_EXTRA_DELAY_S
    return result


# ---------------------------------------------------------------------------- (b)

def target_b(base: str, args) -> dict:
    topics = ["the sea", "mountains", "bread", "trains", "bees", "rain", "chess", "glass", "maps", "owls",
              "salt", "bridges", "clocks", "tea", "ice", "paper"]
    prompts = [f"Tell me about {topics[i % len(topics)]}." for i in range(args.requests)]
    before = httpx.get(base + "/health", timeout=600).json()

    def ask(prompt: str) -> dict:
        response = httpx.post(base + "/v1/chat/completions", json=chat_body(prompt), timeout=3600)
        return response.json() if response.status_code == 200 else {"error": response.text[:200]}

    start = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:
        replies = list(pool.map(ask, prompts))
    wall = time.perf_counter() - start
    stats, after = pass_stats(base, before), httpx.get(base + "/health", timeout=600).json()
    ok = [r for r in replies if "error" not in r]
    return {"requests": args.requests, "errors": len(replies) - len(ok), "wall_s": round(wall, 2),
            "completion_tokens": sum(r["usage"]["completion_tokens"] for r in ok),
            "finish_reasons": sorted({r["choices"][0]["finish_reason"] for r in ok}),
            "decode_steps": stats["steps"], "mean_batch": round(stats["mean_batch"], 2),
            "peak_rows": after["peak_rows"], "target_met": stats["mean_batch"] >= TARGET_MEAN_BATCH}


# ---------------------------------------------------------------------------- (c)

MIXED_SAMPLINGS = {
    "temperature left out": {},
    "greedy": {"temperature": 0},
    "temperature and top-p": {"temperature": 0.8, "top_p": 0.9},
    "top-k": {"top_k": 20},
    "seeded": {"seed": 7},
}
LONG_EVERY = 10


def mixed_requests(n: int) -> tuple[list[str], list[str]]:
    """n prompts and the name of each one's sampling (in turn); every LONG_EVERY-th prompt is some
    300 tokens, so that the cache grows past its first 256 slots."""
    topics = ["the sea", "mountains", "bread", "trains", "bees", "rain", "chess", "glass", "maps", "owls"]
    names = list(MIXED_SAMPLINGS)
    prompts = [f"Tell me about {topics[i % len(topics)]}." if i % LONG_EVERY else
               "Summarize this: " + " ".join(f"{topics[j % len(topics)]} and" for j in range(100))
               for i in range(n)]
    return prompts, [names[i % len(names)] for i in range(n)]


def target_c(base: str, args) -> dict:
    prompts, kinds = mixed_requests(args.mixed_requests)
    before = httpx.get(base + "/health", timeout=600).json()
    results, wall = asyncio.run(run_pass(base + "/v1", prompts, args.clients, args.mixed_max_tokens,
                                         samplings=[MIXED_SAMPLINGS[k] for k in kinds]))
    after = httpx.get(base + "/health", timeout=600).json()
    result = {"clients": args.clients, "max_tokens": args.mixed_max_tokens, "samplings": MIXED_SAMPLINGS,
              **summary(results, wall, args.clients, pass_stats(base, before)),
              "errors_by_sampling": {k: sum(1 for r, kind in zip(results, kinds) if kind == k and r.error)
                                     for k in MIXED_SAMPLINGS},
              "server_failed": after["failed"] - before["failed"],
              "compiles_after_warm_up": after["compiles"], "peak_rows": after["peak_rows"]}
    result["target_met"] = result["errors"] == 0 and result["compiles_after_warm_up"] == 0
    return result


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", default=TINY, help=f"model reference, or '{TINY}' for a tiny random model")
    parser.add_argument("--decoder", default=None)
    parser.add_argument("--tiny-window", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-body-bytes", type=int, default=None, help="the server's limit (default: its own)")
    parser.add_argument("--stream-tokens", type=int, default=64, help="(a): max_tokens of the timed stream")
    parser.add_argument("--rounds", type=int, default=2, help="(a): alone / loaded rounds, interleaved")
    parser.add_argument("--requests", type=int, default=16, help="(b): concurrent requests without max_tokens")
    parser.add_argument("--mixed-requests", type=int, default=200, help="(c): requests with mixed sampling")
    parser.add_argument("--clients", type=int, default=32, help="(c): concurrent clients")
    parser.add_argument("--mixed-max-tokens", type=int, default=32, help="(c): max_tokens of each request")
    parser.add_argument("--targets", default="a,b,c", help="which of a, b, c to run (comma-separated)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (0: torch's default)")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--out", default="/tmp/serve_reliability.json")
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    if not targets or set(targets) - {"a", "b", "c"}:
        parser.error(f"--targets takes a comma-separated subset of a, b, c, got '{args.targets}'")

    from overfill.device import cpu_model
    from overfill.serve import DEFAULT_MAX_BODY_BYTES

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load_at_start, results = os.getloadavg(), {}
    with tempfile.TemporaryDirectory(prefix="serve_reliability_") as workdir, tempfile.NamedTemporaryFile(
            "w", prefix="serve_reliability_", suffix=".log", delete=False) as log_file:
        print(f"server log: {log_file.name}", flush=True)
        full = tiny_model(Path(workdir), args.tiny_window) if args.full == TINY else args.full
        extra = ["--max-body-bytes", str(args.max_body_bytes)] if args.max_body_bytes else []
        start = time.perf_counter()
        server = start_server(args, port, log_file, full=full, extra=extra)
        startup_s = time.perf_counter() - start
        try:
            stream_gaps(base, 4)  # warm-up
            runs = {"a": lambda: target_a(base, args, args.max_body_bytes or DEFAULT_MAX_BODY_BYTES),
                    "b": lambda: target_b(base, args), "c": lambda: target_c(base, args)}
            for name in targets:
                results[name] = runs[name]()
                print(f"({name})", json.dumps({k: v for k, v in results[name].items() if k != "runs"}), flush=True)
        finally:
            server.terminate()
            server.wait(60)
    Path(log_file.name).unlink()
    titles = {"a": "a_huge_request_does_not_delay_a_stream", "b": "b_requests_without_max_tokens_are_batched",
              "c": "c_mixed_sampling_under_load"}
    report = {
        "command": "python -m benchmarks.serve_reliability " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        "server": {"full": args.full, "decoder": args.decoder, "max_batch": args.max_batch,
                   "max_body_bytes": args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                   "torch_threads": args.threads or "default", "startup_s": round(startup_s, 1),
                   **({"tiny_window": args.tiny_window} if args.full == TINY else {})},
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_average": load_at_start,
                    "load_average_at_end": os.getloadavg()},
        **{titles[name]: result for name, result in results.items()},
        "targets_met": {name: result["target_met"] for name, result in results.items()},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets_met"]))
    met = all(report["targets_met"].values()) and results.get("b", {}).get("errors", 0) == 0
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
