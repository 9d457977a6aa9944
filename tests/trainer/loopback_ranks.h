// Helpers for tests that form a real c10d process group between threads of one process on
// 127.0.0.1 (grad_sync_test, data_parallel_test).
#pragma once

#include <algorithm>
#include <chrono>
#include <string>

#include <gtest/gtest.h>

#include "common/net_util.h"
#include "trainer/grad_sync.h"

namespace mat::trainer::testing {

// A free TCP port on 127.0.0.1 (0 and a failed expectation when there is none).
inline int FreePort() {
  absl::StatusOr<int> port = common::PickFreePort();
  EXPECT_TRUE(port.ok()) << port.status();
  return port.value_or(0);
}

// Whether this build has the process group `backend` ("gloo", "nccl").
inline bool Has(const std::string& backend) {
  auto b = AvailableBackends();
  return std::find(b.begin(), b.end(), backend) != b.end();
}

// Rank `rank` of `world` meeting on 127.0.0.1:port under `prefix`, 20 s timeout.
inline RendezvousOptions Loopback(int port, int rank, int world, const std::string& backend,
                                  const std::string& prefix) {
  RendezvousOptions o;
  o.master_host = "127.0.0.1";
  o.master_port = port;
  o.local_host = "127.0.0.1";
  o.rank = rank;
  o.world_size = world;
  o.backend = backend;
  o.prefix = prefix;
  o.timeout = std::chrono::milliseconds(20000);
  return o;
}

}  // namespace mat::trainer::testing
