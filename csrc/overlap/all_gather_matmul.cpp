// all_gather(x) W^T as a ring: multiply the rows in hand while the next rows travel.
#include <ATen/ATen.h>

#include "overlap/overlap.h"
#include "overlap/overlap_checks.h"

namespace parallelkit {

std::tuple<at::Tensor, at::Tensor> all_gather_matmul(const at::Tensor& x_shard,
                                                     const at::Tensor& weight,
                                                     const ProcessGroupPtr& pg,
                                                     int64_t chunks_per_rank,
                                                     TransportPtr transport) {
  check_overlap_inputs("all_gather_matmul", x_shard, weight, pg, chunks_per_rank);
  transport = transport_for(pg, std::move(transport), "all_gather_matmul");
  const Ring& ring = transport->ring();
  const int64_t m = x_shard.size(0);
  TORCH_CHECK(m % chunks_per_rank == 0, "all_gather_matmul: this rank's ", m, " rows do not ",
              "split into chunks_per_rank=", chunks_per_rank, " equal pieces; choose a divisor of ",
              m, " (e.g. 1)");
  const int64_t piece = m / chunks_per_rank;
  auto gathered = at::empty({ring.size * m, x_shard.size(1)}, x_shard.options());
  auto y = at::empty({ring.size * m, weight.size(0)}, x_shard.options());
  auto rows = [&](const at::Tensor& t, int64_t owner, int64_t j) {
    return t.narrow(0, owner * m + j * piece, piece);
  };
  gathered.narrow(0, ring.rank * m, m).copy_(x_shard);
  const auto weight_t = weight.t();

  // in_flight[j]: the exchange that forwards piece j of the previous owner and brings piece j
  // of the next one. Waiting on it just before that piece is needed, not before the step, lets
  // pieces that already arrived be multiplied while later ones are still on the wire.
  std::vector<ExchangePtr> in_flight(chunks_per_rank);
  for (int64_t step = 0; step < ring.size; ++step) {
    const int64_t owner = ring.owner_at(step);
    for (int64_t j = 0; j < chunks_per_rank; ++j) {
      finish(in_flight[j]);
      if (step + 1 < ring.size) {
        in_flight[j] = transport->start(rows(gathered, owner, j),
                                        rows(gathered, ring.owner_at(step + 1), j),
                                        step * chunks_per_rank + j);
      }
      auto out = rows(y, owner, j);
      at::mm_out(out, rows(gathered, owner, j), weight_t);
    }
  }
  return {y, gathered};
}

}  // namespace parallelkit
