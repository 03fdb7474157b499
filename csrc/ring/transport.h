// A ring of processes and the one thing every ring op asks of it: send a buffer to the next rank
// while receiving one from the previous. Transports differ only in how the bytes move (c10d
// send/recv, host shared memory, CUDA IPC peer copies); the ops never know which one runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "include/checks.h"

namespace parallelkit {

struct Ring {
  int64_t rank;  // in the group
  int64_t size;
  int64_t next;  // we send to next and receive from prev
  int64_t prev;

  Ring(int64_t rank, int64_t size)
      : rank(rank), size(size), next((rank + 1) % size), prev((rank + size - 1) % size) {}

  // The rank whose chunk sits in hand `step` steps into an all-gather ring: each step hands
  // every chunk on to the next rank, so at step s we hold the chunk of rank - s.
  int64_t owner_at(int64_t step) const { return ((rank - step) % size + size) % size; }
};

// One started exchange. wait() returns once `recv` holds the previous rank's buffer and `send`
// may be overwritten; on CUDA it may instead order the current stream after both (no host block).
class Exchange {
 public:
  virtual ~Exchange() = default;
  virtual void wait() = 0;
};
using ExchangePtr = std::unique_ptr<Exchange>;

class RingTransport {
 public:
  virtual ~RingTransport() = default;
  virtual const Ring& ring() const = 0;
  virtual std::string name() const = 0;  // "c10d", "shm" or "cuda_ipc"
  // Starts sending `send` to ring().next and receiving `recv` (as many bytes) from ring().prev.
  // Every rank must start the same exchanges in the same order; `tag` is the op's step, which
  // c10d uses to match messages and the others quote in their errors.
  virtual ExchangePtr start(const at::Tensor& send, const at::Tensor& recv, int64_t tag) = 0;
};
using TransportPtr = std::shared_ptr<RingTransport>;

// Waits on `exchange` if one is in flight, and forgets it.
inline void finish(ExchangePtr& exchange) {
  if (exchange) {
    exchange->wait();
    exchange.reset();
  }
}

inline void check_exchange_buffers(const at::Tensor& send, const at::Tensor& recv) {
  check_contiguous(send, "send");
  check_contiguous(recv, "recv");
  TORCH_CHECK(send.sizes() == recv.sizes() && send.scalar_type() == recv.scalar_type() &&
                  send.device() == recv.device(),
              "ring exchange: send ", send.sizes(), " ", dtype_name(send.scalar_type()), " on ",
              send.device(), " and recv ", recv.sizes(), " ", dtype_name(recv.scalar_type()),
              " on ", recv.device(), " must match: every rank sends what its neighbour receives");
}

}  // namespace parallelkit
