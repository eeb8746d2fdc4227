"""OverFill through vLLM's OpenAI server, against the full model on vLLM and against `overfill serve`.

    python -m benchmarks.vllm.bench_vllm --decoder runs/quality/train-overfill/snapshots/tokens-1000000 \
        --dtype bfloat16 float32 --concurrency 1 8 32 --out benchmarks/vllm/results/cpu.json

Per dtype, three servers run at once on loopback (vLLM on the full model; vLLM on the pair that
`overfill export` writes; `overfill serve` on the pair); for each concurrency, the same greedy
chat requests (ShareGPT first turns, `ignore_eos` so that every system generates exactly
--max-tokens tokens) go to each server in turn, one server at a time, for --rounds rounds, so
machine noise hits all alike; the ratios are taken per round (median, min, max over rounds).
`server_mean_batch` is rows per decode step for `overfill serve` and tokens per engine step
(prefill chunks included) for vLLM. Each server gets --threads torch threads; the client
runs beside them. vLLM runs from its own environment (`scripts/test_vllm.sh` makes `.venv-vllm`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve_load import MODEL_NAME, free_port, run_pass, sharegpt_prompts, summary
from overfill.device import describe_machine

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("vllm-full", "vllm-overfill", "overfill-serve")


def vllm_command(python: str, model: str, port: int, dtype: str, max_seqs: int) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", MODEL_NAME,
            "--port", str(port), "--host", "127.0.0.1", "--dtype", dtype, "--max-model-len", "2048",
            "--max-num-seqs", str(max_seqs)]


def overfill_command(full: str, decoder: str, port: int, dtype: str, max_seqs: int) -> list[str]:
    precision = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    return [sys.executable, "-m", "overfill.cli", "serve", "--full", full, "--decoder", decoder, "--host", "127.0.0.1",
            "--port", str(port), "--max-batch", str(max_seqs), "--model-name", MODEL_NAME, "--precision", precision]


def wait_ready(base: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"a server exited with code {server.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"a server did not start within {timeout} s; see {log}")


def start(commands: dict[str, list[str]], threads: int, logs: Path, timeout: float) -> dict[str, tuple]:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    env.pop("OVERFILL_API_KEY", None)
    servers = {}
    for name, command in commands.items():
        port = int(command[command.index("--port") + 1])
        log = logs / f"{name}.log"
        servers[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT),
                         f"http://127.0.0.1:{port}", log)
    try:
        for process, base, log in servers.values():
            wait_ready(base, process, log, timeout)
    except BaseException:
        stop(servers)
        raise
    return servers


def stop(servers: dict[str, tuple]) -> None:
    for process, _, _ in servers.values():
        process.terminate()
    for process, _, _ in servers.values():
        process.wait(60)


def server_counters(system: str, base: str) -> dict:
    """Engine steps and the rows they decoded so far: `overfill serve`'s /health, or vLLM's
    Prometheus histogram of tokens per engine step (prefill tokens included)."""
    if system == "overfill-serve":
        health = httpx.get(base + "/health", timeout=30).json()
        return {"steps": health["steps"], "rows": health["row_steps"]}
    counters = {"steps": 0.0, "rows": 0.0}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name == "vllm:iteration_tokens_total_count":
            counters["steps"] += float(line.rsplit(" ", 1)[1])
        elif name == "vllm:iteration_tokens_total_sum":
            counters["rows"] += float(line.rsplit(" ", 1)[1])
    return counters


def counters_delta(now: dict, before: dict) -> dict:
    steps = now["steps"] - before["steps"]
    return {"steps": steps, "mean_batch": (now["rows"] - before["rows"]) / steps if steps else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", default="smollm2-135m-instruct")
    parser.add_argument("--decoder", required=True, help="an OverFill directory")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per pass (at least the concurrency)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes per concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-chars", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--out", default="benchmarks/vllm/results/cpu.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.concurrency) < 1:
        parser.error("--rounds and --concurrency values must be >= 1")

    from overfill.export import export_vllm
    from overfill.hub import resolve

    full_dir = str(resolve(args.full))
    work = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    exported = str(export_vllm(args.decoder, str(work / "pair"), args.full))
    prompts = sharegpt_prompts(max(args.requests, max(args.concurrency)), args.max_prompt_chars)
    results: dict = {"machine": describe_machine(__import__("torch").device("cpu")), "threads": args.threads,
                     "max_tokens": args.max_tokens, "requests": len(prompts), "rounds": args.rounds, "full": args.full,
                     "decoder": args.decoder, "command": " ".join(sys.argv), "runs": []}
    max_seqs = max(args.concurrency)
    for dtype in args.dtype:
        commands = {"vllm-full": vllm_command(args.vllm_python, full_dir, free_port(), dtype, max_seqs),
                    "vllm-overfill": vllm_command(args.vllm_python, exported, free_port(), dtype, max_seqs),
                    "overfill-serve": overfill_command(args.full, args.decoder, free_port(), dtype, max_seqs)}
        print(f"[{dtype}] starting {', '.join(commands)} (logs in {work})", flush=True)
        servers = start(commands, args.threads, work, args.startup_timeout)
        try:
            for _, base, _ in servers.values():  # warm-up
                asyncio.run(run_pass(base + "/v1", prompts[:2], 1, 8))
            for concurrency in args.concurrency:
                for round_ in range(args.rounds):
                    for name, (_, base, _) in servers.items():
                        before = server_counters(name, base)
                        out, wall = asyncio.run(run_pass(base + "/v1", prompts, concurrency, args.max_tokens,
                                                         extra_body={"ignore_eos": True}))
                        row = {"dtype": dtype, "system": name, "round": round_,
                               **summary(out, wall, concurrency, counters_delta(server_counters(name, base), before))}
                        results["runs"].append(row)
                        save(results, Path(args.out))  # after every pass: a stopped run keeps what it measured
                        print(f"[{dtype}] c={concurrency} round {round_} {name}: "
                              f"{row['completion_tokens_per_s']} tok/s, errors {row['errors']}", flush=True)
        finally:
            stop(servers)
    print(table(save(results, Path(args.out))))
    return 0


def save(results: dict, out: Path) -> dict:
    """The results so far, with their ratios, as JSON and a markdown table beside it."""
    results["ratios"] = ratios(results["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table(results))
    return results


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def ratios(runs: list[dict]) -> list[dict]:
    """OverFill on vLLM over the full model on vLLM, and over `overfill serve`, per dtype and
    concurrency, taken round by round (each round times the three servers back to back)."""
    rate = {(r["dtype"], r["concurrency"], r.get("round", 0), r["system"]): r["completion_tokens_per_s"] for r in runs}
    cases = sorted({key[:2] for key in rate})
    out = []
    for dtype, concurrency in cases:
        rounds = sorted(n for n in {key[2] for key in rate if key[:2] == (dtype, concurrency)}
                        if all((dtype, concurrency, n, system) in rate for system in SYSTEMS))  # complete rounds
        if not rounds:
            continue
        over = {other: [rate[(dtype, concurrency, n, "vllm-overfill")] / rate[(dtype, concurrency, n, other)]
                        for n in rounds] for other in ("vllm-full", "overfill-serve")}
        out.append({"dtype": dtype, "concurrency": concurrency, "rounds": len(rounds),
                    "overfill_over_full_on_vllm": _spread(over["vllm-full"]),
                    "vllm_over_overfill_serve": _spread(over["overfill-serve"])})
    return out


def medians(runs: list[dict]) -> list[dict]:
    """Per dtype, concurrency and system: the median over rounds of tok/s, TTFT p50 and latency p50."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dtype"], r["concurrency"], r["system"]), []).append(r)
    return [{"dtype": d, "concurrency": c, "system": s,
             "completion_tokens_per_s": round(statistics.median(r["completion_tokens_per_s"] for r in group), 2),
             "ttft_p50_s": round(statistics.median(r["ttft_s"]["p50"] for r in group), 3),
             "latency_p50_s": round(statistics.median(r["latency_s"]["p50"] for r in group), 3),
             "errors": sum(r["errors"] for r in group)} for (d, c, s), group in groups.items()]


def table(results: dict) -> str:
    lines = ["| dtype | clients | system | output tok/s | TTFT p50 s | latency p50 s | errors |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in medians(results["runs"]):
        lines.append(f"| {r['dtype']} | {r['concurrency']} | {r['system']} | {r['completion_tokens_per_s']} | "
                     f"{r['ttft_p50_s']} | {r['latency_p50_s']} | {r['errors']} |")
    lines += ["", "Ratios per round, median (min-max):", "",
              "| dtype | clients | rounds | OverFill / full (both on vLLM) | vLLM OverFill / overfill serve |",
              "|---|---:|---:|---:|---:|"]
    for r in results["ratios"]:
        a, b = r["overfill_over_full_on_vllm"], r["vllm_over_overfill_serve"]
        lines.append(f"| {r['dtype']} | {r['concurrency']} | {r['rounds']} | {a['median']} ({a['min']}-{a['max']}) | "
                     f"{b['median']} ({b['min']}-{b['max']}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
