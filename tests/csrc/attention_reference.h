// The attention of one problem (branch.h) in double precision, written apart from the kernels and params.h: the
// reference of tests/csrc/attention_host_checks.cpp and tests/csrc/attention_cuda_sim.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/cuda/branch.h"

namespace pychop {
namespace double_precision {

// The semantics, written apart from params.h: t - window < t' <= t (causal), t' > t - grad_window (live).
inline bool allowed(const Branch& br, int i, int j) {
  return j >= 0 && j < br.rows && (!br.causal || j <= i) && (br.window <= 0 || j > i - br.window);
}
inline bool live(const Branch& br, int i, int j) {
  return allowed(br, i, j) && (br.grad_window <= 0 || j > i - br.grad_window);
}

struct Problem {
  int L, D;
  double scale;
  std::vector<double> q, k, v, dout;  // L x D
  double at(const std::vector<double>& x, int row, int c) const { return row < L && c < D ? x[row * D + c] : 0.; }
  template <typename Sum = double>
  Sum dot(const std::vector<double>& x, int i, const std::vector<double>& y, int j) const {
    Sum sum = 0;
    for (int c = 0; c < D; ++c) sum += Sum(at(x, i, c)) * Sum(at(y, j, c));
    return sum;
  }
};

struct Result {
  std::vector<double> o, lse, dq, dk, dv;
};

// Sums, exp and log in Sum; every intermediate rounded by `round` where a plain implementation stores one (the
// scores, P, O, dP, dS and the three gradients). With Sum = double and the identity, the exact attention; with
// float sums and rounding to a dtype, a plain (unfused) path in that dtype, whose error tolerances are tied to.
template <typename Sum, typename Round>
Result reference(const Branch& br, const Problem& pr, Round round) {
  const int L = pr.L, D = pr.D;
  const Sum scale = Sum(pr.scale);
  Result res{std::vector<double>(L * D), std::vector<double>(L), std::vector<double>(L * D),
             std::vector<double>(L * D), std::vector<double>(L * D)};
  std::vector<double> S(L * L), P(L * L), dP(L * L), dS(L * L);
  for (int i = 0; i < L; ++i) {
    Sum mx = -INFINITY, sum = 0, delta = 0;
    for (int j = 0; j < L; ++j) {
      S[i * L + j] = round(scale * pr.dot<Sum>(pr.q, i, pr.k, j));
      if (allowed(br, i, j)) mx = std::max(mx, Sum(S[i * L + j]));
    }
    for (int j = 0; j < L; ++j) sum += allowed(br, i, j) ? std::exp(Sum(S[i * L + j]) - mx) : 0;
    res.lse[i] = mx + std::log(sum);
    for (int j = 0; j < L; ++j) {
      P[i * L + j] = allowed(br, i, j) ? round(std::exp(Sum(S[i * L + j]) - Sum(res.lse[i]))) : 0;
      dP[i * L + j] = round(pr.dot<Sum>(pr.dout, i, pr.v, j));
      delta += Sum(P[i * L + j]) * Sum(dP[i * L + j]);
    }
    for (int c = 0; c < D; ++c) {
      Sum o = 0;
      for (int j = 0; j < L; ++j) o += Sum(P[i * L + j]) * Sum(pr.at(pr.v, j, c));
      res.o[i * D + c] = round(o);
    }
    for (int j = 0; j < L; ++j) dS[i * L + j] = round(Sum(P[i * L + j]) * (Sum(dP[i * L + j]) - delta));
  }
  for (int j = 0; j < L; ++j)
    for (int c = 0; c < D; ++c) {
      Sum dq = 0, dk = 0, dv = 0;  // row j of each gradient
      for (int i = 0; i < L; ++i) {
        dq += Sum(dS[j * L + i]) * Sum(pr.at(pr.k, i, c));
        if (!live(br, i, j)) continue;
        dk += Sum(dS[i * L + j]) * Sum(pr.at(pr.q, i, c));
        dv += Sum(P[i * L + j]) * Sum(pr.at(pr.dout, i, c));
      }
      res.dq[j * D + c] = round(scale * dq);
      res.dk[j * D + c] = round(scale * dk);
      res.dv[j * D + c] = round(dv);
    }
  return res;
}

inline Result reference(const Branch& br, const Problem& pr) {
  return reference<double>(br, pr, [](double x) { return x; });
}

}  // namespace double_precision
}  // namespace pychop
