// Logging setup: spdlog, one line per event. Call InitLogging once from main.
#pragma once

#include <memory>
#include <string>

#include "spdlog/formatter.h"
#include "spdlog/spdlog.h"

namespace mat::common {

// level: "trace" | "debug" | "info" | "warn" | "error". json=true writes one JSON object a line
// (LogFormatter(true)).
void InitLogging(const std::string& level, bool json);

// The line format. json=false: "2026-12-04 12:00:00.123 info message" in local time.
// json=true: {"time":"2026-12-04T12:00:00.123Z","level":"info","msg":"..."} in UTC, the message
// JSON-escaped (quotes, backslashes, newlines and control characters; invalid UTF-8 replaced by
// U+FFFD), so that every line parses as JSON whatever the message holds.
std::unique_ptr<spdlog::formatter> LogFormatter(bool json);

}  // namespace mat::common
