// R small Linear layers at once, y[r] = x[r] W[r]^T + b[r], for gradsweep's compiled engine on the CPU.
//
// Batched matmul libraries (MKL, oneDNN, inductor's GEMM template) treat each run's (B x in) by (in x out)
// product as one small GEMM; at the widths of a depth sweep (~10) the per-matrix overhead dominates. Here V runs
// are processed side by side instead: each tile of V runs is transposed into a small buffer with the run index
// innermost (x[b][i][v]), so that one SIMD register holds the same element of V runs and the products are plain
// vector FMAs with no reduction across lanes. The buffers are a few tens of KiB and stay in cache; the tensors
// keep gradsweep's (R, ...) layout outside: each run's rows contiguous, runs at any stride (0 for one input shared
// by every run; a weight's run stride is its (R, P) parameter matrix's row). Tiles run in parallel (OpenMP).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

constexpr int V = 8;   // runs per tile (one AVX2 register of float, two of double)
constexpr int NB = 12;  // outputs per register-blocked pass
constexpr int64_t BC = 32;  // batch rows per chunk

typedef float vf32 __attribute__((vector_size(V * sizeof(float)), aligned(sizeof(float))));
typedef double vf64 __attribute__((vector_size(V * sizeof(double)), aligned(sizeof(double))));
template <typename S> struct Vec;
template <> struct Vec<float> { using type = vf32; };
template <> struct Vec<double> { using type = vf64; };
template <typename S> using vec = typename Vec<S>::type;
template <typename S> static inline vec<S> ld(const S* p) { return *(const vec<S>*)p; }
template <typename S> static inline void st(S* p, vec<S> v) { *(vec<S>*)p = v; }

// tile[j][v] = src[v * rs + j] for j < n, v < nv (lanes >= nv zero): V runs' rows side by side.
// In blocks of V x V, loaded and stored as whole vectors and transposed in registers.
#ifdef __AVX__
#include <immintrin.h>
static inline void transpose(vf32 (&m)[V]) {  // the classic 8 x 8 AVX transpose (unpack, shuffle, permute)
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = (__m256)m[k];
  t[0] = _mm256_unpacklo_ps(r[0], r[1]); t[1] = _mm256_unpackhi_ps(r[0], r[1]);
  t[2] = _mm256_unpacklo_ps(r[2], r[3]); t[3] = _mm256_unpackhi_ps(r[2], r[3]);
  t[4] = _mm256_unpacklo_ps(r[4], r[5]); t[5] = _mm256_unpackhi_ps(r[4], r[5]);
  t[6] = _mm256_unpacklo_ps(r[6], r[7]); t[7] = _mm256_unpackhi_ps(r[6], r[7]);
  r[0] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(1, 0, 1, 0)); r[1] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(3, 2, 3, 2));
  r[2] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(1, 0, 1, 0)); r[3] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(3, 2, 3, 2));
  r[4] = _mm256_shuffle_ps(t[4], t[6], _MM_SHUFFLE(1, 0, 1, 0)); r[5] = _mm256_shuffle_ps(t[4], t[6], _MM_SHUFFLE(3, 2, 3, 2));
  r[6] = _mm256_shuffle_ps(t[5], t[7], _MM_SHUFFLE(1, 0, 1, 0)); r[7] = _mm256_shuffle_ps(t[5], t[7], _MM_SHUFFLE(3, 2, 3, 2));
  for (int k = 0; k < 4; ++k) {
    m[k] = (vf32)_mm256_permute2f128_ps(r[k], r[k + 4], 0x20);
    m[k + 4] = (vf32)_mm256_permute2f128_ps(r[k], r[k + 4], 0x31);
  }
}
#endif

template <typename T>  // any vector type; the AVX overload above is preferred for float (a non-template)
static inline void transpose(T (&m)[V]) {
  T a[V];
  for (int k = 0; k < V; ++k) a[k] = m[k];
  for (int j = 0; j < V; ++j) for (int k = 0; k < V; ++k) m[j][k] = a[k][j];
}

template <typename S>
static void gather(S* tile, const S* src, int64_t rs, int64_t n, int nv) {
  int64_t j = 0;
  if (nv == V) {
    for (; j + V <= n; j += V) {
      vec<S> m[V];
      for (int v = 0; v < V; ++v) m[v] = ld(src + v * rs + j);
      transpose(m);
      for (int k = 0; k < V; ++k) st(tile + (j + k) * V, m[k]);
    }
  }
  for (; j < n; ++j)
    for (int v = 0; v < V; ++v) tile[j * V + v] = v < nv ? src[v * rs + j] : S(0);
}

template <typename S>
static void scatter(S* dst, const S* tile, int64_t rs, int64_t n, int nv) {
  int64_t j = 0;
  if (nv == V) {
    for (; j + V <= n; j += V) {
      vec<S> m[V];
      for (int k = 0; k < V; ++k) m[k] = ld(tile + (j + k) * V);
      transpose(m);
      for (int v = 0; v < V; ++v) st(dst + v * rs + j, m[v]);
    }
  }
  for (; j < n; ++j)
    for (int v = 0; v < nv; ++v) dst[v * rs + j] = tile[j * V + v];
}

// y[b][o] = bias[o] + sum_i x[b][i] W[o][i], outputs o0 .. o0 + K
template <typename S, int K>
static void fwd_pass(const S* x, const S* W, const S* bias, S* y, int64_t B, int64_t I, int64_t O, int64_t o0) {
  for (int64_t b = 0; b < B; ++b) {
    vec<S> acc[K];
    for (int k = 0; k < K; ++k) acc[k] = ld(bias + (o0 + k) * V);
    const S* xr = x + b * I * V;
    for (int64_t i = 0; i < I; ++i) {
      vec<S> xv = ld(xr + i * V);
      for (int k = 0; k < K; ++k) acc[k] += xv * ld(W + ((o0 + k) * I + i) * V);
    }
    for (int k = 0; k < K; ++k) st(y + (b * O + o0 + k) * V, acc[k]);
  }
}

// dx[b][i] = sum_o dy[b][o] W[o][i], inputs i0 .. i0 + K
template <typename S, int K>
static void dx_pass(const S* dy, const S* W, S* dx, int64_t B, int64_t I, int64_t O, int64_t i0) {
  for (int64_t b = 0; b < B; ++b) {
    vec<S> acc[K];
    for (int k = 0; k < K; ++k) acc[k] = vec<S>{};
    for (int64_t o = 0; o < O; ++o) {
      vec<S> g = ld(dy + (b * O + o) * V);
      for (int k = 0; k < K; ++k) acc[k] += g * ld(W + (o * I + i0 + k) * V);
    }
    for (int k = 0; k < K; ++k) st(dx + (b * I + i0 + k) * V, acc[k]);
  }
}

// dW[o][i] += sum_b dy[b][o] x[b][i] for inputs i0 .. i0 + K (and db[o] += sum_b dy[b][o] with the first pass)
template <typename S, int K>
static void dw_pass(const S* dy, const S* x, S* dW, S* db, int64_t B, int64_t I, int64_t O, int64_t i0) {
  for (int64_t o = 0; o < O; ++o) {
    vec<S> acc[K];
    vec<S> bacc = ld(db + o * V);
    for (int k = 0; k < K; ++k) acc[k] = ld(dW + (o * I + i0 + k) * V);
    for (int64_t b = 0; b < B; ++b) {
      vec<S> g = ld(dy + (b * O + o) * V);
      if (i0 == 0) bacc += g;
      const S* xr = x + b * I * V + i0 * V;
      for (int k = 0; k < K; ++k) acc[k] += g * ld(xr + k * V);
    }
    for (int k = 0; k < K; ++k) st(dW + (o * I + i0 + k) * V, acc[k]);
    if (i0 == 0) st(db + o * V, bacc);
  }
}

// N outputs in passes of at most NB, as even as possible (a short pass waits on FMA latency)
#define PASS_CASE(FN, K) case K: FN<S, K>(args..., j0); break;
#define DEFINE_PASSES(NAME, FN)                                                   \
  template <typename S, typename... A>                                            \
  static void NAME(int64_t total, A... args) {                                    \
    int64_t np = (total + NB - 1) / NB, j0 = 0;                                   \
    for (int64_t p = 0; p < np; ++p) {                                            \
      int64_t n = (total - j0) / (np - p);                                        \
      switch (n) {                                                                \
        PASS_CASE(FN, 12) PASS_CASE(FN, 11) PASS_CASE(FN, 10) PASS_CASE(FN, 9)    \
        PASS_CASE(FN, 8) PASS_CASE(FN, 7) PASS_CASE(FN, 6) PASS_CASE(FN, 5)       \
        PASS_CASE(FN, 4) PASS_CASE(FN, 3) PASS_CASE(FN, 2)                        \
        default: FN<S, 1>(args..., j0);                                           \
      }                                                                           \
      j0 += n;                                                                    \
    }                                                                             \
  }
DEFINE_PASSES(fwd_passes, fwd_pass)
DEFINE_PASSES(dx_passes, dx_pass)
DEFINE_PASSES(dw_passes, dw_pass)

// Per output o over the chunk's rows: m[0][o] += y^2, m[1][o] += relu(y), m[2][o] += relu(y)^2 (relu(NaN) = NaN,
// as torch.relu has it): a layer output's norm and what a ReLU-family activation of it has, without a pass over y.
// Each chunk is summed on its own and then added (rounding error ~ (BC + B / BC) eps, not B eps).
template <typename S>
static void moments(const S* yt, S* mt, int64_t bc, int64_t O) {
  for (int64_t o = 0; o < O; ++o) {
    vec<S> sq{}, pos{}, psq{};
    for (int64_t b = 0; b < bc; ++b) {
      vec<S> y = ld(yt + (b * O + o) * V);
      vec<S> p = y <= vec<S>{} ? vec<S>{} : y;
      sq += y * y;
      pos += p;
      psq += p * p;
    }
    st(mt + o * V, ld(mt + o * V) + sq);
    st(mt + (O + o) * V, ld(mt + (O + o) * V) + pos);
    st(mt + (2 * O + o) * V, ld(mt + (2 * O + o) * V) + psq);
  }
}

// x: (R, B, I) with run stride xs (0: one input shared by all runs); W (R, O, I); bias (R, O); y (R, B, O);
// m (R, 3, O) the moments above, if not null
template <typename S>
static void forward(const S* x, int64_t xs, const S* W, int64_t ws, const S* bias, int64_t bs, S* y, S* m, int64_t R,
                    int64_t B, int64_t I, int64_t O, int threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r0 = 0; r0 < R; r0 += V) {
    std::vector<S> xt(BC * I * V), wt(O * I * V), bt(O * V), yt(BC * O * V), mt(m ? 3 * O * V : 0);
    int nv = (int)std::min<int64_t>(V, R - r0);
    gather(wt.data(), W + r0 * ws, ws, O * I, nv);
    gather(bt.data(), bias + r0 * bs, bs, O, nv);
    for (int64_t b0 = 0; b0 < B; b0 += BC) {
      int64_t bc = std::min(BC, B - b0);
      gather(xt.data(), x + r0 * xs + b0 * I, xs, bc * I, nv);
      fwd_passes<S>(O, (const S*)xt.data(), (const S*)wt.data(), (const S*)bt.data(), yt.data(), bc, I, O);
      if (m) moments(yt.data(), mt.data(), bc, O);
      scatter(y + r0 * B * O + b0 * O, yt.data(), B * O, bc * O, nv);
    }
    if (m) scatter(m + r0 * 3 * O, mt.data(), 3 * O, 3 * O, nv);
  }
}

// dy (R, B, O); x as in forward; W (R, O, I) -> dx (R, B, I) if not null, dW (R, O, I), db (R, O), and if gsq is
// not null gsq (R, 2): each run's sum of dy^2 and of (dy * scale)^2 (its norm where the squares underflow)
template <typename S>
static void backward(const S* dy, const S* x, int64_t xs, const S* W, int64_t ws, S* dx, S* dW, S* db, S* gsq, S scale,
                     int64_t R, int64_t B, int64_t I, int64_t O, int threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r0 = 0; r0 < R; r0 += V) {
    std::vector<S> xt(BC * I * V), wt(O * I * V), dyt(BC * O * V), dxt(BC * I * V), dwt(O * I * V), dbt(O * V);
    S sums[2 * V];
    vec<S> sq{}, ssq{};
    int nv = (int)std::min<int64_t>(V, R - r0);
    if (dx) gather(wt.data(), W + r0 * ws, ws, O * I, nv);
    std::fill(dwt.begin(), dwt.end(), S(0));
    std::fill(dbt.begin(), dbt.end(), S(0));
    for (int64_t b0 = 0; b0 < B; b0 += BC) {
      int64_t bc = std::min(BC, B - b0);
      gather(dyt.data(), dy + r0 * B * O + b0 * O, B * O, bc * O, nv);
      gather(xt.data(), x + r0 * xs + b0 * I, xs, bc * I, nv);
      if (gsq) {  // summed per chunk, then added (as the moments above)
        vec<S> csq{}, cssq{};
        for (int64_t j = 0; j < bc * O; ++j) {
          vec<S> g = ld(dyt.data() + j * V), gs = g * scale;
          csq += g * g;
          cssq += gs * gs;
        }
        sq += csq;
        ssq += cssq;
      }
      if (dx) {
        dx_passes<S>(I, (const S*)dyt.data(), (const S*)wt.data(), dxt.data(), bc, I, O);
        scatter(dx + r0 * B * I + b0 * I, dxt.data(), B * I, bc * I, nv);
      }
      dw_passes<S>(I, (const S*)dyt.data(), (const S*)xt.data(), dwt.data(), dbt.data(), bc, I, O);
    }
    scatter(dW + r0 * O * I, dwt.data(), O * I, O * I, nv);
    scatter(db + r0 * O, dbt.data(), O, O, nv);
    if (gsq) {
      st(sums, sq); st(sums + V, ssq);
      scatter(gsq + r0 * 2, sums, 2, 2, nv);
    }
  }
}

// layer_sums (below) for run r, its rows of g, u and w at gr0, ur0, wr0
template <typename S>
static void layer_sums_row(const S* gr0, const S* ur0, const S* wr0, const int64_t* off, const int64_t* n, S* sums,
                           S* gmax, S scale, int64_t r, int64_t R, int64_t L) {
  const S big = std::numeric_limits<S>::max();
  for (int64_t k = 0; k < L; ++k) {
    const S *gr = gr0 + off[k], *ur = ur0 + off[k], *wr = wr0 + off[k];
    vec<S> acc[7] = {}, mx{};
    const vec<S> one = vec<S>{} + S(1), zero{};
    int64_t j = 0;
    for (; j + V <= n[k]; j += V) {
      vec<S> gv = ld(gr + j), uv = ld(ur + j), wv = ld(wr + j);
      vec<S> a = gv < zero ? -gv : gv, gs = gv * scale, us = uv * scale;
      acc[0] += gv * gv; acc[1] += gs * gs;
      acc[2] += gv != zero ? one : zero;
      acc[3] += a <= big ? zero : one;
      acc[4] += uv * uv; acc[5] += us * us; acc[6] += wv * wv;
      mx = (a > mx) | (a != a) ? a : mx;  // once NaN, stays NaN (no a > NaN)
    }
    S out[7], m = 0;
    for (int t = 0; t < 7; ++t) { out[t] = 0; for (int v = 0; v < V; ++v) out[t] += acc[t][v]; }
    for (int v = 0; v < V; ++v) m = (mx[v] > m || mx[v] != mx[v]) ? mx[v] : m;
    for (; j < n[k]; ++j) {
      S gv = gr[j], uv = ur[j], wv = wr[j], a = gv < 0 ? -gv : gv, gs = gv * scale, us = uv * scale;
      out[0] += gv * gv; out[1] += gs * gs; out[2] += gv != 0; out[3] += !(a <= big);
      out[4] += uv * uv; out[5] += us * us; out[6] += wv * wv;
      m = (a > m || a != a) ? a : m;
    }
    for (int t = 0; t < 7; ++t) sums[(t * R + r) * L + k] = out[t];
    gmax[r * L + k] = m;
  }
}

// Per run r and weight k (offset off[k], numel n[k] in a row of the (R, P) matrices g, u, w), the sums of
// g^2, (g * scale)^2, [g != 0], [g not finite], u^2, (u * scale)^2, w^2 into sums (7, R, L), and max |g| (NaN if
// any is) into gmax (R, L): the statistics' per-weight reductions in one pass over the three matrices.
template <typename S>
static void layer_sums(const S* g, const S* u, const S* w, const int64_t* off, const int64_t* n, S* sums, S* gmax,
                       S scale, int64_t R, int64_t P, int64_t L, int threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < R; ++r) layer_sums_row(g + r * P, u + r * P, w + r * P, off, n, sums, gmax, scale, r, R, L);
}

#define GS_EXPORT(SUF, S)                                                                                    \
  void gs_forward_##SUF(const S* x, int64_t xs, const S* W, int64_t ws, const S* b, int64_t bs, S* y, S* m, int64_t R,  \
                        int64_t B, int64_t I, int64_t O, int threads) {                                              \
    forward(x, xs, W, ws, b, bs, y, m, R, B, I, O, threads);                                                         \
  }                                                                                                                  \
  void gs_backward_##SUF(const S* dy, const S* x, int64_t xs, const S* W, int64_t ws, S* dx, S* dW, S* db, S* gsq,    \
                         double scale, int64_t R, int64_t B, int64_t I, int64_t O, int threads) {                    \
    backward(dy, x, xs, W, ws, dx, dW, db, gsq, (S)scale, R, B, I, O, threads);                                      \
  }                                                                                                                  \
  void gs_layer_sums_##SUF(const S* g, const S* u, const S* w, const int64_t* off, const int64_t* n, S* sums,         \
                           S* gmax, double scale, int64_t R, int64_t P, int64_t L, int threads) {                    \
    layer_sums(g, u, w, off, n, sums, gmax, (S)scale, R, P, L, threads);                                             \
  }

// Built once per dtype (GS_ONLY=32 or 64; gradsweep/kernels.py), each library on its first use: each instantiates
// only its own type, so the float32 one, the one most runs need, builds in about a third of the time of both.
extern "C" {
#if !defined(GS_ONLY) || GS_ONLY == 32
int gs_lanes() { return V; }
GS_EXPORT(f32, float)
#endif
#if !defined(GS_ONLY) || GS_ONLY == 64
GS_EXPORT(f64, double)
#endif
}
