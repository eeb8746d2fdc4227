"""Reading the JSON files of a model or run directory, and checking an output path before any work.

Each failure becomes one `OverfillError` line that names the file: a malformed config must not
end in a traceback, and a bad `--out` must be refused before minutes of work, not after.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OverfillError


def read_json_object(path: str | os.PathLike, known: set[str] | None = None) -> dict:
    """The JSON object in `path`; with `known`, any other key is an error too (a typo is not ignored)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: malformed JSON, or not UTF-8
        raise OverfillError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise OverfillError(f"{path} must hold a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - known) if known is not None else []
    if unknown:
        raise OverfillError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return value


def _blocking_file(path: Path) -> Path | None:
    """The existing non-directory among `path`'s parents, if one is in the way."""
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output file path that cannot be written: a directory, or a path under a file."""
    path = Path(path)
    if path.is_dir():
        raise OverfillError(f"{flag} '{path}' is a directory: give a file path, e.g. {path / 'results.json'}")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise OverfillError(f"{flag} '{path}' lies under '{blocking}', which is a file, not a directory")
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output directory path that is a file or lies under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OverfillError(f"{flag} '{path}' is a file: give a directory")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise OverfillError(f"{flag} '{path}' lies under '{blocking}', which is a file, not a directory")
    return path


def check_not_an_input(out: Path, inputs: dict[str, str]) -> None:
    """Refuse an output directory that is, or lies inside, a model directory given as an input."""
    target = out.resolve()
    for flag, ref in inputs.items():
        source = Path(ref)
        if source.is_dir() and (target == source.resolve() or source.resolve() in target.parents):
            raise OverfillError(f"--out '{out}' is inside the {flag} model directory '{ref}': it would be "
                                f"overwritten; choose another --out")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed over `path` when the block ends without an
    error: a reader (or a resumed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a finished directory into place. An old one is renamed aside first and deleted after, so
    `final` is always either the old directory or the new one, and a deletion cut short leaves only
    a `.trash-` directory behind."""
    tmp, final = Path(tmp), Path(final)
    trash = final.with_name(f".trash-{final.name}")
    if trash.exists():
        shutil.rmtree(trash)
    if final.exists():
        os.replace(final, trash)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)
    return final
