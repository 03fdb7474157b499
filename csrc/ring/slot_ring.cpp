// The slot protocol's state machine (see slot_ring.h); its error paths are in slot_ring_errors.cpp.
#include "ring/slot_ring.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>

namespace parallelkit {
namespace {

constexpr size_t kPayloadAlign = 4096;

size_t payload_offset() { return (sizeof(ChannelHeader) + kPayloadAlign - 1) / kPayloadAlign * kPayloadAlign; }

std::string unique_name() {
  static std::atomic<uint64_t> counter{0};
  std::random_device random;
  return "/parallelkit-ring-" + std::to_string(getpid()) + "-" + std::to_string(counter++) + "-" +
         std::to_string(random());
}

struct SlotExchange final : Exchange {
  std::shared_ptr<SlotRing> ring;
  uint64_t id;
  SlotExchange(std::shared_ptr<SlotRing> ring, uint64_t id) : ring(std::move(ring)), id(id) {}
  void wait() override { ring->wait(id); }
};

// Spin briefly (the peer is usually a few microseconds away), then yield the core (ranks may
// outnumber cores), then sleep so that a long wait does not burn a core.
void back_off(int64_t idle) {
  if (idle < 1024) {
    sched_yield();
  } else {
    usleep(50);
  }
}

}  // namespace

std::shared_ptr<SlotRing> make_slot_ring(const std::string& kind, const SlotRingOptions& options,
                                         int64_t device) {
  if (kind == "shm") {
    return std::make_shared<SlotRing>(options, make_host_mover(options.slots, options.slot_bytes));
  }
  TORCH_CHECK(kind == "cuda_ipc", "ring transport: unknown kind '", kind, "'; expected 'shm' or ",
              "'cuda_ipc' (c10d needs no slots)");
#ifdef PARALLELKIT_WITH_CUDA
  return std::make_shared<SlotRing>(
      options, make_cuda_ipc_mover(static_cast<int>(device), options.slots, options.slot_bytes));
#else
  TORCH_CHECK(false, "ring transport cuda_ipc: parallelkit._C was built without CUDA; rebuild it ",
              "with PARALLELKIT_BUILD_CUDA=1 (device ", device, ")");
#endif
}

SlotRing::SlotRing(SlotRingOptions options, std::unique_ptr<SlotMover> mover)
    : options_(options), ring_(options.rank, options.size), mover_(std::move(mover)) {
  TORCH_CHECK(options.size >= 2, "ring transport: a slot ring needs at least 2 ranks, got ",
              options.size);
  TORCH_CHECK(1 <= options.slots && options.slots <= kMaxSlots, "ring transport: slots must be in ",
              "[1, ", kMaxSlots, "], got ", options.slots);
  TORCH_CHECK(options.slot_bytes >= 64 && options.slot_bytes % 64 == 0, "ring transport: ",
              "slot_bytes must be a positive multiple of 64, got ", options.slot_bytes);
  TORCH_CHECK(options.timeout_s > 0, "ring transport: timeout_s must be positive, got ",
              options.timeout_s);
  own_segment_ = ShmSegment::create(unique_name(), payload_offset() + mover_->segment_bytes());
  own_ = new (own_segment_.data()) ChannelHeader{};
  own_->slots = options.slots;
  own_->slot_bytes = options.slot_bytes;
  own_->magic = kChannelMagic;
}

std::string SlotRing::address() const { return own_segment_.name() + '\n' + mover_->address(); }

void SlotRing::connect(const std::string& next_address, Peer prev, Peer next) {
  const auto cut = next_address.find('\n');
  TORCH_CHECK(cut != std::string::npos, "ring transport: malformed address from ", next.label);
  next_segment_ = ShmSegment::open(next_address.substr(0, cut),
                                   payload_offset() + mover_->segment_bytes());
  next_ = reinterpret_cast<ChannelHeader*>(next_segment_.data());
  TORCH_CHECK(next_->magic == kChannelMagic && next_->slots == options_.slots &&
                  next_->slot_bytes == options_.slot_bytes,
              "ring transport: ", next.label, " has ", next_->slots, " slots of ",
              next_->slot_bytes, " bytes, this rank ", options_.slots, " of ", options_.slot_bytes,
              "; the ranks disagree on the slot size or count: every rank must create its ",
              "transport with the same options");
  mover_->connect(next_address.substr(cut + 1), own_segment_.data() + payload_offset(),
                  next_segment_.data() + payload_offset());
  prev_ = std::move(prev);
  next_peer_ = std::move(next);
}

ExchangePtr SlotRing::start(const at::Tensor& send, const at::Tensor& recv, int64_t tag) {
  check_exchange_buffers(send, recv);
  mover_->check(send);
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(next_ != nullptr, "ring transport ", name(), ": start() before connect()");
  TORCH_CHECK(broken_.empty(), broken_, " (this transport stopped there; make a new one on every "
              "rank)");
  // A neighbour that failed may have sent this step before it did: do not finish it unawares.
  check_aborted("starting ring step " + std::to_string(tag));
  mover_->begin(send, recv);
  const uint64_t id = started_++;
  const auto bytes = static_cast<int64_t>(send.nbytes());
  sends_.push_back({static_cast<std::byte*>(send.data_ptr()), bytes, 0, id, tag, send});
  receives_.push_back({static_cast<std::byte*>(recv.data_ptr()), bytes, 0, id, tag, recv});
  progress();  // the peer may be waiting for this already
  return std::make_unique<SlotExchange>(shared_from_this(), id);
}

void SlotRing::wait(uint64_t exchange) {
  using Clock = std::chrono::steady_clock;
  std::lock_guard<std::mutex> lock(mutex_);
  auto last_move = Clock::now(), last_check = last_move;
  for (int64_t idle = 0; sent_ <= exchange || received_ <= exchange; ++idle) {
    TORCH_CHECK(broken_.empty(), broken_);
    if (progress()) {
      idle = -1;
      last_move = Clock::now();
      continue;
    }
    const auto now = Clock::now();
    if (now - last_check > std::chrono::milliseconds(5)) {  // syscalls: not on every spin
      check_stalled(exchange, std::chrono::duration<double>(now - last_move).count());
      last_check = now;
    }
    back_off(idle);
  }
  mover_->end();
}

bool SlotRing::progress() {
  bool moved = false;
  while (try_send()) moved = true;
  while (try_receive()) moved = true;
  return moved;
}

bool SlotRing::try_send() {
  if (sends_.empty()) return false;
  Message& message = sends_.front();
  const uint64_t fragment = send_fragment_;
  const auto slots = static_cast<uint64_t>(options_.slots);
  const int64_t slot = static_cast<int64_t>(fragment % slots);
  // Back-pressure: the slot's previous fragment (fragment - slots) must have been read out.
  if (options_.backpressure && fragment >= slots &&
      next_->consumed[slot].fragment.load(std::memory_order_acquire) < fragment + 1 - slots) {
    if (!stalled_send_) ++sender_stalls_;
    stalled_send_ = true;
    return false;
  }
  stalled_send_ = false;
  const int64_t bytes = std::min(options_.slot_bytes, message.bytes - message.done);
  mover_->write(slot, message.data + message.done, bytes);
  Published& published = next_->published[slot];
  published.exchange.store(message.exchange, std::memory_order_relaxed);
  published.message_bytes.store(static_cast<uint64_t>(message.bytes), std::memory_order_relaxed);
  published.fragment.store(fragment + 1, std::memory_order_release);  // after the payload
  ++send_fragment_;
  message.done += bytes;
  if (message.done == message.bytes) {  // an empty message is one empty fragment
    sends_.pop_front();
    ++sent_;
  }
  return true;
}

bool SlotRing::try_receive() {
  if (receives_.empty()) return false;
  Message& message = receives_.front();
  const uint64_t fragment = receive_fragment_;
  const int64_t slot = static_cast<int64_t>(fragment % static_cast<uint64_t>(options_.slots));
  Published& published = own_->published[slot];
  const uint64_t seen = published.fragment.load(std::memory_order_acquire);
  if (seen < fragment + 1) return false;
  check_fragment(message, fragment, seen);
  const int64_t bytes = std::min(options_.slot_bytes, message.bytes - message.done);
  mover_->read(slot, message.data + message.done, bytes);
  // Overwritten while we copied it out? Only possible without back-pressure (a seqlock check).
  std::atomic_thread_fence(std::memory_order_acquire);
  if (published.fragment.load(std::memory_order_relaxed) != seen) {
    check_fragment(message, fragment, published.fragment.load(std::memory_order_relaxed));
  }
  own_->consumed[slot].fragment.store(fragment + 1, std::memory_order_release);
  ++receive_fragment_;
  message.done += bytes;
  if (message.done == message.bytes) {
    receives_.pop_front();
    ++received_;
  }
  return true;
}

}  // namespace parallelkit
