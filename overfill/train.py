"""Training: the OverFill decoder (full model frozen) and the pruned baseline.

`overfill` mode trains the decoder as it will run: the frozen full model prefills the prompt
and predicts the first response token; the decoder writes the rest of the response reading
the full model's keys and values at the prompt positions (`losses.overfill_losses`). `pruned`
mode trains the decoder alone on prompt + response (completion-only SFT, the paper's
baseline). Both see the same examples in the same order for the same seed and budget, and
both take the loss on the response tokens only (`losses.py` computes it the way inference
runs: the full model prefills, the decoder reads its prompt cache over the response tokens):

    loss = ce_weight * (sum of cross-entropy over the step's response tokens / their number)
         + kd_weight * the same mean of KL(full || decoder)

(`--ce-weight 0 --kd-weight 1` is pure logit distillation; the teacher's logits are computed
only at the response tokens, where the loss is taken.)

normalised by the response tokens of the whole optimizer step (all micro-batches, all
processes), so gradient accumulation and data parallelism change nothing but float rounding.

Precision (`--precision`, see `device.py`): under bf16 the decoder keeps fp32 master weights
and optimizer state and computes under bf16 autocast, the frozen full model is stored in bf16,
and the loss is computed in fp32. Batches are grouped by length within windows of the seeded
order (`length_groups`), the same for both modes; the padding fraction is logged.

Scale-out is HuggingFace `accelerate`: the same code runs alone or under
`accelerate launch` / `torchrun` (DDP or FSDP). Only the main process writes files, except
the per-process RNG states that `accelerate` puts in each checkpoint.

Output directory (`checkpoint.py` reads and checks it):
    train_config.json    the TrainConfig of the run
    metrics.jsonl        one line per optimizer step (loss, lr, tokens/s, val_loss when computed)
    summary.json         tokens seen, tokens/s, wall time, final losses
    checkpoints/step-N/  the last `keep` checkpoints (accelerate state + trainer_state.json)
    the model: an OverFill directory (overfill mode) or a plain HF directory (pruned mode)
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .batching import batch_plan, collate_split, length_groups, length_key, plan_fingerprint
from .checkpoint import (CONFIG_FILE, METRICS_FILE, SNAPSHOTS, STATE_FILE, SUMMARY_FILE, check_out_dir,
                         check_resumable, clean_temporaries, latest_checkpoint, restore_newest, save_checkpoint,
                         truncate_metrics)
from .device import AUTO_PRECISION_HELP, PRECISIONS, pick_device, resolve_precision
from .errors import OverfillError
from .files import json_loads, publish_dir, write_error
from .losses import response_losses
from .model import Transformer
from .two_stage import TwoStageModel

DEFAULT_STEPS = 1000
MAX_PLANNED_EXAMPLES = 2**31
"""The most examples a run plans: its plan is a list of example indices in memory (16 GB at this size)."""
# What --resume may change: none of these alter the loss curve.
RESUMABLE = {"out", "resume", "checkpoint_every", "keep", "eval_every", "val_examples", "grad_checkpointing",
             "snapshots"}


@dataclass
class TrainConfig:
    """One training run; saved as train_config.json in the output and in every checkpoint."""

    full: str = field(metadata={"help": "the full model (built-in name, HF directory or hub id); stays frozen"})
    decoder: str = field(metadata={"help": "the decoder to train: a pruned HF directory from `overfill prune` "
                                           "(or an OverFill directory to train further)"})
    data: str = field(metadata={"help": "training data: 'sharegpt', or a .jsonl (chat, prompt/response or text "
                                        "records) or .txt file"})
    out: str = field(metadata={"help": "output directory: the trained model, metrics.jsonl, checkpoints"})
    mode: Literal["overfill", "pruned"] = field(default="overfill", metadata={
        "help": "overfill: the decoder learns to answer from the frozen full model's KV cache of the prompt; "
                "pruned: the decoder alone on prompt + response (the baseline)"})
    ce_weight: float = field(default=1.0, metadata={
        "help": "weight of the cross-entropy on the response tokens (0: distillation alone)"})
    kd_weight: float = field(default=0.0, metadata={
        "help": "weight of KL(full || decoder) on the response tokens (logit distillation from the frozen full "
                "model)"})
    steps: int | None = field(default=None, metadata={
        "help": f"optimizer steps (default {DEFAULT_STEPS}); or give --tokens"})
    tokens: int | None = field(default=None, metadata={
        "help": "token budget instead of --steps: the fewest steps whose batches hold this many tokens "
                "(prompt + response, all processes)"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch and process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps before the cosine decay to 0"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0: off)"})
    max_len: int = field(default=1024, metadata={"help": "tokens per example, prompt + response"})
    max_prompt_len: int | None = field(default=None, metadata={
        "help": "prompt tokens kept (its end); default 3/4 of --max-len"})
    checkpoint_every: int = field(default=500, metadata={"help": "checkpoint every N steps (0: never)"})
    keep: int = field(default=2, metadata={"help": "checkpoints kept (the newest)"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --out from its newest checkpoint (same data order, optimizer, schedule)"})
    eval_every: int = field(default=200, metadata={
        "help": "validation loss every N steps, at the start and at the end (0: never)"})
    val_examples: int = field(default=200, metadata={"help": "validation examples"})
    seed: int = field(default=0, metadata={"help": "seed of the data order"})
    snapshots: list[int] | None = field(default=None, metadata={
        "help": "token budgets at which to also save the model (snapshots/tokens-N/): the points of a budget "
                "sweep from one run"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the decoder's activations in the backward pass (less memory, ~30% slower)"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "bf16: autocast over fp32 master weights, full model stored in bf16; " + AUTO_PRECISION_HELP})
    length_window: int = field(default=64, metadata={
        "help": "group examples of similar lengths into steps within windows of this many steps of the seeded "
                "order (0: no grouping); less padding, the same plan in both modes"})

    def __post_init__(self) -> None:
        if self.mode not in ("overfill", "pruned"):
            raise OverfillError(f"mode must be 'overfill' or 'pruned', got '{self.mode}'")
        if self.precision not in PRECISIONS:
            raise OverfillError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        self.steps = step_budget(self.steps, self.tokens, DEFAULT_STEPS)
        positive = {"steps": _or_one(self.steps), "tokens": _or_one(self.tokens), "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "keep": self.keep, "val_examples": self.val_examples}
        at_least_zero = {"ce_weight": self.ce_weight, "kd_weight": self.kd_weight, "warmup": self.warmup,
                         "grad_clip": self.grad_clip,
                         "weight_decay": self.weight_decay, "checkpoint_every": self.checkpoint_every,
                         "eval_every": self.eval_every, "length_window": self.length_window}
        bad = [f"{k} must be positive (got {v})" for k, v in positive.items() if v < 1]
        bad += [f"{k} must be >= 0 (got {v})" for k, v in at_least_zero.items() if not v >= 0]  # NaN too
        if any(n < 1 for n in self.snapshots or []):
            bad.append(f"snapshots must be positive token counts (got {self.snapshots})")
        if not self.ce_weight + self.kd_weight > 0:
            bad.append("the loss needs --ce-weight or --kd-weight above 0")
        if not self.lr > 0:
            bad.append(f"lr must be positive (got {self.lr})")
        bad += [f"{f.name} must be a finite number (got {getattr(self, f.name)})" for f in fields(self)
                if isinstance(getattr(self, f.name), float) and math.isinf(getattr(self, f.name))]  # NaN: above
        if max(_or_one(self.steps) * self.batch_size * self.grad_accum, _or_one(self.tokens) // self.max_len) \
                > MAX_PLANNED_EXAMPLES:  # a typo's extra zeros: a list that fills the memory, not a run
            bad.append(f"the run would plan more than {MAX_PLANNED_EXAMPLES:,} examples (steps x batch_size x "
                       f"grad_accum, or at least tokens / max_len): lower --steps or --tokens")
        if not 0 < self.prompt_budget < self.max_len:
            bad.append(f"need 0 < max_prompt_len < max_len (got {self.prompt_budget} and {self.max_len})")
        if bad:
            raise OverfillError("bad training settings: " + "; ".join(bad))

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_len if self.max_prompt_len is not None else self.max_len * 3 // 4

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        try:
            return cls(**json_loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise OverfillError(f"{path} is malformed: {e}") from None

    def changes_from(self, saved: "TrainConfig") -> list[str]:
        """Settings that differ from `saved` and would change the loss curve of a resumed run."""
        return [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(self, f.name)!r}" for f in fields(self)
                if f.name not in RESUMABLE and not _same_setting(getattr(self, f.name), getattr(saved, f.name))]


def _or_one(budget: int | None) -> int:
    """A budget not given counts as valid; a given one (0 too) is checked."""
    return 1 if budget is None else budget


def step_budget(steps: int | None, tokens: int | None, default: int) -> int | None:
    """The steps of a run budgeted by `steps` or `tokens` (one of them; `default` steps when neither)."""
    if steps is not None and tokens is not None:
        raise OverfillError("give --steps or --tokens, not both")
    return default if steps is None and tokens is None else steps


def _same_setting(a, b) -> bool:
    """Equal, or two spellings of one existing path (a moved run folder reached through a link)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; return the output directory (see the module docstring)."""
    out = Path(cfg.out)
    if cfg.resume and (out / SUMMARY_FILE).is_file():
        check_resumable(cfg, out)
        print(f"{out}: this run has already finished ({SUMMARY_FILE} exists)")
        return out
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    except Exception as e:  # noqa: BLE001 - safetensors and torch.save report a full disk in their own ways
        failed = write_error(e)
        if failed is None:
            raise
        newest = latest_checkpoint(out)
        where = f": {failed.filename}" if failed.filename else ""
        raise OverfillError(f"cannot write to '{out}' ({failed.strerror}{where}): make room, then rerun with "
                            f"--resume; it continues from "
                            f"{newest.name if newest else 'the start'}, which is complete") from None


def _json_safe(record: dict) -> dict:
    """`record` with non-finite numbers as null: JSON has no NaN (json.dumps would write one anyway)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


# ---------------------------------------------------------------------------- the run

def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    return Accelerator(
        # the loop gathers each step's micro-batches first, so the end of the data is no step boundary
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
        # autocast is ours (`Trainer.autocast`): accelerate's precision is process-global and fixed at first use
        mixed_precision="no",
        cpu=pick_device("auto").type == "cpu",  # lets plain torchrun on a CPU machine run several gloo processes
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps
    )


class Trainer:
    """One run: the models, the data, the optimizer and the accelerate plumbing.

    Everything that can fail on bad input (the output directory, the models, the data) is
    checked in the constructor, before any file is written.
    """

    def __init__(self, cfg: TrainConfig):
        from accelerate.utils import set_seed

        self.cfg, self.out = cfg, Path(cfg.out)
        check_out_dir(cfg)
        self.precision = resolve_precision(cfg.precision, pick_device("auto"))
        self.accelerator = make_accelerator(cfg)
        set_seed(cfg.seed)
        self.load_models()
        self.load_data()
        self.build_optimizer()
        self.start_step, self.state = 0, {"step": 0, "tokens": 0, "response_tokens": 0, "train_seconds": 0.0,
                                          "slots": 0, "precision": self.precision.name,
                                          "plan_fingerprint": self.plan_fingerprint}
        if cfg.resume:
            self.restore_newest_loadable()
        self.accelerator.wait_for_everyone()  # every process has checked --out before the main one writes there

    def autocast(self):
        """bf16 autocast over the fp32 decoder where the precision is bf16; a no-op in fp32."""
        bf16 = self.precision.name == "bf16"
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def load_models(self) -> None:
        from .hub import load_tokenizer, resolve
        from .model import load_model

        cfg, device = self.cfg, self.accelerator.device
        self.decoder_dir = resolve(cfg.decoder)
        if cfg.mode == "overfill" or cfg.kd_weight > 0:
            pair = TwoStageModel.from_refs(cfg.full, cfg.decoder, dtype=torch.float32)  # checks the KV cache fits
            full, decoder, self.tokenizer, self.pair_config = pair.full, pair.decoder, pair.tokenizer, pair.config
            self.full_dir = pair.full_dir  # its weights' fingerprint goes into the saved overfill.json
            full.requires_grad_(False)
            self.full = full.to(device=device, dtype=self.precision.dtype).eval()
        else:
            decoder = load_model(self.decoder_dir, dtype=torch.float32)  # the baseline needs no full model
            self.tokenizer, self.full, self.pair_config = load_tokenizer(cfg.full), None, None
        if decoder.args.vocab_size < len(self.tokenizer):
            raise OverfillError(f"the decoder's vocabulary ({decoder.args.vocab_size}) is smaller than the full "
                                f"model's tokenizer ({len(self.tokenizer)}): it was not pruned from '{cfg.full}'")
        self.layer_map = self.pair_config.layer_map if self.pair_config else None
        decoder.gradient_checkpointing = cfg.grad_checkpointing
        self.decoder_args = decoder.args
        self.decoder = decoder.to(device).train()

    def load_data(self) -> None:
        from .data import load_examples

        cfg, world = self.cfg, self.accelerator.num_processes
        per_step = cfg.batch_size * cfg.grad_accum * world
        needed = min(cfg.steps * per_step, sys.maxsize) if cfg.tokens is None else None  # no more examples needed
        self.train_examples = load_examples(cfg.data, self.tokenizer, "train", cfg.max_len, cfg.prompt_budget,
                                            limit=needed, seed=cfg.seed)
        self.val_examples = []
        if cfg.eval_every:
            try:
                self.val_examples = load_examples(cfg.data, self.tokenizer, "validation", cfg.max_len,
                                                  cfg.prompt_budget, limit=cfg.val_examples, seed=cfg.seed)
            except OverfillError as e:
                raise OverfillError(f"{e}; pass --eval-every 0 to train without a validation loss") from None
        if per_step > len(self.train_examples):  # a step would repeat examples (and a huge one never ends)
            raise OverfillError(f"a step takes {per_step:,} examples (--batch-size x --grad-accum x processes), more "
                                f"than the {len(self.train_examples):,} training examples of '{cfg.data}': lower "
                                f"--batch-size")
        lengths = [len(e.prompt_ids) + len(e.response_ids) for e in self.train_examples]
        plan = batch_plan(lengths, per_step, cfg.seed, cfg.steps if cfg.tokens is None else None, cfg.tokens)
        keys = [length_key(e) for e in self.train_examples]
        plan = length_groups(plan, keys, per_step, cfg.length_window, cfg.seed)
        self.steps = len(plan) // per_step
        self.planned_tokens = sum(lengths[i] for i in plan)
        self.plan_fingerprint = plan_fingerprint([self.train_examples[i] for i in plan])
        batches = partial(torch.utils.data.DataLoader, batch_size=cfg.batch_size,
                          collate_fn=partial(collate_split, pad_id=self.tokenizer.pad_token_id))
        self.train_loader = batches([self.train_examples[i] for i in plan])  # already in training order
        self.val_loader = batches(self.val_examples) if self.val_examples else None

    def build_optimizer(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        cfg, acc = self.cfg, self.accelerator
        params = [p for p in self.decoder.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup, self.steps), self.steps)
        self.decoder, self.optimizer, self.scheduler, self.train_loader = acc.prepare(
            self.decoder, optimizer, scheduler, self.train_loader)
        if self.val_loader is not None:
            self.val_loader = acc.prepare(self.val_loader)

    def restore_newest_loadable(self) -> None:
        restore_newest(self.accelerator, self.out, self.restore)

    def restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / STATE_FILE).read_text())  # first: a damaged one fails before loading
        saved = state.get("plan_fingerprint")
        if saved is not None and saved != self.plan_fingerprint:
            raise OverfillError(f"the training data of the run in '{self.out}' changed since it started (its batches "
                                f"are not the ones it trained on): restore the data, or start a new --out")
        self.accelerator.load_state(str(checkpoint))
        self.state = state
        self.state.setdefault("plan_fingerprint", self.plan_fingerprint)
        self.start_step = self.state["step"]
        saved = self.state.get("precision")
        if saved is not None and saved != self.precision.name:
            self.accelerator.print(f"warning: this run trained in {saved} and resumes in {self.precision.name} "
                                   f"({self.precision.reason}); pass --precision {saved} to keep it")
        done = self.start_step * self.cfg.grad_accum  # micro-batches of this process already trained on
        self.train_loader = self.accelerator.skip_first_batches(self.train_loader, done)
        self.accelerator.print(f"resuming from {checkpoint} (step {self.start_step} of {self.steps})")

    # ------------------------------------------------------------------------ loop

    def run(self) -> Path:
        from tqdm import tqdm

        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_temporaries(self.out)
            damaged = truncate_metrics(self.out / METRICS_FILE, self.start_step)
            if damaged:
                acc.print(f"warning: dropped {damaged} unreadable line(s) of {self.out / METRICS_FILE} "
                          "(a run killed while writing it)")
            (self.out / CONFIG_FILE).write_text(cfg.to_json())
        self.describe()
        wall = time.perf_counter()
        if self.val_loader is not None and self.start_step == 0:
            self.log({"step": 0, **self.validate()})
        batches = iter(self.train_loader)
        bar = tqdm(total=self.steps, initial=self.start_step, desc=f"train ({cfg.mode})", unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        try:
            record = self._train_steps(batches, bar)
        finally:
            bar.close()  # an error message then starts on a line of its own
        self.check_weights_finite(self.steps)
        self.save_final(record, time.perf_counter() - wall)
        return self.out

    def _train_steps(self, batches, bar) -> dict:
        cfg, record = self.cfg, {}
        for step in range(self.start_step + 1, self.steps + 1):
            record = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
            record["step"] = step
            if not math.isfinite(record["loss"]):
                raise self.diverged(step, f"its loss is {record['loss']}")
            if cfg.eval_every and self.val_loader is not None and (step % cfg.eval_every == 0 or step == self.steps):
                record.update(self.validate())
            self.log(record)
            self.save_snapshots(record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            pad=f"{record['padding']:.2f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.steps:
                self.check_weights_finite(step)
                self.save_checkpoint(step)
        return record

    def check_weights_finite(self, step: int) -> None:
        """Refuse to save weights that the last update made non-finite (its loss, before it, was finite)."""
        finite = torch.stack([p.detach().isfinite().all() for p in self.decoder.parameters()]).all()
        if self.accelerator.reduce((~finite).float(), "sum").item() > 0:  # every process decides the same
            raise self.diverged(step, "its update made the weights non-finite")

    def diverged(self, step: int, what: str) -> OverfillError:
        """The error that stops a diverged run: nothing more is written, the checkpoints stay."""
        newest = latest_checkpoint(self.out)
        kept = f"its checkpoints up to {newest.name} are kept" if newest else "it wrote no checkpoint"
        return OverfillError(f"training diverged at step {step} ({what}): no model is written and {kept}; "
                             f"lower --lr (now {self.cfg.lr:g}) or check the data")

    def train_step(self, micro_batches: list[dict[str, Tensor]]) -> dict:
        """One optimizer step over this process's micro-batches; metrics over all processes."""
        cfg, acc = self.cfg, self.accelerator
        started = time.perf_counter()
        local_tokens = sum(b["response_valid"].sum() for b in micro_batches)
        response_tokens = acc.reduce(local_tokens.float(), "sum")
        # accelerate divides by grad_accum, DDP/FSDP average over processes: undo both so the gradient
        # is that of the mean over the whole step's response tokens
        scale = acc.num_processes * cfg.grad_accum / response_tokens
        totals = torch.zeros(4, device=acc.device)  # ce sum, kl sum, tokens read, slots (tokens + padding)
        for batch in micro_batches:
            with acc.accumulate(self.decoder):
                with self.autocast():
                    ce, kl = response_losses(self.full, self.decoder, batch, cfg.mode, self.layer_map,
                                             kd=cfg.kd_weight > 0)
                acc.backward((cfg.ce_weight * ce.sum() + cfg.kd_weight * kl.sum()) * scale)
            real = batch["prompt_valid"].sum() + batch["response_valid"].sum()
            slots = batch["prompt_valid"].numel() + batch["response_valid"].numel()
            totals += torch.stack([ce.sum().detach(), kl.sum().detach(), real.float(), real.new_tensor(slots).float()])
        grad_norm = acc.clip_grad_norm_(self.decoder.parameters(), cfg.grad_clip or float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        ce_sum, kl_sum, tokens, slots = acc.reduce(totals, "sum").tolist()
        n = response_tokens.item()
        seconds = time.perf_counter() - started
        self.state["step"] += 1
        self.state["tokens"] += int(tokens)
        self.state["slots"] = self.state.get("slots", 0) + int(slots)
        self.state["response_tokens"] += int(n)
        self.state["train_seconds"] += seconds
        record = {"loss": (cfg.ce_weight * ce_sum + cfg.kd_weight * kl_sum) / n, "ce": ce_sum / n}
        if cfg.kd_weight:
            record["kl"] = kl_sum / n
        return record | {"lr": lr, "grad_norm": float(grad_norm), "tokens": self.state["tokens"],
                         "tokens_per_s": tokens / seconds, "padding": 1 - tokens / slots,
                         "precision": self.precision.name}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean cross-entropy over the validation examples' response tokens (all processes), and the mean
        KL(full || decoder) there where the full model is loaded."""
        acc, kd = self.accelerator, self.full is not None
        self.decoder.eval()
        sums, counts = [], []
        for batch in self.val_loader:
            with self.autocast():
                ce, kl = response_losses(self.full, self.decoder, batch, self.cfg.mode, self.layer_map, kd=kd)
            sums.append(acc.gather_for_metrics(torch.stack([ce, kl], 1)))  # [B * processes, 2], padding dropped
            counts.append(acc.gather_for_metrics(batch["response_valid"].sum(1)))
        self.decoder.train()
        ce_mean, kl_mean = (torch.cat(sums).sum(0) / torch.cat(counts).sum()).tolist()
        return {"val_loss": ce_mean, "val_kl": kl_mean} if kd else {"val_loss": ce_mean}

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")
        if "val_loss" in record:
            from tqdm import tqdm

            kl = f", val_kl {record['val_kl']:.4f}" if "val_kl" in record else ""
            tqdm.write(f"step {record['step']}: val_loss {record['val_loss']:.4f}{kl}")

    def describe(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
        acc.print(f"{cfg.mode}: {len(self.train_examples)} training examples, {len(self.val_examples)} validation; "
                  f"{self.steps} steps of {per_step} examples, {self.planned_tokens:,} tokens; "
                  f"{acc.num_processes} process(es) on {acc.device}; decoder {self.decoder_args.num_params():,} "
                  f"parameters; precision {self.precision.name} ({self.precision.reason})")

    # ------------------------------------------------------------------------ checkpoints and output

    def save_checkpoint(self, step: int) -> None:
        files = {STATE_FILE: json.dumps(self.state, indent=2), CONFIG_FILE: self.cfg.to_json()}
        save_checkpoint(self.accelerator, self.out, step, files, self.cfg.keep)

    def save_final(self, last: dict, wall_seconds: float) -> None:
        from .model import from_state_dict

        acc, cfg = self.accelerator, self.cfg
        state = acc.get_state_dict(self.decoder)  # a collective under FSDP: every process calls it
        val_loss = last.get("val_loss")
        if not self.is_main:
            acc.wait_for_everyone()
            return
        self.write_model(from_state_dict(self.decoder_args, state), self.out)
        (self.out / CONFIG_FILE).write_text(cfg.to_json())
        summary = {
            "mode": cfg.mode, "steps": self.state["step"], "tokens": self.state["tokens"],
            "response_tokens": self.state["response_tokens"],
            "tokens_per_s": self.state["tokens"] / max(self.state["train_seconds"], 1e-9),
            "train_seconds": self.state["train_seconds"], "wall_seconds": wall_seconds,
            "final_loss": last.get("loss"), "final_val_loss": val_loss,
            "processes": acc.num_processes, "device": str(acc.device), **self.precision.as_dict(),
            "padding": 1 - self.state["tokens"] / max(self.state.get("slots", 0), 1),
        }
        (self.out / SUMMARY_FILE).write_text(json.dumps(_json_safe(summary), indent=2))
        acc.wait_for_everyone()

    def write_model(self, decoder: Transformer, out: Path) -> None:
        """An OverFill directory (overfill mode) or a plain HF directory (pruned mode)."""
        from .model import save_model

        if self.cfg.mode == "pruned":
            save_model(decoder, out, config_from=self.decoder_dir)
            (out / "overfill.json").unlink(missing_ok=True)  # a plain HF directory, even from an OverFill one
            return
        config = self.pair_config
        config.full = self.cfg.full
        config.extra = {**config.extra, "training": asdict(self.cfg), "decoder_source": str(self.decoder_dir)}
        pair = TwoStageModel(self.full, decoder, self.tokenizer, config, full_dir=self.full_dir)
        pair.save_pretrained(out, decoder_config_from=self.decoder_dir)

    def save_snapshots(self, record: dict) -> None:
        """The model at each --snapshots budget the run has just reached: snapshots/tokens-N/ (+ state.json)."""
        from .model import from_state_dict

        due = [n for n in self.cfg.snapshots or [] if self.state["tokens"] >= n
               and not (self.out / SNAPSHOTS / f"tokens-{n}").is_dir()]
        if not due:
            return
        state = self.accelerator.get_state_dict(self.decoder)
        if self.is_main:
            decoder = from_state_dict(self.decoder_args, state)
            for n in due:
                final, tmp = self.out / SNAPSHOTS / f"tokens-{n}", self.out / SNAPSHOTS / f".tmp-tokens-{n}"
                if tmp.exists():
                    shutil.rmtree(tmp)
                self.write_model(decoder, tmp)
                (tmp / "snapshot.json").write_text(json.dumps({**self.state, **record, "budget": n}, indent=2))
                publish_dir(tmp, final)
                self.accelerator.print(f"snapshot at {self.state['tokens']:,} tokens (budget {n:,}) -> {final}")
        self.accelerator.wait_for_everyone()
