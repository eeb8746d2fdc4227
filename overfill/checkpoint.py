"""A training run's directory: its files, its checkpoints, and the checks a resumed run must pass.

    train_config.json    the TrainConfig of the run
    metrics.jsonl        one line per optimizer step
    summary.json         written last: the run has finished
    checkpoints/step-N/  accelerate state + trainer_state.json + train_config.json, written under a
                         temporary name and renamed, so a listed checkpoint is complete
    snapshots/tokens-N/  the model at a --snapshots budget

`Trainer` (train.py) writes them; what can be decided from the directory alone is here.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import OverfillError
from .files import check_not_an_input, check_output_dir, json_loads, publish_dir, write_text_atomic

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"


def check_resumable(cfg, out: Path) -> None:
    """Refuse to resume the run in `out` with settings (a TrainConfig) that change its loss curve."""
    saved = out / CONFIG_FILE
    if not saved.is_file():
        return
    changes = cfg.changes_from(type(cfg).from_json(saved))
    if changes:
        raise OverfillError(f"cannot resume the run in '{out}' with other settings ({'; '.join(changes)}): "
                            f"use the saved settings ({saved}) or a new --out")


def check_out_dir(cfg) -> None:
    """--out of a TrainConfig: new or empty, or a run to --resume; never inside an input model."""
    out = check_output_dir(cfg.out)
    check_not_an_input(out, {"--full": cfg.full, "--decoder": cfg.decoder})
    holds_a_run = (out / CONFIG_FILE).is_file()
    if out.is_dir() and any(out.iterdir()) and not holds_a_run:
        hint = " (it holds no training run to resume)" if cfg.resume else ""
        raise OverfillError(f"'{out}' is not empty{hint}: choose a new --out")
    if cfg.resume:
        check_resumable(cfg, out)
    elif holds_a_run:
        raise OverfillError(f"'{out}' holds a training run: pass --resume to continue it, or choose a new --out")


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
    root = out / SNAPSHOTS
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path)


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the lines an interrupted run logged after the checkpoint it resumes from (all, from step 0).

    A line that does not parse (a kill mid-write leaves a partial last line) is dropped too;
    returns how many such lines there were.
    """
    if not path.is_file():
        return 0
    if step == 0:
        path.unlink()
        return 0
    kept, damaged = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json_loads(line)
            logged = int(record["step"])
        except (ValueError, TypeError, KeyError):
            damaged += 1
            continue
        if logged <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))
    return damaged


def save_checkpoint(accelerator, out: Path, step: int, files: dict[str, str], keep: int) -> None:
    """accelerate's state plus `files` (name: text) into a temporary directory, then one rename;
    the oldest checkpoints beyond `keep` are removed. Every process calls it."""
    root = out / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    main = accelerator.is_main_process
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet_about_tied_weights():
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main:
        for name, text in files.items():
            (tmp / name).write_text(text)
        publish_dir(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            remove_dir(old)
    accelerator.wait_for_everyone()


class _TiedWeightsNote(logging.Filter):
    """accelerate's "Removed shared tensor {'lm_head.weight'} while saving" for a decoder whose output
    layer is its embedding: expected (loading ties them again), so not for the run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # after a "[RANK 0] " prefix


@contextmanager
def _quiet_about_tied_weights():
    saver = logging.getLogger("accelerate.utils.other")  # accelerate's safetensors saving
    note = _TiedWeightsNote()
    saver.addFilter(note)
    try:
        yield
    finally:
        saver.removeFilter(note)


def restore_newest(accelerator, out: Path, restore: Callable[[Path], None]) -> None:
    """`restore` the newest checkpoint that loads. One that does not (cut off on a full disk,
    corrupted) is renamed `damaged-step-N`, kept for a look but not tried again, and the one
    before it is used."""
    damaged = 0
    for checkpoint in reversed(checkpoint_dirs(out)):
        try:
            restore(checkpoint)
            return
        except OverfillError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a damaged file raises (safetensors, pickle, OS)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if accelerator.is_main_process:
                os.replace(checkpoint, checkpoint.with_name(f"damaged-{checkpoint.name}"))
            accelerator.print(f"warning: checkpoint {checkpoint} does not load ({reason[:200]}); set aside "
                              f"as damaged-{checkpoint.name}, trying the one before it")
            accelerator.wait_for_everyone()
            damaged += 1
    if damaged:  # the failed loads may have changed some weights: do not train on from them
        raise OverfillError(f"no checkpoint in '{out / CHECKPOINTS}' loads (set aside as damaged-step-*): "
                            f"start a new --out, or rename one back if it can be repaired")
