// Tests of the worker and session manager (coordinator/session_manager.h) alone, on a real
// JobStore in a temporary directory, fake channels (tests/testing/fake_worker_channel.h) and a
// manual clock (tests/testing/manual_clock.h): registration and its refusals, worker secrets
// (stored hashed at the first Register, required for the id from then on), a session's life
// (open, touch, drop), which workers are idle or silent (exactly 3 intervals is not yet silent),
// the live worker list, the workers gauge, and last_seen written at most every 5 s.
#include <memory>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/artifacts.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_store.h"
#include "coordinator/session_manager.h"
#include "tests/testing/fake_worker_channel.h"
#include "tests/testing/log_capture.h"
#include "tests/testing/manual_clock.h"
#include "tests/testing/raw_sql.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/worker_secret.h"

namespace mat::coordinator {
namespace {

using ::testing::HasSubstr;
using tests::FakeWorkerChannel;

class SessionManagerTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_session_manager"};

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    auto store = JobStore::Open(tmp_.path() + "/state", time_.store_options());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    sessions_ = std::make_unique<SessionManager>(*store_, clock_, &metrics_, 1000);
    ASSERT_TRUE(sessions_->Load().ok());
  }

  v1::RegisterRequest Request(const std::string& device, const std::string& id = "") {
    v1::RegisterRequest r;
    r.set_worker_id(id);
    r.mutable_capabilities()->set_device(device);
    r.mutable_capabilities()->set_host("host-a");
    r.mutable_capabilities()->set_rendezvous_port(29500);
    return r;
  }
  std::string Register(const std::string& device, const std::string& id = "") {
    auto reply = sessions_->Register(Request(device, id), tests::TestWorkerSecret(++registered_));
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? reply->worker_id() : "";
  }
  std::shared_ptr<FakeWorkerChannel> Open(const std::string& id) {
    auto channel = std::make_shared<FakeWorkerChannel>();
    absl::Status st = sessions_->Open(id, channel);
    EXPECT_TRUE(st.ok()) << st;
    return channel;
  }
  double Gauge(const std::string& state) { return metrics_.workers.Value({state}); }

  tests::ManualClock time_;
  Clock clock_ = time_.clock();
  CoordinatorMetrics metrics_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<SessionManager> sessions_;
  uint64_t registered_ = 0;  // Register calls: the n of the latest one's TestWorkerSecret(n)
};

TEST_F(SessionManagerTest, RegisterNamesTheBadFieldAndKeepsAGivenId) {
  EXPECT_EQ(Register("cpu"), "worker-000001");
  EXPECT_EQ(Register("cuda:3", "my-gpu.box_1"), "my-gpu.box_1");
  ASSERT_NE(sessions_->Find("my-gpu.box_1"), nullptr);
  EXPECT_EQ(sessions_->Find("my-gpu.box_1")->device, "cuda:3");
  EXPECT_EQ(sessions_->Find("nobody"), nullptr);

  auto bad = sessions_->Register(Request("tpu"), tests::TestWorkerSecret(1));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("capabilities.device must be"));
  v1::RegisterRequest no_port = Request("cpu");
  no_port.mutable_capabilities()->set_rendezvous_port(70000);
  EXPECT_THAT(sessions_->Register(no_port, tests::TestWorkerSecret(1)).status().message(),
              HasSubstr("rendezvous_port must be in 1..65535, got 70000"));
  EXPECT_THAT(sessions_->Register(Request("cpu", "a/b"), tests::TestWorkerSecret(1)).status().message(),
              HasSubstr("worker_id 'a/b' must be"));
  EXPECT_EQ(sessions_->Register(Request("cpu"), tests::TestWorkerSecret(1)).value().heartbeat_interval_ms(), 1000);
}

TEST_F(SessionManagerTest, AWorkerSecretIsStoredHashedAtFirstRegisterAndRequiredFromThenOn) {
  const std::string secret = tests::TestWorkerSecret(41);
  const std::string other = tests::TestWorkerSecret(42);
  // Register refuses a call without a well-formed secret, storing nothing.
  for (const std::string& bad : {std::string(), std::string(64, 'A'), secret.substr(1)}) {
    absl::Status refused = sessions_->Register(Request("cpu"), bad).status();
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << "'" << bad << "'";
    EXPECT_THAT(refused.message(), HasSubstr("x-mat-worker-secret"));
  }
  EXPECT_TRUE(store_->ListWorkers()->empty());

  auto first = sessions_->Register(Request("cpu"), secret);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string id = first->worker_id();
  // The store keeps the SHA-256, never the secret.
  auto stored = store_->GetWorker(id);
  ASSERT_TRUE(stored.ok());
  api::Sha256 digest;
  digest.Add(secret);
  const std::string hash = digest.Hex();
  EXPECT_EQ(stored->secret_sha256, hash);

  EXPECT_TRUE(sessions_->Authenticate(id, secret).ok());
  absl::Status missing = sessions_->Authenticate(id, "");
  EXPECT_EQ(missing.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(missing.message(), HasSubstr("worker " + id + " has a worker secret and this call "
                                           "carries none"));
  absl::Status wrong = sessions_->Authenticate(id, other);
  EXPECT_EQ(wrong.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(wrong.message(), HasSubstr("is not worker " + id + "'s"));
  EXPECT_THAT(wrong.message(), HasSubstr("WORK_DIR/worker.secret"));
  EXPECT_EQ(sessions_->Authenticate("worker-000099", secret).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(sessions_->Authenticate("", secret).code(), absl::StatusCode::kInvalidArgument);

  // Registering the id again needs its secret; a refusal changes nothing. The same secret again
  // (a retry after a lost reply) is fine.
  v1::RegisterRequest again = Request("cuda:0", id);
  EXPECT_EQ(sessions_->Register(again, other).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(sessions_->Find(id)->device, "cpu") << "a refused Register changed the worker";
  EXPECT_EQ(store_->GetWorker(id)->secret_sha256, hash);
  ASSERT_TRUE(sessions_->Register(again, secret).ok());
  ASSERT_TRUE(sessions_->Register(again, secret).ok());
  EXPECT_EQ(sessions_->Find(id)->device, "cuda:0");

  // A restarted coordinator reads the hash back.
  SessionManager reloaded(*store_, clock_, nullptr, 1000);
  ASSERT_TRUE(reloaded.Load().ok());
  EXPECT_TRUE(reloaded.Authenticate(id, secret).ok());
  EXPECT_EQ(reloaded.Authenticate(id, other).code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(SessionManagerTest, AStoredSecretIsCheckedEvenWhenTheWorkersCouldNotBeLoaded) {
  const std::string id = Register("cpu");
  // A manager whose Load never ran (as after a store error at start) knows no worker: Register
  // still reads the stored row and refuses another secret instead of replacing the stored one.
  SessionManager unloaded(*store_, clock_, nullptr, 1000);
  EXPECT_EQ(unloaded.Register(Request("cpu", id), tests::TestWorkerSecret(99)).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(sessions_->Authenticate(id, tests::TestWorkerSecret(registered_)).ok());
}

TEST_F(SessionManagerTest, AnIdWithoutAStoredSecretTakesTheFirstRegistersSecret) {
  // A row from before schema v7 (or an id this store has never seen) has no secret: no call can
  // authenticate as it until a Register stores one.
  ASSERT_TRUE(store_->UpsertWorker({"old-worker", "h", "cpu", 1, 0, 0, 29500}).ok());
  SessionManager reloaded(*store_, clock_, nullptr, 1000);
  ASSERT_TRUE(reloaded.Load().ok());
  absl::Status before = reloaded.Authenticate("old-worker", tests::TestWorkerSecret(7));
  EXPECT_EQ(before.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(before.message(), HasSubstr("has no worker secret yet"));
  ASSERT_TRUE(reloaded.Register(Request("cpu", "old-worker"), tests::TestWorkerSecret(7)).ok());
  EXPECT_TRUE(reloaded.Authenticate("old-worker", tests::TestWorkerSecret(7)).ok());
  EXPECT_EQ(reloaded.Register(Request("cpu", "old-worker"), tests::TestWorkerSecret(8))
                .status()
                .code(),
            absl::StatusCode::kPermissionDenied);
  ASSERT_TRUE(reloaded.Register(Request("cpu", "never-seen"), tests::TestWorkerSecret(9)).ok());
  EXPECT_TRUE(reloaded.Authenticate("never-seen", tests::TestWorkerSecret(9)).ok());
}

TEST_F(SessionManagerTest, ASessionOpensOnceAndDropReturnsItsChannelAndRank) {
  const std::string w = Register("cpu");
  EXPECT_EQ(sessions_->Open("", std::make_shared<FakeWorkerChannel>()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sessions_->Open("worker-000099", std::make_shared<FakeWorkerChannel>()).code(),
            absl::StatusCode::kNotFound);
  auto channel = Open(w);
  EXPECT_EQ(sessions_->Open(w, std::make_shared<FakeWorkerChannel>()).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(sessions_->OpenCount(), 1);
  EXPECT_EQ(Gauge("idle"), 1);

  EXPECT_FALSE(sessions_->Holds("job-000001"));
  sessions_->SetJob(w, "job-000001", 2);
  EXPECT_TRUE(sessions_->Runs(w, "job-000001", 2));
  EXPECT_FALSE(sessions_->Runs(w, "job-000001", 1));
  EXPECT_EQ(sessions_->JobOf(w), "job-000001");
  EXPECT_TRUE(sessions_->Holds("job-000001"));
  EXPECT_FALSE(sessions_->Holds("job-000002"));
  EXPECT_FALSE(sessions_->Holds(""));
  sessions_->SetJob(w, "", -1);  // the job ended: its rank is cancelled, not yet stopped
  sessions_->SetStopping(w, "job-000001", 2);
  EXPECT_TRUE(sessions_->Holds("job-000001"));
  EXPECT_TRUE(sessions_->ClearStopping(w, "job-000001"));
  EXPECT_FALSE(sessions_->Holds("job-000001"));
  sessions_->SetJob(w, "job-000001", 2);
  EXPECT_EQ(Gauge("busy"), 1);
  EXPECT_TRUE(sessions_->Idle().empty());

  v1::CoordinatorMessage m;
  m.mutable_mask()->set_mask_version(7);
  sessions_->Send(w, m);
  sessions_->SendCancel(w, "job-000001", "stop");
  ASSERT_EQ(channel->Masks().size(), 1u);
  ASSERT_EQ(channel->Cancels().size(), 1u);
  EXPECT_EQ(channel->Cancels()[0].reason(), "stop");

  auto dropped = sessions_->Drop(w);
  ASSERT_TRUE(dropped.has_value());
  EXPECT_EQ(dropped->channel, channel);
  EXPECT_EQ(dropped->job_id, "job-000001");
  EXPECT_EQ(dropped->rank, 2);
  EXPECT_FALSE(sessions_->HasSession(w));
  EXPECT_FALSE(sessions_->Drop(w).has_value());
  EXPECT_FALSE(sessions_->Touch(w));
  sessions_->Send(w, m);  // no session: nothing, no crash
  EXPECT_EQ(channel->sent.size(), 2u);
  EXPECT_EQ(Gauge("disconnected"), 1);
}

TEST_F(SessionManagerTest, SilentAfterMoreThanThreeIntervalsAndIdleInIdOrder) {
  const std::string a = Register("cpu");
  const std::string b = Register("cuda:0");
  const std::string c = Register("cpu");
  Open(c);
  Open(a);
  Open(b);
  auto idle = sessions_->Idle();
  ASSERT_EQ(idle.size(), 3u);
  EXPECT_EQ(idle[0].id, a);
  EXPECT_EQ(idle[1].id, b);
  EXPECT_EQ(idle[1].device, "cuda:0");
  EXPECT_EQ(idle[2].id, c);

  time_.ms += 2000;
  EXPECT_TRUE(sessions_->Touch(b));
  time_.ms += 1000;  // a and c silent for exactly 3 intervals: not yet
  EXPECT_TRUE(sessions_->Silent().empty());
  time_.ms += 1;
  auto silent = sessions_->Silent();
  ASSERT_EQ(silent.size(), 2u);
  EXPECT_EQ(silent[0], std::make_pair(a, int64_t{3001}));
  EXPECT_EQ(silent[1], std::make_pair(c, int64_t{3001}));

  sessions_->RefreshHeartbeatAges();
  EXPECT_EQ(metrics_.worker_heartbeat_age_seconds.Value({b}), 1.001);
  EXPECT_EQ(metrics_.worker_heartbeat_age_seconds.Value({a}), 3.001);
  sessions_->Drop(b);
  EXPECT_FALSE(metrics_.worker_heartbeat_age_seconds.Exists({b}))
      << "a dropped session's series is removed";
}

TEST_F(SessionManagerTest, ListIsLiveAndLastSeenIsStoredAtMostEveryFiveSeconds) {
  const std::string w = Register("cpu");
  const std::string gone = Register("cpu");
  Open(w);
  auto stored_last_seen = [&] { return store_->GetWorker(w)->last_seen_unix_seconds; };
  const int64_t opened = stored_last_seen();
  time_.unix_seconds += 3;
  time_.ms += 3000;
  sessions_->Touch(w);
  EXPECT_EQ(stored_last_seen(), opened) << "3 s after the last write: not written again";
  auto list = sessions_->List();
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->workers_size(), 2);
  EXPECT_EQ(list->workers(0).state(), v1::WORKER_STATE_IDLE);
  EXPECT_EQ(list->workers(0).last_seen_unix_seconds(), opened + 3) << "live, not the stored copy";
  EXPECT_EQ(list->workers(1).worker_id(), gone);
  EXPECT_EQ(list->workers(1).state(), v1::WORKER_STATE_DISCONNECTED);
  time_.unix_seconds += 2;
  time_.ms += 2000;
  sessions_->Touch(w);
  EXPECT_EQ(stored_last_seen(), opened + 5);
  sessions_->SetJob(w, "job-000004", 0);
  list = sessions_->List();
  EXPECT_EQ(list->workers(0).state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(list->workers(0).job_id(), "job-000004");
}

// A full state disk refuses every last_seen write, one per worker per heartbeat: the log said so
// every second for every worker. Now the first failure is logged, and the recovery.
TEST_F(SessionManagerTest, LastSeenThatCannotBeStoredIsLoggedOnceAndItsRecoveryOnce) {
  const std::string a = Register("cpu");
  const std::string b = Register("cpu");
  Open(a);
  Open(b);
  auto sql = [this](const char* text) {
    tests::RunSql(JobStore::DatabasePath(tmp_.path() + "/state"), text);
  };
  tests::LogCapture capture;
  sql("CREATE TRIGGER full_disk BEFORE UPDATE ON workers "
      "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END");
  for (int i = 0; i < 5; ++i) {
    sessions_->SetJob(a, i % 2 ? "job-000001" : "", 0);  // each one writes last_seen
    sessions_->SetJob(b, i % 2 ? "job-000002" : "", 0);
  }
  sql("DROP TRIGGER full_disk");
  sessions_->SetJob(b, "", 0);
  sessions_->SetJob(a, "", 0);
  const std::string log = capture.Take();
  size_t failures = 0;
  for (size_t at = log.find("cannot store last_seen"); at != std::string::npos;
       at = log.find("cannot store last_seen", at + 1)) {
    ++failures;
  }
  EXPECT_EQ(failures, 1u) << log;
  EXPECT_THAT(log, HasSubstr("worker " + a + ": cannot store last_seen: "));
  EXPECT_THAT(log, HasSubstr("database or disk is full"));
  EXPECT_THAT(log, HasSubstr("worker " + b + ": last_seen is stored again"));
  EXPECT_EQ(log.find("stored again"), log.rfind("stored again")) << log;
}

TEST_F(SessionManagerTest, LoadKnowsTheStoredWorkersAfterARestart) {
  const std::string w = Register("cuda:1");
  SessionManager again(*store_, clock_, nullptr, 1000);
  EXPECT_EQ(again.Find(w), nullptr);
  ASSERT_TRUE(again.Load().ok());
  ASSERT_NE(again.Find(w), nullptr);
  EXPECT_EQ(again.Find(w)->device, "cuda:1");
  auto channel = std::make_shared<FakeWorkerChannel>();
  EXPECT_TRUE(again.Open(w, channel).ok());
}

}  // namespace
}  // namespace mat::coordinator
