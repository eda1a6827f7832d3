"""Reading and writing the small files of a model directory: JSON with errors that name the file and
line, and atomic writes (temp file in the same directory, then rename) so that a crash or a full disk
never leaves a half-written file where a good one was.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


class ModelFileError(ValueError):
    """A model file that cannot be used as it is (the message names the file, the tensor or the key)."""


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plainly created file (or directory) would get; temp files start private."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(temp_path) for a temp file beside `path`, then rename it onto `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
