// The ring protocol every slot transport shares: messages cut into fragments that go through a
// few fixed receive slots per rank, with per-slot sequence numbers in shared memory (channel.h).
//
//   sender, fragment f -> slot f % slots:  wait until consumed[slot] >= f + 1 - slots  (back-pressure:
//                                          the receiver has read what the slot held before),
//                                          write it, then publish[slot] = f + 1
//   receiver, fragment f:                  wait until published[slot] >= f + 1, read it out,
//                                          then consumed[slot] = f + 1
//
// Nothing blocks outside wait(): start() and wait() both move every fragment that can move now,
// in both directions, so two ranks that wait on each other never deadlock. Only the SlotMover
// differs between transports: memcpy through the segment (shm), or peer copies between GPU
// slots ordered by interprocess events (cuda_ipc). A wait that stalls for timeout_s, a
// neighbour that exits, or a neighbour that aborts, raises an error naming the peer and step.
#pragma once

#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <string>

#include "ring/channel.h"
#include "ring/shm_segment.h"
#include "ring/transport.h"

namespace parallelkit {

// Moves one fragment's bytes; the protocol decides when. Pointers are the tensors' (host or
// device) plus an offset; `slot` indexes this rank's slots (read) or the next rank's (write).
class SlotMover {
 public:
  virtual ~SlotMover() = default;
  virtual std::string name() const = 0;
  virtual int64_t segment_bytes() const { return 0; }  // payload kept in the shm segment itself
  virtual std::string address() const { return ""; }   // what the previous rank needs to open ours
  // own/next_payload: the payload areas of this rank's and the next rank's segments.
  virtual void connect(const std::string& next_address, std::byte* own_payload,
                       std::byte* next_payload) = 0;
  virtual void check(const at::Tensor& t) const = 0;  // the device this mover serves
  virtual void begin(const at::Tensor& send, const at::Tensor& recv) {}  // before any move of them
  virtual void write(int64_t slot, const std::byte* src, int64_t bytes) = 0;
  virtual void read(int64_t slot, std::byte* dst, int64_t bytes) = 0;
  virtual void end() {}  // after an exchange's last move: the caller may touch its tensors
};

std::unique_ptr<SlotMover> make_host_mover(int64_t slots, int64_t slot_bytes);
// Defined in cuda_ipc_mover.cu, built only with PARALLELKIT_WITH_CUDA.
std::unique_ptr<SlotMover> make_cuda_ipc_mover(int device, int64_t slots, int64_t slot_bytes);

struct SlotRingOptions;
class SlotRing;
// kind "shm" (CPU tensors) or "cuda_ipc" (tensors on CUDA device `device`).
std::shared_ptr<SlotRing> make_slot_ring(const std::string& kind, const SlotRingOptions& options,
                                         int64_t device);

struct SlotRingOptions {
  int64_t rank = 0, size = 1;
  int64_t slots = 2;
  int64_t slot_bytes = 1 << 20;
  double timeout_s = 120;
  bool backpressure = true;  // false only to show, in a test, what goes wrong without it
};

struct Peer {
  int64_t pid;
  std::string label;  // "rank 1 (global rank 3)"
};

class SlotRing final : public RingTransport, public std::enable_shared_from_this<SlotRing> {
 public:
  // Phase 1: create this rank's segment. Then every rank publishes address() to its previous
  // rank (the caller gathers them), connect()s to the next one's, and unlink()s once all have.
  SlotRing(SlotRingOptions options, std::unique_ptr<SlotMover> mover);
  std::string address() const;
  void connect(const std::string& next_address, Peer prev, Peer next);
  void unlink() { own_segment_.unlink(); }

  const Ring& ring() const override { return ring_; }
  std::string name() const override { return mover_->name(); }
  ExchangePtr start(const at::Tensor& send, const at::Tensor& recv, int64_t tag) override;
  void wait(uint64_t exchange);
  int64_t sender_stalls() const { return sender_stalls_; }  // fragments that met a full slot

 private:
  struct Message {
    std::byte* data;  // read from (send) or written to (recv)
    int64_t bytes, done = 0;
    uint64_t exchange;
    int64_t tag;
    at::Tensor keep;  // the tensor `data` points into, alive until its last fragment moved
  };
  bool progress();
  bool try_send();
  bool try_receive();
  void check_fragment(const Message& message, uint64_t fragment, uint64_t seen);
  void check_stalled(uint64_t exchange, double stalled_s);
  void check_aborted(const std::string& doing);  // raises if a neighbour stopped the ring
  [[noreturn]] void fail(const std::string& why, int64_t first_rank = -1,
                         const std::string& first_reason = "");
  std::string describe_wait(uint64_t exchange) const;

  SlotRingOptions options_;
  Ring ring_;
  std::unique_ptr<SlotMover> mover_;
  ShmSegment own_segment_, next_segment_;
  ChannelHeader* own_ = nullptr;   // link prev -> us: we read published, write consumed
  ChannelHeader* next_ = nullptr;  // link us -> next: we write published, read consumed
  Peer prev_{0, ""}, next_peer_{0, ""};
  std::deque<Message> sends_, receives_;
  uint64_t started_ = 0, sent_ = 0, received_ = 0;   // exchanges
  uint64_t send_fragment_ = 0, receive_fragment_ = 0;  // the next fragment each way
  int64_t sender_stalls_ = 0;
  bool stalled_send_ = false;
  std::string broken_;
  std::mutex mutex_;
};

}  // namespace parallelkit
