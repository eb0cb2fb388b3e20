"""Atomic file writes: a crash or a kill never leaves a torn result behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_savez", "atomic_write_text", "atomic_write_json", "jsonable"]


def _atomic_write(path: str | os.PathLike, suffix: str, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, fsync it, then
    ``os.replace`` it onto ``path``: readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_savez(path: str | os.PathLike, arrays: dict, *, compressed: bool = False) -> Path:
    """Write ``arrays`` to ``path`` (.npz) atomically (temporary file + ``os.replace``)."""
    return _atomic_write(path, ".tmp.npz", lambda fh: (np.savez_compressed if compressed else np.savez)(fh, **arrays))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file + ``os.replace``)."""
    return _atomic_write(path, ".tmp", lambda fh: fh.write(text.encode("utf-8")))


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy arrays and scalars turned into JSON types, recursively through dicts,
    lists and tuples (keys become strings); non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    """Write ``jsonable(obj)`` as JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=indent))
