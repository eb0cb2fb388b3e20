"""Issue 11 (defects found by a new user): the fit CLI's checks, errors and options."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import pln_ref
from pln_ref.cli import build_parser, main, ppc_lines


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    p = pln_ref.random_params(12, 2, seed=3, capture=True, mean_log_rate=2.0)
    sim = pln_ref.simulate(p, 150, seed=4)
    a = sim.to_anndata()
    a = a[np.asarray(a.X.sum(1)).ravel() > 0].copy()
    assert a.n_obs > 140
    a.obs["lib"] = np.asarray(a.X.sum(1)).ravel() * 2.0 + 1.0
    a.write_h5ad(d / "ok.h5ad")
    b = a.copy()
    b.layers["counts"] = b.X.copy()
    X = np.asarray(b.X, dtype=float)
    b.X = X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4
    b.write_h5ad(d / "norm.h5ad")
    c = a.copy()
    Xc = np.asarray(c.X, dtype=float)
    Xc[:, 3] = 0
    c.layers["counts"] = Xc
    c.X = np.asarray(a.X, dtype=float) + 1
    c.write_h5ad(d / "zerogene.h5ad")
    (d / "text.h5ad").write_text("not hdf5\n")
    (d / "table.csv").write_text("1,2\n3,4\n")
    np.savez(d / "other.npz", a=np.arange(3))
    return d


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"pln-ref {pln_ref.__version__}"


def test_every_fit_option_has_help_and_shown_default():
    ap = build_parser()
    fit = ap._subparsers._group_actions[0].choices["fit"]
    text = fit.format_help()
    for act in fit._actions:
        if act.dest in ("help",):
            continue
        assert act.help, f"fit option {act.option_strings or act.dest} has no help text"
        if act.default not in (None, False, "") and act.option_strings:
            assert "default" in act.help or f"(default: {act.default})" in text.replace("\n", " "), act.dest
    flat = " ".join(text.split())
    for s in ("(default: 10)", "(default: 2000)", "(default: laplace)", "--library-size OBS_COLUMN",
              "--checkpoint-every N"):
        assert s in flat


@pytest.mark.parametrize("case,match", [
    ("text", "is not an HDF5 file"),
    ("csv", r"\.csv files are not read directly"),
    ("dir", "is a directory"),
    ("missing", "no such file"),
])
def test_unreadable_inputs_one_line_rc2(capsys, files, tmp_path, case, match):
    data = {"text": files / "text.h5ad", "csv": files / "table.csv", "dir": files,
            "missing": files / "nope.h5ad"}[case]
    rc, out, err = _run(capsys, "fit", data, "--k", 2, "--out", tmp_path / "o.h5ad")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert pytest.importorskip("re").search(match, err)


@pytest.mark.parametrize("resume,match", [
    ("missing.npz", "no such file"),
    ("ok.h5ad", r"is an HDF5 file \(an .h5ad\?\)"),
    ("text.h5ad", "not an .npz archive"),
    ("other.npz", "not a pln-ref Laplace checkpoint"),
])
def test_bad_resume_one_line_rc2(capsys, files, tmp_path, resume, match):
    import re

    rc, out, err = _run(capsys, "fit", files / "ok.h5ad", "--k", 2, "--out", tmp_path / "o.h5ad",
                        "--resume", files / resume)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_output_paths_checked_before_the_fit(capsys, files, tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(pln_ref, "fit", lambda *a, **k: called.append(1))
    for out, match in ((tmp_path / "no" / "dir" / "o.h5ad", "does not exist"),
                       (tmp_path / "o.csv", "must end in .h5ad"),
                       (tmp_path, "must end in .h5ad")):
        rc, _, err = _run(capsys, "fit", files / "ok.h5ad", "--k", 2, "--out", out)
        assert rc == 2 and match in err, err
    rc, _, err = _run(capsys, "fit", files / "ok.h5ad", "--k", 2, "--out", tmp_path / "o.h5ad",
                      "--save-result", tmp_path / "r.h5ad")
    assert rc == 2 and "--save-result" in err and ".npz" in err
    rc, _, err = _run(capsys, "fit", files / "ok.h5ad", "--k", 2, "--out", tmp_path / "o.h5ad",
                      "--checkpoint", tmp_path / "missing" / "ck.npz")
    assert rc == 2 and "--checkpoint" in err
    assert not called  # nothing was fitted


def test_write_failure_after_fit_saves_a_fallback(capsys, files, tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    out = tmp_path / "o.h5ad"
    rc, _, err = _run(capsys, "fit", files / "ok.h5ad", "--k", 2, "--out", out, "--n-steps", 5, "--quiet")
    assert rc == 1 and "disk full" in err and "saved to" in err
    fb = tmp_path / "o.pln_result.npz"
    assert str(fb) in err and fb.exists()
    r = pln_ref.PLNResult.load(fb)
    assert r.x_map.shape == ad.read_h5ad(files / "ok.h5ad").shape


def test_normalised_x_suggests_layer_counts(capsys, files, tmp_path):
    rc, _, err = _run(capsys, "fit", files / "norm.h5ad", "--k", 2, "--out", tmp_path / "o.h5ad")
    assert rc == 2 and "non-integer" in err and "--layer counts" in err


def test_zero_gene_hint_names_the_layer(capsys, files, tmp_path):
    rc, _, err = _run(capsys, "fit", files / "zerogene.h5ad", "--layer", "counts", "--k", 2,
                      "--out", tmp_path / "o.h5ad")
    assert rc == 2 and "all-zero gene" in err
    assert "adata.layers['counts'].sum(0)" in err and "adata.X" not in err


def test_library_size_obs_column(capsys, files, tmp_path):
    rc, _, err = _run(capsys, "fit", files / "ok.h5ad", "--k", 2, "--out", tmp_path / "o.h5ad",
                      "--library-size", "nope")
    assert rc == 2 and "no obs column 'nope'" in err and "'lib'" in err
    out = tmp_path / "o.h5ad"
    rc, txt, err = _run(capsys, "fit", files / "ok.h5ad", "--k", 2, "--out", out, "--library-size", "lib",
                        "--n-steps", 5, "--quiet")
    assert rc == 0, err
    uns = ad.read_h5ad(out).uns["pln"]
    assert uns["settings"]["anchor"] == "library_size argument"
    a = ad.read_h5ad(files / "ok.h5ad")
    direct = pln_ref.fit(a, k=2, n_steps=5, progress=False, library_size=a.obs["lib"].to_numpy())
    np.testing.assert_allclose(ad.read_h5ad(out).var["pln_mu"], direct.mu, rtol=1e-6)
    default = pln_ref.fit(a, k=2, n_steps=5, progress=False)  # the anchor changed the fit
    assert np.max(np.abs(default.mu - direct.mu)) > 0.1


def test_checkpoint_every(files, tmp_path, monkeypatch):
    from pln_ref.fit_laplace import LaplaceFitState

    saves = []
    orig = LaplaceFitState.save
    monkeypatch.setattr(LaplaceFitState, "save", lambda self, path: (saves.append(self.step), orig(self, path)))
    a = ad.read_h5ad(files / "ok.h5ad")
    pln_ref.fit(a, k=2, n_steps=30, progress=False, checkpoint=str(tmp_path / "ck.npz"), checkpoint_every=7,
                optimizer="adam")  # Adam runs all 30 steps here (L-BFGS may certify earlier)
    assert {7, 14, 21, 28} <= set(saves)
    with pytest.raises(ValueError, match="checkpoint_every"):
        pln_ref.fit(a, k=2, n_steps=3, progress=False, checkpoint_every=0)


def test_fit_prints_why_it_stopped(capsys, files, tmp_path):
    rc, out, _ = _run(capsys, "fit", files / "ok.h5ad", "--k", 2, "--out", tmp_path / "o.h5ad", "--n-steps", 7)
    assert rc == 0
    assert "fit stopped at step 7 of n_steps=7: n_steps=7 reached" in out


def test_demo_ppc_lines_explain_the_map_check():
    tab = {k: {"share_in_95pct_interval": v} for k, v in (("mean", 0.9), ("var", 0.56), ("zero_frac", 0.33))}
    text = "\n".join(ppc_lines(tab))
    assert "zero fractions:   33%" in text and "tests the zero mass" in text
    assert "cannot show: calibration" in text and "simulated from the model itself" in text


def test_resumed_fit_says_where_it_resumed(files, tmp_path):
    """Issue 11 item 9: after a resume wall_time_s counted only the resumed part; the checkpoint now
    keeps the elapsed time, so it counts every run, and the fit says from which step it resumed."""
    from pln_ref.fit_laplace import LaplaceFitState

    a = ad.read_h5ad(files / "ok.h5ad")
    ck = str(tmp_path / "ck.npz")
    first = pln_ref.fit(a, k=2, n_steps=5, progress=False, checkpoint=ck)
    assert first.diagnostics["resumed_from_step"] is None
    saved = LaplaceFitState.load(ck)  # the first run's optimiser time, kept in the checkpoint
    assert 0 < saved.elapsed_s <= first.diagnostics["wall_time_s"]
    assert 0 < saved.elapsed_cpu_s <= first.diagnostics["cpu_time_s"]
    # the resumed run adds its own time to the time the checkpoint recorded (made large here, so
    # that the check does not depend on how long either run took: the first run's whole wall time
    # also has its start and final pass, which the checkpoint does not record, and one-off import
    # costs, so a short resumed run can take less than it)
    saved.elapsed_s += 1000.0
    saved.elapsed_cpu_s += 500.0
    saved.save(ck)
    r = pln_ref.fit(a, k=2, n_steps=10, progress=False, resume=ck)
    assert r.diagnostics["resumed_from_step"] == 5
    assert r.diagnostics["wall_time_s"] > saved.elapsed_s
    assert r.diagnostics["cpu_time_s"] > saved.elapsed_cpu_s
    assert r.diagnostics["optimizer_cpu_s"] >= saved.elapsed_cpu_s
    assert "(over all runs; resumed at step 5)" in r.summary()
