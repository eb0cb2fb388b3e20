"""SBC machinery: ranks, the ECDF-difference test with simultaneous bands, the resumable runner."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pln_ref.validation.sbc_runner import load_sims, run_sbc, sim_seed
from pln_ref.validation.sbc_stats import ecdf_band, ecdf_test, sbc_ranks, sbc_table, thin_draws
from pln_ref.validation.sbc_tasks import toy_normal_task

ROOT = Path(__file__).resolve().parents[1]


def test_ranks_counts_and_ties():
    draws = np.array([[0.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    r = sbc_ranks(np.array([2.5, 5.0]), draws)
    assert r[0] == 2 and r[1] == 3
    rng = np.random.default_rng(0)
    tied = [sbc_ranks(np.array(1.0), np.ones(4), rng) for _ in range(2000)]
    assert set(np.unique(tied)) == {0, 1, 2, 3, 4}  # ties broken uniformly
    with pytest.raises(ValueError, match="shape"):
        sbc_ranks(np.zeros(3), np.zeros((5, 2)))


def test_uniform_ranks_pass_and_skewed_fail():
    rng = np.random.default_rng(11)
    L, n = 99, 1000
    assert ecdf_test(rng.integers(0, L + 1, n), L).passed
    skew = np.minimum(L, (L + 1) * rng.beta(1.3, 1.0, n)).astype(int)  # mild skew
    t = ecdf_test(skew, L)
    assert not t.passed and t.p_value < 0.05
    over = np.clip(np.round(L / 2 + rng.normal(0, L / 5, n)), 0, L)  # overdispersed posterior
    assert not ecdf_test(over, L).passed
    with pytest.raises(ValueError, match="integers"):
        ecdf_test(np.array([0, 100]), 99)


def test_band_is_simultaneous_at_nominal_level():
    # the band was calibrated on its own simulation; check on fresh uniform rank sets
    rng = np.random.default_rng(12)
    L, n = 49, 200
    band = ecdf_band(n, L, 0.05)
    assert band.gamma < 0.05  # simultaneous band is wider than the pointwise one
    rej = np.mean([not ecdf_test(rng.integers(0, L + 1, n), L).passed for _ in range(400)])
    assert 0.02 <= rej <= 0.09  # 0.05 +- 3.3 binomial SE


def test_thin_draws_selects_L_spread_draws():
    rng = np.random.default_rng(3)
    d = rng.normal(size=(4, 500, 2))
    th, ess = thin_draws(d, 100)
    assert th.shape == (100, 2) and ess > 1000
    with pytest.raises(ValueError, match="cannot thin"):
        thin_draws(d[:, :10], 100)


def test_seeds_are_spawn_children():
    kids = np.random.SeedSequence(5).spawn(4)
    assert sim_seed(5, 3).generate_state(4).tolist() == kids[3].generate_state(4).tolist()


def test_toy_sbc_calibrated_and_miscalibrated(tmp_path):
    run_sbc(toy_normal_task, 300, tmp_path / "ok", base_seed=1, config={"L": 49}, batch_size=50,
            scheduler="synchronous", progress=False)
    tab = sbc_table(load_sims(tmp_path / "ok"), 49)
    assert all(r["passed"] for r in tab) and {r["quantity"] for r in tab} == {"theta", "theta_sq"}
    run_sbc(toy_normal_task, 300, tmp_path / "bad", base_seed=1, config={"L": 49, "sd_scale": 0.6},
            batch_size=50, scheduler="synchronous", progress=False)
    bad = sbc_table(load_sims(tmp_path / "bad"), 49, names=["theta"])
    assert not any(r["passed"] for r in bad)
    # a real miscalibration (posterior SD 0.6x too small) shows in both independent halves
    assert max(bad[0]["p_value_halves"]) < 0.05
    assert all(min(r["p_value_halves"]) > 0.05 for r in tab) and len(tab[0]["p_value_halves"]) == 2


def _log_counts(path):
    lines = Path(path).read_text().split()
    return np.bincount([int(v) for v in lines], minlength=1)


def test_resume_after_sigkill(tmp_path):
    """Kill a run part-way with SIGKILL, rerun (on Dask): nothing finished is redone, nothing lost,
    results identical to an uninterrupted run."""
    n = 20
    out, log = tmp_path / "run", tmp_path / "calls.log"
    cfg = {"L": 19, "_sleep": 0.1, "_log_file": str(log)}
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from pln_ref.validation.sbc_runner import run_sbc
        from pln_ref.validation.sbc_tasks import toy_normal_task
        run_sbc(toy_normal_task, {n}, {str(out)!r}, base_seed=9, config={cfg!r},
                scheduler="synchronous", progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    sims = out / "sims"
    t0 = time.time()
    while time.time() - t0 < 60:
        if sims.exists() and len(list(sims.glob("sim_*.npz"))) >= 5:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {int(p.stem[4:]) for p in sims.glob("sim_*.npz")}
    assert 5 <= len(done_before) < n
    calls_before = _log_counts(log)
    # resume on a Dask LocalCluster (1 worker process keeps the shared CPU free)
    res = run_sbc(toy_normal_task, n, out, base_seed=9, config={**cfg, "_sleep": 0.0},
                  n_workers=1, progress=False)
    assert res["n_done"] == n and res["n_run_now"] == n - len(done_before)
    calls = _log_counts(log)
    calls_after = calls - np.pad(calls_before, (0, calls.size - calls_before.size))
    assert all(calls_after[i] == 0 for i in done_before)  # nothing finished is recomputed
    assert np.all(calls[:n] >= 1)  # nothing lost
    # identical to an uninterrupted run
    ref = tmp_path / "ref"
    run_sbc(toy_normal_task, n, ref, base_seed=9, config={"L": 19}, scheduler="synchronous",
            progress=False)
    a, b = load_sims(out), load_sims(ref)
    for k in ("rank_theta", "rank_theta_sq", "truth_theta", "_index"):
        np.testing.assert_array_equal(a[k], b[k])
    # a rerun of a finished directory does nothing
    assert run_sbc(toy_normal_task, n, ref, base_seed=9, config={"L": 19}, scheduler="synchronous",
                   progress=False)["n_run_now"] == 0
    with pytest.raises(ValueError, match="base_seed"):
        run_sbc(toy_normal_task, n, ref, base_seed=10, scheduler="synchronous", progress=False)


def test_resume_with_other_config_is_refused(tmp_path):
    """A directory holds one design: resuming it with another config (e.g. another adapt_delta)
    would mix two SBC designs in one rank set, so it raises and writes nothing."""
    out = tmp_path / "run"
    run_sbc(toy_normal_task, 3, out, base_seed=1, config={"L": 19}, scheduler="synchronous", progress=False)
    with pytest.raises(ValueError, match="config"):
        run_sbc(toy_normal_task, 6, out, base_seed=1, config={"L": 9}, scheduler="synchronous", progress=False)
    assert len(list((out / "sims").glob("sim_*.npz"))) == 3
    # execution-only keys ("_" prefix) may change
    res = run_sbc(toy_normal_task, 6, out, base_seed=1, config={"L": 19, "_sleep": 0.0},
                  scheduler="synchronous", progress=False)
    assert res["n_run_now"] == 3


def test_runs_recorded_before_the_validation_subpackage_resume(tmp_path):
    """A manifest naming the task by its old module (pln_ref.sbc) resumes; another task does not."""
    import json

    out = tmp_path / "run"
    run_sbc(toy_normal_task, 2, out, base_seed=1, config={"L": 19}, scheduler="synchronous", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "pln_ref.validation.sbc_tasks.toy_normal_task"
    (out / "manifest.json").write_text(json.dumps({**manifest, "task": "pln_ref.sbc.toy_normal_task"}))
    res = run_sbc(toy_normal_task, 3, out, base_seed=1, config={"L": 19}, scheduler="synchronous", progress=False)
    assert res["n_run_now"] == 1 and res["n_done"] == 3
    (out / "manifest.json").write_text(json.dumps({**manifest, "task": "pln_ref.sbc.joint_nuts_task"}))
    with pytest.raises(ValueError, match="task"):
        run_sbc(toy_normal_task, 3, out, base_seed=1, config={"L": 19}, scheduler="synchronous", progress=False)


def test_laplace_conditional_sbc_small(tmp_path):
    """Integration: the Laplace conditional task runs batched and yields valid ranks."""
    from pln_ref.simulation import random_params

    p = random_params(6, 2, seed=0, mean_log_rate=4.0, capture=True)
    cfg = {"mu": p.mu, "W": p.W, "d": p.d, "M0": p.capture.M0, "sigma_M": p.capture.sigma_M, "L": 19}
    from pln_ref.validation.sbc_tasks import laplace_conditional_task

    run_sbc(laplace_conditional_task, 60, tmp_path, base_seed=3, config=cfg, batch_size=25,
            scheduler="synchronous", progress=False)
    s = load_sims(tmp_path)
    assert s["rank_x"].shape == (60, 6) and s["rank_eta"].shape == (60,) and s["rank_loglik"].shape == (60,)
    assert s["rank_x"].min() >= 0 and s["rank_x"].max() <= 19 and s["converged"].all()
    tab = sbc_table(s, 19)
    assert len(tab) == 8  # 6 genes + eta + loglik


def test_psis_reweighting_restores_laplace_calibration(tmp_path):
    """Low counts (mean log-rate 1): the Laplace draws of x are miscalibrated (measured: all 6 genes
    fail the ECDF test over 1500 simulations), the PSIS-reweighted draws of the same simulations
    are not (0 of 6 fail; median k-hat 0.37)."""
    from pln_ref.validation.sbc_tasks import laplace_conditional_task
    from pln_ref.simulation import random_params

    p = random_params(6, 2, seed=0, mean_log_rate=1.0, capture=True)
    cfg = {"mu": p.mu, "W": p.W, "d": p.d, "M0": p.capture.M0, "sigma_M": p.capture.sigma_M, "L": 19,
           "psis_draws": 400}
    run_sbc(laplace_conditional_task, 1500, tmp_path, base_seed=3, config=cfg, batch_size=250,
            scheduler="synchronous", progress=False)
    s = load_sims(tmp_path)
    assert s["rank_psis_x"].shape == (1500, 6) and s["khat"].shape == (1500,)
    tab = {r["quantity"]: r for r in sbc_table(s, 19)}
    lap_fail = sum(not tab[f"x[{g}]"]["passed"] for g in range(6))
    psis_fail = sum(not tab[f"psis_x[{g}]"]["passed"] for g in range(6))
    print(f"x genes failing: Laplace {lap_fail}/6, PSIS-reweighted {psis_fail}/6; "
          f"median k-hat {np.median(s['khat']):.2f}")
    assert lap_fail >= 5
    assert psis_fail <= 1


def test_cli_parsers_register():
    import argparse

    from pln_ref.validation.cli import build_sbc_parser, build_validate_parser, sbc_main, validate_main

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    build_validate_parser(sub)
    build_sbc_parser(sub)
    a = ap.parse_args(["validate", "--out", "x", "--parts", "cell", "--methods", "laplace"])
    assert a.func is validate_main and a.parts == ["cell"]
    b = ap.parse_args(["sbc", "--out", "y", "--flavour", "joint", "--sims", "10", "--synchronous"])
    assert b.func is sbc_main and b.sims == 10 and b.synchronous


def test_refusal_names_only_the_settings_that_differ(tmp_path):
    """Issue 11 item 7: the refusal was a 3.3 KB line of array reprs with the differing setting
    (L 99 vs 49) buried; now it names only the differing settings, old -> new."""
    from pln_ref.simulation import random_params
    from pln_ref.validation.sbc_tasks import laplace_conditional_task

    p = random_params(20, 3, seed=0, capture=True)
    cfg = {"mu": p.mu, "W": p.W, "d": p.d, "M0": p.capture.M0, "sigma_M": p.capture.sigma_M, "L": 99}
    out = tmp_path / "run"
    run_sbc(laplace_conditional_task, 2, out, base_seed=1, config=cfg, scheduler="synchronous", progress=False)
    with pytest.raises(ValueError) as ei:
        run_sbc(laplace_conditional_task, 2, out, base_seed=1, config={**cfg, "L": 49},
                scheduler="synchronous", progress=False)
    msg = str(ei.value)
    assert "config.L: 99 -> 49" in msg and len(msg) < 250 and "array(" not in msg and "mu" not in msg
    with pytest.raises(ValueError) as ei:
        run_sbc(laplace_conditional_task, 2, out, base_seed=2, config={**cfg, "mu": p.mu + 1},
                scheduler="synchronous", progress=False)
    msg = str(ei.value)
    assert "base_seed: 1 -> 2" in msg and "config.mu: " in msg and len(msg) < 400
    assert "config.L" not in msg and "config.W" not in msg


class _SplitStorageClient:
    """A Dask-client stand-in whose second worker sees another filesystem: it resolves the output
    directory under ``other_root`` (as a worker on another machine without a shared mount would)."""

    def __init__(self, other_root):
        self.other_root = Path(other_root)
        self.submitted = 0

    def scheduler_info(self):
        return {"workers": {"tcp://10.0.0.1:1": {}, "tcp://10.0.0.2:1": {}}}

    def run(self, fn, *args, workers):
        (w,) = workers
        if w.startswith("tcp://10.0.0.2"):
            args = (str(self.other_root / str(args[0]).lstrip("/")),) + args[1:]
        return {w: fn(*args)}

    def submit(self, *a, **k):  # pragma: no cover - must not be reached
        self.submitted += 1
        raise AssertionError("tasks submitted although the workers do not share the output directory")


def test_workers_without_a_shared_filesystem_are_refused_before_any_task(tmp_path):
    """Issue 11 item 1: workers that cannot see --out lost every result; the probe now refuses the
    cluster first and names the worker that cannot share the directory."""
    from pln_ref.validation.sbc_runner import SharedStorageError, check_workers_share

    client = _SplitStorageClient(tmp_path / "elsewhere")
    with pytest.raises(SharedStorageError) as ei:
        run_sbc(toy_normal_task, 4, tmp_path / "run", config={"L": 9}, client=client, progress=False)
    msg = str(ei.value)
    assert "1 of 2 Dask worker(s) cannot share the output directory" in msg
    assert "tcp://10.0.0.2:1" in msg and "tcp://10.0.0.1:1" not in msg and "FileNotFoundError" in msg
    assert client.submitted == 0 and not list((tmp_path / "run" / "sims").glob("sim_*.npz"))
    assert not (tmp_path / "run" / ".worker_probe").exists()  # probe files cleaned up

    class NoWorkers(_SplitStorageClient):
        def scheduler_info(self):
            return {"workers": {}}

    with pytest.raises(SharedStorageError, match="no workers"):
        check_workers_share(NoWorkers(tmp_path), tmp_path / "run")


def test_relative_out_is_resolved_before_shipping(tmp_path, monkeypatch):
    """The path given to the tasks (and recorded) is absolute, whatever the working directory."""
    from pln_ref.validation import sbc_runner

    seen = []
    orig = sbc_runner._run_batch
    monkeypatch.setattr(sbc_runner, "_run_batch", lambda task, idx, seed, out, cfg: (seen.append(out),
                                                                                       orig(task, idx, seed, out, cfg))[1])
    monkeypatch.chdir(tmp_path)
    run_sbc(toy_normal_task, 2, "rel/run", config={"L": 9}, scheduler="synchronous", progress=False)
    assert seen and all(Path(o).is_absolute() and Path(o) == tmp_path / "rel" / "run" for o in seen)


def test_nanny_kill_warning_on_close_is_silenced(tmp_path, monkeypatch, caplog):
    """Issue 11 item 8: closing the LocalCluster run_sbc started printed distributed.nanny's
    'Worker process still alive after ... seconds, killing' (after every result was written)."""
    import logging

    from distributed import LocalCluster

    orig_close = LocalCluster.close

    def close(self, *a, **k):
        logging.getLogger("distributed.nanny").warning("Worker process still alive after 3.2 seconds, killing")
        return orig_close(self, *a, **k)

    monkeypatch.setattr(LocalCluster, "close", close)
    res = run_sbc(toy_normal_task, 2, tmp_path / "run", config={"L": 9}, n_workers=1, progress=False)
    assert res["n_done"] == 2
    assert not [r for r in caplog.records if "killing" in r.getMessage()]
    assert not logging.getLogger("distributed.nanny").filters  # the filter is removed afterwards


@pytest.mark.slow
def test_real_dask_workers_in_another_directory_with_relative_out(tmp_path):
    """A real `dask scheduler` + 2 `dask worker` processes started in another working directory and
    a relative --out: every simulation lands in --out (issue 11 item 1)."""
    import shutil

    dask = shutil.which("dask")
    if dask is None:
        pytest.skip("no dask CLI")
    elsewhere, here = tmp_path / "workers_cwd", tmp_path / "client_cwd"
    elsewhere.mkdir()
    here.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = 8700 + os.getpid() % 90
    procs = [subprocess.Popen([dask, "scheduler", "--port", str(port), "--dashboard-address", ":0"], cwd=elsewhere,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(3)
        procs += [subprocess.Popen([dask, "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                    "--dashboard-address", ":0"], cwd=elsewhere, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        time.sleep(5)
        r = subprocess.run([sys.executable, "-m", "pln_ref.cli", "sbc", "--flavour", "laplace", "--sims", "6",
                            "--L", "9", "--scheduler-address", f"tcp://127.0.0.1:{port}", "--out", "L1", "--quiet"],
                           cwd=here, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert len(list((here / "L1" / "sbc_laplace" / "sims").glob("sim_*.npz"))) == 6
        assert not (elsewhere / "L1").exists()
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_few_simulations_print_a_power_caveat_not_a_bare_failed(tmp_path, capsys):
    """Issue 11 item 8: an SBC of 2-8 simulations listed 'Failed: ...' with no word on power."""
    from pln_ref.cli import main
    from pln_ref.validation.sbc_runs import power_caveat

    rc = main(["sbc", "--flavour", "laplace", "--sims", "4", "--L", "9", "--synchronous", "--quiet",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[pln-ref sbc] laplace: 4 simulations, " in out and "caveat: only 4 simulations" in out
    report = (tmp_path / "report.md").read_text()
    failed_line = next(ln for ln in report.splitlines() if ln.startswith("Per quantity"))
    assert "Caveat: only 4 simulations" in failed_line and "outside their band:" in failed_line
    assert "Family-wise verdict (Holm" in report
    assert power_caveat(100, 10) is None and "expected to fail by chance" in power_caveat(8, 44)


def test_holm_on_constructed_p_values():
    from pln_ref.validation.sbc_stats import holm

    # m = 4: thresholds 0.05/4, 0.05/3, 0.05/2, 0.05; step-down stops at the first p above its threshold
    v = holm({"a": 0.010, "b": 0.016, "c": 0.03, "d": 0.5}, 0.05)
    assert v["rejected"] == ["a", "b"] and not v["passed"]
    np.testing.assert_allclose([v["adjusted_p"][k] for k in "abcd"], [0.04, 0.048, 0.06, 0.5])
    # 0.013 > 0.05/4: nothing is rejected, although a per-quantity test at 0.05 fails three
    v = holm({"a": 0.013, "b": 0.014, "c": 0.02, "d": 0.9}, 0.05)
    assert v["passed"] and v["rejected"] == [] and abs(v["min_adjusted_p"] - 0.052) < 1e-12
    # adjusted p-values are monotone in the order of the raw ones and capped at 1
    v = holm({"a": 0.3, "b": 0.001, "c": 0.4}, 0.05)
    assert v["rejected"] == ["b"] and v["adjusted_p"]["a"] == v["adjusted_p"]["c"] == 0.6  # max(2 x 0.3, 1 x 0.4)
    with pytest.raises(ValueError):
        holm({"a": 1.5})


def test_holm_controls_family_wise_error_where_per_quantity_tests_do_not():
    """22 independent uniform p-values: per-quantity tests at 0.05 fail some quantity in
    1 - 0.95^22 = 68% of families, Holm in <= 5%."""
    from pln_ref.validation.sbc_stats import holm

    rng = np.random.default_rng(5)
    P = rng.uniform(size=(4000, 22))
    any_fail = np.mean((P <= 0.05).any(axis=1))
    holm_fail = np.mean([not holm({str(i): p for i, p in enumerate(row)})["passed"] for row in P])
    assert abs(any_fail - (1 - 0.95 ** 22)) < 0.03
    assert 0.03 <= holm_fail <= 0.06


def test_sbc_verdict_families_and_table_columns():
    """The verdict groups the posterior's own quantities and the PSIS ones separately; a strong
    miscalibration of one quantity is rejected family-wise, uniform ranks are not."""
    from pln_ref.validation.sbc_stats import sbc_verdict

    rng = np.random.default_rng(8)
    L, n = 99, 2000
    sims = {"rank_x": rng.integers(0, L + 1, (n, 5)), "rank_psis_x": rng.integers(0, L + 1, (n, 5))}
    sims["rank_x"][:, 2] = np.minimum(L, (L + 1) * rng.beta(1.25, 1.0, n)).astype(int)
    tab = sbc_table(sims, L)
    fam = {r["quantity"]: r["family"] for r in tab}
    assert fam["x[0]"] == "draws" and fam["psis_x[0]"] == "psis"
    v = sbc_verdict(tab)
    assert set(v) == {"draws", "psis"} and v["draws"]["m"] == v["psis"]["m"] == 5
    assert v["draws"]["rejected"] == ["x[2]"] and v["psis"]["passed"]
    rows = {r["quantity"]: r for r in tab}
    assert rows["x[2]"]["rejected_holm"] and not rows["x[0]"]["rejected_holm"]
    assert rows["x[2]"]["p_value"] <= rows["x[2]"]["p_holm"] <= 5 * rows["x[2]"]["p_value"] + 1e-12
    assert rows["x[2]"]["p_floor"] < 0.05 / 5 / 10  # p-values resolved well below the Holm thresholds


def test_null_band_from_multinomial_histograms_matches_rank_simulation():
    """The null statistics drawn as multinomial histograms have the distribution of those of
    simulated uniform rank sets (two-sample KS on 3000 + 3000 statistics)."""
    from scipy import stats as st

    from pln_ref.validation.sbc_stats import _eval_points, _gamma_stat

    L, n = 49, 300
    band = ecdf_band(n, L, 0.05, n_sim=3000, seed=1)
    rng = np.random.default_rng(2)
    t = _eval_points(L, 100)
    r = np.sort(rng.integers(0, L + 1, (3000, n)), axis=1)
    counts = np.stack([np.searchsorted(row, t, side="left") for row in r])
    direct = _gamma_stat(counts, n, t / (L + 1))
    assert st.ks_2samp(band.gamma_null, direct).pvalue > 0.01
