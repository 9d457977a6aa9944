// Small socket helpers shared by the daemons, the benchmarks and the tests.
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include "absl/status/statusor.h"

namespace mat::common {

// A TCP port that is free right now: bound (on 127.0.0.1 when `loopback_only`, else on every
// address) with port 0 and released. Another process may take it before the caller binds it.
// UNAVAILABLE when no socket can be opened or bound.
absl::StatusOr<int> PickFreePort(bool loopback_only = true);

}  // namespace mat::common
