"""Simulation-based calibration (Talts et al. 2018) with the ECDF-difference test of
Säilynoja, Bürkner & Vehtari (2022), and a resumable Dask runner.

Ranks. For a simulation with true value q* and L posterior draws q_1..q_L (independent, or
thinned so that their ESS is about L), the rank is r = #{l : q_l < q*} in {0, ..., L}
(ties broken uniformly at random). Under a calibrated posterior r is discrete-uniform.

ECDF test. For n ranks and evaluation points j = 1..K-1 on the rank grid, let
z_j = P(r < t_j) under uniformity (exactly t_j / (L+1)) and F_j the empirical CDF. Each
n F_j ~ Binomial(n, z_j). A simultaneous 1 - alpha band is the set of binomial central
intervals at an adjusted level gamma, chosen (by simulating uniform rank sets of the same n
and L) so that ALL F_j lie inside their intervals with probability 1 - alpha:

    gamma_s = 2 min_j min( P(X <= n F_j),  P(X >= n F_j) ),   X ~ Binomial(n, z_j)
    gamma   = alpha-quantile of gamma_s over simulated uniform rank sets.

A rank set passes iff every F_j is inside [q_{gamma/2}, q_{1-gamma/2}] / n. The ECDF-difference
plot shows F_j - z_j with the band minus z_j.

Runner. Simulation i uses ``np.random.SeedSequence(base_seed, spawn_key=(i,))`` (identical to
``SeedSequence(base_seed).spawn(n)[i]``), so its result depends only on (base_seed, i) — and
on the batch composition for batched tasks, which is a fixed chunking of the indices, never
on scheduling. Every finished simulation is written atomically (temporary file + os.replace)
to ``out/sims/sim_{i:06d}.npz``; a rerun skips the files that exist and loses nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "sbc_ranks",
    "thin_draws",
    "EcdfBand",
    "ecdf_band",
    "EcdfTest",
    "ecdf_test",
    "sim_seed",
    "run_sbc",
    "load_sims",
    "sbc_table",
    "rank_columns",
    "plot_rank_hist",
    "plot_ecdf_diff",
    "toy_normal_task",
    "laplace_conditional_task",
    "joint_nuts_task",
    "draw_joint_prior",
]


# --------------------------------------------------------------------------- ranks

def sbc_ranks(truth: np.ndarray, draws: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rank of each true value among L draws: r = #{draws < truth} + U{0..#ties}.

    truth (...,) and draws (L, ...) -> int ranks (...) in {0, ..., L}.
    """
    t = np.asarray(truth, dtype=float)
    d = np.asarray(draws, dtype=float)
    if d.shape[1:] != t.shape:
        raise ValueError(f"draws have shape {d.shape}, expected (L,) + {t.shape}")
    lt = np.sum(d < t, axis=0)
    eq = np.sum(d == t, axis=0)
    if np.any(eq):
        rng = rng or np.random.default_rng(0)
        lt = lt + rng.integers(0, eq + 1)
    return lt.astype(np.int64)


def thin_draws(draws: np.ndarray, L: int) -> tuple[np.ndarray, float]:
    """Pick L draws evenly spaced within chains from MCMC draws (chains, n_draws, ...).

    The spacing (total draws / L) is at least the autocorrelation time whenever the run's
    bulk ESS >= L, i.e. the thinned draws have ESS about L. Returns (draws (L, ...), min bulk
    ESS of the full run over all quantities); callers record ``ess_min >= L``.
    """
    import arviz as az
    import warnings

    d = np.asarray(draws, dtype=float)
    if d.ndim < 2:
        raise ValueError("draws must be (chains, n_draws, ...)")
    C, S = d.shape[:2]
    if C * S < L:
        raise ValueError(f"only {C * S} draws, cannot thin to L={L}")
    flat = d.reshape(C, S, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ess = np.array([az.ess(flat[:, :, q], method="bulk") for q in range(flat.shape[2])])
    per_chain = [L // C + (1 if c < L % C else 0) for c in range(C)]
    picked = []
    for c, m in enumerate(per_chain):
        if m == 0:
            continue
        idx = np.floor((np.arange(m) + 0.5) * S / m).astype(int)
        picked.append(d[c, idx])
    return np.concatenate(picked, axis=0), float(np.nanmin(ess))


# --------------------------------------------------------------------------- ECDF test

def _eval_points(L: int, K: int | None) -> np.ndarray:
    """Thresholds t_j (rank < t_j) on the grid {1..L}; K-1 of them, about evenly spaced."""
    n_vals = L + 1
    K = n_vals if K is None else int(min(K, n_vals))
    if K < 2:
        raise ValueError("need at least 2 rank values (L >= 1)")
    t = np.unique(np.round(np.arange(1, K) * n_vals / K).astype(int))
    return t[(t >= 1) & (t <= L)]


def _gamma_stat(counts_le: np.ndarray, n: int, z: np.ndarray) -> np.ndarray:
    """2 min_j min(P(X <= c_j), P(X >= c_j)) for counts c (..., J), X ~ Bin(n, z_j)."""
    lo = stats.binom.cdf(counts_le, n, z)
    hi = stats.binom.sf(counts_le - 1, n, z)
    return 2 * np.min(np.minimum(lo, hi), axis=-1)


@dataclass(frozen=True)
class EcdfBand:
    """Simultaneous band for n ranks on {0..L}: at thresholds t (J,), null cdf z (J,),
    bounds lower/upper (J,) as ECDF values; gamma is the adjusted pointwise level; gamma_null
    the simulated null statistics (for p-values)."""

    n: int
    L: int
    alpha: float
    t: np.ndarray
    z: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gamma: float
    gamma_null: np.ndarray


@lru_cache(maxsize=64)
def ecdf_band(n: int, L: int, alpha: float = 0.05, K: int | None = 100, n_sim: int = 2000,
              seed: int = 20220101) -> EcdfBand:
    """Simultaneous 1 - alpha ECDF band for n discrete-uniform ranks on {0..L}, by simulation."""
    if n < 1:
        raise ValueError("need at least one rank")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    t = _eval_points(L, K)
    z = t / (L + 1)
    rng = np.random.default_rng(seed)
    gam = np.empty(n_sim)
    chunk = max(1, int(2e7 // max(n, 1)))
    for s0 in range(0, n_sim, chunk):
        m = min(chunk, n_sim - s0)
        r = rng.integers(0, L + 1, size=(m, n))
        # counts of ranks < t_j: histogram then cumulative sum
        hist = np.zeros((m, L + 2), dtype=np.int64)
        np.add.at(hist, (np.repeat(np.arange(m), n), r.reshape(-1) + 1), 1)
        cum = np.cumsum(hist, axis=1)  # cum[:, t] = #(r < t)
        gam[s0:s0 + m] = _gamma_stat(cum[:, t], n, z)
    gamma = float(np.quantile(gam, alpha))
    lower = stats.binom.ppf(gamma / 2, n, z) / n
    upper = stats.binom.ppf(1 - gamma / 2, n, z) / n
    return EcdfBand(n=n, L=L, alpha=alpha, t=t, z=z, lower=lower, upper=upper, gamma=gamma,
                    gamma_null=np.sort(gam))


@dataclass
class EcdfTest:
    """Outcome of :func:`ecdf_test` for one quantity."""

    passed: bool
    p_value: float
    gamma_obs: float
    ecdf: np.ndarray
    band: EcdfBand
    n: int

    def summary(self) -> dict:
        return {"passed": bool(self.passed), "p_value": float(self.p_value),
                "gamma_obs": float(self.gamma_obs), "gamma_crit": float(self.band.gamma),
                "n": int(self.n), "max_abs_ecdf_diff": float(np.max(np.abs(self.ecdf - self.band.z)))}


def ecdf_test(ranks: np.ndarray, L: int, alpha: float = 0.05, K: int | None = 100,
              n_sim: int = 2000) -> EcdfTest:
    """ECDF-difference test of uniformity of ranks (n,) on {0..L} with a simultaneous band."""
    r = np.asarray(ranks).reshape(-1)
    if r.size == 0:
        raise ValueError("no ranks")
    if np.any((r < 0) | (r > L)) or np.any(r != np.round(r)):
        raise ValueError(f"ranks must be integers in [0, {L}]")
    n = int(r.size)
    band = ecdf_band(n, int(L), float(alpha), K, n_sim)
    counts = np.searchsorted(np.sort(r), band.t, side="left")  # #(r < t_j)
    F = counts / n
    g = float(_gamma_stat(counts[None], n, band.z)[0])
    passed = bool(np.all((F >= band.lower - 1e-12) & (F <= band.upper + 1e-12)))
    p = float((np.searchsorted(band.gamma_null, g, side="right") + 1) / (band.gamma_null.size + 1))
    return EcdfTest(passed=passed, p_value=min(p, 1.0), gamma_obs=g, ecdf=F, band=band, n=n)


# --------------------------------------------------------------------------- runner

def sim_seed(base_seed: int, i: int) -> np.random.SeedSequence:
    """Seed of simulation i: SeedSequence(base_seed).spawn(...)[i], independent of scheduling."""
    return np.random.SeedSequence(int(base_seed), spawn_key=(int(i),))


def sim_path(out_dir: str | os.PathLike, i: int) -> Path:
    return Path(out_dir) / "sims" / f"sim_{i:06d}.npz"


def _atomic_savez(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _run_batch(task: Callable, indices: list[int], base_seed: int, out_dir: str, config: dict) -> list[int]:
    """Worker side: run one batch, write each missing simulation's file; returns indices written."""
    todo = [i for i in indices if not sim_path(out_dir, i).exists()]
    if not todo:
        return []
    seeds = [sim_seed(base_seed, i) for i in indices]
    t0 = time.perf_counter()
    results = task(list(indices), seeds, config)
    dt = (time.perf_counter() - t0) / max(len(indices), 1)
    if len(results) != len(indices):
        raise RuntimeError(f"task returned {len(results)} results for {len(indices)} simulations")
    written = []
    for i, res in zip(indices, results):
        if i not in todo:
            continue
        arrays = {k: np.asarray(v) for k, v in res.items()}
        arrays["_index"] = np.asarray(i)
        arrays["_seconds"] = np.asarray(dt)
        _atomic_savez(sim_path(out_dir, i), arrays)
        written.append(i)
    return written


def _batches(todo_idx: Sequence[int], batch_size: int, n_sims: int) -> list[list[int]]:
    """Fixed chunking [b*B, (b+1)*B) of all indices, keeping batches with any missing sim."""
    todo = set(todo_idx)
    out = []
    for b0 in range(0, n_sims, batch_size):
        idx = list(range(b0, min(b0 + batch_size, n_sims)))
        if any(i in todo for i in idx):
            out.append(idx)
    return out


def run_sbc(task: Callable, n_sims: int, out_dir: str | os.PathLike, *, base_seed: int = 0,
            config: dict | None = None, batch_size: int = 1, scheduler: str = "distributed",
            scheduler_address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1,
            progress: bool = True, client=None) -> dict:
    """Run (or resume) an SBC: simulations 0..n_sims-1, each stored in out_dir/sims/.

    task(indices, seeds, config) -> list of {name: array} (one dict per simulation, ranks as
    ints, plus anything else worth keeping); must be an importable module-level function
    (it is shipped to Dask workers; build Stan models inside it, never pickle them).
    scheduler: "distributed" (LocalCluster(n_workers, threads_per_worker) unless
    ``scheduler_address`` or ``client`` is given) or "synchronous" (in-process, for tests).
    A manifest (base_seed, batch_size, task, config) guards against mixing incompatible runs:
    resuming with another config raises; config keys starting with "_" are execution-only
    (logging, sleeps) and are neither guarded nor recorded.
    Returns {"n_done", "n_run_now", "seconds"}.
    """
    out = Path(out_dir)
    (out / "sims").mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    task_name = f"{getattr(task, '__module__', '?')}.{getattr(task, '__qualname__', repr(task))}"
    manifest = {"base_seed": int(base_seed), "batch_size": int(batch_size), "task": task_name}
    mpath = out / "manifest.json"
    manifest["config"] = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                          for k, v in config.items() if not str(k).startswith("_")}
    if mpath.exists():
        old = json.loads(mpath.read_text())
        for k in ("base_seed", "batch_size", "task", "config"):
            if k in old and old[k] != manifest[k]:
                raise ValueError(f"{out} holds a run with {k}={old[k]!r}, this run has "
                                 f"{manifest[k]!r}; resume with the same settings or use another directory")
    manifest["n_sims"] = max(int(n_sims), int(json.loads(mpath.read_text()).get("n_sims", 0))
                             if mpath.exists() else 0)
    tmp = mpath.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, mpath)
    done = {i for i in range(n_sims) if sim_path(out, i).exists()}
    todo = [i for i in range(n_sims) if i not in done]
    batches = _batches(todo, batch_size, n_sims)
    t0 = time.perf_counter()
    n_written = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_sims, initial=len(done), desc=f"SBC {out.name}", unit="sim")
    try:
        if scheduler == "synchronous":
            for idx in batches:
                w = _run_batch(task, idx, base_seed, str(out), config)
                n_written += len(w)
                if bar is not None:
                    bar.update(len(w))
        elif scheduler == "distributed":
            from dask.distributed import Client, LocalCluster, as_completed

            own_cluster = own_client = None
            if client is None:
                if scheduler_address:
                    client = own_client = Client(scheduler_address)
                else:
                    own_cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                               processes=True, dashboard_address=":0")
                    client = own_client = Client(own_cluster)
            try:
                futs = [client.submit(_run_batch, task, idx, base_seed, str(out), config,
                                      pure=False, key=f"sbc-{out.name}-{idx[0]:06d}-{os.getpid()}")
                        for idx in batches]
                for fut in as_completed(futs):
                    w = fut.result()
                    n_written += len(w)
                    if bar is not None:
                        bar.update(len(w))
            finally:
                if own_client is not None:
                    own_client.close()
                if own_cluster is not None:
                    own_cluster.close()
        else:
            raise ValueError(f"scheduler must be 'distributed' or 'synchronous', got {scheduler!r}")
    finally:
        if bar is not None:
            bar.close()
    n_done = sum(sim_path(out, i).exists() for i in range(n_sims))
    return {"n_done": int(n_done), "n_run_now": int(n_written), "seconds": time.perf_counter() - t0}


def load_sims(out_dir: str | os.PathLike, n_sims: int | None = None) -> dict[str, np.ndarray]:
    """Stack the stored simulations: {name: (n_done, ...)} in index order (plus "_index")."""
    files = sorted((Path(out_dir) / "sims").glob("sim_*.npz"))
    if n_sims is not None:
        files = [f for f in files if int(f.stem[4:]) < n_sims]
    if not files:
        raise ValueError(f"no finished simulations in {out_dir}/sims")
    rows = []
    for f in files:
        with np.load(f) as z:
            rows.append({k: z[k] for k in z.files})
    keys = rows[0].keys()
    return {k: np.stack([r[k] for r in rows]) for k in keys}


def _labels(name: str, shape: tuple) -> list[str]:
    """Labels of the scalar quantities of a rank array; Sigma stored as its upper triangle
    (np.triu_indices order) is labelled Sigma[g,h]."""
    if name == "Sigma" and len(shape) == 1:
        G = int(round((np.sqrt(8 * shape[0] + 1) - 1) / 2))
        if G * (G + 1) // 2 == shape[0]:
            return [f"Sigma[{g},{h}]" for g, h in zip(*np.triu_indices(G))]
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def rank_columns(sims: dict[str, np.ndarray], keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """{label: ranks (n_sims,)} for every scalar quantity of every ``rank_*`` array."""
    keys = [k for k in sims if k.startswith("rank_")] if keys is None else list(keys)
    out = {}
    for k in keys:
        r = np.asarray(sims[k])
        flat = r.reshape(r.shape[0], -1)
        for j, lab in enumerate(_labels(k[5:], r.shape[1:])):
            out[lab] = flat[:, j]
    return out


def sbc_table(sims: dict[str, np.ndarray], L: int, alpha: float = 0.05,
              names: Iterable[str] | None = None) -> list[dict]:
    """ECDF test for every scalar element of every rank array ``rank_<name>`` in ``sims``.

    Returns rows {quantity, n, passed, p_value, ..., passed_bonferroni, p_value_halves}; the
    Bonferroni column tests each quantity at alpha / (number of quantities) (family-wise level
    alpha). ``p_value_halves`` are the p-values of the first and second half of the simulations
    (in simulation order): two independent replicates. A miscalibration shows in both; a chance
    failure of the whole usually rests on one half.
    """
    keys = [k for k in sims if k.startswith("rank_")]
    if names is not None:
        keys = [f"rank_{n}" for n in names]
    rows = list(rank_columns(sims, keys).items())
    m = len(rows)
    table = []
    for label, rr in rows:
        t = ecdf_test(rr, L, alpha)
        row = {"quantity": label, **t.summary()}
        tb = ecdf_test(rr, L, alpha / m) if m > 1 else t
        row["passed_bonferroni"] = bool(tb.passed)
        h = len(rr) // 2
        row["p_value_halves"] = ([float(ecdf_test(rr[:h], L, alpha).p_value),
                                  float(ecdf_test(rr[h:], L, alpha).p_value)] if h >= 20 else None)
        table.append(row)
    return table


# --------------------------------------------------------------------------- plots

def _grid(n: int, ncol: int = 6, size: float = 2.2):
    import matplotlib.pyplot as plt

    ncol = min(ncol, n)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(size * ncol, size * 0.85 * nrow), squeeze=False)
    for ax in axes.reshape(-1)[n:]:
        ax.set_visible(False)
    return fig, axes.reshape(-1)


def plot_rank_hist(ranks: dict[str, np.ndarray], L: int, n_bins: int = 20, max_panels: int = 48):
    """Rank histograms with the 99% band of a uniform histogram."""
    items = list(ranks.items())[:max_panels]
    fig, axes = _grid(len(items))
    for ax, (name, r) in zip(axes, items):
        n = r.size
        bins = np.linspace(-0.5, L + 0.5, n_bins + 1)
        ax.hist(r, bins=bins, color="C0")
        p = 1 / n_bins
        lo, hi = stats.binom.ppf([0.005, 0.995], n, p)
        ax.axhspan(lo, hi, color="0.8", zorder=0)
        ax.axhline(n * p, color="k", lw=0.6)
        ax.set_title(name, fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def plot_ecdf_diff(ranks: dict[str, np.ndarray], L: int, alpha: float = 0.05, max_panels: int = 48):
    """ECDF difference F(z) - z with the simultaneous 1 - alpha band; failures in red."""
    items = list(ranks.items())[:max_panels]
    fig, axes = _grid(len(items))
    for ax, (name, r) in zip(axes, items):
        t = ecdf_test(r, L, alpha)
        b = t.band
        ax.fill_between(b.z, b.lower - b.z, b.upper - b.z, step="mid", color="0.85")
        ax.step(b.z, t.ecdf - b.z, where="mid", color="C0" if t.passed else "C3", lw=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{name} p={t.p_value:.2f}", fontsize=8, color="k" if t.passed else "C3")
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- tasks

def toy_normal_task(indices: list[int], seeds: list[np.random.SeedSequence], config: dict) -> list[dict]:
    """Conjugate-normal SBC (exact posterior): theta ~ N(0, 1), y_j ~ N(theta, 1), j = 1..n_obs.

    Posterior N(sum y / (n+1), 1 / (n+1)). ``config['bias']`` shifts the posterior draws by
    that many posterior SDs and ``config['sd_scale']`` scales them (deliberately miscalibrated
    fits for tests); ``config['_log_file']`` appends one line per simulation run (tests count
    invocations); ``config['_sleep']`` seconds per simulation (to kill a run part-way).
    """
    L = int(config.get("L", 99))
    n_obs = int(config.get("n_obs", 5))
    bias = float(config.get("bias", 0.0))
    sd_scale = float(config.get("sd_scale", 1.0))
    sleep = float(config.get("_sleep", 0.0))
    out = []
    for i, ss in zip(indices, seeds):
        rng = np.random.default_rng(ss)
        theta = rng.normal()
        y = rng.normal(theta, 1.0, size=n_obs)
        pm, psd = y.sum() / (n_obs + 1), 1 / np.sqrt(n_obs + 1)
        draws = pm + psd * (bias + sd_scale * rng.normal(size=(L, 2)))
        truth = np.array([theta, theta ** 2])
        draws[:, 1] = draws[:, 0] ** 2
        if config.get("_log_file"):
            with open(config["_log_file"], "a") as fh:
                fh.write(f"{i}\n")
        if sleep:
            time.sleep(sleep)
        out.append({"rank_theta": sbc_ranks(truth[0], draws[:, 0], rng),
                    "rank_theta_sq": sbc_ranks(truth[1], draws[:, 1], rng),
                    "truth_theta": theta})
    return out


def _params_from_config(config: dict):
    from .params import Capture, PLNParams

    cap = Capture(float(config["M0"]), float(config.get("sigma_M", 0.5))) if config.get("M0") else None
    return PLNParams(np.asarray(config["mu"]), np.asarray(config["W"]), np.asarray(config["d"]), cap)


def draw_cell_prior(params, ss: np.random.SeedSequence, log_lib_range=(np.log(100), np.log(5000))):
    """One cell from the pln_cell prior given fixed globals, anchor exogenous.

    log L ~ Uniform(log_lib_range) (drawn FIRST and passed to inference unchanged),
    eta ~ TruncN(log M0 - log L, sigma_M, low 0), x ~ N(mu, W W^T + diag d),
    u_g ~ Poisson(exp(x_g - eta)). Returns (u (G,), x (G,), eta, log_L).
    """
    rng = np.random.default_rng(ss)
    log_L = rng.uniform(*log_lib_range)
    if params.capture is not None:
        m = params.capture.prior_mean(np.array([log_L]))[0]
        s = params.capture.sigma_M
        eta = float(stats.truncnorm.rvs((0 - m) / s, np.inf, loc=m, scale=s, random_state=rng))
    else:
        eta = 0.0
    x = params.mu + params.W @ rng.normal(size=params.k) + np.sqrt(params.d) * rng.normal(size=params.G)
    u = rng.poisson(np.exp(x - eta))
    return u, x, eta, log_L


def laplace_conditional_task(indices: list[int], seeds: list[np.random.SeedSequence], config: dict) -> list[dict]:
    """Conditional SBC of the Laplace approximation (one simulation = one cell).

    Fixed globals (config mu, W, d, M0, sigma_M); each simulation draws its anchor, latents and
    counts from the prior with its own seed (:func:`draw_cell_prior`); the whole batch goes
    through one ``newton_map`` call; L independent draws per cell from the Laplace posterior
    (eta free); ranks of every x_g, eta and the log-likelihood test quantity
    log p(u | x, eta) = sum_g Poisson(u_g | exp(x_g - eta)).

    ``config["psis_draws"] = M > 0`` adds the PSIS-reweighted posterior: M Laplace draws per cell,
    Pareto-smoothed importance weights against the exact ``pln_cell`` density, L draws resampled
    with those weights (sampling-importance-resampling), ranked as ``rank_psis_*``; its k-hat per
    cell is stored as ``khat``. SIR is exact as M grows (bias O(1/M) when k-hat < 0.5).
    """
    from .laplace import newton_map

    params = _params_from_config(config)
    L = int(config.get("L", 99))
    rows = [draw_cell_prior(params, ss) for ss in seeds]
    u = np.stack([r[0] for r in rows]).astype(float)
    x = np.stack([r[1] for r in rows])
    eta = np.array([r[2] for r in rows])
    log_L = np.array([r[3] for r in rows])
    post = newton_map(u, params, log_L)
    # the batch's posterior draws use a seed derived from its first index (fixed chunking)
    rng = np.random.default_rng(np.random.SeedSequence(seeds[0].entropy,
                                                       spawn_key=tuple(seeds[0].spawn_key) + (1,)))
    if params.capture is not None:
        xs, es = post.sample(rng, L, eta="free")
    else:
        xs, es = post.sample(rng, L)
    xs, es = np.asarray(xs), np.asarray(es)

    def loglik(xx, ee):
        lam = xx - ee[..., None]
        return np.sum(u * lam - np.exp(lam), axis=-1)  # constants cancel in ranks

    ll_true = loglik(x, eta)
    ll_draw = loglik(xs, es)
    M = int(config.get("psis_draws", 0))
    if M:
        from .psis import exact_log_joint_draws, psis

        xm, em = post.sample(rng, M, eta="free")
        lr = exact_log_joint_draws(u, xm, em, params, log_L) - post.logpdf(xm, em)
        ps = psis(lr)
        w = np.exp(ps.lw - ps.lw.max(axis=0, keepdims=True))
        w /= w.sum(axis=0, keepdims=True)
        # inverse-CDF resampling of all cells at once: pick[l, c] = #{m : cumw[m, c] < v[l, c]},
        # one searchsorted on the columns laid end to end (column c shifted by 2c, cumw <= 1)
        cumw = np.cumsum(w, axis=0)
        v = rng.uniform(size=(L, len(indices))) * cumw[-1]
        cols = np.arange(len(indices))[None, :]
        flat = np.searchsorted((cumw + 2 * cols).T.ravel(), (v + 2 * cols).T.ravel()).reshape(-1, L).T
        pick = np.minimum(flat - M * cols, M - 1)  # (L, N)
        xr, er = xm[pick, cols], em[pick, cols]
        ll_r = loglik(xr, er)
    out = []
    for c in range(len(indices)):
        res = {"rank_x": sbc_ranks(x[c], xs[:, c], rng),
               "rank_loglik": sbc_ranks(ll_true[c], ll_draw[:, c], rng),
               "converged": bool(np.asarray(post.converged)[c]),
               "total_count": float(u[c].sum())}
        if params.capture is not None:
            res["rank_eta"] = sbc_ranks(eta[c], es[:, c], rng)
        if M:
            res["rank_psis_x"] = sbc_ranks(x[c], xr[:, c], rng)
            res["rank_psis_loglik"] = sbc_ranks(ll_true[c], ll_r[:, c], rng)
            if params.capture is not None:
                res["rank_psis_eta"] = sbc_ranks(eta[c], er[:, c], rng)
            res["khat"] = float(ps.khat[c])
        out.append(res)
    return out


JOINT_PRIOR_DEFAULTS = {"mu_loc": 3.0, "mu_scale": 0.5, "w_scale": 0.5, "d_loc": float(np.log(0.2)),
                        "d_scale": 0.5, "M0": 1000.0, "sigma_M": 0.5, "lib_lo": 50.0, "lib_hi": 500.0}


def draw_joint_prior(cfg: dict, ss: np.random.SeedSequence) -> dict:
    """Globals, anchors, latents and counts from the prior of ``pln_joint`` (as passed to it as data):

        mu_g ~ N(mu_loc, mu_scale^2), W_ga ~ N(0, w_scale^2), d_g ~ LogNormal(d_loc, d_scale^2),
        log L_c ~ Uniform(log lib_lo, log lib_hi)   (exogenous anchor, drawn first, given to inference)
        eta_c ~ TruncN(log M0 - log L_c, sigma_M^2, low 0), x_c ~ N(mu, W W^T + diag d),
        u_cg ~ Poisson(exp(x_cg - eta_c)).
    """
    c = {**JOINT_PRIOR_DEFAULTS, **cfg}
    N, G, k = int(c["N"]), int(c["G"]), int(c["k"])
    rng = np.random.default_rng(ss)
    mu = rng.normal(c["mu_loc"], c["mu_scale"], G)
    W = rng.normal(0.0, c["w_scale"], (G, k))
    d = np.exp(rng.normal(c["d_loc"], c["d_scale"], G))
    log_L = rng.uniform(np.log(c["lib_lo"]), np.log(c["lib_hi"]), N)
    m = np.log(c["M0"]) - log_L
    s = c["sigma_M"]
    eta = stats.truncnorm.rvs((0 - m) / s, np.inf, loc=m, scale=s, random_state=rng)
    x = mu + rng.normal(size=(N, k)) @ W.T + np.sqrt(d) * rng.normal(size=(N, G))
    u = rng.poisson(np.exp(x - eta[:, None]))
    return {"mu": mu, "W": W, "d": d, "log_L": log_L, "eta": eta, "x": x, "u": u, "cfg": c}


def _poisson_loglik(u, x, eta):
    from scipy.special import gammaln

    lr = x - eta[..., None]
    return np.sum(u * lr - np.exp(lr) - gammaln(u + 1), axis=(-2, -1))


def joint_nuts_task(indices: list[int], seeds: list[np.random.SeedSequence], config: dict) -> list[dict]:
    """Joint NUTS SBC of ``pln_joint`` (one simulation = one data set; built inside the worker).

    Ranks (among L draws picked evenly from the chains, see :func:`thin_draws`) of mu (G), d (G),
    the upper triangle of Sigma, x[c, 0] and eta[c] for the first ``n_latent`` cells, and the
    joint log-likelihood test quantity sum_cg log Poisson(u_cg | exp(x_cg - eta_c)).
    Also stores the gate outcome, min ESS (``ess_ok`` = ESS >= L) and divergences.
    """
    from .engines import pln_joint_data, sample_nuts
    from .gate import check_gate
    from .params import Capture
    import warnings

    import hashlib

    from .engines import stan_program

    L = int(config.get("L", 99))
    n_lat = int(config.get("n_latent", 3))
    # hash of the program's code with comments and blank space removed: comment-only edits of
    # the program during a long run do not change it, any change of the density does
    code = "\n".join(ln.split("//")[0].strip() for ln in stan_program("pln_joint").read_text().splitlines())
    sha = hashlib.sha1(" ".join(code.split()).encode()).hexdigest()[:12]
    out = []
    for i, ss in zip(indices, seeds):
        pr = draw_joint_prior(config, ss)
        c = pr["cfg"]
        G = pr["mu"].shape[0]
        data = pln_joint_data(pr["u"], int(c["k"]), capture=Capture(c["M0"], c["sigma_M"]),
                              log_anchor=pr["log_L"], mu_loc=np.full(G, c["mu_loc"]),
                              mu_scale=c["mu_scale"], w_scale=c["w_scale"], d_loc=c["d_loc"],
                              d_scale=c["d_scale"])
        stan_seed = int(np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (7,))
                        .generate_state(1)[0] % (2**31 - 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idata = sample_nuts("pln_joint", data, chains=int(c.get("chains", 4)), warmup=int(c.get("warmup", 1000)),
                                draws=int(c.get("draws", 500)), seed=stan_seed,
                                adapt_delta=float(c.get("adapt_delta", 0.99)))
            gate = check_gate(idata, var_names=["mu", "d", "Sigma", "x", "eta"])
        post = idata.posterior
        iu = np.triu_indices(G)
        S_true = pr["W"] @ pr["W"].T + np.diag(pr["d"])
        chains_draws = lambda a: np.asarray(a)  # noqa: E731  (chain, draw, ...)
        Sig = chains_draws(post["Sigma"].values)[:, :, iu[0], iu[1]]
        xs = chains_draws(post["x"].values)
        es = chains_draws(post["eta"].values)
        ll = _poisson_loglik(pr["u"][None, None], xs, es)
        q_draws = np.concatenate([post["mu"].values, post["d"].values, Sig, xs[:, :, :n_lat, 0],
                                  es[:, :, :n_lat], ll[..., None]], axis=-1)
        q_true = np.concatenate([pr["mu"], pr["d"], S_true[iu], pr["x"][:n_lat, 0], pr["eta"][:n_lat],
                                 [_poisson_loglik(pr["u"], pr["x"], pr["eta"])]])
        th, ess_min = thin_draws(q_draws, L)
        rng = np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (8,)))
        r = sbc_ranks(q_true, th, rng)
        nS = iu[0].size
        o = 0
        res = {}
        for name, n in (("mu", G), ("d", G), ("Sigma", nS), ("x", n_lat), ("eta", n_lat), ("loglik", 1)):
            res[f"rank_{name}"] = r[o:o + n] if name != "loglik" else r[o]
            o += n
        res.update(gate_passed=gate.passed, ess_min=ess_min, ess_ok=ess_min >= L,
                   divergences=gate.divergences, rhat_max=gate.rhat_max, mean_count=float(pr["u"].mean()),
                   program_sha=np.asarray(sha))
        out.append(res)
    return out
