#include "api/run_summary.h"

#include <gtest/gtest.h>

namespace mat::api {
namespace {

TEST(SummaryRanksTest, IsTheWorldSizeAndOneWithoutIt) {
  EXPECT_EQ(*SummaryRanks(nlohmann::json{{"world_size", 4}, {"flops_total", 1.0}}), 4);
  EXPECT_EQ(*SummaryRanks(nlohmann::json{{"flops_total", 1.0}}), 1);
}

TEST(SummaryRanksTest, AWorldSizeThatIsNotAPositiveIntegerIsRefusedQuotingIt) {
  for (const nlohmann::json& bad :
       {nlohmann::json(0), nlohmann::json(-2), nlohmann::json(2.5), nlohmann::json("2"),
        nlohmann::json(nullptr), nlohmann::json(UINT64_MAX)}) {
    absl::StatusOr<int64_t> r = SummaryRanks(nlohmann::json{{"world_size", bad}});
    ASSERT_FALSE(r.ok()) << bad.dump();
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("world_size is not a positive integer: " + bad.dump()),
              std::string::npos)
        << r.status();
  }
}

TEST(SummaryRanksTest, ASummaryThatIsNotAnObjectIsRefused) {
  absl::StatusOr<int64_t> r = SummaryRanks(nlohmann::json::array({1, 2}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not array"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace mat::api
