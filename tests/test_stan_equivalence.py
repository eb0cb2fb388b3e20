"""stan/pln_cell.stan and stan/pln_joint.stan against pln_ref.model.log_joint (NumPy).

Tolerances (stated once, used everywhere):
  value:    |stan - numpy| <= 1e-9 * max(|numpy|, 1)
  gradient: ||stan - numpy||_2 <= 1e-9 * max(||numpy||_2, 1)          (norm-wise relative)
Unconstrained scale of pln_cell: theta = (x cell-major, log eta), so
  log_density = sum_c log_joint_c + sum_c log eta_c,   d/dlog eta = g_eta * eta + 1.
The maximum relative errors seen are printed at the end of the module (run with ``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from pln_ref.validation.engines import bridgestan_model
from pln_ref.validation.standata import pln_cell_data, pln_cell_unconstrain, pln_joint_data
from pln_ref.model import grad_log_joint, log_joint
from pln_ref.params import Capture, PLNParams
from strategies import draw_latents
from strategies import floats as _floats

REL_TOL = 1e-9
MAX_ERR = {"cell_value": 0.0, "cell_grad": 0.0, "joint_value": 0.0, "joint_grad_latent": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _report_max_errors():
    yield
    print("\n[stan-equivalence] max relative errors: " + ", ".join(f"{k}={v:.3e}" for k, v in MAX_ERR.items()))


def _rel(a, b) -> float:
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0))


@st.composite
def cells(draw):
    u, x, eta, mu, W, d = draw_latents(draw, G_max=12)
    N = u.shape[0]
    L = draw(hnp.arrays(float, N, elements=_floats(100.0, 5000.0)))
    M0 = draw(_floats(1e3, 1e6))
    sigma_M = draw(_floats(0.1, 2.0))
    params = PLNParams(mu=mu, W=W, d=d, capture=Capture(M0=M0, sigma_M=sigma_M))
    return u, x, eta, params, np.log(L)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells())
def test_pln_cell_matches_log_joint(case):
    u, x, eta, params, log_L = case
    model = bridgestan_model("pln_cell", pln_cell_data(u, params, log_L))
    theta = pln_cell_unconstrain(x, eta)
    # the documented order: constrained output is x (Stan column-major over [N, G]) then eta
    np.testing.assert_allclose(model.param_constrain(theta), np.concatenate([x.T.ravel(), eta]), rtol=1e-14, atol=0)

    ref = float(log_joint(u, x, eta, params, log_L).sum() + np.log(eta).sum())
    val, grad = model.log_density_gradient(theta)
    g_x, g_eta = grad_log_joint(u, x, eta, params, log_L)
    ref_grad = np.concatenate([g_x.ravel(), g_eta * eta + 1.0])

    err_v = abs(val - ref) / max(abs(ref), 1.0)
    err_g = _rel(grad, ref_grad)
    MAX_ERR["cell_value"] = max(MAX_ERR["cell_value"], err_v)
    MAX_ERR["cell_grad"] = max(MAX_ERR["cell_grad"], err_g)
    assert err_v <= REL_TOL, (val, ref)
    assert err_g <= REL_TOL, (grad, ref_grad)


def _joint_priors_numpy(data: dict, mu, W, d) -> float:
    """log p(mu) + log p(W) + log p(d) of pln_joint (full constants)."""
    return float(
        stats.norm.logpdf(mu, data["mu_loc"], data["mu_scale"]).sum()
        + stats.norm.logpdf(W, 0.0, data["w_scale"]).sum()
        + stats.lognorm.logpdf(d, s=data["d_scale"], scale=np.exp(data["d_loc"])).sum()
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells(), st.booleans())
def test_pln_joint_minus_priors_is_sum_of_log_joint(case, with_capture):
    """pln_joint (centred=1) uses target += with full constants, so the comparison is absolute:
    log_density - priors - Jacobians(sum log d + sum log eta) == sum_c log_joint_c."""
    u, x, eta, params, log_L = case
    G, k = params.G, params.k
    capture = params.capture if with_capture else None
    p = params.with_capture(capture)
    data = pln_joint_data(u, k, capture=capture, log_anchor=log_L, centred=True)
    model = bridgestan_model("pln_joint", data)
    parts = [p.mu, p.W.ravel(order="F"), np.log(p.d), x.ravel()]
    if capture is not None:
        parts.append(np.log(eta))
    theta = np.concatenate(parts)
    assert model.param_unc_num() == theta.size
    cons = model.param_constrain(theta)
    np.testing.assert_allclose(cons[: G + G * k + G], np.concatenate([p.mu, p.W.ravel(order="F"), p.d]), rtol=1e-14)

    eta_used = eta if capture is not None else None
    cells_sum = float(log_joint(u, x, eta_used, p, log_L).sum())
    jac = float(np.log(p.d).sum() + (np.log(eta).sum() if capture is not None else 0.0))
    val, grad = model.log_density_gradient(theta)
    lhs = val - _joint_priors_numpy(data, p.mu, p.W, p.d) - jac
    err_v = abs(lhs - cells_sum) / max(abs(cells_sum), 1.0)

    # latent block of the gradient: the priors on (mu, W, d) do not involve x or eta
    g_x, g_eta = grad_log_joint(u, x, eta_used, p, log_L)
    ref = [g_x.ravel()] + ([g_eta * eta + 1.0] if capture is not None else [])
    err_g = _rel(grad[G + G * k + G:], np.concatenate(ref))
    MAX_ERR["joint_value"] = max(MAX_ERR["joint_value"], err_v)
    MAX_ERR["joint_grad_latent"] = max(MAX_ERR["joint_grad_latent"], err_g)
    assert err_v <= REL_TOL, (lhs, cells_sum)
    assert err_g <= REL_TOL


@pytest.mark.parametrize("m_over_sigma", [-40.0, -8.3, 0.0, 40.0])
@pytest.mark.parametrize("program", ["pln_cell", "pln_joint"])
def test_capture_normaliser_is_finite_far_in_both_tails(program, m_over_sigma):
    """The TruncN normaliser log Phi(m / sigma_M) must stay finite and exact at m/sigma_M = -40
    (L_c ~ e^20 M0) as well as +40: written as std_normal_lcdf(m / sigma_M), which real Stan
    evaluates stably, where normal_lccdf(0 | m, sigma_M) is -inf beyond -m/sigma_M > 8.25."""
    G, k, sigma_M, M0 = 4, 1, 0.5, 1000.0
    rng = np.random.default_rng(1)
    params = PLNParams(mu=rng.normal(1.0, 0.3, G), W=rng.normal(0, 0.4, (G, k)), d=np.full(G, 0.3),
                       capture=Capture(M0=M0, sigma_M=sigma_M))
    m = m_over_sigma * sigma_M
    log_L = np.array([np.log(M0) - m])
    u = rng.poisson(3.0, (1, G))
    x, eta = rng.normal(1.0, 0.5, (1, G)), np.array([0.7])
    ref = float(log_joint(u, x, eta, params, log_L).sum())
    assert np.isfinite(ref)
    if program == "pln_cell":
        model = bridgestan_model("pln_cell", pln_cell_data(u, params, log_L))
        val, grad = model.log_density_gradient(pln_cell_unconstrain(x, eta))
        lhs = val - np.log(eta).sum()
        g_x, g_eta = grad_log_joint(u, x, eta, params, log_L)
        assert _rel(grad, np.concatenate([g_x.ravel(), g_eta * eta + 1.0])) <= REL_TOL
    else:
        data = pln_joint_data(u, k, capture=params.capture, log_anchor=log_L, centred=True)
        model = bridgestan_model("pln_joint", data)
        theta = np.concatenate([params.mu, params.W.ravel(order="F"), np.log(params.d), x.ravel(),
                                np.log(eta)])
        val = model.log_density(theta)
        lhs = val - _joint_priors_numpy(data, params.mu, params.W, params.d) - np.log(params.d).sum() \
            - np.log(eta).sum()
    assert np.isfinite(val)
    assert abs(lhs - ref) <= REL_TOL * max(abs(ref), 1.0), (program, m_over_sigma, lhs, ref)
