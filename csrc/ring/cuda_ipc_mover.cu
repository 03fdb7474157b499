// The cuda_ipc transport's mover: each rank's receive slots are GPU memory it allocated, which
// its previous rank opens with cudaIpcOpenMemHandle and fills with cudaMemcpyAsync on a side
// stream (the copy engine: the GEMMs keep every SM). Interprocess events carry "data ready"
// (recorded by the sender after its copy) and "slot free" (recorded by the receiver after
// copying out), and the GPU waits on them. The host protocol (slot_ring.cpp) only publishes a
// fragment after its event is recorded, so every stream wait targets a record already made,
// and an event is never re-recorded before the peer's wait on the previous record is enqueued.
// Only light headers here: this CUDA toolkit has no cuBLAS headers, which torch/extension.h needs.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <vector>

#include "ring/slot_ring.h"

namespace parallelkit {
namespace {

void check_cuda(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "ring transport cuda_ipc: ", what, " failed: ",
              cudaGetErrorString(error));
}

class CudaIpcMover final : public SlotMover {
 public:
  CudaIpcMover(int device, int64_t slots, int64_t slot_bytes)
      : device_(static_cast<c10::DeviceIndex>(device)), slots_(slots), slot_bytes_(slot_bytes),
        send_stream_(c10::cuda::getStreamFromPool(false, device_)),
        recv_stream_(c10::cuda::getStreamFromPool(false, device_)) {
    c10::cuda::CUDAGuard guard(device_);
    check_cuda(cudaMalloc(&own_slots_, static_cast<size_t>(slots * slot_bytes)), "cudaMalloc slots");
    own_ready_ = make_events(slots, cudaEventInterprocess | cudaEventDisableTiming);
    own_free_ = make_events(slots, cudaEventInterprocess | cudaEventDisableTiming);
    order_ = make_events(1, cudaEventDisableTiming)[0];
  }

  ~CudaIpcMover() override {  // errors ignored: this may run while CUDA shuts down
    int current = 0;
    cudaGetDevice(&current);
    cudaSetDevice(device_);
    for (auto events : {&own_ready_, &own_free_, &next_ready_, &next_free_}) {
      for (cudaEvent_t event : *events) cudaEventDestroy(event);
    }
    if (order_ != nullptr) cudaEventDestroy(order_);
    if (next_slots_ != nullptr) cudaIpcCloseMemHandle(next_slots_);
    if (own_slots_ != nullptr) cudaFree(own_slots_);
    cudaSetDevice(current);
  }

  std::string name() const override { return "cuda_ipc"; }

  // [memory handle][slots "ready" event handles][slots "free" event handles]
  std::string address() const override {
    std::string bytes(sizeof(cudaIpcMemHandle_t), '\0');
    cudaIpcMemHandle_t memory;
    check_cuda(cudaIpcGetMemHandle(&memory, own_slots_), "cudaIpcGetMemHandle");
    std::memcpy(bytes.data(), &memory, sizeof(memory));
    for (auto events : {&own_ready_, &own_free_}) {
      for (cudaEvent_t event : *events) {
        cudaIpcEventHandle_t handle;
        check_cuda(cudaIpcGetEventHandle(&handle, event), "cudaIpcGetEventHandle");
        bytes.append(reinterpret_cast<const char*>(&handle), sizeof(handle));
      }
    }
    return bytes;
  }

  void connect(const std::string& next, std::byte*, std::byte*) override {
    const size_t events = 2 * static_cast<size_t>(slots_);
    TORCH_CHECK(next.size() == sizeof(cudaIpcMemHandle_t) + events * sizeof(cudaIpcEventHandle_t),
                "ring transport cuda_ipc: the next rank's address has ", next.size(), " bytes; "
                "the ranks disagree on the number of slots");
    c10::cuda::CUDAGuard guard(device_);
    cudaIpcMemHandle_t memory;
    std::memcpy(&memory, next.data(), sizeof(memory));
    check_cuda(cudaIpcOpenMemHandle(&next_slots_, memory, cudaIpcMemLazyEnablePeerAccess),
               "cudaIpcOpenMemHandle (the next rank's slots)");
    const char* handles = next.data() + sizeof(memory);
    for (size_t i = 0; i < events; ++i) {
      cudaIpcEventHandle_t handle;
      std::memcpy(&handle, handles + i * sizeof(handle), sizeof(handle));
      cudaEvent_t event;
      check_cuda(cudaIpcOpenEventHandle(&event, handle), "cudaIpcOpenEventHandle");
      (i < static_cast<size_t>(slots_) ? next_ready_ : next_free_).push_back(event);
    }
  }

  void check(const at::Tensor& t) const override {
    TORCH_CHECK(t.is_cuda() && t.device().index() == device_, "ring transport cuda_ipc was made ",
                "for cuda:", static_cast<int>(device_), ", got a tensor on ", t.device());
  }

  // The copies must follow the caller's work on the tensors, and the caching allocator must not
  // hand their memory out again before the copies ran.
  void begin(const at::Tensor& send, const at::Tensor& recv) override {
    c10::cuda::CUDAGuard guard(device_);
    check_cuda(cudaEventRecord(order_, c10::cuda::getCurrentCUDAStream(device_)), "cudaEventRecord");
    for (auto stream : {send_stream_, recv_stream_}) {
      check_cuda(cudaStreamWaitEvent(stream, order_, 0), "cudaStreamWaitEvent");
    }
    c10::cuda::CUDACachingAllocator::recordStream(send.storage().data_ptr(), send_stream_);
    c10::cuda::CUDACachingAllocator::recordStream(recv.storage().data_ptr(), recv_stream_);
  }

  void write(int64_t slot, const std::byte* src, int64_t bytes) override {
    c10::cuda::CUDAGuard guard(device_);
    // Never recorded (the slot's first use) means no wait: cudaStreamWaitEvent returns at once.
    check_cuda(cudaStreamWaitEvent(send_stream_, next_free_[slot], 0), "waiting for a free slot");
    check_cuda(cudaMemcpyAsync(static_cast<std::byte*>(next_slots_) + slot * slot_bytes_, src,
                               static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice, send_stream_),
               "cudaMemcpyAsync into the next rank's slot");
    check_cuda(cudaEventRecord(next_ready_[slot], send_stream_), "recording 'data ready'");
  }

  void read(int64_t slot, std::byte* dst, int64_t bytes) override {
    c10::cuda::CUDAGuard guard(device_);
    check_cuda(cudaStreamWaitEvent(recv_stream_, own_ready_[slot], 0), "waiting for 'data ready'");
    check_cuda(cudaMemcpyAsync(dst, static_cast<std::byte*>(own_slots_) + slot * slot_bytes_,
                               static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice, recv_stream_),
               "cudaMemcpyAsync out of this rank's slot");
    check_cuda(cudaEventRecord(own_free_[slot], recv_stream_), "recording 'slot free'");
  }

  // Like NCCL's wait: the current stream waits for the copies; the host does not.
  void end() override {
    c10::cuda::CUDAGuard guard(device_);
    const auto current = c10::cuda::getCurrentCUDAStream(device_);
    for (auto stream : {send_stream_, recv_stream_}) {
      check_cuda(cudaEventRecord(order_, stream), "cudaEventRecord");
      check_cuda(cudaStreamWaitEvent(current, order_, 0), "cudaStreamWaitEvent");
    }
  }

 private:
  static std::vector<cudaEvent_t> make_events(int64_t n, unsigned flags) {
    std::vector<cudaEvent_t> events(static_cast<size_t>(n));
    for (auto& event : events) check_cuda(cudaEventCreateWithFlags(&event, flags), "cudaEventCreate");
    return events;
  }

  c10::DeviceIndex device_;
  int64_t slots_, slot_bytes_;
  c10::cuda::CUDAStream send_stream_, recv_stream_;
  void* own_slots_ = nullptr;
  void* next_slots_ = nullptr;
  std::vector<cudaEvent_t> own_ready_, own_free_, next_ready_, next_free_;
  cudaEvent_t order_ = nullptr;  // orders the side streams and the current one
};

}  // namespace

std::unique_ptr<SlotMover> make_cuda_ipc_mover(int device, int64_t slots, int64_t slot_bytes) {
  return std::make_unique<CudaIpcMover>(device, slots, slot_bytes);
}

}  // namespace parallelkit
