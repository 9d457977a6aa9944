// Tests of the gang scheduler (coordinator/gang_scheduler.h) alone: placement (device kinds, id
// order, all or nothing) and the wait description as pure functions, and the passes over a real
// JobStore in a temporary directory with fake idle-worker and start callbacks: restarting jobs
// before queued ones and keeping the idle workers they need, submission order, backfilling past a
// queued job that does not fit, a nested Run() making one more pass, and a start error ending
// the pass.
#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/job_spec.h"
#include "coordinator/gang_scheduler.h"
#include "coordinator/job_store.h"
#include "tests/testing/temp_dir.h"

namespace mat::coordinator {
namespace {

using ::testing::ElementsAre;

TEST(DeviceMatchesTest, CpuJobsOnCpuWorkersCudaJobsOnAnyCudaDevice) {
  EXPECT_TRUE(DeviceMatches("cpu", "cpu"));
  EXPECT_FALSE(DeviceMatches("cpu", "cuda:0"));
  EXPECT_TRUE(DeviceMatches("cuda", "cuda:0"));
  EXPECT_TRUE(DeviceMatches("cuda", "cuda:12"));
  EXPECT_FALSE(DeviceMatches("cuda", "cpu"));
  EXPECT_FALSE(DeviceMatches("cuda", "cuda:"));
  EXPECT_FALSE(DeviceMatches("cuda", "cuda:x"));
  EXPECT_FALSE(DeviceMatches("tpu", "cpu"));
}

v1::WorkerInfo Worker(const std::string& device, v1::WorkerState state,
                      const std::string& job = "") {
  v1::WorkerInfo w;
  w.mutable_capabilities()->set_device(device);
  w.set_state(state);
  w.set_job_id(job);
  return w;
}

// `matctl status` of a QUEUED job said nothing of what it waits for.
TEST(DescribeWaitTest, NamesTheMissingWorkersOrTheBusyOnesOfTheJobsDevice) {
  EXPECT_EQ(DescribeWait(1, "cpu", {}),
            "needs 1 cpu worker, 0 are connected: start 1 more (mat-worker --device cpu)");
  // Disconnected workers and other devices do not count.
  const std::vector<v1::WorkerInfo> some = {
      Worker("cpu", v1::WORKER_STATE_IDLE), Worker("cpu", v1::WORKER_STATE_DISCONNECTED),
      Worker("cuda:0", v1::WORKER_STATE_IDLE)};
  EXPECT_EQ(DescribeWait(2, "cpu", some),
            "needs 2 cpu workers, 1 is connected: start 1 more (mat-worker --device cpu)");
  EXPECT_EQ(DescribeWait(3, "cuda", some),
            "needs 3 cuda workers, 1 is connected: start 2 more (mat-worker --device cuda:N)");
  // Enough connected, too few idle: the jobs holding the others, each once.
  const std::vector<v1::WorkerInfo> busy = {
      Worker("cpu", v1::WORKER_STATE_BUSY, "job-000002"),
      Worker("cpu", v1::WORKER_STATE_IDLE),
      Worker("cpu", v1::WORKER_STATE_BUSY, "job-000001"),
      Worker("cpu", v1::WORKER_STATE_BUSY, "job-000002")};
  EXPECT_EQ(DescribeWait(2, "cpu", busy),
            "needs 2 idle cpu workers, 1 of the 4 connected is idle; the others run "
            "job-000001, job-000002");
}

// A restarting job whose lost peer froze: its survivor's cancelled rank waits in a collective
// until its timeout. The wait used to say the job waited for workers that "run" the job itself.
TEST(DescribeWaitTest, SaysWhichWorkersAreStillStoppingACancelledRank) {
  v1::WorkerInfo stopping = Worker("cpu", v1::WORKER_STATE_BUSY, "job-000015");
  stopping.set_stopping(true);
  const std::string tail =
      " still stopping a cancelled rank of job-000015 (one blocked in a collective with a lost "
      "peer stops at the worker's --rendezvous-timeout-ms)";
  EXPECT_EQ(DescribeWait(2, "cpu", {stopping, Worker("cpu", v1::WORKER_STATE_IDLE)}),
            "needs 2 idle cpu workers, 1 of the 2 connected is idle; 1 is" + tail);
  EXPECT_EQ(DescribeWait(3, "cpu",
                         {stopping, Worker("cpu", v1::WORKER_STATE_BUSY, "job-000016"),
                          Worker("cpu", v1::WORKER_STATE_IDLE)}),
            "needs 3 idle cpu workers, 1 of the 3 connected is idle; others run job-000016; "
            "1 is" + tail);
  // A draining worker is on its way out: not counted as connected.
  EXPECT_EQ(DescribeWait(1, "cpu", {Worker("cpu", v1::WORKER_STATE_DRAINING)}),
            "needs 1 cpu worker, 0 are connected: start 1 more (mat-worker --device cpu)");
}

TEST(PlaceGangTest, TakesTheFirstMatchingWorkersInOrderOrNone) {
  const std::vector<IdleWorker> idle = {
      {"w1", "cpu"}, {"w2", "cuda:0"}, {"w3", "cpu"}, {"w4", "cuda:1"}, {"w5", "cpu"}};
  EXPECT_THAT(*PlaceGang(2, "cpu", idle), ElementsAre("w1", "w3"));
  EXPECT_THAT(*PlaceGang(3, "cpu", idle), ElementsAre("w1", "w3", "w5"));
  EXPECT_THAT(*PlaceGang(2, "cuda", idle), ElementsAre("w2", "w4"));
  EXPECT_EQ(PlaceGang(4, "cpu", idle), std::nullopt) << "all ranks or none";
  EXPECT_EQ(PlaceGang(3, "cuda", idle), std::nullopt);
  EXPECT_EQ(PlaceGang(0, "cpu", idle), std::nullopt);
  EXPECT_EQ(PlaceGang(1, "cpu", {}), std::nullopt);
}

class GangSchedulerTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_gang_scheduler"};

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    auto store = JobStore::Open(tmp_.path() + "/state");
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    scheduler_ = std::make_unique<GangScheduler>(
        *store_, [this] { return idle_; },
        [this] {
          std::vector<IdleWorker> in_service = busy_;
          in_service.insert(in_service.end(), idle_.begin(), idle_.end());
          return in_service;
        },
        [this](const JobRecord& job, const std::vector<std::string>& workers) {
          return Start(job, workers);
        });
  }

  // A QUEUED job for `workers` ranks on `device`.
  std::string Queue(int workers, const std::string& device = "cpu") {
    v1::JobSpec spec;
    spec.mutable_resources()->set_workers(workers);
    spec.mutable_resources()->set_device(device);
    auto created = store_->CreateJob("", api::WithJobSpecDefaults(spec));
    EXPECT_TRUE(created.ok()) << created.status();
    return created.ok() ? created->job_id : "";
  }

  // The fake start: records the placement, marks the job RUNNING and its workers busy.
  absl::Status Start(const JobRecord& job, const std::vector<std::string>& workers) {
    if (!start_error_.ok()) return start_error_;
    started_.push_back(job.id + ":" + testing::PrintToString(workers));
    for (const std::string& w : workers) {
      idle_.erase(std::remove_if(idle_.begin(), idle_.end(),
                                 [&](const IdleWorker& i) { return i.id == w; }),
                  idle_.end());
    }
    EXPECT_TRUE(store_->UpdateJobState(job.id, v1::JOB_STATE_RUNNING).ok());
    if (on_start_) on_start_();
    return absl::OkStatus();
  }

  std::unique_ptr<JobStore> store_;
  std::unique_ptr<GangScheduler> scheduler_;
  std::vector<IdleWorker> idle_;
  std::vector<IdleWorker> busy_;  // in service, not idle (running or stopping a rank)
  std::vector<std::string> started_;
  absl::Status start_error_;
  std::function<void()> on_start_;
};

TEST_F(GangSchedulerTest, StartsQueuedJobsInSubmissionOrderAndBackfills) {
  const std::string big = Queue(3);
  const std::string small = Queue(1);
  const std::string gpu = Queue(1, "cuda");
  idle_ = {{"w1", "cpu"}, {"w2", "cpu"}, {"w3", "cuda:0"}};
  scheduler_->Run();
  // The 3-rank job does not fit; the ones behind it start at once (no head-of-line blocking).
  EXPECT_THAT(started_, ElementsAre(small + ":{ \"w1\" }", gpu + ":{ \"w3\" }"));
  EXPECT_EQ(store_->GetJob(big)->state, v1::JOB_STATE_QUEUED);
  started_.clear();
  idle_ = {{"w2", "cpu"}, {"w4", "cpu"}, {"w5", "cpu"}};
  scheduler_->Run();
  EXPECT_THAT(started_, ElementsAre(big + ":{ \"w2\", \"w4\", \"w5\" }"));
}

// `matctl status` said what workers a queued job needs, not which jobs a pass considers before
// it. JobsAhead names them in pass order: restarting jobs, then older queued ones, of the same
// device kind only; the wait text carries them.
TEST_F(GangSchedulerTest, JobsAheadAreTheRestartingThenOlderQueuedJobsOfTheSameDevice) {
  const std::string q1 = Queue(2);
  const std::string gpu = Queue(1, "cuda");
  const std::string r1 = Queue(1);
  const std::string q2 = Queue(1);
  const std::string r2 = Queue(3);
  for (const std::string& r : {r1, r2}) {
    ASSERT_TRUE(store_->UpdateJobState(r, v1::JOB_STATE_RUNNING).ok());
    ASSERT_TRUE(store_->UpdateJobState(r, v1::JOB_STATE_RESTARTING).ok());
  }
  auto ahead = scheduler_->JobsAhead(q2, v1::JOB_STATE_QUEUED, "cpu");
  ASSERT_TRUE(ahead.ok()) << ahead.status();
  EXPECT_THAT(*ahead, ElementsAre(r1, r2, q1));
  ahead = scheduler_->JobsAhead(q1, v1::JOB_STATE_QUEUED, "cpu");
  ASSERT_TRUE(ahead.ok()) << ahead.status();
  EXPECT_THAT(*ahead, ElementsAre(r1, r2));
  ahead = scheduler_->JobsAhead(r2, v1::JOB_STATE_RESTARTING, "cpu");
  ASSERT_TRUE(ahead.ok()) << ahead.status();
  EXPECT_THAT(*ahead, ElementsAre(r1));
  ahead = scheduler_->JobsAhead(r1, v1::JOB_STATE_RESTARTING, "cpu");
  ASSERT_TRUE(ahead.ok()) << ahead.status();
  EXPECT_TRUE(ahead->empty());
  ahead = scheduler_->JobsAhead(gpu, v1::JOB_STATE_QUEUED, "cuda");
  ASSERT_TRUE(ahead.ok()) << ahead.status();
  EXPECT_TRUE(ahead->empty()) << "cpu jobs do not wait for cuda workers";

  EXPECT_EQ(DescribeWait(1, "cpu", {}, {r1, r2, q1}),
            "needs 1 cpu worker, 0 are connected: start 1 more (mat-worker --device cpu); 3 jobs "
            "are ahead of it for cpu workers: " + r1 + ", " + r2 + ", " + q1);
  EXPECT_EQ(DescribeWait(1, "cpu", {Worker("cpu", v1::WORKER_STATE_BUSY, "job-000009")},
                         {"a", "b", "c", "d", "e", "f", "g"}),
            "needs 1 idle cpu worker, 0 of the 1 connected are idle; the others run job-000009; "
            "7 jobs are ahead of it for cpu workers: a, b, c, d, e and 2 more");
  EXPECT_EQ(DescribeWait(1, "cpu", {}, {"x"}),
            "needs 1 cpu worker, 0 are connected: start 1 more (mat-worker --device cpu); 1 job "
            "is ahead of it for cpu workers: x");
}

TEST_F(GangSchedulerTest, RestartingJobsGoBeforeQueuedOnes) {
  const std::string queued = Queue(1);
  const std::string restarting = Queue(1);
  ASSERT_TRUE(store_->UpdateJobState(restarting, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store_->UpdateJobState(restarting, v1::JOB_STATE_RESTARTING).ok());
  idle_ = {{"w1", "cpu"}};
  scheduler_->Run();
  EXPECT_THAT(started_, ElementsAre(restarting + ":{ \"w1\" }"));
  EXPECT_EQ(store_->GetJob(queued)->state, v1::JOB_STATE_QUEUED);
}

// A lost rank's peers stop one by one: the first idle one is kept for the restarting job, not
// given to a newer job, while enough workers are in service to run it.
TEST_F(GangSchedulerTest, ARestartingJobKeepsTheIdleWorkersItNeedsWhileEnoughAreInService) {
  const std::string restarting = Queue(2);
  ASSERT_TRUE(store_->UpdateJobState(restarting, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store_->UpdateJobState(restarting, v1::JOB_STATE_RESTARTING).ok());
  const std::string small = Queue(1);
  const std::string gpu = Queue(1, "cuda");
  idle_ = {{"w1", "cpu"}, {"w3", "cuda:0"}};
  busy_ = {{"w2", "cpu"}};  // still stopping its rank of the restarting job
  scheduler_->Run();
  EXPECT_THAT(started_, ElementsAre(gpu + ":{ \"w3\" }")) << "other kinds are not held";
  EXPECT_EQ(store_->GetJob(small)->state, v1::JOB_STATE_QUEUED);
  started_.clear();
  busy_.clear();
  idle_ = {{"w1", "cpu"}, {"w2", "cpu"}};
  scheduler_->Run();
  EXPECT_THAT(started_, ElementsAre(restarting + ":{ \"w1\", \"w2\" }"));
  EXPECT_EQ(store_->GetJob(small)->state, v1::JOB_STATE_QUEUED);

  // Too few workers in service to run it (the lost one is gone): nothing is held for it.
  const std::string stuck = Queue(3);
  ASSERT_TRUE(store_->UpdateJobState(stuck, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store_->UpdateJobState(stuck, v1::JOB_STATE_RESTARTING).ok());
  started_.clear();
  idle_ = {{"w4", "cpu"}};
  busy_ = {{"w1", "cpu"}};
  scheduler_->Run();
  EXPECT_THAT(started_, ElementsAre(small + ":{ \"w4\" }"));
}

TEST_F(GangSchedulerTest, ANestedRunMakesOneMorePassInsteadOfRecursing) {
  const std::string first = Queue(1);
  const std::string second = Queue(1);
  int nested = 0;
  on_start_ = [&] {
    ++nested;
    // A worker freed by a listener inside the start: the running Run() must pick it up.
    if (nested == 1) idle_.push_back({"w9", "cpu"});
    scheduler_->Run();  // only marks another pass
  };
  idle_ = {{"w1", "cpu"}};
  scheduler_->Run();
  EXPECT_THAT(started_, ElementsAre(first + ":{ \"w1\" }", second + ":{ \"w9\" }"));
  EXPECT_EQ(nested, 2);
}

TEST_F(GangSchedulerTest, AStartErrorEndsThePassAndTheNextRunRetries) {
  const std::string a = Queue(1);
  const std::string b = Queue(1);
  idle_ = {{"w1", "cpu"}, {"w2", "cpu"}};
  start_error_ = absl::UnavailableError("disk full");
  scheduler_->Run();
  EXPECT_TRUE(started_.empty());
  start_error_ = absl::OkStatus();
  scheduler_->Run();
  EXPECT_THAT(started_, ElementsAre(a + ":{ \"w1\" }", b + ":{ \"w2\" }"));
}

TEST_F(GangSchedulerTest, NoIdleWorkerStartsNothing) {
  Queue(1);
  scheduler_->Run();
  EXPECT_TRUE(started_.empty());
}

}  // namespace
}  // namespace mat::coordinator
