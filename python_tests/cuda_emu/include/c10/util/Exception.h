// Stand-in for c10/util/Exception.h in the CUDA emulator (no torch here): TORCH_CHECK and
// friends throw std::runtime_error with the message c10 would build.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace emu_c10 {
inline void append(std::ostringstream&) {}
template <typename T, typename... R>
void append(std::ostringstream& os, const T& first, const R&... rest) {
  os << first;
  append(os, rest...);
}
template <typename... A>
[[noreturn]] void check_failed(const char* kind, const char* file, int line, const char* cond,
                               const A&... args) {
  std::ostringstream os;
  append(os, args...);
  if (os.str().empty()) os << "Expected " << cond << " to be true, but got false.";
  throw std::runtime_error(std::string(kind) + " at " + file + ":" + std::to_string(line) + ": " +
                           os.str());
}
}  // namespace emu_c10

#define TORCH_CHECK(cond, ...) \
  do { if (!(cond)) ::emu_c10::check_failed("TORCH_CHECK", __FILE__, __LINE__, #cond, ##__VA_ARGS__); } while (0)
#define TORCH_CHECK_VALUE(cond, ...) \
  do { if (!(cond)) ::emu_c10::check_failed("TORCH_CHECK_VALUE", __FILE__, __LINE__, #cond, ##__VA_ARGS__); } while (0)
#define TORCH_CHECK_INDEX(cond, ...) \
  do { if (!(cond)) ::emu_c10::check_failed("TORCH_CHECK_INDEX", __FILE__, __LINE__, #cond, ##__VA_ARGS__); } while (0)
#define TORCH_INTERNAL_ASSERT(cond, ...) \
  do { if (!(cond)) ::emu_c10::check_failed("TORCH_INTERNAL_ASSERT", __FILE__, __LINE__, #cond, ##__VA_ARGS__); } while (0)
