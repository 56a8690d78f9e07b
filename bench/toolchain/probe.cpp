// Toolchain probe for bench/gpu_check.sh: does a module built by this compiler, loaded into
// torch's process, build c10::str messages and throw c10 errors without crashing? (On the
// 2026-12-04 lease, the extension built by the image's default compiler crashed on both.)
#include <pybind11/pybind11.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

std::string reason(int64_t head_dim) { return c10::str("head_dim ", head_dim, " (kernels: 64)"); }

void check(int64_t head_dim) {
  TORCH_CHECK_VALUE(head_dim == 64, "head_dim must be 64, got ", head_dim);
}

PYBIND11_MODULE(PROBE_NAME, m) {
  m.def("reason", &reason);
  m.def("check", &check);
}
