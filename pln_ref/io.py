"""Atomic file writes: a crash or a kill never leaves a torn result behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_savez"]


def atomic_savez(path: str | os.PathLike, arrays: dict, *, compressed: bool = False) -> Path:
    """Write ``arrays`` to ``path`` (.npz) via a temporary file in the same directory and
    ``os.replace``: readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.npz")
    os.close(fd)
    try:
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
