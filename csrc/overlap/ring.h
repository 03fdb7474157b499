// The ring both overlap ops walk: neighbours, chunk bookkeeping and one peer-to-peer step.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <vector>

namespace parallelkit {

using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;
using WorkPtr = c10::intrusive_ptr<c10d::Work>;

struct Ring {
  int64_t rank;   // in the group
  int64_t size;
  int64_t next;   // we send to next and receive from prev
  int64_t prev;

  explicit Ring(const ProcessGroupPtr& pg)
      : rank(pg->getRank()), size(pg->getSize()),
        next((pg->getRank() + 1) % pg->getSize()),
        prev((pg->getRank() + pg->getSize() - 1) % pg->getSize()) {}

  // The rank whose chunk sits in hand `step` steps into an all-gather ring: each step hands
  // every chunk on to the next rank, so at step s we hold the chunk of rank - s.
  int64_t owner_at(int64_t step) const { return ((rank - step) % size + size) % size; }
};

// Starts sending `send` to ring.next and receiving `recv` from ring.prev; returns the works to
// wait on. On CUDA the pair is coalesced into one NCCL group: with two ranks next == prev, and a
// lone blocking send to a peer that is itself sending first would never be matched.
std::vector<WorkPtr> start_exchange(const ProcessGroupPtr& pg, const Ring& ring, at::Tensor send,
                                    at::Tensor recv, int64_t tag);

void wait_all(std::vector<WorkPtr>& works);

// start_exchange for callers outside C++: holds the works (and so the buffers) until wait().
struct PendingExchange {
  std::vector<WorkPtr> works;
  void wait() { wait_all(works); }
};

PendingExchange start_ring_exchange(const ProcessGroupPtr& pg, const at::Tensor& send,
                                    const at::Tensor& recv, int64_t tag);

}  // namespace parallelkit
