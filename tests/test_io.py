"""Atomic writers: complete files or none, JSON without NaN, NumPy types converted."""

import json

import numpy as np
import pytest

from pln_ref.io import atomic_savez, atomic_write_json, atomic_write_text, jsonable


def test_jsonable_converts_numpy_and_nonfinite():
    obj = {1: np.arange(3), "f": np.float32(0.5), "nan": float("nan"), "inf": np.inf, "b": np.bool_(True),
           "t": (np.int64(2), [np.array([[1.5, np.nan]])])}
    assert jsonable(obj) == {"1": [0, 1, 2], "f": 0.5, "nan": None, "inf": None, "b": True,
                             "t": [2, [[[1.5, None]]]]}


def test_atomic_writers_round_trip_and_leave_no_temporaries(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "r.md", "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    q = atomic_write_json(tmp_path / "m.json", {"a": np.arange(2), "x": np.nan})
    assert json.loads(q.read_text()) == {"a": [0, 1], "x": None}
    z = atomic_savez(tmp_path / "a.npz", {"v": np.ones(3)})
    with np.load(z) as f:
        np.testing.assert_array_equal(f["v"], np.ones(3))
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == ["a.npz", "m.json", "r.md"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_json(tmp_path / "m.json", {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    with pytest.raises(AttributeError):
        atomic_write_text(path, b"not text")  # fails inside the write: the temporary is removed
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]
