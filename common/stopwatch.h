// Seconds elapsed on the monotonic clock: the one helper the trainer's phases time themselves
// with (steps, probes, evaluations).
#pragma once

#include <chrono>

namespace mat::common {

using SteadyClock = std::chrono::steady_clock;

// Seconds from `t0` to now, on steady_clock.
inline double SecondsSince(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

}  // namespace mat::common
