"""Writing files so that a reader never sees half of one: write a temporary file next to the target, flush
and fsync it, then `os.replace` it over the target (atomic on POSIX file systems: a reader opens either the
old file or the complete new one). A failure (full disk, unwritable folder) removes the temporary file and
raises `OutputError`, one line naming the path; the previous file, if any, is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from medsight.faults import SimulatedKill, should_die_writing


class OutputError(RuntimeError):
    """An output file or folder cannot be written (full disk, no permission); the message names the path."""


def describe_os_error(path: Path | str, err: OSError) -> str:
    """`cannot write <path>: <reason>` with the usual causes spelt out."""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "permission denied (is the output folder writable?)" if err.errno != errno.EROFS else \
            "read-only file system"
    return f"cannot write {path}: {reason}"


def tmp_path(path: Path) -> Path:
    """The temporary sibling of `path` used while it is written (hidden; one per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[BinaryIO]:
    """Open a temporary sibling of `path` for binary writing; on a clean exit make it `path` atomically.

    `MEDSIGHT_FAULT=write:<name>` (medsight.faults) stops half-way: the temporary file is cut to half its
    bytes and left behind, as after a kill, and `path` is not replaced.
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
    except OSError as err:
        raise OutputError(describe_os_error(path, err)) from None
    try:
        with f:
            yield f
            f.flush()
            if should_die_writing(path.name):
                f.truncate(max(0, f.tell() // 2))
                raise SimulatedKill(f"MEDSIGHT_FAULT: killed while writing {path}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except SimulatedKill:
        raise  # a kill leaves its temporary file, as a real one would
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(describe_os_error(path, err)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path | str, data: bytes) -> None:
    """`path.write_bytes(data)`, atomically."""
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: Path | str, text: str) -> None:
    """`path.write_text(text)` (UTF-8), atomically."""
    write_bytes(path, text.encode("utf-8"))


def check_writable(folder: Path | str) -> None:
    """Fail early, naming the folder, when `folder` cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".medsight-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(describe_os_error(folder, err)) from None


__all__ = ["OutputError", "atomic_file", "check_writable", "describe_os_error", "tmp_path", "write_bytes",
           "write_text"]
