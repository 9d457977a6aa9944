// Small socket helpers shared by the daemons, the benchmarks and the tests.
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mat::common {

// A TCP port that is free right now: bound (on 127.0.0.1 when `loopback_only`, else on every
// address) with port 0 and released. Another process may take it before the caller binds it.
// UNAVAILABLE when no socket can be opened or bound.
absl::StatusOr<int> PickFreePort(bool loopback_only = true);

// "HOST:PORT" -> host and port ("[::1]:80" gives "::1"). INVALID_ARGUMENT naming `address` when
// there is no host, no port, or the port is not in [min_port, 65535] (0 lets a server pick one;
// an address to connect to needs min_port 1).
absl::StatusOr<std::pair<std::string, int>> ParseHostPort(const std::string& address,
                                                          int min_port = 0);

// Waits until something accepts a TCP connection at host:port (the connection is closed at
// once), trying every 50 ms: a caller about to connect with a blocking client that retries on
// its own (c10d's TCPStore) can be stopped this way. OK once a connect succeeded; CANCELLED as
// soon as `cancelled` (may be empty) returns true; DEADLINE_EXCEEDED when `deadline` passes
// first; INVALID_ARGUMENT when `host` does not resolve.
absl::Status WaitForListener(const std::string& host, int port,
                             std::chrono::steady_clock::time_point deadline,
                             const std::function<bool()>& cancelled);

}  // namespace mat::common
