"""Numerical constants shared across pln-ref (one definition each)."""

from __future__ import annotations

import math

__all__ = ["LOG_2PI", "D_FLOOR", "GAP_TOL", "MIN_SAMPLE_COUNTS"]

#: log(2 pi), the Gaussian normaliser's constant.
LOG_2PI = math.log(2.0 * math.pi)

#: Lower bound on the diagonal d of Sigma = W W^T + diag(d) in the Laplace fit. With few cells the
#: marginal likelihood can be maximal at d_g -> 0 for a gene (a Heywood case; measured at N=100,
#: G=10: d_g ran below 1e-9, where Sigma is numerically singular and the per-cell Newton no longer
#: converges); the floor keeps such a gene at a well-posed point.
D_FLOOR = 1e-6

#: Default tolerance (nats/cell) of the L-BFGS certificate on the estimated evidence gap
#: (``outer.stopping``): a factor 10 below the 1e-3 nats/cell the project asks of a fit, because the
#: gap estimate has been measured 5-6.5 times below the true gap (real 2000 x 2000 counts, k = 10,
#: with about 360 Heywood genes; ``outer.stopping``).
GAP_TOL = 1e-4

#: Expected counts of the sparsest expressed gene in the first sample of the sampled L-BFGS
#: (``outer.sampled.first_sample_size``): a sample with fewer counts of a gene cannot resolve its d,
#: and the samples can leave it where the full-batch phase stops short (``outer.sampled``).
MIN_SAMPLE_COUNTS = 500.0
