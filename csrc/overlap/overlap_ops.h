// The overlap rings as dispatcher ops (torch.ops.parallelkit.all_gather_matmul /
// matmul_reduce_scatter, registered in bindings.cpp): the process group by name, as torch's
// functional collectives take it, so torch.compile keeps them in its graph.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>

#include "ring/transport.h"

namespace parallelkit {

// The ring transport the ops use for the group named `group` and tensors of `device_type`
// ("cpu", "cuda"); parallelkit/ops/ring_transport.py registers each one it makes. An op whose
// group has none registered yet rings over the group's own send/recv (C10dTransport).
void register_ring_transport(const std::string& group, const std::string& device_type,
                             TransportPtr transport);

std::tuple<at::Tensor, at::Tensor> all_gather_matmul_op(const at::Tensor& x_shard,
                                                        const at::Tensor& weight,
                                                        c10::string_view group,
                                                        int64_t chunks_per_rank);

at::Tensor matmul_reduce_scatter_op(const at::Tensor& x, const at::Tensor& weight,
                                    c10::string_view group, int64_t chunks_per_rank);

}  // namespace parallelkit
