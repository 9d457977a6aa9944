// Tests of client/format.h: matctl's table, JSON, CSV and event lines on hand-built messages.
#include "client/format.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "coordinator/job_spec.h"

namespace mat::client {
namespace {

using ::testing::HasSubstr;
using nlohmann::json;

v1::Job MakeJob(const std::string& id, v1::JobState state) {
  v1::Job job;
  job.set_job_id(id);
  job.set_state(state);
  *job.mutable_spec() = coordinator::JobSpecDefaults();
  job.mutable_spec()->mutable_model()->set_layers(2);
  job.set_create_time_unix_seconds(1700000000);  // 2023-11-14T22:13:20Z
  return job;
}

TEST(FormatTest, UnixTimeIsIsoUtcAndDashWhenUnset) {
  EXPECT_EQ(FormatUnixTime(1700000000), "2023-11-14T22:13:20Z");
  EXPECT_EQ(FormatUnixTime(0), "-");
}

TEST(FormatTest, ModelAndPolicyDescriptionsNameTheirMainParameters) {
  v1::JobSpec spec = coordinator::JobSpecDefaults();
  EXPECT_EQ(DescribeModel(spec), "bert L4 d256 H8");
  spec.mutable_model()->set_ffn_groups(4);
  EXPECT_EQ(DescribeModel(spec), "bert L4 d256 H8 ffn4");
  EXPECT_EQ(DescribePolicy(spec), "mat a=0.3");
  spec.mutable_policy()->set_beta(0.05);
  EXPECT_EQ(DescribePolicy(spec), "mat a=0.3 b=0.05");
  spec.mutable_policy()->set_kind("rand");
  EXPECT_EQ(DescribePolicy(spec), "rand f=0.5");
  spec.mutable_policy()->set_kind("multirate");
  EXPECT_EQ(DescribePolicy(spec), "multirate k=4");
  spec.mutable_policy()->set_kind("full");
  EXPECT_EQ(DescribePolicy(spec), "full");
}

TEST(FormatTest, JobTableHasHeaderAndAlignedColumns) {
  const std::string table = FormatJobTable(
      {MakeJob("job-000001", v1::JOB_STATE_QUEUED), MakeJob("job-000002", v1::JOB_STATE_CANCELLED)});
  const std::vector<std::string> expected = {
      "ID          STATE      MODEL            POLICY     CREATED",
      "job-000001  QUEUED     bert L2 d256 H8  mat a=0.3  2023-11-14T22:13:20Z",
      "job-000002  CANCELLED  bert L2 d256 H8  mat a=0.3  2023-11-14T22:13:20Z",
  };
  EXPECT_EQ(table, expected[0] + "\n" + expected[1] + "\n" + expected[2] + "\n");
  EXPECT_EQ(FormatJobTable({}), "ID  STATE  MODEL  POLICY  CREATED\n");
}

TEST(FormatTest, JobJsonHasStateSpecAndRanksWithTypedValues) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000007", v1::JOB_STATE_SUCCEEDED);
  reply.mutable_job()->set_step(1000);
  reply.mutable_job()->set_summary_json(R"({"best_val_loss": 5.25, "steps": 1000})");
  v1::RankStatus* rank = reply.add_ranks();
  rank->set_rank(0);
  rank->set_worker_id("w1");
  rank->set_param_checksum("abc123");

  const json j = JobToJson(reply);
  EXPECT_EQ(j["job_id"], "job-000007");
  EXPECT_EQ(j["state"], "SUCCEEDED");
  EXPECT_EQ(j["step"], 1000);
  EXPECT_EQ(j["created"], "2023-11-14T22:13:20Z");
  EXPECT_EQ(j["spec"]["model"]["layers"], 2) << "int64 must be a JSON number";
  EXPECT_EQ(j["spec"]["policy"]["alpha"], 0.3);
  EXPECT_EQ(j["spec"]["model"]["pre_ln"], false);
  EXPECT_EQ(j["spec"]["seed"], 1);
  EXPECT_EQ(j["spec"]["resources"]["device"], "cpu");
  EXPECT_EQ(j["summary"]["best_val_loss"], 5.25);
  ASSERT_EQ(j["ranks"].size(), 1u);
  EXPECT_EQ(j["ranks"][0]["param_checksum"], "abc123");

  reply.mutable_job()->set_summary_json("");
  EXPECT_TRUE(JobToJson(reply)["summary"].is_null());
}

TEST(FormatTest, SpecJsonHasOnlySetKeysAndWritesNonFiniteNumbersAsText) {
  v1::JobSpec spec;
  spec.mutable_train()->set_lr(std::numeric_limits<double>::infinity());
  spec.mutable_model();  // present but empty
  const json j = JobSpecToJson(spec);
  EXPECT_EQ(j["train"]["lr"], "inf");
  EXPECT_EQ(j["train"].size(), 1u);
  EXPECT_TRUE(j["model"].is_object());
  EXPECT_FALSE(j.contains("seed"));
}

TEST(FormatTest, JobTextNamesStateAndMessage) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000003", v1::JOB_STATE_CANCELLED);
  reply.mutable_job()->set_error_message("no longer needed");
  const std::string text = FormatJobText(reply);
  EXPECT_THAT(text, HasSubstr("job:         job-000003\n"));
  EXPECT_THAT(text, HasSubstr("state:       CANCELLED\n"));
  EXPECT_THAT(text, HasSubstr("message:     no longer needed\n"));
  EXPECT_THAT(text, HasSubstr("step:        0 / 2000\n"));
}

TEST(FormatTest, EventLinesDescribeEachKind) {
  v1::JobEvent e;
  e.set_job_id("job-000001");
  e.set_time_unix_seconds(1700000000);
  e.set_step(12);
  e.mutable_state()->set_state(v1::JOB_STATE_CANCELLED);
  e.mutable_state()->set_error_message("by hand");
  EXPECT_EQ(FormatJobEvent(e), "2023-11-14T22:13:20Z job-000001 step 12 state CANCELLED (by hand)");

  e.mutable_progress()->set_train_loss(5.5);
  e.mutable_progress()->set_active_modules(6);
  e.mutable_progress()->set_total_modules(8);
  e.mutable_progress()->set_flops_total(1e12);
  e.mutable_progress()->set_steps_per_second(2.5);
  EXPECT_EQ(FormatJobEvent(e),
            "2023-11-14T22:13:20Z job-000001 step 12 loss 5.5 active 6/8 flops 1e+12 2.5 steps/s");

  e.mutable_evaluation()->set_val_loss(4.25);
  e.mutable_evaluation()->set_test_loss(std::nan(""));
  EXPECT_EQ(FormatJobEvent(e),
            "2023-11-14T22:13:20Z job-000001 step 12 eval val_loss 4.25 test_loss nan");

  e.mutable_mask()->set_mask_version(3);
  e.mutable_mask()->set_effective_step(220);
  e.mutable_mask()->set_active_modules(5);
  EXPECT_EQ(FormatJobEvent(e), "2023-11-14T22:13:20Z job-000001 step 12 mask v3 from step 220: 5 active");
}

TEST(FormatTest, SpectraCsvAndJsonCarryEveryPointRoundTrip) {
  v1::GetSpectraReply spectra;
  v1::SpectraPoint* p = spectra.add_points();
  p->set_step(20);
  p->add_lambda_max(0.1);
  p->add_lambda_max(1.0 / 3.0);
  p = spectra.add_points();
  p->set_step(40);
  p->add_lambda_max(2);
  p->add_lambda_max(3);
  // Modules unknown: generic column names.
  EXPECT_EQ(SpectraToCsv(spectra), "step,m0,m1\n20,0.1,0.3333333333333333\n40,2,3\n");

  v1::ModuleDescriptor* m = spectra.add_modules();
  m->set_name("layer0.head0");
  m->set_group("heads");
  m = spectra.add_modules();
  m->set_name("layer0.head1");
  m->set_group("heads");
  m->set_index(1);
  EXPECT_THAT(SpectraToCsv(spectra), ::testing::StartsWith("step,layer0.head0,layer0.head1\n"));

  const json j = SpectraToJson("job-000001", spectra);
  EXPECT_EQ(j["job_id"], "job-000001");
  ASSERT_EQ(j["modules"].size(), 2u);
  EXPECT_EQ(j["modules"][1]["name"], "layer0.head1");
  EXPECT_EQ(j["modules"][1]["index"], 1);
  ASSERT_EQ(j["points"].size(), 2u);
  EXPECT_EQ(j["points"][0]["step"], 20);
  EXPECT_EQ(j["points"][0]["lambda_max"][1].get<double>(), 1.0 / 3.0);
  EXPECT_EQ(SpectraToCsv(v1::GetSpectraReply()), "step\n");
}

}  // namespace
}  // namespace mat::client
