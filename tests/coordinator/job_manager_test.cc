// Tests of the job manager (coordinator/job_manager.h) alone, on a real JobStore in a temporary
// directory and a manual clock (tests/testing/manual_clock.h): admission (defaults, unknown
// fields, idempotency), the watchers (current state first, state changes and events in order, the
// last event ending every subscription, a listener unwatching itself), the cancel check, the
// replayed-schedule refusals, the log request checks, and the job metrics (counts from the store
// at start, a finished job's series removed after the retention).
#include <memory>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/job_spec.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_manager.h"
#include "coordinator/job_store.h"
#include "google/protobuf/unknown_field_set.h"
#include "tests/testing/manual_clock.h"
#include "tests/testing/temp_dir.h"

namespace mat::coordinator {
namespace {

using ::testing::HasSubstr;

v1::JobSpec Spec(const std::string& policy = "mat") {
  v1::JobSpec spec;
  spec.mutable_model()->set_layers(2);
  spec.mutable_train()->set_steps(100);
  spec.mutable_policy()->set_kind(policy);
  return spec;
}

struct Seen {
  std::string what;  // "state:RUNNING", "progress", …
  bool last;
};

class JobManagerTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_job_manager"};

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    auto store = JobStore::Open(tmp_.path() + "/state", time_.store_options());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    Make();
  }

  void Make() {
    jobs_ = std::make_unique<JobManager>(*store_, clock_, &metrics_,
                                         JobManagerOptions{{}, 0, /*retention=*/60});
  }

  std::string Submit(const v1::JobSpec& spec = Spec(), const std::string& request = "") {
    auto reply = jobs_->Submit(request, spec, "client-a");
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? reply->job_id() : "";
  }

  JobEventListener Recorder(std::vector<Seen>* out) {
    return [out](const v1::JobEvent& e, bool last) {
      std::string what = e.has_state() ? "state:" + JobStateName(e.state().state())
                         : e.has_progress() ? "progress"
                                            : "other";
      out->push_back(Seen{what, last});
    };
  }

  tests::ManualClock time_;
  Clock clock_ = time_.clock();
  CoordinatorMetrics metrics_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<JobManager> jobs_;
};

TEST_F(JobManagerTest, SubmitStoresTheSpecWithDefaultsAndIsIdempotent) {
  auto first = jobs_->Submit("req-1", Spec(), "client-a");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->created());
  auto again = jobs_->Submit("req-1", Spec(), "client-a");
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created());
  EXPECT_EQ(again->job_id(), first->job_id());
  auto got = jobs_->Get(first->job_id());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(got->job().spec().DebugString(), api::WithJobSpecDefaults(Spec()).DebugString());
  EXPECT_EQ(got->ranks_size(), 0);
  EXPECT_EQ(metrics_.jobs.Value({"queued"}), 1);

  v1::JobSpec unknown = Spec();
  unknown.mutable_train()->GetReflection()->MutableUnknownFields(unknown.mutable_train())
      ->AddVarint(42, 1);
  auto refused = jobs_->Submit("", unknown, "client-a");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("spec.train: unknown field number 42"));
  v1::JobSpec bad = Spec();
  bad.mutable_policy()->set_alpha(1.5);
  EXPECT_THAT(jobs_->Submit("", bad, "client-a").status().message(),
              HasSubstr("policy.alpha"));
  EXPECT_EQ(jobs_->Get("job-000042").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(jobs_->Get("").status().code(), absl::StatusCode::kInvalidArgument);
}

// `matctl logs --rank 5` on a 2-rank job printed nothing and exited 0: a rank the job does not
// have is refused, naming the ranks it has.
TEST_F(JobManagerTest, LogsOfARankTheJobDoesNotHaveAreRefusedNamingItsRanks) {
  v1::JobSpec two = Spec();
  two.mutable_resources()->set_workers(2);
  const std::string job = Submit(two);
  const std::string single = Submit();
  v1::GetJobLogsRequest request;
  request.set_job_id(job);
  request.set_rank(1);
  EXPECT_TRUE(jobs_->GetLogs(request).ok()) << jobs_->GetLogs(request).status();
  request.set_rank(2);
  absl::Status beyond = jobs_->GetLogs(request).status();
  EXPECT_EQ(beyond.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(beyond.message(),
              HasSubstr("rank 2 is not a rank of job " + job + ": it has ranks 0 to 1"));
  request.set_job_id(single);
  request.set_rank(1);
  EXPECT_THAT(jobs_->GetLogs(request).status().message(), HasSubstr("it has rank 0 only"));
  request.set_rank(-1);
  EXPECT_EQ(jobs_->GetLogs(request).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(JobManagerTest, WatchersSeeTheCurrentStateThenEveryEventAndTheLastEndsThem) {
  const std::string job = Submit();
  std::vector<Seen> seen;
  ASSERT_TRUE(jobs_->Watch(job, Recorder(&seen)).ok());
  EXPECT_EQ(jobs_->WatcherCount(job), 1);
  ASSERT_TRUE(jobs_->UpdateState(job, v1::JOB_STATE_RUNNING).ok());
  v1::JobEvent progress;
  progress.set_job_id(job);
  progress.mutable_progress()->set_train_loss(3.5);
  jobs_->PublishEvent(progress);
  EXPECT_EQ(jobs_->UpdateState(job, v1::JOB_STATE_QUEUED).code(),
            absl::StatusCode::kFailedPrecondition)
      << "an illegal transition publishes nothing";
  ASSERT_TRUE(jobs_->UpdateState(job, v1::JOB_STATE_SUCCEEDED).ok());
  ASSERT_EQ(seen.size(), 4u);
  EXPECT_EQ(seen[0].what, "state:QUEUED");
  EXPECT_FALSE(seen[0].last);
  EXPECT_EQ(seen[1].what, "state:RUNNING");
  EXPECT_EQ(seen[2].what, "progress");
  EXPECT_EQ(seen[3].what, "state:SUCCEEDED");
  EXPECT_TRUE(seen[3].last);
  EXPECT_EQ(jobs_->WatcherCount(job), 0);

  std::vector<Seen> late;
  ASSERT_TRUE(jobs_->Watch(job, Recorder(&late)).ok());
  ASSERT_EQ(late.size(), 1u);
  EXPECT_TRUE(late[0].last) << "a finished job: one last event, no subscription";
  EXPECT_EQ(jobs_->WatcherCount(job), 0);
  EXPECT_EQ(jobs_->Watch("job-000099", Recorder(&late)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(JobManagerTest, AListenerMayUnwatchItselfAndTheOthersStillHearTheEvent) {
  const std::string job = Submit();
  std::vector<Seen> a, b;
  WatchId self = 0;
  auto id = jobs_->Watch(job, [&](const v1::JobEvent& e, bool last) {
    a.push_back(Seen{"event", last});
    if (e.has_progress()) jobs_->Unwatch(self);
  });
  ASSERT_TRUE(id.ok());
  self = *id;
  ASSERT_TRUE(jobs_->Watch(job, Recorder(&b)).ok());
  v1::JobEvent progress;
  progress.set_job_id(job);
  progress.mutable_progress();
  jobs_->PublishEvent(progress);
  jobs_->PublishEvent(progress);
  EXPECT_EQ(a.size(), 2u) << "current state, then one progress event";
  EXPECT_EQ(b.size(), 3u);
  EXPECT_EQ(jobs_->WatcherCount(job), 1);
}

TEST_F(JobManagerTest, CancelIsRefusedForAFinishedJobNamingItsState) {
  const std::string job = Submit();
  EXPECT_TRUE(jobs_->CheckCancellable(job).ok());
  ASSERT_TRUE(jobs_->UpdateState(job, v1::JOB_STATE_CANCELLED, "by test").ok());
  absl::Status st = jobs_->CheckCancellable(job);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr(job + " is already CANCELLED: nothing to cancel"));
  EXPECT_EQ(jobs_->CheckCancellable("job-000077").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(jobs_->CheckCancellable("").code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(JobManagerTest, ReplayedScheduleRefusesWhatCannotBeReplayed) {
  auto missing = jobs_->ReplayedSchedule("job-000123");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(),
              HasSubstr("policy.rand_schedule_job: no job 'job-000123' on this coordinator"));
  const std::string full = Submit(Spec("full"));
  EXPECT_THAT(jobs_->ReplayedSchedule(full).status().message(),
              HasSubstr("ran policy.kind full, not mat"));
  const std::string mat = Submit();
  auto running = jobs_->ReplayedSchedule(mat);
  EXPECT_EQ(running.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(running.status().message(), HasSubstr("is QUEUED, not SUCCEEDED"));
  ASSERT_TRUE(jobs_->UpdateState(mat, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(jobs_->UpdateState(mat, v1::JOB_STATE_SUCCEEDED).ok());
  EXPECT_THAT(jobs_->ReplayedSchedule(mat).status().message(),
              HasSubstr("has no stored decision to replay"));
}

TEST_F(JobManagerTest, JobCountsStartFromTheStoreAndFinishedSeriesExpire) {
  const std::string done = Submit();
  ASSERT_TRUE(jobs_->UpdateState(done, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(jobs_->UpdateState(done, v1::JOB_STATE_FAILED, "lost").ok());
  Submit();
  metrics_.job_step.Set({done}, 7);
  // A new manager (a coordinator restart) counts the stored jobs.
  jobs_.reset();
  CoordinatorMetrics fresh;
  JobManager again(*store_, clock_, &fresh, JobManagerOptions{{}, 0, 60});
  EXPECT_EQ(fresh.jobs.Value({"failed"}), 1);
  EXPECT_EQ(fresh.jobs.Value({"queued"}), 1);
  EXPECT_EQ(fresh.jobs.Value({"running"}), 0);

  Make();
  const std::string ending = Submit();
  ASSERT_TRUE(jobs_->UpdateState(ending, v1::JOB_STATE_RUNNING).ok());
  metrics_.job_step.Set({ending}, 9);
  ASSERT_TRUE(jobs_->UpdateState(ending, v1::JOB_STATE_SUCCEEDED).ok());
  time_.ms += 59'000;
  jobs_->ExpireFinishedSeries();
  EXPECT_TRUE(metrics_.job_step.Exists({ending})) << "kept for the retention";
  time_.ms += 1'000;
  jobs_->ExpireFinishedSeries();
  EXPECT_FALSE(metrics_.job_step.Exists({ending}));
}

// A coordinator restart dropped every finished job's series, though the retention promised
// them (a dashboard's baseline-job picker lost the job). The new manager restores the job-level
// series of the jobs that ended within the retention, from the store, expiring on time.
TEST_F(JobManagerTest, ARestartKeepsTheSeriesOfJobsThatEndedWithinTheRetention) {
  const std::string old_job = Submit();
  ASSERT_TRUE(jobs_->UpdateState(old_job, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(jobs_->UpdateState(old_job, v1::JOB_STATE_SUCCEEDED).ok());
  time_.unix_seconds += 100;  // beyond the 60 s retention
  const std::string recent = Submit();
  ASSERT_TRUE(jobs_->UpdateState(recent, v1::JOB_STATE_RUNNING).ok());
  JobProgressUpdate progress;
  progress.step = 40;
  progress.train_loss = 5.5;
  progress.val_loss = 5.25;
  progress.test_loss = 5.125;
  progress.flops_total = 8e9;
  ASSERT_TRUE(store_->UpdateJobProgress(recent, progress).ok());
  ASSERT_TRUE(store_->SetJobSummary(recent, R"({"world_size": 2, "flops_saved": 1e9})").ok());
  ASSERT_TRUE(jobs_->UpdateState(recent, v1::JOB_STATE_SUCCEEDED).ok());
  time_.unix_seconds += 20;
  time_.ms += 20'000;

  jobs_.reset();  // a coordinator restart: new metrics, a new manager
  CoordinatorMetrics fresh;
  JobManager again(*store_, clock_, &fresh, JobManagerOptions{{}, 0, 60});
  EXPECT_EQ(fresh.job_step.Value({recent}), 40);
  EXPECT_EQ(fresh.job_loss.Value({recent, "train"}), 5.5);
  EXPECT_EQ(fresh.job_loss.Value({recent, "val"}), 5.25);
  EXPECT_EQ(fresh.job_loss.Value({recent, "test"}), 5.125);
  EXPECT_EQ(fresh.job_flops_total.Value({recent}), 8e9);
  EXPECT_EQ(fresh.job_flops_saved_total.Value({recent}), 2e9);
  EXPECT_FALSE(fresh.job_step.Exists({old_job})) << "ended before the retention";
  time_.ms += 39'000;  // 59 s after its end
  again.ExpireFinishedSeries();
  EXPECT_TRUE(fresh.job_step.Exists({recent}));
  time_.ms += 1'000;
  again.ExpireFinishedSeries();
  EXPECT_FALSE(fresh.job_step.Exists({recent}));
  EXPECT_FALSE(fresh.job_loss.Exists({recent, "val"}));
}

TEST_F(JobManagerTest, SummaryMetricsTakeThePhasesAndTheSaving) {
  const std::string job = Submit();
  jobs_->RecordSummaryMetrics(
      job, R"({"flops_by_phase": {"forward": 10, "weight_grad": 4}, "flops_saved": 3})");
  EXPECT_EQ(metrics_.job_flops_by_phase_total.Value({job, "forward"}), 10);
  EXPECT_EQ(metrics_.job_flops_by_phase_total.Value({job, "weight_grad"}), 4);
  EXPECT_EQ(metrics_.job_flops_saved_total.Value({job}), 3);
  jobs_->RecordSummaryMetrics(job, "not json");  // ignored
  EXPECT_EQ(metrics_.job_flops_saved_total.Value({job}), 3);
  // A 2-rank job's summary holds rank 0's share: the series are the job's, as
  // mat_job_flops_total is (the dashboard's saved fraction was half the true one).
  const std::string two = Submit();
  jobs_->RecordSummaryMetrics(
      two, R"({"world_size": 2, "flops_by_phase": {"forward": 10}, "flops_saved": 3})");
  EXPECT_EQ(metrics_.job_flops_by_phase_total.Value({two, "forward"}), 20);
  EXPECT_EQ(metrics_.job_flops_saved_total.Value({two}), 6);
}

}  // namespace
}  // namespace mat::coordinator
