// The two per-element passes of the fast path (learned_opt/fast.py) for one whole tensor, each
// fused into one sweep:
// * stats_pass (tensor_statistics): clip, accumulator update, per-block statistics;
// * mlp_pass (mlp_update): element columns -> MLP -> direction and magnitude -> parameter
//   update, plus the column sum of the last hidden layer (for the per-tensor messages).
//
// Both read the gradient times gscale (ArchConfig.scale_free's factor), so that no scaled copy
// of the gradients is made. Nothing of size n is allocated: in mlp_pass each group of three elements is carried from its
// inputs to its update in registers and a few small stack arrays (one tile of 24 rows). Vectors are GCC/Clang vector extensions,
// so the compiler maps them to the machine's own SIMD (AVX2, AVX-512, NEON). Rows are taken
// three at a time so that every weight vector loaded serves three rows; the per-element
// scalar work (sqrt, divide, log, exp) is done for a tile of rows at once in vectors.
//
// Reference: learned_opt/reference.py; tested equal to it in tests/test_native.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <utility>
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

// an empty asm that claims to change x: x must then sit in a register, so a value loaded once
// is not folded into several instructions as repeated memory operands
#if defined(__x86_64__) || defined(__i386__)
inline void in_register(v8& x) { asm("" : "+x"(x)); }
#elif defined(__aarch64__)
inline void in_register(v8& x) { asm("" : "+w"(x)); }
#else
inline void in_register(v8&) {}
#endif

typedef int32_t v8i __attribute__((vector_size(32)));

inline v8i bits(v8 x) {
  v8i i;
  __builtin_memcpy(&i, &x, sizeof(i));
  return i;
}
inline v8 from_bits(v8i i) {
  v8 x;
  __builtin_memcpy(&x, &i, sizeof(x));
  return x;
}

// Natural log of eight floats. x = 2^e * f with f in [sqrt(1/2), sqrt(2)); log f = 2 atanh(s),
// s = (f - 1) / (f + 1), |s| < 0.172, by its series to s^9 (truncation below 1e-9 relative);
// about 2 ulp. Only for normal positive finite lanes: the caller redoes any other lane with
// std::log (zero, subnormal, negative, inf, NaN).
inline v8 log8(v8 x) {
  const v8i b = bits(x);
  v8i e = ((b >> 23) & 0xff) - 127;
  v8 f = from_bits((b & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const v8i big = f > splat(1.41421356f);
  f = big ? f * splat(0.5f) : f;
  e = e - big;  // big is -1 where true
  const v8 s = (f - splat(1.f)) / (f + splat(1.f));
  const v8 s2 = s * s;
  v8 q = splat(1.f / 9.f);
  q = q * s2 + splat(1.f / 7.f);
  q = q * s2 + splat(1.f / 5.f);
  q = q * s2 + splat(1.f / 3.f);
  const v8 logf = (s + s) + (s + s) * (s2 * q);
  const v8 ef = __builtin_convertvector(e, v8);
  // ln 2 in two parts: the first has few enough bits that e * part is exact
  return ef * splat(0.693145752f) + (logf + ef * splat(1.42860677e-6f));
}

// exp of eight floats: y = k ln2 + r, |r| <= ln2 / 2, exp r by its Taylor series to r^7
// (truncation below 1e-8 relative), times 2^k built in the exponent bits. Only for |y| < 87;
// the caller redoes other lanes (NaN included) with std::exp.
inline v8 exp8(v8 y) {
  y = ((y < splat(87.f)) & (y > splat(-87.f))) ? y : splat(0.f);  // no float-to-int overflow
  const v8 t = y * splat(1.44269504f);
  const v8i k = __builtin_convertvector(t + (t < splat(0.f) ? splat(-0.5f) : splat(0.5f)), v8i);
  const v8 kf = __builtin_convertvector(k, v8);
  const v8 r = (y - kf * splat(0.693145752f)) - kf * splat(1.42860677e-6f);
  v8 q = splat(1.f / 5040.f);
  q = q * r + splat(1.f / 720.f);
  q = q * r + splat(1.f / 120.f);
  q = q * r + splat(1.f / 24.f);
  q = q * r + splat(1.f / 6.f);
  q = q * r + splat(0.5f);
  q = q * r + splat(1.f);
  q = q * r + splat(1.f);
  return q * from_bits((k + 127) << 23);
}

// out[i] = log(x[i]) for n <= N values (N a multiple of 8); lanes outside log8's range go
// through std::log
template <int N>
inline void log_n(const float* x, float* out, int n) {
  alignas(32) float buf[N];
  for (int i = 0; i < N; ++i) buf[i] = i < n ? x[i] : 1.f;
  for (int j = 0; j < N; j += 8) store8(out + j, log8(load8(buf + j)));
  for (int i = 0; i < n; ++i)  // (buf, since out may be x)
    if (!(buf[i] >= 1.17549435e-38f && buf[i] <= 3.40282347e38f)) out[i] = std::log(buf[i]);
}

// R rows at once: every weight vector loaded serves R rows. acc[r][j] starts at the bias and
// takes in[r][k] * W[k][8j..8j+8) for each input k; W is (K, H) row-major.
template <int HV, int R>
struct Rows {
  v8 acc[R][HV];
  inline void start(const float* bias) {
    for (int j = 0; j < HV; ++j) {
      const v8 bj = load8(bias + 8 * j);
      for (int r = 0; r < R; ++r) acc[r][j] = bj;
    }
  }
  inline void add(const float* const* in, int k, const float* w) {
    v8 x[R];
    for (int r = 0; r < R; ++r) x[r] = splat(in[r][k]);
    for (int j = 0; j < HV; ++j) {
      v8 wj = load8(w + 8 * j);
      in_register(wj);  // one load serves the R rows (compilers otherwise reload it per row)
      for (int r = 0; r < R; ++r) acc[r][j] += x[r] * wj;
    }
  }
  inline void finish(float (*out)[kMaxHidden]) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < HV; ++j) store8(out[r] + 8 * j, relu(acc[r][j]));
  }
};

constexpr int kTile = 24;  // rows whose columns are computed together (vectorised sqrt, divide, log, exp)
constexpr int kR = 3;      // rows per micro-kernel call: 3 x (H / 8) accumulators stay in registers
static_assert(kTile % 8 == 0 && kTile % kR == 0, "tiles are whole vectors and whole row groups");

template <int HV>
void run(const float* g, float* p, const float* m, const float* v, int64_t n, int D, float amount,
         float rms_eps, const float* w0, const float* b0, const std::vector<const float*>& ws,
         const std::vector<const float*>& bs, const float* wdir, const float* wmag, float bdir,
         float bmag, float rate, float lr, float decay, bool freeze, float gscale,
         float* partial /* (blocks, H) */) {
  constexpr int H = HV * 8;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t blo, int64_t bhi) {
    alignas(32) float h[kR][kMaxHidden], t[kR][kMaxHidden];
    alignas(32) float gc[kTile], pc[kTile], lp[kTile], rs[kTile * 16], mrs[kTile * 16];
    alignas(32) float dv[kTile], ev[kTile];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      v8 hsv[HV];
      for (int j = 0; j < HV; ++j) hsv[j] = splat(0.f);
      const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
      for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
        const int rows = (int)std::min<int64_t>(kTile, hi - t0);
        // the tile's columns: g (clipped), p, log(|p| + 1e-8); 1/sqrt(v + eps) and m times it
        const float* mt = m + t0 * D;
        const float* vt = v + t0 * D;
        for (int j = 0; j < rows * D; ++j) {
          rs[j] = 1.f / std::sqrt(vt[j] + rms_eps);
          mrs[j] = mt[j] * rs[j];
        }
        for (int r = 0; r < rows; ++r) {
          gc[r] = clip(g[t0 + r] * gscale, amount);
          pc[r] = p[t0 + r];
          lp[r] = std::fabs(pc[r]) + 1e-8f;
        }
        log_n<kTile>(lp, lp, rows);
        for (int r = 0; r < rows; r += kR) {
          // a short last group repeats its last row (computed again, used once)
          int ri[kR];
          for (int q = 0; q < kR; ++q) ri[q] = std::min(r + q, rows - 1);
          Rows<HV, kR> acc;
          acc.start(b0);
          const float* in[kR];
          for (int q = 0; q < kR; ++q) in[q] = gc + ri[q];
          acc.add(in, 0, w0);
          for (int q = 0; q < kR; ++q) in[q] = pc + ri[q];
          acc.add(in, 0, w0 + 1 * H);
          for (int q = 0; q < kR; ++q) in[q] = lp + ri[q];
          acc.add(in, 0, w0 + 2 * H);
          // four groups of D columns: m, v, m * rs, rs
          const float* grp[4] = {mt, vt, mrs, rs};
          for (int c = 0; c < 4; ++c) {
            for (int q = 0; q < kR; ++q) in[q] = grp[c] + ri[q] * D;
            for (int d = 0; d < D; ++d) acc.add(in, d, w0 + (3 + c * D + d) * H);
          }
          float(*cur)[kMaxHidden] = h;
          float(*nxt)[kMaxHidden] = t;
          acc.finish(cur);
          for (size_t l = 0; l < ws.size(); ++l) {
            Rows<HV, kR> hid;
            hid.start(bs[l]);
            const float* hin[kR];
            for (int q = 0; q < kR; ++q) hin[q] = cur[q];
            for (int k = 0; k < H; ++k) hid.add(hin, k, ws[l] + k * H);
            hid.finish(nxt);
            std::swap(cur, nxt);
          }
          v8 dd[kR], ee[kR];
          for (int q = 0; q < kR; ++q) dd[q] = ee[q] = splat(0.f);
          for (int j = 0; j < HV; ++j) {
            const v8 wd = load8(wdir + 8 * j), wm = load8(wmag + 8 * j);
            for (int q = 0; q < kR; ++q) {
              const v8 x = load8(cur[q] + 8 * j);
              dd[q] += x * wd;
              ee[q] += x * wm;
              if (r + q < rows) hsv[j] += x;
            }
          }
          for (int q = 0; q < kR && r + q < rows; ++q) {
            dv[r + q] = bdir + hsum(dd[q]);
            ev[r + q] = rate * (bmag + hsum(ee[q]));
          }
        }
        // the update of the tile: p <- p * decay - lr * d * exp(rate * mag); with freeze, an
        // element whose accumulators are all zero (never a non-zero gradient) takes no step
        for (int j = 0; j < rows; j += 8) {
          alignas(32) float ex[8];
          const v8 y = load8(ev + j);
          store8(ex, exp8(y));
          for (int i = 0; i < 8 && j + i < rows; ++i) {
            const float yi = ev[j + i];
            const float x = std::fabs(yi) < 87.f ? ex[i] : std::exp(yi);
            bool live = true;
            if (freeze) {
              live = false;
              for (int d = 0; d < D; ++d) live = live || vt[(j + i) * D + d] != 0.f;
            }
            p[t0 + j + i] = live ? pc[j + i] * decay - lr * (dv[j + i] * x) : pc[j + i] * decay;
          }
        }
      }
      for (int j = 0; j < HV; ++j) store8(partial + blk * H + 8 * j, hsv[j]);
    }
  });
}

// run<HV> for a hidden width H (a multiple of 8, at most kMaxHidden)
template <typename... A>
void run_width(int H, A&&... a) {
  switch (H / 8) {
    case 1: run<1>(std::forward<A>(a)...); break;
    case 2: run<2>(std::forward<A>(a)...); break;
    case 3: run<3>(std::forward<A>(a)...); break;
    case 4: run<4>(std::forward<A>(a)...); break;
    case 5: run<5>(std::forward<A>(a)...); break;
    case 6: run<6>(std::forward<A>(a)...); break;
    case 7: run<7>(std::forward<A>(a)...); break;
    default: run<8>(std::forward<A>(a)...); break;
  }
}

// Updates p in place and returns the column sums of the last hidden layer (float64, (H,)).
torch::Tensor mlp_pass(torch::Tensor g, torch::Tensor p, torch::Tensor m, torch::Tensor v,
                       double amount, double rms_eps, torch::Tensor w0, torch::Tensor b0,
                       std::vector<torch::Tensor> ws, std::vector<torch::Tensor> bs, torch::Tensor wdir,
                       torch::Tensor wmag, double bdir, double bmag, double rate, double lr, double decay,
                       bool freeze, double gscale) {
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
  run_width(H, g.data_ptr<float>(), p.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), n, D,
            (float)amount, (float)rms_eps, w0.data_ptr<float>(), b0.data_ptr<float>(), wp, bp,
            wdir.data_ptr<float>(), wmag.data_ptr<float>(), (float)bdir, (float)bmag, (float)rate, (float)lr,
            (float)decay, freeze, (float)gscale, partial.data_ptr<float>());
  return partial.to(torch::kDouble).sum(0);
}

// sum over i < n of (x[i] - mean)^2 in float64
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
inline double centred_sq(const float* x, int64_t n, double mean) {
  const v4d mu = {mean, mean, mean, mean};
  v4d a0 = {0, 0, 0, 0}, a1 = a0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v4f x0, x1;
    __builtin_memcpy(&x0, x + i, sizeof(x0));
    __builtin_memcpy(&x1, x + i + 4, sizeof(x1));
    const v4d d0 = __builtin_convertvector(x0, v4d) - mu, d1 = __builtin_convertvector(x1, v4d) - mu;
    a0 += d0 * d0;
    a1 += d1 * d1;
  }
  const v4d a = a0 + a1;
  double s = (a[0] + a[2]) + (a[1] + a[3]);
  for (; i < n; ++i) s += (x[i] - mean) * (x[i] - mean);
  return s;
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
               const float* b, const float* one_b, float rms_eps, float gscale, double* rows, double* sqs) {
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
        alignas(32) float lp[kTile];
        for (int r = 0; r < rows; ++r) lp[r] = std::fabs(p[t + r]) + 1e-8f;
        log_n<kTile>(lp, lp, rows);
        for (int r = 0; r < rows; ++r) {
          const float gi = clip(g[t + r] * gscale, amount);
          const float gg = gi * gi;
          for (int d = 0; d < D; ++d) {
            ge[r * D + d] = gi;
            gge[r * D + d] = gg;
          }
          const float pi = p[t + r];
          const float lg = lp[r];
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
      // centred sums over the block, four float64 lanes at a time
      const int64_t len = (hi - lo) * D;
      const double dmm = centred_sq(m + lo * D, len, mean_m), dvv = centred_sq(v + lo * D, len, mean_v);
      const double dpp = centred_sq(p + lo, hi - lo, mean_p);
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
                                      double amount, torch::Tensor b, torch::Tensor one_b, double rms_eps,
                                      double gscale) {
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
            (float)amount, b.data_ptr<float>(), one_b.data_ptr<float>(), (float)rms_eps, (float)gscale,
            rows.data_ptr<double>(), sqs.data_ptr<double>());
  return {rows, sqs};
}

// ------------------------------------------------------------------- a population at once
// The two passes for one tensor of each of M population members (meta-training), each member
// with its own folded weights: the member loop runs here rather than in Python. g, p are
// (M, n), m, v (M, n, D); per-member weights carry a leading M. Same arithmetic as above.

void check_members(const std::vector<torch::Tensor>& ts, int64_t M) {
  for (const auto& t : ts)
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == torch::kFloat && t.device().is_cpu() && t.dim() >= 1 &&
                    t.size(0) == M,
                "contiguous float32 CPU tensors with the member dimension first expected");
}

torch::Tensor mlp_pass_members(torch::Tensor g, torch::Tensor p, torch::Tensor m, torch::Tensor v,
                               std::vector<double> amounts, double rms_eps, torch::Tensor w0, torch::Tensor b0,
                               std::vector<torch::Tensor> ws, std::vector<torch::Tensor> bs, torch::Tensor wdir,
                               torch::Tensor wmag, std::vector<double> bdir, std::vector<double> bmag,
                               double rate, double lr, double decay, bool freeze) {
  const int64_t M = p.size(0);
  TORCH_CHECK(p.dim() == 2 && (int64_t)amounts.size() == M && (int64_t)bdir.size() == M && (int64_t)bmag.size() == M,
              "one amount and output bias per member expected");
  const int64_t n = p.size(1);
  const int D = (int)(m.numel() / std::max<int64_t>(M * n, 1));
  const int H = (int)w0.size(2);
  TORCH_CHECK(H % 8 == 0 && H >= 8 && H <= kMaxHidden, "hidden width must be 8..64, a multiple of 8");
  TORCH_CHECK(3 + 4 * D == w0.size(1) && D <= 16, "column count mismatch");
  check_members({g, p, m, v, w0, b0, wdir, wmag}, M);
  check_members(ws, M);
  check_members(bs, M);
  const int E = 3 + 4 * D;
  bool sizes = g.numel() == M * n && v.numel() == m.numel() && m.numel() == M * n * D && w0.numel() == M * E * H &&
               b0.numel() == M * H && wdir.numel() == M * H && wmag.numel() == M * H && bs.size() == ws.size();
  for (size_t l = 0; l < ws.size(); ++l) sizes = sizes && ws[l].numel() == M * H * H && bs[l].numel() == M * H;
  TORCH_CHECK(sizes, "member tensors of inconsistent sizes");
  const int64_t blocks = std::max<int64_t>((n + kBlock - 1) / kBlock, 1);
  auto partial = torch::zeros({M, blocks, H}, p.options());
  for (int64_t i = 0; i < M; ++i) {
    std::vector<const float*> wp, bp;
    for (size_t l = 0; l < ws.size(); ++l) {
      wp.push_back(ws[l].data_ptr<float>() + i * H * H);
      bp.push_back(bs[l].data_ptr<float>() + i * H);
    }
    run_width(H, g.data_ptr<float>() + i * n, p.data_ptr<float>() + i * n, m.data_ptr<float>() + i * n * D,
              v.data_ptr<float>() + i * n * D, n, D, (float)amounts[i], (float)rms_eps,
              w0.data_ptr<float>() + i * E * H, b0.data_ptr<float>() + i * H, wp, bp,
              wdir.data_ptr<float>() + i * H, wmag.data_ptr<float>() + i * H, (float)bdir[i], (float)bmag[i],
              (float)rate, (float)lr, (float)decay, freeze, 1.0f, partial.data_ptr<float>() + i * blocks * H);
  }
  return partial.to(torch::kDouble).sum(1);
}

// Returns (rows (M, blocks, 9), column square sums (M, blocks, E)); m and v updated.
std::vector<torch::Tensor> stats_pass_members(torch::Tensor g, torch::Tensor p, torch::Tensor m, torch::Tensor v,
                                              std::vector<double> amounts, torch::Tensor b, torch::Tensor one_b,
                                              double rms_eps) {
  const int64_t M = p.size(0);
  TORCH_CHECK(p.dim() == 2 && (int64_t)amounts.size() == M, "one amount per member expected");
  const int64_t n = p.size(1);
  const int D = (int)(m.numel() / std::max<int64_t>(M * n, 1));
  TORCH_CHECK(D >= 1 && D <= 16 && b.numel() == D && one_b.numel() == D, "decay count mismatch");
  check_members({g, p, m, v}, M);
  TORCH_CHECK(g.numel() == M * n && v.numel() == m.numel() && m.numel() == M * n * D, "member tensors of inconsistent sizes");
  for (auto* t : {&b, &one_b})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat && t->device().is_cpu(),
                "contiguous float32 CPU tensors expected");
  const int64_t blocks = std::max<int64_t>((n + kBlock - 1) / kBlock, 1);
  const int E = 3 + 4 * D;
  auto opts = p.options().dtype(torch::kDouble);
  auto rows = torch::zeros({M, blocks, 9}, opts);
  auto sqs = torch::zeros({M, blocks, E}, opts);
  for (int64_t i = 0; i < M; ++i)
    stats_run(g.data_ptr<float>() + i * n, p.data_ptr<float>() + i * n, m.data_ptr<float>() + i * n * D,
              v.data_ptr<float>() + i * n * D, n, D, (float)amounts[i], b.data_ptr<float>(),
              one_b.data_ptr<float>(), (float)rms_eps, 1.0f, rows.data_ptr<double>() + i * blocks * 9,
              sqs.data_ptr<double>() + i * blocks * E);
  return {rows, sqs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("stats_pass", &stats_pass, "first per-element pass of one tensor (updates m and v in place)");
  mod.def("mlp_pass", &mlp_pass, "fused per-element MLP pass of one tensor (updates p in place)");
  mod.def("stats_pass_members", &stats_pass_members, "stats_pass for one tensor of each population member");
  mod.def("mlp_pass_members", &mlp_pass_members, "mlp_pass for one tensor of each population member");
}
