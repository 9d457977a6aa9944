// client/compare.h: runs side by side from their summaries (pure functions).
#include "client/compare.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mat::client {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

// A summary with an eval curve at steps 100, 200, ... (FLOPs `per_eval` per evaluation).
json Summary(const std::string& mode, double per_eval, std::vector<double> vals,
             double wall_per_eval = 10) {
  json steps = json::array(), flops = json::array(), val = json::array(), wall = json::array();
  size_t best = 0;
  for (size_t i = 0; i < vals.size(); ++i) {
    steps.push_back(100 * (i + 1));
    flops.push_back(per_eval * (i + 1));
    val.push_back(vals[i]);
    wall.push_back(wall_per_eval * (i + 1));
    if (vals[i] < vals[best]) best = i;
  }
  return {{"mode", mode},
          {"seed", 7},
          {"steps", 100 * vals.size()},
          {"flops_total", per_eval * vals.size()},
          {"best_val_loss", vals[best]},
          {"best_step", 100 * (best + 1)},
          {"test_metric_name", "loss"},
          {"test_metric", vals[best] + 0.05},
          {"flops_to_best", per_eval * (best + 1)},
          {"wall_seconds", wall_per_eval * vals.size() + 3},
          {"wall_seconds_to_best", wall_per_eval * (best + 1)},
          {"mean_active_fraction", mode == "full" ? 1.0 : 0.5},
          {"eval_curve", {{"step", steps}, {"flops", flops}, {"val_loss", val}, {"wall_seconds", wall}}}};
}

TEST(CompareTest, ReadsEqualBudgetsAndTheCostToTheBaselinesBest) {
  // full: 4 evaluations of 10 FLOPs each (40 in all), best 5.0 at the end. mat: 6 FLOPs per
  // evaluation, reaches 4.9 (below full's best) at its third evaluation (18 FLOPs).
  std::vector<CompareRun> runs = {{"job-1", Summary("mat", 6, {6.0, 5.5, 4.9, 4.8})},
                                  {"job-2", Summary("full", 10, {6.2, 5.6, 5.2, 5.0})}};
  ASSERT_EQ(DefaultBaseline(runs), 1);
  absl::StatusOr<CompareTable> t = CompareRuns(runs, 1, {0.25, 0.5, 1.0});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->baseline, "job-2");
  EXPECT_EQ(t->budget_flops, (std::vector<double>{10, 20, 40}));
  const CompareRow& mat = t->rows[0];
  EXPECT_EQ(mat.mode, "mat");
  EXPECT_DOUBLE_EQ(mat.flops_total, 24);
  EXPECT_DOUBLE_EQ(mat.flops_ratio, 0.6);
  // Budget 10: mat's evaluations at 6 (6.0); 20: 18 (4.9); 40: its last, 24 (4.8).
  ASSERT_EQ(mat.val_at_budget.size(), 3u);
  EXPECT_EQ(mat.val_at_budget[0], 6.0);
  EXPECT_EQ(mat.val_at_budget[1], 4.9);
  EXPECT_EQ(mat.val_at_budget[2], 4.8);
  EXPECT_DOUBLE_EQ(mat.best_val_loss, 4.8);
  EXPECT_EQ(mat.best_step, 400);
  EXPECT_DOUBLE_EQ(mat.test_metric, 4.85);
  ASSERT_TRUE(mat.flops_to_baseline_best.has_value());
  EXPECT_DOUBLE_EQ(*mat.flops_to_baseline_best, 18);
  EXPECT_DOUBLE_EQ(*mat.wall_seconds_to_baseline_best, 30);
  EXPECT_DOUBLE_EQ(mat.mean_active_fraction, 0.5);
  const CompareRow& full = t->rows[1];
  EXPECT_EQ(full.val_at_budget[0], 6.2);
  EXPECT_EQ(full.val_at_budget[1], 5.6);
  EXPECT_EQ(full.val_at_budget[2], 5.0);
  EXPECT_DOUBLE_EQ(*full.flops_to_baseline_best, 40);  // its own best
  EXPECT_DOUBLE_EQ(full.flops_ratio, 1.0);

  const json j = CompareToJson(*t);
  EXPECT_EQ(j["baseline"], "job-2");
  EXPECT_EQ(j["runs"][0]["val_loss_at_budget"], json({6.0, 4.9, 4.8}));
  EXPECT_EQ(j["runs"][0]["flops_to_baseline_best"], 18.0);

  const std::string text = FormatCompareTable(*t);
  EXPECT_THAT(text, HasSubstr("baseline: job-2 (full"));
  EXPECT_THAT(text, HasSubstr("VAL@25%"));
  EXPECT_THAT(text, HasSubstr("1.800e+01 (0.45)"));  // 18 of full's 40 to its best
}

// A service job's summary holds rank 0's FLOPs: a 2-rank job's figures were half of what it
// cost, so it looked twice as cheap as the same work on one rank.
TEST(CompareTest, FlopsAreTheWholeRunsSummedOverItsRanks) {
  json two_ranks = Summary("mat", 3, {6.0, 5.5, 4.9, 4.8});  // rank 0's share of 6 per eval
  two_ranks["world_size"] = 2;
  json one_rank = Summary("mat", 6, {6.0, 5.5, 4.9, 4.8});
  one_rank["world_size"] = 1;
  std::vector<CompareRun> runs = {{"job-1", two_ranks},
                                  {"run-1", one_rank},
                                  {"job-2", Summary("full", 10, {6.2, 5.6, 5.2, 5.0})}};
  absl::StatusOr<CompareTable> t = CompareRuns(runs, 2, {0.5});
  ASSERT_TRUE(t.ok()) << t.status();
  for (int r : {0, 1}) {
    const CompareRow& row = t->rows[r];
    EXPECT_DOUBLE_EQ(row.flops_total, 24) << row.name;
    EXPECT_DOUBLE_EQ(row.flops_ratio, 0.6) << row.name;
    EXPECT_EQ(row.val_at_budget[0], 4.9) << row.name;  // budget 20: the evaluation at 18
    EXPECT_DOUBLE_EQ(*row.flops_to_baseline_best, 18) << row.name;
  }
  EXPECT_EQ(t->rows[0].world_size, 2);
  EXPECT_EQ(CompareToJson(*t)["runs"][0]["world_size"], 2);
  // As the baseline, its own FLOPs to its best are scaled too.
  t = CompareRuns(runs, 0, {1.0});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_DOUBLE_EQ(*t->rows[0].flops_to_baseline_best, 24);
  EXPECT_EQ(t->budget_flops, std::vector<double>{24});

  two_ranks["world_size"] = 0;
  t = CompareRuns({{"job-1", two_ranks}}, 0, {1.0});
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("job-1: summary's world_size is not a positive integer: 0"));
}

// A VGG run's test accuracy stood in the BERT baseline's TEST@BEST column and its image loss
// "reached" the baseline's token loss.
TEST(CompareTest, RunsOfDifferentTasksAreRefusedNamingBoth) {
  json images = Summary("mat", 1, {2.3});
  images["test_metric_name"] = "accuracy";
  absl::StatusOr<CompareTable> t =
      CompareRuns({{"bert-full", Summary("full", 10, {8.6})}, {"vgg", images}}, 0, {1.0});
  ASSERT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("runs of different tasks do not compare: vgg has test_metric_name "
                        "'accuracy', the baseline bert-full 'loss'"));
}

TEST(CompareTest, ARunThatNeverReachesTheBaselinesBestSaysSoAndEarlyBudgetsAreMissing) {
  // rand's first evaluation costs 15 FLOPs: no value at a 10-FLOP budget.
  std::vector<CompareRun> runs = {{"full", Summary("full", 10, {6.2, 5.0})},
                                  {"rand", Summary("rand", 15, {6.1, 5.4})}};
  absl::StatusOr<CompareTable> t = CompareRuns(runs, DefaultBaseline(runs), {0.5, 1.0});
  ASSERT_TRUE(t.ok()) << t.status();
  const CompareRow& rand = t->rows[1];
  EXPECT_FALSE(rand.val_at_budget[0].has_value());
  EXPECT_EQ(rand.val_at_budget[1], 6.1);
  EXPECT_FALSE(rand.flops_to_baseline_best.has_value());
  EXPECT_TRUE(CompareToJson(*t)["runs"][1]["flops_to_baseline_best"].is_null());
  EXPECT_THAT(FormatCompareTable(*t), HasSubstr("never"));
}

TEST(CompareTest, WithoutFullTheFirstRunIsTheBaseline) {
  std::vector<CompareRun> runs = {{"a", Summary("mat", 1, {2})}, {"b", Summary("rand", 1, {3})}};
  EXPECT_EQ(DefaultBaseline(runs), 0);
  EXPECT_EQ(DefaultBaseline({}), -1);
}

TEST(CompareTest, BadSummariesAreNamedWithTheRunAndKey) {
  json no_flops = Summary("mat", 1, {2});
  no_flops.erase("flops_total");
  absl::StatusOr<CompareTable> t = CompareRuns({{"job-9", no_flops}}, 0, {1.0});
  ASSERT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("job-9"));
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("flops_total"));

  json ragged = Summary("mat", 1, {2, 3});
  ragged["eval_curve"]["val_loss"] = json::array({2.0});
  t = CompareRuns({{"job-8", ragged}}, 0, {1.0});
  ASSERT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("differ in length"));

  t = CompareRuns({{"a", Summary("mat", 1, {2})}}, 3, {1.0});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  t = CompareRuns({{"a", Summary("mat", 1, {2})}}, 0, {0.0});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CompareTest, AnOldSummaryWithoutACurveHasNoBudgetValues) {
  json old = Summary("mat", 1, {2});
  old.erase("eval_curve");
  std::vector<CompareRun> runs = {{"full", Summary("full", 1, {3, 2.5})}, {"old", old}};
  absl::StatusOr<CompareTable> t = CompareRuns(runs, 0, {1.0});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->rows[1].val_at_budget[0].has_value());
  EXPECT_FALSE(t->rows[1].flops_to_baseline_best.has_value());
  // Not known, rather than never reached.
  EXPECT_THAT(FormatCompareTable(*t), ::testing::Not(HasSubstr("never")));
}

TEST(CompareTest, SvgPlotsEveryRunAndTheBaselinesBest) {
  std::vector<CompareRun> runs = {{"full <1>", Summary("full", 10, {6.2, 5.0})},
                                  {"mat", Summary("mat", 6, {6.0, 4.9})}};
  absl::StatusOr<CompareTable> t = CompareRuns(runs, 0, {1.0});
  ASSERT_TRUE(t.ok());
  absl::StatusOr<std::string> svg = RenderCompareSvg(runs, *t, "a & b");
  ASSERT_TRUE(svg.ok()) << svg.status();
  EXPECT_THAT(*svg, HasSubstr("<title>a &amp; b</title>"));
  EXPECT_THAT(*svg, HasSubstr("full &lt;1&gt;"));
  EXPECT_THAT(*svg, HasSubstr("class=\"baseline-best\""));
  size_t lines = 0;
  for (size_t at = svg->find("class=\"run\""); at != std::string::npos;
       at = svg->find("class=\"run\"", at + 1)) {
    ++lines;
  }
  EXPECT_EQ(lines, 2u);
  EXPECT_EQ(svg->find("nan"), std::string::npos);
  EXPECT_EQ(svg->find("inf"), std::string::npos);

  json none = Summary("mat", 1, {2});
  none.erase("eval_curve");
  EXPECT_EQ(RenderCompareSvg({{"x", none}}, *t, "t").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace mat::client
