// calibration_bins on CUDA: one streaming pass over (M, N, C) logits (float32 / float16 / bfloat16).
// Semantics: calibration_bins.h (mirrors calibration_bins.cpp). Row math: calibration_bins_row.cuh.
//
// Design
// * Work split. Blocks of 256 threads (8 warps). The M*N rows, flattened in (model, sample) order, are cut into
//   gridDim.x equal contiguous ranges, one per block; the grid is persistent (SM count x resident blocks per
//   SM, fewer for small inputs), so a block walks many rows before it writes anything global. A block range is
//   processed as segments, one per model it overlaps (usually one or two), so a block's bin accumulators
//   never mix models.
// * Rows per warp. A row is handled by a lane group of G = 4, 8, 16 or 32 lanes (32 / G rows per warp at a
//   time): the smallest G whose lanes cover the row in at most two chunks of U = 4 vectors (or 8 scalars)
//   each, else 32. For C = 1000 bf16 (125 vectors of 16 bytes): G = 16, two rows per warp, two chunks of
//   4 loads per lane per row.
// * Loads. Stride 1 along C: 16-byte loads (ld.global.nc.L1::no_allocate.L2::256B) of 8 bf16/fp16 or 4 fp32,
//   the U = 4 loads of a chunk issued before any is used; the head (up to the first 16-byte boundary of the
//   row) and the tail (less than one vector) are loaded element by element, so any row base and any C are read
//   in bounds and every vector load is 16-byte aligned. Other strides: scalar __ldg loads, 8 per lane per
//   chunk. Labels: one load per row (same address for the whole group), any strides, int64 or int32.
// * Row reduction. Each lane keeps an online state (max, first argmax, rest = sum e, rest2 = sum e^2 over the
//   elements other than the argmax, e = exp(x - max), one exp per element; s = 1 + rest at the end, so the
//   argmax's exact 1 never rounds away the small terms of a near-saturated row), updated branch-free once per
//   16-byte vector (one extra exp for the rescale, exactly 1 when the max does not grow; the argmax is dropped
//   from the sums by one compare + select per element); the G states are merged with __shfl_xor_sync in log2(G)
//   steps (max, then lowest index on ties, so the argmax is the first one whatever the split). The label's
//   logit is captured by the lane that loads it and fetched with one ballot + shuffle; NaN/inf is detected with
//   a NaN-propagating max of |x| and one ballot.
// * Accumulation. The group leader (lane 0 of the group) finalises the row (conf, nll, brier, bin, correct),
//   writes the optional per-sample outputs, adds nll/brier to registers (float64) and keeps a run-length cache
//   of the current bin (count, correct, sum of conf) that it pushes when the bin changes: with concentrated
//   confidences almost no atomics are issued. Pushes go to shared-memory bins of the block (u32 counts,
//   f64 conf sums; (n_bins + 1) * 16 bytes of dynamic shared memory, 64 KiB at n_bins = 4096). At the end of a
//   segment the block syncs and flushes the non-zero bins with one global atomicAdd each (u64 for counts,
//   f64 for sums), then zeroes them; nll/brier/non-finite sums are reduced per warp and added with one atomic
//   per warp. Segments shorter than n_bins + 1 rows (many small models) push straight to global memory.
// * Rows with NaN/inf (or a label outside [0, C), which the Python side rejects beforehand) only increment
//   nonfinite[m]; nothing else is written for them, as in the CPU code.
// * Resources (ptxas 13.0, sm_80 / sm_90): 76-80 registers and no spills (one exception: the fp32, G = 32,
//   contiguous kernel, 64 registers with a 4-byte spill), so at least 3 blocks (24 warps) per SM; with
//   64 bytes of loads in flight per lane that is ~48 KB in flight per SM.
// Limits
// * float64 logits are not handled here (the Python side routes them to the CPU/torch backends); n_bins is at
//   most 4096 (shared memory); C must be below 2^30 (class indices are 32-bit inside a row); a block handles
//   at most 2^30 rows (u32 shared counters), which the grid size guarantees.
// * Float sums are accumulated with atomics, so bin_conf / sums can differ in the last bits between runs;
//   counts are exact and deterministic. exp is ex2.approx.ftz(x * log2 e), the __expf algorithm (see
//   calibration_bins_row.cuh), not expf: results match the CPU kernel to float32 rounding, not bit for bit, and
//   a confidence that falls exactly on a bin edge may land in the neighbouring bin.
// * The strided path (stride along C != 1, e.g. a transposed (M, C, N) view) is correct but not bandwidth
//   optimal: the lanes of a group read elements `stride` apart.
// * The launch is asynchronous on the given stream; errors of the launch itself are reported, errors during
//   execution surface at the next synchronising call.
// * Performance is by design only; it has not been measured here (written on a machine without a GPU).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "calibration_bins.h"
#include "calibration_bins_row.cuh"

namespace vlmfast {
namespace {

using cb::LaneAcc;
using cb::RowOut;
using cb::RowState;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecPerChunk = 4;     // 16-byte vectors per lane per chunk (contiguous path)
constexpr int kElemPerChunk = 8;    // scalar loads per lane per chunk (strided path)
constexpr int64_t kMaxRowsPerBlock = int64_t{1} << 30;
constexpr int kMaxBins = 4096;
constexpr unsigned kFull = 0xffffffffu;

struct Params {
  const void* x;      // logits base
  int64_t xs0, xs1, xs2;
  const void* labels;
  int64_t ls0, ls1;
  bool labels64;
  int64_t M, N;
  int C;
  int n_bins;
  unsigned long long* bin_count;    // (M, n_bins + 1)
  unsigned long long* bin_correct;  // (M, n_bins + 1)
  double* bin_conf;                 // (M, n_bins + 1)
  double* sums;                     // (M, 2)
  unsigned long long* nonfinite;    // (M,)
  float* sample_conf;               // (M, N) or null
  uint8_t* sample_correct;          // (M, N) or null
};

__device__ __forceinline__ int64_t load_label(const Params& p, int64_t m, int64_t n) {
  const int64_t off = m * p.ls0 + n * p.ls1;
  if (p.labels64) return static_cast<int64_t>(__ldg(static_cast<const long long*>(p.labels) + off));
  return static_cast<int64_t>(__ldg(static_cast<const int*>(p.labels) + off));
}

// Pushes one run of rows that fell into bin b of model m: into the block's shared bins, or straight to global.
__device__ __forceinline__ void push_run(const Params& p, bool direct, int64_t m, int b, unsigned cnt, unsigned corr,
                                         double conf, unsigned* s_count, unsigned* s_correct, double* s_conf) {
  if (direct) {
    const int64_t slot = m * (p.n_bins + 1) + b;
    atomicAdd(p.bin_count + slot, static_cast<unsigned long long>(cnt));
    if (corr) atomicAdd(p.bin_correct + slot, static_cast<unsigned long long>(corr));
    atomicAdd(p.bin_conf + slot, conf);
  } else {
    atomicAdd(s_count + b, cnt);
    if (corr) atomicAdd(s_correct + b, corr);
    atomicAdd(s_conf + b, conf);
  }
}

template <class Tag, int G, bool kContiguous>
__global__ void __launch_bounds__(kThreads) calibration_bins_kernel(const Params p) {
  static_assert(G == 4 || G == 8 || G == 16 || G == 32, "lane group size");
  using raw_t = typename Tag::raw_t;
  constexpr int kRowsPerWarp = 32 / G;
  constexpr int kSlots = kWarps * kRowsPerWarp;  // rows a block has in flight

  // Dynamic shared memory: f64 conf sums first (8-byte aligned), then u32 counts and u32 correct counts.
  extern __shared__ double smem[];
  const int nb1 = p.n_bins + 1;
  double* s_conf = smem;
  unsigned* s_count = reinterpret_cast<unsigned*>(s_conf + nb1);
  unsigned* s_correct = s_count + nb1;
  for (int i = threadIdx.x; i < nb1; i += kThreads) {
    s_conf[i] = 0.0;
    s_count[i] = 0u;
    s_correct[i] = 0u;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int group = lane / G;
  const int gl = lane % G;  // lane within the group; gl == 0 is the group leader
  const unsigned gmask = (G == 32) ? kFull : (((1u << G) - 1u) << (group * G));
  const raw_t* x = static_cast<const raw_t*>(p.x);

  int64_t r0, r1;
  cb::block_rows(blockIdx.x, gridDim.x, p.M * p.N, &r0, &r1);

  for (int64_t seg0 = r0; seg0 < r1;) {  // block-uniform loop over the models this block touches
    const int64_t m = seg0 / p.N;
    const int64_t seg1 = (m + 1) * p.N < r1 ? (m + 1) * p.N : r1;
    const bool direct = (seg1 - seg0) < nb1;  // short segment: a shared-memory flush would cost more
    const raw_t* xm = x + m * p.xs0;

    double nll_sum = 0.0, brier_sum = 0.0;  // group leaders only
    unsigned bad_rows = 0u;
    int run_bin = -1;
    unsigned run_cnt = 0u, run_corr = 0u;
    double run_conf = 0.0;

    for (int64_t base = seg0 + warp * kRowsPerWarp; base < seg1; base += kSlots) {  // warp-uniform
      const int64_t row = base + group;
      const bool active = row < seg1;
      const int64_t n = row - m * p.N;

      LaneAcc acc;
      cb::lane_init(acc);
      int y = -1;
      if (active) {
        const int64_t yl = load_label(p, m, n);
        y = (yl >= 0 && yl < p.C) ? static_cast<int>(yl) : -1;
        const raw_t* rp = xm + n * p.xs1;
        if (kContiguous) {
          cb::lane_pass_contiguous<Tag, G, kVecPerChunk>(acc, rp, p.C, gl, y);
        } else {
          cb::lane_pass_strided<Tag, G, kElemPerChunk>(acc, rp, p.xs2, p.C, gl, y);
        }
      }

      // Merge the G lane states of each group (inactive groups merge empty states). All 32 lanes take part.
      RowState st = acc.st;
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) {
        RowState o;
        o.mx = __shfl_xor_sync(kFull, st.mx, off);
        o.idx = __shfl_xor_sync(kFull, st.idx, off);
        o.rest = __shfl_xor_sync(kFull, st.rest, off);
        o.rest2 = __shfl_xor_sync(kFull, st.rest2, off);
        st = cb::merge_states(st, o);
      }
      const unsigned have = __ballot_sync(kFull, acc.have) & gmask;
      const unsigned bad = __ballot_sync(kFull, !(acc.amax <= FLT_MAX)) & gmask;
      const int src = have ? (__ffs(have) - 1) : lane;
      const float xy = __shfl_sync(kFull, acc.xy, src);

      if (active && gl == 0) {
        if (bad != 0u || have == 0u) {  // NaN/inf logit, or a label outside [0, C)
          ++bad_rows;
        } else {
          const RowOut o = cb::finalize_row(st, xy);
          const bool correct = o.pred == y;
          const int b = cb::bin_of(o.conf, p.n_bins);
          nll_sum += o.nll;
          brier_sum += static_cast<double>(o.brier);
          if (b != run_bin) {
            if (run_bin >= 0) push_run(p, direct, m, run_bin, run_cnt, run_corr, run_conf, s_count, s_correct, s_conf);
            run_bin = b;
            run_cnt = 0u;
            run_corr = 0u;
            run_conf = 0.0;
          }
          ++run_cnt;
          run_corr += correct ? 1u : 0u;
          run_conf += static_cast<double>(o.conf);
          const int64_t sidx = m * p.N + n;
          if (p.sample_conf) p.sample_conf[sidx] = o.conf;
          if (p.sample_correct) p.sample_correct[sidx] = correct ? 1 : 0;
        }
      }
    }
    if (run_bin >= 0) push_run(p, direct, m, run_bin, run_cnt, run_corr, run_conf, s_count, s_correct, s_conf);

    // Per-warp sums of the segment: one atomic each per warp.
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      nll_sum += __shfl_xor_sync(kFull, nll_sum, off);
      brier_sum += __shfl_xor_sync(kFull, brier_sum, off);
      bad_rows += __shfl_xor_sync(kFull, bad_rows, off);
    }
    if (lane == 0) {
      if (nll_sum != 0.0) atomicAdd(p.sums + 2 * m, nll_sum);
      if (brier_sum != 0.0) atomicAdd(p.sums + 2 * m + 1, brier_sum);
      if (bad_rows) atomicAdd(p.nonfinite + m, static_cast<unsigned long long>(bad_rows));
    }

    if (!direct) {  // block-uniform
      __syncthreads();  // all pushes of this segment are in shared memory
      const int64_t gbase = m * nb1;
      for (int i = threadIdx.x; i < nb1; i += kThreads) {
        const unsigned c = s_count[i];
        if (c != 0u) {
          atomicAdd(p.bin_count + gbase + i, static_cast<unsigned long long>(c));
          const unsigned k = s_correct[i];
          if (k != 0u) atomicAdd(p.bin_correct + gbase + i, static_cast<unsigned long long>(k));
          atomicAdd(p.bin_conf + gbase + i, s_conf[i]);
          s_count[i] = 0u;
          s_correct[i] = 0u;
          s_conf[i] = 0.0;
        }
      }
      __syncthreads();  // zeroed before the next segment pushes
    }
    seg0 = seg1;
  }
}

[[noreturn]] void throw_cuda(const char* what, cudaError_t err) {
  throw std::runtime_error(std::string("vlmfast._C: calibration_bins_cuda: ") + what + " failed: " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

#define VLMFAST_CUDA_TRY(call)                   \
  do {                                           \
    const cudaError_t err_ = (call);             \
    if (err_ != cudaSuccess) {                   \
      (void)cudaGetLastError();                  \
      throw_cuda(#call, err_);                   \
    }                                            \
  } while (0)

template <class Tag, int G, bool kContiguous>
void launch(const Params& p, int device, cudaStream_t stream) {
  auto kernel = calibration_bins_kernel<Tag, G, kContiguous>;
  const size_t smem = static_cast<size_t>(p.n_bins + 1) * (sizeof(double) + 2 * sizeof(unsigned));
  if (smem > 48 * 1024) {
    VLMFAST_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int sms = 0, per_sm = 0;
  VLMFAST_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  VLMFAST_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t rows = p.M * p.N;
  constexpr int64_t kSlots = int64_t{kWarps} * (32 / G);
  int64_t grid = int64_t{std::max(sms, 1)} * std::max(per_sm, 1);
  grid = std::min<int64_t>(grid, (rows + kSlots - 1) / kSlots);           // small inputs: no idle blocks
  grid = std::max<int64_t>(grid, (rows + kMaxRowsPerBlock - 1) / kMaxRowsPerBlock);  // u32 shared counters
  grid = std::max<int64_t>(grid, 1);
  VLMFAST_CHECK(grid <= 0x7fffffff, "calibration_bins_cuda: too many rows (", rows, ")");
  (void)cudaGetLastError();  // clear a stale error so that the check below reports this launch only
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda("kernel launch", err);
}

// Lane group size: the smallest G whose lanes cover a row in at most two chunks each, else 32. Smaller groups
// spread the per-row costs (log2(G) merge steps, the leader's finalisation) over several rows per warp.
template <class Tag, bool kContiguous>
void launch_for(const Params& p, int device, cudaStream_t stream) {
  using raw_t = typename Tag::raw_t;
  const int64_t units = kContiguous ? (static_cast<int64_t>(p.C) * static_cast<int64_t>(sizeof(raw_t)) + 15) / 16
                                    : static_cast<int64_t>(p.C);
  const int64_t per_lane = 2 * (kContiguous ? kVecPerChunk : kElemPerChunk);
  if (units <= 4 * per_lane) return launch<Tag, 4, kContiguous>(p, device, stream);
  if (units <= 8 * per_lane) return launch<Tag, 8, kContiguous>(p, device, stream);
  if (units <= 16 * per_lane) return launch<Tag, 16, kContiguous>(p, device, stream);
  return launch<Tag, 32, kContiguous>(p, device, stream);
}

template <class Tag>
void launch_tag(const Params& p, bool contiguous, int device, cudaStream_t stream) {
  if (contiguous) {
    launch_for<Tag, true>(p, device, stream);
  } else {
    launch_for<Tag, false>(p, device, stream);
  }
}

}  // namespace

void calibration_bins_cuda(const CalibrationBinsArgs& a, std::uintptr_t stream) {
  check_calibration_bins_args(a, /*cuda=*/true);
  const TensorView& x = a.logits;
  VLMFAST_CHECK(x.dtype == DType::Float32 || x.dtype == DType::Float16 || x.dtype == DType::BFloat16,
                "calibration_bins_cuda: logits: expected float32, float16 or bfloat16, got ", dtype_name(x.dtype));
  VLMFAST_CHECK(a.n_bins >= 1 && a.n_bins <= kMaxBins, "calibration_bins_cuda: n_bins: expected 1..", kMaxBins,
                ", got ", a.n_bins);
  const int64_t M = x.size(0), N = x.size(1), C = x.size(2);
  VLMFAST_CHECK(C < (int64_t{1} << 30), "calibration_bins_cuda: C = ", C, " classes is too many (limit 2^30)");
  const size_t esize = x.dtype == DType::Float32 ? 4 : 2;
  VLMFAST_CHECK(x.ptr % esize == 0, "calibration_bins_cuda: logits: data pointer not aligned to its element size");
  const size_t lsize = a.labels.dtype == DType::Int64 ? 8 : 4;
  VLMFAST_CHECK(a.labels.ptr % lsize == 0, "calibration_bins_cuda: labels: data pointer not aligned to its element size");
  for (const TensorView* t : {&a.labels, &a.bin_count, &a.bin_correct, &a.bin_conf, &a.sums, &a.nonfinite}) {
    VLMFAST_CHECK(t->device == x.device, "calibration_bins_cuda: every tensor must be on cuda:", x.device,
                  ", got one on cuda:", t->device);
  }
  for (const TensorView* t : {&a.sample_conf, &a.sample_correct}) {
    VLMFAST_CHECK(t->ptr == 0 || t->device == x.device, "calibration_bins_cuda: every tensor must be on cuda:",
                  x.device, ", got one on cuda:", t->device);
  }

  Params p{};
  p.x = reinterpret_cast<const void*>(x.ptr);
  p.xs0 = x.stride(0);
  p.xs1 = x.stride(1);
  p.xs2 = x.stride(2);
  p.labels = reinterpret_cast<const void*>(a.labels.ptr);
  p.ls0 = a.labels.stride(0);
  p.ls1 = a.labels.stride(1);
  p.labels64 = a.labels.dtype == DType::Int64;
  p.M = M;
  p.N = N;
  p.C = static_cast<int>(C);
  p.n_bins = static_cast<int>(a.n_bins);
  p.bin_count = a.bin_count.data<unsigned long long>();
  p.bin_correct = a.bin_correct.data<unsigned long long>();
  p.bin_conf = a.bin_conf.data<double>();
  p.sums = a.sums.data<double>();
  p.nonfinite = a.nonfinite.data<unsigned long long>();
  p.sample_conf = a.sample_conf.ptr ? a.sample_conf.data<float>() : nullptr;
  p.sample_correct = a.sample_correct.ptr ? a.sample_correct.data<uint8_t>() : nullptr;

  // Stride 1 along C (or a single class): 16-byte vector loads with a per-row head/tail.
  const bool contiguous = x.stride(2) == 1 || C == 1;

  const int device = x.device;
  VLMFAST_CUDA_TRY(cudaSetDevice(device));  // this module's static cudart has its own current device
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (x.dtype) {
    case DType::Float32: launch_tag<cb::TagF32>(p, contiguous, device, s); break;
    case DType::Float16: launch_tag<cb::TagF16>(p, contiguous, device, s); break;
    default: launch_tag<cb::TagBF16>(p, contiguous, device, s); break;
  }
}

}  // namespace vlmfast
