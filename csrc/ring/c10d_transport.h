// The ring over a c10d::ProcessGroup's send/recv: NCCL across GPUs and nodes, gloo on CPU.
// Back-pressure needs no protocol here: a message lands in the buffer its receiver posted.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "ring/transport.h"

namespace parallelkit {

using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

class C10dTransport final : public RingTransport {
 public:
  explicit C10dTransport(ProcessGroupPtr pg);
  const Ring& ring() const override { return ring_; }
  std::string name() const override { return "c10d"; }
  ExchangePtr start(const at::Tensor& send, const at::Tensor& recv, int64_t tag) override;

 private:
  ProcessGroupPtr pg_;
  Ring ring_;
};

// The transport an op runs on: `transport` when given (checked against pg), else c10d over pg.
TransportPtr transport_for(const ProcessGroupPtr& pg, TransportPtr transport, const char* op);

}  // namespace parallelkit
