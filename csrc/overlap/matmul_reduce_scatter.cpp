// reduce_scatter(x W^T) as a ring: each rank adds its part of a row block's sum and passes the
// block on, computing the next block's part while the previous one travels.
#include <ATen/ATen.h>

#include "overlap/overlap.h"
#include "overlap/overlap_checks.h"

namespace parallelkit {

at::Tensor matmul_reduce_scatter(const at::Tensor& x, const at::Tensor& weight,
                                 const ProcessGroupPtr& pg, int64_t chunks_per_rank,
                                 TransportPtr transport) {
  check_overlap_inputs("matmul_reduce_scatter", x, weight, pg, chunks_per_rank);
  transport = transport_for(pg, std::move(transport), "matmul_reduce_scatter");
  const Ring& ring = transport->ring();
  TORCH_CHECK(x.size(0) % (ring.size * chunks_per_rank) == 0, "matmul_reduce_scatter: x has ",
              x.size(0), " rows, which do not split into tp=", ring.size, " x chunks_per_rank=",
              chunks_per_rank, " equal pieces; pad the sequence or choose chunks_per_rank=1");
  const int64_t m = x.size(0) / ring.size;
  const int64_t piece = m / chunks_per_rank;
  const int64_t n = weight.size(0);
  auto y = at::empty({m, n}, x.options());
  const auto weight_t = weight.t();

  // At step s this rank adds its part for the rows of rank - s - 1: the sum then has p - s - 1
  // hops left and arrives at its owner after the last step, where owner == this rank.
  // Per piece: one buffer receiving, two taking turns computing and sending. A buffer sent at
  // step s is free again at step s + 2: its send was waited on at step s + 1.
  auto received = at::empty({chunks_per_rank, piece, n}, x.options());
  auto partials = at::empty({2, chunks_per_rank, piece, n}, x.options());
  std::vector<ExchangePtr> in_flight(chunks_per_rank);
  for (int64_t step = 0; step < ring.size; ++step) {
    const int64_t owner = ring.owner_at(step + 1);
    const bool last = step + 1 == ring.size;
    for (int64_t j = 0; j < chunks_per_rank; ++j) {
      auto partial = last ? y.narrow(0, j * piece, piece) : partials[step % 2][j];
      at::mm_out(partial, x.narrow(0, owner * m + j * piece, piece), weight_t);
      finish(in_flight[j]);  // the sum so far for these rows, from prev
      if (step > 0) partial.add_(received[j]);
      if (!last) {
        in_flight[j] = transport->start(partial, received[j], step * chunks_per_rank + j);
      }
    }
  }
  return y;
}

}  // namespace parallelkit
