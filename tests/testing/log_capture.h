// LogCapture: what spdlog's default logger writes while a LogCapture lives (unit tests that check
// a log line). Its logger is the default from construction to destruction; declare it before
// anything whose threads log (a daemon), so that it outlives them.
//
// Thread-safety: any thread may log through it while another calls Take.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "spdlog/sinks/base_sink.h"
#include "spdlog/spdlog.h"

namespace mat::tests {

class LogCapture {
 public:
  LogCapture()
      : previous_(spdlog::default_logger()),
        sink_(std::make_shared<Sink>()),
        logger_(std::make_shared<spdlog::logger>("capture", sink_)) {
    spdlog::set_default_logger(logger_);
  }
  ~LogCapture() { spdlog::set_default_logger(previous_); }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  // The lines logged since construction or the last Take, formatted; forgets them.
  std::string Take() { return sink_->Take(); }

 private:
  class Sink : public spdlog::sinks::base_sink<std::mutex> {
   public:
    std::string Take() {
      std::lock_guard<std::mutex> lock(mutex_);
      std::string text;
      text.swap(text_);
      return text;
    }

   protected:
    void sink_it_(const spdlog::details::log_msg& msg) override {
      spdlog::memory_buf_t formatted;
      formatter_->format(msg, formatted);
      text_.append(formatted.data(), formatted.size());
    }
    void flush_() override {}

   private:
    std::string text_;  // guarded by base_sink's mutex_
  };

  std::shared_ptr<spdlog::logger> previous_;
  std::shared_ptr<Sink> sink_;
  std::shared_ptr<spdlog::logger> logger_;
};

}  // namespace mat::tests
