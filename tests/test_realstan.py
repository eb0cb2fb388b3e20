"""Real Stan engines (issue 14): compiled BridgeStan and CmdStan through cmdstanpy.

Marker ``realstan``. The tests run when the engines are there and skip with the reason otherwise
(CI has neither):

* ``BRIDGESTAN``: a BridgeStan source tree (with the matching Python client ``bridgestan``,
  e.g. ``PYTHONPATH=<dir with bridgestan 2.5.0>`` for a BridgeStan 2.5 build);
* ``CMDSTAN``: a built CmdStan.

    CMDSTAN=... BRIDGESTAN=... PYTHONPATH=<bs25>:. python -m pytest -m realstan -s tests/test_realstan.py

Compiled products go into the stancache (first build of each program: 1-3 min). The measured
maximum relative errors and |z| are printed at the end of the module (``-s``).

Tolerances: value |stan - numpy| <= 1e-9 max(|numpy|, 1); gradient ||stan - numpy||_2 <=
1e-9 max(||numpy||_2, 1); NUTS agreement worst |z| <= 4 with z = (mean_a - mean_b) /
sqrt(mcse_a^2 + mcse_b^2).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from pln_ref.model import grad_log_joint, log_joint
from pln_ref.params import Capture, PLNParams
from pln_ref.simulation import random_params, simulate
from pln_ref.validation.engines import bridgestan_model, sample_nuts, stan_program
from pln_ref.validation.standata import pln_cell_data, pln_cell_unconstrain, pln_joint_data, pln_joint_inits
from strategies import draw_latents
from strategies import floats as _floats

pytestmark = pytest.mark.realstan

needs_bridgestan = pytest.mark.skipif(
    not os.environ.get("BRIDGESTAN"),
    reason="BRIDGESTAN is not set: no compiled BridgeStan to test (see README, 'Using a real CmdStan')")


def _cmdstan_found() -> bool:
    if not os.environ.get("CMDSTAN"):
        return False
    from pln_ref.validation.engines import default_engine

    return default_engine() == "cmdstanpy"


needs_cmdstan = pytest.mark.skipif(
    not _cmdstan_found(),
    reason="CMDSTAN is not set (or is not a built CmdStan): cmdstanpy cannot run (see README)")

REL_TOL = 1e-9
MAX = {"cell_value": 0.0, "cell_grad": 0.0, "joint_value": 0.0, "joint_grad_latent": 0.0,
       "joint_grad_vs_stanli": 0.0}
Z = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if any(MAX.values()):
        print("\n[realstan] NumPy vs compiled BridgeStan, max relative difference: "
              + ", ".join(f"{k}={v:.2e}" for k, v in MAX.items()))
    for k, v in Z.items():
        print(f"[realstan] cmdstanpy vs stanli {k}: worst |z| {v[0]:.2f} over {v[1]} quantities")


def _rel(a, b) -> float:
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0))


def _compiled(program: str, data: dict):
    """The compiled BridgeStan model (asserting that it is not stanli's)."""
    model = bridgestan_model(program, data)
    from pln_ref.validation.stancache import cache_root

    lib = Path(getattr(model, "lib_path", ""))
    assert lib.name.endswith("_model.so") and str(lib).startswith(str(cache_root())), lib
    return model


@st.composite
def cases(draw):
    """A data set with the capture prior's m / sigma_M anywhere in [-40, 40] (L_c up to e^20 M0)."""
    u, x, eta, mu, W, d = draw_latents(draw, G_max=10)
    N = u.shape[0]
    sigma_M = draw(_floats(0.1, 2.0))
    M0 = draw(_floats(1e3, 1e6))
    m_over_sigma = draw(hnp.arrays(float, N, elements=_floats(-40.0, 40.0)))
    params = PLNParams(mu=mu, W=W, d=d, capture=Capture(M0=M0, sigma_M=sigma_M))
    return u, x, eta, params, np.log(M0) - m_over_sigma * sigma_M


def _fixed_case(m_over_sigma: float):
    rng = np.random.default_rng(1)
    G, k, sigma_M, M0 = 4, 1, 0.5, 1000.0
    params = PLNParams(mu=rng.normal(1.0, 0.3, G), W=rng.normal(0, 0.4, (G, k)), d=np.full(G, 0.3),
                       capture=Capture(M0=M0, sigma_M=sigma_M))
    return (rng.poisson(3.0, (1, G)), rng.normal(1.0, 0.5, (1, G)), np.array([0.7]), params,
            np.array([np.log(M0) - m_over_sigma * sigma_M]))


@needs_bridgestan
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
@example(_fixed_case(-40.0))
@example(_fixed_case(-8.3))
@example(_fixed_case(0.0))
@example(_fixed_case(40.0))
def test_numpy_equals_compiled_bridgestan_pln_cell(case):
    u, x, eta, params, log_L = case
    model = _compiled("pln_cell", pln_cell_data(u, params, log_L))
    theta = pln_cell_unconstrain(x, eta)
    val, grad = model.log_density_gradient(theta)
    ref = float(log_joint(u, x, eta, params, log_L).sum() + np.log(eta).sum())
    g_x, g_eta = grad_log_joint(u, x, eta, params, log_L)
    ref_grad = np.concatenate([g_x.ravel(), g_eta * eta + 1.0])
    assert np.isfinite(val) and np.all(np.isfinite(grad))
    err_v, err_g = abs(val - ref) / max(abs(ref), 1.0), _rel(grad, ref_grad)
    MAX["cell_value"] = max(MAX["cell_value"], err_v)
    MAX["cell_grad"] = max(MAX["cell_grad"], err_g)
    assert err_v <= REL_TOL, (val, ref)
    assert err_g <= REL_TOL


def _joint_priors_numpy(data: dict, mu, W, d) -> float:
    return float(stats.norm.logpdf(mu, data["mu_loc"], data["mu_scale"]).sum()
                 + stats.norm.logpdf(W, 0.0, data["w_scale"]).sum()
                 + stats.lognorm.logpdf(d, s=data["d_scale"], scale=np.exp(data["d_loc"])).sum())


@needs_bridgestan
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
@example(_fixed_case(-40.0))
@example(_fixed_case(-8.3))
@example(_fixed_case(0.0))
@example(_fixed_case(40.0))
def test_numpy_equals_compiled_bridgestan_pln_joint(case):
    """Centred pln_joint: log density - priors - Jacobians = sum_c log_joint_c, latent gradient =
    NumPy's; and the whole gradient (globals included), in both parameterisations, equals stanli's."""
    import stanli

    from pln_ref.validation.engines import _stan_json

    u, x, eta, params, log_L = case
    G, k = params.G, params.k
    data = pln_joint_data(u, k, capture=params.capture, log_anchor=log_L, centred=True)
    model = _compiled("pln_joint", data)
    theta = np.concatenate([params.mu, params.W.ravel(order="F"), np.log(params.d), x.ravel(), np.log(eta)])
    val, grad = model.log_density_gradient(theta)
    cells = float(log_joint(u, x, eta, params, log_L).sum())
    lhs = val - _joint_priors_numpy(data, params.mu, params.W, params.d) - np.log(params.d).sum() - np.log(eta).sum()
    g_x, g_eta = grad_log_joint(u, x, eta, params, log_L)
    err_v = abs(lhs - cells) / max(abs(cells), 1.0)
    err_g = _rel(grad[G + G * k + G:], np.concatenate([g_x.ravel(), g_eta * eta + 1.0]))
    MAX["joint_value"] = max(MAX["joint_value"], err_v)
    MAX["joint_grad_latent"] = max(MAX["joint_grad_latent"], err_g)
    assert err_v <= REL_TOL, (lhs, cells)
    assert err_g <= REL_TOL
    for centred in (True, False):
        d2 = dict(data, centred=int(centred))
        compiled = model if centred else _compiled("pln_joint", d2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 2.5 client notes that stanli's library is not 2.5
            ref_model = stanli.bridgestan_model(stan_file=str(stan_program("pln_joint")), data=_stan_json(d2))
        th = np.random.default_rng(0).normal(0, 0.5, compiled.param_unc_num())
        v1, g1 = compiled.log_density_gradient(th)
        v2, g2 = ref_model.log_density_gradient(th)
        # stanli keeps only propto=True densities: compare gradients, and values up to nothing
        # (every statement of pln_joint is target += ..., so no constant is dropped)
        MAX["joint_grad_vs_stanli"] = max(MAX["joint_grad_vs_stanli"], _rel(g1, g2))
        assert abs(v1 - v2) <= REL_TOL * max(abs(v2), 1.0)
        assert _rel(g1, g2) <= REL_TOL


def test_no_build_products_beside_the_programs():
    """Compiled engines build into the stancache: stan/ holds only .stan files."""
    folder = stan_program("pln_cell").parent
    assert {p.suffix for p in folder.iterdir() if p.is_file()} == {".stan"}, sorted(folder.iterdir())


# --------------------------------------------------------------------------- cmdstanpy

def _agreement(a, b, var_names) -> tuple[float, int]:
    import arviz as az

    zs = []
    for v in var_names:
        m = [f.posterior[v].mean(("chain", "draw")).values for f in (a, b)]
        se = [az.mcse(f.posterior[[v]], method="mean")[v].values for f in (a, b)]
        zs.append(((m[0] - m[1]) / np.sqrt(se[0] ** 2 + se[1] ** 2)).reshape(-1))
    z = np.concatenate(zs)
    z = z[np.isfinite(z)]
    return float(np.max(np.abs(z))), int(z.size)


@needs_cmdstan
def test_cmdstanpy_agrees_with_stanli_on_pln_cell():
    p = random_params(10, 2, seed=0, capture=True, mean_log_rate=2.0)
    sim = simulate(p, 3, seed=1)
    data = pln_cell_data(sim.counts, p, sim.log_anchor)
    fits = [sample_nuts("pln_cell", data, engine=e, chains=4, warmup=1000, draws=1000, seed=11)
            for e in ("cmdstanpy", "stanli")]
    assert fits[0].posterior.attrs["engine"] == "cmdstanpy"
    assert int(fits[0].sample_stats["diverging"].sum()) == 0
    Z["pln_cell"] = worst, n = _agreement(*fits, ["x", "eta"])
    assert n == 33 and worst <= 4.0


@needs_cmdstan
def test_cmdstanpy_agrees_with_stanli_on_pln_joint():
    p = random_params(5, 1, seed=3, mean_log_rate=2.5, capture=True)
    sim = simulate(p, 20, seed=4)
    data = pln_joint_data(sim.counts, 1, capture=p.capture, log_anchor=sim.log_anchor)
    fits = [sample_nuts("pln_joint", data, engine=e, chains=4, warmup=1000, draws=1000, seed=12,
                        adapt_delta=0.9) for e in ("cmdstanpy", "stanli")]
    for f in fits:  # one ArviZ convention on every engine
        assert "log_lik" in f.log_likelihood and "log_lik" not in f.posterior
    Z["pln_joint"] = worst, n = _agreement(*fits, ["mu", "d", "Sigma", "x", "eta"])
    assert n >= 150 and worst <= 4.0


@needs_cmdstan
@pytest.mark.parametrize("centred", [False, True])
def test_cmdstanpy_takes_pln_joint_inits_and_warmup_0(centred):
    """Inits of either parameterisation (zero-size arrays left out) start CmdStan, and warmup=0
    runs without adaptation at step size 1 on cmdstanpy as on stanli."""
    p = random_params(5, 1, seed=3, mean_log_rate=2.5, capture=True)
    sim = simulate(p, 6, seed=4)
    data = pln_joint_data(sim.counts, 1, capture=p.capture, log_anchor=sim.log_anchor, centred=centred)
    inits = pln_joint_inits(data, p, sim.x, sim.eta)
    for engine in ("cmdstanpy", "stanli"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idata = sample_nuts("pln_joint", data, engine=engine, chains=2, warmup=0, draws=10, seed=1,
                                inits=inits)
        assert idata.posterior["x"].shape == (2, 10, 6, 5)
        assert idata.posterior.attrs["num_warmup"] == 0
        np.testing.assert_array_equal(idata.sample_stats["step_size"].values, 1.0)


@needs_cmdstan
def test_cmdstanpy_is_quiet_unless_verbose(caplog):
    """No cmdstanpy INFO record is even created unless verbose (its own handler prints them)."""
    import logging

    p = random_params(4, 1, seed=1, capture=True)
    sim = simulate(p, 2, seed=2)
    data = pln_cell_data(sim.counts, p, sim.log_anchor)
    sample_nuts("pln_cell", data, engine="cmdstanpy", chains=1, warmup=50, draws=20)  # compiled / cached
    caplog.clear()

    def info_lines():
        return [r.getMessage() for r in caplog.records if r.name.startswith("cmdstanpy") and r.levelno == logging.INFO]

    sample_nuts("pln_cell", data, engine="cmdstanpy", chains=1, warmup=50, draws=20)
    assert info_lines() == []
    sample_nuts("pln_cell", data, engine="cmdstanpy", chains=1, warmup=50, draws=20, verbose=True)
    assert any("CmdStan" in m for m in info_lines())


@needs_bridgestan
def test_compiled_bridgestan_is_quiet_unless_verbose():
    p = random_params(4, 1, seed=1, capture=True)
    sim = simulate(p, 2, seed=2)
    data = pln_cell_data(sim.counts, p, sim.log_anchor)
    _compiled("pln_cell", data)
    for verbose, expected in ((None, False), (True, True)):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            bridgestan_model("pln_cell", data, verbose=verbose)
        assert any("already been loaded" in str(w.message) for w in rec) == expected, [str(w.message) for w in rec]


@needs_bridgestan
def test_the_pypi_client_with_this_build_says_which_client_to_install():
    """The environment's own bridgestan client (not the one on PYTHONPATH for these tests) against
    $BRIDGESTAN: when their versions differ, one clear ImportError naming the client to install."""
    import subprocess
    import sys

    from pln_ref.validation.engines import _bridgestan_source_version

    lib = _bridgestan_source_version(Path(os.environ["BRIDGESTAN"]))
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=repo)
    code = ("import bridgestan, sys\n"
            "from pln_ref.validation.engines import bridgestan_model\n"
            "print(bridgestan.__version__)\n"
            "try:\n    bridgestan_model('pln_cell', {})\n"
            "except ImportError as e:\n    print('IMPORTERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    client = out.stdout.splitlines()[0]
    if client.split(".")[:2] == lib.split(".")[:2]:
        pytest.skip(f"the environment's client {client} matches BridgeStan {lib}: no mismatch to show")
    assert f"IMPORTERROR BRIDGESTAN=" in out.stdout and f"pip install bridgestan=={lib}" in out.stdout, out
