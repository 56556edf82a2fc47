// What a region of code asks of the device, counted op by op: every outermost ATen op (an op's
// own sub-ops are its implementation) with the bytes of its tensor arguments and results and the
// FLOPs of matrix products and attention. The counts are the same on a CPU and a GPU (in the
// dtypes the region computes in), so a step's launches and traffic can be studied without one.
#include "c_abi.hpp"

#include <ATen/core/function_schema.h>
#include <ATen/record_function.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_set>

namespace {
struct Totals {
  int64_t calls = 0;
  int64_t kernels = 0;
  double bytes = 0;
  double flops = 0;
};

std::mutex totals_mutex;
std::map<std::string, Totals> totals;
at::CallbackHandle handle = 0;
thread_local int depth = 0;

struct Call : at::ObserverContext {
  bool transparent = false;
  bool outermost = false;
  double in_bytes = 0;
  double flops = 0;
  // For convolutions: FLOPs per output element, known once the output is.
  double flops_per_output = 0;
  std::unordered_set<const void*> in_storages;
  // An out= variant: its results are arguments it writes.
  bool writes_into_arguments = false;
};

template <typename F>
void each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) each_tensor(e, f);
  }
}

const at::Tensor* tensor_at(c10::ArrayRef<const c10::IValue> in, size_t i) {
  return i < in.size() && in[i].isTensor() ? &in[i].toTensor() : nullptr;
}

// FLOPs of the ops that do matrix products, from their inputs (2 per multiply-add).
void count_flops(const std::string& name, c10::ArrayRef<const c10::IValue> in, Call& call) {
  auto product = [&](size_t a, size_t b, bool b_rows_out) {
    auto x = tensor_at(in, a), y = tensor_at(in, b);
    if (x == nullptr || y == nullptr || y->dim() < 1) return;
    int64_t out_cols = b_rows_out ? y->size(0) : y->size(-1);
    call.flops = 2.0 * static_cast<double>(x->numel()) * static_cast<double>(out_cols);
  };
  if (name == "aten::mm" || name == "aten::bmm" || name == "aten::matmul") {
    product(0, 1, false);
  } else if (name == "aten::addmm" || name == "aten::baddbmm" || name == "aten::addbmm") {
    product(1, 2, false);
  } else if (name == "aten::linear") {
    product(0, 1, true);
  } else if (name.find("scaled_dot_product") != std::string::npos) {
    // Forward: q k^T and p v (4 N H T S D); backward (flash-style): 5 such products.
    bool backward = name.find("backward") != std::string::npos;
    auto q = tensor_at(in, backward ? 1 : 0), k = tensor_at(in, backward ? 2 : 1);
    if (q == nullptr || k == nullptr || k->dim() < 2) return;
    call.flops = (backward ? 10.0 : 4.0) * static_cast<double>(q->numel()) *
                 static_cast<double>(k->size(-2));
  } else if (name == "aten::conv2d" || name == "aten::convolution" ||
             name == "aten::_convolution") {
    auto w = tensor_at(in, 1);
    if (w != nullptr && w->dim() > 0 && w->size(0) > 0)
      call.flops_per_output = 2.0 * static_cast<double>(w->numel() / w->size(0));
  }
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  auto call = std::make_unique<Call>();
  // Tensor::backward is itself an op, and the autograd engine wraps each node it runs in a
  // range: see through both, so the backward pass's ops count as outermost ones.
  if (std::strcmp(fn.name(), "aten::_backward") == 0 ||
      std::strncmp(fn.name(), "autograd::", 10) == 0) {
    call->transparent = true;
    return call;
  }
  call->outermost = depth++ == 0;
  if (!call->outermost) return call;
  // An out= variant's `out` arguments are written, not read: they count once, as its results.
  auto schema = fn.operator_schema();
  auto inputs = fn.inputs();
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (schema && i < schema->arguments().size() && schema->arguments()[i].is_out()) {
      call->writes_into_arguments = true;
      continue;
    }
    each_tensor(inputs[i], [&](const at::Tensor& t) {
      if (!t.defined()) return;
      call->in_bytes += static_cast<double>(t.numel() * t.element_size());
      if (t.has_storage()) call->in_storages.insert(t.storage().unsafeGetStorageImpl());
    });
  }
  count_flops(fn.name(), fn.inputs(), *call);
  return call;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* ctx) {
  auto call = static_cast<Call*>(ctx);
  if (call != nullptr && call->transparent) return;
  --depth;
  if (call == nullptr || !call->outermost) return;
  std::string name = fn.name();
  double out_bytes = 0, out_elements = 0;
  bool fresh_output = false;
  for (const auto& v : fn.outputs()) {
    each_tensor(v, [&](const at::Tensor& t) {
      if (!t.defined()) return;
      out_bytes += static_cast<double>(t.numel() * t.element_size());
      out_elements += static_cast<double>(t.numel());
      if (!t.has_storage() || !call->in_storages.count(t.storage().unsafeGetStorageImpl()))
        fresh_output = true;
    });
  }
  // A view (reshape without a copy, permute, select, ...) returns its input's storage and runs
  // no kernel; an in-place op (trailing '_') or an out= variant returns it too but does.
  // Allocations run none.
  bool in_place = !name.empty() && name.back() == '_' && name != "aten::detach_" &&
                  name != "aten::requires_grad_";
  bool allocation = name.rfind("aten::empty", 0) == 0;
  bool kernel = !allocation && (fresh_output || in_place || call->writes_into_arguments);
  std::lock_guard<std::mutex> lock(totals_mutex);
  auto& t = totals[name];
  t.calls += 1;
  if (kernel) {
    t.kernels += 1;
    t.bytes += call->in_bytes + out_bytes;
    t.flops += call->flops + call->flops_per_output * out_elements;
  }
}
}  // namespace

extern "C" {

// Starts counting (clearing earlier counts).
int mfr_op_profile_start(char* err, size_t len) {
  return guarded(err, len, [&] {
    TORCH_CHECK(handle == 0, "an op profile is already running");
    {
      std::lock_guard<std::mutex> lock(totals_mutex);
      totals.clear();
    }
    handle = at::addGlobalCallback(at::RecordFunctionCallback(on_start, on_end)
                                       .needsInputs(true)
                                       .needsOutputs(true)
                                       .scopes({at::RecordScope::FUNCTION}));
  });
}

// Stops counting; *table (free with mfr_op_profile_free) gets one line per op name:
// name, calls, kernel calls, bytes, FLOPs, tab-separated.
int mfr_op_profile_stop(char** table, char* err, size_t len) {
  return guarded(err, len, [&] {
    TORCH_CHECK(handle != 0, "no op profile is running");
    at::removeCallback(handle);
    handle = 0;
    std::ostringstream out;
    out.precision(17);
    std::lock_guard<std::mutex> lock(totals_mutex);
    for (const auto& [name, t] : totals)
      out << name << '\t' << t.calls << '\t' << t.kernels << '\t' << t.bytes << '\t' << t.flops
          << '\n';
    *table = strdup(out.str().c_str());
  });
}

void mfr_op_profile_free(char* table) { free(table); }
}
