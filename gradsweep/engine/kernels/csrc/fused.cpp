// The MLP's whole forward pass, loss and backward pass for V runs at a time, in one call: engine=compiled on the CPU
// (gradsweep/fused.py). Compiled after stacked.cpp, as one translation unit, and built with it: it uses its vector
// types, gather/scatter and register-blocked passes.
//
// The step program run op by op goes through memory between every op: each Linear's output, the activation's, their
// gradients, ~20 kernel and elementwise calls over (R, B, w) tensors a few MiB each. Here each tile of V runs takes
// the batch in chunks of FC rows through every layer, the loss and back, with every intermediate in a buffer of a few
// tens of KiB; only the parameters (read once) and their gradients (written once) leave the tile. The statistics
// the forward and backward passes give (each layer output's norm, the activation's norm, saturated and dead units,
// each |dL/dh|) are summed in the same passes. Every lane runs the same operations whatever the tile holds, so a
// run's numbers do not depend on its neighbours (or on the group's size).
#include <cmath>

enum { A_SIGMOID, A_TANH, A_RELU, A_LEAKY_RELU, A_PRELU, A_ELU, A_GELU, A_SELU, A_IDENTITY };
enum { L_MSE, L_CROSS_ENTROPY, L_PROJECTION };
constexpr int64_t FC = 16;  // batch rows per chunk
constexpr double SELU_ALPHA = 1.6732632423543772848170429916717, SELU_SCALE = 1.0507009873554804934193349852946;
constexpr double LEAKY_SLOPE = 0.01;  // F.leaky_relu's default
constexpr double SAT_TOL = 1e-2;      // stats.SATURATION_TOL

// One unit's activation (the formulas of ATen's CPU kernels, which model.activate calls)
template <typename S>
static inline S act1(int act, S h) {
  switch (act) {
    case A_SIGMOID: return S(1) / (S(1) + std::exp(-h));
    case A_TANH: return std::tanh(h);
    case A_ELU: return h > 0 ? h : std::expm1(h);
    case A_SELU: return h > 0 ? S(SELU_SCALE) * h : S(SELU_SCALE * SELU_ALPHA) * std::expm1(h);
    case A_GELU: return h * S(0.5) * (S(1) + std::erf(h * S(M_SQRT1_2)));
    default: return h;
  }
}

// dL/dh from dL/dz = g, the activation's input h and output z (ATen's backward formulas)
template <typename S>
static inline S dact1(int act, S g, S h, S z) {
  switch (act) {
    case A_SIGMOID: return g * ((S(1) - z) * z);
    case A_TANH: return g * (S(1) - z * z);
    case A_ELU: return h <= 0 ? g * std::exp(h) : g;
    case A_SELU: return h <= 0 ? g * S(SELU_SCALE * SELU_ALPHA) * std::exp(h) : g * S(SELU_SCALE);
    case A_GELU: {
      S cdf = S(0.5) * (S(1) + std::erf(h * S(M_SQRT1_2)));
      S pdf = S(M_2_SQRTPI * M_SQRT1_2 * 0.5) * std::exp(S(-0.5) * h * h);
      return g * (cdf + h * pdf);
    }
    default: return g;
  }
}

// z = act(h) over n vectors; slope: PReLU's per-lane slope
template <typename S>
static void activate(int act, const S* h, S* z, int64_t n, vec<S> slope) {
  const vec<S> zero{};
  switch (act) {
    case A_RELU:  // relu(NaN) = NaN, as torch.relu
      for (int64_t j = 0; j < n; ++j) { vec<S> x = ld(h + j * V); st(z + j * V, x < zero ? zero : x); }
      return;
    case A_LEAKY_RELU:
      for (int64_t j = 0; j < n; ++j) { vec<S> x = ld(h + j * V); st(z + j * V, x > zero ? x : x * S(LEAKY_SLOPE)); }
      return;
    case A_PRELU:  // model.activate: clamp(x, min=0) + w * clamp(x, max=0)
      for (int64_t j = 0; j < n; ++j) {
        vec<S> x = ld(h + j * V);
        st(z + j * V, (x < zero ? zero : x) + slope * (x > zero ? zero : x));
      }
      return;
    case A_IDENTITY:
      std::memcpy(z, h, n * V * sizeof(S));
      return;
    default:
      for (int64_t j = 0; j < n * V; ++j) z[j] = act1(act, h[j]);
  }
}

// g (dL/dz on entry) becomes dL/dh in place; the PReLU slope's gradient is added to dslope
template <typename S>
static void backprop_act(int act, S* g, const S* h, const S* z, int64_t n, vec<S> slope, vec<S>& dslope) {
  const vec<S> zero{};
  switch (act) {
    case A_RELU:  // threshold_backward on the output: 0 where relu(h) <= 0
      for (int64_t j = 0; j < n; ++j) { vec<S> gv = ld(g + j * V); st(g + j * V, ld(z + j * V) <= zero ? zero : gv); }
      return;
    case A_LEAKY_RELU:
      for (int64_t j = 0; j < n; ++j) {
        vec<S> gv = ld(g + j * V);
        st(g + j * V, ld(h + j * V) > zero ? gv : gv * S(LEAKY_SLOPE));
      }
      return;
    case A_PRELU:  // clamp's backward passes the gradient where the bound holds (both at h = 0)
      for (int64_t j = 0; j < n; ++j) {
        vec<S> gv = ld(g + j * V), x = ld(h + j * V);
        dslope += gv * (x > zero ? zero : x);
        st(g + j * V, (x >= zero ? gv : zero) + (x <= zero ? slope * gv : zero));
      }
      return;
    case A_IDENTITY:
      return;
    default:
      for (int64_t j = 0; j < n * V; ++j) g[j] = dact1(act, g[j], h[j], z[j]);
  }
}

// Sums over n vectors in four chains (one waits on the FMA's latency: the statistics cost ~4x more)
template <typename S>
static inline vec<S> sum_sq(const S* p, int64_t n, S scale = S(1)) {
  vec<S> acc[4] = {};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int k = 0; k < 4; ++k) { vec<S> v = ld(p + (j + k) * V) * scale; acc[k] += v * v; }
  for (; j < n; ++j) { vec<S> v = ld(p + j * V) * scale; acc[0] += v * v; }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Per tile of V runs (L = depth + 1 Linear layers of sizes dims[0] -> dims[1] -> ... -> dims[L]; layer l's weight and
// bias at w_off[l] and b_off[l] of a parameter row, block i's PReLU slope at slope_off[i]):
//   x (R, B, dims[0]) at run stride xs; y (R, B, dims[L]) float targets at ys (mse, projection) or tgt (R, B) class
//   indices at ts (cross_entropy); flat (R, P) parameters -> grad (R, P) (entries no layer has: 0) and loss (R,).
//   Statistics, if hsq is not null: hsq (R, L) sum of h^2 per Linear output; zsq (R, L - 1) sum of z^2 per
//   activation; if not null (the caller asks for what the activation has), sat (R, L - 1) units within SAT_TOL of
//   sigmoid/tanh's bounds and pos (R, L - 1, W) per unit the sum over the batch of relu(h); gsq (R, L, 2) sums of (dL/dh)^2 and (dL/dh * scale)^2 per Linear output, the second
//   over the chunks whose sum of (dL/dh)^2 is below small2 (all of them where the whole sum is: where it is needed).
template <typename S>
static void mlp_step(const S* x, int64_t xs, const S* y, int64_t ys, const int64_t* tgt, int64_t ts, const S* flat,
                     int64_t P, S* grad, S* loss, int64_t L, const int64_t* dims, const int64_t* w_off,
                     const int64_t* b_off, const int64_t* slope_off, int act, int residual, int loss_kind, S scale,
                     S small2, S* hsq, S* zsq, S* sat, S* pos, S* gsq, int64_t R, int64_t B, int threads) {
  const int64_t D = L - 1, W = D ? dims[1] : 0, I0 = dims[0], O = dims[L];
  const bool stats = hsq != nullptr;
  int64_t width_sum = 0;
  for (int64_t l = 0; l <= L; ++l) width_sum += dims[l];
  const S sat_lo = S((act == A_TANH ? -1.0 : 0.0) + SAT_TOL), sat_hi = S(1.0 - SAT_TOL);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    // a[l]: layer l + 1's input (a[0] = x); h[l]: layer l's output (l >= 1); z[l]: block l's activation
    std::vector<S> pt(P * V), gt(P * V), abuf(FC * width_sum * V), hbuf(FC * width_sum * V), zbuf(FC * width_sum * V);
    std::vector<S> g0(FC * width_sum * V), g1(FC * width_sum * V), gskip(FC * width_sum * V), yt(FC * O * V);
    std::vector<S> acc((6 * (L + 1) + D * W + 2) * V);
    std::vector<S*> a(L + 1), h(L + 1), z(L + 1);
    std::vector<char> skip(L + 1, 0);
    int64_t pos_at = 0;
    for (int64_t l = 0; l <= L; ++l) {
      a[l] = abuf.data() + pos_at * FC * V, h[l] = hbuf.data() + pos_at * FC * V, z[l] = zbuf.data() + pos_at * FC * V;
      pos_at += dims[l];
      if (l >= 1 && l <= D) skip[l] = residual && dims[l - 1] == dims[l];
      if (l >= 1 && l <= D && !skip[l]) a[l] = z[l];  // without a skip the next layer's input is the activation itself
    }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t r0 = 0; r0 < R; r0 += V) {
      const int nv = (int)std::min<int64_t>(V, R - r0);
      gather(pt.data(), flat + r0 * P, P, P, nv);
      std::fill(gt.begin(), gt.end(), S(0));
      // per lane: sums of h^2, z^2, saturated units, (dL/dh)^2, (dL/dh * scale)^2, the PReLU slope's gradient (per
      // layer or block), relu(h) (per unit) and the loss; each chunk's sum added to them
      std::fill(acc.begin(), acc.end(), S(0));
      S *acc_h = acc.data(), *acc_z = acc_h + (L + 1) * V, *acc_sat = acc_z + (L + 1) * V, *acc_g = acc_sat + (L + 1) * V,
        *acc_gs = acc_g + (L + 1) * V, *dslope = acc_gs + (L + 1) * V, *acc_pos = dslope + (L + 1) * V,
        *acc_loss = acc_pos + (D * W + 1) * V;
      auto add = [](S* p, vec<S> v) { st(p, ld(p) + v); };
      auto slope = [&](int64_t l) { return slope_off ? ld(pt.data() + slope_off[l - 1] * V) : vec<S>{}; };
      for (int64_t b0 = 0; b0 < B; b0 += FC) {
        const int64_t bc = std::min(FC, B - b0);
        gather(a[0], x + r0 * xs + b0 * I0, xs, bc * I0, nv);
        // forward
        for (int64_t l = 1; l <= L; ++l) {
          const int64_t I = dims[l - 1], Ol = dims[l];
          fwd_passes<S>(Ol, (const S*)a[l - 1], (const S*)(pt.data() + w_off[l - 1] * V),
                        (const S*)(pt.data() + b_off[l - 1] * V), h[l], bc, I, Ol);
          if (stats) add(acc_h + l * V, sum_sq(h[l], bc * Ol));
          if (l == L) break;
          activate(act, h[l], z[l], bc * Ol, slope(l));
          if (stats) {
            add(acc_z + l * V, sum_sq(z[l], bc * Ol));
            if (sat) {
              vec<S> c{};
              for (int64_t j = 0; j < bc * Ol; ++j) {
                vec<S> v = ld(z[l] + j * V);
                c += (v < sat_lo) | (v > sat_hi) ? vec<S>{} + S(1) : vec<S>{};
              }
              add(acc_sat + l * V, c);
            }
            if (pos) {
              S* pos_l = acc_pos + (l - 1) * W * V;  // Ol independent chains, one per unit
              for (int64_t b = 0; b < bc; ++b)
                for (int64_t o = 0; o < Ol; ++o) {
                  vec<S> v = ld(h[l] + (b * Ol + o) * V);
                  add(pos_l + o * V, v <= vec<S>{} ? vec<S>{} : v);
                }
            }
          }
          if (skip[l])
            for (int64_t j = 0; j < bc * Ol; ++j) st(a[l] + j * V, ld(z[l] + j * V) + ld(a[l - 1] + j * V));
        }
        // loss and dL/df, into g0 (the per-run loss is a mean: over the batch, and over outputs for mse)
        S* gh = g0.data();
        S* gnext = g1.data();
        const S* f = h[L];
        vec<S> lsum{};
        if (loss_kind == L_CROSS_ENTROPY) {
          S part[V] = {};
          for (int64_t b = 0; b < bc; ++b)
            for (int v = 0; v < V; ++v) {
              S m = f[(b * O) * V + v];
              for (int64_t o = 1; o < O; ++o) m = std::max(m, f[(b * O + o) * V + v]);
              if (std::isnan(m)) m = S(0);  // NaN propagates through the sum below
              S se = 0;
              for (int64_t o = 0; o < O; ++o) se += std::exp(f[(b * O + o) * V + v] - m);
              S lse = m + std::log(se);
              int64_t t = v < nv ? tgt[(r0 + v) * ts + b0 + b] : 0;
              part[v] += lse - f[(b * O + t) * V + v];
              for (int64_t o = 0; o < O; ++o)
                gh[(b * O + o) * V + v] = (std::exp(f[(b * O + o) * V + v] - lse) - S(o == t)) / S(B);
            }
          lsum = ld(part);
        } else {
          gather(yt.data(), y + r0 * ys + b0 * O, ys, bc * O, nv);
          if (loss_kind == L_MSE) {
            const S k = S(2) / S(B * O);
            for (int64_t j = 0; j < bc * O; ++j) {
              vec<S> d = ld(f + j * V) - ld(yt.data() + j * V);
              lsum += d * d;
              st(gh + j * V, d * k);
            }
          } else {
            for (int64_t j = 0; j < bc * O; ++j) {
              vec<S> t = ld(yt.data() + j * V);
              lsum += ld(f + j * V) * t;
              st(gh + j * V, t / S(B));
            }
          }
        }
        add(acc_loss, lsum);
        // backward: on entering layer l, gh holds dL/da[l] (dL/df for the readout)
        for (int64_t l = L; l >= 1; --l) {
          const int64_t I = dims[l - 1], Ol = dims[l];
          const bool keep = l < L && l > 1 && skip[l];  // a[l] = z[l] + a[l - 1]: dL/da[l] also flows to a[l - 1]
          if (keep) std::memcpy(gskip.data(), gh, bc * Ol * V * sizeof(S));
          if (l < L) {
            vec<S> ds{};
            backprop_act(act, gh, h[l], z[l], bc * Ol, slope(l), ds);
            add(dslope + l * V, ds);
          }
          if (stats) {
            // The scaled sum is needed only where the plain one is below small^2 (stats.pick_norm), and then every
            // chunk's is: taken for the lanes whose chunk sum is (a lane's sums do not depend on the others').
            vec<S> s = sum_sq(gh, bc * Ol);
            add(acc_g + l * V, s);
            vec<S> tiny = s >= small2 ? vec<S>{} : vec<S>{} + S(1);  // NaN too: its norm is NaN, as safe_norm's
            bool any = false;
            for (int v = 0; v < V; ++v) any |= tiny[v] != S(0);
            if (any) add(acc_gs + l * V, tiny != vec<S>{} ? sum_sq(gh, bc * Ol, scale) : vec<S>{});
          }
          dw_passes<S>(I, (const S*)gh, (const S*)a[l - 1], gt.data() + w_off[l - 1] * V, gt.data() + b_off[l - 1] * V,
                       bc, I, Ol);
          if (l == 1) break;
          dx_passes<S>(I, (const S*)gh, (const S*)(pt.data() + w_off[l - 1] * V), gnext, bc, I, Ol);  // dL/da[l - 1]
          if (keep)
            for (int64_t j = 0; j < bc * I; ++j) st(gnext + j * V, ld(gnext + j * V) + ld(gskip.data() + j * V));
          std::swap(gh, gnext);
        }
      }
      for (int64_t l = 1; l <= D; ++l)
        if (slope_off) st(gt.data() + slope_off[l - 1] * V, ld(gt.data() + slope_off[l - 1] * V) + ld(dslope + l * V));
      scatter(grad + r0 * P, gt.data(), P, P, nv);
      const S n_loss = loss_kind == L_MSE ? S(B * O) : S(B);
      for (int v = 0; v < nv; ++v) loss[r0 + v] = acc_loss[v] / n_loss;
      if (!stats) continue;
      for (int v = 0; v < nv; ++v) {
        const int64_t r = r0 + v;
        for (int64_t l = 1; l <= L; ++l) {
          hsq[r * L + l - 1] = acc_h[l * V + v];
          gsq[(r * L + l - 1) * 2] = acc_g[l * V + v];
          gsq[(r * L + l - 1) * 2 + 1] = acc_gs[l * V + v];
        }
        for (int64_t l = 1; l <= D; ++l) {
          zsq[r * D + l - 1] = acc_z[l * V + v];
          if (sat) sat[r * D + l - 1] = acc_sat[l * V + v];
          if (pos)
            for (int64_t o = 0; o < W; ++o) pos[(r * D + l - 1) * W + o] = acc_pos[((l - 1) * W + o) * V + v];
        }
      }
    }
  }
}

#define GS_FUSED_EXPORT(SUF, S)                                                                                       \
  void gs_mlp_step_##SUF(const S* x, int64_t xs, const S* y, int64_t ys, const int64_t* tgt, int64_t ts,              \
                         const S* flat, int64_t P, S* grad, S* loss, int64_t L, const int64_t* dims,                 \
                         const int64_t* w_off, const int64_t* b_off, const int64_t* slope_off, int act, int residual, \
                         int loss_kind, double scale, double small2, S* hsq, S* zsq, S* sat, S* pos, S* gsq, int64_t R, \
                         int64_t B, int threads) {                                                                    \
    mlp_step(x, xs, y, ys, tgt, ts, flat, P, grad, loss, L, dims, w_off, b_off, slope_off, act, residual, loss_kind,  \
             (S)scale, (S)small2, hsq, zsq, sat, pos, gsq, R, B, threads);                                          \
  }

extern "C" {
#if !defined(GS_ONLY) || GS_ONLY == 32
GS_FUSED_EXPORT(f32, float)
#endif
#if !defined(GS_ONLY) || GS_ONLY == 64
GS_FUSED_EXPORT(f64, double)
#endif
}

// The update after the fused pass, one run per iteration, in passes over its row that stay in cache (a row is a few
// KiB): the gradient's norm, the divergence bookkeeping, clipping, SGD (momentum, weight decay) or Adam (weight
// decay), the statistics' per-weight sums (layer_sums_row), then the parameters; the formulas of gradsweep/optim.py
// (optim.screen, clip, sgd_update, adam_update), which the other paths run as tensor ops. Per run: alive (in/out),
// diverged and reason (in/out; train.DIVERGED_REASONS), the hyperparameters lr, wd, momentum, beta1, beta2, eps,
// max_norm; state buf (SGD with momentum, else null) or m and v (Adam), updated in place where the run stays alive;
// total (the gradient's norm before clipping) and clipped (1 where clipping acted) out. sums (7, R, L) and gmax (R, L)
// as layer_sums, if not null. flat is updated in place.
constexpr double CLIP_EPS = 1e-6;  // optim.CLIP_EPS

template <typename S>
static void mlp_update(S* flat, const S* grad, const S* loss, bool* alive, int64_t* diverged, int64_t* reason,
                       int64_t step, int adam, int use_wd, S* buf, S* m, S* v, const S* lr, const S* wd, const S* mom,
                       const S* beta1, const S* beta2, const S* eps, const S* max_norm, S* total, S* clipped,
                       const int64_t* off, const int64_t* n, int64_t L, S* sums, S* gmax, S scale, int64_t R, int64_t P,
                       int threads) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<S> ubuf(P);
    S* u = ubuf.data();
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < R; ++r) {
      S* w = flat + r * P;
      const S* g = grad + r * P;
      vec<S> acc{};
      int64_t j = 0;
      for (; j + V <= P; j += V) { vec<S> x = ld(g + j); acc += x * x; }
      S sq = 0;
      for (int k = 0; k < V; ++k) sq += acc[k];
      for (; j < P; ++j) sq += g[j] * g[j];
      const S norm = std::sqrt(sq);
      const bool ok = std::isfinite(loss[r]) && std::isfinite(norm);
      if (alive[r] && !ok) {
        diverged[r] = step;
        reason[r] = std::isfinite(loss[r]) ? 2 : 1;
      }
      const bool keep = alive[r] && ok;
      alive[r] = keep;
      S coef = max_norm[r] / (norm + S(CLIP_EPS));
      coef = coef > S(1) ? S(1) : coef;  // clamp(max=1): NaN stays NaN
      total[r] = norm;
      clipped[r] = coef < S(1) ? S(1) : S(0);
      if (!keep) {
        std::fill(u, u + P, S(0));
      } else if (!adam) {
        const S neg_lr = -lr[r], d = wd[r], mu = buf ? mom[r] : S(0);
        S* b = buf ? buf + r * P : nullptr;
        for (int64_t i = 0; i < P; ++i) {
          S x = g[i] * coef;
          if (use_wd) x = x + d * w[i];
          if (b) { x = b[i] * mu + x; b[i] = x; }
          u[i] = neg_lr * x;
        }
      } else {
        const S b1 = beta1[r], b2 = beta2[r], e = eps[r], d = wd[r], weight = S(1) - b1, c2 = S(1) - b2;
        const S bc1 = S(1) - std::pow(b1, S(step + 1)), bc2_sqrt = std::sqrt(S(1) - std::pow(b2, S(step + 1)));
        const S step_size = -(lr[r] / bc1);
        S *mr = m + r * P, *vr = v + r * P;
        for (int64_t i = 0; i < P; ++i) {
          S x = g[i] * coef;
          if (use_wd) x = x + d * w[i];
          // torch.lerp(m, x, weight)
          S mi = weight < S(0.5) ? mr[i] + weight * (x - mr[i]) : x - (x - mr[i]) * (S(1) - weight);
          S vi = vr[i] * b2 + c2 * x * x;
          mr[i] = mi;
          vr[i] = vi;
          u[i] = step_size * (mi / (std::sqrt(vi) / bc2_sqrt + e));
        }
      }
      if (sums) layer_sums_row(g, (const S*)u, (const S*)w, off, n, sums, gmax, scale, r, R, L);
      for (int64_t i = 0; i < P; ++i) w[i] = w[i] + u[i];
    }
  }
}

#define GS_UPDATE_EXPORT(SUF, S)                                                                                      \
  void gs_mlp_update_##SUF(S* flat, const S* grad, const S* loss, bool* alive, int64_t* diverged, int64_t* reason,    \
                           int64_t step, int adam, int use_wd, S* buf, S* m, S* v, const S* lr, const S* wd,         \
                           const S* mom, const S* beta1, const S* beta2, const S* eps, const S* max_norm, S* total,  \
                           S* clipped, const int64_t* off, const int64_t* n, int64_t L, S* sums, S* gmax,             \
                           double scale, int64_t R, int64_t P, int threads) {                                         \
    mlp_update(flat, grad, loss, alive, diverged, reason, step, adam, use_wd, buf, m, v, lr, wd, mom, beta1, beta2,   \
               eps, max_norm, total, clipped, off, n, L, sums, gmax, (S)scale, R, P, threads);                        \
  }

extern "C" {
#if !defined(GS_ONLY) || GS_ONLY == 32
GS_UPDATE_EXPORT(f32, float)
#endif
#if !defined(GS_ONLY) || GS_ONLY == 64
GS_UPDATE_EXPORT(f64, double)
#endif
}
