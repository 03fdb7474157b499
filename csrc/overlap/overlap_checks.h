// Input checks shared by both overlap ops.
#pragma once

#include "include/checks.h"
#include "ring/c10d_transport.h"

namespace parallelkit {

inline void check_overlap_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const ProcessGroupPtr& pg, int64_t chunks_per_rank) {
  TORCH_CHECK(pg, op, ": the process group is None; pass the tensor-parallel group");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, op, ": expects x [rows, k] and weight [n, k], got ",
              "x ", x.sizes(), " and weight ", weight.sizes(), "; flatten the leading dims of x");
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x ", x.sizes(), " and weight ", weight.sizes(),
              " disagree on k (x's last dim must equal weight's second dim)");
  check_same_device(weight, "weight", x, "x");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x is ", dtype_name(x.scalar_type()),
              " but weight is ", dtype_name(weight.scalar_type()), "; cast one to the other");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expects floating-point tensors, got ",
              dtype_name(x.scalar_type()));
  TORCH_CHECK(chunks_per_rank >= 1, op, ": chunks_per_rank must be >= 1, got ", chunks_per_rank);
}

}  // namespace parallelkit
