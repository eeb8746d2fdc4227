"""Reading the JSON files of a model or run directory, and checking an output path before any work.

Each failure becomes one `OverfillError` line that names the file: a malformed config must not
end in a traceback, and a bad `--out` must be refused before minutes of work, not after.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OverfillError

WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
"""What a full disk, a quota, a read-only mount or a missing permission raise while a file is written."""


def json_loads(text: str):
    """`json.loads`, with a value nested deeper than Python's recursion limit reported as malformed
    JSON (a JSONDecodeError, so a ValueError) rather than as a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def not_utf8(path: str | os.PathLike, e: UnicodeDecodeError, read: str = "block") -> OverfillError:
    """The error of a file that is not UTF-8 text; `e.start` counts from the start of the `read` decoded."""
    return OverfillError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start} of its "
                         f"{read}): convert it, e.g. `iconv -f latin1 -t utf-8`")


def read_json_object(path: str | os.PathLike, known: set[str] | None = None) -> dict:
    """The JSON object in `path`; with `known`, any other key is an error too (a typo is not ignored)."""
    path = Path(path)
    try:
        value = json_loads(path.read_text(encoding="utf-8"))
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


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output path whose directory cannot take a new file (read-only, no permission, no
    space for a directory entry): found by creating one, before any work, not after it."""
    path = Path(path)
    start = path if path.is_dir() else path.parent
    folder = next(p for p in [start, *start.parents] if p.exists())
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".overfill-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OverfillError(f"{flag} '{path}' cannot be written: {e.strerror} in '{folder}'") from None


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output file path that cannot be written: a directory, a path under a file, or a
    directory that takes no new file."""
    path = Path(path)
    if path.is_dir():
        raise OverfillError(f"{flag} '{path}' is a directory: give a file path, e.g. {path / 'results.json'}")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise OverfillError(f"{flag} '{path}' lies under '{blocking}', which is a file, not a directory")
    check_writable(path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output directory path that is a file, lies under one, or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OverfillError(f"{flag} '{path}' is a file: give a directory")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise OverfillError(f"{flag} '{path}' lies under '{blocking}', which is a file, not a directory")
    check_writable(path, flag)
    return path


def check_not_an_input(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                       flag: str = "--out") -> None:
    """Refuse an output that is an input, lies inside an input directory, or is a directory that
    holds an input: writing it (or replacing it) would destroy what the command reads.

    inputs: {how the input was given (a flag): its path}; references that are no local path
    (hub ids, built-in names not converted yet) and None are skipped.
    """
    target = Path(out).resolve()
    for name, ref in inputs.items():
        source = Path(ref).expanduser() if ref is not None else None
        if source is None or not source.exists():
            continue
        source = source.resolve()
        if target == source or source in target.parents:
            raise OverfillError(f"{flag} '{out}' is {'' if target == source else 'inside '}the {name} input "
                                f"'{ref}': it would be overwritten; choose another {flag}")
        if target in source.parents:
            raise OverfillError(f"{flag} '{out}' holds the {name} input '{ref}': writing there would replace "
                                f"it; choose another {flag}")


def write_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write, as each writer reports one; None if `e` is no write failure.

    safetensors reports Rust's io::Error in its message ("... (os error 28)"); torch.save's zip
    writer raises a RuntimeError with no error number at all.
    """
    if isinstance(e, OSError):
        return e if e.errno in WRITE_ERRORS else None
    text = str(e)
    code = re.search(r"\(os error (\d+)\)", text)
    if code and int(code.group(1)) in WRITE_ERRORS:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        return OSError(errno.EIO, "torch could not write a file (is the disk full?)")
    return None


@contextmanager
def write_errors_as_one_line(out: str | os.PathLike) -> Iterator[None]:
    """A full disk, a read-only place or a missing permission while writing `out`: one OverfillError line."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - each writer has its own error type (write_error sorts them)
        failed = write_error(e)
        if failed is None:
            raise
        raise OverfillError(f"cannot write '{out}': {failed.strerror}" +
                            (f" ({failed.filename})" if failed.filename else "")) from None


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


@contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A new temporary directory beside `final` to fill, published as `final` (`publish_dir`) when the
    block ends without an error and deleted when it does not: a failed write leaves no partial output."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        yield tmp
        publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
