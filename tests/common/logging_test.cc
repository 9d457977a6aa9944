// common/logging: --log-json lines parse as JSON whatever the message holds.
#include "common/logging.h"

#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "spdlog/sinks/ostream_sink.h"

namespace mat::common {
namespace {

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

TEST(LoggingTest, JsonLinesParseWhateverTheMessageHolds) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  spdlog::logger logger("test", sink);
  logger.set_formatter(LogFormatter(true));
  const std::vector<std::string> messages = {
      "plain", R"(job "a" failed: C:\path)", "two\nlines\r\tand a tab", std::string("nul\0byte", 8),
      "\x01\x1f control", "unicode λ_max ≥ 0"};
  for (const auto& m : messages) logger.warn("{}", m);
  logger.info("bad utf-8 \xff\xfe end");
  logger.flush();

  const auto lines = Lines(out.str());
  ASSERT_EQ(lines.size(), messages.size() + 1);  // one line per event: newlines were escaped
  for (size_t i = 0; i < lines.size(); ++i) {
    SCOPED_TRACE(lines[i]);
    nlohmann::json j = nlohmann::json::parse(lines[i]);  // throws on a line that is not JSON
    const std::string time = j.at("time");
    EXPECT_EQ(time.size(), std::string("2026-12-04T12:00:00.123Z").size());
    EXPECT_EQ(time[10], 'T');
    EXPECT_EQ(time.back(), 'Z');  // UTC, marked
    if (i < messages.size()) {
      EXPECT_EQ(j.at("level"), "warning");
      EXPECT_EQ(j.at("msg"), messages[i]);
    } else {
      EXPECT_EQ(j.at("level"), "info");
      EXPECT_EQ(j.at("msg"), "bad utf-8 \xEF\xBF\xBD\xEF\xBF\xBD end");  // replaced, not dropped
    }
  }
}

TEST(LoggingTest, TextLinesKeepTheirFormat) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  spdlog::logger logger("test", sink);
  logger.set_formatter(LogFormatter(false));
  logger.error("hello {}", 42);
  const auto lines = Lines(out.str());
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find(" error hello 42"), std::string::npos) << lines[0];
  EXPECT_EQ(lines[0].find('{'), std::string::npos);
}

}  // namespace
}  // namespace mat::common
