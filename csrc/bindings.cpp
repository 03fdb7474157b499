// The one place that registers parallelkit._C: pybind11 functions for Python-only helpers, and
// TORCH_LIBRARY ops (torch.ops.parallelkit.*) for anything a model calls, so torch.compile and
// opcheck see them.
#include <torch/csrc/utils/pybind.h>  // casters for at::Tensor, torch.device, ProcessGroup holders
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "attention_merge/merge.h"
#include "distributed/group_membership.h"
#include "overlap/overlap.h"
#include "overlap/overlap_ops.h"
#include "ring/c10d_transport.h"
#include "ring/slot_ring.h"

namespace {

#ifdef PARALLELKIT_WITH_CUDA
constexpr bool kCudaCompiled = true;
constexpr const char* kCudaArches = PARALLELKIT_CUDA_ARCHES;  // "9.0;10.0", set by setup.py
#else
constexpr bool kCudaCompiled = false;
constexpr const char* kCudaArches = "";
#endif

std::vector<std::string> cuda_arches() {
  std::vector<std::string> arches;
  std::istringstream list(kCudaArches);
  for (std::string arch; std::getline(list, arch, ';');) {
    if (!arch.empty()) arches.push_back(arch);
  }
  return arches;
}

// Ring transports for orchestration written in Python (ring attention calls Triton kernels
// between start and wait, so its loop lives where those kernels are launched) and for the
// overlap ops above. parallelkit/ops/ring_transport.py makes and caches them per group.
void bind_ring_transports(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace parallelkit;
  py::class_<Exchange>(m, "RingExchange")
      .def("wait", &Exchange::wait, py::call_guard<py::gil_scoped_release>(),
           "Block (gloo, shm) or order the current stream (NCCL, CUDA IPC) until the exchange "
           "has finished.");
  py::class_<RingTransport, TransportPtr>(m, "RingTransport")
      .def("start", &RingTransport::start, py::arg("send"), py::arg("recv"), py::arg("tag"),
           py::call_guard<py::gil_scoped_release>(),
           "Send `send` to the next rank and receive `recv` from the previous one, "
           "asynchronously; returns a RingExchange to wait() on.")
      .def_property_readonly("name", &RingTransport::name)
      .def_property_readonly("rank", [](const RingTransport& t) { return t.ring().rank; })
      .def_property_readonly("size", [](const RingTransport& t) { return t.ring().size; });
  py::class_<C10dTransport, RingTransport, std::shared_ptr<C10dTransport>>(m, "C10dRingTransport")
      .def(py::init<ProcessGroupPtr>(), py::arg("pg"));
  py::class_<SlotRing, RingTransport, std::shared_ptr<SlotRing>>(m, "SlotRingTransport")
      .def(py::init([](const std::string& kind, int64_t rank, int64_t size, int64_t slots,
                       int64_t slot_bytes, double timeout_s, int64_t device, bool backpressure) {
             return make_slot_ring(kind, {rank, size, slots, slot_bytes, timeout_s, backpressure},
                                   device);
           }),
           py::arg("kind"), py::arg("rank"), py::arg("size"), py::arg("slots"),
           py::arg("slot_bytes"), py::arg("timeout_s"), py::arg("device") = -1,
           py::arg("backpressure") = true,
           "Phase 1 of a shm or cuda_ipc ring: this rank's slots. Then connect(), then unlink().")
      .def("address", [](const SlotRing& ring) { return py::bytes(ring.address()); })
      .def("connect",
           [](SlotRing& ring, const std::string& next_address, int64_t prev_pid,
              std::string prev_label, int64_t next_pid, std::string next_label) {
             ring.connect(next_address, {prev_pid, std::move(prev_label)},
                          {next_pid, std::move(next_label)});
           },
           py::arg("next_address"), py::arg("prev_pid"), py::arg("prev_label"),
           py::arg("next_pid"), py::arg("next_label"))
      .def("unlink", &SlotRing::unlink)
      .def_property_readonly("sender_stalls", &SlotRing::sender_stalls,
                             "Fragments whose slot was still full: back-pressure at work.");
  m.def("register_ring_transport", &register_ring_transport, py::arg("group"),
        py::arg("device_type"), py::arg("transport"),
        "The transport torch.ops.parallelkit's overlap ops use for the group named `group` "
        "and tensors of `device_type` ('cpu' or 'cuda').");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "parallelkit native extension; use it through parallelkit.ops and parallelkit.build_info";
  // Collective: the GIL is released so other Python threads (a harness watchdog, a dataloader)
  // run while this rank waits for the rest of the group.
  m.def("group_membership", &parallelkit::group_membership, py::arg("pg"),
        py::arg("global_rank"), py::arg("world_size"), py::arg("device"),
        py::call_guard<py::gil_scoped_release>(),
        "[world_size] int64 tensor on device (a torch.device), 1 at each global rank in pg.");
  // Overlap ops take the group like the collective above and block (on gloo, shm) or enqueue
  // (on NCCL, CUDA IPC) their whole ring, so they release the GIL too.
  m.def("all_gather_matmul", &parallelkit::all_gather_matmul, py::arg("x_shard"),
        py::arg("weight"), py::arg("pg"), py::arg("chunks_per_rank") = 1,
        py::arg("transport") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "(y [tp*m, n], gathered x [tp*m, k]) = all_gather(x_shard [m, k]) @ weight[n, k]^T, "
        "communication overlapped with the matmuls; over `transport` (a RingTransport of pg) "
        "or, when None, pg's send/recv.");
  m.def("matmul_reduce_scatter", &parallelkit::matmul_reduce_scatter, py::arg("x"),
        py::arg("weight"), py::arg("pg"), py::arg("chunks_per_rank") = 1,
        py::arg("transport") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "y [m, n] = this rank's rows of reduce_scatter(x [tp*m, k] @ weight[n, k]^T), "
        "communication overlapped with the matmuls; transport as for all_gather_matmul.");
  bind_ring_transports(m);
  m.def("cuda_compiled", [] { return kCudaCompiled; }, "Whether the CUDA kernels were built.");
  m.def("cuda_arches", &cuda_arches, "TORCH_CUDA_ARCH_LIST entries compiled, e.g. ['9.0'].");
}

TORCH_LIBRARY(parallelkit, m) {
  m.def("merge_attention_partials_(Tensor(a!) out, Tensor(b!) lse, Tensor block_out, "
        "Tensor block_lse) -> ()");
  // The overlap rings, the group by name; their fake kernels are in parallelkit/ops/overlap.py.
  m.def("all_gather_matmul(Tensor x_shard, Tensor weight, str group, int chunks_per_rank) -> "
        "(Tensor, Tensor)");
  m.def("matmul_reduce_scatter(Tensor x, Tensor weight, str group, int chunks_per_rank) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(parallelkit, CPU, m) {
  m.impl("merge_attention_partials_", &parallelkit::merge_attention_partials_cpu);
  m.impl("all_gather_matmul", &parallelkit::all_gather_matmul_op);
  m.impl("matmul_reduce_scatter", &parallelkit::matmul_reduce_scatter_op);
}

#ifdef PARALLELKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(parallelkit, CUDA, m) {
  m.impl("merge_attention_partials_", &parallelkit::merge_attention_partials_cuda);
  m.impl("all_gather_matmul", &parallelkit::all_gather_matmul_op);
  m.impl("matmul_reduce_scatter", &parallelkit::matmul_reduce_scatter_op);
}
#endif
