// The shm transport's mover: fragments are memcpy'd into the next rank's slots, which live in its
// shared-memory segment, and out of ours. Synchronous, so "published" means "the bytes are there".
#include <cstring>

#include "ring/slot_ring.h"

namespace parallelkit {
namespace {

class HostMover final : public SlotMover {
 public:
  HostMover(int64_t slots, int64_t slot_bytes) : slots_(slots), slot_bytes_(slot_bytes) {}
  std::string name() const override { return "shm"; }
  int64_t segment_bytes() const override { return slots_ * slot_bytes_; }
  void connect(const std::string&, std::byte* own_payload, std::byte* next_payload) override {
    own_ = own_payload;
    next_ = next_payload;
  }
  void check(const at::Tensor& t) const override {
    TORCH_CHECK(t.device().is_cpu(), "ring transport shm moves CPU tensors, got one on ",
                t.device(), "; use the cuda_ipc or c10d transport for GPU tensors");
  }
  // An empty tensor's data pointer may be null, which memcpy must not see even for 0 bytes.
  void write(int64_t slot, const std::byte* src, int64_t bytes) override {
    if (bytes > 0) std::memcpy(next_ + slot * slot_bytes_, src, static_cast<size_t>(bytes));
  }
  void read(int64_t slot, std::byte* dst, int64_t bytes) override {
    if (bytes > 0) std::memcpy(dst, own_ + slot * slot_bytes_, static_cast<size_t>(bytes));
  }

 private:
  int64_t slots_, slot_bytes_;
  std::byte* own_ = nullptr;
  std::byte* next_ = nullptr;
};

}  // namespace

std::unique_ptr<SlotMover> make_host_mover(int64_t slots, int64_t slot_bytes) {
  return std::make_unique<HostMover>(slots, slot_bytes);
}

}  // namespace parallelkit
