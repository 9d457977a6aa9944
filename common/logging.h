// Logging setup: spdlog, one line per event. Call InitLogging once from main.
#pragma once

#include <string>

#include "spdlog/spdlog.h"

namespace mat::common {

// level: "trace" | "debug" | "info" | "warn" | "error". json=true writes one JSON object a line.
void InitLogging(const std::string& level, bool json);

}  // namespace mat::common
