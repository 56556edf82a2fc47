// What every shim entry point shares: the C ABI that never lets a C++ exception cross into
// Rust (0 on success, 1 with the exception's message in `err`), and tch's tensor handles.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstring>
#include <exception>
#include <vector>

namespace {
void write_message(char* err, size_t len, const char* msg) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, msg, len - 1);
  err[len - 1] = '\0';
}

// Runs `body`, turning any exception into the message in `err` and a return value of 1.
template <typename F>
int guarded(char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    write_message(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_message(err, len, e.what());
  } catch (...) {
    write_message(err, len, "unknown C++ exception");
  }
  return 1;
}

// tch hands tensors over as pointers to at::Tensor handles.
std::vector<at::Tensor> tensors(void* const* handles, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*static_cast<const at::Tensor*>(handles[i]));
  return out;
}
}  // namespace
