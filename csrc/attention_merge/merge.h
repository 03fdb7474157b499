// Log-sum-exp merge of attention partials: the step ring attention repeats for every KV block it
// receives, folding that block's softmax result into the running one.
#pragma once

#include <ATen/core/Tensor.h>

namespace parallelkit {

// In place: lse <- logaddexp(lse, block_lse); out <- out * exp(lse_old - lse) +
// block_out * exp(block_lse - lse), accumulated in out's dtype.
//   out:       [..., s, d] float32 or float64 (the running output, updated)
//   lse:       [..., s]    out's dtype        (the running log-sum-exp, updated)
//   block_out: [..., s, d] out's dtype, or float16 / bfloat16 when out is float32
//   block_lse: [..., s]    out's dtype
// A row whose block_lse is -inf (fully masked block) is left as it was; a row whose lse is -inf
// (nothing seen yet) takes the block as is, whatever out held.
void check_merge_inputs(const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& block_out, const at::Tensor& block_lse);

void merge_attention_partials_cpu(at::Tensor& out, at::Tensor& lse,
                                  const at::Tensor& block_out, const at::Tensor& block_lse);

#ifdef PARALLELKIT_WITH_CUDA
// Defined in merge_cuda.cu; registered from bindings.cpp so the .cu stays free of heavy headers.
void merge_attention_partials_cuda(at::Tensor& out, at::Tensor& lse,
                                   const at::Tensor& block_out, const at::Tensor& block_lse);
#endif

}  // namespace parallelkit
