// The key-value store used for bootstrap: the c10d Store handed to the
// backend (keys already private to the group), seen through this interface
// so that the core does not include torch. The c10d layer adapts c10d::Store;
// the C++ tests use an in-memory one.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace tcpx {

class Store {
 public:
  virtual ~Store() = default;
  virtual tcpxResult_t set(const std::string& key, const std::vector<uint8_t>& value) = 0;
  // Blocks until `key` exists (or `timeout` passes: tcpxTimeout).
  virtual tcpxResult_t get(const std::string& key, std::chrono::milliseconds timeout,
                           std::vector<uint8_t>* value) = 0;
};

}  // namespace tcpx
