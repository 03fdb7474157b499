// CPU merge: rows split across threads, each row a plain loop over d.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "attention_merge/merge.h"
#include "attention_merge/merge_math.h"

namespace parallelkit {
namespace {

// Elements per parallel_for chunk, the value ATen uses (at::internal::GRAIN_SIZE), so short rows
// are batched instead of paying a task per row.
constexpr int64_t kGrainElements = 32768;

template <typename scalar_t, typename acc_t>
void merge_rows(acc_t* out, acc_t* lse, const scalar_t* block_out, const acc_t* block_lse,
                int64_t rows, int64_t d) {
  const int64_t grain_rows = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto s = merge_scales(lse[r], block_lse[r]);
      acc_t* o = out + r * d;
      const scalar_t* b = block_out + r * d;
      for (int64_t j = 0; j < d; ++j) {
        o[j] = merge_value(o[j], static_cast<acc_t>(b[j]), s);
      }
      lse[r] = s.lse;
    }
  });
}

}  // namespace

void merge_attention_partials_cpu(at::Tensor& out, at::Tensor& lse,
                                  const at::Tensor& block_out, const at::Tensor& block_lse) {
  check_merge_inputs(out, lse, block_out, block_lse);
  // check_merge_inputs made out's dtype the opmath type of block_out's (float for half/bf16).
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, block_out.scalar_type(), "merge_attention_partials_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        merge_rows<scalar_t, acc_t>(out.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
                                    block_out.const_data_ptr<scalar_t>(),
                                    block_lse.const_data_ptr<acc_t>(), lse.numel(), out.size(-1));
      });
}

}  // namespace parallelkit
