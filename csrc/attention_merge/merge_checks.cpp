// Input validation shared by the CPU and CUDA merge.
#include "attention_merge/merge.h"
#include "include/checks.h"

namespace parallelkit {

void check_merge_inputs(const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& block_out, const at::Tensor& block_lse) {
  TORCH_CHECK(out.dim() == lse.dim() + 1 && out.sizes().slice(0, lse.dim()) == lse.sizes(),
              "out [..., s, d] must be lse's shape [..., s] plus a last dim d, got out ",
              out.sizes(), " and lse ", lse.sizes());
  check_same_shape(block_out, "block_out", out, "out");
  check_same_shape(block_lse, "block_lse", lse, "lse");

  check_same_device(lse, "lse", out, "out");
  check_same_device(block_out, "block_out", out, "out");
  check_same_device(block_lse, "block_lse", out, "out");
  check_contiguous(out, "out");
  check_contiguous(lse, "lse");
  check_contiguous(block_out, "block_out");
  check_contiguous(block_lse, "block_lse");

  const auto acc = out.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "out must be torch.float32 or torch.float64 because the merge accumulates in it, got ",
              dtype_name(acc), "; keep the running output in torch.float32");
  check_dtype(lse, "lse", acc, "the dtype of out");
  check_dtype(block_lse, "block_lse", acc, "the dtype of out");
  // Blocks may arrive in half precision (what a flash kernel returns); they widen on read.
  const auto b = block_out.scalar_type();
  TORCH_CHECK(b == acc || (acc == at::kFloat && (b == at::kHalf || b == at::kBFloat16)),
              "block_out must be ", dtype_name(acc),
              " like out (or torch.float16 / torch.bfloat16 when out is torch.float32), got ",
              dtype_name(b));
}

}  // namespace parallelkit
