"""SBC tasks of the PLN model: the toy conjugate-normal check, the conditional Laplace SBC
(one cell per simulation) and the joint NUTS SBC of ``pln_joint``, with their prior draws.

A task is ``task(indices, seeds, config) -> list of {name: array}`` (one dict per simulation,
``rank_*`` entries are ranks); it runs on Dask workers through
:func:`pln_ref.validation.sbc_runner.run_sbc`, so it builds its Stan models itself.
"""

from __future__ import annotations

import hashlib
import time
import warnings

import numpy as np

from ..lowrank import sigma_dense
from ..model import poisson_loglik
from ..params import Capture, PLNParams
from ..simulation import simulate
from .sbc_stats import sbc_ranks, thin_draws

__all__ = [
    "toy_normal_task",
    "draw_cell_prior",
    "laplace_conditional_task",
    "JOINT_PRIOR_DEFAULTS",
    "draw_joint_prior",
    "joint_nuts_task",
]


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
    sim = simulate(params, 1, seed=rng, log_anchor=np.array([log_L]))
    return sim.counts[0], sim.x[0], float(sim.eta[0]), log_L


def laplace_conditional_task(indices: list[int], seeds: list[np.random.SeedSequence], config: dict) -> list[dict]:
    """Conditional SBC of the Laplace approximation (one simulation = one cell).

    Fixed globals (config mu, W, d, M0, sigma_M); each simulation draws its anchor, latents and
    counts from the prior with its own seed (:func:`draw_cell_prior`); the whole batch goes
    through one ``newton_map`` call; L independent draws per cell from the Laplace posterior
    (eta free); ranks of every x_g, eta and the log-likelihood test quantity
    log p(u | x, eta) = sum_g Poisson(u_g | exp(x_g - eta)).

    ``config["posterior"] = "eta_marginal"`` ranks the draws of ``pln_ref.eta_marginal`` (eta
    integrated by quadrature, x by Laplace at each eta) instead of the Gaussian Laplace posterior;
    ``"eta_marginal_skew"`` the same with the skew transform of x | eta (``eta_marginal(skew=True)``).

    ``config["psis_draws"] = M > 0`` adds the PSIS-reweighted posterior: M Laplace draws per cell,
    Pareto-smoothed importance weights against the exact ``pln_cell`` density, L draws resampled
    with those weights (sampling-importance-resampling), ranked as ``rank_psis_*``; its k-hat per
    cell is stored as ``khat``. SIR is exact as M grows (bias O(1/M) when k-hat < 0.5).
    """
    from ..laplace import newton_map

    params = _params_from_config(config)
    L = int(config.get("L", 99))
    rows = [draw_cell_prior(params, ss) for ss in seeds]
    u = np.stack([r[0] for r in rows]).astype(float)
    x = np.stack([r[1] for r in rows])
    eta = np.array([r[2] for r in rows])
    log_L = np.array([r[3] for r in rows])
    post = newton_map(u, params, log_L)
    kind = config.get("posterior", "gaussian")
    if kind in ("eta_marginal", "eta_marginal_skew"):  # issue 16: eta integrated by quadrature
        from ..eta_marginal import eta_marginal

        post = eta_marginal(u, post, log_L, skew=kind == "eta_marginal_skew")
    elif kind != "gaussian":
        raise ValueError(f"unknown posterior {kind!r}: gaussian, eta_marginal or eta_marginal_skew")
    # the batch's posterior draws use a seed derived from its first index (fixed chunking)
    rng = np.random.default_rng(np.random.SeedSequence(seeds[0].entropy,
                                                       spawn_key=tuple(seeds[0].spawn_key) + (1,)))
    if params.capture is not None:
        xs, es = post.sample(rng, L, eta="free")
    else:
        xs, es = post.sample(rng, L)
    xs, es = np.asarray(xs), np.asarray(es)
    ll_true = _loglik_draws(u, x, eta)
    ll_draw = _loglik_draws(u, xs, es)
    M = int(config.get("psis_draws", 0))
    if M:
        xr, er, khat = _psis_resample(post, u, params, log_L, M, L, rng)
        ll_r = _loglik_draws(u, xr, er)
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
            res["khat"] = float(khat[c])
        out.append(res)
    return out


def _loglik_draws(u: np.ndarray, x: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """log p(u | x, eta) of ``pln_ref.model.poisson_loglik`` for the N cells of u (N, G) at
    x (..., N, G), eta (..., N) (draws along the leading axes) -> (..., N)."""
    x = np.asarray(x, dtype=float)
    G = x.shape[-1]
    uu = np.broadcast_to(np.asarray(u, dtype=float), x.shape).reshape(-1, G)
    return poisson_loglik(uu, x.reshape(-1, G), np.asarray(eta, dtype=float).reshape(-1)).reshape(x.shape[:-1])


def _psis_resample(post, u: np.ndarray, params, log_L: np.ndarray, M: int, L: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling-importance-resampling of the Laplace posterior ``post`` of N cells: M draws per
    cell, Pareto-smoothed weights against the exact ``pln_cell`` density, L draws per cell
    resampled with them. Returns (x (L, N, G), eta (L, N), k-hat (N,))."""
    from .psis import exact_log_joint_draws, psis

    xm, em = post.sample(rng, M, eta="free")
    lr = exact_log_joint_draws(u, xm, em, params, log_L) - post.logpdf(xm, em)
    ps = psis(lr)
    w = np.exp(ps.lw - ps.lw.max(axis=0, keepdims=True))
    w /= w.sum(axis=0, keepdims=True)
    # inverse-CDF resampling of all cells at once: pick[l, c] = #{m : cumw[m, c] < v[l, c]},
    # one searchsorted on the columns laid end to end (column c shifted by 2c, cumw <= 1)
    N = u.shape[0]
    cumw = np.cumsum(w, axis=0)
    v = rng.uniform(size=(L, N)) * cumw[-1]
    cols = np.arange(N)[None, :]
    flat = np.searchsorted((cumw + 2 * cols).T.ravel(), (v + 2 * cols).T.ravel()).reshape(-1, L).T
    pick = np.minimum(flat - M * cols, M - 1)  # (L, N)
    return xm[pick, cols], em[pick, cols], ps.khat


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
    sim = simulate(PLNParams(mu, W, d, Capture(c["M0"], c["sigma_M"])), N, seed=rng, log_anchor=log_L)
    eta, x, u = sim.eta, sim.x, sim.counts
    return {"mu": mu, "W": W, "d": d, "log_L": log_L, "eta": eta, "x": x, "u": u, "cfg": c}


def _program_hash(name: str) -> str:
    """Hash of a Stan program's code with comments and blank space removed: comment-only edits
    of the program during a long run do not change it, any change of the density does."""
    from .engines import stan_program

    code = "\n".join(ln.split("//")[0].strip() for ln in stan_program(name).read_text().splitlines())
    return hashlib.sha1(" ".join(code.split()).encode()).hexdigest()[:12]


def _fit_joint_nuts(pr: dict, ss: np.random.SeedSequence):
    """Gated NUTS fit of ``pln_joint`` on one prior draw (data built with the prior that drew it)."""
    from .engines import sample_nuts
    from .gate import check_gate
    from .standata import pln_joint_data

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
    return idata, gate


def _joint_quantities(pr: dict, post, n_lat: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranked quantities of the joint SBC, true values (Q,) and NUTS draws (chain, draw, Q):
    mu (G), d (G), the upper triangle of Sigma, x[c, 0] and eta[c] of the first n_lat cells,
    the log-likelihood sum_cg log Poisson(u_cg | exp(x_cg - eta_c))."""
    G = pr["mu"].shape[0]
    iu = np.triu_indices(G)
    S_true = sigma_dense(pr["W"], pr["d"])
    Sig = np.asarray(post["Sigma"].values)[:, :, iu[0], iu[1]]
    xs = np.asarray(post["x"].values)
    es = np.asarray(post["eta"].values)
    ll = _loglik_draws(pr["u"], xs, es).sum(axis=-1)
    q_draws = np.concatenate([post["mu"].values, post["d"].values, Sig, xs[:, :, :n_lat, 0],
                              es[:, :, :n_lat], ll[..., None]], axis=-1)
    q_true = np.concatenate([pr["mu"], pr["d"], S_true[iu], pr["x"][:n_lat, 0], pr["eta"][:n_lat],
                             [_loglik_draws(pr["u"], pr["x"], pr["eta"]).sum()]])
    return q_true, q_draws


def joint_nuts_task(indices: list[int], seeds: list[np.random.SeedSequence], config: dict) -> list[dict]:
    """Joint NUTS SBC of ``pln_joint`` (one simulation = one data set; built inside the worker).

    Ranks (among L draws picked evenly from the chains, see :func:`thin_draws`) of mu (G), d (G),
    the upper triangle of Sigma, x[c, 0] and eta[c] for the first ``n_latent`` cells, and the
    joint log-likelihood test quantity sum_cg log Poisson(u_cg | exp(x_cg - eta_c)).
    Also stores the gate outcome, min ESS (``ess_ok`` = ESS >= L) and divergences.
    """
    L = int(config.get("L", 99))
    n_lat = int(config.get("n_latent", 3))
    sha = _program_hash("pln_joint")
    out = []
    for i, ss in zip(indices, seeds):
        pr = draw_joint_prior(config, ss)
        idata, gate = _fit_joint_nuts(pr, ss)
        q_true, q_draws = _joint_quantities(pr, idata.posterior, n_lat)
        th, ess_min = thin_draws(q_draws, L)
        rng = np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (8,)))
        r = sbc_ranks(q_true, th, rng)
        G = pr["mu"].shape[0]
        res, o = {}, 0
        for name, n in (("mu", G), ("d", G), ("Sigma", G * (G + 1) // 2), ("x", n_lat), ("eta", n_lat),
                        ("loglik", 1)):
            res[f"rank_{name}"] = r[o:o + n] if name != "loglik" else r[o]
            o += n
        res.update(gate_passed=gate.passed, ess_min=ess_min, ess_ok=ess_min >= L,
                   divergences=gate.divergences, rhat_max=gate.rhat_max, mean_count=float(pr["u"].mean()),
                   program_sha=np.asarray(sha))
        out.append(res)
    return out
