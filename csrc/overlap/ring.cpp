#include "overlap/ring.h"

namespace parallelkit {

std::vector<WorkPtr> start_exchange(const ProcessGroupPtr& pg, const Ring& ring, at::Tensor send,
                                    at::Tensor recv, int64_t tag) {
  std::vector<at::Tensor> send_list{std::move(send)};
  std::vector<at::Tensor> recv_list{std::move(recv)};
  const auto device_type = send_list[0].device().type();
  if (device_type == c10::DeviceType::CUDA) {
    pg->startCoalescing(device_type);
    pg->send(send_list, static_cast<int>(ring.next), static_cast<int>(tag));
    pg->recv(recv_list, static_cast<int>(ring.prev), static_cast<int>(tag));
    return {pg->endCoalescing(device_type)};
  }
  // gloo: both are asynchronous and progress on gloo's threads while this one computes.
  return {pg->send(send_list, static_cast<int>(ring.next), static_cast<int>(tag)),
          pg->recv(recv_list, static_cast<int>(ring.prev), static_cast<int>(tag))};
}

PendingExchange start_ring_exchange(const ProcessGroupPtr& pg, const at::Tensor& send,
                                    const at::Tensor& recv, int64_t tag) {
  TORCH_CHECK(pg, "start_ring_exchange: the process group is None");
  TORCH_CHECK(send.is_contiguous() && recv.is_contiguous(),
              "start_ring_exchange: send and recv must be contiguous; pass .contiguous() buffers");
  TORCH_CHECK(send.sizes() == recv.sizes() && send.scalar_type() == recv.scalar_type() &&
                  send.device() == recv.device(),
              "start_ring_exchange: send ", send.sizes(), " ", send.scalar_type(), " on ",
              send.device(), " and recv ", recv.sizes(), " ", recv.scalar_type(), " on ",
              recv.device(), " must match: every rank sends what its neighbour receives");
  return {start_exchange(pg, Ring(pg), send, recv, tag)};
}

void wait_all(std::vector<WorkPtr>& works) {
  // On NCCL wait() only makes the current stream wait for the communication stream: the host
  // does not block, and the matmuls already queued keep the GPU busy.
  for (auto& work : works) work->wait();
  works.clear();
}

}  // namespace parallelkit
