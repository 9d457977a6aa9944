// Tests of client/format.h: matctl's table, JSON, CSV and event lines on hand-built messages.
#include "client/format.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/job_spec.h"

namespace mat::client {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using nlohmann::json;

v1::Job MakeJob(const std::string& id, v1::JobState state) {
  v1::Job job;
  job.set_job_id(id);
  job.set_state(state);
  *job.mutable_spec() = api::JobSpecDefaults();
  job.mutable_spec()->mutable_model()->set_layers(2);
  job.set_create_time_unix_seconds(1700000000);  // 2023-11-14T22:13:20Z
  return job;
}

TEST(FormatTest, UnixTimeIsIsoUtcAndDashWhenUnset) {
  EXPECT_EQ(FormatUnixTime(1700000000), "2023-11-14T22:13:20Z");
  EXPECT_EQ(FormatUnixTime(0), "-");
}

TEST(FormatTest, DurationsAreCompactAndRounded) {
  EXPECT_EQ(FormatDuration(0), "0s");
  EXPECT_EQ(FormatDuration(-5), "0s");
  EXPECT_EQ(FormatDuration(std::nan("")), "0s");
  EXPECT_EQ(FormatDuration(44.6), "45s");
  EXPECT_EQ(FormatDuration(251), "4m");
  EXPECT_EQ(FormatDuration(3599), "1h00m");
  EXPECT_EQ(FormatDuration(2 * 3600 + 5 * 60 + 10), "2h05m");
  EXPECT_EQ(FormatDuration(3 * 86400 + 4 * 3600), "3d04h");
  EXPECT_EQ(FormatDuration(std::numeric_limits<double>::infinity()), ">9999d");
}

TEST(FormatTest, VggModelDescriptionNamesArchWidthGroupsAndImages) {
  v1::JobSpec spec = api::JobSpecDefaults();
  spec.mutable_model()->set_kind("vgg");
  spec.mutable_data()->set_kind("fashion-mnist");
  EXPECT_EQ(DescribeModel(spec), "vgg11 w0.25 g4 fashion-mnist");
  spec.mutable_model()->set_arch("vgg16");
  spec.mutable_model()->set_width(0.5);
  spec.mutable_model()->set_filter_groups(8);
  spec.mutable_model()->set_classifier_hidden(256);
  spec.mutable_data()->set_kind("cifar10");
  spec.mutable_data()->set_augment(true);
  EXPECT_EQ(DescribeModel(spec), "vgg16 w0.5 g8 h256 cifar10+aug");
}

TEST(FormatTest, JobTextShowsOptimizerAndSchedule) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000005", v1::JOB_STATE_QUEUED);
  EXPECT_THAT(FormatJobText(reply), HasSubstr("train:       adamw lr=0.0005 linear\n"));
  v1::TrainSpec* t = reply.mutable_job()->mutable_spec()->mutable_train();
  t->set_optimizer("sgd");
  t->set_lr(0.1);
  t->set_nesterov(true);
  t->set_schedule("step");
  t->set_decay_every(500);
  EXPECT_THAT(FormatJobText(reply),
              HasSubstr("train:       sgd lr=0.1 m=0.9 nesterov step x0.1/500\n"));
}

TEST(FormatTest, ModelAndPolicyDescriptionsNameTheirMainParameters) {
  v1::JobSpec spec = api::JobSpecDefaults();
  EXPECT_EQ(DescribeModel(spec), "bert L4 d256 H8");
  spec.mutable_model()->set_ffn_groups(4);
  EXPECT_EQ(DescribeModel(spec), "bert L4 d256 H8 ffn4");
  EXPECT_EQ(DescribePolicy(spec), "mat a=0.3");
  spec.mutable_policy()->set_beta(0.05);
  EXPECT_EQ(DescribePolicy(spec), "mat a=0.3 b=0.05");
  spec.mutable_policy()->set_kind("rand");
  EXPECT_EQ(DescribePolicy(spec), "rand f=0.5");
  spec.mutable_policy()->set_rand_schedule_job("job-000003");
  EXPECT_EQ(DescribePolicy(spec), "rand (replays job-000003)");
  spec.mutable_policy()->set_kind("frozen-random");
  EXPECT_EQ(DescribePolicy(spec), "frozen-random (replays job-000003)");
  spec.mutable_policy()->set_kind("multirate");
  EXPECT_EQ(DescribePolicy(spec), "multirate k=4");
  spec.mutable_policy()->set_kind("full");
  EXPECT_EQ(DescribePolicy(spec), "full");
}

// A rand job replaying a MAT job says which one, in `matctl status` and `matctl list`.
TEST(FormatTest, JobTextAndTableNameTheJobARandJobReplays) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000004", v1::JOB_STATE_RUNNING);
  v1::PolicySpec* p = reply.mutable_job()->mutable_spec()->mutable_policy();
  p->set_kind("rand");
  p->set_rand_schedule_job("job-000002");
  EXPECT_THAT(FormatJobText(reply), HasSubstr("policy:      rand (replays job-000002)\n"));
  EXPECT_THAT(FormatJobTable({reply.job()}), HasSubstr("  rand (replays job-000002)  "));
  EXPECT_EQ(JobToJson(reply)["spec"]["policy"]["rand_schedule_job"], "job-000002");
  p->set_rand_schedule_job("");
  EXPECT_THAT(FormatJobText(reply), HasSubstr("policy:      rand f=0.5\n"));
}

TEST(FormatTest, JobTableHasHeaderAndAlignedColumns) {
  v1::Job cancelled = MakeJob("job-000002", v1::JOB_STATE_CANCELLED);
  cancelled.set_artifact_bytes(17234567);
  cancelled.set_step(120);
  cancelled.mutable_spec()->mutable_resources()->set_workers(2);
  cancelled.mutable_spec()->mutable_resources()->set_device("cuda");
  const std::string table =
      FormatJobTable({MakeJob("job-000001", v1::JOB_STATE_QUEUED), cancelled});
  const std::vector<std::string> expected = {
      "ID          STATE      MODEL            POLICY     WORKERS  STEP      CREATED               "
      "ARTIFACTS",
      "job-000001  QUEUED     bert L2 d256 H8  mat a=0.3  1 cpu    -         2023-11-14T22:13:20Z  -",
      "job-000002  CANCELLED  bert L2 d256 H8  mat a=0.3  2 cuda   120/2000  2023-11-14T22:13:20Z  "
      "17.2 MB",
  };
  EXPECT_EQ(table, expected[0] + "\n" + expected[1] + "\n" + expected[2] + "\n");
  EXPECT_EQ(FormatJobTable({}), "ID  STATE  MODEL  POLICY  WORKERS  STEP  CREATED  ARTIFACTS\n");
}

TEST(FormatTest, BytesInDecimalUnits) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(999), "999 B");
  EXPECT_EQ(FormatBytes(1000), "1 kB");
  EXPECT_EQ(FormatBytes(17234567), "17.2 MB");
  EXPECT_EQ(FormatBytes(int64_t{1500000000}), "1.5 GB");
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

TEST(FormatTest, JobJsonHasNoTrainingLossBeforeTheFirstReport) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000009", v1::JOB_STATE_RUNNING);
  EXPECT_TRUE(JobToJson(reply)["train_loss"].is_null()) << "0 is the unset field, not a loss";
  EXPECT_NE(FormatJobText(reply).find("loss:        train -"), std::string::npos);
  reply.mutable_job()->set_train_loss(6.5);
  EXPECT_EQ(JobToJson(reply)["train_loss"], 6.5);
  // A loss of exactly 0 beside a validation loss is a reported loss, in all three views.
  reply.mutable_job()->set_train_loss(0);
  reply.mutable_job()->set_val_loss(0.5);
  EXPECT_EQ(JobToJson(reply)["train_loss"], 0.0);
  EXPECT_EQ(WatchStateFromJob(reply).train_loss, 0.0);
  EXPECT_NE(FormatJobText(reply).find("loss:        train 0"), std::string::npos);
}

TEST(FormatTest, JobJsonHasProgressLossesMaskAndComputeWithNullForUnsetLosses) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000008", v1::JOB_STATE_RUNNING);
  v1::Job& job = *reply.mutable_job();
  job.set_step(120);
  job.set_train_loss(6.125);
  job.set_active_modules(40);
  job.set_total_modules(48);
  job.set_mask_version(7);
  job.set_flops_total(1.5e15);
  job.set_wall_seconds(37.5);
  job.set_attempt(1);
  v1::RankStatus* rank = reply.add_ranks();
  rank->set_rank(1);
  rank->set_worker_id("worker-000002");
  rank->set_step(119);
  rank->set_mask_version(6);

  json j = JobToJson(reply);
  EXPECT_EQ(j["error_message"], "");
  EXPECT_EQ(j["step"], 120);
  EXPECT_EQ(j["total_steps"], 2000);
  EXPECT_EQ(j["train_loss"], 6.125);
  EXPECT_TRUE(j.contains("val_loss"));
  EXPECT_TRUE(j["val_loss"].is_null()) << "unset until the first evaluation";
  EXPECT_TRUE(j["test_loss"].is_null());
  EXPECT_EQ(j["active_modules"], 40);
  EXPECT_EQ(j["total_modules"], 48);
  EXPECT_EQ(j["mask_version"], 7);
  EXPECT_EQ(j["flops_total"], 1.5e15);
  EXPECT_EQ(j["wall_seconds"], 37.5);
  EXPECT_EQ(j["attempt"], 1);
  EXPECT_TRUE(j["summary"].is_null());
  ASSERT_EQ(j["ranks"].size(), 1u);
  EXPECT_EQ(j["ranks"][0], json({{"rank", 1},
                                 {"worker_id", "worker-000002"},
                                 {"step", 119},
                                 {"mask_version", 6},
                                 {"param_checksum", ""}}));

  job.set_val_loss(6.05);
  job.set_test_loss(std::nan(""));
  j = JobToJson(reply);
  EXPECT_EQ(j["val_loss"], 6.05);
  EXPECT_EQ(j["test_loss"], "nan") << "JSON has no NaN";
  EXPECT_NO_THROW(json::parse(j.dump())) << "the dump must be valid JSON";
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
  EXPECT_THAT(text, HasSubstr("loss:        train -  val -  test -\n"));
  EXPECT_THAT(text, HasSubstr("modules:     -  mask -\n"));
  EXPECT_THAT(text, Not(HasSubstr("waiting:")));
}

TEST(FormatTest, AQueuedJobSaysWhatItWaitsFor) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000005", v1::JOB_STATE_QUEUED);
  reply.set_waiting("needs 2 cpu workers, 1 is connected: start 1 more (mat-worker --device cpu)");
  EXPECT_THAT(FormatJobText(reply),
              HasSubstr("state:       QUEUED\nwaiting:     needs 2 cpu workers, 1 is connected: "
                        "start 1 more (mat-worker --device cpu)\n"));
  EXPECT_EQ(JobToJson(reply)["waiting"], reply.waiting());
}

TEST(FormatTest, JobTextShowsProgressLossesMaskComputeAndRanks) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000004", v1::JOB_STATE_RUNNING);
  v1::Job& job = *reply.mutable_job();
  job.set_step(120);
  job.set_train_loss(6.1234);
  job.set_val_loss(6.05);
  job.set_active_modules(40);
  job.set_total_modules(48);
  job.set_mask_version(7);
  job.set_flops_total(1.5e15);
  job.set_wall_seconds(300);
  job.set_attempt(2);
  v1::RankStatus* rank = reply.add_ranks();
  rank->set_rank(0);
  rank->set_worker_id("worker-000001");
  rank->set_step(120);
  rank->set_mask_version(7);
  const std::string text = FormatJobText(reply);
  EXPECT_THAT(text, HasSubstr("step:        120 / 2000\n"));
  EXPECT_THAT(text, HasSubstr("loss:        train 6.123  val 6.05  test -\n"));
  EXPECT_THAT(text, HasSubstr("modules:     40/48 active  mask v7\n"));
  EXPECT_THAT(text, HasSubstr("compute:     1.5e+15 FLOPs  5m wall  attempt 2\n"));
  EXPECT_THAT(text, HasSubstr("rank 0:      worker worker-000001 step 120 mask v7\n"));
}

v1::WorkerInfo MakeWorker(const std::string& id, v1::WorkerState state, const std::string& device,
                          const std::string& host, int64_t last_seen) {
  v1::WorkerInfo w;
  w.set_worker_id(id);
  w.set_state(state);
  w.mutable_capabilities()->set_device(device);
  w.mutable_capabilities()->set_host(host);
  w.set_last_seen_unix_seconds(last_seen);
  return w;
}

TEST(FormatTest, WorkerTableShowsJobAndRankOnlyForWorkersThatRunARankAndTheAgeOfTheLastMessage) {
  const int64_t now = 1700000000;
  v1::WorkerInfo busy =
      MakeWorker("worker-000001", v1::WORKER_STATE_BUSY, "cuda:0", "gpu1", now - 2);
  busy.set_job_id("job-000003");
  busy.set_rank(1);
  v1::WorkerInfo idle = MakeWorker("worker-000002", v1::WORKER_STATE_IDLE, "cpu", "10.0.0.7", now);
  idle.set_job_id("job-000001");  // stale: only BUSY workers show their job
  const v1::WorkerInfo gone =
      MakeWorker("worker-000003", v1::WORKER_STATE_DISCONNECTED, "cpu", "host-c", now - 250);
  const v1::WorkerInfo never =
      MakeWorker("worker-000004", v1::WORKER_STATE_DISCONNECTED, "", "", 0);
  // Draining: with the rank it still runs, and without one.
  v1::WorkerInfo draining =
      MakeWorker("worker-000005", v1::WORKER_STATE_DRAINING, "cpu", "host-e", now - 1);
  draining.set_job_id("job-000004");
  draining.set_rank(0);
  const v1::WorkerInfo drained =
      MakeWorker("worker-000006", v1::WORKER_STATE_DRAINING, "cpu", "host-f", now);
  // Disconnected with a drain that waits for it.
  v1::WorkerInfo away =
      MakeWorker("worker-000007", v1::WORKER_STATE_DISCONNECTED, "cpu", "host-g", now - 60);
  away.set_drain_reason("disk swap");
  const std::vector<std::string> expected = {
      "WORKER         STATE                  DEVICE  HOST      JOB         RANK  LAST-SEEN",
      "worker-000001  BUSY                   cuda:0  gpu1      job-000003  1     2s ago",
      "worker-000002  IDLE                   cpu     10.0.0.7  -           -     0s ago",
      "worker-000003  DISCONNECTED           cpu     host-c    -           -     4m ago",
      "worker-000004  DISCONNECTED           -       -         -           -     -",
      "worker-000005  DRAINING               cpu     host-e    job-000004  0     1s ago",
      "worker-000006  DRAINING               cpu     host-f    -           -     0s ago",
      "worker-000007  DISCONNECTED(drained)  cpu     host-g    -           -     1m ago",
  };
  std::string want;
  for (const std::string& line : expected) want += line + "\n";
  EXPECT_EQ(FormatWorkerTable({busy, idle, gone, never, draining, drained, away}, now), want);
  EXPECT_EQ(FormatWorkerTable({}, now), "WORKER  STATE  DEVICE  HOST  JOB  RANK  LAST-SEEN\n");
  EXPECT_EQ(WorkerStateName(v1::WORKER_STATE_UNSPECIFIED), "UNSPECIFIED");
}

WatchState RunningState() {
  WatchState s;
  s.state = v1::JOB_STATE_RUNNING;
  s.step = 120;
  s.total_steps = 1000;
  s.train_loss = 6.1234;
  s.val_loss = 6.05;
  s.active_modules = 40;
  s.total_modules = 48;
  s.mask_version = 7;
  s.steps_per_second = 3.5;
  return s;
}

TEST(FormatTest, ProgressBarShowsStepPercentLossesModulesMaskRateAndEta) {
  const std::string rest =
      " step 120/1000 12% loss 6.123 val 6.05 active 40/48 mask v7 3.5 step/s ETA 4m";
  // Exactly wide enough for the smallest bar (10 cells, 1 filled).
  const int narrowest = static_cast<int>(rest.size()) + 12 + 1;
  EXPECT_EQ(FormatProgressBar(RunningState(), narrowest), "[#.........]" + rest);
  // Wider: the bar grows, up to 30 cells.
  EXPECT_EQ(FormatProgressBar(RunningState(), narrowest + 5), "[#..............]" + rest);
  EXPECT_EQ(FormatProgressBar(RunningState(), 500), "[###...........................]" + rest);
}

TEST(FormatTest, ProgressBarFitsNarrowTerminalsByLeavingOutTheLeastUsefulParts) {
  for (int width : {80, 70, 60, 50, 41, 20}) {
    const std::string line = FormatProgressBar(RunningState(), width);
    EXPECT_LE(static_cast<int>(line.size()), std::max(width - 1, 40)) << width;
    EXPECT_THAT(line, ::testing::StartsWith("[#")) << width;
    EXPECT_THAT(line, HasSubstr(" step 120/1000 12%")) << width;
    EXPECT_THAT(line, ::testing::Not(HasSubstr("mask v7"))) << width;
  }
  // 80 columns: mask and rate go first, and the bar takes what is left.
  EXPECT_EQ(FormatProgressBar(RunningState(), 80),
            "[##.................] step 120/1000 12% loss 6.123 val 6.05 active 40/48 ETA 4m");
  EXPECT_EQ(FormatProgressBar(RunningState(), 50),
            "[#..........] step 120/1000 12% loss 6.123 ETA 4m");
  EXPECT_EQ(FormatProgressBar(RunningState(), 20),
            "[##..................] step 120/1000 12%")
      << "at least 40 columns, even on a tinier terminal";
}

TEST(FormatTest, ProgressBarLeavesOutWhatIsUnknownAndNamesStatesOtherThanRunning) {
  WatchState queued;
  queued.state = v1::JOB_STATE_QUEUED;
  queued.total_steps = 1000;
  EXPECT_EQ(FormatProgressBar(queued, 60),
            "[..............................] step 0/1000 0% QUEUED");

  WatchState unknown_total = RunningState();
  unknown_total.total_steps = 0;
  unknown_total.val_loss.reset();
  unknown_total.mask_version = 0;
  EXPECT_EQ(FormatProgressBar(unknown_total, 100),
            "[..............................] step 120 loss 6.123 active 40/48 3.5 step/s");

  WatchState done = RunningState();
  done.state = v1::JOB_STATE_SUCCEEDED;
  done.step = 1000;
  EXPECT_EQ(FormatProgressBar(done, 200),
            "[##############################] step 1000/1000 100% loss 6.123 val 6.05 active "
            "40/48 mask v7 SUCCEEDED");
  done.step = 5000;  // past the end (never happens): still a full bar, not more
  EXPECT_THAT(FormatProgressBar(done, 200),
              ::testing::StartsWith("[" + std::string(30, '#') + "]"));
}

TEST(FormatTest, WatchStateStartsFromTheJobAndFoldsEveryEventIn) {
  v1::GetJobReply reply;
  *reply.mutable_job() = MakeJob("job-000005", v1::JOB_STATE_RUNNING);
  reply.mutable_job()->set_step(100);
  reply.mutable_job()->set_wall_seconds(50);
  reply.mutable_job()->set_total_modules(48);
  reply.mutable_job()->set_active_modules(48);
  WatchState s = WatchStateFromJob(reply);
  EXPECT_EQ(s.state, v1::JOB_STATE_RUNNING);
  EXPECT_EQ(s.step, 100);
  EXPECT_EQ(s.total_steps, 2000);
  EXPECT_FALSE(s.train_loss.has_value()) << "0 means no progress yet";
  EXPECT_FALSE(s.val_loss.has_value());
  EXPECT_DOUBLE_EQ(s.steps_per_second, 2.0);

  v1::JobEvent e;
  e.set_job_id("job-000005");
  e.set_step(120);
  e.mutable_progress()->set_train_loss(6.5);
  e.mutable_progress()->set_active_modules(40);
  e.mutable_progress()->set_total_modules(48);
  e.mutable_progress()->set_steps_per_second(4);
  EXPECT_FALSE(ApplyJobEvent(e, &s)) << "progress only redraws the bar";
  EXPECT_EQ(s.step, 120);
  EXPECT_EQ(s.train_loss, 6.5);
  EXPECT_EQ(s.active_modules, 40);
  EXPECT_EQ(s.steps_per_second, 4);

  e.mutable_mask()->set_mask_version(3);
  e.mutable_mask()->set_active_modules(36);
  EXPECT_FALSE(ApplyJobEvent(e, &s));
  EXPECT_EQ(s.mask_version, 3);
  EXPECT_EQ(s.active_modules, 36);

  e.set_step(200);
  e.mutable_evaluation()->set_val_loss(6.25);
  EXPECT_TRUE(ApplyJobEvent(e, &s)) << "evaluations get a line of their own";
  EXPECT_EQ(s.val_loss, 6.25);
  EXPECT_EQ(s.step, 200);

  e.mutable_state()->set_state(v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(ApplyJobEvent(e, &s));
  EXPECT_EQ(s.state, v1::JOB_STATE_SUCCEEDED);
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
  // Long doubles are shortened for the log line (status -o json keeps every digit).
  e.mutable_progress()->set_train_loss(10.392549514770508);
  e.mutable_progress()->set_flops_total(1113727280128.0);
  e.mutable_progress()->set_steps_per_second(2.710911915472291);
  EXPECT_EQ(FormatJobEvent(e),
            "2023-11-14T22:13:20Z job-000001 step 12 loss 10.393 active 6/8 flops 1.114e+12 2.71 "
            "steps/s");

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
