"""Teacher-written training data: the full model answers the training prompts itself.

The OverFill decoder's job is to continue a response as its own full model would. Text written
by that full model is therefore a target a decoder of this size can fit (sequence-level
distillation, Kim and Rush 2016), unlike a dataset's responses written by a much larger model.

`teach` takes the prompts of a data source's examples (train and validation splits, in the
trainer's seeded order), has the full model answer them with the engine's continuous batcher (at
the precision `--precision` picks, sampled with a per-example seed), and writes one JSON line per
example, in prompt order:

    {"id": <the source record's split key>, "uid": <the example's uid>,
     "prompt_ids": [...], "response_ids": [...], "response": <its text>, "finish": "stop"|"length"}

`data.py` reads such a file as token records, so both training modes train on exactly these
tokens; the split key is the source record's, so every example stays in its split. The run is
resumable: lines are appended as answers finish, and a rerun skips the uids already written.
`<out>.meta.json` records the full model, the prompt set, the sampling settings and the seed.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .errors import OverfillError

META_SUFFIX = ".meta.json"


@dataclass
class TeachConfig:
    """One teacher-data run; saved as `<out>.meta.json` beside the data."""

    out: str = field(metadata={"help": "the output .jsonl (or .jsonl.gz, written at the end)"})
    full: str = field(default="smollm2-135m-instruct", metadata={"help": "the full model that writes the responses"})
    data: str = field(default="sharegpt", metadata={"help": "where the prompts come from (as `train --data`)"})
    examples: int = field(default=2000, metadata={"help": "training-split prompts to answer (the first N of the "
                                                          "trainer's seeded order)"})
    val_examples: int = field(default=200, metadata={"help": "validation-split prompts to answer"})
    max_len: int = field(default=512, metadata={"help": "prompt + response tokens, as the trainer's --max-len"})
    max_prompt_len: int | None = field(default=None, metadata={"help": "prompt tokens kept; default 3/4 of --max-len"})
    max_new_tokens: int = field(default=256, metadata={"help": "response tokens at most (also cut to fit --max-len)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt order (as train --seed) and of the sampling"})
    batch_size: int = field(default=8, metadata={"help": "prompts decoded together"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={"help": "auto: bf16 where faster"})

    def __post_init__(self) -> None:
        positive = {"examples": self.examples, "max_len": self.max_len, "max_new_tokens": self.max_new_tokens,
                    "batch_size": self.batch_size}
        bad = [f"--{k.replace('_', '-')} must be positive (got {v})" for k, v in positive.items() if v < 1]
        if self.val_examples < 0:
            bad.append(f"--val-examples must be >= 0 (got {self.val_examples})")
        if not 0 < self.prompt_budget < self.max_len:
            bad.append(f"need 0 < max_prompt_len < max_len (got {self.prompt_budget} and {self.max_len})")
        if not self.out.endswith((".jsonl", ".jsonl.gz")):
            bad.append(f"--out must end in .jsonl or .jsonl.gz (got '{self.out}')")
        if bad:
            raise OverfillError("bad teacher settings: " + "; ".join(bad))

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_len if self.max_prompt_len is not None else self.max_len * 3 // 4

    def sampling(self, uid: str):
        from .engine import SamplingParams

        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p,
                              seed=example_seed(self.seed, uid)).validate()


def example_seed(seed: int, uid: str) -> int:
    """A per-example sampling seed: the same text for the same example whatever the batch or a resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{uid}".encode()).digest()[:8], "little") >> 1


def teach(cfg: TeachConfig) -> Path:
    """Write the teacher's responses (see the module docstring); return the output path."""
    out = Path(cfg.out)
    partial = _partial_path(out)
    _check_writable(out, partial)
    model = _load_teacher(cfg)
    prompts = _prompts(cfg, model.tokenizer)
    done = _done_uids(partial) & {uid for _, uid, _ in prompts}
    todo = [p for p in prompts if p[1] not in done]
    _write_meta(out, cfg, len(prompts))
    print(f"teacher {cfg.full}: {len(prompts)} prompts ({len(done)} done), up to {cfg.batch_size} at a time",
          flush=True)
    with partial.open("a", encoding="utf-8") as f:
        _answer_all(model, cfg, todo, f, initial=len(prompts) - len(todo), total=len(prompts))
    _publish(partial, out, [uid for _, uid, _ in prompts])
    _write_meta(out, cfg, len(prompts), finished=True)
    return out


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".gz") + ".partial")


def _check_writable(out: Path, partial: Path) -> None:
    if out.exists():
        raise OverfillError(f"'{out}' exists already: choose another --out (a stopped run resumes from "
                            f"'{partial.name}' by itself)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("a"):
            pass
    except OSError as e:
        raise OverfillError(f"cannot write '{partial}': {e.strerror}") from None


def _load_teacher(cfg: TeachConfig):
    from .device import pick_device, resolve_precision
    from .two_stage import TwoStageModel

    device = pick_device("auto")
    precision = resolve_precision(cfg.precision, device)
    print(f"precision {precision.name} ({precision.reason})", flush=True)
    return TwoStageModel.from_refs(cfg.full, None, dtype=precision.dtype, device=device)


def _prompts(cfg: TeachConfig, tokenizer) -> list[tuple[str, str, list[int]]]:
    """(split key, uid, prompt ids) of the first examples of each split, in the trainer's order."""
    from .data import load_examples

    prompts = []
    for split, n in (("train", cfg.examples), ("validation", cfg.val_examples)):
        if n:
            for e in load_examples(cfg.data, tokenizer, split, cfg.max_len, cfg.prompt_budget, limit=n, seed=cfg.seed):
                prompts.append((e.key, e.uid, e.prompt_ids))
    return prompts


def _done_uids(partial: Path) -> set[str]:
    """The uids already answered; a last line cut off by a kill is dropped from the file."""
    if not partial.is_file():
        return set()
    lines = partial.read_text(encoding="utf-8").splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    if len(complete) != len(lines):
        partial.write_text("".join(complete), encoding="utf-8")
    return {json.loads(line)["uid"] for line in complete if line.strip()}


def _answer_all(model, cfg: TeachConfig, todo: list[tuple[str, str, list[int]]], f, initial: int,
                total: int) -> None:
    """Answer the prompts with the engine's continuous batcher (a finished row takes the next prompt at
    once, so no row idles until the batch's longest answer ends); each answer is appended to `f`."""
    from collections import deque

    from tqdm import tqdm

    from .engine.continuous import ContinuousBatcher, Job

    batcher = ContinuousBatcher(model, max_batch=cfg.batch_size, refresh_every=0)
    bar = tqdm(total=total, initial=initial, desc="teacher", unit="prompt", dynamic_ncols=True)
    eos, started, generated = model.tokenizer.eos_token_id, time.perf_counter(), 0
    failures: list[str] = []  # the batcher swallows a sink's exceptions (it cancels the job): collect them

    def job(key: str, uid: str, ids: list[int]) -> Job:
        tokens: list[int] = []

        def sink(event) -> None:
            nonlocal generated
            if event.error is not None:
                failures.append(f"the teacher failed on '{uid}': {event.error}")
                return
            if event.token is not None:
                tokens.append(event.token)
            if event.finish_reason is None:
                return
            response = tokens + ([eos] if event.finish_reason == "stop" else [])  # it learns to stop
            line = {"id": key, "uid": uid, "prompt_ids": list(ids), "response_ids": response,
                    "response": model.tokenizer.decode(tokens, skip_special_tokens=True),
                    "finish": event.finish_reason}
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a killed run keeps every finished answer
            generated += len(tokens)
            bar.update()
            bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.0f}")

        params = cfg.sampling(uid)
        params.max_new_tokens = min(cfg.max_new_tokens, cfg.max_len - len(ids))
        return Job(list(ids), params, sink)

    waiting = deque(job(*p) for p in todo)
    while waiting or batcher.rows:
        batcher.admit(waiting)
        batcher.step()
    bar.close()
    if failures:
        raise OverfillError(f"{failures[0]} ({len(failures)} prompt(s) failed; rerun to retry them)")


def _publish(partial: Path, out: Path, order: list[str]) -> None:
    """The answers in prompt order (they were appended as they finished), written under the final name."""
    rank = {uid: i for i, uid in enumerate(order)}
    answered = {}  # uid -> line; answers to prompts outside this run's set (a rerun with fewer) are left out
    for line in partial.read_text(encoding="utf-8").splitlines(keepends=True):
        uid = json.loads(line)["uid"]
        if uid in rank:
            answered[uid] = line
    text = "".join(sorted(answered.values(), key=lambda line: rank[json.loads(line)["uid"]]))
    tmp = out.with_name(out.name + ".tmp")
    with (gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) if out.suffix == ".gz"
          else tmp.open("w", encoding="utf-8")) as dst:
        dst.write(text)
    os.replace(tmp, out)
    partial.unlink()


def _write_meta(out: Path, cfg: TeachConfig, prompts: int, finished: bool = False) -> None:
    from .model import weights_fingerprint
    from .hub import resolve

    meta = {"config": asdict(cfg), "prompts": prompts, "finished": finished,
            "full_weights": weights_fingerprint(resolve(cfg.full))}
    Path(str(out) + META_SUFFIX).write_text(json.dumps(meta, indent=2) + "\n")
