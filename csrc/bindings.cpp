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
  // Overlap ops take the group like the collective above and block (on gloo) or enqueue (on
  // NCCL) their whole ring, so they release the GIL too.
  m.def("all_gather_matmul", &parallelkit::all_gather_matmul, py::arg("x_shard"),
        py::arg("weight"), py::arg("pg"), py::arg("chunks_per_rank") = 1,
        py::call_guard<py::gil_scoped_release>(),
        "(y [tp*m, n], gathered x [tp*m, k]) = all_gather(x_shard [m, k]) @ weight[n, k]^T, "
        "communication overlapped with the matmuls.");
  m.def("matmul_reduce_scatter", &parallelkit::matmul_reduce_scatter, py::arg("x"),
        py::arg("weight"), py::arg("pg"), py::arg("chunks_per_rank") = 1,
        py::call_guard<py::gil_scoped_release>(),
        "y [m, n] = this rank's rows of reduce_scatter(x [tp*m, k] @ weight[n, k]^T), "
        "communication overlapped with the matmuls.");
  // One double-buffered ring step for orchestration written in Python (ring attention calls
  // Triton kernels between start and wait, so its loop lives where those kernels are launched).
  py::class_<parallelkit::PendingExchange>(m, "PendingExchange")
      .def("wait", &parallelkit::PendingExchange::wait, py::call_guard<py::gil_scoped_release>(),
           "Block (gloo) or order the current stream (NCCL) until the exchange has finished.");
  m.def("start_ring_exchange", &parallelkit::start_ring_exchange, py::arg("pg"), py::arg("send"),
        py::arg("recv"), py::arg("tag"), py::call_guard<py::gil_scoped_release>(),
        "Send `send` to the next rank of pg and receive `recv` from the previous one, "
        "asynchronously; returns a PendingExchange.");
  m.def("cuda_compiled", [] { return kCudaCompiled; }, "Whether the CUDA kernels were built.");
  m.def("cuda_arches", &cuda_arches, "TORCH_CUDA_ARCH_LIST entries compiled, e.g. ['9.0'].");
}

TORCH_LIBRARY(parallelkit, m) {
  m.def("merge_attention_partials_(Tensor(a!) out, Tensor(b!) lse, Tensor block_out, "
        "Tensor block_lse) -> ()");
}

TORCH_LIBRARY_IMPL(parallelkit, CPU, m) {
  m.impl("merge_attention_partials_", &parallelkit::merge_attention_partials_cpu);
}

#ifdef PARALLELKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(parallelkit, CUDA, m) {
  m.impl("merge_attention_partials_", &parallelkit::merge_attention_partials_cuda);
}
#endif
