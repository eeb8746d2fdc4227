"""llama.cpp against our engine, the same models and shapes, round-robin in one process.

    python benchmarks/latency/peer_llamacpp.py --full DIR --decoder DIR --gguf-dir DIR [--out JSON]

Run it through peer_llamacpp.sh, which installs llama-cpp-python and writes the GGUFs
(`{full,decoder}-{f32,bf16}.gguf`, converted from --full and --decoder by llama.cpp's own
converter). Systems, for every prompt x output length:
  llama.cpp full / decoder, f32 and bf16   `Llama.eval` of the prompt, then one token per `eval`,
                                           greedy (argmax of the last logits), batch 1
  ours full / decoder / overfill, fp32 and bf16   `overfill bench`'s timing of our engine
                                           (`BatchDecoder`, compiled decode step; in bf16 where
                                           the CPU has AVX512-BF16, the layer stack of
                                           `engine/one_row.py`), batch 1 and --batch-size
  ours decoder / overfill bf16, inductor   there, the A/B: the same engine with the kernels off
                                           (`one_row.off()`), its step layer by layer as
                                           inductor compiles it
Each system is warmed up, then all are timed in turn, --repeats rounds, so that machine noise
hits them alike; ratios are per round (median, min, max). The floor of a step is
(weights + KV bytes it reads) / the bandwidth measured in the same run; both keep the KV cache
in the weights' dtype (llama.cpp's default would be f16).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from overfill.bench import (Contender, Suite, Timing, _ratio, _time_round_robin, floor_seconds, kv_bytes_per_token,
                            machine, measure_bandwidth, summarize, time_engine, weight_bytes_per_step)
from overfill.device import describe_machine
from overfill.engine import one_row
from overfill.model import load_model

PRECISIONS = {"f32": torch.float32, "bf16": torch.bfloat16}
OURS = {"f32": "fp32", "bf16": "bf16"}
KV_TYPES = {"f32": 0, "bf16": 30}  # ggml_type: GGML_TYPE_F32, GGML_TYPE_BF16; the KV cache in the weights' dtype


class LlamaCpp:
    """One GGUF in llama.cpp: greedy generation of exactly `output_len` tokens (no EOS stop)."""

    def __init__(self, path: Path, threads: int, n_ctx: int, kv_type: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, type_k=kv_type, type_v=kv_type, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        import llama_cpp

        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the last evaluated token's row
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                                   shape=(self.n_vocab,))))

    def run(self, prompts: list[list[int]], output_len: int) -> Timing:
        assert len(prompts) == 1, "llama.cpp is timed at batch 1"
        start = time.perf_counter()
        self.llm.reset()  # eval() then drops every cached position past n_tokens = 0
        self.llm.eval(prompts[0])
        tokens = [self._argmax()]
        marks = [time.perf_counter()]
        for _ in range(output_len - 1):
            self.llm.eval([tokens[-1]])
            tokens.append(self._argmax())
            marks.append(time.perf_counter())
        return Timing(marks[0] - start, np.diff(marks).tolist(), marks[-1] - start, [tokens])


def lineup(args, models: dict, batch: int, n_ctx: int) -> list[Contender]:
    out = []
    for precision in PRECISIONS:
        full, decoder = models[precision]
        suite = Suite(full, decoder, pad_id=0)
        if batch == 1:
            for name, model in (("full", full), ("decoder", decoder)):
                engine = LlamaCpp(Path(args.gguf_dir) / f"{name}-{precision}.gguf", args.threads, n_ctx,
                                  KV_TYPES[precision])
                out.append(Contender(f"llama.cpp {name} {precision}", name, "llama.cpp", 0, engine.run, model, model))
        for name in ("full", "decoder", "overfill"):
            two_stage = suite.system(name)
            run = lambda prompts, n, m=two_stage: time_engine(m, prompts, n, compile=True)  # noqa: E731
            out.append(Contender(f"ours {name} {OURS[precision]}", name, "ours (compiled)", 0, run,
                                 two_stage.decoder, two_stage.full))
            if precision == "bf16" and name != "full" and one_row.enabled():  # the A/B of the bf16 kernels
                out.append(Contender(f"ours {name} bf16, inductor", name, "ours (compiled, kernels off)", 0,
                                     without_one_row_kernel(run), two_stage.decoder, two_stage.full))
    return out


def without_one_row_kernel(run):
    def timed(prompts, n):
        with one_row.off():
            return run(prompts, n)
    return timed


RATIOS = {  # name: (slow, fast, key); > 1 means `fast` is faster
    "llama.cpp full bf16 / ours overfill bf16, e2e": ("llama.cpp full bf16", "ours overfill bf16", "e2e_s"),
    "llama.cpp full f32 / ours overfill fp32, e2e": ("llama.cpp full f32", "ours overfill fp32", "e2e_s"),
    "llama.cpp decoder bf16 / ours decoder bf16, tpot": ("llama.cpp decoder bf16", "ours decoder bf16", "tpot_s"),
    "llama.cpp decoder f32 / ours decoder fp32, tpot": ("llama.cpp decoder f32", "ours decoder fp32", "tpot_s"),
    "llama.cpp full bf16 / ours full bf16, tpot": ("llama.cpp full bf16", "ours full bf16", "tpot_s"),
    "ours decoder bf16, inductor / ours decoder bf16, tpot": ("ours decoder bf16, inductor", "ours decoder bf16",
                                                              "tpot_s"),
    "ours overfill bf16, inductor / ours overfill bf16, e2e": ("ours overfill bf16, inductor", "ours overfill bf16",
                                                               "e2e_s"),
    "ours full bf16 / ours overfill bf16, e2e": ("ours full bf16", "ours overfill bf16", "e2e_s"),
    "ours overfill fp32 / ours overfill bf16, e2e": ("ours overfill fp32", "ours overfill bf16", "e2e_s"),
}


def table(result: dict) -> str:
    lines = []
    for cfg in result["configs"]:
        lines += [f"### prompt {cfg['prompt_len']}, output {cfg['output_len']}, batch {cfg['batch_size']}", "",
                  "| system | TTFT ms | TPOT ms median | end-to-end s | tokens/s | floor ms | of floor |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label, r in cfg["runs"].items():
            lines.append(f"| {label} | {r['ttft_s'] * 1e3:.1f} | {r['tpot_s'] * 1e3:.2f} | {r['e2e_s']:.3f} | "
                         f"{r['tokens_per_s']:.1f} | {r['floor_s'] * 1e3:.2f} | {r['floor_fraction']:.0%} |")
        if cfg["ratios"]:
            lines += ["", "| ratio (per round) | median | min | max |", "|---|---:|---:|---:|"]
            lines += [f"| {k} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} |" for k, v in cfg["ratios"].items()]
        if cfg.get("agreement"):
            lines += ["", "greedy tokens equal to llama.cpp f32 (same prompt): " +
                      ", ".join(f"{k} {v:.0%}" for k, v in cfg["agreement"].items())]
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    singles = [c for c in result["configs"] if c["batch_size"] == 1]
    fig, axes = plt.subplots(1, len(singles), figsize=(4.5 * len(singles), 4.5), squeeze=False)
    for ax, cfg in zip(axes[0], singles):
        labels = list(cfg["runs"])
        ax.barh(labels, [cfg["runs"][k]["tokens_per_s"] for k in labels],
                color=["tab:gray" if k.startswith("llama.cpp") else "tab:blue" for k in labels])
        ax.set_title(f"prompt {cfg['prompt_len']}, output {cfg['output_len']}")
        ax.set_xlabel("end-to-end tokens/s (batch 1)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def agreement(timings: dict, n: int = 32) -> dict:
    """Share of the first `n` greedy tokens equal to llama.cpp f32's, per system of the same model."""
    out = {}
    for ref, names in (("llama.cpp full f32", ("llama.cpp full bf16", "ours full fp32", "ours full bf16")),
                       ("llama.cpp decoder f32", ("llama.cpp decoder bf16", "ours decoder fp32", "ours decoder bf16"))):
        if ref not in timings:
            continue
        want = timings[ref][0].tokens[0][:n]
        for name in names:
            got = timings[name][0].tokens[0][:n]
            out[name] = sum(a == b for a, b in zip(want, got)) / len(want)
    return out


def save(result: dict, floor_models: list[dict], out: Path) -> None:
    """The results so far as JSON and markdown, each step's floor at the best bandwidth measured yet."""
    gbps = result["bandwidth"]["gbps"]
    for cfg, models in zip(result["configs"], floor_models):
        for label, r in cfg["runs"].items():
            r["floor_s"] = floor_seconds(models[label], cfg["batch_size"], cfg["prompt_len"], cfg["output_len"], gbps)
            r["floor_fraction"] = r["floor_s"] / r["tpot_s"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", required=True)
    ap.add_argument("--decoder", required=True, help="a pruned HF directory (llama.cpp runs it alone)")
    ap.add_argument("--gguf-dir", required=True)
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--output-len", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch-size", type=int, default=8, help="also time our engine at this batch (0: no)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/latency/results/peer_llamacpp_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    models = {p: (load_model(args.full, dtype=d), load_model(args.decoder, dtype=d)) for p, d in PRECISIONS.items()}
    import llama_cpp

    result = {"machine": machine(torch.device("cpu")) | {"cpu_bf16_flags": describe_machine(torch.device("cpu"))[
                  "cpu_bf16_flags"]}, "llama_cpp_python": llama_cpp.__version__,
              "load_average_start": os.getloadavg(), "settings": vars(args), "configs": [],
              "models": {name: {"parameters": sum(p.numel() for p in m.parameters()),
                                "weight_bytes_per_step_fp32": weight_bytes_per_step(m),
                                "kv_bytes_per_token_fp32": kv_bytes_per_token(m)}
                         for name, m in zip(("full", "decoder"), models["f32"])}}
    bandwidth_start = measure_bandwidth(torch.device("cpu"))
    from tqdm import tqdm

    batches = [1] + ([args.batch_size] if args.batch_size > 1 else [])
    configs = [(p, o, b) for p in args.prompt_len for o in args.output_len for b in batches]
    progress = tqdm(total=len(configs), desc="configs")
    out, floor_models = Path(args.out), []
    result["bandwidth"] = {"gbps": bandwidth_start["gbps"], "start": bandwidth_start}
    for prompt_len, output_len, batch in configs:
        gen = torch.Generator().manual_seed(args.seed)
        vocab = models["f32"][0].args.vocab_size
        prompts = torch.randint(vocab, (batch, prompt_len), generator=gen).tolist()
        contenders = lineup(args, models, batch, prompt_len + output_len + 8)
        timings, warm = _time_round_robin(contenders, prompts, output_len, 1, args.repeats, tqdm(disable=True))
        runs = {c.label: summarize(timings[c.label], batch, output_len) | {
            "system": c.system, "engine": c.engine, "warmup_s": warm[c.label]} for c in contenders}
        floor_models.append({c.label: c.floor_model for c in contenders})
        result["configs"].append({"prompt_len": prompt_len, "output_len": output_len, "batch_size": batch,
                                  "runs": runs, "agreement": agreement(timings) if batch == 1 else {},
                                  "ratios": {k: r for k, (s, f, key) in RATIOS.items()
                                             if (r := _ratio(runs, s, f, key))}})
        del contenders  # frees the llama.cpp contexts before the next shape
        save(result, floor_models, out)  # after every shape: a stopped run keeps what it measured
        progress.update()
    progress.close()
    bandwidth_end = measure_bandwidth(torch.device("cpu"))
    result |= {"load_average_end": os.getloadavg(), "bandwidth": {
        "gbps": max(bandwidth_start["gbps"], bandwidth_end["gbps"]), "start": bandwidth_start, "end": bandwidth_end}}
    save(result, floor_models, out)
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
