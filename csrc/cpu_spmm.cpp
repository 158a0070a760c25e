// Small-row sparse matmul on the CPU: y [R, N] = x [R, K] Wᵀ + b, W [N, K] unstructured sparse.
//
// W is held as its kept values in row-major order (row 0 by increasing column, then row 1, ...),
// one uint16 column index per kept value (stored as int16), and offsets int32 [N, T]: offsets[n, t]
// is the index of row n's first kept value at a column >= t * tile (the bitmap format's offsets,
// kernels/small_row/naive.py BitmapWeight). Values are float32, bfloat16 or float16, x has the
// values' dtype, and every product accumulates in float32.
//
// Three loops, chosen by the number of rows R (a streaming step has a handful):
//   R <= 2   each output row n is a dot product: 16 kept values at a time against 16 entries of x
//            gathered by column (AVX-512; without it the next loop runs).
//   R <= 32  x is transposed to xt [K, W] (W = R rounded up to 16 lanes) and each kept value
//            w[n, k] adds w * xt[k, :] to row n's accumulators: one broadcast, one load and one
//            FMA per kept value and 16 lanes, with independent accumulators to hide FMA latency.
//            Sums are blocked by 512 columns: a partial per block, added to the row's total with
//            Kahan compensation, so rounding does not grow with K.
//   R > 32   the same in tiles of 64 lanes, with K walked in the weight's column tiles so that
//            the part of xt in use (tile x 64 floats, 32 KB at tile 128) stays in L1 while a
//            block of 32 output rows sweeps it; the rows' accumulators live in memory between tiles.
// Built with -march=native by torch.utils.cpp_extension on first use (kernels/small_row/cpu.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

// total += part, compensated (Kahan): the running totals over column tiles keep the accuracy of
// the per-tile partial sums whatever K is. Needs IEEE evaluation order (no -ffast-math).
inline void kahan_add(v16& total, v16& comp, v16 part) {
  const v16 y = part - comp;
  const v16 t = total + y;
  comp = (t - total) - y;
  total = t;
}

constexpr int64_t kGatherMaxRows = 2;
constexpr int64_t kBlockCols = 512;  // columns per partial sum of the R <= 32 loop
constexpr int64_t kSmallMaxRows = 32;
constexpr int64_t kLanes = 64;     // x rows per tile of the large-R loop
constexpr int64_t kRowBlock = 32;  // output rows that sweep one column tile together

// End (exclusive) of row n's kept values in column tile c, or of the whole row (c == T).
inline int64_t tile_end(const int32_t* offs, int64_t T, int64_t N, int64_t nnz, int64_t n, int64_t c) {
  if (c + 1 < T) return offs[n * T + c + 1];
  return n + 1 < N ? offs[(n + 1) * T] : nnz;
}

#if defined(__AVX512F__)
inline __m512 load_vals16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_vals16(const c10::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load_vals16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// R <= 2: dot products of row n's kept values with x rows gathered by column.
template <typename V, int R>
void gather_rows(const float* x, int64_t K, const int32_t* offs, int64_t T, int64_t N, int64_t nnz,
                 const uint16_t* cols, const V* vals, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t j = offs[n * T];
    const int64_t end = tile_end(offs, T, N, nnz, n, T - 1);
    for (; j + 32 <= end; j += 32) {
      const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + j)));
      const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + j + 16)));
      const __m512 v0 = load_vals16(vals + j), v1 = load_vals16(vals + j + 16);
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm512_fmadd_ps(v0, _mm512_i32gather_ps(i0, x + r * K, 4), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(v1, _mm512_i32gather_ps(i1, x + r * K, 4), acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
      for (int64_t t = j; t < end; ++t) s += to_f32(vals[t]) * x[r * K + cols[t]];
      y[r * N + n] = s;
    }
  }
}
#endif

// R <= 32: xt [K, 16 NT]; U kept values at a time into independent accumulators, summed per
// block of `group` column tiles into the row's total (Kahan).
template <typename V, int NT, int U>
void small_rows(const float* xt, const int32_t* offs, int64_t T, int64_t group, int64_t N, int64_t nnz,
                const uint16_t* cols, const V* vals, float* yt, int64_t n0, int64_t n1) {
  constexpr int64_t W = 16 * NT;
  for (int64_t n = n0; n < n1; ++n) {
    v16 total[NT], comp[NT];
    for (int t = 0; t < NT; ++t) total[t] = comp[t] = v16{};
    for (int64_t c = 0; c < T; c += group) {
      int64_t j = offs[n * T + c];
      const int64_t end = tile_end(offs, T, N, nnz, n, std::min(T, c + group) - 1);
      if (j == end) continue;
      v16 acc[U][NT];
      for (int u = 0; u < U; ++u)
        for (int t = 0; t < NT; ++t) acc[u][t] = v16{};
      for (; j + U <= end; j += U) {
        for (int u = 0; u < U; ++u) {
          const float* xr = xt + static_cast<int64_t>(cols[j + u]) * W;
          const float s = to_f32(vals[j + u]);
          for (int t = 0; t < NT; ++t) acc[u][t] += s * load16(xr + 16 * t);
        }
      }
      for (; j < end; ++j) {
        const float* xr = xt + static_cast<int64_t>(cols[j]) * W;
        const float s = to_f32(vals[j]);
        for (int t = 0; t < NT; ++t) acc[0][t] += s * load16(xr + 16 * t);
      }
      for (int u = 1; u < U; ++u)
        for (int t = 0; t < NT; ++t) acc[0][t] += acc[u][t];
      for (int t = 0; t < NT; ++t) kahan_add(total[t], comp[t], acc[0][t]);
    }
    for (int t = 0; t < NT; ++t) store16(yt + n * W + 16 * t, total[t]);
  }
}

// R > 32: rows [n0, n1) of one 16 NT-lane tile, kept values of column tile c only; yt holds the
// sum of the tiles before c and ct its Kahan compensation (both overwritten when c == 0).
template <typename V, int NT>
void tile_rows(const float* xt, const int32_t* offs, int64_t T, int64_t N, int64_t nnz,
               const uint16_t* cols, const V* vals, float* yt, float* ct, int64_t n0, int64_t n1, int64_t c) {
  constexpr int64_t W = 16 * NT;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t j = offs[n * T + c];
    const int64_t end = tile_end(offs, T, N, nnz, n, c);
    v16 a[NT], b[NT];
    for (int t = 0; t < NT; ++t) a[t] = b[t] = v16{};
    for (; j + 2 <= end; j += 2) {
      const float* x0 = xt + static_cast<int64_t>(cols[j]) * W;
      const float* x1 = xt + static_cast<int64_t>(cols[j + 1]) * W;
      const float s0 = to_f32(vals[j]), s1 = to_f32(vals[j + 1]);
      for (int t = 0; t < NT; ++t) {
        a[t] += s0 * load16(x0 + 16 * t);
        b[t] += s1 * load16(x1 + 16 * t);
      }
    }
    if (j < end) {
      const float* x0 = xt + static_cast<int64_t>(cols[j]) * W;
      const float s0 = to_f32(vals[j]);
      for (int t = 0; t < NT; ++t) a[t] += s0 * load16(x0 + 16 * t);
    }
    // This tile's partial sum into the running total and its compensation (as above).
    for (int t = 0; t < NT; ++t) {
      float* yp = yt + n * W + 16 * t;
      float* cp = ct + n * W + 16 * t;
      if (c == 0) {
        store16(yp, a[t] + b[t]);
        store16(cp, v16{});
      } else {
        v16 total = load16(yp), comp = load16(cp);
        kahan_add(total, comp, a[t] + b[t]);
        store16(yp, total);
        store16(cp, comp);
      }
    }
  }
}

template <typename V, int NT>
void small_dispatch(const float* xt, const int32_t* offs, int64_t T, int64_t group, int64_t N, int64_t nnz,
                    const uint16_t* cols, const V* vals, float* yt, int64_t n0, int64_t n1) {
  if constexpr (NT == 1) small_rows<V, 1, 4>(xt, offs, T, group, N, nnz, cols, vals, yt, n0, n1);
  else small_rows<V, 2, 2>(xt, offs, T, group, N, nnz, cols, vals, yt, n0, n1);
}

template <typename V>
void tile_dispatch(int64_t nt, const float* xt, const int32_t* offs, int64_t T, int64_t N, int64_t nnz,
                   const uint16_t* cols, const V* vals, float* yt, float* ct, int64_t n0, int64_t n1, int64_t c) {
  switch (nt) {
    case 1: tile_rows<V, 1>(xt, offs, T, N, nnz, cols, vals, yt, ct, n0, n1, c); break;
    case 2: tile_rows<V, 2>(xt, offs, T, N, nnz, cols, vals, yt, ct, n0, n1, c); break;
    case 3: tile_rows<V, 3>(xt, offs, T, N, nnz, cols, vals, yt, ct, n0, n1, c); break;
    default: tile_rows<V, 4>(xt, offs, T, N, nnz, cols, vals, yt, ct, n0, n1, c); break;
  }
}

// x [R, K] float32 -> xt holding, for each tile of `lanes` rows, x[tile]ᵀ as [K, width] (width:
// the tile's rows rounded up to 16; padding lanes are zero).
at::Tensor transpose_tiles(const at::Tensor& x, int64_t lanes, int64_t tiles) {
  const int64_t R = x.size(0), K = x.size(1);
  auto xt = at::zeros({tiles * K * lanes}, x.options());
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = std::min(lanes, R - t * lanes), width = (rows + 15) / 16 * 16;
    xt.narrow(0, t * K * lanes, K * width).view({K, width}).narrow(1, 0, rows).copy_(x.narrow(0, t * lanes, rows).t());
  }
  return xt;
}

template <typename V>
at::Tensor run(const at::Tensor& xf, const at::Tensor& offsets, const at::Tensor& cols, const at::Tensor& values,
               int64_t tile) {
  const int64_t R = xf.size(0), K = xf.size(1), N = offsets.size(0), T = offsets.size(1), nnz = values.numel();
  const int32_t* offs = offsets.data_ptr<int32_t>();
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>());
  const V* vp = values.data_ptr<V>();
  auto y = at::empty({R, N}, xf.options());
#if defined(__AVX512F__)
  if (R <= kGatherMaxRows) {
    const float* xp = xf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      if (R == 1) gather_rows<V, 1>(xp, K, offs, T, N, nnz, cp, vp, yp, n0, n1);
      else gather_rows<V, 2>(xp, K, offs, T, N, nnz, cp, vp, yp, n0, n1);
    });
    return y;
  }
#endif
  if (R <= kSmallMaxRows) {
    const int64_t width = (R + 15) / 16 * 16;
    const int64_t group = std::max<int64_t>(1, kBlockCols / tile);  // column tiles per partial sum
    auto xt = transpose_tiles(xf, width, 1);
    auto yt = at::empty({N, width}, xf.options());
    const float* xp = xt.data_ptr<float>();
    float* yp = yt.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      if (width == 16) small_dispatch<V, 1>(xp, offs, T, group, N, nnz, cp, vp, yp, n0, n1);
      else small_dispatch<V, 2>(xp, offs, T, group, N, nnz, cp, vp, yp, n0, n1);
    });
    y.copy_(yt.narrow(1, 0, R).t());
    return y;
  }
  const int64_t tiles = (R + kLanes - 1) / kLanes;
  auto xt = transpose_tiles(xf, kLanes, tiles);
  auto yt = at::empty({tiles * N * kLanes}, xf.options());
  auto comp = at::empty({tiles * N * kLanes}, xf.options());  // Kahan compensation of yt
  const float* xp = xt.data_ptr<float>();
  float* yp = yt.data_ptr<float>();
  float* cp2 = comp.data_ptr<float>();
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kRowBlock, n1 = std::min(N, n0 + kRowBlock);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t rows = std::min(kLanes, R - t * kLanes), width = (rows + 15) / 16 * 16;
        for (int64_t c = 0; c < T; ++c)
          tile_dispatch<V>(width / 16, xp + t * K * kLanes, offs, T, N, nnz, cp, vp, yp + t * N * kLanes,
                           cp2 + t * N * kLanes, n0, n1, c);
      }
    }
  });
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = std::min(kLanes, R - t * kLanes), width = (rows + 15) / 16 * 16;
    y.narrow(0, t * kLanes, rows).copy_(yt.narrow(0, t * N * kLanes, N * width).view({N, width}).narrow(1, 0, rows).t());
  }
  return y;
}

// The weight is trusted to be consistent (every column < k, offsets non-decreasing and within
// values): CpuSparseWeight derives cols and offsets from one bitmap. Shapes are checked here.
at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& cols,
                         const at::Tensor& values, int64_t k, int64_t tile, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && offsets.device().is_cpu() && cols.device().is_cpu() && values.device().is_cpu(),
              "sparse_linear: every tensor must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "sparse_linear: x must be [R, K], got ", x.dim(), " dimensions");
  TORCH_CHECK(offsets.dim() == 2 && offsets.scalar_type() == at::kInt, "sparse_linear: offsets must be int32 [N, T]");
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kShort, "sparse_linear: cols must be int16 [nnz]");
  TORCH_CHECK(values.dim() == 1 && values.numel() == cols.numel(), "sparse_linear: values must be [nnz] like cols");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "sparse_linear: x is ", x.scalar_type(),
              " but the weight is ", values.scalar_type());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "sparse_linear: dtype must be float32, bfloat16 or float16, got ", dt);
  const int64_t R = x.size(0), K = x.size(1), N = offsets.size(0);
  TORCH_CHECK(K == k, "sparse_linear: x has ", K, " columns, the weight ", k);
  TORCH_CHECK(K <= 65536, "sparse_linear: K = ", K, " > 65536 (uint16 column indices)");
  TORCH_CHECK(tile > 0 && offsets.size(1) == (K + tile - 1) / tile,
              "sparse_linear: offsets has ", offsets.size(1), " tiles, K = ", K, " at tile ", tile,
              " needs ", tile > 0 ? (K + tile - 1) / tile : -1);
  TORCH_CHECK(values.numel() < (int64_t{1} << 31), "sparse_linear: more than 2^31 - 1 kept values");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "sparse_linear: bias must be [N] = [", N, "]");
  }
  at::Tensor y;
  if (R == 0 || N == 0 || K == 0 || values.numel() == 0) {
    y = at::zeros({R, N}, x.options().dtype(at::kFloat));
  } else {
    const auto xf = x.to(at::kFloat).contiguous();
    const auto off = offsets.contiguous();
    const auto cc = cols.contiguous();
    const auto vv = values.contiguous();
    switch (dt) {
      case at::kFloat: y = run<float>(xf, off, cc, vv, tile); break;
      case at::kBFloat16: y = run<c10::BFloat16>(xf, off, cc, vv, tile); break;
      default: y = run<c10::Half>(xf, off, cc, vv, tile); break;
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(dt);
}

}  // namespace

TORCH_LIBRARY(sparse_rnnt_cpu, m) {
  m.def("sparse_linear(Tensor x, Tensor offsets, Tensor cols, Tensor values, int k, int tile, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_rnnt_cpu, CPU, m) { m.impl("sparse_linear", &sparse_linear); }
