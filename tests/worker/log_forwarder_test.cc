// worker/log_forwarder.h: the spdlog sink that keeps a rank's lines for the coordinator.
#include "worker/log_forwarder.h"

#include <memory>

#include <gtest/gtest.h>

#include "spdlog/spdlog.h"

namespace mat::worker {
namespace {

TEST(LogForwarderTest, KeepsLinesOnlyWhileArmedBoundedOldestDropped) {
  auto sink = std::make_shared<LogForwarder>(3);
  spdlog::logger logger("test", sink);
  logger.set_level(spdlog::level::info);
  logger.info("before");  // not armed: not kept
  sink->Arm();
  logger.info("step {}", 1);
  logger.warn("slow");
  logger.debug("below the logger's level");
  std::vector<v1::LogLine> lines = sink->Take(10);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0].text(), "step 1");
  EXPECT_EQ(lines[0].level(), "info");
  EXPECT_EQ(lines[1].level(), "warning");
  EXPECT_GT(lines[0].time_unix_ms(), 1600000000000);
  EXPECT_TRUE(sink->Take(10).empty()) << "taken lines are gone";

  for (int i = 0; i < 5; ++i) logger.error("e{}", i);
  EXPECT_EQ(sink->dropped(), 2);
  lines = sink->Take(2);  // at most 2 per call, oldest first
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0].text(), "e2");
  EXPECT_EQ(sink->Take(10).size(), 1u);

  logger.info(std::string(LogForwarder::kMaxLineBytes + 100, 'x'));
  lines = sink->Take(1);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].text().size(), LogForwarder::kMaxLineBytes);

  sink->Disarm();
  logger.info("after");
  EXPECT_TRUE(sink->Take(10).empty());
  sink->Arm();  // a new rank starts clean
  EXPECT_EQ(sink->dropped(), 0);
}

}  // namespace
}  // namespace mat::worker
