// Optional tensor arguments (Tensor? in the op schemas), as the wrappers of both backends use them.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace vdproj {

// As a pointer: nullptr when absent (the checks of checks.h skip absent inputs).
inline const at::Tensor* opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// Its data, or nullptr when absent (an optional bias of a kernel).
inline const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

inline std::optional<at::Tensor> opt_contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// Back from a pointer (as the checks' input structs hold them) to an optional, sharing storage.
inline std::optional<at::Tensor> opt_tensor(const at::Tensor* t) {
  if (t == nullptr) return std::nullopt;
  return *t;
}

inline std::optional<at::Tensor> opt_contiguous(const at::Tensor* t) {
  if (t == nullptr) return std::nullopt;
  return t->contiguous();
}

}  // namespace vdproj
