"""The NUTS ground-truth gate: short or pathological fits are refused with reasons."""

import numpy as np
import pytest

from pln_ref.validation.engines import sample_nuts
from pln_ref.validation.standata import pln_cell_data
from pln_ref.validation.gate import GateFailedError, check_gate, require_gate
from pln_ref.simulation import random_params, simulate


@pytest.fixture(scope="module")
def cell_data():
    p = random_params(5, 2, seed=0, capture=True)
    sim = simulate(p, 1, seed=1)
    return pln_cell_data(sim.counts, p, sim.log_anchor)


@pytest.fixture(scope="module")
def good_fit(cell_data):
    return sample_nuts("pln_cell", cell_data, chains=4, warmup=500, draws=1000, seed=1)


def test_short_run_is_refused_with_reasons(cell_data):
    idata = sample_nuts("pln_cell", cell_data, chains=1, warmup=20, draws=20, seed=1)
    g = check_gate(idata)
    assert not g.passed
    text = "\n".join(g.reasons)
    assert "only 1 chain" in text and "bulk ESS" in text and "tail ESS" in text
    assert g.n_chains == 1 and g.n_draws == 20
    with pytest.raises(GateFailedError, match="bulk ESS"):
        require_gate(g)
    assert require_gate(g, force=True) is True  # forced = labelled diagnostic


def test_long_run_of_log_concave_cell_passes(good_fit):
    g = check_gate(good_fit)
    assert g.passed, g.reasons
    assert g.rhat_max < 1.01 and g.ess_bulk_min >= 400 and g.ess_tail_min >= 400
    assert g.divergences == 0 and len(g.bfmi) == 4 and min(g.bfmi) > 0.3
    assert {r["var"] for r in g.table} == {"x", "eta"}
    assert require_gate(g) is False


def test_divergences_low_bfmi_and_missing_stats_fail(good_fit):
    bad = good_fit.copy()
    div = bad.sample_stats["diverging"].values.copy()
    div[2, 10] = True
    bad.sample_stats["diverging"] = (bad.sample_stats["diverging"].dims, div)
    g = check_gate(bad)
    assert not g.passed and g.divergences == 1 and any("divergent" in r for r in g.reasons)
    # E-BFMI: an energy trace that is a smooth random walk has E-BFMI << 0.3
    low = good_fit.copy()
    e = np.cumsum(np.random.default_rng(0).normal(size=low.sample_stats["energy"].shape), axis=1)
    low.sample_stats["energy"] = (low.sample_stats["energy"].dims, e)
    g2 = check_gate(low)
    assert not g2.passed and sum("E-BFMI of chain" in r for r in g2.reasons) == 4
    # no sample_stats at all: cannot be certified
    import arviz as az
    g3 = check_gate(az.InferenceData(posterior=good_fit.posterior))
    assert not g3.passed and any("no sample_stats" in r for r in g3.reasons)
    with pytest.raises(ValueError, match="not in the posterior"):
        check_gate(good_fit, var_names=["Sigma"])


def test_scalar_parameters_are_labelled_without_brackets():
    """Issue 11 item 9: a scalar's reasons say ``y``, not ``y[]``; array elements keep ``x[i, j]``."""
    import arviz as az

    rng = np.random.default_rng(3)
    walk = np.cumsum(rng.normal(size=(4, 50)), axis=1)  # non-mixing chains: R-hat and ESS fail
    post = {"y": walk, "x": np.stack([walk, rng.normal(size=(4, 50))], axis=-1)}
    g = check_gate(az.from_dict(posterior=post), var_names=["y", "x"])
    text = "\n".join(g.reasons)
    assert "R-hat of y = " in text and "bulk ESS of y = " in text
    assert "y[]" not in text
    assert "R-hat of x[0] = " in text
