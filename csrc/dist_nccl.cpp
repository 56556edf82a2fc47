// The NCCL process group for CUDA tensors, in a file of its own: ProcessGroupNCCL.hpp needs the
// CUDA runtime, CCCL and NCCL headers, which build.rs finds (or not, and then compiles dist.cpp
// with a stub that says so). Everything else of data parallelism is in dist.cpp.
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <c10/cuda/CUDAFunctions.h>

#include <chrono>

// As in dist.cpp: the size torch 2.11's own bindings allocate (read from libtorch_python.so).
#if defined(__x86_64__)
static_assert(sizeof(c10d::ProcessGroupNCCL) == 1112,
              "ProcessGroupNCCL's layout differs from libtorch 2.11's: wrong CUDA/NCCL headers?");
#endif

namespace mfr_dist {
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                            int rank, int size, int device,
                                            std::chrono::milliseconds timeout) {
  // NCCL binds a communicator to the current device: make it this rank's.
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
}
}  // namespace mfr_dist
