#include "common/logging.h"

#include "spdlog/sinks/stdout_color_sinks.h"

namespace mat::common {

void InitLogging(const std::string& level, bool json) {
  auto logger = spdlog::stderr_color_mt("mat");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(level));
  if (json) {
    spdlog::set_pattern(R"({"time":"%Y-%m-%dT%H:%M:%S.%e","level":"%l","msg":"%v"})");
  } else {
    spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  }
}

}  // namespace mat::common
