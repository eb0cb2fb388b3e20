// pln_cell.stan -- conditional posterior of N independent cells' latents (x^(c), eta^(c))
// given FIXED globals theta = (mu, W, d) and the capture prior (M0, sigma_M).
//
// Seed notation (pln-model.md):
//   x^(c)   ~ N(mu, Sigma),   Sigma = W W^T + diag(d)
//   eta^(c) ~ TruncN(log M0 - log L_c, sigma_M^2, low = 0)
//   u_g^(c) | x, eta ~ Poisson(exp(x_g^(c) - eta^(c)))
//
// The density is the FULL normalised log joint (every statement is `target += *_lpmf/_lpdf`,
// never `~`, so no constant is dropped).  With the lower=0 bound on eta Stan adds the
// Jacobian log(eta), hence on the unconstrained scale theta_unc = (x[1], ..., x[N], log eta):
//   log_density(theta_unc) = sum_c pln_ref.model.log_joint(u_c, x_c, eta_c) + sum_c log eta_c
//   d/d log(eta_c) = g_eta_c * eta_c + 1.
// The Gaussian term uses the Woodbury form: O(G k) per cell, no G x G matrix anywhere.
data {
  int<lower=1> N;                     // number of cells
  int<lower=1> G;                     // number of genes
  int<lower=1> k;                     // rank of W (k < G)
  array[N, G] int<lower=0> u;         // counts u_g^(c)
  vector[G] mu;                       // prior mean of x
  matrix[G, k] W;                     // loadings, Sigma = W W^T + diag(d)
  vector<lower=0>[G] d;               // residual variances
  real log_M0;                        // log M0, prior median total mRNA
  real<lower=0> sigma_M;              // prior SD of log capture loss
  vector[N] log_L;                    // log L_c, log anchor library size per cell
}
transformed data {
  vector[G] Dinv = inv(d);                                  // D = diag(1/d)
  matrix[G, k] DW = diag_pre_multiply(Dinv, W);             // V = D W   (G x k)
  matrix[k, k] K = add_diag(W' * DW, 1.0);                  // K = I_k + W^T D W
  matrix[k, k] L_K = cholesky_decompose(K);                 // K = L_K L_K^T
  // log det Sigma = sum_g log d_g + log det K  (matrix determinant lemma)
  real logdet_Sigma = sum(log(d)) + 2 * sum(log(diagonal(L_K)));
  real log_norm_x = -0.5 * G * log(2 * pi()) - 0.5 * logdet_Sigma;  // -G/2 log 2pi - 1/2 log det Sigma
  vector[N] m = log_M0 - log_L;                             // m_c = log M0 - log L_c
}
parameters {
  array[N] vector[G] x;               // latent log-rates x^(c)
  vector<lower=0>[N] eta;             // capture loss eta^(c) > 0
}
model {
  for (c in 1:N) {
    // Poisson emission: sum_g [u_g (x_g - eta) - exp(x_g - eta) - lgamma(u_g + 1)]
    target += poisson_log_lpmf(u[c] | x[c] - eta[c]);
    // r = x - mu
    vector[G] r = x[c] - mu;
    // z = L_K^{-1} W^T D r, so z^T z = (W^T D r)^T K^{-1} (W^T D r)
    vector[k] z = mdivide_left_tri_low(L_K, DW' * r);
    // log N(x | mu, Sigma) = -G/2 log 2pi - 1/2 log det Sigma - 1/2 [r^T D r - (W^T D r)^T K^{-1} (W^T D r)]
    target += log_norm_x - 0.5 * (dot_product(r, Dinv .* r) - dot_self(z));
  }
  // log TruncN(eta | m, sigma_M, low = 0) = log N(eta | m, sigma_M) - log P(N(m, sigma_M) > 0)
  target += normal_lpdf(eta | m, sigma_M);
  // log P(N(m, sigma_M) > 0) = log Phi(m / sigma_M) = std_normal_lcdf(m / sigma_M) (summed over
  // cells); not normal_lccdf(0 | m, sigma_M), which Stan Math returns as log 0 = -inf once
  // -m/sigma_M > 8.25, making the log density +inf for L_c > ~62 M0 at sigma_M = 0.5.
  target += -std_normal_lcdf(m / sigma_M);
}
