"""Training: the OverFill decoder (full model frozen) and the pruned baseline.

`overfill` mode trains the decoder as it will run: the frozen full model prefills the prompt
and predicts the first response token; the decoder writes the rest of the response reading
the full model's keys and values at the prompt positions (`two_stage.split_logits`). `pruned`
mode trains the decoder alone on prompt + response (completion-only SFT, the paper's
baseline). Both see the same examples in the same order for the same seed and budget, and
both take the loss on the response tokens only:

    loss = sum of cross-entropy over the step's response tokens / their number
         + kd_weight * the same mean of KL(full || decoder)

normalised by the response tokens of the whole optimizer step (all micro-batches, all
processes), so gradient accumulation and data parallelism change nothing but float rounding.

Scale-out is HuggingFace `accelerate`: the same code runs alone or under
`accelerate launch` / `torchrun` (DDP or FSDP). Only the main process writes files, except
the per-process RNG states that `accelerate` puts in each checkpoint.

Output directory:
    train_config.json    the TrainConfig of the run
    metrics.jsonl        one line per optimizer step (loss, lr, tokens/s, val_loss when computed)
    summary.json         tokens seen, tokens/s, wall time, final losses
    checkpoints/step-N/  the last `keep` checkpoints (accelerate state + trainer_state.json)
    the model: an OverFill directory (overfill mode) or a plain HF directory (pruned mode)
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import OverfillError
from .model import Transformer, causal_mask, positions_from_padding
from .two_stage import TwoStageModel, split_logits

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
DEFAULT_STEPS = 1000
KD_CHUNK = 1024  # response tokens whose teacher logits `[chunk, V]` exist at once
# What --resume may change: none of these alter the loss curve.
RESUMABLE = {"out", "resume", "checkpoint_every", "keep", "eval_every", "val_examples", "grad_checkpointing"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    kd_weight: float = field(default=0.0, metadata={
        "help": "weight of KL(full || decoder) on the response tokens, added to the cross-entropy"})
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
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the decoder's activations in the backward pass (less memory, ~30%% slower)"})
    full_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "dtype of the frozen full model; auto: bfloat16 on GPU, float32 on CPU"})

    def __post_init__(self) -> None:
        if self.mode not in ("overfill", "pruned"):
            raise OverfillError(f"mode must be 'overfill' or 'pruned', got '{self.mode}'")
        if self.full_dtype not in ("auto", *DTYPES):
            raise OverfillError(f"full_dtype must be auto or one of {', '.join(DTYPES)}, got '{self.full_dtype}'")
        if self.steps is not None and self.tokens is not None:
            raise OverfillError("give --steps or --tokens, not both")
        if self.steps is None and self.tokens is None:
            self.steps = DEFAULT_STEPS
        positive = {"steps": self.steps or 1, "tokens": self.tokens or 1, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "keep": self.keep, "val_examples": self.val_examples}
        at_least_zero = {"kd_weight": self.kd_weight, "warmup": self.warmup, "grad_clip": self.grad_clip,
                         "weight_decay": self.weight_decay, "checkpoint_every": self.checkpoint_every,
                         "eval_every": self.eval_every}
        bad = [f"{k} must be positive (got {v})" for k, v in positive.items() if v < 1]
        bad += [f"{k} must be >= 0 (got {v})" for k, v in at_least_zero.items() if v < 0]
        if not self.lr > 0:
            bad.append(f"lr must be positive (got {self.lr})")
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
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise OverfillError(f"{path} is malformed: {e}") from None

    def changes_from(self, saved: "TrainConfig") -> list[str]:
        """Settings that differ from `saved` and would change the loss curve of a resumed run."""
        return [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(self, f.name)!r}" for f in fields(self)
                if f.name not in RESUMABLE and getattr(self, f.name) != getattr(saved, f.name)]


TrainArgs = TrainConfig  # the `overfill train` flags are the config's fields


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; return the output directory (see the module docstring)."""
    out = Path(cfg.out)
    if cfg.resume and (out / SUMMARY_FILE).is_file():
        check_resumable(cfg, out)
        print(f"{out}: this run has already finished ({SUMMARY_FILE} exists)")
        return out
    return Trainer(cfg).run()


def train_command(args: TrainArgs) -> None:
    train(args)


# ---------------------------------------------------------------------------- losses

def response_losses(full: Transformer | None, decoder: torch.nn.Module, batch: dict[str, Tensor], mode: str,
                    layer_map: list[int] | None = None, kd: bool = False) -> tuple[Tensor, Tensor]:
    """Per-example sums over the response tokens: cross-entropy `[B]` and KL(full || decoder) `[B]`.

    batch: `collate` output. overfill: two-stage logits, the full model's at prompt positions (its
    prefill predicts the first response token, with no gradient, as at inference), the decoder's
    after. pruned: the decoder alone on the whole sequence. The KD teacher is the full model's
    next-token distribution given the whole sequence (zeros when kd is False).
    """
    tokens, attention_mask, loss_mask = batch["tokens"], batch["attention_mask"], batch["loss_mask"]
    if mode == "overfill":
        logits, full_hidden = split_logits(full, decoder, tokens, attention_mask, batch["prompt_mask"], layer_map)
    else:
        positions = positions_from_padding(attention_mask)  # [B, T]
        mask = causal_mask(attention_mask, torch.arange(tokens.shape[1], device=tokens.device))  # [B, 1, T, T]
        logits = decoder(tokens, positions, mask)  # [B, T, V]
        full_hidden = None
        if kd:
            with torch.no_grad():
                full_hidden = full.hidden(tokens, positions, mask)  # [B, T, D_full]
    student = logits[loss_mask].float()  # [N, V]
    ce = F.cross_entropy(student, batch["targets"][loss_mask], reduction="none")  # [N]
    kl = kl_per_token(student, full_hidden[loss_mask], full.lm_head) if kd else torch.zeros_like(ce)
    rows = loss_mask.nonzero()[:, 0]  # [N] the example of each response token
    zeros = torch.zeros(tokens.shape[0], device=ce.device)
    return zeros.index_add(0, rows, ce), zeros.index_add(0, rows, kl)


def kl_per_token(student_logits: Tensor, teacher_hidden: Tensor, lm_head: torch.nn.Module,
                 chunk: int = KD_CHUNK) -> Tensor:
    """KL(teacher || student) per token `[N]`; the teacher's logits are made `chunk` tokens at a time.

    student_logits `[N, V]` (with gradient), teacher_hidden `[N, D]`: final-norm hidden states of
    the full model, whose vocabulary-sized logits never exist all at once.
    """
    parts = []
    for start in range(0, student_logits.shape[0], chunk):
        with torch.no_grad():
            teacher = lm_head(teacher_hidden[start:start + chunk]).float().log_softmax(-1)  # [n, V]
        student = student_logits[start:start + chunk].log_softmax(-1)  # [n, V]
        parts.append(F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1))
    return torch.cat(parts) if parts else student_logits.new_zeros(0)


# ---------------------------------------------------------------------------- data order

def epoch_order(n: int, seed: int) -> Iterator[int]:
    """Example indices, epoch after epoch, each epoch a new seeded permutation."""
    rng = random.Random(seed)  # Python's generator: the same order on every machine and torch version
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def batch_plan(lengths: list[int], per_step: int, seed: int, steps: int | None = None,
               tokens: int | None = None) -> list[int]:
    """The example indices of the whole run in order, `per_step` (the global batch) per step.

    Depends on the data, the seed and the global batch only, never on the mode, so the OverFill
    decoder and the pruned baseline see the same examples in the same order. With a token budget:
    the fewest steps whose examples hold `tokens` tokens (`lengths` are prompt + response).
    """
    order = epoch_order(len(lengths), seed)
    if tokens is None:
        return list(islice(order, steps * per_step))
    plan, seen = [], 0
    while seen < tokens:
        step = list(islice(order, per_step))
        plan += step
        seen += sum(lengths[i] for i in step)
    return plan


# ---------------------------------------------------------------------------- output directory

def check_resumable(cfg: TrainConfig, out: Path) -> None:
    saved = out / CONFIG_FILE
    if not saved.is_file():
        return
    changes = cfg.changes_from(TrainConfig.from_json(saved))
    if changes:
        raise OverfillError(f"cannot resume the run in '{out}' with other settings ({'; '.join(changes)}): "
                            f"use the saved settings ({saved}) or a new --out")


def check_out_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OverfillError(f"--out '{out}' is a file")
    if cfg.resume:
        check_resumable(cfg, out)
    elif out.is_dir() and any(out.iterdir()):
        raise OverfillError(f"'{out}' is not empty: pass --resume to continue the run it holds, or choose a new --out")


def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoints, oldest first (an incomplete one still has its temporary name)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoint_dirs(out)
    return found[-1] if found else None


def remove_dir(path: Path) -> None:
    """Rename, then delete: a deletion cut short leaves no half-deleted checkpoint behind."""
    trash = path.with_name(f".trash-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def clean_temporaries(out: Path) -> None:
    root = out / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines an interrupted run logged after the checkpoint it resumes from (all, from step 0)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the run

def full_model_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    cuda = torch.cuda.is_available()
    return Accelerator(
        # the loop gathers each step's micro-batches first, so the end of the data is no step boundary
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
        mixed_precision="bf16" if cuda else "no",
        cpu=not cuda,  # lets plain torchrun on a CPU machine run several gloo processes
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
        self.accelerator = make_accelerator(cfg)
        set_seed(cfg.seed)
        self.load_models()
        self.load_data()
        self.build_optimizer()
        self.start_step, self.state = 0, {"step": 0, "tokens": 0, "response_tokens": 0, "train_seconds": 0.0}
        checkpoint = latest_checkpoint(self.out) if cfg.resume else None
        if checkpoint is not None:
            self.restore(checkpoint)
        self.accelerator.wait_for_everyone()  # every process has checked --out before the main one writes there

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
            full.requires_grad_(False)
            self.full = full.to(device=device, dtype=full_model_dtype(cfg.full_dtype)).eval()
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
        from .data import collate, load_examples

        cfg, world = self.cfg, self.accelerator.num_processes
        per_step = cfg.batch_size * cfg.grad_accum * world
        needed = cfg.steps * per_step if cfg.tokens is None else None  # a step budget needs no more examples
        self.train_examples = load_examples(cfg.data, self.tokenizer, "train", cfg.max_len, cfg.prompt_budget,
                                            limit=needed, seed=cfg.seed)
        self.val_examples = []
        if cfg.eval_every:
            try:
                self.val_examples = load_examples(cfg.data, self.tokenizer, "validation", cfg.max_len,
                                                  cfg.prompt_budget, limit=cfg.val_examples, seed=cfg.seed)
            except OverfillError as e:
                raise OverfillError(f"{e}; pass --eval-every 0 to train without a validation loss") from None
        lengths = [len(e.prompt_ids) + len(e.response_ids) for e in self.train_examples]
        plan = batch_plan(lengths, per_step, cfg.seed, cfg.steps if cfg.tokens is None else None, cfg.tokens)
        self.steps = len(plan) // per_step
        self.planned_tokens = sum(lengths[i] for i in plan)
        batches = partial(torch.utils.data.DataLoader, batch_size=cfg.batch_size,
                          collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))
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

    def restore(self, checkpoint: Path) -> None:
        self.accelerator.load_state(str(checkpoint))
        self.state = json.loads((checkpoint / STATE_FILE).read_text())
        self.start_step = self.state["step"]
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
            truncate_metrics(self.out / METRICS_FILE, self.start_step)
            (self.out / CONFIG_FILE).write_text(cfg.to_json())
        self.describe()
        wall = time.perf_counter()
        if self.val_loader is not None and self.start_step == 0:
            self.log({"step": 0, "val_loss": self.validate()})
        batches = iter(self.train_loader)
        bar = tqdm(total=self.steps, initial=self.start_step, desc=f"train ({cfg.mode})", unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        record: dict = {}
        for step in range(self.start_step + 1, self.steps + 1):
            record = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
            record["step"] = step
            if cfg.eval_every and self.val_loader is not None and (step % cfg.eval_every == 0 or step == self.steps):
                record["val_loss"] = self.validate()
            self.log(record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.steps:
                self.save_checkpoint(step)
        bar.close()
        self.save_final(record, time.perf_counter() - wall)
        return self.out

    def train_step(self, micro_batches: list[dict[str, Tensor]]) -> dict:
        """One optimizer step over this process's micro-batches; metrics over all processes."""
        cfg, acc = self.cfg, self.accelerator
        started = time.perf_counter()
        local_tokens = sum(b["loss_mask"].sum() for b in micro_batches)
        response_tokens = acc.reduce(local_tokens.float(), "sum")
        # accelerate divides by grad_accum, DDP/FSDP average over processes: undo both so the gradient
        # is that of the mean over the whole step's response tokens
        scale = acc.num_processes * cfg.grad_accum / response_tokens
        totals = torch.zeros(3, device=acc.device)  # ce sum, kl sum, tokens read
        for batch in micro_batches:
            with acc.accumulate(self.decoder):
                with acc.autocast():
                    ce, kl = response_losses(self.full, self.decoder, batch, cfg.mode, self.layer_map,
                                             kd=cfg.kd_weight > 0)
                acc.backward((ce.sum() + cfg.kd_weight * kl.sum()) * scale)
            totals += torch.stack([ce.sum().detach(), kl.sum().detach(), batch["attention_mask"].sum().float()])
        grad_norm = acc.clip_grad_norm_(self.decoder.parameters(), cfg.grad_clip or float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        ce_sum, kl_sum, tokens = acc.reduce(totals, "sum").tolist()
        n = response_tokens.item()
        seconds = time.perf_counter() - started
        self.state["step"] += 1
        self.state["tokens"] += int(tokens)
        self.state["response_tokens"] += int(n)
        self.state["train_seconds"] += seconds
        record = {"loss": (ce_sum + cfg.kd_weight * kl_sum) / n, "ce": ce_sum / n}
        if cfg.kd_weight:
            record["kl"] = kl_sum / n
        return record | {"lr": lr, "grad_norm": float(grad_norm), "tokens": self.state["tokens"],
                         "tokens_per_s": tokens / seconds}

    @torch.no_grad()
    def validate(self) -> float:
        """Mean cross-entropy over the validation examples' response tokens (all processes)."""
        acc = self.accelerator
        self.decoder.eval()
        ce_sums, counts = [], []
        for batch in self.val_loader:
            with acc.autocast():
                ce, _ = response_losses(self.full, self.decoder, batch, self.cfg.mode, self.layer_map)
            ce_sums.append(acc.gather_for_metrics(ce))  # [B * processes], padding examples dropped
            counts.append(acc.gather_for_metrics(batch["loss_mask"].sum(1)))
        self.decoder.train()
        return (torch.cat(ce_sums).sum() / torch.cat(counts).sum()).item()

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if "val_loss" in record:
            from tqdm import tqdm

            tqdm.write(f"step {record['step']}: val_loss {record['val_loss']:.4f}")

    def describe(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
        acc.print(f"{cfg.mode}: {len(self.train_examples)} training examples, {len(self.val_examples)} validation; "
                  f"{self.steps} steps of {per_step} examples, {self.planned_tokens:,} tokens; "
                  f"{acc.num_processes} process(es) on {acc.device}; decoder {self.decoder_args.num_params():,} "
                  f"parameters")

    # ------------------------------------------------------------------------ checkpoints and output

    def save_checkpoint(self, step: int) -> None:
        """accelerate state + trainer state into a temporary directory, then one rename."""
        acc, root = self.accelerator, self.out / CHECKPOINTS
        final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(self.state, indent=2))
            (tmp / CONFIG_FILE).write_text(self.cfg.to_json())
            if final.exists():
                remove_dir(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.out)[:-self.cfg.keep]:
                remove_dir(old)
        acc.wait_for_everyone()

    def save_final(self, last: dict, wall_seconds: float) -> None:
        from .model import from_state_dict, save_model

        acc, cfg = self.accelerator, self.cfg
        state = acc.get_state_dict(self.decoder)  # a collective under FSDP: every process calls it
        val_loss = last.get("val_loss")
        if not self.is_main:
            acc.wait_for_everyone()
            return
        decoder = from_state_dict(self.decoder_args, state)
        if cfg.mode == "overfill":
            self.save_overfill(decoder)
        else:
            save_model(decoder, self.out, config_from=self.decoder_dir)
            (self.out / "overfill.json").unlink(missing_ok=True)  # a plain HF directory, even from an OverFill one
        (self.out / CONFIG_FILE).write_text(cfg.to_json())
        summary = {
            "mode": cfg.mode, "steps": self.state["step"], "tokens": self.state["tokens"],
            "response_tokens": self.state["response_tokens"],
            "tokens_per_s": self.state["tokens"] / max(self.state["train_seconds"], 1e-9),
            "train_seconds": self.state["train_seconds"], "wall_seconds": wall_seconds,
            "final_loss": last.get("loss"), "final_val_loss": val_loss,
            "processes": acc.num_processes, "device": str(acc.device),
        }
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        print(f"trained {cfg.mode} decoder -> {self.out}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
              f"{summary['tokens_per_s']:.0f} tokens/s, final loss {summary['final_loss']}, "
              f"val loss {val_loss}, {wall_seconds:.0f} s")
        acc.wait_for_everyone()

    def save_overfill(self, decoder: Transformer) -> None:
        config = self.pair_config
        config.full = self.cfg.full
        config.extra = {**config.extra, "training": asdict(self.cfg), "decoder_source": str(self.decoder_dir)}
        pair = TwoStageModel(self.full, decoder, self.tokenizer, config)
        pair.save_pretrained(self.out, decoder_config_from=self.decoder_dir)
