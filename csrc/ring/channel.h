// The shared-memory control block of one ring link (prev -> this rank), kept in the receiving
// rank's segment. It is the whole cross-process state of the slot protocol (slot_ring.h), the
// same for every slot transport: where the payload lives (this segment, or GPU memory) differs.
#pragma once

#include <atomic>
#include <cstdint>

namespace parallelkit {

constexpr int64_t kMaxSlots = 8;
constexpr uint64_t kChannelMagic = 0x706b2d72696e6731;  // "pk-ring1"

// Counters count fragments from 1, so the zeroed segment means "nothing yet". Each counter has
// one writer; the two writers' counters sit on separate cache lines.
struct alignas(64) Published {  // written by the sender
  std::atomic<uint64_t> fragment{0};  // 1 + the last fragment written into this slot
  // Read only after `fragment` (acquire): relaxed atomics, so that a test without back-pressure
  // that overwrites a slot mid-read is a detected race, not undefined behaviour.
  std::atomic<uint64_t> exchange{0};       // the exchange that fragment belongs to ...
  std::atomic<uint64_t> message_bytes{0};  // ... and that exchange's size, for the receiver
};

struct alignas(64) Consumed {  // written by the receiver
  std::atomic<uint64_t> fragment{0};  // 1 + the last fragment read out of this slot
};

struct ChannelHeader {
  uint64_t magic;  // set by the owner before anyone else maps the segment
  int64_t slots;
  int64_t slot_bytes;
  // The first rank to fail marks every link it touches, so that its neighbours raise at once
  // instead of timing out, and pass it on: 0 none, 1 being written, 2 set.
  alignas(64) std::atomic<int32_t> abort_state{0};
  int32_t aborted_by;
  char abort_reason[1024];  // the first failure's own message, passed on unchanged
  Published published[kMaxSlots];
  Consumed consumed[kMaxSlots];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<int32_t>::is_always_lock_free,
              "cross-process atomics must be lock-free");

}  // namespace parallelkit
