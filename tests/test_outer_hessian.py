"""The working model's observed information of ``validation/benchmarks/outer_hessian.py`` is the
Hessian of what its docstring says: -d^2/dz^2 of the mean over cells of log N(y_c | mu, Sigma(z) +
Lambda_c^{-1}), with the working responses y_c = x_c* + (u_c - lambda_c) / lambda_c and the rates
lambda_c held at the MAPs, z = (mu, vec W, s), d = D_FLOOR + s^2 (without capture, where
P_c = (Sigma + Lambda_c^{-1})^{-1} exactly)."""

import numpy as np

import pln_ref
from pln_ref.laplace import newton_map
from pln_ref.outer import lbfgs


def test_working_information_is_the_hessian_of_the_gaussian_working_model(bench_script):
    G, k, N = 5, 2, 30
    truth = pln_ref.random_params(G, k, seed=3, capture=False, mean_log_rate=1.5)
    u = pln_ref.simulate(truth, N, seed=4).counts.astype(float)
    params = pln_ref.PLNParams(truth.mu + 0.1, truth.W * 0.9, truth.d + 0.05, None)
    post = newton_map(u, params, None, gtol=1e-10)
    lam = post.precision.lam
    y = post.x_map + (u - lam) / lam  # working responses, held fixed below

    def loglik(z):
        mu, W, d = lbfgs.from_z(z, G, k)
        total = 0.0
        for c in range(N):
            C = W @ W.T + np.diag(d) + np.diag(1.0 / lam[c])
            r = y[c] - mu
            total += -0.5 * (np.linalg.slogdet(C)[1] + r @ np.linalg.solve(C, r))
        return total / N

    z = lbfgs.to_z(params.mu, params.W, params.d)
    P, h = len(z), 1e-4
    H = np.empty((P, P))
    for i in range(P):
        for j in range(i, P):
            ei, ej = np.eye(P)[i] * h, np.eye(P)[j] * h
            H[i, j] = H[j, i] = -(loglik(z + ei + ej) - loglik(z + ei - ej) - loglik(z - ei + ej)
                                  + loglik(z - ei - ej)) / (4 * h * h)
    M = bench_script("outer_hessian").working_information(params, post)
    assert M.shape == (P, P)
    np.testing.assert_allclose(M, H, rtol=1e-4, atol=1e-5 * np.abs(H).max())
