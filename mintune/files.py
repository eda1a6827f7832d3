"""Reading and writing the small files of a model or run directory: text and JSON whose errors name the
file and line, and atomic writes (temp file in the same directory, then rename) so that a crash or a
full disk never leaves a half-written file where a good one was.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable


class ModelFileError(ValueError):
    """A model file that cannot be used as it is (the message names the file, the tensor or the key)."""


class DiskFullError(OSError):
    """The disk (or the user's quota) filled up while writing; the message names the file and the space."""


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a byte-order mark, as some editors write, is dropped); bytes that are not UTF-8
    are reported with the file, line and column."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path} line {line}, column {column}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                         "save the file as UTF-8") from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plainly created file (or directory) would get; temp files start private."""
    return (0o777 if directory else 0o666) & ~_umask()


def size_text(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


@contextmanager
def disk_full_named(path: str | Path, needed: int | None = None):
    """Turn 'no space left on device' (or over quota) inside the block into a DiskFullError that names
    `path`, the space it needed (when known) and the space free there."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, DiskFullError):
            raise
        path = Path(path)
        where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(where).free
        need = f"about {size_text(needed)} needed, " if needed else ""
        full = DiskFullError(f"{path}: the disk is full ({need}{size_text(free)} free there); "
                             "the files written before are intact: free some space and run again")
        full.errno = e.errno
        raise full from None


def atomic_write(path: str | Path, write: Callable[[Path], None], size: int | None = None) -> None:
    """Call write(temp_path) for a temp file beside `path`, then rename it onto `path`. `size`: the
    bytes it will take, named if the disk fills up."""
    path = Path(path)
    with disk_full_named(path, size):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(Path(tmp))
            with open(tmp, "rb") as f:  # on disk before the rename, so a power cut leaves old or new
                os.fsync(f.fileno())
            os.chmod(tmp, default_mode())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), size=len(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())

