// Tensor-parallel matmuls fused with their sequence-parallel collective, overlapping each ring
// step's communication with the previous step's matmul. Weights follow nn.Linear: y = x W^T.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "ring/c10d_transport.h"

namespace parallelkit {

// Both ring over `transport` (see ring/transport.h), or over pg's send/recv when it is null.
//
// x_shard: [m, k] (this rank's m rows; callers flatten [s/tp, b, k]); weight: [n, k].
// Returns (y [tp*m, n], gathered x [tp*m, k]): y = all_gather(x_shard) W^T, rows in group-rank
// order. Each rank's rows travel in chunks_per_rank pieces (m must divide by it).
std::tuple<at::Tensor, at::Tensor> all_gather_matmul(const at::Tensor& x_shard,
                                                     const at::Tensor& weight,
                                                     const ProcessGroupPtr& pg,
                                                     int64_t chunks_per_rank,
                                                     TransportPtr transport = nullptr);

// x: [tp*m, k] (this rank's slice of the contraction dim); weight: [n, k].
// Returns y [m, n]: rank r's m rows of the sum over the group of x W^T. Partial sums travel
// the ring, each rank adding its part before passing them on.
at::Tensor matmul_reduce_scatter(const at::Tensor& x, const at::Tensor& weight,
                                 const ProcessGroupPtr& pg, int64_t chunks_per_rank,
                                 TransportPtr transport = nullptr);

}  // namespace parallelkit
