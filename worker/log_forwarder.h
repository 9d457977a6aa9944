// A rank's log lines for the coordinator (`matctl logs`, issue 24): an spdlog sink that
// mat-worker adds once to its default logger. While armed for a job (one rank at a time: a
// worker runs one rank), it keeps every line any thread logs at the logger's level, bounded: past
// `max_lines` the oldest are dropped and counted. The rank takes them in batches (RankRunner
// sends them as LogBatch messages with its progress and before its RankDone).
//
// Thread-safety: every method is safe from any thread (spdlog's base_sink mutex).
#pragma once

#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "mat/v1/service.pb.h"
#include "spdlog/sinks/base_sink.h"

namespace mat::worker {

class LogForwarder final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  // `max_lines` >= 1 kept lines at most; a line's text is cut to kMaxLineBytes.
  explicit LogForwarder(size_t max_lines = 10000);

  static constexpr size_t kMaxLineBytes = 4096;

  // Starts keeping lines for a new rank (what was kept before is discarded).
  void Arm();
  // Stops keeping lines; what is kept stays for Take.
  void Disarm();
  // Removes and returns up to `max` of the oldest kept lines (seq and rank unset: the coordinator
  // numbers them and the batch names the rank).
  std::vector<v1::LogLine> Take(size_t max);
  // Lines dropped by the bound since the last Arm.
  int64_t dropped();

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override;
  void flush_() override {}

 private:
  const size_t max_lines_;
  bool armed_ = false;
  std::deque<v1::LogLine> lines_;
  int64_t dropped_ = 0;
};

}  // namespace mat::worker
