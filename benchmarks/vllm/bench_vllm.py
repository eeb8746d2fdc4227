"""OverFill through vLLM's OpenAI server, against the full model on vLLM and against `overfill serve`.

    python -m benchmarks.vllm.bench_vllm --decoder runs/quality/train-overfill/snapshots/tokens-1000000 \
        --dtype bfloat16 float32 --concurrency 1 8 32 --out benchmarks/vllm/results/cpu.json

Per dtype, three servers run at once on loopback (vLLM on the full model; vLLM on the pair that
`overfill export` writes; `overfill serve` on the pair); for each concurrency, the same greedy
chat requests (ShareGPT first turns, `ignore_eos` so that every system generates exactly
--max-tokens tokens) go to each server in turn, one server at a time, so machine noise hits all
alike. `server_mean_batch` is rows per decode step for `overfill serve` and tokens per engine
step (prefill chunks included) for vLLM. Each server gets --threads torch threads; the client
runs beside them. vLLM runs from its own environment (`scripts/test_vllm.sh` makes `.venv-vllm`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-chars", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--out", default="benchmarks/vllm/results/cpu.json")
    args = parser.parse_args(argv)

    from overfill.export import export_vllm
    from overfill.hub import resolve

    full_dir = str(resolve(args.full))
    work = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    exported = str(export_vllm(args.decoder, str(work / "pair"), args.full))
    prompts = sharegpt_prompts(max(args.requests, max(args.concurrency)), args.max_prompt_chars)
    results: dict = {"machine": describe_machine(__import__("torch").device("cpu")), "threads": args.threads,
                     "max_tokens": args.max_tokens, "requests": len(prompts), "full": args.full,
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
                for name, (_, base, _) in servers.items():
                    before = server_counters(name, base)
                    out, wall = asyncio.run(run_pass(base + "/v1", prompts, concurrency, args.max_tokens,
                                                     extra_body={"ignore_eos": True}))
                    row = {"dtype": dtype, "system": name,
                           **summary(out, wall, concurrency, counters_delta(server_counters(name, base), before))}
                    results["runs"].append(row)
                    print(f"[{dtype}] c={concurrency} {name}: {row['completion_tokens_per_s']} tok/s, "
                          f"errors {row['errors']}", flush=True)
        finally:
            stop(servers)
    results["ratios"] = ratios(results["runs"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    Path(args.out).with_suffix(".md").write_text(table(results))
    print(table(results))
    return 0


def ratios(runs: list[dict]) -> list[dict]:
    """OverFill on vLLM over the full model on vLLM, and over `overfill serve`, per dtype and concurrency."""
    by = {(r["dtype"], r["concurrency"], r["system"]): r["completion_tokens_per_s"] for r in runs}
    out = []
    for dtype, concurrency, system in by:
        if system == "vllm-overfill":
            out.append({"dtype": dtype, "concurrency": concurrency,
                        "overfill_over_full_on_vllm": round(by[(dtype, concurrency, system)] /
                                                            by[(dtype, concurrency, "vllm-full")], 3),
                        "vllm_over_overfill_serve": round(by[(dtype, concurrency, system)] /
                                                          by[(dtype, concurrency, "overfill-serve")], 3)})
    return out


def table(results: dict) -> str:
    lines = ["| dtype | clients | system | output tok/s | TTFT p50 s | latency p50 s | errors |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['dtype']} | {r['concurrency']} | {r['system']} | {r['completion_tokens_per_s']} | "
                     f"{r['ttft_s']['p50']} | {r['latency_s']['p50']} | {r['errors']} |")
    lines += ["", "| dtype | clients | OverFill / full (both on vLLM) | vLLM OverFill / overfill serve |",
              "|---|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['concurrency']} | {r['overfill_over_full_on_vllm']} | "
              f"{r['vllm_over_overfill_serve']} |" for r in results["ratios"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
