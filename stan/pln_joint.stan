// pln_joint.stan -- full joint posterior of the PLN model with capture: globals (mu, W, d) and
// every cell's latents (x^(c), eta^(c)).  Seed notation (pln-model.md):
//   x^(c)   ~ N(mu, Sigma),   Sigma = W W^T + diag(d)
//   eta^(c) ~ TruncN(log M0 - log L_c, sigma_M^2, low = 0)          (only when capture == 1)
//   u_g^(c) | x, eta ~ Poisson(exp(x_g^(c) - eta^(c)))
//
// PARAMETERISATION (chosen by measurement, table below):
//   * W is a plain G x k matrix with the rotation-invariant prior W_ga ~ N(0, w_scale^2): the
//     posterior is invariant under W -> W Q (Q orthogonal), so W itself is NOT identified; every
//     reported quantity is: Sigma, Omega (correlation) and W_id = W Q, the rotation that makes
//     W_id[1:k] lower-triangular with positive diagonal (generated quantities).  Diagnose Sigma /
//     Omega / W_id / d / mu / x / eta, never raw W (its R-hat is meaningless by construction).
//     Why: a lower-triangular, positive-diagonal W puts hard walls (w_diag -> 0) between the
//     sign/rotation modes, and chains stick on either side (R-hat 1.3-1.75 below); with the
//     invariant prior the modes are one connected orbit that NUTS crosses freely.
//   * x non-centred (default, data centred = 0): x = mu + W z + sqrt(d) .* e, z ~ N(0, I_k),
//     e ~ N(0, I_G).  It mixed better than centred x at both low (mean count ~1) and moderate
//     (mean count ~12) counts and had the best R-hat everywhere; with high counts (sim A) it
//     needs ~3x smaller steps, so centred x (centred = 1, Woodbury density) is kept as an option
//     for very informative data and for the exact density check against pln_ref.model.
//   * d ~ LogNormal(log 0.2, 1): zero density at d = 0 keeps chains off the Heywood boundary.
//
// MIXING EXPERIMENTS: 4 chains x 1000 warmup / 1000 draws, stanli 0.24 NUTS diag_e,
// adapt_delta 0.8, N = 100 cells, G = 10, capture on (sigma_M = 0.5), 2 shared cores
// (load 3-12, so wall times are inflated and only comparable within a row's load).
// "sim A": /tmp sim, mu ~ N(log 30, 0.7), W ~ N(0, 0.6), d ~ U(0.1, 0.3), mean count ~ 30*capture;
// "lo": pln_ref.simulate.random_params(10, k, capture=True) (mean count ~1.0);
// "mid": same with mean_log_rate = 3.5 (mean count ~12).  R-hat max / bulk-ESS min over entries.
//  variant                          data     k  div  R-hat(Sigma) ESS(Sigma) R-hat(d) R-hat(x) ESS(x) wall
//  [lead's earlier run] NC x, lower-tri W      2  5.2%  (z: 1.75)
//  [lead's earlier run] C x MVN-chol, lower-tri 2  2    1.57 (W 1.74)
//  C x Woodbury, invariant W        sim A    1   0    1.015  237      1.023    1.009    569   135 s
//  C x Woodbury, invariant W        sim A    2   0    1.016  329      1.019    1.007    588   145 s
//  C x Woodbury, lower-tri W        sim A    2   3    1.013  441      1.019    1.015    790   225 s
//  C x Woodbury, invariant W        lo s0    2   0    1.035  153      1.057    1.013    411   240 s
//  NC x, invariant W                lo s0    2   0    1.008  1029     1.006    1.005   1880    89 s
//  C x Woodbury, invariant W        mid s0   2   0    1.033  146      1.028    1.046     97   249 s
//  NC x, invariant W                mid s0   2   0    1.011  512      1.020    1.007    890   173 s
//  NC x, invariant W   (FINAL)      lo s1    2   0    1.003  1679     1.003    1.006   3149    99 s
//  NC x, lower-tri W                lo s1    2   0    1.325    11     1.026    1.087     30    35 s
//  NC x, invariant W   (FINAL)      lo s1    1   0    1.003  1678     1.003    1.006   2996    45 s
//  NC x, invariant W   (FINAL)      sim A    2   0    1.006   800     1.007    1.005   1141   526 s
//  (last row: step size 0.012 vs 0.035 centred, load ~12 vs ~3: NC mixes best on every data set
//   tried, but with very informative counts centred = 1 may give more ESS per second.)
//
// Density: every statement is `target += *_lpdf/_lpmf` (full constants).  With centred = 1
//   log_density(theta_unc) = log p(mu) + log p(W) + log p(d)
//                          + sum_c pln_ref.model.log_joint(u_c, x_c, eta_c; mu, W, d)
//                          + Jacobians (sum log d + sum log eta),
// unconstrained order: mu (G), W (G x k, column-major), log d (G), x_c (cell-major), log eta (N).
// With centred = 0 the order is mu, W, log d, z (N x k, column-major), e (N x G, column-major),
// log eta; the density is log p(globals) + log N(z) + log N(e) + Poisson + TruncN (+ Jacobians),
// the same posterior of (mu, W, d, x, eta) but not the same function of the unconstrained vector.
functions {
  // Rows of B (k x k) orthonormalised by Gram-Schmidt: B = L Qr with L lower-triangular,
  // L_aa = |residual of row a| > 0, Qr orthogonal.  Returns Qr^T so that B * Qr^T = L.
  matrix lq_rotation(matrix B) {
    int k = rows(B);
    matrix[k, k] Qr;
    for (a in 1:k) {
      row_vector[k] v = B[a];
      for (b in 1:(a - 1)) v -= dot_product(v, Qr[b]) * Qr[b];
      Qr[a] = v / sqrt(dot_self(v));
    }
    return Qr';
  }
}
data {
  int<lower=1> N;                       // cells
  int<lower=1> G;                       // genes
  int<lower=1, upper=G - 1> k;          // rank of W
  array[N, G] int<lower=0> u;           // counts
  int<lower=0, upper=1> capture;        // 1: eta^(c) is a parameter with the TruncN prior; 0: eta = 0
  int<lower=0, upper=1> centred;        // 1: x is a parameter (centred); 0: x = mu + W z + sqrt(d) .* e
  real log_M0;                          // log M0 (ignored when capture == 0)
  real<lower=0> sigma_M;                // capture prior SD (ignored when capture == 0)
  vector[N] log_L;                      // log anchor library size (ignored when capture == 0)
  // Priors (weakly informative, documented in pln_ref.validation.standata.pln_joint_data):
  vector[G] mu_loc;                     // mu_g ~ N(mu_loc_g, mu_scale)
  real<lower=0> mu_scale;
  real<lower=0> w_scale;                // W_ga ~ N(0, w_scale)   (rotation-invariant prior)
  real d_loc;                           // d_g ~ LogNormal(d_loc, d_scale): density -> 0 at d -> 0
  real<lower=0> d_scale;                //   (keeps away from the Heywood boundary d = 0)
}
transformed data {
  int Ne = capture ? N : 0;
  int Nc = centred ? N : 0;             // cells with a centred x parameter
  int Nn = centred ? 0 : N;             // cells with non-centred (z, e)
  vector[N] m = log_M0 - log_L;         // m_c = log M0 - log L_c
  real log_2pi = log(2 * pi());
}
parameters {
  vector[G] mu;                         // prior mean of x
  matrix[G, k] W;                       // loadings (unidentified up to W -> W Q, Q orthogonal)
  vector<lower=0>[G] d;                 // residual variances
  array[Nc] vector[G] x_c;              // centred: the latent log-rates themselves
  matrix[Nn, k] z;                      // non-centred: factor scores z^(c) ~ N(0, I_k)
  matrix[Nn, G] e;                      // non-centred: residuals e^(c) ~ N(0, I_G)
  vector<lower=0>[Ne] eta;              // capture loss
}
transformed parameters {
  // x^(c) = x_c^(c) (centred) or mu + W z^(c) + sqrt(d) .* e^(c)  =>  x^(c) ~ N(mu, W W^T + diag(d))
  array[N] vector[G] x;
  if (centred) {
    x = x_c;
  } else {
    vector[G] sd_res = sqrt(d);
    for (c in 1:N) x[c] = mu + W * z[c]' + sd_res .* e[c]';
  }
}
model {
  // priors on the globals
  target += normal_lpdf(mu | mu_loc, mu_scale);           // mu_g ~ N(mu_loc_g, mu_scale^2)
  target += normal_lpdf(to_vector(W) | 0, w_scale);       // W_ga ~ N(0, w_scale^2)
  target += lognormal_lpdf(d | d_loc, d_scale);           // d_g ~ LogNormal(d_loc, d_scale^2)

  if (centred) {
    // Woodbury pieces (O(G k^2)), never a G x G matrix:
    vector[G] Dinv = inv(d);                              // D = diag(1/d)
    matrix[G, k] DW = diag_pre_multiply(Dinv, W);         // V = D W
    matrix[k, k] L_K = cholesky_decompose(add_diag(W' * DW, 1.0));  // K = I + W^T D W = L_K L_K^T
    // -G/2 log 2pi - 1/2 log det Sigma,  log det Sigma = sum log d + log det K
    real log_norm_x = -0.5 * G * log_2pi - 0.5 * (sum(log(d)) + 2 * sum(log(diagonal(L_K))));
    for (c in 1:N) {
      vector[G] r = x[c] - mu;                            // r = x - mu
      vector[k] zz = mdivide_left_tri_low(L_K, DW' * r);  // zz^T zz = (W^T D r)^T K^{-1} (W^T D r)
      // log N(x | mu, Sigma) = log_norm_x - 1/2 [r^T D r - (W^T D r)^T K^{-1} (W^T D r)]
      target += log_norm_x - 0.5 * (dot_product(r, Dinv .* r) - dot_self(zz));
    }
  } else {
    // log N(z | 0, I) + log N(e | 0, I): x = mu + W z + sqrt(d) e has the law N(mu, Sigma)
    target += std_normal_lpdf(to_vector(z)) + std_normal_lpdf(to_vector(e));
  }
  for (c in 1:N) {
    // Poisson: sum_g [u_g (x_g - eta) - exp(x_g - eta) - lgamma(u_g + 1)]
    if (capture) {
      target += poisson_log_lpmf(u[c] | x[c] - eta[c]);
    } else {
      target += poisson_log_lpmf(u[c] | x[c]);
    }
  }
  if (capture) {
    // log TruncN(eta | m, sigma_M, low=0) = normal_lpdf(eta | m, sigma_M) - log Phi(m / sigma_M);
    // log Phi by std_normal_lcdf: real Stan's normal_lccdf(0 | m, sigma_M) is -inf once -m/sigma_M > 8.25
    target += normal_lpdf(eta | m, sigma_M) - std_normal_lcdf(m / sigma_M);
  }
}
generated quantities {
  // Identified quantities: Sigma = W W^T + diag(d) and its correlation matrix are invariant
  // under W -> W Q.  W_id = W Q is the rotation that makes the top k x k block lower-triangular
  // with positive diagonal (LQ decomposition of B = W[1:k] by Gram-Schmidt on its rows).
  matrix[G, G] Sigma = add_diag(tcrossprod(W), d);        // small G only (G x G here is fine)
  matrix[G, G] Omega;                                     // correlation of x
  matrix[G, k] W_id;
  array[N, G] int u_rep;                                  // posterior predictive counts
  real log_lik = 0;                                       // sum_c,g log Poisson(u | exp(x - eta)): SBC test quantity
  {
    vector[G] s = inv_sqrt(diagonal(Sigma));
    Omega = quad_form_diag(Sigma, s);                     // Omega_gh = Sigma_gh / sqrt(Sigma_gg Sigma_hh)
    W_id = W * lq_rotation(W[1:k, :]);                    // W Q with (W Q)[1:k] lower-tri, diag > 0
    for (c in 1:N) {
      vector[G] lr = x[c];                                // log rate x - eta
      if (capture) lr = x[c] - eta[c];
      u_rep[c] = poisson_log_rng(lr);
      log_lik += poisson_log_lpmf(u[c] | lr);
    }
  }
}
