#include "ring/c10d_transport.h"

#include <vector>

namespace parallelkit {
namespace {

using WorkPtr = c10::intrusive_ptr<c10d::Work>;

struct WorkExchange final : Exchange {
  std::vector<WorkPtr> works;
  // On NCCL wait() only makes the current stream wait for the communication stream: the host
  // does not block, and the matmuls already queued keep the GPU busy.
  void wait() override {
    for (auto& work : works) work->wait();
    works.clear();
  }
};

}  // namespace

C10dTransport::C10dTransport(ProcessGroupPtr pg)
    : pg_(std::move(pg)), ring_(pg_->getRank(), pg_->getSize()) {}

ExchangePtr C10dTransport::start(const at::Tensor& send, const at::Tensor& recv, int64_t tag) {
  check_exchange_buffers(send, recv);
  std::vector<at::Tensor> send_list{send};
  std::vector<at::Tensor> recv_list{recv};
  const auto next = static_cast<int>(ring_.next), prev = static_cast<int>(ring_.prev);
  auto exchange = std::make_unique<WorkExchange>();
  const auto device_type = send.device().type();
  if (device_type == c10::DeviceType::CUDA) {
    // One NCCL group: with two ranks next == prev, and a lone blocking send to a peer that is
    // itself sending first would never be matched.
    pg_->startCoalescing(device_type);
    pg_->send(send_list, next, static_cast<int>(tag));
    pg_->recv(recv_list, prev, static_cast<int>(tag));
    exchange->works.push_back(pg_->endCoalescing(device_type));
  } else {
    // gloo: both are asynchronous and progress on gloo's threads while this one computes.
    exchange->works.push_back(pg_->send(send_list, next, static_cast<int>(tag)));
    exchange->works.push_back(pg_->recv(recv_list, prev, static_cast<int>(tag)));
  }
  return exchange;
}

TransportPtr transport_for(const ProcessGroupPtr& pg, TransportPtr transport, const char* op) {
  TORCH_CHECK(pg, op, ": the process group is None; pass the group the ring runs over");
  if (!transport) return std::make_shared<C10dTransport>(pg);
  const Ring& ring = transport->ring();
  TORCH_CHECK(ring.rank == pg->getRank() && ring.size == pg->getSize(), op, ": the ",
              transport->name(), " transport was made for rank ", ring.rank, " of a ring of ",
              ring.size, " but the group has this process at rank ", pg->getRank(), " of ",
              pg->getSize(), "; pass the transport made for this group");
  return transport;
}

}  // namespace parallelkit
