// The two per-element passes of the fast path (learned_opt/fast.py) for one whole tensor, each
// fused into one sweep:
// * stats_pass (tensor_statistics): clip, accumulator update, per-block statistics;
// * mlp_pass (mlp_update): element columns -> MLP -> direction and magnitude -> parameter
//   update, plus the column sum of the last hidden layer (for the per-tensor messages).
//
// Nothing of size n is allocated: in mlp_pass each pair of elements is carried from its inputs to its
// update in registers and a few small stack arrays. Vectors are GCC/Clang vector extensions,
// so the compiler maps them to the machine's own SIMD (AVX2, AVX-512, NEON). Elements are
// taken two at a time so that every weight vector loaded serves two rows.
//
// Reference: learned_opt/reference.py; tested equal to it in tests/test_native.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));

constexpr int kMaxHidden = 64;  // H, a multiple of 8, at most this
constexpr int64_t kBlock = 2048;  // rows per parallel block (and per partial column sum)

inline v8 load8(const float* p) {
  v8 x;
  __builtin_memcpy(&x, p, sizeof(x));
  return x;
}
inline void store8(float* p, v8 x) { __builtin_memcpy(p, &x, sizeof(x)); }
inline v8 splat(float a) { return v8{a, a, a, a, a, a, a, a}; }
// clamp to [-a, a] that lets NaN through, as torch.clamp does (std::fmin/fmax would drop it)
inline float clip(float x, float a) { return x > a ? a : (x < -a ? -a : x); }
inline float hsum(v8 x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}
inline v8 relu(v8 x) {  // NaN passes, as in torch.relu
  v8 z = splat(0.f);
  return x < z ? z : x;
}

// out[r][:] = relu(bias + sum_k in[r][k] * W[k][:]) for the two rows r; W is (K, H) row-major
template <int HV>
inline void layer(const float* in0, const float* in1, int K, const float* W, const float* bias,
                  float* out0, float* out1) {
  v8 a0[HV], a1[HV];
  for (int j = 0; j < HV; ++j) a0[j] = a1[j] = load8(bias + 8 * j);
  for (int k = 0; k < K; ++k) {
    const float* w = W + (int64_t)k * HV * 8;
    v8 x0 = splat(in0[k]), x1 = splat(in1[k]);
    for (int j = 0; j < HV; ++j) {
      v8 wj = load8(w + 8 * j);
      a0[j] += x0 * wj;
      a1[j] += x1 * wj;
    }
  }
  for (int j = 0; j < HV; ++j) {
    store8(out0 + 8 * j, relu(a0[j]));
    store8(out1 + 8 * j, relu(a1[j]));
  }
}

// the first layer for two rows straight from their column groups: three scalars (g, p, log|p|)
// and four groups of D (m, v, m * rs, rs), W0 being (3 + 4D, H) row-major
template <int HV>
inline void first_layer(const float* s0, const float* s1, const float* const* grp0, const float* const* grp1,
                        int D, const float* W, const float* bias, float* out0, float* out1) {
  v8 a0[HV], a1[HV];
  for (int j = 0; j < HV; ++j) a0[j] = a1[j] = load8(bias + 8 * j);
  auto acc = [&](float x0, float x1, const float* w) {
    v8 y0 = splat(x0), y1 = splat(x1);
    for (int j = 0; j < HV; ++j) {
      v8 wj = load8(w + 8 * j);
      a0[j] += y0 * wj;
      a1[j] += y1 * wj;
    }
  };
  for (int k = 0; k < 3; ++k) acc(s0[k], s1[k], W + (int64_t)k * HV * 8);
  for (int q = 0; q < 4; ++q)
    for (int d = 0; d < D; ++d) acc(grp0[q][d], grp1[q][d], W + (int64_t)(3 + q * D + d) * HV * 8);
  for (int j = 0; j < HV; ++j) {
    store8(out0 + 8 * j, relu(a0[j]));
    store8(out1 + 8 * j, relu(a1[j]));
  }
}

constexpr int kTile = 16;  // rows whose columns are computed together (vectorised sqrt, divide)

template <int HV>
void run(const float* g, float* p, const float* m, const float* v, int64_t n, int D, float amount,
         float rms_eps, const float* w0, const float* b0, const std::vector<const float*>& ws,
         const std::vector<const float*>& bs, const float* wdir, const float* wmag, float bdir,
         float bmag, float rate, float lr, float decay, float* partial /* (blocks, H) */) {
  constexpr int H = HV * 8;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t blo, int64_t bhi) {
    alignas(32) float h0[kMaxHidden], h1[kMaxHidden], t0[kMaxHidden], t1[kMaxHidden];
    alignas(32) float sc[kTile][3], rs[kTile * 16], mrs[kTile * 16];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      v8 hsv[HV];
      for (int j = 0; j < HV; ++j) hsv[j] = splat(0.f);
      const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
      for (int64_t t = lo; t < hi; t += kTile) {
        const int rows = (int)std::min<int64_t>(kTile, hi - t);
        // the tile's columns: g (clipped), p, log(|p| + 1e-8); 1/sqrt(v + eps) and m times it
        const float* mt = m + t * D;
        const float* vt = v + t * D;
        for (int j = 0; j < rows * D; ++j) {
          rs[j] = 1.f / std::sqrt(vt[j] + rms_eps);
          mrs[j] = mt[j] * rs[j];
        }
        for (int r = 0; r < rows; ++r) {
          sc[r][0] = clip(g[t + r], amount);
          sc[r][1] = p[t + r];
          sc[r][2] = std::log(std::fabs(p[t + r]) + 1e-8f);
        }
        for (int r = 0; r < rows; r += 2) {
          const bool pair = r + 1 < rows;
          const int r1 = pair ? r + 1 : r;  // an odd last row is computed twice, used once
          const float* grp0[4] = {mt + r * D, vt + r * D, mrs + r * D, rs + r * D};
          const float* grp1[4] = {mt + r1 * D, vt + r1 * D, mrs + r1 * D, rs + r1 * D};
          first_layer<HV>(sc[r], sc[r1], grp0, grp1, D, w0, b0, h0, h1);
          for (size_t l = 0; l < ws.size(); ++l) {
            layer<HV>(h0, h1, H, ws[l], bs[l], t0, t1);
            for (int j = 0; j < H; ++j) {
              h0[j] = t0[j];
              h1[j] = t1[j];
            }
          }
          v8 dd0 = splat(0.f), dd1 = dd0, ee0 = dd0, ee1 = dd0;
          for (int j = 0; j < HV; ++j) {
            const v8 x0 = load8(h0 + 8 * j), x1 = load8(h1 + 8 * j);
            const v8 wd = load8(wdir + 8 * j), wm = load8(wmag + 8 * j);
            dd0 += x0 * wd;
            dd1 += x1 * wd;
            ee0 += x0 * wm;
            ee1 += x1 * wm;
            hsv[j] += pair ? x0 + x1 : x0;
          }
          const float d0 = bdir + hsum(dd0), d1 = bdir + hsum(dd1);
          const float e0 = bmag + hsum(ee0), e1 = bmag + hsum(ee1);
          const int64_t i = t + r, i1 = t + r1;
          p[i] = p[i] * decay - lr * (d0 * std::exp(rate * e0));
          if (pair) p[i1] = p[i1] * decay - lr * (d1 * std::exp(rate * e1));
        }
      }
      for (int j = 0; j < HV; ++j) store8(partial + blk * H + 8 * j, hsv[j]);
    }
  });
}

// Updates p in place and returns the column sums of the last hidden layer (float64, (H,)).
torch::Tensor mlp_pass(torch::Tensor g, torch::Tensor p, torch::Tensor m, torch::Tensor v,
                       double amount, double rms_eps, torch::Tensor w0, torch::Tensor b0,
                       std::vector<torch::Tensor> ws, std::vector<torch::Tensor> bs, torch::Tensor wdir,
                       torch::Tensor wmag, double bdir, double bmag, double rate, double lr, double decay) {
  const int64_t n = p.numel();
  const int D = (int)(m.numel() / std::max<int64_t>(n, 1));
  const int H = (int)w0.size(1);
  TORCH_CHECK(H % 8 == 0 && H >= 8 && H <= kMaxHidden, "hidden width must be 8..64, a multiple of 8");
  TORCH_CHECK(3 + 4 * D == w0.size(0) && D <= 16, "column count mismatch");
  for (auto* t : {&g, &p, &m, &v, &w0, &b0, &wdir, &wmag})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat && t->device().is_cpu(),
                "contiguous float32 CPU tensors expected");
  std::vector<const float*> wp, bp;
  for (size_t l = 0; l < ws.size(); ++l) {
    TORCH_CHECK(ws[l].is_contiguous() && bs[l].is_contiguous() && ws[l].size(0) == H && ws[l].size(1) == H,
                "hidden layers must be contiguous (H, H)");
    wp.push_back(ws[l].data_ptr<float>());
    bp.push_back(bs[l].data_ptr<float>());
  }
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  auto partial = torch::zeros({std::max<int64_t>(blocks, 1), H}, p.options());
#define LOPT_RUN(HV)                                                                               \
  run<HV>(g.data_ptr<float>(), p.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), n, D, \
          (float)amount, (float)rms_eps, w0.data_ptr<float>(), b0.data_ptr<float>(), wp, bp,         \
          wdir.data_ptr<float>(), wmag.data_ptr<float>(), (float)bdir, (float)bmag, (float)rate,      \
          (float)lr, (float)decay, partial.data_ptr<float>())
  switch (H / 8) {
    case 1: LOPT_RUN(1); break;
    case 2: LOPT_RUN(2); break;
    case 3: LOPT_RUN(3); break;
    case 4: LOPT_RUN(4); break;
    case 5: LOPT_RUN(5); break;
    case 6: LOPT_RUN(6); break;
    case 7: LOPT_RUN(7); break;
    default: LOPT_RUN(8); break;
  }
#undef LOPT_RUN
  return partial.to(torch::kDouble).sum(0);
}

// ----------------------------------------------------------------------------- first pass
// Clip g, update the accumulators in place (m = b m + (1 - b) g, v = b v + (1 - b) g^2, each
// product rounded before the sum, as in the reference: no fused multiply-add here) and take
// the statistics of every block of rows: a row (rows, sum m, sum v, sum p, centred sums of
// squares of m, v and p about the block's own means, sum p^2, sum g^2) and the column sums of
// the squared element columns. fast.py combines the blocks exactly as it combines its chunks.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void stats_run(const float* g, const float* p, float* m, float* v, int64_t n, int D, float amount,
               const float* b, const float* one_b, float rms_eps, double* rows, double* sqs) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int E = 3 + 4 * D;
  const int L = kTile * D;  // lanes: one per accumulator entry of a tile, lane j is decay j % D
  float bl[kTile * 16], obl[kTile * 16];
  for (int j = 0; j < L; ++j) {
    bl[j] = b[j % D];
    obl[j] = one_b[j % D];
  }
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t blo, int64_t bhi) {
    alignas(32) float ge[kTile * 16], gge[kTile * 16];
    alignas(32) double am[kTile * 16], av[kTile * 16], amm[kTile * 16], avv[kTile * 16], ami[kTile * 16],
        ai[kTile * 16];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
      double sp = 0, spp = 0, sgg = 0, slg = 0;
      for (int j = 0; j < L; ++j) am[j] = av[j] = amm[j] = avv[j] = ami[j] = ai[j] = 0;
      for (int64_t t = lo; t < hi; t += kTile) {
        const int rows = (int)std::min<int64_t>(kTile, hi - t);
        for (int r = 0; r < rows; ++r) {
          const float gi = clip(g[t + r], amount);
          const float gg = gi * gi;
          for (int d = 0; d < D; ++d) {
            ge[r * D + d] = gi;
            gge[r * D + d] = gg;
          }
          const float pi = p[t + r];
          const float lg = std::log(std::fabs(pi) + 1e-8f);
          sp += pi;
          spp += pi * pi;
          sgg += gg;
          slg += lg * lg;
        }
        float* mt = m + t * D;
        float* vt = v + t * D;
        const int len = rows * D;
        for (int j = 0; j < len; ++j) {
          const float bm = bl[j] * mt[j], og = obl[j] * ge[j];
          const float bv = bl[j] * vt[j], ogg = obl[j] * gge[j];
          const float mn = bm + og, vn = bv + ogg;
          mt[j] = mn;
          vt[j] = vn;
          const float inv = 1.f / (vn + rms_eps);
          const float mm = mn * mn;
          am[j] += mn;
          av[j] += vn;
          amm[j] += mm;
          avv[j] += vn * vn;
          ami[j] += mm * inv;
          ai[j] += inv;
        }
      }
      double sm_d[16] = {0}, sv_d[16] = {0}, cm[16] = {0}, cv[16] = {0}, cmi[16] = {0}, ci[16] = {0};
      for (int j = 0; j < L; ++j) {
        const int d = j % D;
        sm_d[d] += am[j];
        sv_d[d] += av[j];
        cm[d] += amm[j];
        cv[d] += avv[j];
        cmi[d] += ami[j];
        ci[d] += ai[j];
      }
      double sm = 0, sv = 0;
      for (int d = 0; d < D; ++d) {
        sm += sm_d[d];
        sv += sv_d[d];
      }
      const double k = (double)(hi - lo);
      const double mean_m = sm / (k * D), mean_v = sv / (k * D), mean_p = sp / k;
      // centred sums over the block (eight lanes, so the adds vectorise)
      double dm8[8] = {0}, dv8[8] = {0};
      const int64_t len = (hi - lo) * D;
      const float* mb = m + lo * D;
      const float* vb = v + lo * D;
      int64_t j = 0;
      for (; j + 8 <= len; j += 8)
        for (int l = 0; l < 8; ++l) {
          const double dm = mb[j + l] - mean_m, dv = vb[j + l] - mean_v;
          dm8[l] += dm * dm;
          dv8[l] += dv * dv;
        }
      for (; j < len; ++j) {
        const double dm = mb[j] - mean_m, dv = vb[j] - mean_v;
        dm8[0] += dm * dm;
        dv8[0] += dv * dv;
      }
      double dmm = 0, dvv = 0, dpp = 0;
      for (int l = 0; l < 8; ++l) {
        dmm += dm8[l];
        dvv += dv8[l];
      }
      for (int64_t i = lo; i < hi; ++i) {
        const double dp = p[i] - mean_p;
        dpp += dp * dp;
      }
      double* r = rows + blk * 9;
      r[0] = k; r[1] = sm; r[2] = sv; r[3] = sp; r[4] = dmm; r[5] = dvv; r[6] = dpp; r[7] = spp; r[8] = sgg;
      double* q = sqs + blk * E;
      q[0] = sgg; q[1] = spp; q[2] = slg;
      for (int d = 0; d < D; ++d) {
        q[3 + d] = cm[d];
        q[3 + D + d] = cv[d];
        q[3 + 2 * D + d] = cmi[d];
        q[3 + 3 * D + d] = ci[d];
      }
    }
  });
}

// Returns (rows (blocks, 9), column square sums (blocks, E)), both float64; m and v updated.
std::vector<torch::Tensor> stats_pass(torch::Tensor g, torch::Tensor p, torch::Tensor m, torch::Tensor v,
                                      double amount, torch::Tensor b, torch::Tensor one_b, double rms_eps) {
  const int64_t n = p.numel();
  const int D = (int)(m.numel() / std::max<int64_t>(n, 1));
  TORCH_CHECK(D >= 1 && D <= 16 && b.numel() == D && one_b.numel() == D, "decay count mismatch");
  for (auto* t : {&g, &p, &m, &v, &b, &one_b})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat && t->device().is_cpu(),
                "contiguous float32 CPU tensors expected");
  const int64_t blocks = std::max<int64_t>((n + kBlock - 1) / kBlock, 1);
  auto opts = p.options().dtype(torch::kDouble);
  auto rows = torch::zeros({blocks, 9}, opts);
  auto sqs = torch::zeros({blocks, 3 + 4 * D}, opts);
  stats_run(g.data_ptr<float>(), p.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), n, D,
            (float)amount, b.data_ptr<float>(), one_b.data_ptr<float>(), (float)rms_eps,
            rows.data_ptr<double>(), sqs.data_ptr<double>());
  return {rows, sqs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("stats_pass", &stats_pass, "first per-element pass of one tensor (updates m and v in place)");
  mod.def("mlp_pass", &mlp_pass, "fused per-element MLP pass of one tensor (updates p in place)");
}
