#include "distributed/group_membership.h"

#include <ATen/ops/zeros.h>

#include <vector>

namespace parallelkit {

at::Tensor group_membership(const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                            int64_t global_rank, int64_t world_size, c10::Device device) {
  TORCH_CHECK(pg, "group_membership: the process group is None; pass the group to inspect");
  TORCH_CHECK(world_size > 0, "group_membership: world_size must be positive, got ", world_size);
  TORCH_CHECK(0 <= global_rank && global_rank < world_size, "group_membership: global_rank ",
              global_rank, " is outside [0, ", world_size, "); pass this process's rank in the ",
              "default group (torch.distributed.get_rank())");
  // The default allreduce op is SUM.
  std::vector<at::Tensor> membership{at::zeros({world_size}, at::dtype(at::kLong).device(device))};
  membership[0][global_rank].fill_(1);
  pg->allreduce(membership)->wait();
  return membership[0];
}

}  // namespace parallelkit
