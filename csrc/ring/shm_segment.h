// A POSIX shared-memory segment (shm_open + mmap). Its owner creates it and unlinks the name
// once the ring neighbour that needs it has mapped it too, so a crash leaves nothing in /dev/shm.
#pragma once

#include <cstddef>
#include <string>

namespace parallelkit {

class ShmSegment {
 public:
  ShmSegment() = default;
  // A new segment of `bytes` zeroed bytes, backed by memory now (posix_fallocate): a full
  // /dev/shm is a clear error here, not a SIGBUS on the first write into an unbacked page.
  static ShmSegment create(const std::string& name, size_t bytes);
  // Another process's segment; fails clearly unless it exists and holds `bytes` at least.
  static ShmSegment open(const std::string& name, size_t bytes);
  ShmSegment(ShmSegment&& other) noexcept { *this = std::move(other); }
  ShmSegment& operator=(ShmSegment&& other) noexcept;
  ~ShmSegment();

  void unlink();  // the owner, once every process that needs the name has opened it
  std::byte* data() const { return data_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  std::byte* data_ = nullptr;
  size_t bytes_ = 0;
  bool linked_ = false;  // we created it and have not unlinked the name yet
};

}  // namespace parallelkit
