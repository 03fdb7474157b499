// CUDA merge: one warp per row. Rows are short (d is the head dim, 64..256), so a whole block per
// row would leave most threads idle; lanes stride over d so a warp reads contiguous memory.
// Only light headers here: this CUDA toolkit has no cuBLAS headers, which torch/extension.h needs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "attention_merge/merge.h"
#include "attention_merge/merge_math.h"

namespace parallelkit {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;

template <typename scalar_t, typename acc_t>
__global__ void merge_rows_kernel(acc_t* out, acc_t* lse, const scalar_t* block_out,
                                  const acc_t* block_lse, int64_t rows, int64_t d) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warps leave together: a warp owns one row
  const int lane = threadIdx.x % kWarpSize;
  const auto s = merge_scales(lse[row], block_lse[row]);
  acc_t* o = out + row * d;
  const scalar_t* b = block_out + row * d;
  for (int64_t j = lane; j < d; j += kWarpSize) {
    o[j] = merge_value(o[j], static_cast<acc_t>(b[j]), s);
  }
  // Lanes are not in lockstep: every lane must have read lse[row] before lane 0 overwrites it.
  __syncwarp();
  if (lane == 0) lse[row] = s.lse;
}

}  // namespace

void merge_attention_partials_cuda(at::Tensor& out, at::Tensor& lse,
                                   const at::Tensor& block_out, const at::Tensor& block_lse) {
  check_merge_inputs(out, lse, block_out, block_lse);
  const int64_t rows = lse.numel();
  if (rows == 0) return;  // a grid of 0 blocks is a launch error
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "merge_attention_partials_: ",
              rows, " rows exceed one launch's grid; merge in chunks along the leading dims");
  const c10::cuda::CUDAGuard guard(out.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, block_out.scalar_type(), "merge_attention_partials_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        merge_rows_kernel<scalar_t, acc_t><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
            out.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
            block_out.const_data_ptr<scalar_t>(), block_lse.const_data_ptr<acc_t>(), rows,
            out.size(-1));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace parallelkit
