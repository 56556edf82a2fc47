// Data parallelism for the trainer on libtorch's c10d: a TCPStore rendezvous, a process group
// (Gloo for CPU tensors here; NCCL for CUDA tensors in dist_nccl.cpp), and the collectives the
// trainer needs: bucketed all-reduce, broadcast, all-gather and a barrier. The same C ABI as
// shim.cpp: each call returns 0 on success or 1 with the C++ exception's message in `err`.
#include "c_abi.hpp"
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <c10/util/Exception.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

// We allocate the process groups ourselves, so our view of their size must be libtorch's.
// These are the sizes torch 2.11's own Python bindings allocate (read from libtorch_python.so).
#if defined(__x86_64__)
static_assert(sizeof(c10d::ProcessGroupGloo) == 488,
              "ProcessGroupGloo's layout differs from libtorch 2.11's: wrong torch headers?");
#endif

namespace mfr_dist {
// Defined in dist_nccl.cpp when build.rs found the CUDA and NCCL headers.
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                            int rank, int size, int device,
                                            std::chrono::milliseconds timeout);
}  // namespace mfr_dist

#ifndef MFR_WITH_NCCL
c10::intrusive_ptr<c10d::Backend> mfr_dist::make_nccl(const c10::intrusive_ptr<c10d::Store>&,
                                                      int, int, int,
                                                      std::chrono::milliseconds) {
  TORCH_CHECK(false,
              "this mfr was built without NCCL (build.rs found no CUDA/NCCL headers: run "
              "`make build`, which installs them, or set CUDA_HOME), so it cannot train on "
              "CUDA with several processes");
}
#endif

namespace {
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank = 0;
  int size = 1;
  int device = -1;  // the CUDA device of an NCCL group; -1 for Gloo on the CPU
};

// Consecutive tensors of one dtype and device, up to `cap` bytes, as one flat tensor: one
// collective per bucket instead of one per parameter. A lone contiguous tensor is its own
// bucket, reduced in place.
struct Bucket {
  std::vector<size_t> members;
  at::Tensor flat;
  bool aliased = false;
};

std::vector<Bucket> buckets(const std::vector<at::Tensor>& ts, int64_t cap) {
  std::vector<Bucket> out;
  int64_t bytes = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    const int64_t b = t.numel() * static_cast<int64_t>(t.element_size());
    bool joins = !out.empty() && bytes + b <= cap;
    if (joins) {
      const auto& first = ts[out.back().members.front()];
      joins = first.scalar_type() == t.scalar_type() && first.device() == t.device();
    }
    if (!joins) {
      out.emplace_back();
      bytes = 0;
    }
    out.back().members.push_back(i);
    bytes += b;
  }
  for (auto& bucket : out) {
    const auto& first = ts[bucket.members.front()];
    if (bucket.members.size() == 1 && first.is_contiguous()) {
      bucket.flat = first.view({-1});
      bucket.aliased = true;
    } else {
      std::vector<at::Tensor> parts;
      parts.reserve(bucket.members.size());
      for (size_t m : bucket.members) parts.push_back(ts[m].reshape({-1}));
      bucket.flat = at::cat(parts);
    }
  }
  return out;
}

void unflatten(const Bucket& bucket, const std::vector<at::Tensor>& ts) {
  if (bucket.aliased) return;
  int64_t offset = 0;
  for (size_t m : bucket.members) {
    auto t = ts[m];
    const int64_t n = t.numel();
    t.copy_(bucket.flat.narrow(0, offset, n).view(t.sizes()));
    offset += n;
  }
}

// Runs `launch` on every bucket first and waits afterwards, so the buckets' collectives can
// overlap one another (NCCL queues them on its stream; Gloo runs them on its threads).
template <typename Launch>
void over_buckets(std::vector<Bucket>& bs, Launch&& launch) {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  works.reserve(bs.size());
  for (auto& b : bs) works.push_back(launch(b));
  for (auto& w : works) w->wait();
}

const std::string kStopAt = "stop/at";
const std::string kStopVotes = "stop/votes";
}  // namespace

extern "C" {

// Joins the group: rank `store_server`'s process hosts the TCPStore at host:port (or, when
// store_server is 0 for every rank, a launcher such as torchrun hosts it), all keys go under
// `prefix`. device >= 0: NCCL on that CUDA device; -1: Gloo, its sockets bound to
// `gloo_ifname` (comma-separated interfaces) or `gloo_host` when given, else to this host's
// name (as torch's default). `timeout_ms` bounds the rendezvous and every collective.
int mfr_dist_new(const char* host, int port, int rank, int size, int store_server,
                 const char* prefix, int device, int64_t timeout_ms, const char* gloo_ifname,
                 const char* gloo_host, void** group, char* err, size_t len) {
  return guarded(err, len, [&] {
    const auto timeout = std::chrono::milliseconds(timeout_ms);
    TORCH_CHECK(port > 0 && port < 65536, "MASTER_PORT ", port, " is not a TCP port");
    TORCH_CHECK(rank >= 0 && rank < size, "RANK ", rank, " is not below WORLD_SIZE ", size);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = store_server != 0;
    // Every rank counts itself in; the server's constructor returns once all have.
    opts.numWorkers = static_cast<size_t>(size);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto g = std::make_unique<Group>();
    g->store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    g->rank = rank;
    g->size = size;
    g->device = device;
    auto pg_store = c10::make_intrusive<c10d::PrefixStore>("pg/", g->store);
    if (device >= 0) {
      g->backend = mfr_dist::make_nccl(pg_store, rank, size, device, timeout);
    } else {
      auto gopts = c10d::ProcessGroupGloo::Options::create(timeout);
      if (gloo_ifname != nullptr && gloo_ifname[0] != '\0') {
        std::stringstream names(gloo_ifname);
        std::string name;
        while (std::getline(names, name, ','))
          if (!name.empty())
            gopts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      } else if (gloo_host != nullptr && gloo_host[0] != '\0') {
        gopts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(gloo_host));
      } else {
        gopts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(pg_store, rank, size, gopts);
    }
    *group = g.release();
  });
}

// Sums (average != 0: averages) each tensor over the group, in place, `bucket_bytes` at a time.
int mfr_dist_all_reduce(void* group, void* const* handles, size_t n, int average,
                        int64_t bucket_bytes, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    auto ts = tensors(handles, n);
    auto bs = buckets(ts, bucket_bytes);
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    over_buckets(bs, [&](Bucket& b) {
      std::vector<at::Tensor> one{b.flat};
      return g->backend->allreduce(one, opts);
    });
    for (auto& b : bs) {
      if (average != 0) b.flat.div_(g->size);
      unflatten(b, ts);
    }
  });
}

// Overwrites each tensor with rank `root`'s.
int mfr_dist_broadcast(void* group, void* const* handles, size_t n, int root,
                       int64_t bucket_bytes, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    auto ts = tensors(handles, n);
    auto bs = buckets(ts, bucket_bytes);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    over_buckets(bs, [&](Bucket& b) {
      std::vector<at::Tensor> one{b.flat};
      return g->backend->broadcast(one, opts);
    });
    if (g->rank != root)
      for (auto& b : bs) unflatten(b, ts);
  });
}

// Every rank's `input` (same shape on all ranks) concatenated along dim 0, in rank order, as a
// new tensor handle in *out.
int mfr_dist_all_gather(void* group, void* input, void** out, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    auto in = static_cast<const at::Tensor*>(input)->contiguous();
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < g->size; ++r) outputs[0].push_back(at::empty_like(in));
    std::vector<at::Tensor> inputs{in};
    g->backend->allgather(outputs, inputs)->wait();
    *out = new at::Tensor(at::cat(outputs[0], 0));
  });
}

// Returns when every rank has called it: an all-reduce read back on the host, so it also waits
// for NCCL's stream (whose Work::wait does not block the host).
int mfr_dist_barrier(void* group, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    auto opts = at::TensorOptions().dtype(at::kFloat);
    if (g->device >= 0) opts = opts.device(at::Device(at::kCUDA, g->device));
    std::vector<at::Tensor> one{at::ones({1}, opts)};
    g->backend->allreduce(one)->wait();
    const double seen = one[0].cpu().item<double>();
    TORCH_CHECK(seen == g->size, "barrier counted ", seen, " ranks, expected ", g->size);
  });
}

// Agreeing on when to stop after an interrupt, through the store (no collective, no device
// sync): `propose` >= 0 asks to stop after that step, and the first proposal of the group
// wins. *agreed is the winning step, or -1 while nobody has asked.
int mfr_dist_stop_step(void* group, int64_t propose, int64_t* agreed, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    if (propose >= 0 && g->store->add(kStopVotes, 1) == 1) {
      const std::string v = std::to_string(propose);
      g->store->set(kStopAt, std::vector<uint8_t>(v.begin(), v.end()));
    }
    *agreed = -1;
    if (g->store->check({kStopAt})) {
      const auto v = g->store->get(kStopAt);
      *agreed = std::stoll(std::string(v.begin(), v.end()));
    }
  });
}

// Leaves the group. abort != 0 (after a failed collective, when peers may be gone): abort the
// backend and leak it rather than wait for its threads or communicators.
int mfr_dist_free(void* group, int abort, char* err, size_t len) {
  auto* g = static_cast<Group*>(group);
  int rc = guarded(err, len, [&] {
    if (abort != 0) {
      g->backend->abort();
      g->backend.release();
      g->store.release();
    } else {
      g->backend->shutdown();
    }
  });
  if (abort == 0) delete g;
  return rc;
}

}  // extern "C"
