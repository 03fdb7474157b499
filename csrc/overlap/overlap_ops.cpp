// See overlap_ops.h.
#include "overlap/overlap_ops.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <mutex>
#include <unordered_map>

#include "overlap/overlap.h"

namespace parallelkit {
namespace {

std::mutex registry_mutex;
std::unordered_map<std::string, TransportPtr>& registry() {
  static std::unordered_map<std::string, TransportPtr> transports;
  return transports;
}

std::string key(const std::string& group, const std::string& device_type) {
  return group + "|" + device_type;
}

// The registered transport, or null (the op then rings over the group's send/recv).
TransportPtr transport_for(const std::string& group, const at::Tensor& t) {
  const std::string type = t.is_cuda() ? "cuda" : "cpu";
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto found = registry().find(key(group, type));
  return found == registry().end() ? nullptr : found->second;
}

}  // namespace

void register_ring_transport(const std::string& group, const std::string& device_type,
                             TransportPtr transport) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry()[key(group, device_type)] = std::move(transport);
}

std::tuple<at::Tensor, at::Tensor> all_gather_matmul_op(const at::Tensor& x_shard,
                                                        const at::Tensor& weight,
                                                        c10::string_view group,
                                                        int64_t chunks_per_rank) {
  const std::string name(group);
  return all_gather_matmul(x_shard, weight, c10d::resolve_process_group(name), chunks_per_rank,
                           transport_for(name, x_shard));
}

at::Tensor matmul_reduce_scatter_op(const at::Tensor& x, const at::Tensor& weight,
                                    c10::string_view group, int64_t chunks_per_rank) {
  const std::string name(group);
  return matmul_reduce_scatter(x, weight, c10d::resolve_process_group(name), chunks_per_rank,
                               transport_for(name, x));
}

}  // namespace parallelkit
