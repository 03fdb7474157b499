// The per-row math of the merge, shared by the CPU loop and the CUDA kernel so both give the
// same answer and the -inf rules live in one place.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace parallelkit {

// For one row: new_out = out * out_scale + block_out * block_scale, new_lse = lse.
template <typename acc_t>
struct MergeScales {
  acc_t lse;
  acc_t out_scale;
  acc_t block_scale;
};

template <typename acc_t>
C10_HOST_DEVICE inline MergeScales<acc_t> merge_scales(acc_t lse, acc_t block_lse) {
  // A fully masked block adds nothing. Testing it first also covers "both -inf", where the
  // formula below would compute -inf - (-inf) = NaN.
  if (block_lse == -std::numeric_limits<acc_t>::infinity()) {
    return {lse, acc_t(1), acc_t(0)};
  }
  // logaddexp around the larger value, so exp never overflows; log1p keeps the digits of the
  // smaller term. lse = -inf gives new_lse = block_lse, out_scale 0, block_scale 1.
  const acc_t hi = lse > block_lse ? lse : block_lse;
  const acc_t lo = lse > block_lse ? block_lse : lse;
  const acc_t new_lse = hi + std::log1p(std::exp(lo - hi));
  return {new_lse, std::exp(lse - new_lse), std::exp(block_lse - new_lse)};
}

// A zero scale drops its term instead of multiplying by it: a row with lse -inf may hold anything
// (torch.empty, or the NaN of a softmax over no keys), and 0 * NaN is NaN.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t merge_value(acc_t out, acc_t block, const MergeScales<acc_t>& s) {
  acc_t merged = 0;
  if (s.out_scale != acc_t(0)) merged += out * s.out_scale;
  if (s.block_scale != acc_t(0)) merged += block * s.block_scale;
  return merged;
}

}  // namespace parallelkit
