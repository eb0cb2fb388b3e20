"""Reading count data from files, with one-line errors that name the file and the problem.

``read_anndata(path)`` accepts an AnnData ``.h5ad`` file (optionally opened backed, so the counts
stay on disk) or a ``.zarr`` store. Anything else (a directory, a text file named ``.h5ad``, a
plain HDF5 file, a ``.csv``/``.npz``/``.mtx``) is refused with a ValueError saying what the file
is and what to do, instead of a reader's traceback. ``check_checkpoint(path)`` does the same for a
Laplace checkpoint given to ``resume`` (an ``.npz`` written by ``checkpoint``), and
``check_output_path(path, extensions)`` checks, before any work, that an output can be written.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["read_anndata", "check_checkpoint", "check_output_path", "InputFileError"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CONVERT = {
    ".csv": "anndata.read_csv(path).write_h5ad('data.h5ad') (cells as rows)",
    ".tsv": "anndata.read_text(path, delimiter='\\t').write_h5ad('data.h5ad')",
    ".txt": "anndata.read_text(path).write_h5ad('data.h5ad')",
    ".mtx": "anndata.read_mtx(path).write_h5ad('data.h5ad') (transpose if genes are rows)",
    ".loom": "anndata.read_loom(path).write_h5ad('data.h5ad')",
    ".npz": "anndata.AnnData(counts).write_h5ad('data.h5ad')",
    ".npy": "anndata.AnnData(numpy.load(path)).write_h5ad('data.h5ad')",
}


class InputFileError(ValueError):
    """An input file that cannot be read as count data (the message is one line)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def read_anndata(path: str | os.PathLike, *, backed: bool = False):
    """The AnnData stored at ``path`` (.h5ad, or a .zarr directory store).

    ``backed=True`` opens an .h5ad read-only without loading X into memory
    (``anndata.read_h5ad(path, backed="r")``). Raises ``InputFileError`` (a ValueError) with one
    line naming the file and the problem for a missing path, a directory that is not a zarr store,
    an unsupported extension, a non-HDF5 file and an HDF5 file that is not an AnnData.
    """
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file")
    if p.is_dir():
        if (p / ".zattrs").exists() or (p / "zarr.json").exists() or p.suffix == ".zarr":
            try:
                return ad.read_zarr(p)
            except Exception as exc:
                raise InputFileError(f"{p}: not a readable AnnData zarr store ({_first_line(exc)})") from None
        raise InputFileError(f"{p} is a directory, not an .h5ad file or a .zarr store")
    ext = p.suffix.lower()
    if ext in _CONVERT:
        raise InputFileError(f"{p}: {ext} files are not read directly; convert it first: {_CONVERT[ext]}")
    if ext != ".h5ad":
        raise InputFileError(f"{p}: unknown input format {ext or '(no extension)'!r}; give an AnnData .h5ad file")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head != _HDF5_SIGNATURE:
        kind = "an empty file" if not head else "not an HDF5 file (an .h5ad is HDF5)"
        raise InputFileError(f"{p} is {kind}")
    try:
        return ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:
        raise InputFileError(f"{p} is an HDF5 file but not a readable AnnData .h5ad ({_first_line(exc)})") from None


_CHECKPOINT_KEYS = ("meta", "mu", "W", "rho")


def check_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a Laplace checkpoint (an .npz written by ``fit(..., checkpoint=)``).

    Raises ``InputFileError`` with one line for a missing path, a directory, a file that is not an
    .npz archive (e.g. an .h5ad) and an .npz without the checkpoint's entries (meta, mu, W, rho).
    """
    import zipfile

    import numpy as np

    p = Path(path)
    if not p.exists():
        raise InputFileError(f"checkpoint {p}: no such file (write one with --checkpoint PATH.npz)")
    if p.is_dir():
        raise InputFileError(f"checkpoint {p} is a directory, not a checkpoint .npz file")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as fh:
            head = fh.read(8)
        kind = "an HDF5 file (an .h5ad?)" if head == _HDF5_SIGNATURE else "not an .npz archive"
        raise InputFileError(f"checkpoint {p} is {kind}; give the .npz written by --checkpoint")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in _CHECKPOINT_KEYS if k not in z.files]
    except Exception as exc:  # a torn or foreign archive
        raise InputFileError(f"checkpoint {p} cannot be read ({_first_line(exc)})") from None
    if missing:
        raise InputFileError(f"checkpoint {p} is an .npz but not a pln-ref Laplace checkpoint "
                             f"(no {', '.join(missing)}); give the file written by --checkpoint")
    return p


def check_output_path(path: str | os.PathLike, extensions: tuple[str, ...], what: str = "output") -> Path:
    """``path`` as a Path if a file can be written there: its extension is one of ``extensions``,
    its directory exists and is writable, and it is not a directory itself (nor a read-only file).
    Raises ``InputFileError`` with one line naming the path and the problem (checked before a fit,
    so no work is lost)."""
    p = Path(path)
    if p.suffix.lower() not in extensions:
        raise InputFileError(f"{what} {p}: the file name must end in {' or '.join(extensions)}")
    parent = p.parent
    if not parent.exists():
        raise InputFileError(f"{what} {p}: directory {parent} does not exist (create it first: mkdir -p {parent})")
    if not parent.is_dir():
        raise InputFileError(f"{what} {p}: {parent} is not a directory")
    if p.is_dir():
        raise InputFileError(f"{what} {p} is a directory; give a file name ending in {' or '.join(extensions)}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputFileError(f"{what} {p}: directory {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputFileError(f"{what} {p} exists and is not writable")
    return p
