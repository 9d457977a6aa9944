// RankRunner's protocol side without a coordinator: a fake session records what the rank sends.
// Decide reports λ and blocks until the mask of its step arrives (then acks it), fails after the
// bound, and stops on Cancel; the bit strings decode LSB-first; a bad mask is refused; the hooks
// record the rank's metrics (step, durations, mask wait); lines logged without a session are
// resent before the RankDone; a RankDone the coordinator could not store is sent again.
#include "worker/rank_runner.h"

#include <memory>
#include <optional>

#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "spdlog/spdlog.h"
#include "worker/log_forwarder.h"

namespace mat::worker {
namespace {

using namespace std::chrono_literals;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using metrics::HistogramSnapshot;

class FakeSession {
 public:
  // Records `m` when connected; false (not delivered) otherwise.
  bool Send(const v1::WorkerMessage& m) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!connected_) return false;
    sent_.push_back(m);
    return true;
  }
  void SetConnected(bool connected) {
    std::lock_guard<std::mutex> lock(mu_);
    connected_ = connected;
  }
  std::vector<v1::WorkerMessage> sent() {
    std::lock_guard<std::mutex> lock(mu_);
    return sent_;
  }

 private:
  std::mutex mu_;
  bool connected_ = true;
  std::vector<v1::WorkerMessage> sent_;
};

v1::Assign MakeAssign() {
  v1::Assign a;
  a.set_job_id("job-000007");
  a.set_rank(1);
  a.set_world_size(2);
  return a;
}

v1::MaskUpdate MakeMask(int64_t version, int64_t step, std::string bits, int n) {
  v1::MaskUpdate m;
  m.set_job_id("job-000007");
  m.set_mask_version(version);
  m.set_effective_step(step);
  m.set_bits(std::move(bits));
  m.set_num_modules(n);
  return m;
}

class RankRunnerTest : public ::testing::Test {
 protected:
  RankRunner MakeRunner(std::chrono::milliseconds timeout, WorkerMetrics* metrics = nullptr,
                        int64_t max_staleness = 0) {
    RankRunnerOptions o;
    o.worker_id = "worker-000002";
    o.mask_timeout = timeout;
    o.max_mask_staleness_steps = max_staleness;
    o.metrics = metrics;
    return RankRunner(MakeAssign(), o, [this](const v1::WorkerMessage& m) { return session_.Send(m); });
  }
  FakeSession session_;
};

TEST(ScheduleFromMaskUpdateTest, DecodesBitsLeastSignificantFirst) {
  // 10 modules: byte 0 = 0b00100101 -> modules 0, 2, 5; byte 1 = 0b10 -> module 9.
  v1::MaskUpdate m = MakeMask(1, 0, std::string("\x25\x02", 2), 10);
  auto s = ScheduleFromMaskUpdate(m, 10);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(s->every_step, ElementsAre(1, 0, 1, 0, 0, 1, 0, 0, 0, 1));
  EXPECT_EQ(s->slow_every, 0);
  m.set_slow_bits(std::string("\x02\x00", 2));
  m.set_slow_every_steps(4);
  s = ScheduleFromMaskUpdate(m, 10);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(s->slow, ElementsAre(0, 1, 0, 0, 0, 0, 0, 0, 0, 0));
  EXPECT_EQ(s->slow_every, 4);
}

TEST(ScheduleFromMaskUpdateTest, RefusesWrongSizes) {
  EXPECT_EQ(ScheduleFromMaskUpdate(MakeMask(1, 0, "\x01", 10), 10).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ScheduleFromMaskUpdate(MakeMask(1, 0, "\x01", 8), 9).status().code(),
            absl::StatusCode::kInvalidArgument);
  v1::MaskUpdate m = MakeMask(1, 0, "\x01", 8);
  m.set_slow_every_steps(2);  // but no slow_bits
  EXPECT_EQ(ScheduleFromMaskUpdate(m, 8).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(RankRunnerTest, DecideReportsThenWaitsForTheMaskOfItsStepAndAcksIt) {
  RankRunner runner = MakeRunner(10s);
  trainer::ProbeResult probe;
  probe.modules.resize(3);
  for (int i = 0; i < 3; ++i) probe.modules[i].lambda_max = 1.5 * (i + 1);
  std::thread coordinator([&] {
    std::this_thread::sleep_for(50ms);
    runner.OnMask(MakeMask(3, 10, "\x05", 3));  // a mask for a later step: not this one
    std::this_thread::sleep_for(50ms);
    runner.OnMask(MakeMask(2, 20, "\x05", 3));  // older version than 3: ignored
    runner.OnMask(MakeMask(4, 20, "\x06", 3));
  });
  auto schedule = runner.Decide(20, probe);
  coordinator.join();
  ASSERT_TRUE(schedule.ok()) << schedule.status();
  EXPECT_THAT(schedule->every_step, ElementsAre(0, 1, 1));
  std::vector<v1::WorkerMessage> sent = session_.sent();
  ASSERT_EQ(sent.size(), 2u);
  ASSERT_TRUE(sent[0].has_spectra());
  EXPECT_EQ(sent[0].worker_id(), "worker-000002");
  EXPECT_EQ(sent[0].spectra().job_id(), "job-000007");
  EXPECT_EQ(sent[0].spectra().rank(), 1);
  EXPECT_EQ(sent[0].spectra().step(), 20);
  EXPECT_THAT(sent[0].spectra().lambda_max(), ElementsAre(1.5, 3.0, 4.5));
  ASSERT_TRUE(sent[1].has_mask_ack());
  EXPECT_EQ(sent[1].mask_ack().mask_version(), 4);
}

TEST_F(RankRunnerTest, HooksRecordTheRanksMetrics) {
  WorkerMetrics metrics;
  RankRunner runner = MakeRunner(10s, &metrics);
  const metrics::LabelValues labels = {"job-000007", "1"};
  trainer::TrainerProgress p;
  p.step = 1;
  p.wall_seconds = 0.1;
  runner.OnProgress(p);
  EXPECT_EQ(metrics.step.Value(labels), 1);
  EXPECT_GT(metrics.last_step_timestamp_seconds.Value(labels), 1.7e9);
  EXPECT_EQ(metrics.step_duration_seconds.Get(labels).count, 1u);
  EXPECT_DOUBLE_EQ(metrics.step_duration_seconds.Get(labels).sum, 0.1);

  // A probe step: the probe and the wait for the mask are timed apart from the step.
  trainer::ProbeResult probe;
  probe.modules.resize(3);
  probe.seconds = 0.25;
  std::thread coordinator([&] {
    std::this_thread::sleep_for(30ms);
    runner.OnMask(MakeMask(1, 1, "\x07", 3));
  });
  ASSERT_TRUE(runner.Decide(1, probe).ok());
  coordinator.join();
  EXPECT_EQ(metrics.spectral_duration_seconds.Get(labels).count, 1u);
  EXPECT_DOUBLE_EQ(metrics.spectral_duration_seconds.Get(labels).sum, 0.25);
  const HistogramSnapshot wait = metrics.mask_wait_seconds.Get(labels);
  EXPECT_EQ(wait.count, 1u);
  EXPECT_GE(wait.sum, 0.02);
  p.step = 2;
  p.wall_seconds = 0.1 + 0.25 + wait.sum + 0.125;  // the step itself took 0.125 s
  runner.OnProgress(p);
  EXPECT_EQ(metrics.step.Value(labels), 2);
  EXPECT_NEAR(metrics.step_duration_seconds.Get(labels).sum, 0.1 + 0.125, 1e-9);
  // A single rank all-reduces nothing (no process group): no bytes series; its own loss is the
  // only one counted.
  absl::StatusOr<int> not_finite = runner.ReduceGradients({1, 1, 1}, true);
  ASSERT_TRUE(not_finite.ok()) << not_finite.status();
  EXPECT_EQ(*not_finite, 0);
  not_finite = runner.ReduceGradients({1, 1, 1}, false);
  ASSERT_TRUE(not_finite.ok()) << not_finite.status();
  EXPECT_EQ(*not_finite, 1);
  EXPECT_FALSE(metrics.allreduce_bytes_total.Exists(labels));
}

TEST_F(RankRunnerTest, DecideFailsWhenTheMaskDoesNotComeInTime) {
  RankRunner runner = MakeRunner(100ms);
  auto schedule = runner.Decide(0, trainer::ProbeResult{});
  EXPECT_EQ(schedule.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(schedule.status().message()), HasSubstr("no mask for step 0"));
  // The report went out with no λ (a policy that needs none).
  ASSERT_FALSE(session_.sent().empty());
  EXPECT_EQ(session_.sent()[0].spectra().lambda_max_size(), 0);
}

TEST_F(RankRunnerTest, WithoutACoordinatorARankGoesOnUnderTheLastMaskUpToTheBound) {
  // Probes every step here (Train was not run: the interval defaults to 1), at most 2 stale.
  RankRunner runner = MakeRunner(300ms, nullptr, 2);
  runner.OnMask(MakeMask(1, 0, "\x05", 3));
  auto first = runner.Decide(0, trainer::ProbeResult{});
  ASSERT_TRUE(first.ok()) << first.status();
  // Connected, no mask: it waits (and fails after the bound) rather than go stale.
  EXPECT_EQ(runner.Decide(1, trainer::ProbeResult{}).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  runner.SetConnected(false);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t step : {2, 3}) {
    auto stale = runner.Decide(step, trainer::ProbeResult{});
    ASSERT_TRUE(stale.ok()) << step << ": " << stale.status();
    EXPECT_THAT(stale->every_step, ElementsAre(1, 0, 1)) << "the mask of step 0";
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 250ms) << "a stale step must not wait";
  // Two steps without a fresh mask: the third waits and fails.
  EXPECT_EQ(runner.Decide(4, trainer::ProbeResult{}).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  // A fresh mask resets the count.
  runner.SetConnected(true);
  runner.OnMask(MakeMask(2, 5, "\x02", 3));
  auto fresh = runner.Decide(5, trainer::ProbeResult{});
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_THAT(fresh->every_step, ElementsAre(0, 1, 0));
  runner.SetConnected(false);
  auto stale = runner.Decide(6, trainer::ProbeResult{});
  ASSERT_TRUE(stale.ok()) << stale.status();
  EXPECT_THAT(stale->every_step, ElementsAre(0, 1, 0));
}

TEST_F(RankRunnerTest, CancelWakesAWaitingDecideAndStopsTheLoop) {
  RankRunner runner = MakeRunner(60s);
  std::thread canceller([&] {
    std::this_thread::sleep_for(50ms);
    runner.Cancel("cancelled by request");
  });
  const auto t0 = std::chrono::steady_clock::now();
  auto schedule = runner.Decide(0, trainer::ProbeResult{});
  canceller.join();
  EXPECT_EQ(schedule.status().code(), absl::StatusCode::kCancelled);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_EQ(runner.CheckContinue().code(), absl::StatusCode::kCancelled);
}

TEST_F(RankRunnerTest, DataDirOutsideTheWorkersDataRootsFailsTheRankBeforeOpeningIt) {
  for (const std::string dir : {"/etc", "/srv/mat-data/../../etc", "relative/corpus"}) {
    v1::Assign assign = MakeAssign();
    assign.mutable_spec()->mutable_data()->set_dir(dir);
    RankRunnerOptions o;
    o.worker_id = "worker-000002";
    o.data_roots = {"/srv/mat-data"};
    RankRunner runner(assign, o, [this](const v1::WorkerMessage& m) { return session_.Send(m); });
    runner.Start();
    runner.Join();
    ASSERT_FALSE(session_.sent().empty()) << dir;
    const v1::WorkerMessage last = session_.sent().back();
    ASSERT_TRUE(last.has_done()) << dir;
    EXPECT_FALSE(last.done().ok());
    EXPECT_THAT(last.done().error_message(), HasSubstr("FAILED_PRECONDITION: data.dir: '"));
    EXPECT_THAT(last.done().error_message(), HasSubstr("not under a data root (/srv/mat-data)"))
        << last.done().error_message();
    EXPECT_THAT(last.done().error_message(), HasSubstr("(mat-worker --data-root)"));
  }
}

// The coordinator's store refused the RankDone for now (a full disk: UNAVAILABLE): the rank
// hands it over once more for the next heartbeat, each time it is refused so, and not for other
// refusals. It used to stay lost: the job stayed RUNNING and the worker BUSY for good.
TEST_F(RankRunnerTest, ARankDoneTheCoordinatorCouldNotStoreIsSentAgain) {
  v1::Assign assign = MakeAssign();
  assign.mutable_spec()->mutable_data()->set_dir("/etc");  // fails at once: a RankDone
  RankRunnerOptions o;
  o.worker_id = "worker-000002";
  o.data_roots = {"/srv/mat-data"};
  RankRunner runner(assign, o, [this](const v1::WorkerMessage& m) { return session_.Send(m); });
  EXPECT_FALSE(runner.TakeRefusedDone().has_value());
  v1::Reject unavailable;
  unavailable.set_job_id("job-000007");
  unavailable.set_code(static_cast<int>(absl::StatusCode::kUnavailable));
  unavailable.set_message("sqlite: COMMIT: database or disk is full");
  runner.OnReject(unavailable);  // before any RankDone: nothing to send again
  runner.Start();
  runner.Join();
  ASSERT_TRUE(session_.sent().back().has_done());
  EXPECT_FALSE(runner.TakeRefusedDone().has_value()) << "not refused";

  runner.OnReject(unavailable);
  std::optional<v1::WorkerMessage> again = runner.TakeRefusedDone();
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(again->has_done());
  EXPECT_EQ(again->done().job_id(), "job-000007");
  EXPECT_FALSE(again->done().ok());
  EXPECT_FALSE(runner.TakeRefusedDone().has_value()) << "once per refusal";
  runner.OnReject(unavailable);
  EXPECT_TRUE(runner.TakeRefusedDone().has_value());
  v1::Reject finished = unavailable;
  finished.set_code(static_cast<int>(absl::StatusCode::kFailedPrecondition));
  finished.set_message("rank 1 of job job-000007 already finished (RankDone)");
  runner.OnReject(finished);
  EXPECT_FALSE(runner.TakeRefusedDone().has_value());
}

// A rank that failed while its worker had no session lost its log lines (the error among them):
// they wait with its RankDone and are resent first on the next session.
TEST_F(RankRunnerTest, LinesLoggedWithoutASessionAreResentBeforeTheRankDone) {
  auto forwarder = std::make_shared<LogForwarder>();
  spdlog::default_logger()->sinks().push_back(forwarder);
  v1::Assign assign = MakeAssign();
  assign.mutable_spec()->mutable_data()->set_dir("/etc");
  RankRunnerOptions o;
  o.worker_id = "worker-000002";
  o.data_roots = {"/srv/mat-data"};
  o.logs = forwarder.get();
  session_.SetConnected(false);
  {
    RankRunner runner(assign, o, [this](const v1::WorkerMessage& m) { return session_.Send(m); });
    runner.Start();
    runner.Join();
    EXPECT_TRUE(session_.sent().empty());
    session_.SetConnected(true);
    runner.OnReconnect();
  }
  spdlog::default_logger()->sinks().pop_back();
  const std::vector<v1::WorkerMessage> sent = session_.sent();
  ASSERT_GE(sent.size(), 2u);
  ASSERT_TRUE(sent.back().has_done());
  EXPECT_FALSE(sent.back().done().ok());
  std::string lines;
  for (size_t i = 0; i + 1 < sent.size(); ++i) {
    ASSERT_TRUE(sent[i].has_logs()) << i;
    EXPECT_EQ(sent[i].logs().rank(), 1);
    for (const v1::LogLine& l : sent[i].logs().lines()) lines += l.level() + " " + l.text() + "\n";
  }
  EXPECT_THAT(lines, HasSubstr("error job-000007 rank 1: failed: FAILED_PRECONDITION: data.dir"));
}

}  // namespace
}  // namespace mat::worker
