"""`overfill bench`: latency and throughput of two-stage decoding against the memory-bandwidth floor.

The systems, all but the last on our engine (`BatchDecoder`, static KV cache, one fixed-shape
step per token):

    full        the full model prefills and decodes
    decoder     the pruned decoder alone (prefill and decode)
    overfill    the full model prefills, the decoder decodes (+ "refresh K" variants)
    reference   a same-size dense model, where the shape set has one (Llama-3.2-1B for 3B)
    hf          transformers' own `generate()` of the full model, greedy

For every prompt length x output length x batch size they get: time to first token,
time per output token (median and p90 over all steps of all repeats), end-to-end latency,
tokens/s, the memory-bandwidth floor of a decode step ((weights read + KV read) / the
bandwidth measured on this device in this run) and the fraction of it achieved, and the
KV-cache bytes per token. Repeats go round-robin over the systems, so that a busy machine
slows them alike, and ratios between systems are taken within each round.

    overfill bench --prompt-len 128 --output-len 64 --out bench.json
    overfill bench --shapes llama3.2-3b --prompt-len 512 --output-len 256   # random weights, a GPU

Timing needs only the shapes: without --decoder, the decoder has random weights in the
shape `overfill prune --hidden 0.45 --intermediate 0.45` would give.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal

import numpy as np
import torch

from .errors import OverfillError
from .files import check_not_an_input, check_output_file, write_errors_as_one_line
from .device import INFERENCE_PRECISION_HELP, cpu_caches, cpu_model, pick_device, resolve_precision
from .engine import BatchDecoder, SamplingParams
from .model import ModelArgs, Transformer, from_state_dict, load_model, read_config
from .two_stage import TwoStageConfig, TwoStageModel

SYSTEMS = ("full", "decoder", "overfill", "reference", "hf")
ENGINES = ("eager", "compiled")

_LLAMA32_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32_3B = dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                  num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                  rms_norm_eps=1e-5, rope_parameters=_LLAMA32_ROPE, tie_word_embeddings=True,
                  max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009, pad_token_id=128004)
LLAMA32_1B = dict(LLAMA32_3B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64)


@dataclass
class BenchConfig:
    """One benchmark: the models, the sweep and how to time it; recorded as the results' "settings"."""

    full: str = field(default="smollm2-135m-instruct", metadata={"help": "full model (with --shapes checkpoint)"})
    decoder: str | None = field(default=None, metadata={
        "help": "decoder: an OverFill or pruned HF directory (default: random weights in the pruned shape)"})
    shapes: Literal["checkpoint", "llama3.2-3b"] = field(default="checkpoint", metadata={
        "help": "checkpoint: --full and --decoder; llama3.2-3b: random weights in the shapes of Llama-3.2-3B, "
                "its pruned decoder and Llama-3.2-1B as the same-size reference (no download)"})
    prune_hidden: float = field(default=0.45, metadata={"help": "random decoder: hidden channels to remove"})
    prune_intermediate: float = field(default=0.45, metadata={"help": "random decoder: MLP neurons to remove"})
    prompt_len: list[int] = field(default_factory=lambda: [128], metadata={"help": "prompt lengths to sweep"})
    output_len: list[int] = field(default_factory=lambda: [64], metadata={"help": "output lengths to sweep"})
    batch_size: list[int] = field(default_factory=lambda: [1], metadata={"help": "batch sizes to sweep"})
    systems: list[str] = field(default_factory=list, metadata={
        "help": f"systems to time, of {', '.join(SYSTEMS)} (default: all there are)"})
    refresh_every: list[int] = field(default_factory=lambda: [8, 32], metadata={
        "help": "also time OverFill with a refresh every K tokens, for each K (0: none)"})
    engine: list[str] = field(default_factory=list, metadata={
        "help": "our engine: eager and/or compiled (default: compiled on a GPU, eager on a CPU)"})
    hf_cache: Literal["dynamic", "static"] = field(default="dynamic", metadata={
        "help": "KV cache of transformers' generate() (static: also compiles on a GPU)"})
    repeats: int = field(default=3, metadata={"help": "timed runs of every system"})
    warmup: int = field(default=1, metadata={"help": "untimed runs first (compilation happens here)"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": INFERENCE_PRECISION_HELP})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ... (auto: cuda if available)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: its default)"})
    seed: int = field(default=0, metadata={"help": "seed of the random prompts and weights"})
    out: str = field(default="bench.json", metadata={"help": "JSON results; a .md table and .png plots beside it"})
    plots: bool = field(default=True, metadata={"help": "write matplotlib plots"})


# ---------------------------------------------------------------------------- the models

@dataclass
class Suite:
    """The models one bench compares; only their shapes matter for timing."""

    full: Transformer
    decoder: Transformer
    layer_map: list[int] | None = None
    reference: Transformer | None = None
    hf: object | None = None
    """transformers' model of the full model, for the "hf" system."""
    pad_id: int = 0
    sources: dict[str, str] = field(default_factory=dict)
    """Where each model's weights come from (a directory, or "random")."""

    def system(self, name: str) -> TwoStageModel:
        tokenizer = SimpleNamespace(pad_token_id=self.pad_id, eos_token_id=None)  # prompts are token ids
        if name == "overfill":
            return TwoStageModel(self.full, self.decoder, tokenizer, TwoStageConfig("full", self.layer_map))
        return TwoStageModel({"full": self.full, "decoder": self.decoder, "reference": self.reference}[name],
                             None, tokenizer)


def pruned_config(config: dict, hidden: float, intermediate: float) -> dict:
    """The config of the decoder `overfill prune --hidden H --intermediate I` would make of `config`."""
    from transformers import AutoConfig

    from .prune import PruneConfig, plan

    widths = plan(AutoConfig.for_model(**config), PruneConfig(hidden=hidden, intermediate=intermediate)).pruned
    return dict(config, hidden_size=widths.hidden_size, intermediate_size=widths.intermediate_size,
                num_attention_heads=widths.num_attention_heads)


def random_model(config: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(our Transformer, transformers' model) of a config with random weights, sharing the tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
    hf = hf.to(device).eval()
    return from_state_dict(ModelArgs.from_hf(config), hf.state_dict()), hf


def load_suite(args: BenchConfig, systems: list[str], device: torch.device, dtype: torch.dtype) -> Suite:
    want_hf = "hf" in systems
    if args.shapes == "llama3.2-3b":
        full, hf = random_model(LLAMA32_3B, dtype, device, args.seed)
        decoder, _ = random_model(pruned_config(LLAMA32_3B, args.prune_hidden, args.prune_intermediate),
                                  dtype, device, args.seed + 1)
        reference = random_model(LLAMA32_1B, dtype, device, args.seed + 2)[0] if "reference" in systems else None
        return Suite(full, decoder, None, reference, hf if want_hf else None, LLAMA32_3B["pad_token_id"],
                     {"full": "random: Llama-3.2-3B shape", "decoder": "random: pruned Llama-3.2-3B shape",
                      "reference": "random: Llama-3.2-1B shape"})
    from .hub import load_hf_model, resolve

    full_dir = resolve(args.full)
    config = read_config(full_dir)
    if args.decoder is not None:
        pair = TwoStageModel.from_refs(str(full_dir), args.decoder, dtype=dtype, device=device)
        full, decoder, layer_map, decoder_source = pair.full, pair.decoder, pair.layer_map, str(resolve(args.decoder))
    else:
        full = load_model(full_dir, dtype=dtype, device=device)
        shape = pruned_config(config, args.prune_hidden, args.prune_intermediate)
        decoder, layer_map = random_model(shape, dtype, device, args.seed)[0], None
        decoder_source = (f"random: {args.full} pruned --hidden {args.prune_hidden} "
                          f"--intermediate {args.prune_intermediate}")
    hf = load_hf_model(full_dir, dtype=dtype).to(device).eval() if want_hf else None
    pad = config.get("pad_token_id", config.get("eos_token_id"))
    pad = (pad[0] if isinstance(pad, list) else pad) or 0
    return Suite(full, decoder, layer_map, None, hf, pad, {"full": str(full_dir), "decoder": decoder_source})


# ---------------------------------------------------------------------------- bytes and bandwidth

def weight_bytes_per_step(model: Transformer) -> int:
    """Weight bytes one decode step reads: all but the embedding table, which it only gathers
    from (unless the output layer is tied to it)."""
    embed = model.model.embed_tokens.weight
    return model.num_bytes() - (0 if model.args.tie_word_embeddings else embed.numel() * embed.element_size())


def kv_bytes_per_token(model: Transformer) -> int:
    """KV-cache bytes one token takes in this model's own cache, over all its layers."""
    return model.new_kv_cache(1, 1).bytes_per_token()


def _now(device: torch.device) -> float:
    """Wall-clock time once the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = _now(device)
        fn()
        times.append(_now(device) - start)
    return float(np.median(times))


def measure_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Memory bandwidth in GB/s: a large copy (read + write) and a sum (read), far beyond the caches."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    copy = 2 * nbytes / _median_seconds(lambda: y.copy_(x), device) / 1e9
    read = nbytes / _median_seconds(x.sum, device) / 1e9
    return {"copy_gbps": copy, "read_gbps": read, "gbps": max(copy, read), "tensor_bytes": nbytes}


def floor_seconds(decoder: Transformer, batch: int, prompt_len: int, output_len: int, gbps: float,
                  refresh_model: Transformer | None = None, refresh_every: int = 0) -> float:
    """Memory-bandwidth floor of one decode step: (weights + KV read) / bandwidth, averaged over
    the output (step i attends prompt_len + i + 1 slots). A refresh adds one read of the full
    model's weights every K steps."""
    nbytes = weight_bytes_per_step(decoder) + kv_bytes_per_token(decoder) * batch * (prompt_len + output_len / 2)
    if refresh_every:
        nbytes += weight_bytes_per_step(refresh_model) / refresh_every
    return nbytes / (gbps * 1e9)


# ---------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """One generation: seconds to the first token, then per later token, and in all."""

    ttft: float
    steps: list[float]
    total: float
    tokens: list[list[int]]


def time_engine(model: TwoStageModel, prompts: list[list[int]], output_len: int, refresh_every: int = 0,
                compile: bool = False) -> Timing:
    """Our engine, end to end: cache allocation, prefill, then `output_len - 1` decode steps."""
    device = model.device
    params = [SamplingParams(max_new_tokens=output_len, ignore_eos=True)] * len(prompts)
    start = _now(device)
    loop = BatchDecoder(model, prompts, params, refresh_every=refresh_every, compile=compile)
    tokens = [loop.first()]
    marks = [_now(device)]
    for _ in range(output_len - 1):
        tokens.append(loop.next())
        marks.append(_now(device))
    return Timing(marks[0] - start, np.diff(marks).tolist(), marks[-1] - start, torch.stack(tokens, 1).tolist())


def time_hf(hf, prompts: list[list[int]], output_len: int, pad_id: int, cache: str = "dynamic") -> Timing:
    """transformers' `generate()`, greedy, exactly `output_len` new tokens; a streamer clocks each token."""
    from transformers.generation.streamers import BaseStreamer

    device = hf.device

    class Clock(BaseStreamer):
        def __init__(self):
            self.marks: list[float] = []

        def put(self, value):  # first the prompt, then each new token
            self.marks.append(_now(device))

        def end(self):
            pass

    ids = torch.tensor(prompts, device=device)
    clock = Clock()
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    start = _now(device)
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                      eos_token_id=None, do_sample=False, temperature=None, top_p=None, top_k=None,
                      pad_token_id=pad_id, streamer=clock, **extra)  # no EOS: no early stop, no EOS suppression
    end = _now(device)
    marks = clock.marks[1:]
    return Timing(marks[0] - start, np.diff(marks).tolist(), end - start, out[:, ids.shape[1]:].tolist())


@dataclass
class Contender:
    """One line of the results: a system on an engine, and how to run it once."""

    label: str
    system: str
    engine: str
    refresh_every: int
    run: Callable[[list[list[int]], int], Timing]
    floor_model: Transformer
    kv_model: Transformer
    """Whose cache layout the system keeps (OverFill: the full model's)."""


def contenders(suite: Suite, systems: list[str], engines: list[str], refresh: list[int],
               hf_cache: str) -> list[Contender]:
    out = []
    for engine in engines:
        suffix = f" ({engine})" if len(engines) > 1 else ""
        for name in [s for s in SYSTEMS if s in systems and s != "hf"]:
            model = suite.system(name)
            for k in [0] + (refresh if name == "overfill" else []):
                run = functools.partial(time_engine, model, refresh_every=k, compile=engine == "compiled")
                label = name + (f"+refresh{k}" if k else "") + suffix
                out.append(Contender(label, name, engine, k, run, model.decoder, model.full))
    if "hf" in systems:
        run = functools.partial(time_hf, suite.hf, pad_id=suite.pad_id, cache=hf_cache)
        out.append(Contender("hf", "hf", f"transformers ({hf_cache} cache)", 0, run, suite.full, suite.full))
    return out


def summarize(timings: list[Timing], batch: int, output_len: int) -> dict:
    steps = np.concatenate([t.steps for t in timings])
    e2e = float(np.median([t.total for t in timings]))
    tpot = float(np.median(steps))
    return {
        "ttft_s": float(np.median([t.ttft for t in timings])),
        "tpot_s": tpot,
        "tpot_p90_s": float(np.percentile(steps, 90)),
        "e2e_s": e2e,
        "tokens_per_s": batch * output_len / e2e,
        "decode_tokens_per_s": batch / tpot,
        "per_repeat": {"ttft_s": [t.ttft for t in timings], "tpot_s": [float(np.median(t.steps)) for t in timings],
                       "e2e_s": [t.total for t in timings]},
    }


def _ratio(runs: dict[str, dict], slow: str, fast: str, key: str) -> dict | None:
    """`slow` / `fast` per round (a speed-up when > 1): median, min and max over the rounds."""
    if slow not in runs or fast not in runs:
        return None
    r = np.array(runs[slow]["per_repeat"][key]) / np.array(runs[fast]["per_repeat"][key])
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}


def ratios(runs: dict[str, dict], engines: list[str], refresh: list[int]) -> dict:
    out = {}
    for engine in engines:
        sfx = f" ({engine})" if len(engines) > 1 else ""
        pairs = {"full/overfill": (f"full{sfx}", f"overfill{sfx}"), "hf/overfill": ("hf", f"overfill{sfx}"),
                 "overfill/decoder": (f"overfill{sfx}", f"decoder{sfx}"), "hf/full": ("hf", f"full{sfx}"),
                 "reference/overfill": (f"reference{sfx}", f"overfill{sfx}")}
        for k in refresh:
            pairs[f"overfill+refresh{k}/overfill"] = (f"overfill+refresh{k}{sfx}", f"overfill{sfx}")
        for name, (slow, fast) in pairs.items():
            for key in ("tpot_s", "e2e_s"):
                value = _ratio(runs, slow, fast, key)
                if value is not None:
                    out[f"{name} {key.removesuffix('_s')}{sfx}"] = value
    return out


# ---------------------------------------------------------------------------- the run

def _check(args: BenchConfig, systems: list[str], engines: list[str]) -> None:
    for name in ("prompt_len", "output_len", "batch_size"):
        if any(v < 1 for v in getattr(args, name)):
            raise OverfillError(f"--{name.replace('_', '-')} values must be >= 1, got {getattr(args, name)}")
    if any(k < 0 for k in args.refresh_every):
        raise OverfillError(f"--refresh-every values must be >= 0 (0: none), got {args.refresh_every}")
    if min(args.output_len) < 2:
        raise OverfillError("--output-len must be >= 2: time per output token needs a decode step")
    if args.repeats < 1 or args.warmup < 0:
        raise OverfillError("--repeats must be >= 1 and --warmup >= 0")
    unknown = [s for s in systems if s not in SYSTEMS] + [e for e in engines if e not in ENGINES]
    if unknown:
        raise OverfillError(f"unknown system or engine {unknown}: systems are {', '.join(SYSTEMS)}; "
                            f"engines {', '.join(ENGINES)}")
    if "reference" in systems and args.shapes == "checkpoint":
        raise OverfillError("--systems reference needs a shape set with a reference model (--shapes llama3.2-3b)")


def _window_check(suite: Suite, prompt_len: list[int], output_len: list[int]) -> None:
    window = min(suite.full.args.max_position_embeddings, suite.decoder.args.max_position_embeddings)
    if max(prompt_len) + max(output_len) > window:
        raise OverfillError(f"prompt {max(prompt_len)} + output {max(output_len)} tokens exceed the context "
                            f"window of {window}: lower --prompt-len or --output-len")


def model_info(model: Transformer, source: str) -> dict:
    a = model.args
    return {"source": source, "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": model.num_bytes(), "weight_bytes_per_step": weight_bytes_per_step(model),
            "kv_bytes_per_token": kv_bytes_per_token(model), "dtype": str(model.model.embed_tokens.weight.dtype),
            "shape": {"hidden": a.hidden_size, "intermediate": a.intermediate_size, "layers": a.num_hidden_layers,
                      "query_heads": a.num_attention_heads, "kv_heads": a.num_key_value_heads,
                      "head_dim": a.head_dim, "vocab": a.vocab_size}}


def machine(device: torch.device) -> dict:
    """The machine a bench ran on, as its results record it."""
    import transformers

    info = {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    if device.type == "cpu":
        info["cpu_caches_bytes"] = cpu_caches()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def run_bench(suite: Suite, args: BenchConfig, device: torch.device, systems: list[str], engines: list[str]) -> dict:
    """Time every contender on every prompt x output x batch configuration; the results dict."""
    from tqdm import tqdm

    _window_check(suite, args.prompt_len, args.output_len)
    bandwidth_start = measure_bandwidth(device)
    refresh = [k for k in args.refresh_every if k > 0]
    lineup = contenders(suite, systems, engines, refresh, args.hf_cache)
    configs = list(itertools.product(args.prompt_len, args.output_len, args.batch_size))
    result = {"machine": machine(device), "load_average_start": os.getloadavg(), "settings": asdict(args),
              "models": {}, "configs": []}
    for name in ("full", "decoder", "reference"):
        model = getattr(suite, name)
        if model is not None and (name != "reference" or "reference" in systems):
            result["models"][name] = model_info(model, suite.sources.get(name, ""))
    progress = tqdm(total=len(configs) * len(lineup) * (args.warmup + args.repeats), desc="bench", unit="run")
    for prompt_len, output_len, batch in configs:
        gen = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(suite.full.args.vocab_size, (batch, prompt_len), generator=gen).tolist()
        try:
            timings, warmup = _time_round_robin(lineup, prompts, output_len, args.warmup, args.repeats, progress)
        except torch.OutOfMemoryError:
            raise OverfillError(f"out of memory at batch {batch}, prompt {prompt_len}, output {output_len}: "
                                f"lower --batch-size or --prompt-len") from None
        runs = {}
        for c in lineup:
            run = summarize(timings[c.label], batch, output_len)
            run.update(system=c.system, engine=c.engine, refresh_every=c.refresh_every, warmup_s=warmup[c.label],
                       kv_bytes_per_token=kv_bytes_per_token(c.kv_model),
                       kv_cache_bytes=kv_bytes_per_token(c.kv_model) * batch * (prompt_len + output_len))
            runs[c.label] = run
        ours = next((c.label for c in lineup if c.system == "full"), None)
        result["configs"].append({"prompt_len": prompt_len, "output_len": output_len, "batch_size": batch,
                                  "runs": runs, "ratios": ratios(runs, engines, refresh),
                                  "hf_tokens_equal_full": timings["hf"][0].tokens == timings[ours][0].tokens
                                  if "hf" in timings and ours else None})
    progress.close()
    result["load_average_end"] = os.getloadavg()
    # Measured before and after the timing; the floor takes the better one (a best case).
    bandwidth_end = measure_bandwidth(device)
    gbps = max(bandwidth_start["gbps"], bandwidth_end["gbps"])
    result["bandwidth"] = {"gbps": gbps, "start": bandwidth_start, "end": bandwidth_end}
    for cfg in result["configs"]:
        for c in lineup:
            run = cfg["runs"][c.label]
            run["floor_s"] = floor_seconds(c.floor_model, cfg["batch_size"], cfg["prompt_len"], cfg["output_len"],
                                           gbps, suite.full, c.refresh_every)
            run["floor_fraction"] = run["floor_s"] / run["tpot_s"]
    return result


def _time_round_robin(lineup: list[Contender], prompts: list[list[int]], output_len: int, warmup: int,
                      repeats: int, progress) -> tuple[dict[str, list[Timing]], dict[str, float]]:
    """Warm every contender up (seconds each), then time them round-robin, `repeats` rounds."""
    warm = {}
    for c in lineup:
        start = time.perf_counter()
        for _ in range(warmup):
            c.run(prompts, output_len)
            progress.update()
        warm[c.label] = time.perf_counter() - start
    timings: dict[str, list[Timing]] = {c.label: [] for c in lineup}
    for _ in range(repeats):
        for c in lineup:
            timings[c.label].append(c.run(prompts, output_len))
            progress.update()
    return timings, warm


def bench(cfg: BenchConfig) -> list[Path]:
    """Run the benchmark `cfg` describes; write its JSON results (`cfg.out`), their markdown table
    (.md beside it) and plots; return the paths written."""
    from .hub import local_path
    from .report import bench_markdown, plot_bench

    device = pick_device(cfg.device)
    engines = list(cfg.engine) or ["compiled" if device.type == "cuda" else "eager"]
    systems = list(cfg.systems) or [s for s in SYSTEMS if s != "reference" or cfg.shapes != "checkpoint"]
    _check(cfg, systems, engines)
    out = check_output_file(cfg.out)
    check_not_an_input(out, {"--full": local_path(cfg.full), "--decoder": local_path(cfg.decoder)})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = resolve_precision(cfg.precision, device)  # after the threads: a CPU probe depends on them
    if "compiled" in engines:  # every model x batch x cache length is one more static-shape compile
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    suite = load_suite(cfg, systems, device, precision.dtype)
    result = run_bench(suite, cfg, device, systems, engines) | precision.as_dict()
    with write_errors_as_one_line(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(bench_markdown(result))
        return [out, out.with_suffix(".md")] + (plot_bench(result, out.with_suffix("")) if cfg.plots else [])
