#include "ring/shm_segment.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace parallelkit {
namespace {

std::byte* map(int fd, size_t bytes, const std::string& name) {
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int error = errno;
  close(fd);
  TORCH_CHECK(data != MAP_FAILED, "ring transport: mmap of shared memory ", name, " (", bytes,
              " bytes) failed: ", std::strerror(error));
  return static_cast<std::byte*>(data);
}

}  // namespace

ShmSegment ShmSegment::create(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  TORCH_CHECK(fd >= 0, "ring transport: shm_open(", name, ") failed: ", std::strerror(errno));
  const int error = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (error != 0) {
    close(fd);
    shm_unlink(name.c_str());
    TORCH_CHECK(false, "ring transport: cannot reserve ", bytes, " bytes of shared memory for ",
                name, ": ", std::strerror(error), "; free space in /dev/shm, lower "
                "PARALLELKIT_RING_SLOT_BYTES, or use PARALLELKIT_RING_TRANSPORT=c10d");
  }
  ShmSegment segment;
  segment.name_ = name;
  segment.linked_ = true;  // before map(): if it throws, the destructor still unlinks
  segment.data_ = map(fd, bytes, name);
  segment.bytes_ = bytes;
  return segment;
}

ShmSegment ShmSegment::open(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  TORCH_CHECK(fd >= 0, "ring transport: cannot open the neighbour's shared memory ", name, ": ",
              std::strerror(errno), " (is it on another machine, or in another IPC namespace?)");
  struct stat info {};
  if (fstat(fd, &info) != 0 || static_cast<size_t>(info.st_size) < bytes) {
    close(fd);
    TORCH_CHECK(false, "ring transport: the neighbour's shared memory ", name, " holds ",
                info.st_size, " bytes, fewer than the ", bytes, " this rank expects; the ranks ",
                "disagree on the slot size");
  }
  ShmSegment segment;
  segment.name_ = name;
  segment.data_ = map(fd, bytes, name);
  segment.bytes_ = bytes;
  return segment;
}

ShmSegment& ShmSegment::operator=(ShmSegment&& other) noexcept {
  std::swap(name_, other.name_);
  std::swap(data_, other.data_);
  std::swap(bytes_, other.bytes_);
  std::swap(linked_, other.linked_);
  return *this;
}

ShmSegment::~ShmSegment() {
  unlink();
  if (data_ != nullptr) munmap(data_, bytes_);
}

void ShmSegment::unlink() {
  if (linked_) shm_unlink(name_.c_str());
  linked_ = false;
}

}  // namespace parallelkit
