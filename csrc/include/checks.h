// Argument checks shared by every op. Each message names the argument, what was found and the
// fix, because the caller sees only this text and the Python line that called the op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

namespace parallelkit {

// "torch.float32", the spelling a Python caller types, rather than c10's "Float".
inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got shape ", t.sizes(),
              " with strides ", t.strides(), "; pass ", name, ".contiguous()");
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move both to the same device");
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected,
                        const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, name, " must be ", dtype_name(expected), " (", why,
              "), got ", dtype_name(t.scalar_type()), "; convert it with ", name, ".to(",
              dtype_name(expected), ")");
}

}  // namespace parallelkit
