"""Outer optimisation of the globals (mu, W, d) on the Laplace evidence, one idea per module:

- ``evaluate``: the evidence and its exact IFT gradient at given globals (warm-started Newton);
- ``lbfgs``: full-batch L-BFGS on (mu, W, sqrt(d - D_FLOOR)), the certified default;
- ``sampled``: the stochastic path for large N, L-BFGS on nested random samples of cells doubling to
  all N (dynamic sample size), the last phase the full-batch L-BFGS;
- ``adam``: Adam on (mu, W, log d), full batch or minibatches;
- ``stopping``: stopping rules that certify convergence and report which rule stopped a fit;
- ``start``: the start (method of moments with d raised where lambda d << 1);
- ``state``: the checkpointed state and the data fingerprint that ties it to its data.
"""

from .evaluate import Evaluation, Evaluator, laplace_objective, laplace_terms
from .start import initial_globals, raise_d
from .state import LaplaceFitState, check_fingerprint, data_fingerprint
from .stopping import StopRule

__all__ = ["Evaluator", "Evaluation", "laplace_objective", "laplace_terms", "initial_globals",
           "raise_d", "LaplaceFitState", "data_fingerprint", "check_fingerprint", "StopRule"]
