"""The simulation design of the validation: realistic library sizes, exogenous anchor.

Library sizes L_c are drawn first (log-uniform on [100, 5000] by default), eta_c from its prior
given L_c, then x_c and u_c; inference receives the same L_c, never the realised sum.
"""

from __future__ import annotations

import numpy as np

from ..params import PLNParams
from ..simulation import Simulation, random_params, simulate

__all__ = ["simulate_cells"]


def simulate_cells(G: int = 20, k: int = 3, n_cells: int = 200, *, lib_range=(100.0, 5000.0),
                   seed: int = 0, mean_log_rate: float = 7.5,
                   sigma_M: float = 0.5) -> tuple[PLNParams, Simulation]:
    """Simulated data with realistic library sizes and an exogenous anchor.

    Globals from ``random_params(G, k, mean_log_rate, capture=True)`` (M0 = expected total mRNA,
    about 5e4 for the defaults); anchors L_c log-uniform on ``lib_range`` drawn first, so the
    expected total count of cell c is about L_c. ``lib_range=None``: the simulator's default anchor
    L_c = M0 kappa_c (capture efficiency kappa_c log-uniform on [0.05, 0.5], so eta is away from
    its bound). Returns (params, Simulation).
    """
    params = random_params(G, k, seed=seed, mean_log_rate=mean_log_rate, capture=True, sigma_M=sigma_M)
    if lib_range is None:  # the simulator's default exogenous anchor: L_c = M0 kappa_c, kappa_c in [0.05, 0.5]
        return params, simulate(params, n_cells, seed=np.random.SeedSequence(seed, spawn_key=(2,)))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    L = np.exp(rng.uniform(np.log(lib_range[0]), np.log(lib_range[1]), n_cells))
    sim = simulate(params, n_cells, seed=np.random.SeedSequence(seed, spawn_key=(2,)), library_size=L)
    return params, sim
