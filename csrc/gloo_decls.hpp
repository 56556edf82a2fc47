// The few names of Gloo that torch's ProcessGroupGloo.hpp mentions, declared so that header
// parses. The torch wheel ships ProcessGroupGloo.hpp but not Gloo's own headers; libtorch_cpu.so
// holds the compiled Gloo. ProcessGroupGloo keeps Gloo objects only behind shared_ptr/unique_ptr,
// so its size and layout do not depend on these declarations (dist.cpp checks the size), and
// nothing here is ever defined, constructed or called from our code.
//
// build.rs makes gloo/algorithm.h, gloo/context.h, gloo/common/error.h, gloo/rendezvous/store.h
// and gloo/transport/device.h (the paths that header includes) each include this file.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {

class Context {
 public:
  // Named by an inline ProcessGroupGloo::setTimeout that we never call.
  void setTimeout(std::chrono::milliseconds timeout);
};

namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport

namespace rendezvous {
// The base of ProcessGroupGloo::GlooStore, whose inline overrides need these four virtuals
// to exist. We never derive from it or instantiate GlooStore.
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& value) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous

}  // namespace gloo
