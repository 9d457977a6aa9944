// ManualClock: the coordinator's (and its JobStore's) time sources for unit tests, moved by hand. `unix_seconds` and
// `ms` are read through the functions clock() and the store options capture, so a test changes
// the time by assigning them (the clock must outlive what it was given to).
#pragma once

#include <cstdint>

#include "coordinator/clock.h"
#include "coordinator/job_store.h"

namespace mat::tests {

struct ManualClock {
  int64_t unix_seconds = 1'700'000'000;
  int64_t ms = 5'000'000;

  coordinator::Clock clock() {
    return coordinator::Clock([this] { return unix_seconds; }, [this] { return ms; });
  }
  // A JobStore's options on this clock's unix_seconds.
  coordinator::JobStoreOptions store_options() {
    coordinator::JobStoreOptions options;
    options.now_unix_seconds = [this] { return unix_seconds; };
    return options;
  }
};

}  // namespace mat::tests
