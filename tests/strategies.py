"""Hypothesis strategies shared by the NumPy = Stan equivalence tests (stanli and real BridgeStan)."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def draw_latents(draw, G_max: int):
    """(u, x, eta, mu, W, d) of N = 1-3 cells, G in [3, G_max], k in [1, min(3, G - 1)]."""
    G = draw(st.integers(3, G_max))
    k = draw(st.integers(1, min(3, G - 1)))
    N = draw(st.integers(1, 3))
    mu = draw(hnp.arrays(float, G, elements=floats(-3.0, 8.0)))
    W = draw(hnp.arrays(float, (G, k), elements=floats(-2.0, 2.0)))
    d = draw(hnp.arrays(float, G, elements=floats(0.05, 3.0)))
    x = draw(hnp.arrays(float, (N, G), elements=floats(-5.0, 10.0)))
    eta = draw(hnp.arrays(float, N, elements=floats(0.01, 8.0)))
    u = draw(hnp.arrays(np.int64, (N, G), elements=st.integers(0, 10_000)))
    return u, x, eta, mu, W, d
