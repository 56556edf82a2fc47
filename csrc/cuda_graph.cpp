// The training step as one CUDA graph: captured once, then replayed each step as a single launch
// instead of the thousands of kernels (and their host-side dispatch) it runs eagerly. Built with
// the real implementation where the CUDA headers are (MFR_WITH_CUDA); elsewhere every entry point
// says that this build has no CUDA graphs.
#include "c_abi.hpp"

#ifdef MFR_WITH_CUDA
// Streams, guards and events through c10's device-generic API (implemented in libc10_cuda):
// the CUDA-specific headers' inline code would make this object call libcudart directly, which
// the binary does not link.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace {
// A side stream the owner's thread works on while this lives (graphs cannot be captured on the
// default stream, and warm-up, capture and replay share one stream), and the graph.
struct StepGraph {
  c10::Stream stream;
  c10::Stream default_stream;
  std::optional<c10::StreamGuard> on_stream;
  at::cuda::CUDAGraph graph;
  bool capturing = false;
  bool captured = false;

  explicit StepGraph(c10::DeviceIndex device)
      : stream(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device).unwrap()),
        default_stream(c10::cuda::getDefaultCUDAStream(device).unwrap()) {
    // What the default stream has queued (the model's initialisation) comes first.
    default_stream.synchronize();
    on_stream.emplace(stream);
  }
  ~StepGraph() { stream.synchronize(); }
};

StepGraph& graph_of(void* handle) { return *static_cast<StepGraph*>(handle); }
}  // namespace

extern "C" {

int mfr_graph_new(int device, void** out, char* err, size_t len) {
  return guarded(err, len, [&] { *out = new StepGraph(static_cast<c10::DeviceIndex>(device)); });
}

// Everything this thread queues on the device from here to mfr_graph_capture_end is recorded,
// not run. The default CUDA generator is registered, so each replay draws fresh random numbers
// from the generator's state at replay time, as an eager step would.
int mfr_graph_capture_begin(void* handle, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto& g = graph_of(handle);
    TORCH_CHECK(!g.captured && !g.capturing, "this step graph is already captured");
    g.stream.synchronize();
    g.graph.register_generator_state(
        at::cuda::detail::getDefaultCUDAGenerator(g.stream.device_index()));
    // Thread-local: other threads (the data loader) may still call CUDA while this one records.
    g.graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    g.capturing = true;
  });
}

int mfr_graph_capture_end(void* handle, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto& g = graph_of(handle);
    TORCH_CHECK(g.capturing, "no capture to end");
    g.capturing = false;
    g.graph.capture_end();
    g.captured = true;
  });
}

// Copies each source into its static input, then replays the step. The copies wait for work
// other threads queued on the default stream (a batch moved to the device there).
int mfr_graph_replay(void* handle, void* const* statics, void* const* sources, size_t n,
                     char* err, size_t len) {
  return guarded(err, len, [&] {
    auto& g = graph_of(handle);
    TORCH_CHECK(g.captured, "replay before capture");
    c10::Event queued(c10::DeviceType::CUDA);
    queued.record(g.default_stream);
    queued.block(g.stream);
    auto to = tensors(statics, n);
    auto from = tensors(sources, n);
    for (size_t i = 0; i < n; ++i) to[i].copy_(from[i], /*non_blocking=*/true);
    g.graph.replay();
  });
}

// Ends a capture that failed midway, if one is open, and frees the graph and its memory pool;
// the thread returns to the stream it was on.
void mfr_graph_free(void* handle) {
  auto* g = static_cast<StepGraph*>(handle);
  if (g->capturing) {
    try {
      g->graph.capture_end();
    } catch (...) {
    }
  }
  delete g;
}
}

#else

namespace {
int no_cuda_graphs(char* err, size_t len) {
  write_message(err, len,
                "this mfr was built without the CUDA headers, so without CUDA graphs: build it "
                "with `make build` (which installs them) or set CUDA_HOME");
  return 1;
}
}  // namespace

extern "C" {
int mfr_graph_new(int, void**, char* err, size_t len) { return no_cuda_graphs(err, len); }
int mfr_graph_capture_begin(void*, char* err, size_t len) { return no_cuda_graphs(err, len); }
int mfr_graph_capture_end(void*, char* err, size_t len) { return no_cuda_graphs(err, len); }
int mfr_graph_replay(void*, void* const*, void* const*, size_t, char* err, size_t len) {
  return no_cuda_graphs(err, len);
}
void mfr_graph_free(void*) {}
}

#endif
