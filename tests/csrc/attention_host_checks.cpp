// Host checks of the CUDA kernels' plain-C++ parts, run by tests/test_extension_build.py (no GPU needed):
//   branch.h          a branch's offsets against the (B, T, S, H, D) strides; the masks and block ranges against
//                     brute force;
//   the kernels' loops emulated in double precision, one problem at a time: the query / key block iteration, the
//                     online softmax (rows with no attended key in a block), delta in the key kernel, from the
//                     saved output or from the query kernel's first pass, the grad window's masking, dq from the
//                     key kernel (written once) or the query kernel, the head-dim splits; against a direct
//                     reference, every output element written;
//   attention_layout.h every layout's regions aligned and disjoint (dq over scores and dprobs only), and a plan
//                     for every head dim, dtype and shared-memory limit of the GPU families.
// Prints a model of the temporal kernels' time at the benchmark shapes E and C (print_model) and "ok"; exits 1 at
// the first failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "attention/cuda/attention_layout.h"
#include "attention/cuda/branch.h"
#include "attention_reference.h"
#include "check.h"

using namespace pychop;
using namespace pychop::double_precision;

namespace {

std::mt19937 rng(1234);
int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// ---------------------------------------------------------------------------------------------- offsets
int64_t offset(const TensorRef& r, int b, int t, int s, int h) {
  return b * r.stride_b + t * r.stride_t + s * r.stride_s + h * r.stride_h;
}

// Strides of a (B, T, S, H, D) view of a tensor whose dims B, T, S, H lie in a random order, rows padded.
TensorRef random_layout(void* data, const int (&size)[4], int D) {
  int order[4] = {0, 1, 2, 3};
  std::shuffle(order, order + 4, rng);
  int64_t stride[4], next = D + uniform(0, 3) * 8;
  for (int k = 3; k >= 0; --k) {
    stride[order[k]] = next;
    next *= size[order[k]];
  }
  return {data, stride[0], stride[1], stride[2], stride[3]};
}

void check_offsets() {
  alignas(16) static char base[64];
  for (int trial = 0; trial < 300; ++trial) {
    AttentionParams p;
    p.batch = uniform(1, 3), p.frames = uniform(1, 6), p.tokens = uniform(1, 6), p.heads = uniform(1, 3);
    p.head_dim = uniform(1, 40);
    const int size[4] = {p.batch, p.frames, p.tokens, p.heads};
    for (TensorRef* r : {&p.q_s, &p.k_s, &p.v_s, &p.q_t, &p.k_t, &p.v_t, &p.out, &p.out_t, &p.dout, &p.dout_t,
                         &p.dq_s, &p.dk_s, &p.dv_s, &p.dq_t, &p.dk_t, &p.dv_t})
      *r = random_layout(base, size, p.head_dim);
    float stats[1];
    p.lse_s = p.lse_t = p.delta = stats;
    for (const Axis axis : {Axis::Spatial, Axis::Temporal}) {
      const bool spatial = axis == Axis::Spatial;
      const Branch br = make_branch(p, axis, 2);
      CHECK(br.rows == (spatial ? p.tokens : p.frames) && br.problems() == int64_t(p.batch) * p.heads *
            (spatial ? p.frames : p.tokens), "sizes");
      for (int64_t index = 0; index < br.problems(); ++index) {
        int b, x, h;
        br.problem(index, b, x, h);
        CHECK((int64_t(b) * br.outer + x) * br.heads + h == index && b < p.batch && h < p.heads, "problem %lld",
              (long long)index);
        for (int r = 0; r < br.rows; ++r) {
          const int t = spatial ? x : r, s = spatial ? r : x;
          const struct { const AxisTensor& a; const TensorRef& ref; } pairs[] = {
              {br.q, spatial ? p.q_s : p.q_t}, {br.k, spatial ? p.k_s : p.k_t}, {br.v, spatial ? p.v_s : p.v_t},
              {br.out, spatial ? p.out : p.out_t}, {br.dout, spatial ? p.dout : p.dout_t},
              {br.dq, spatial ? p.dq_s : p.dq_t}, {br.dk, spatial ? p.dk_s : p.dk_t},
              {br.dv, spatial ? p.dv_s : p.dv_t}};
          for (const auto& pair : pairs)
            CHECK(pair.a.row_offset(b, x, h, r) == offset(pair.ref, b, t, s, h), "row (%d %d %d %d)", b, t, s, h);
          const int64_t stat = ((int64_t(b) * p.frames + t) * p.heads + h) * p.tokens + s;
          CHECK(br.lse.row_offset(b, x, h, r) == stat && br.delta.row_offset(b, x, h, r) == stat, "stat row");
        }
      }
    }
  }
  // 16-byte rows: the pointer and every stride; bf16 D = 8 rows are 16 bytes, D = 10 rows 20.
  alignas(16) static char buffer[64];
  CHECK(along({buffer, 64, 32, 8, 16}, Axis::Temporal, 2).aligned, "aligned");
  CHECK(!along({buffer + 2, 64, 32, 8, 16}, Axis::Temporal, 2).aligned, "pointer off 16 bytes");
  CHECK(!along({buffer, 80, 40, 10, 20}, Axis::Spatial, 2).aligned, "rows of 20 bytes");
  CHECK(!along({buffer, 80, 40, 10, 20}, Axis::Spatial, 4).aligned, "float32 rows of 40 bytes");
}

// ---------------------------------------------------------------------------------------------- masks, ranges
struct Masks {
  bool causal;
  int window, grad_window;
};

const Masks MASKS[] = {{false, 0, 0}, {true, 0, 0}, {true, 1, 0}, {true, 2, 1}, {true, 3, 2}, {true, 0, 1},
                       {true, 0, 2}, {false, 0, 2}, {true, 17, 5}, {true, 40, 20}, {true, 0, 64}};
const int ROWS[] = {1, 5, 16, 17, 33, 64, 65, 70, 130};
const int BLOCKS[] = {16, 32, 64};

Branch branch(int rows, const Masks& m) {
  Branch br;
  br.batch = br.outer = br.heads = 1;
  br.rows = rows;
  br.causal = m.causal;
  br.window = m.window;
  br.grad_window = m.grad_window;
  return br;
}

void check_ranges() {
  for (const Masks& m : MASKS)
    for (int rows : ROWS) {
      const Branch br = branch(rows, m);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < rows; ++j)
          CHECK(br.attends(i, j) == allowed(br, i, j) && br.live(i, j) == live(br, i, j), "mask (%d, %d)", i, j);
      for (int BLOCK : BLOCKS)
        for (int x0 = 0; x0 < rows; x0 += BLOCK) {
          const int x1 = std::min(x0 + BLOCK, rows) - 1;
          int kf, kl, qf, ql;
          br.key_range(x0, x1, kf, kl);   // x0..x1 as a query block
          br.query_range(x0, x1, qf, ql);  // as a key block
          for (int i = x0; i <= x1; ++i)
            for (int j = 0; j < rows; ++j)
              if (allowed(br, i, j)) CHECK(kf <= j && j <= kl, "key %d of query %d outside [%d, %d]", j, i, kf, kl);
          for (int j = x0; j <= x1; ++j)
            for (int i = 0; i < rows; ++i) {
              if (allowed(br, i, j)) CHECK(qf <= i && i <= ql, "query %d of key %d outside [%d, %d]", i, j, qf, ql);
              if (allowed(br, i, j) && !live(br, i, j))
                CHECK(br.detaches_any(std::min(i / BLOCK * BLOCK + BLOCK, rows) - 1, x0), "detached pair missed");
            }
          CHECK(0 <= kf && kl < rows && 0 <= qf && ql < rows, "ranges in bounds");
        }
    }
}

// ---------------------------------------------------------------------------------------------- emulation
// attention_fwd_kernel's loops for every query block of the problem.
void emulate_forward(const Branch& br, const Problem& pr, int BLOCK, Result& res) {
  const int L = pr.L, D = pr.D;
  res.o.assign(L * D, NAN);
  res.lse.assign(L, NAN);
  for (int row0 = 0; row0 < L; row0 += BLOCK) {
    std::vector<double> acc(BLOCK * D, 0.), row_max(BLOCK, -INFINITY), row_sum(BLOCK, 0.);
    int first_key, last_key;
    br.key_range(row0, std::min(row0 + BLOCK, L) - 1, first_key, last_key);
    const int first_col0 = first_key / BLOCK * BLOCK;
    for (int col0 = first_col0; col0 <= last_key; col0 += BLOCK)
      for (int r = 0; r < BLOCK; ++r) {
        int first, last;
        attended_range(br.causal, br.window, L, row0 + r, first, last);
        const auto attended = [&](int j) { return first <= col0 + j && col0 + j <= last && col0 + j < L; };
        const auto score = [&](int j) { return pr.dot(pr.q, row0 + r, pr.k, col0 + j); };
        double block_max = -INFINITY, block_sum = 0;
        for (int j = 0; j < BLOCK; ++j)
          if (attended(j)) block_max = std::max(block_max, score(j) * pr.scale);
        const double old_max = row_max[r], new_max = std::max(old_max, block_max);
        const double base = new_max == -INFINITY ? 0. : new_max;
        const double rescale = std::exp(old_max - base);
        if (col0 != first_col0)  // the first block sets acc (the kernel's PV without accumulate)
          for (int c = 0; c < D; ++c) acc[r * D + c] *= rescale;
        else
          for (int c = 0; c < D; ++c) acc[r * D + c] = NAN;  // what the kernel leaves there: nothing
        const bool first_block = col0 == first_col0;
        for (int j = 0; j < BLOCK; ++j) {
          const double prob = attended(j) ? std::exp(score(j) * pr.scale - base) : 0.;
          block_sum += prob;
          for (int c = 0; c < D; ++c)
            acc[r * D + c] = (first_block && j == 0 ? 0. : acc[r * D + c]) + prob * pr.at(pr.v, col0 + j, c);
        }
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * rescale + block_sum;
      }
    for (int r = 0; r < BLOCK && row0 + r < L; ++r) {
      for (int c = 0; c < D; ++c) res.o[(row0 + r) * D + c] = acc[r * D + c] / row_sum[r];
      res.lse[row0 + r] = row_max[r] + std::log(row_sum[r]);
    }
  }
}

// attention_bwd_query_kernel's loops for every query block (a problem spanning several key blocks): delta from
// the saved output, or from a first loop over the key blocks; then dq.
void emulate_query_kernel(const Branch& br, const Problem& pr, int BLOCK, bool output_saved, const Result& fwd,
                          Result& res, std::vector<double>& delta_out) {
  const int L = pr.L, D = pr.D;
  delta_out.assign(L, NAN);
  for (int row0 = 0; row0 < L; row0 += BLOCK) {
    std::vector<double> delta(BLOCK, 0.), dq(BLOCK * D, 0.);
    for (int r = 0; r < BLOCK && row0 + r < L && output_saved; ++r)  // delta_from_output_kernel
      for (int c = 0; c < D; ++c) delta[r] += pr.at(pr.dout, row0 + r, c) * fwd.o[(row0 + r) * D + c];
    int first_key, last_key;
    br.key_range(row0, std::min(row0 + BLOCK, L) - 1, first_key, last_key);
    for (int pass = output_saved ? 1 : 0; pass < 2; ++pass) {
      for (int col0 = first_key / BLOCK * BLOCK; col0 <= last_key; col0 += BLOCK)
        for (int r = 0; r < BLOCK; ++r) {
          const int i = row0 + r;
          int first, last;
          attended_range(br.causal, br.window, L, i, first, last);
          const double lse = i < L ? fwd.lse[i] : 0.;
          for (int c = 0; c < BLOCK; ++c) {
            const int j = col0 + c;
            const double p =
                i < L && first <= j && j <= last && j < L ? std::exp(pr.dot(pr.q, i, pr.k, j) * pr.scale - lse) : 0.;
            const double dp = pr.dot(pr.dout, i, pr.v, j);
            if (pass == 0) delta[r] += p * dp;
            else
              for (int n = 0; n < D; ++n) dq[r * D + n] += p * (dp - delta[r]) * pr.at(pr.k, j, n);
          }
        }
      if (pass == 0)
        for (int r = 0; r < BLOCK && row0 + r < L; ++r) delta_out[row0 + r] = delta[r];
    }
    for (int r = 0; r < BLOCK && row0 + r < L; ++r)
      for (int c = 0; c < D; ++c) res.dq[(row0 + r) * D + c] = dq[r * D + c] * pr.scale;
    if (output_saved)
      for (int r = 0; r < BLOCK && row0 + r < L; ++r) delta_out[row0 + r] = delta[r];
  }
}

// The branch's backward: attention_bwd_kernel's loops for every (key block, split), after the query kernel's
// where the problem spans several key blocks; lse and o from the forward.
void emulate_backward(const Branch& br, const Problem& pr, int BLOCK, int splits, bool output_saved,
                      const Result& fwd, Result& res) {
  const int L = pr.L, D = pr.D, Dp = cuda::padded_head_dim(D), Dc = cuda::slice_cols(Dp, splits);
  const bool one_key_block = L <= BLOCK;
  res.dq.assign(L * D, NAN);
  res.dk.assign(L * D, NAN);
  res.dv.assign(L * D, NAN);
  std::vector<double> delta_saved;
  if (!one_key_block) emulate_query_kernel(br, pr, BLOCK, output_saved, fwd, res, delta_saved);
  std::vector<int> dq_writes(L * D, 0);
  for (int col0 = 0; col0 < L; col0 += BLOCK)
    for (int split = 0; split < splits; ++split) {
      const int c0 = split * Dc, cols = std::min(Dc, Dp - c0), c1 = std::min(c0 + cols, D);
      CHECK(cols > 0 && cols % 16 == 0, "split %d of %d at Dp %d: %d columns", split, splits, Dp, cols);
      std::vector<double> dk(BLOCK * cols, 0.), dv(BLOCK * cols, 0.);
      int first_query, last_query;
      br.query_range(col0, std::min(col0 + BLOCK, L) - 1, first_query, last_query);
      for (int row0 = first_query / BLOCK * BLOCK; row0 <= last_query; row0 += BLOCK) {
        std::vector<double> probs(BLOCK * BLOCK), dscores(BLOCK * BLOCK), dq(BLOCK * cols, 0.);
        std::vector<int> first_live(BLOCK);
        for (int r = 0; r < BLOCK; ++r) {
          const int i = row0 + r;
          int first, last;
          attended_range(br.causal, br.window, L, i, first, last);
          first_live[r] = first_live_row(br.grad_window, i, first);
          const double lse = i < L ? fwd.lse[i] : 0.;
          std::vector<double> p(BLOCK), dp(BLOCK);
          double p_dp = 0;
          for (int c = 0; c < BLOCK; ++c) {
            const int j = col0 + c;
            p[c] = i < L && first <= j && j <= last && j < L ? std::exp(pr.dot(pr.q, i, pr.k, j) * pr.scale - lse) : 0.;
            dp[c] = pr.dot(pr.dout, i, pr.v, j);
            p_dp += p[c] * dp[c];
          }
          const double delta = one_key_block ? p_dp : (i < L ? delta_saved[i] : 0.);
          for (int c = 0; c < BLOCK; ++c) {
            probs[r * BLOCK + c] = col0 + c >= first_live[r] ? p[c] : 0.;
            dscores[r * BLOCK + c] = p[c] * (dp[c] - delta);
          }
        }
        for (int c = 0; c < BLOCK; ++c)
          for (int n = 0; n < cols; ++n)
            for (int r = 0; r < BLOCK; ++r) dv[c * cols + n] += probs[r * BLOCK + c] * pr.at(pr.dout, row0 + r, c0 + n);
        for (int r = 0; r < BLOCK && one_key_block; ++r)
          for (int n = 0; n < cols; ++n)
            for (int c = 0; c < BLOCK; ++c) dq[r * cols + n] += dscores[r * BLOCK + c] * pr.at(pr.k, col0 + c, c0 + n);
        if (br.detaches_any(std::min(row0 + BLOCK, L) - 1, col0))
          for (int r = 0; r < BLOCK; ++r)
            for (int c = 0; c < BLOCK; ++c)
              if (col0 + c < first_live[r]) dscores[r * BLOCK + c] = 0.;
        for (int c = 0; c < BLOCK; ++c)
          for (int n = 0; n < cols; ++n)
            for (int r = 0; r < BLOCK; ++r) dk[c * cols + n] += dscores[r * BLOCK + c] * pr.at(pr.q, row0 + r, c0 + n);
        for (int r = 0; r < BLOCK && row0 + r < L && one_key_block; ++r)
          for (int c = c0; c < c1; ++c) {
            res.dq[(row0 + r) * D + c] = dq[r * cols + c - c0] * pr.scale;
            ++dq_writes[(row0 + r) * D + c];
          }
      }
      for (int r = 0; r < BLOCK && col0 + r < L; ++r)
        for (int c = c0; c < c1; ++c) {
          res.dk[(col0 + r) * D + c] = dk[r * cols + c - c0] * pr.scale;
          res.dv[(col0 + r) * D + c] = dv[r * cols + c - c0];
        }
    }
  if (one_key_block)
    for (int w : dq_writes) CHECK(w == 1, "dq written %d times by the one-key-block path", w);
}

double max_error(const std::vector<double>& x, const std::vector<double>& ref) {
  double err = 0, scale = 1e-30;
  for (size_t n = 0; n < x.size(); ++n) {
    err = std::max(err, std::isnan(x[n]) ? INFINITY : std::abs(x[n] - ref[n]));
    scale = std::max(scale, std::abs(ref[n]));
  }
  return err / std::max(scale, 1.);
}

void check_emulation() {
  int cases = 0;
  std::normal_distribution<double> normal;
  for (const Masks& m : MASKS)
    for (int rows : ROWS)
      for (int D : {10, 40}) {
        Problem pr{rows, D, 1 / std::sqrt(double(D)), {}, {}, {}, {}};
        for (auto* x : {&pr.q, &pr.k, &pr.v, &pr.dout}) {
          x->resize(rows * D);
          for (double& e : *x) e = normal(rng);
        }
        const Branch br = branch(rows, m);
        const Result ref = reference(br, pr);
        for (int BLOCK : BLOCKS) {
          Result fwd;
          emulate_forward(br, pr, BLOCK, fwd);
          CHECK(max_error(fwd.o, ref.o) < 1e-12 && max_error(fwd.lse, ref.lse) < 1e-12, "forward rows %d block %d",
                rows, BLOCK);
          const int Dp = cuda::padded_head_dim(D);
          for (int splits = 1; splits <= 4 && (splits - 1) * cuda::slice_cols(Dp, splits) < Dp; splits *= 2) {
            for (bool output_saved : {false, true}) {
              Result bwd;
              emulate_backward(br, pr, BLOCK, splits, output_saved, fwd, bwd);
              const char* names[] = {"dq", "dk", "dv"};
              const std::vector<double>* got[] = {&bwd.dq, &bwd.dk, &bwd.dv};
              const std::vector<double>* want[] = {&ref.dq, &ref.dk, &ref.dv};
              for (int n = 0; n < 3; ++n)
                CHECK(max_error(*got[n], *want[n]) < 1e-11, "%s: rows %d D %d block %d splits %d saved %d causal %d "
                      "window %d grad %d: error %g", names[n], rows, D, BLOCK, splits, output_saved, m.causal,
                      m.window, m.grad_window, max_error(*got[n], *want[n]));
              ++cases;
            }
          }
        }
      }
  std::printf("emulated %d backward cases\n", cases);
}

// ---------------------------------------------------------------------------------------------- layouts
struct Region {
  size_t offset, bytes;
};

void check_disjoint(const Region* regions, int count, size_t total, const char* what) {
  for (int a = 0; a < count; ++a) {
    CHECK(regions[a].offset % 128 == 0 && regions[a].offset + regions[a].bytes <= total, "%s region %d", what, a);
    for (int b = a + 1; b < count; ++b)
      CHECK(regions[a].offset + regions[a].bytes <= regions[b].offset ||
                regions[b].offset + regions[b].bytes <= regions[a].offset, "%s regions %d and %d overlap", what, a, b);
  }
}

void check_layouts() {
  const size_t LIMITS[] = {101376, 166912, 232448};  // sm_86/89/120, sm_80, sm_90/100: opt-in bytes per block
  for (size_t elem : {size_t(2), size_t(4)})
    for (size_t limit : LIMITS)
      for (int D = 1; D <= MAX_HEAD_DIM; ++D)
        for (int rows : {1, 16, 17, 33, 64, 65, 4096}) {
          const int Dp = cuda::padded_head_dim(D);
          const int fb = cuda::forward_block(elem, rows, Dp, limit);
          CHECK(fb > 0, "no forward block: elem %zu D %d limit %zu", elem, D, limit);
          const cuda::ForwardSmem f(elem, fb, Dp);
          const Region fr[] = {{f.q, elem * fb * f.ld_qkv}, {f.k, elem * fb * f.ld_qkv}, {f.v, elem * fb * f.ld_qkv},
                               {f.scores, 4 * fb * size_t(f.ld_scores)}, {f.probs, elem * fb * f.ld_probs},
                               {f.out, 4 * fb * size_t(f.ld_out)}, {f.row_max, 4 * size_t(fb)}, {f.row_sum, 4 * size_t(fb)}};
          check_disjoint(fr, 8, f.bytes, "forward");
          CHECK(f.bytes <= limit && f.ld_qkv * elem % 16 == 0 && f.ld_probs * elem % 16 == 0, "forward fits");

          const int qb = cuda::query_block(elem, rows, Dp, limit);
          CHECK(qb > 0, "no query block: elem %zu D %d limit %zu", elem, D, limit);
          const cuda::QuerySmem qs(elem, qb, Dp);
          const size_t qtile = elem * qb * qs.ld_qkv;
          const Region qr[] = {{qs.q, qtile}, {qs.dout, qtile}, {qs.k, qtile}, {qs.v, qtile},
                               {qs.scores, 4 * size_t(qb) * qs.ld_scores}, {qs.dprobs, 4 * size_t(qb) * qs.ld_scores},
                               {qs.dscores, elem * qb * qs.ld_probs}, {qs.dq, 4 * size_t(qb) * qs.ld_grad},
                               {qs.lse, 4 * size_t(qb)}, {qs.delta, 4 * size_t(qb)}};
          check_disjoint(qr, 10, qs.bytes, "query");
          CHECK(qs.bytes <= limit, "query fits");

          const cuda::BackwardPlan plan = cuda::backward_plan(elem, rows, Dp, limit);
          CHECK(plan.block > 0, "no backward plan: elem %zu D %d limit %zu", elem, D, limit);
          const int B = plan.block, Dc = cuda::slice_cols(Dp, plan.splits);
          const bool one_pass = rows <= B;
          const cuda::BackwardSmem s(elem, B, Dp, Dc, one_pass);
          const size_t tile = elem * B * s.ld_qkv, grad = 4 * size_t(B) * s.ld_grad;
          // Live through the query loop; dk and dv accumulate there unless in one pass.
          std::vector<Region> live = {{s.k, tile}, {s.v, tile}, {s.q, tile}, {s.dout, tile},
                                      {s.probs, elem * B * s.ld_probs}, {s.dscores, elem * B * s.ld_probs},
                                      {s.lse, 4 * size_t(B)}, {s.delta, 4 * size_t(B)}};
          if (!one_pass) live.insert(live.end(), {{s.dk, grad}, {s.dv, grad}});
          // Formed in turn: scores and dprobs; then (one pass) dv and dq; then dk where dv was.
          const std::vector<std::vector<Region>> phases = {
              {{s.scores, 4 * size_t(B) * s.ld_scores}, {s.dprobs, 4 * size_t(B) * s.ld_scores}},
              {{s.dv, grad}, {s.dq, grad}}, {{s.dk, grad}}};
          for (size_t n = 0; n < phases.size() && (n == 0 || one_pass); ++n) {
            std::vector<Region> all = live;
            all.insert(all.end(), phases[n].begin(), phases[n].end());
            check_disjoint(all.data(), int(all.size()), s.bytes, one_pass ? "backward, one pass" : "backward");
          }
          CHECK(!one_pass || s.dk == s.dv, "one pass: dk where dv was");
          CHECK(s.bytes <= limit && (plan.splits - 1) * Dc < Dp, "backward fits");
          if (elem == 4 && D >= 208 && limit == LIMITS[0])  // what did not launch before: it takes splits
            CHECK(B == 16 && plan.splits == (Dp == 256 ? 2 : 1), "float32 D %d on 99 KiB, %d rows: "
                  "block %d, %d splits", D, rows, B, plan.splits);
          if (elem == 2 && limit == LIMITS[2] && D <= 128) CHECK(plan.splits == 1, "16-bit D <= 128 on sm_90 unsplit");
        }
}

// A model of the 16-bit kernels' time on an H200 (132 SMs, 1.98 GHz, 128 bytes of shared memory per SM and
// clock, 233,472 bytes of it per SM, 4.3 TB/s HBM), printed for docs/design.md: bytes through shared memory
// per block (tile copies, WMMA fragment loads of 2 x 16 x 16 elements per m16n16k16 product, float32 tiles
// stored and reread) against the bytes the kernel must move through HBM.
double mma_bytes(double M, double N, double K, double e) { return M * N * K * 2 * e / 16; }

void print_model() {
  const double e = 2, sms = 132, smem_rate = 128 * 1.98e9, hbm = 4.3e12;
  struct Shape { const char* name; double B, T, S, H, D; };
  const Shape shapes[] = {{"E", 4, 64, 256, 8, 64}, {"C", 1, 32, 4096, 8, 64}};
  for (const Shape& sh : shapes) {
    const int T = int(sh.T), Dp = cuda::padded_head_dim(int(sh.D));
    const double rows = sh.B * sh.T * sh.S * sh.H, tensor = rows * sh.D * e, stats = rows * 4;
    const double problems = sh.B * sh.S * sh.H, Bk = cuda::forward_block(2, T, Dp, 232448), D = Dp;
    const cuda::BackwardPlan plan = cuda::backward_plan(2, T, Dp, 232448);
    CHECK(Bk >= sh.T && plan.block >= T && plan.splits == 1, "shape %s temporal is one block", sh.name);
    const double fwd_smem = 3 * Bk * D * e + mma_bytes(Bk, Bk, D, e) + Bk * Bk * 4 + (2 * Bk * Bk * 4 + Bk * Bk * e) +
                            mma_bytes(Bk, D, Bk, e) + 2 * Bk * D * 4;
    const double bwd_smem = 4 * Bk * D * e + 2 * (mma_bytes(Bk, Bk, D, e) + Bk * Bk * 4) +
                            (5 * Bk * Bk * 4 + 2 * Bk * Bk * e) + 3 * (mma_bytes(Bk, D, Bk, e) + 2 * Bk * D * 4);
    const size_t fwd_layout = cuda::ForwardSmem(2, int(Bk), Dp).bytes;
    const size_t bwd_layout = cuda::BackwardSmem(2, plan.block, Dp, Dp, true).bytes;
    std::printf("shape %s temporal, block %d: forward %zu B shared memory, %d blocks/SM, %.0f B through shared "
                "memory per block: %.1f us; HBM floor %.1f MB, %.1f us\n", sh.name, int(Bk), fwd_layout,
                int(233472 / (fwd_layout + 1024)), fwd_smem, problems * fwd_smem / (sms * smem_rate) * 1e6,
                (4 * tensor + stats) / 1e6, (4 * tensor + stats) / hbm * 1e6);
    std::printf("shape %s temporal, block %d: backward %zu B shared memory, %d blocks/SM, %.0f B through shared "
                "memory per block: %.1f us; HBM floor %.1f MB, %.1f us\n", sh.name, int(Bk), bwd_layout,
                int(233472 / (bwd_layout + 1024)), bwd_smem, problems * bwd_smem / (sms * smem_rate) * 1e6,
                (7 * tensor + stats) / 1e6, (7 * tensor + stats) / hbm * 1e6);
  }
  // The spatial forward's step (one 64 x 64 key block for 64 query rows, D = 64; online softmax: rescale the
  // accumulator, load and store it around P V) and the backward's key and query kernel steps, per FLOP.
  const double B = 64, D = 64, flop = 2 * B * B * D;
  const double fwd_step = 2 * B * D * e + mma_bytes(B, B, D, e) + B * B * 4 + (2 * B * B * 4 + B * B * e) +
                          2 * B * D * 4 + mma_bytes(B, D, B, e) + 2 * B * D * 4;
  const double key_step = 2 * B * D * e + 2 * (mma_bytes(B, B, D, e) + B * B * 4) + (5 * B * B * 4 + 2 * B * B * e) +
                          2 * (mma_bytes(B, D, B, e) + 2 * B * D * 4);
  const double query_step = 2 * B * D * e + 2 * (mma_bytes(B, B, D, e) + B * B * 4) + (2 * B * B * 4 + B * B * e) +
                            mma_bytes(B, D, B, e) + 2 * B * D * 4;
  std::printf("spatial, 64 x 64 blocks, D 64: forward %.0f B per %.0f FLOP step: at most %.0f TFLOP/s; backward "
              "key kernel %.0f B per %.0f FLOP, query kernel %.0f B per %.0f FLOP: at most %.0f TFLOP/s\n",
              fwd_step, 2 * flop, 2 * flop / fwd_step * sms * smem_rate / 1e12, key_step, 4 * flop, query_step,
              3 * flop, 7 * flop / (key_step + query_step) * sms * smem_rate / 1e12);
}

}  // namespace

int main() {
  check_offsets();
  check_ranges();
  check_emulation();
  check_layouts();
  print_model();
  std::printf("ok\n");
}
