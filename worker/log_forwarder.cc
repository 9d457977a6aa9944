#include "worker/log_forwarder.h"

#include <algorithm>
#include <chrono>

namespace mat::worker {

LogForwarder::LogForwarder(size_t max_lines) : max_lines_(std::max<size_t>(1, max_lines)) {}

void LogForwarder::Arm() {
  // One rank at a time: every line while armed is that rank's.
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = true;
  lines_.clear();
  dropped_ = 0;
}

void LogForwarder::Disarm() {
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = false;
}

std::vector<v1::LogLine> LogForwarder::Take(size_t max) {
  std::lock_guard<std::mutex> lock(mutex_);
  const size_t n = std::min(max, lines_.size());
  std::vector<v1::LogLine> out(std::make_move_iterator(lines_.begin()),
                               std::make_move_iterator(lines_.begin() + static_cast<long>(n)));
  lines_.erase(lines_.begin(), lines_.begin() + static_cast<long>(n));
  return out;
}

int64_t LogForwarder::dropped() {
  std::lock_guard<std::mutex> lock(mutex_);
  return dropped_;
}

void LogForwarder::sink_it_(const spdlog::details::log_msg& msg) {
  // base_sink holds mutex_ here.
  if (!armed_) return;
  v1::LogLine line;
  line.set_time_unix_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                            msg.time.time_since_epoch())
                            .count());
  const auto level = spdlog::level::to_string_view(msg.level);
  line.set_level(std::string(level.data(), level.size()));
  std::string text(msg.payload.data(), std::min(msg.payload.size(), kMaxLineBytes));
  line.set_text(std::move(text));
  lines_.push_back(std::move(line));
  if (lines_.size() > max_lines_) {
    lines_.pop_front();
    ++dropped_;
  }
}

}  // namespace mat::worker
