"""Unreadable inputs get one line naming the file and the problem (issue 11, item 4)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pln_ref.readers import InputFileError, read_anndata


def test_reads_h5ad_and_backed(tmp_path):
    import anndata as ad

    a = ad.AnnData(np.arange(12, dtype=float).reshape(4, 3))
    a.write_h5ad(tmp_path / "ok.h5ad")
    assert read_anndata(tmp_path / "ok.h5ad").shape == (4, 3)
    b = read_anndata(tmp_path / "ok.h5ad", backed=True)
    assert b.isbacked and b.shape == (4, 3)
    b.file.close()


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("text_h5ad", "not an HDF5 file"),
    ("empty_h5ad", "empty file"),
    ("plain_hdf5", "HDF5 file but not a readable AnnData"),
    ("csv", r"\.csv files are not read directly; convert"),
    ("npz", r"\.npz files are not read directly"),
    ("other", "unknown input format"),
])
def test_bad_inputs_give_one_line(tmp_path, case, match):
    p = {
        "missing": tmp_path / "nope.h5ad", "directory": tmp_path / "d", "text_h5ad": tmp_path / "t.h5ad",
        "empty_h5ad": tmp_path / "e.h5ad", "plain_hdf5": tmp_path / "p.h5ad", "csv": tmp_path / "c.csv",
        "npz": tmp_path / "n.npz", "other": tmp_path / "x.parquet",
    }[case]
    if case == "directory":
        p.mkdir()
    elif case == "text_h5ad":
        p.write_text("gene,cell\n1,2\n")
    elif case == "empty_h5ad":
        p.write_bytes(b"")
    elif case == "plain_hdf5":
        with h5py.File(p, "w") as f:
            f["a"] = np.arange(3)
    elif case in ("csv", "npz", "other"):
        p.write_text("1,2\n")
    with pytest.raises(InputFileError, match=match) as ei:
        read_anndata(p)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg
