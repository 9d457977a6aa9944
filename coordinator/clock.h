// Clock: the coordinator's two time sources, injectable for tests (CoordinatorOptions'
// now_unix_seconds and now_ms). Unix seconds stamp events; the monotonic milliseconds time
// heartbeats, attach deadlines and metric retention.
// Thread-safety: const methods call the injected functions; as thread-safe as they are.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <utility>

namespace mat::coordinator {

class Clock {
 public:
  // Empty functions mean the system clock (seconds) and steady_clock (milliseconds).
  Clock(std::function<int64_t()> unix_seconds = {}, std::function<int64_t()> steady_ms = {})
      : unix_seconds_(std::move(unix_seconds)), steady_ms_(std::move(steady_ms)) {}

  // Seconds since the Unix epoch.
  int64_t Now() const {
    if (unix_seconds_) return unix_seconds_();
    return std::chrono::duration_cast<std::chrono::seconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
  // Milliseconds of a monotonic clock (any epoch).
  int64_t NowMs() const {
    if (steady_ms_) return steady_ms_();
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

 private:
  std::function<int64_t()> unix_seconds_;
  std::function<int64_t()> steady_ms_;
};

}  // namespace mat::coordinator
