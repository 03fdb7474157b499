// Which global ranks belong to a process group, as the group itself reports it.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace parallelkit {

// Returns membership: [world_size] int64 on `device`, 1 at the global rank of every member of
// `pg` and 0 elsewhere: each member contributes a one-hot row and the rows are summed over `pg`.
// Tests use it to prove a group holds exactly the ranks its construction promised. Collective:
// blocks until every member of `pg` has called it.
at::Tensor group_membership(const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                            int64_t global_rank, int64_t world_size, c10::Device device);

}  // namespace parallelkit
