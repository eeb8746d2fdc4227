"""`overfill build`: prune -> train OverFill -> train the pruned baseline -> evaluate -> benchmark -> report.

Every stage writes under the run folder and ends by writing `<stage>.done.json` (its
settings); a finished stage is skipped, so a stopped build continues where it stopped
(training resumes from its last checkpoint). Rerunning a finished stage with other
settings is refused rather than silently mixing results.

    runs/NAME/
      build_config.json      the BuildConfig
      pruned/                the pruned decoder (HF dir + prune_record.json)
      overfill/              the OverFill decoder (HF dir + overfill.json), trained with the full model frozen
      baseline/              the pruned baseline, trained alone on the same data and budget
      eval/{full,pruned,overfill}.json
      bench.json
      report.md, quality.png, latency.png
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from .errors import OverfillError
from .files import check_not_an_input, check_output_dir, write_text_atomic

DEFAULT_STEPS = 60
"""Optimizer steps per decoder when neither --steps nor --tokens is given: 60 steps of 8 ShareGPT chats at
--max-len 512 are about 220k tokens, near the quality experiment's first budget point (docs/RESULTS.md),
and, unlike a --tokens budget, need only those chats tokenized. At the training speeds measured in
benchmarks/train/ the README's main job (both decoders, evaluation, benchmark) then takes an estimated
15-18 minutes on a 2-core CPU."""


@dataclass
class BuildConfig:
    """The whole pipeline's settings; saved as build_config.json in the run folder."""

    full: str = field(default="smollm2-135m-instruct", metadata={"help": "the full model"})
    out: str = field(default="runs/smollm2", metadata={"help": "run folder"})
    hidden: float = field(default=0.45, metadata={"help": "hidden width to remove (ratio) or keep (absolute)"})
    intermediate: float = field(default=0.45, metadata={"help": "MLP width to remove (ratio) or keep (absolute)"})
    heads: float = field(default=0.0, metadata={"help": "query heads to remove (ratio) or keep (absolute)"})
    depth: float = field(default=0.0, metadata={"help": "layers to remove (ratio) or keep (absolute)"})
    prune_method: Literal["select", "rotate"] = field(default="rotate", metadata={
        "help": "how the hidden width is cut (`overfill prune --method`): rotate = onto the residual stream's "
                "principal directions first, select = the most important channels as they are"})
    calibration_samples: int = field(default=32, metadata={"help": "calibration sequences for pruning"})
    calibration_seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    data: str = field(default="sharegpt", metadata={"help": "training data (see `overfill train`)"})
    steps: int | None = field(default=None, metadata={
        "help": f"optimizer steps per trained model (default {DEFAULT_STEPS} when --tokens is not given)"})
    tokens: int | None = field(default=None, metadata={
        "help": "token budget per trained model (prompt + response) instead of --steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per optimizer step"})
    max_len: int = field(default=512, metadata={"help": "tokens per training example"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    warmup: int = field(default=10, metadata={"help": "warm-up steps"})
    kd_weight: float = field(default=0.0, metadata={"help": "distillation weight (both trained models)"})
    tasks: str = field(default="default", metadata={"help": "benchmark tasks (see `overfill eval`)"})
    limit: int | None = field(default=50, metadata={"help": "documents per task (none: all)"})
    chat_examples: int = field(default=8, metadata={"help": "held-out chats for chat quality"})
    bench_prompt_len: int = field(default=256, metadata={"help": "benchmark prompt length"})
    bench_new_tokens: int = field(default=64, metadata={"help": "benchmark output length"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ... (auto: cuda if available)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order"})

    def __post_init__(self) -> None:
        from .train import step_budget

        self.steps = step_budget(self.steps, self.tokens, DEFAULT_STEPS)  # checked before any stage runs
        train_config(self, "overfill", Path(self.out))  # the training settings too, not after the pruning


class Run:
    """The run folder: stage markers and the skip/resume rule."""

    def __init__(self, cfg: BuildConfig):
        self.cfg, self.dir = cfg, check_output_dir(cfg.out)
        check_not_an_input(self.dir, {"--full": cfg.full})
        if self.dir.is_dir() and any(self.dir.iterdir()) and not (self.dir / "build_config.json").is_file():
            raise OverfillError(f"--out '{self.dir}' is not empty and holds no build: choose a new --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "build_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    def path(self, name: str) -> Path:
        return self.dir / name

    def stage(self, name: str, settings: dict, work: Callable[[], object]) -> None:
        marker = self.dir / f"{name}.done.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done["settings"] != settings:
                changed = sorted(k for k in settings if done["settings"].get(k) != settings[k])
                raise OverfillError(f"stage '{name}' in {self.dir} was built with other settings ({', '.join(changed)}): "
                                    f"use a new --out, or delete {marker} to redo it")
            print(f"[build] {name}: done, skipped")
            return
        print(f"[build] {name} ...", flush=True)
        started = time.perf_counter()
        work()
        write_text_atomic(marker, json.dumps({"settings": settings,
                                              "seconds": round(time.perf_counter() - started, 1)}, indent=2))
        print(f"[build] {name}: {time.perf_counter() - started:.0f} s", flush=True)


def _prune(run: Run) -> None:
    from .prune import PruneConfig, prune

    c = run.cfg
    cfg = PruneConfig(method=c.prune_method, hidden=c.hidden, intermediate=c.intermediate, heads=c.heads,
                      depth=c.depth, calibration=c.data, samples=c.calibration_samples, seq_len=c.calibration_seq_len,
                      device=c.device, seed=c.seed)
    run.stage("prune", {"full": c.full, **asdict(cfg)},
              lambda: prune(c.full, cfg, run.path("pruned"), overwrite=True))


def train_config(c: BuildConfig, mode: str, run_dir: Path, out: str = "overfill"):
    """The TrainConfig of one of the build's trained decoders (its settings checked on creation)."""
    from .train import TrainConfig

    return TrainConfig(full=c.full, decoder=str(run_dir / "pruned"), data=c.data, out=str(run_dir / out), mode=mode,
                       kd_weight=c.kd_weight, steps=c.steps, tokens=c.tokens, batch_size=c.batch_size, lr=c.lr,
                       warmup=c.warmup, max_len=c.max_len, seed=c.seed, resume=True,
                       checkpoint_every=max(1, (c.steps or 100) // 4), eval_every=0, val_examples=16)


def _train(run: Run, mode: str, out: str) -> None:
    from .train import train

    cfg = train_config(run.cfg, mode, run.dir, out)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "checkpoint_every")}
    run.stage(f"train_{out}", settings, lambda: train(cfg))


def _evaluate(run: Run, label: str, decoder: str | None, mode: str) -> None:
    from .evaluate import EvalConfig, evaluate

    c = run.cfg
    cfg = EvalConfig(full=c.full, decoder=decoder, mode=mode, tasks=c.tasks, limit=c.limit,
                     chat_examples=c.chat_examples, chat_source=c.data, device=c.device)

    def work() -> None:
        out = run.path("eval") / f"{label}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(evaluate(cfg), indent=2))

    run.stage(f"eval_{label}", asdict(cfg), work)


def build(cfg: BuildConfig) -> Path:
    """Run (or continue) the whole pipeline; returns the report path."""
    run = Run(cfg)
    _prune(run)
    _train(run, "overfill", "overfill")
    _train(run, "pruned", "baseline")
    _evaluate(run, "full", None, "full")
    _evaluate(run, "pruned", str(run.path("baseline")), "decoder")
    _evaluate(run, "overfill", str(run.path("overfill")), "overfill")
    _bench(run)
    return _report(run)


def _bench(run: Run) -> None:
    from .bench import BenchConfig, bench

    c = run.cfg
    cfg = BenchConfig(full=c.full, decoder=str(run.path("overfill")), prompt_len=[c.bench_prompt_len],
                      output_len=[c.bench_new_tokens], refresh_every=[], device=c.device,
                      out=str(run.path("bench") / "bench.json"))
    run.stage("bench", asdict(cfg), lambda: bench(cfg))


def _report(run: Run) -> Path:
    """report.md: the quality table and plot, then the latency table and plots."""
    from .report import bench_markdown, load_results, plot_accuracy, report_markdown

    records = [load_results(run.path("eval") / f"{name}.json") for name in ("full", "pruned", "overfill")]
    plot_accuracy(records, run.path("quality.png"))
    bench = json.loads((run.path("bench") / "bench.json").read_text())

    c = run.cfg
    budget = f"{c.steps} steps" if c.tokens is None else f"{c.tokens:,} tokens"
    text = "\n".join([
        f"# OverFill build: {c.full}", "",
        f"Decoder: hidden -{c.hidden:g}, intermediate -{c.intermediate:g}, heads -{c.heads:g}, depth -{c.depth:g}; "
        f"OverFill decoder and pruned baseline each trained on `{c.data}` for {budget} "
        f"(batch {c.batch_size}, max_len {c.max_len}, lr {c.lr:g}); benchmarks limited to {c.limit} documents per task.",
        "", "## Quality", "",
        report_markdown(records).split("\n", 2)[2],  # drop the report's own title
        "![quality](quality.png)", "",
        "## Latency", "", f"Device: {bench['machine'].get('device', '')}; bandwidth {bench['bandwidth']['gbps']:.1f} GB/s measured.", "",
        bench_markdown(bench),
        *[f"![{p.stem}](bench/{p.name})" for p in sorted(run.path("bench").glob("*.png"))], "",
        f"Settings: `{run.path('build_config.json')}`.", ""])
    out = run.path("report.md")
    out.write_text(text)
    return out
