// Bitmap sparse matmul for few rows: y[R, N] = x[R, K] W^T (+ b), W stored as a BitmapWeight
// (see sparse_rnnt/kernels/small_row/naive.py for the layout):
//   bits    int32 [N, ceil(K/32)]: bit j of word i of row n is W[n, 32 i + j] != pruned;
//   values  [nnz]: kept weights, row-major (row by row, columns ascending);
//   offsets int32 [N, ceil(K/T)]: index in `values` of the first kept weight of tile t of row n.
// Only offsets[n, 0] (the row start) is read here; the kernels find each kept weight's index
// with __popc while they walk the row, so the tile size T does not matter to them.
//
// Both kernels: one warp per output row, kWarps rows per block; lane l owns column 32 j + l of
// every word j, finds its value's index with __popc of the lower bits, and accumulates R_MAX
// fp32 partial sums in registers; a butterfly shuffle reduction sums the 32 lanes per row.
//
// bitmap_gemv_kernel (R <= 8): a call this small is bound by latency, so nothing may wait on a
// chain of loads. The warp reads 32 of its row's words in one coalesced load and turns their
// popcounts into value offsets with a warp prefix sum; after that every word's value and x loads
// are independent and, unrolled, in flight together. x is read from global memory (a few KB,
// cache-resident): no shared-memory staging and no block barrier.
//
// bitmap_spmm_kernel (8 < R <= 64): the block walks K in chunks of kChunk columns; x[:, chunk]
// is staged in shared memory once per block and reused by its kWarps rows. The next chunk's x
// and bit words are fetched into registers while the current one is used (see the kernel).
//
// Registered as torch.ops.sparse_rnnt_small_row.bitmap_linear (TORCH_LIBRARY, no pybind).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int kWarps = 4;     // output rows per block
constexpr int kChunk = 128;   // columns staged per step (4 words)
constexpr int kMaxRows = 64;  // rows of x per launch; the host loops over chunks of 64

constexpr int kGemvRows = 8;  // rows up to which bitmap_gemv_kernel is used
constexpr int kGemvGroup = 8;  // bit words whose loads bitmap_gemv_kernel issues together

template <typename scalar_t, int R_MAX>
__device__ __forceinline__ void reduce_and_store(float (&acc)[R_MAX], int lane, int64_t n, int64_t R,
                                                 const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                                 int64_t stride_yr) {
#pragma unroll
  for (int r = 0; r < R_MAX; ++r) {
    float s = acc[r];
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
    acc[r] = s;
  }
  if (lane == 0) {
    const float b = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
#pragma unroll
    for (int r = 0; r < R_MAX; ++r) {
      if (r < R) y[r * stride_yr + n] = static_cast<scalar_t>(acc[r] + b);
    }
  }
}

template <typename scalar_t, int R_MAX>
__global__ void __launch_bounds__(kWarps * 32) bitmap_gemv_kernel(
    const scalar_t* __restrict__ x, const int32_t* __restrict__ bits,
    const scalar_t* __restrict__ values, const int32_t* __restrict__ offsets,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
    int64_t R, int64_t N, int64_t K, int64_t n_words, int64_t n_tiles,
    int64_t stride_xr, int64_t stride_yr) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;  // n is the same for the whole warp: no shuffle loses a lane
  const uint32_t below = (1u << lane) - 1u;  // bits of lower columns in a word

  float acc[R_MAX];
#pragma unroll
  for (int r = 0; r < R_MAX; ++r) acc[r] = 0.f;
  int64_t base = static_cast<int64_t>(offsets[n * n_tiles]);

  for (int64_t w0 = 0; w0 < n_words; w0 += 32) {
    const int64_t wi = w0 + lane;
    const uint32_t mine = wi < n_words ? static_cast<uint32_t>(__ldg(bits + n * n_words + wi)) : 0u;
    // Inclusive prefix sum of the 32 words' popcounts over the lanes.
    const int count = __popc(mine);
    int incl = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += up;
    }
    const int excl = incl - count;
    // Words in groups of kGemvGroup: every value and x load of a group is issued (predicated,
    // no branch) before any of them is used, so a group waits for one memory latency. A branch
    // around each word's loads made every word wait for its own.
#pragma unroll 1
    for (int j0 = 0; j0 < 32; j0 += kGemvGroup) {
      float v[kGemvGroup];
      float xv[kGemvGroup][R_MAX];
#pragma unroll
      for (int jj = 0; jj < kGemvGroup; ++jj) {
        const int j = j0 + jj;
        const uint32_t word = __shfl_sync(0xffffffffu, mine, j);  // zero past n_words
        const int start = __shfl_sync(0xffffffffu, excl, j);
        const int64_t col = (w0 + j) * 32 + lane;
        const bool kept = ((word >> lane) & 1u) && col < K;
        v[jj] = kept ? static_cast<float>(values[base + start + __popc(word & below)]) : 0.f;
#pragma unroll
        for (int r = 0; r < R_MAX; ++r) {
          xv[jj][r] = (kept && r < R) ? static_cast<float>(x[r * stride_xr + col]) : 0.f;
        }
      }
#pragma unroll
      for (int jj = 0; jj < kGemvGroup; ++jj) {
#pragma unroll
        for (int r = 0; r < R_MAX; ++r) acc[r] = fmaf(v[jj], xv[jj][r], acc[r]);
      }
    }
    base += __shfl_sync(0xffffffffu, incl, 31);  // kept weights in these 32 words
  }
  reduce_and_store<scalar_t, R_MAX>(acc, lane, n, R, bias, y, stride_yr);
}

// What bitmap_spmm_kernel reads for one chunk ahead of using it: column threadIdx.x of every
// row of x (zero past R or K), and the warp's bit words of the chunk (zero past the row's words).
template <typename scalar_t, int R_MAX>
__device__ __forceinline__ void fetch_chunk(float (&xn)[R_MAX], uint32_t (&wn)[kChunk / 32], int64_t k0,
                                            const scalar_t* __restrict__ x, const int32_t* __restrict__ bits,
                                            int64_t n, bool row_ok, int64_t R, int64_t K, int64_t n_words,
                                            int64_t stride_xr) {
  const int64_t c = k0 + threadIdx.x;
#pragma unroll
  for (int r = 0; r < R_MAX; ++r) xn[r] = (r < R && c < K) ? static_cast<float>(x[r * stride_xr + c]) : 0.f;
#pragma unroll
  for (int j = 0; j < kChunk / 32; ++j) {
    const int64_t wi = k0 / 32 + j;
    wn[j] = (row_ok && wi < n_words) ? static_cast<uint32_t>(__ldg(bits + n * n_words + wi)) : 0u;
  }
}

template <typename scalar_t, int R_MAX>
__global__ void __launch_bounds__(kWarps * 32) bitmap_spmm_kernel(
    const scalar_t* __restrict__ x, const int32_t* __restrict__ bits,
    const scalar_t* __restrict__ values, const int32_t* __restrict__ offsets,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
    int64_t R, int64_t N, int64_t K, int64_t n_words, int64_t n_tiles,
    int64_t stride_xr, int64_t stride_yr) {
  static_assert(kWarps * 32 == kChunk, "each thread stages one column of a chunk");
  constexpr int kWords = kChunk / 32;
  __shared__ float xs[R_MAX][kChunk];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool row_ok = n < N;
  const uint32_t below = (1u << lane) - 1u;  // bits of lower columns in a word

  float acc[R_MAX];
#pragma unroll
  for (int r = 0; r < R_MAX; ++r) acc[r] = 0.f;
  int64_t off = row_ok ? static_cast<int64_t>(offsets[n * n_tiles]) : 0;

  // Software pipeline: the next chunk's x column and bit words are loaded into registers while
  // this chunk is used, all loads of a chunk independent of each other, so each chunk waits for
  // about one memory latency (its values) instead of one per load in a chain.
  float xn[R_MAX];
  uint32_t wn[kWords];
  fetch_chunk<scalar_t, R_MAX>(xn, wn, 0, x, bits, n, row_ok, R, K, n_words, stride_xr);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    __syncthreads();  // previous chunk fully consumed
#pragma unroll
    for (int r = 0; r < R_MAX; ++r) xs[r][threadIdx.x] = xn[r];
    uint32_t words[kWords];
#pragma unroll
    for (int j = 0; j < kWords; ++j) words[j] = wn[j];
    __syncthreads();
    if (k0 + kChunk < K) fetch_chunk<scalar_t, R_MAX>(xn, wn, k0 + kChunk, x, bits, n, row_ok, R, K, n_words, stride_xr);
    if (row_ok) {
      float v[kWords];
#pragma unroll
      for (int j = 0; j < kWords; ++j) {
        v[j] = ((words[j] >> lane) & 1u) ? static_cast<float>(values[off + __popc(words[j] & below)]) : 0.f;
        off += __popc(words[j]);
      }
#pragma unroll
      for (int j = 0; j < kWords; ++j) {
#pragma unroll
        for (int r = 0; r < R_MAX; ++r) acc[r] = fmaf(v[j], xs[r][j * 32 + lane], acc[r]);
      }
    }
  }
  if (!row_ok) return;
  reduce_and_store<scalar_t, R_MAX>(acc, lane, n, R, bias, y, stride_yr);
}

template <typename scalar_t, int R_MAX>
void launch(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& values,
            const at::Tensor& offsets, const scalar_t* bias, at::Tensor& y, int64_t R) {
  const int64_t N = bits.size(0);
  const int64_t K = x.size(1);
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto go = [&](auto kernel) {
    kernel<<<grid, kWarps * 32, 0, stream>>>(
        x.data_ptr<scalar_t>(), bits.data_ptr<int32_t>(), values.data_ptr<scalar_t>(),
        offsets.data_ptr<int32_t>(), bias, y.data_ptr<scalar_t>(), R, N, K, bits.size(1),
        offsets.size(1), x.stride(0), y.stride(0));
  };
  if constexpr (R_MAX <= kGemvRows) {
    go(bitmap_gemv_kernel<scalar_t, R_MAX>);
  } else {
    go(bitmap_spmm_kernel<scalar_t, R_MAX>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x [R, K] (R <= 64, unit column stride), bits int32 [N, W], values [nnz], offsets int32 [N, T],
// bias [N] or None -> y [R, N] in x's dtype.
at::Tensor bitmap_linear(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& values,
                         const at::Tensor& offsets, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && bits.is_cuda() && values.is_cuda() && offsets.is_cuda(),
              "bitmap_linear: all tensors must be on CUDA");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "bitmap_linear: x must be [R, K] with unit column stride");
  TORCH_CHECK(x.size(0) <= kMaxRows, "bitmap_linear: at most 64 rows per call");
  TORCH_CHECK(bits.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt,
              "bitmap_linear: bits and offsets must be int32");
  TORCH_CHECK(bits.is_contiguous() && values.is_contiguous() && offsets.is_contiguous(),
              "bitmap_linear: bits, values and offsets must be contiguous");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "bitmap_linear: values and x dtypes differ");
  TORCH_CHECK(bits.size(1) * 32 >= x.size(1), "bitmap_linear: bits narrower than K");
  TORCH_CHECK(offsets.size(0) == bits.size(0) && offsets.size(1) >= 1, "bitmap_linear: bad offsets shape");
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->is_contiguous() && bias->numel() == bits.size(0) &&
                bias->scalar_type() == x.scalar_type(), "bitmap_linear: bias must be [N], x's dtype");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = x.size(0);
  auto y = at::empty({R, bits.size(0)}, x.options());
  if (R == 0 || bits.size(0) == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bitmap_linear", [&] {
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    if (R <= 1) launch<scalar_t, 1>(x, bits, values, offsets, b, y, R);
    else if (R <= 2) launch<scalar_t, 2>(x, bits, values, offsets, b, y, R);
    else if (R <= 4) launch<scalar_t, 4>(x, bits, values, offsets, b, y, R);
    else if (R <= 8) launch<scalar_t, 8>(x, bits, values, offsets, b, y, R);
    else if (R <= 16) launch<scalar_t, 16>(x, bits, values, offsets, b, y, R);
    else if (R <= 32) launch<scalar_t, 32>(x, bits, values, offsets, b, y, R);
    else launch<scalar_t, 64>(x, bits, values, offsets, b, y, R);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(sparse_rnnt_small_row, m) {
  m.def("bitmap_linear(Tensor x, Tensor bits, Tensor values, Tensor offsets, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_rnnt_small_row, CUDA, m) {
  m.impl("bitmap_linear", &bitmap_linear);
}
