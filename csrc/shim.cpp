// The few libtorch entry points tch 0.24 does not bind, behind a C ABI that never lets a C++
// exception cross into Rust: each call returns 0 on success or 1 with the message in `err`.
#include "c_abi.hpp"
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/stack.h>

#include <dlfcn.h>
#include <cstdint>
#include <cstring>
#include <exception>

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The dtype an elementwise op of three dimensioned tensors computes in.
at::ScalarType promoted(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  return at::promoteTypes(at::promoteTypes(a.scalar_type(), b.scalar_type()), c.scalar_type());
}

// acc + big * small, `small` broadcast over dimension 1 (a per-sample (N, 1, D) factor over
// (N, T, D) tokens), `acc` either (N, T, D) or (N, 1, D): SiT's modulate and gated residual. One
// kernel forward, like addcmul; the backward is written out because addcmul's multiplies `big`
// by its `value` (1) before using it, a full-size pass for nothing. The result is computed in the
// operands' promoted dtype and written in `out_dtype`; gradients are computed in the promoted
// dtype whatever the result's, so a narrower result changes no gradient.
struct AddMulBroadcast : torch::autograd::Function<AddMulBroadcast> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& acc, const at::Tensor& big,
                            const at::Tensor& small, at::ScalarType out_dtype) {
    ctx->save_for_backward({big, small});
    auto compute = promoted(acc, big, small);
    ctx->saved_data["acc_tokens"] = acc.size(1);
    ctx->saved_data["acc_dtype"] = static_cast<int64_t>(acc.scalar_type());
    ctx->saved_data["compute_dtype"] = static_cast<int64_t>(compute);
    if (out_dtype == compute) return acc.addcmul(big, small);
    auto out = at::empty(big.sizes(), big.options().dtype(out_dtype));
    return at::addcmul_out(out, acc, big, small);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &big = saved[0], &small = saved[1];
    const auto& g = grads[0];
    auto dtype = [&](const char* key) {
      return static_cast<at::ScalarType>(ctx->saved_data[key].toInt());
    };
    auto compute = dtype("compute_dtype");
    at::Tensor d_acc, d_big, d_small;
    if (ctx->needs_input_grad(0)) {
      d_acc = ctx->saved_data["acc_tokens"].toInt() == 1 ? g.sum(1, true, compute) : g;
      d_acc = d_acc.to(dtype("acc_dtype"));
    }
    // Each product in the compute dtype, as the forward's: a factor is cast first when neither
    // it nor `g` has that dtype (in SiT only `small` ever is, and it is small).
    auto promoting = [&](const at::Tensor& x) {
      return at::promoteTypes(g.scalar_type(), x.scalar_type()) == compute ? x : x.to(compute);
    };
    if (ctx->needs_input_grad(1)) {
      if (big.scalar_type() == compute) {
        d_big = g * promoting(small);
      } else {
        // Written in `big`'s narrower dtype as computed: the product's rounding, then the
        // cast's, without the full-size intermediate.
        d_big = at::empty(big.sizes(), big.options());
        at::mul_out(d_big, g, promoting(small));
      }
    }
    if (ctx->needs_input_grad(2))
      d_small = (g * promoting(big)).sum(1, true).to(small.scalar_type());
    return {d_acc, d_big, d_small, at::Tensor()};
  }
};
}  // namespace

extern "C" {

// AddMulBroadcast::apply: acc + big * small with the backward above. With `to_autocast` set and
// autocast on for the operands' device, the result is written in autocast's dtype (the value
// autocast would round it to when a matrix product takes it); else in the promoted dtype.
int mfr_add_mul_broadcast(void* acc, void* big, void* small, int to_autocast, void** out,
                          char* err, size_t len) {
  return guarded(err, len, [&] {
    auto as = [](void* h) -> const at::Tensor& { return *static_cast<const at::Tensor*>(h); };
    auto device = as(big).device().type();
    auto dtype = to_autocast != 0 && at::autocast::is_autocast_enabled(device)
                     ? at::autocast::get_autocast_dtype(device)
                     : promoted(as(acc), as(big), as(small));
    *out = new at::Tensor(AddMulBroadcast::apply(as(acc), as(big), as(small), dtype));
  });
}

// Forward-mode AD: enter a new dual level (libtorch supports one at a time).
int mfr_fwad_enter(uint64_t* level, char* err, size_t len) {
  return guarded(err, len, [&] { *level = torch::autograd::ForwardADLevel::get_next_idx(); });
}

// Forward-mode AD: leave the level, clearing every tangent attached at it.
int mfr_fwad_exit(uint64_t level, char* err, size_t len) {
  return guarded(err, len, [&] { torch::autograd::ForwardADLevel::release_idx(level); });
}

// Peak bytes allocated on a CUDA device by the caching allocator since the last reset.
int mfr_cuda_peak_allocated(int device, int64_t* bytes, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(device);
    *bytes = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  });
}

int mfr_cuda_reset_peak(int device, char* err, size_t len) {
  return guarded(err, len, [&] {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(device);
  });
}

// TF32 for float32 matrix products and convolutions (PyTorch's allow_tf32 switches).
int mfr_set_tf32(int enabled, char* err, size_t len) {
  return guarded(err, len, [&] {
    at::globalContext().setAllowTF32CuBLAS(enabled != 0);
    at::globalContext().setAllowTF32CuDNN(enabled != 0);
  });
}

// Sets TF32 for matrix products and convolutions separately, returning the previous settings.
int mfr_swap_tf32(int matmul, int conv, int* prev_matmul, int* prev_conv, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto& ctx = at::globalContext();
    *prev_matmul = ctx.allowTF32CuBLAS() ? 1 : 0;
    *prev_conv = ctx.allowTF32CuDNN() ? 1 : 0;
    ctx.setAllowTF32CuBLAS(matmul != 0);
    ctx.setAllowTF32CuDNN(conv != 0);
  });
}

// The CUDA device's marketing name, through the driver API (no CUDA headers needed here).
int mfr_cuda_device_name(int device, char* name, size_t name_len, char* err, size_t len) {
  return guarded(err, len, [&] {
    void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "libcuda.so.1 not found");
    using InitFn = int (*)(unsigned);
    using GetFn = int (*)(int*, int);
    using NameFn = int (*)(char*, int, int);
    auto init = reinterpret_cast<InitFn>(dlsym(lib, "cuInit"));
    auto get = reinterpret_cast<GetFn>(dlsym(lib, "cuDeviceGet"));
    auto get_name = reinterpret_cast<NameFn>(dlsym(lib, "cuDeviceGetName"));
    TORCH_CHECK(init && get && get_name, "libcuda.so.1 lacks cuDeviceGetName");
    int handle = 0;
    TORCH_CHECK(init(0) == 0 && get(&handle, device) == 0, "cuDeviceGet failed for device ", device);
    TORCH_CHECK(get_name(name, static_cast<int>(name_len), handle) == 0, "cuDeviceGetName failed");
  });
}

// The device's total memory and the driver's CUDA version (e.g. 13000 for 13.0), through the
// driver API as above.
int mfr_cuda_device_facts(int device, int64_t* total_bytes, int* driver_version, char* err,
                          size_t len) {
  return guarded(err, len, [&] {
    void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "libcuda.so.1 not found");
    using InitFn = int (*)(unsigned);
    using GetFn = int (*)(int*, int);
    using TotalFn = int (*)(size_t*, int);
    using VersionFn = int (*)(int*);
    auto init = reinterpret_cast<InitFn>(dlsym(lib, "cuInit"));
    auto get = reinterpret_cast<GetFn>(dlsym(lib, "cuDeviceGet"));
    auto total = reinterpret_cast<TotalFn>(dlsym(lib, "cuDeviceTotalMem_v2"));
    auto version = reinterpret_cast<VersionFn>(dlsym(lib, "cuDriverGetVersion"));
    TORCH_CHECK(init && get && total && version, "libcuda.so.1 lacks cuDeviceTotalMem_v2");
    int handle = 0;
    TORCH_CHECK(init(0) == 0 && get(&handle, device) == 0, "cuDeviceGet failed for device ", device);
    size_t bytes = 0;
    TORCH_CHECK(total(&bytes, handle) == 0, "cuDeviceTotalMem failed");
    TORCH_CHECK(version(driver_version) == 0, "cuDriverGetVersion failed");
    *total_bytes = static_cast<int64_t>(bytes);
  });
}

// The CUDA runtime version libtorch was built against (e.g. 13000 for 13.0), from its own hooks.
int mfr_cuda_runtime_version(int64_t* version, char* err, size_t len) {
  return guarded(err, len, [&] { *version = at::detail::getCUDAHooks().versionCUDART(); });
}

// Autocast to bfloat16 on CUDA or on the CPU (tch's own helper leaves the dtype at the default
// float16, covers CUDA only and uses the deprecated device-less API). `push` saves the state it
// replaces; `pop` restores it.
namespace {
at::DeviceType autocast_device(int cuda) { return cuda != 0 ? at::kCUDA : at::kCPU; }
}  // namespace

int mfr_autocast_push(int cuda, int enabled, int* prev_enabled, int* prev_dtype, char* err,
                      size_t len) {
  return guarded(err, len, [&] {
    auto device = autocast_device(cuda);
    *prev_enabled = at::autocast::is_autocast_enabled(device) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
    at::autocast::set_autocast_enabled(device, enabled != 0);
    at::autocast::set_autocast_dtype(device, at::kBFloat16);
    at::autocast::increment_nesting();
  });
}

int mfr_autocast_pop(int cuda, int prev_enabled, int prev_dtype, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto device = autocast_device(cuda);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device, prev_enabled != 0);
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(prev_dtype));
  });
}

// One AdamW step over all parameters in one fused kernel (torch.optim.AdamW(fused=True)).
// `steps` are the per-parameter step counts as float tensors, incremented here first.
int mfr_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs,
                    void* const* exp_avg_sqs, void* const* steps, size_t n, double lr,
                    double beta1, double beta2, double weight_decay, double eps, char* err,
                    size_t len) {
  return guarded(err, len, [&] {
    auto state_steps = tensors(steps, n);
    at::_foreach_add_(state_steps, 1.0);
    at::_fused_adamw_(tensors(params, n), tensors(grads, n), tensors(exp_avgs, n),
                      tensors(exp_avg_sqs, n), {}, state_steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

// The global L2 norm of `grads` (returned as a new tensor handle in *total) and, when
// max_norm > 0, the gradients scaled by min(1, max_norm / (norm + 1e-6)), as clip_grad_norm_.
int mfr_clip_grad_norm(void* const* grads, size_t n, double max_norm, void** total, char* err,
                       size_t len) {
  return guarded(err, len, [&] {
    auto g = tensors(grads, n);
    auto norm = at::linalg_vector_norm(at::stack(at::_foreach_norm(g, 2)), 2);
    if (max_norm > 0) at::_foreach_mul_(g, at::clamp_max(max_norm / (norm + 1e-6), 1.0));
    *total = new at::Tensor(norm);
  });
}

// LayerNorm's backward kernel (no affine) for the gradient `grad` over the last `d` values:
// one pass. Its Jacobian is symmetric, so this is also its JVP (src/model/flow.rs).
int mfr_layer_norm_backward(void* grad, void* input, void* mean, void* rstd, int64_t d,
                            void** out, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto as = [](void* h) -> const at::Tensor& { return *static_cast<const at::Tensor*>(h); };
    auto r = at::native_layer_norm_backward(as(grad), as(input), {d}, as(mean), as(rstd),
                                            std::nullopt, std::nullopt, {true, false, false});
    *out = new at::Tensor(std::get<0>(r));
  });
}

// Drops the gradients (torch's zero_grad(set_to_none=True)): the next backward writes fresh
// ones instead of adding into zeroed tensors, a pass over every gradient saved twice.
int mfr_clear_grads(void* const* params, size_t n, char* err, size_t len) {
  return guarded(err, len, [&] {
    for (auto& p : tensors(params, n)) p.mutable_grad().reset();
  });
}

// ema <- decay * ema + (1 - decay) * model, over all tensors at once.
int mfr_foreach_ema(void* const* ema, void* const* model, size_t n, double decay, char* err,
                    size_t len) {
  return guarded(err, len, [&] {
    auto e = tensors(ema, n);
    at::_foreach_mul_(e, decay);
    at::_foreach_add_(e, tensors(model, n), 1.0 - decay);
  });
}

}  // extern "C"
