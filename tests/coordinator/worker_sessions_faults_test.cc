// Tests of the Coordinator's WorkerService side when things go wrong (fixture:
// worker_sessions_fixture.h): job failure paths (NaN λ, RankDone failure, cancellation), success
// with summary and checksums, restarts after lost and closed sessions (attempts, the policy
// continued from the store, the restart limit, a failed process group), and a coordinator
// restart on the same state dir that keeps running jobs.
#include "tests/coordinator/worker_sessions_fixture.h"

#include "tests/testing/raw_sql.h"

namespace mat::coordinator {
namespace {

using namespace testing_sessions;  // NOLINT: the fixture, its helpers and their using-declarations

// ----- failures -----

TEST_F(WorkerSessionsTest, NonFiniteLambdaFailsOnlyThatJobAndCancelsItsRanks) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  const Worker other = AddWorker();
  const std::string other_job = Submit(Spec(1));
  ASSERT_EQ(StateOf(other_job), v1::JOB_STATE_RUNNING);
  SendOk(ModuleList(other.id, other_job));

  SendOk(Spectra(w0.id, job, 0, 0, Lambda(0, 0)));
  std::vector<double> bad = Lambda(1, 0);
  bad[3] = std::numeric_limits<double>::quiet_NaN();
  absl::Status st = Send(Spectra(w1.id, job, 1, 0, bad));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  const std::string expected =
      "spectra for job-000001 step 0: rank 1: module 3 (layer0.head3): lambda is nan";
  EXPECT_EQ(st.message(), expected);
  const v1::Job failed = GetJob(job).job();
  EXPECT_EQ(failed.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(failed.error_message(), expected);
  for (const Worker* w : {&w0, &w1}) {
    auto cancels = w->channel->Cancels();
    ASSERT_EQ(cancels.size(), 1u) << w->id;
    EXPECT_EQ(cancels[0].job_id(), job);
    EXPECT_EQ(cancels[0].reason(), expected);
    // Busy until the worker says its rank stopped (a heartbeat without the job).
    EXPECT_EQ(WorkerInfoOf(w->id).state(), v1::WORKER_STATE_BUSY);
    SendOk(Heartbeat(w->id));
    EXPECT_EQ(WorkerInfoOf(w->id).state(), v1::WORKER_STATE_IDLE);
  }
  ASSERT_EQ(w1.channel->Rejects().size(), 1u);
  EXPECT_EQ(w1.channel->Rejects()[0].code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(w0.channel->Masks(), IsEmpty());

  // The other job is untouched and keeps deciding.
  EXPECT_EQ(StateOf(other_job), v1::JOB_STATE_RUNNING);
  EXPECT_THAT(other.channel->Cancels(), IsEmpty());
  std::vector<double> inf = Lambda(0, 0);
  SendOk(Spectra(other.id, other_job, 0, 0, Lambda(0, 0)));
  EXPECT_EQ(other.channel->Masks().size(), 1u);
  inf[9] = std::numeric_limits<double>::infinity();
  st = Send(Spectra(other.id, other_job, 0, 10, inf));
  EXPECT_THAT(st.message(), HasSubstr("module 9 (layer1.head4): lambda is inf"));
  EXPECT_EQ(StateOf(other_job), v1::JOB_STATE_FAILED);
}

// Runs `sql` on the coordinator's database under `state_dir`.
void RawSql(const std::string& state_dir, const std::string& sql) {
  tests::RunSql(JobStore::DatabasePath(state_dir), sql);
}

// A full state disk when a job fails: the job is stopped anyway, and its failure, which the
// store refused, was lost: the job read RUNNING for good and /readyz said ready. Now the end is
// kept, /readyz (UnstoredEnds) says why it is not ready, and once the store takes writes again
// the next heartbeat check stores it.
TEST_F(WorkerSessionsTest, AnEndTheStoreRefusesIsKeptAndStoredOnceTheStoreTakesIt) {
  Worker w = AddWorker();
  const std::string job = Submit(Spec(1));
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  SendOk(ModuleList(w.id, job));
  // The store refuses every job end, as a full disk would.
  RawSql(dir_ + "/state",
         "CREATE TRIGGER full_disk BEFORE UPDATE OF state ON jobs WHEN NEW.state IN "
         "('FAILED', 'SUCCEEDED') BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END");
  std::vector<double> bad = Lambda(0, 0);
  bad[3] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(Send(Spectra(w.id, job, 0, 0, bad)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);  // what the store still says
  ASSERT_EQ(w.channel->Cancels().size(), 1u);        // but the job is stopped
  SendOk(Heartbeat(w.id));                           // and its rank stopped
  EXPECT_EQ(WorkerInfoOf(w.id).state(), v1::WORKER_STATE_IDLE);
  absl::Status ready = coordinator_->UnstoredEnds();
  EXPECT_EQ(ready.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(ready.message()),
              HasSubstr("job job-000001 ended FAILED but the store refused it: "));
  EXPECT_THAT(std::string(ready.message()), HasSubstr("database or disk is full"));

  coordinator_->CheckHeartbeats();  // still refused: kept
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  EXPECT_FALSE(coordinator_->UnstoredEnds().ok());

  RawSql(dir_ + "/state", "DROP TRIGGER full_disk");
  coordinator_->CheckHeartbeats();
  const v1::Job stored = GetJob(job).job();
  EXPECT_EQ(stored.state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(stored.error_message(), HasSubstr("module 3 (layer0.head3): lambda is nan"));
  EXPECT_TRUE(coordinator_->UnstoredEnds().ok()) << coordinator_->UnstoredEnds();

  // An end kept for a job that then ends otherwise (a cancel once the store works) is dropped.
  const std::string second = Submit(Spec(1));
  ASSERT_EQ(StateOf(second), v1::JOB_STATE_RUNNING);
  SendOk(ModuleList(w.id, second));
  RawSql(dir_ + "/state",
         "CREATE TRIGGER full_disk BEFORE UPDATE OF state ON jobs WHEN NEW.state = 'FAILED' "
         "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END");
  EXPECT_FALSE(Send(Spectra(w.id, second, 0, 0, bad)).ok());
  EXPECT_FALSE(coordinator_->UnstoredEnds().ok());
  ASSERT_TRUE(coordinator_->CancelJob(second, "by hand").ok());
  SendOk(Heartbeat(w.id));
  RawSql(dir_ + "/state", "DROP TRIGGER full_disk");
  coordinator_->CheckHeartbeats();
  EXPECT_EQ(StateOf(second), v1::JOB_STATE_CANCELLED);
  EXPECT_TRUE(coordinator_->UnstoredEnds().ok());
}

// The store refuses a rank's RankDone (a full disk): it changes nothing, and the same RankDone
// sent again once the store takes writes (mat-worker does so at its next heartbeat) ends the job
// as it would have; a second copy of a RankDone already taken is refused.
TEST_F(WorkerSessionsTest, ARankDoneTheStoreRefusedIsTakenWhenSentAgain) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  RawSql(dir_ + "/state",
         "CREATE TRIGGER full_disk BEFORE UPDATE ON assignments "
         "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END");
  const v1::WorkerMessage done1 = Done(w1.id, job, 1, true, "abc");
  EXPECT_FALSE(Send(done1).ok());
  ASSERT_EQ(w1.channel->Rejects().size(), 1u);
  EXPECT_THAT(w1.channel->Rejects()[0].message(), HasSubstr("database or disk is full"));
  RawSql(dir_ + "/state", "DROP TRIGGER full_disk");
  SendOk(done1);
  const absl::Status twice = Send(done1);
  EXPECT_EQ(twice.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(twice.message(), HasSubstr("already finished"));
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING) << "a copy ended the job";
  SendOk(Done(w0.id, job, 0, true, "abc", R"({"steps":100})"));
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_SUCCEEDED);
}

TEST_F(WorkerSessionsTest, RankDoneOnEveryRankSucceedsWithSummaryAndChecksums) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  const std::string queued = Submit(Spec(2));
  std::vector<v1::JobEvent> events;
  Watch(job, &events);
  SendOk(Done(w1.id, job, 1, true, "cafe01"));
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING) << "succeeded before rank 0 finished";
  // Its worker stays with the job until the job ends (the job frees its workers together).
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(StateOf(queued), v1::JOB_STATE_QUEUED);
  // A finished rank sends nothing more for its job.
  EXPECT_EQ(Send(Done(w1.id, job, 1, true, "cafe01")).code(),
            absl::StatusCode::kFailedPrecondition);

  SendOk(Done(w0.id, job, 0, true, "cafe01", R"({"final_val_loss": 3.5})"));
  const v1::GetJobReply reply = GetJob(job);
  EXPECT_EQ(reply.job().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(reply.job().error_message(), "");
  EXPECT_EQ(reply.job().summary_json(), R"({"final_val_loss": 3.5})");
  ASSERT_EQ(reply.ranks_size(), 2);
  EXPECT_EQ(reply.ranks(0).param_checksum(), "cafe01");
  EXPECT_EQ(reply.ranks(1).param_checksum(), "cafe01");
  EXPECT_EQ(reply.ranks(1).step(), 100);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().state().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_THAT(w0.channel->Cancels(), IsEmpty());
  EXPECT_THAT(w1.channel->Cancels(), IsEmpty());
  // Both workers are free again: the queued job starts on them.
  EXPECT_EQ(StateOf(queued), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(w0.channel->Assigns().back().job_id(), queued);
}

TEST_F(WorkerSessionsTest, RankDoneWithAnErrorFailsTheJobAndCancelsTheOtherRanks) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  SendOk(Done(w1.id, job, 1, false, "", "", "CUDA out of memory"));
  const v1::Job failed = GetJob(job).job();
  EXPECT_EQ(failed.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(failed.error_message(), "rank 1 (worker-000002): CUDA out of memory");
  ASSERT_EQ(w0.channel->Cancels().size(), 1u);
  EXPECT_EQ(w0.channel->Cancels()[0].reason(), "rank 1 (worker-000002): CUDA out of memory");
  EXPECT_THAT(w1.channel->Cancels(), IsEmpty()) << "the failed rank stopped by itself";
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_IDLE);
  // The cancelled rank's worker is busy until the worker says the rank stopped: a heartbeat
  // still listing the job does not.
  const v1::WorkerInfo stopping = WorkerInfoOf(w0.id);
  EXPECT_EQ(stopping.state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(stopping.job_id(), job);
  EXPECT_EQ(stopping.rank(), 0);
  SendOk(Heartbeat(w0.id, {job}));
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_BUSY);
  SendOk(Heartbeat(w0.id));
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_IDLE);
}

TEST_F(WorkerSessionsTest, CancelJobCancelsEveryRankAndFreesTheWorkers) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  const std::string queued = Submit(Spec(1));
  auto reply = coordinator_->CancelJob(job, "user changed their mind");
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->state(), v1::JOB_STATE_CANCELLED);
  for (const Worker* w : {&w0, &w1}) {
    auto cancels = w->channel->Cancels();
    ASSERT_EQ(cancels.size(), 1u);
    EXPECT_EQ(cancels[0].job_id(), job);
    EXPECT_EQ(cancels[0].reason(), "user changed their mind");
  }
  EXPECT_EQ(StateOf(queued), v1::JOB_STATE_QUEUED) << "no worker said its rank stopped yet";
  SendOk(Heartbeat(w0.id));
  EXPECT_EQ(StateOf(queued), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(w0.channel->Assigns().back().job_id(), queued);
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_BUSY);
  SendOk(Heartbeat(w1.id));
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_IDLE);
}

TEST_F(WorkerSessionsTest, ASilentWorkerIsLostAndItsJobRestartsWhenItComesBack) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  now_ms_ += 2000;
  SendOk(Heartbeat(w0.id, {job}));
  now_ms_ += 1000;  // w1 silent for exactly 3 intervals: not yet lost
  coordinator_->CheckHeartbeats();
  EXPECT_FALSE(w1.channel->closed);
  now_ms_ += 1;
  coordinator_->CheckHeartbeats();
  ASSERT_TRUE(w1.channel->closed);
  EXPECT_EQ(w1.channel->close_status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(w1.channel->close_status.message(), "no heartbeat for 3001 ms");
  EXPECT_FALSE(w0.channel->closed);
  const v1::Job restarting = GetJob(job).job();
  EXPECT_EQ(restarting.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(restarting.error_message(), "worker-000002 (rank 1) lost: no heartbeat for 3001 ms");
  EXPECT_EQ(restarting.attempt(), 1);
  ASSERT_EQ(w0.channel->Cancels().size(), 1u) << "the survivor stops its rank";
  EXPECT_THAT(w1.channel->Cancels(), IsEmpty());
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_BUSY) << "stopping its rank";
  SendOk(Heartbeat(w0.id));
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_IDLE);
  EXPECT_THAT(w0.channel->Assigns(), ::testing::SizeIs(1)) << "one idle worker is not enough";
  // Its messages are refused now (no session); it comes back and rejoins the pool: the job
  // starts again on both, attempt 1, resuming.
  EXPECT_EQ(Send(Heartbeat(w1.id)).code(), absl::StatusCode::kNotFound);
  auto again = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w1.id), again).ok());
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  for (const auto& channel : {w0.channel, again}) {
    ASSERT_EQ(channel->Assigns().size(), channel == again ? 1u : 2u);
    const v1::Assign a = channel->Assigns().back();
    EXPECT_EQ(a.job_id(), job);
    EXPECT_EQ(a.attempt(), 1);
    EXPECT_TRUE(a.resume());
  }
  EXPECT_EQ(GetJob(job).job().attempt(), 1);
  EXPECT_EQ(GetJob(job).job().error_message(), "");
}

// A worker stopped with SIGTERM showed as "lost: session closed", like a crash: its Leaving
// names why, ends its session at once and closes its channel OK.
TEST_F(WorkerSessionsTest, ALeavingWorkersJobRestartsNamingWhyAndItsChannelClosesOk) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  v1::WorkerMessage leaving;
  leaving.set_worker_id(w1.id);
  leaving.mutable_leaving()->set_reason("SIGTERM");
  ASSERT_TRUE(Send(leaving).ok());
  ASSERT_TRUE(w1.channel->closed);
  EXPECT_TRUE(w1.channel->close_status.ok()) << w1.channel->close_status;
  EXPECT_FALSE(w0.channel->closed);
  const v1::Job restarting = GetJob(job).job();
  EXPECT_EQ(restarting.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(restarting.error_message(),
            "worker-000002 (rank 1) lost: the worker is shutting down (SIGTERM)");
  ASSERT_EQ(w0.channel->Cancels().size(), 1u) << "the survivor stops its rank";
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(Send(Heartbeat(w1.id)).code(), absl::StatusCode::kNotFound);
  // An idle worker leaving changes no job; an overlong reason is cut.
  v1::WorkerMessage idle;
  idle.set_worker_id(w0.id);
  idle.mutable_leaving()->set_reason(std::string(500, 'x'));
  ASSERT_TRUE(Send(idle).ok());
  EXPECT_TRUE(w0.channel->closed);
  EXPECT_EQ(coordinator_->OpenSessionCount(), 0);
  EXPECT_EQ(GetJob(job).job().error_message(), restarting.error_message());
}

// A rank's error line arrived after its job had moved to RESTARTING and was refused: `matctl
// logs` lacked the failed attempt's error. Lines of the rank's holder are kept whatever the
// job's state or attempt; another worker's are still refused.
TEST_F(WorkerSessionsTest, ARanksLastLinesAreKeptAfterItsJobMovedOn) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  coordinator_->CloseSession(w1.id);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RESTARTING);
  EXPECT_TRUE(
      Send(Logs(w0.id, job, 0, "rank 0: failed: gradient all-reduce failed", "error")).ok());
  EXPECT_EQ(Send(Logs(w0.id, job, 1, "not its rank")).code(), absl::StatusCode::kNotFound);
  v1::GetJobLogsRequest request;
  request.set_job_id(job);
  absl::StatusOr<v1::GetJobLogsReply> kept = coordinator_->GetJobLogs(request);
  ASSERT_TRUE(kept.ok()) << kept.status();
  ASSERT_EQ(kept->lines_size(), 1);
  EXPECT_EQ(kept->lines(0).rank(), 0);
  EXPECT_EQ(kept->lines(0).text(), "rank 0: failed: gradient all-reduce failed");
}

// The job's lines, with log_complete.
v1::GetJobLogsReply LogsOf(Coordinator& coordinator, const std::string& job) {
  v1::GetJobLogsRequest request;
  request.set_job_id(job);
  absl::StatusOr<v1::GetJobLogsReply> reply = coordinator.GetJobLogs(request);
  EXPECT_TRUE(reply.ok()) << reply.status();
  if (!reply.ok()) return v1::GetJobLogsReply();
  EXPECT_TRUE(reply->has_log_complete());
  return *reply;
}

// `matctl logs -f` stopped at a cancelled job's terminal state, before its ranks' last lines
// (sent after the Cancel): the log is complete once no worker runs or stops a rank of the job.
TEST_F(WorkerSessionsTest, ACancelledJobsLogIsCompleteOnceEveryRankStopped) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  EXPECT_FALSE(LogsOf(*coordinator_, job).log_complete()) << "running";
  ASSERT_TRUE(coordinator_->CancelJob(job, "user").ok());
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_CANCELLED);
  EXPECT_FALSE(LogsOf(*coordinator_, job).log_complete()) << "both ranks still stopping";
  SendOk(Logs(w0.id, job, 0, "rank 0: stopped"));
  SendOk(Heartbeat(w0.id));  // rank 0 stopped
  EXPECT_FALSE(LogsOf(*coordinator_, job).log_complete()) << "rank 1 still stopping";
  SendOk(Logs(w1.id, job, 1, "rank 1: stopped"));
  coordinator_->CloseSession(w1.id);  // its worker gone: nothing more can come from it
  const v1::GetJobLogsReply done = LogsOf(*coordinator_, job);
  EXPECT_TRUE(done.log_complete());
  ASSERT_EQ(done.lines_size(), 2);
  EXPECT_EQ(done.lines(1).text(), "rank 1: stopped");
}

// A rank that failed ended its own part; the rank cancelled for it has not yet.
TEST_F(WorkerSessionsTest, AFailedJobsLogWaitsForTheRanksCancelledForIt) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  SendOk(Logs(w1.id, job, 1, "rank 1: CUDA out of memory", "error"));
  SendOk(Done(w1.id, job, 1, false, "", "", "CUDA out of memory"));
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_FAILED);
  EXPECT_FALSE(LogsOf(*coordinator_, job).log_complete());
  SendOk(Heartbeat(w0.id, {job}));  // still stopping
  EXPECT_FALSE(LogsOf(*coordinator_, job).log_complete());
  SendOk(Heartbeat(w0.id));
  EXPECT_TRUE(LogsOf(*coordinator_, job).log_complete());
}

// After a coordinator restart the workers of a job cancelled before it reconnect and send their
// last lines: until they could have (10 heartbeat intervals, as a re-attaching rank gets), a
// rank that ended without its RankDone ok keeps the log open.
TEST_F(WorkerSessionsTest, AfterARestartAJobsLogWaitsForItsWorkersToComeBack) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  ASSERT_TRUE(coordinator_->CancelJob(job, "user").ok());
  now_ += 5;
  Open();  // the restart: no session survives it
  EXPECT_FALSE(LogsOf(*coordinator_, job).log_complete()) << "no worker back yet";
  auto back = Connect(w0.id);
  SendOk(Heartbeat(w0.id, {job}));  // its rank is still stopping: told to stop again
  ASSERT_EQ(back->Cancels().size(), 1u);
  SendOk(Logs(w0.id, job, 0, "rank 0: stopped"));
  SendOk(Heartbeat(w0.id));
  now_ms_ += 10 * 1000;
  EXPECT_FALSE(LogsOf(*coordinator_, job).log_complete()) << "rank 1's worker may come back";
  now_ms_ += 1;
  const v1::GetJobLogsReply done = LogsOf(*coordinator_, job);
  EXPECT_TRUE(done.log_complete());
  ASSERT_EQ(done.lines_size(), 1);
  EXPECT_EQ(done.lines(0).text(), "rank 0: stopped");
  // A job that ended after the restart is complete by its sessions alone.
  const std::string later = Submit(Spec(1));
  ASSERT_EQ(StateOf(later), v1::JOB_STATE_RUNNING);
  const std::string holder = GetJob(later).ranks(0).worker_id();
  now_ += 5;
  now_ms_ -= 10 * 1000;  // back within the window
  SendOk(Done(holder, later, 0, false, "", "", "out of memory"));
  EXPECT_TRUE(LogsOf(*coordinator_, later).log_complete());
}

// A rank sends its last lines and rank 0 its artifacts before its RankDone ok. Anything later
// from it was kept: lines that pushed the job's real ones out of the kept window, and files that
// replaced a finished job's model after its users may have read it.
TEST_F(WorkerSessionsTest, AFinishedRanksLogAndArtifactsAreFinal) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  SendOk(Logs(w0.id, job, 0, "rank 0: step 100"));
  EXPECT_TRUE(coordinator_->CheckArtifactUpload(w0.id, job, 0, 0).ok());
  SendOk(Done(w0.id, job, 0, true, "abc", R"({"steps":100})"));
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);  // rank 1 still runs
  absl::Status s = Send(Logs(w0.id, job, 0, "after its RankDone"));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("its log is complete"));
  EXPECT_EQ(coordinator_->CheckArtifactUpload(w0.id, job, 0, 0).code(),
            absl::StatusCode::kFailedPrecondition);
  SendOk(Logs(w1.id, job, 1, "rank 1: step 100"));  // a rank still running logs on
  SendOk(Done(w1.id, job, 1, true, "abc"));
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_SUCCEEDED);
  // Ended: the stored rows say the same (the runtime is gone).
  s = coordinator_->CheckArtifactUpload(w0.id, job, 0, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("its artifacts are final"));
  for (const auto& [worker, rank] : {std::pair{w0.id, 0}, std::pair{w1.id, 1}}) {
    s = Send(Logs(worker, job, rank, "after the end"));
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("its log is complete"));
  }
  v1::GetJobLogsRequest request;
  request.set_job_id(job);
  absl::StatusOr<v1::GetJobLogsReply> kept = coordinator_->GetJobLogs(request);
  ASSERT_TRUE(kept.ok()) << kept.status();
  ASSERT_EQ(kept->lines_size(), 2);
  EXPECT_EQ(kept->lines(0).text(), "rank 0: step 100");
  EXPECT_EQ(kept->lines(1).text(), "rank 1: step 100");
  EXPECT_TRUE(kept->log_complete()) << "every rank sent its RankDone ok";
  // A rank that did not finish (cancelled, or failed) still sends its last lines and files after
  // the end: RankZeroUploadsItsArtifactsWhileItsJobRestarts, ARanksLastLinesAreKeptAfterItsJobMovedOn.
}

// Data-parallel ranks end with bitwise identical parameters. Ranks that report different ones
// did not train the job asked for: the job used to SUCCEED with a warning in the log only.
TEST_F(WorkerSessionsTest, RanksWhoseFinalParametersDifferFailTheJob) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  SendOk(Done(w1.id, job, 1, true, "cafe02"));
  SendOk(Done(w0.id, job, 0, true, "cafe01", R"({"steps":100})"));
  const v1::GetJobReply reply = GetJob(job);
  EXPECT_EQ(reply.job().state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(reply.job().error_message(), HasSubstr("the ranks' final parameters differ"));
  EXPECT_THAT(reply.job().error_message(),
              HasSubstr(absl::StrCat("rank 0 (", w0.id, ") has checksum cafe01")));
  EXPECT_THAT(reply.job().error_message(), HasSubstr(absl::StrCat("rank 1 (", w1.id, ") cafe02")));
  EXPECT_EQ(reply.job().summary_json(), R"({"steps":100})");  // kept, to look at
  // Both ranks had finished: nobody to cancel, and both workers are free again.
  EXPECT_THAT(w0.channel->Cancels(), IsEmpty());
  EXPECT_THAT(w1.channel->Cancels(), IsEmpty());
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_IDLE);
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_IDLE);
}

TEST_F(WorkerSessionsTest, AClosedSessionRestartsItsJobWithoutClosingTheChannel) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  coordinator_->CloseSession(w0.id);
  coordinator_->CloseSession("worker-000404");  // unknown: no-op
  EXPECT_FALSE(w0.channel->closed);
  const v1::Job restarting = GetJob(job).job();
  EXPECT_EQ(restarting.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(restarting.error_message(), "worker-000001 (rank 0) lost: session closed");
  ASSERT_EQ(w1.channel->Cancels().size(), 1u);
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_DISCONNECTED);
  // An idle worker's session closing changes no job.
  coordinator_->CloseSession(w1.id);
  EXPECT_EQ(coordinator_->OpenSessionCount(), 0);
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RESTARTING);
  // A restarting job can be cancelled.
  ASSERT_TRUE(coordinator_->CancelJob(job, "").ok());
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_CANCELLED);
}

// Rank 0 uploads its artifacts when its part ends, also when a lost peer ended it: the job is then
// RESTARTING and already counts the next attempt, which no rank has started. That upload used to
// be refused as stale, so a job cancelled before its next attempt gave nothing back although rank
// 0 held the model of its newest checkpoint. Once the next attempt starts, the old one's uploads
// are stale again.
TEST_F(WorkerSessionsTest, RankZeroUploadsItsArtifactsWhileItsJobRestarts) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  EXPECT_TRUE(coordinator_->CheckArtifactUpload(w0.id, job, 0, 0).ok());  // RUNNING
  coordinator_->CloseSession(w1.id);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RESTARTING);
  ASSERT_EQ(GetJob(job).job().attempt(), 1);
  absl::Status s = coordinator_->CheckArtifactUpload(w0.id, job, 0, 0);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(coordinator_->CheckArtifactUpload(w0.id, job, 0, 1).code(), absl::StatusCode::kAborted)
      << "attempt 1 has not started";
  EXPECT_EQ(coordinator_->CheckArtifactUpload(w1.id, job, 0, 0).code(), absl::StatusCode::kNotFound)
      << "rank 1's worker holds no rank 0";
  ASSERT_TRUE(coordinator_->CancelJob(job, "").ok());
  s = coordinator_->CheckArtifactUpload(w0.id, job, 0, 0);
  EXPECT_TRUE(s.ok()) << s;
}

// A rank whose process group failed sends RankDone ok = false, retryable, then uploads. A
// checksum in that RankDone is not stored: a stored one marks a rank that finished, whose
// artifacts are final.
TEST_F(WorkerSessionsTest, AFailedRankDoneStoresNoChecksumAndItsUploadsFollow) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  const v1::WorkerMessage failed = CollectiveFailed(w0.id, job, 0, "abc");
  SendOk(failed);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(GetJob(job).ranks(0).param_checksum(), "");
  absl::Status s = coordinator_->CheckArtifactUpload(w0.id, job, 0, 0);
  EXPECT_TRUE(s.ok()) << s;
  SendOk(Logs(w0.id, job, 0, "rank 0: 6 artifacts uploaded"));
}

TEST_F(WorkerSessionsTest, OnceTheNextAttemptStartsTheOldOnesUploadsAreStale) {
  Worker v0, v1;
  const std::string again = StartTwoRankJob(&v0, &v1);
  coordinator_->CloseSession(v1.id);
  ASSERT_EQ(StateOf(again), v1::JOB_STATE_RESTARTING);
  SendOk(Heartbeat(v0.id));    // its rank of attempt 0 stopped
  auto back = Connect(v1.id);  // attempt 1 starts
  ASSERT_EQ(StateOf(again), v1::JOB_STATE_RUNNING);
  absl::Status s = coordinator_->CheckArtifactUpload(v0.id, again, 0, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("stale attempt 0"));
}

TEST_F(WorkerSessionsTest, ARestartedJobContinuesItsPolicyAndRefusesTheOldAttempt) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  // Probes 0, 10, 20 decided in attempt 0.
  for (int k = 0; k < 3; ++k) {
    SendProbe(w0, w1, job, k);
    SendOk(Ack(w0.id, job, 0, k + 1));
  }
  const std::vector<v1::MaskUpdate> before = w0.channel->Masks();
  ASSERT_EQ(before.size(), 3u);
  // Rank 1's worker is lost at step 25; it comes back.
  coordinator_->CloseSession(w1.id);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RESTARTING);
  SendOk(Heartbeat(w0.id));  // its rank of the failed attempt stopped
  auto c1 = Connect(w1.id);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(c1->Assigns().back().attempt(), 1);
  // A late message of attempt 0 is refused and changes nothing.
  absl::Status stale = Send(Spectra(w0.id, job, 0, 30, Lambda(0, 3)));
  EXPECT_EQ(stale.code(), absl::StatusCode::kAborted) << stale;
  EXPECT_THAT(std::string(stale.message()), HasSubstr("stale attempt 0"));
  EXPECT_EQ(Send(Done(w0.id, job, 0, false, "", "", "peer gone")).code(),
            absl::StatusCode::kAborted);
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);

  // The ranks resume from their checkpoint at step 10 (a probe step decided before): each gets
  // that decision's mask again, as it was.
  SendOk(Attempt(ModuleList(w0.id, job), 1));
  SendOk(Attempt(Spectra(w0.id, job, 0, 10, Lambda(0, 1)), 1));
  SendOk(Attempt(Spectra(w1.id, job, 1, 10, Lambda(1, 1)), 1));
  for (const auto& channel : {w0.channel, c1}) {
    ASSERT_FALSE(channel->Masks().empty());
    const v1::MaskUpdate resent = channel->Masks().back();
    EXPECT_TRUE(MessageDifferencer::Equals(resent, before[1])) << resent.DebugString();
  }
  SendOk(Attempt(Ack(w0.id, job, 0, before[1].mask_version()), 1));
  // Step 20 again and a new step 30: the same masks as a policy that never restarted.
  std::unique_ptr<policy::Policy> local = LocalPolicy(Spec(2));
  for (int k = 0; k < 4; ++k) {
    std::vector<double> mean(10);
    for (int i = 0; i < 10; ++i) mean[i] = (Lambda(0, k)[i] + Lambda(1, k)[i]) / 2;
    ASSERT_TRUE(local->Observe(10 * k, mean).ok());
    if (k < 2) continue;
    const size_t masks = c1->Masks().size();
    SendOk(Attempt(Spectra(w0.id, job, 0, 10 * k, Lambda(0, k)), 1));
    SendOk(Attempt(Spectra(w1.id, job, 1, 10 * k, Lambda(1, k)), 1));
    ASSERT_EQ(c1->Masks().size(), masks + 1) << "step " << 10 * k;
    const v1::MaskUpdate m = c1->Masks().back();
    EXPECT_EQ(m.effective_step(), 10 * k);
    EXPECT_EQ(Unpack(m.bits(), 10), local->Schedule().every_step) << "step " << 10 * k;
    EXPECT_GT(m.mask_version(), before.back().mask_version()) << "versions only grow";
    if (k == 2) {
      EXPECT_EQ(m.bits(), before[2].bits()) << "step 20 decided as in attempt 0";
    }
  }
  // The history holds each step once.
  v1::GetSpectraRequest request;
  request.set_job_id(job);
  auto spectra = coordinator_->GetSpectra(request);
  ASSERT_TRUE(spectra.ok()) << spectra.status();
  EXPECT_EQ(spectra->points_size(), 4);
}

TEST_F(WorkerSessionsTest, ALossAfterTheRestartLimitFailsTheJob) {
  max_restarts_ = 1;
  Open();
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  coordinator_->CloseSession(w1.id);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RESTARTING);
  SendOk(Heartbeat(w0.id));  // its rank of the failed attempt stopped
  auto c1 = Connect(w1.id);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  coordinator_->CloseSession(w1.id);
  const v1::Job failed = GetJob(job).job();
  EXPECT_EQ(failed.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(failed.error_message(),
            "worker-000002 (rank 1) lost: session closed (the job was restarted 1 times "
            "already, the limit)");
}

TEST_F(WorkerSessionsTest, ARankWhoseProcessGroupFailedRestartsTheJob) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  const v1::WorkerMessage done = CollectiveFailed(w0.id, job, 0);
  std::vector<v1::JobEvent> events;
  Watch(job, &events);
  events.clear();
  SendOk(done);
  EXPECT_THAT(w0.channel->Cancels(), IsEmpty()) << "the sender stopped already";
  ASSERT_EQ(w1.channel->Cancels().size(), 1u);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].state().state(), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(events[0].state().error_message(),
            "rank 0 (worker-000001): gradient all-reduce failed");
  // Rank 1 has not said it stopped (it may be stuck in the collective, or its worker gone):
  // the next attempt waits for it.
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(w1.channel->Assigns().size(), 1u);
  // Its own process-group failure says it stopped: the job restarts at once on both.
  const v1::WorkerMessage also = CollectiveFailed(w1.id, job, 1);
  EXPECT_EQ(Send(also).code(), absl::StatusCode::kAborted) << "attempt 0 is over";
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[1].state().state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(w1.channel->Assigns().back().attempt(), 1);
  // A failure that is not the process group's still fails it.
  SendOk(Attempt(Done(w1.id, job, 1, false, "", "", "out of memory"), 1));
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_FAILED);
}

// A worker killed with SIGKILL: its peer's all-reduce failure often arrives a few milliseconds
// before the killed worker's session ends. The restart was placed at once on both workers, the
// dead one included (it looked idle), and its session's end then cost a second attempt, blaming
// the survivor first. The killed worker's rank never says it stopped, so the restart now waits
// until its session ends, and then for a worker: one attempt per loss.
TEST_F(WorkerSessionsTest, ARestartIsNotPlacedOnAWorkerWhoseRankHasNotStopped) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  const v1::WorkerMessage done = CollectiveFailed(w0.id, job, 0);
  SendOk(done);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(w1.channel->Assigns().size(), 1u) << "attempt 1 was sent to the dead worker";
  coordinator_->CloseSession(w1.id);  // the kill is noticed
  v1::Job restarting = GetJob(job).job();
  EXPECT_EQ(restarting.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(restarting.attempt(), 1) << "one loss, one attempt";
  EXPECT_EQ(restarting.error_message(), "rank 0 (worker-000001): gradient all-reduce failed");
  // Another idle worker and the survivor take it.
  const Worker w2 = AddWorker();
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(GetJob(job).job().attempt(), 1);
  EXPECT_EQ(w0.channel->Assigns().back().attempt(), 1);
  EXPECT_EQ(w2.channel->Assigns().back().attempt(), 1);
  // A new job does not go to a worker whose cancelled rank is stuck either.
  ASSERT_TRUE(coordinator_->CancelJob(job, "by hand").ok());
  SendOk(Heartbeat(w2.id));
  SendOk(Heartbeat(w0.id, {job}));  // still stuck in its collective
  const std::string next = Submit(Spec(2));
  EXPECT_EQ(StateOf(next), v1::JOB_STATE_QUEUED);
  SendOk(Heartbeat(w0.id));  // its collective timed out and the rank stopped
  EXPECT_EQ(StateOf(next), v1::JOB_STATE_RUNNING);
}

// Killed together with the coordinator, a worker never came back; the survivor's all-reduce
// failed and the job restarted blaming only the survivor's rank 0. The message now names the
// peer the coordinator knows is gone.
TEST_F(WorkerSessionsTest, AFailedProcessGroupNamesThePeerThatIsNotConnected) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  Open();  // a new coordinator process; only worker 0 comes back
  EXPECT_EQ(Register("cpu", "host-1", 29501, w0.id), w0.id);
  auto c0 = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id, {job}), c0).ok());
  const v1::WorkerMessage done = CollectiveFailed(w0.id, job, 0);
  SendOk(done);
  const v1::Job restarting = GetJob(job).job();
  EXPECT_EQ(restarting.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(restarting.error_message(),
            "rank 0 (worker-000001): gradient all-reduce failed; not connected: rank 1 "
            "(worker-000002)");
}

TEST_F(WorkerSessionsTest, AHeartbeatListingAJobTheWorkerDoesNotRunGetsACancel) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  SendOk(Heartbeat(w0.id, {job}));
  EXPECT_THAT(w0.channel->Cancels(), IsEmpty());
  SendOk(Heartbeat(w0.id, {job, "job-000077", "job-000077"}));
  auto cancels = w0.channel->Cancels();
  ASSERT_EQ(cancels.size(), 1u);
  EXPECT_EQ(cancels[0].job_id(), "job-000077");
  // After the job ended, a rank still listing it is told again.
  ASSERT_TRUE(coordinator_->CancelJob(job, "").ok());
  SendOk(Heartbeat(w1.id, {job}));
  cancels = w1.channel->Cancels();
  ASSERT_EQ(cancels.size(), 2u);
  EXPECT_EQ(cancels[1].job_id(), job);
}

// ----- restart -----

TEST_F(WorkerSessionsTest, ACoordinatorRestartKeepsRunningJobsAndReattachesTheirWorkers) {
  Worker w0, w1;
  const std::string running = StartTwoRankJob(&w0, &w1);
  SendOk(Spectra(w0.id, running, 0, 0, Lambda(0, 0)));
  SendOk(Spectra(w1.id, running, 1, 0, Lambda(1, 0)));
  SendOk(Spectra(w0.id, running, 0, 10, Lambda(0, 1)));  // pending when the process dies
  const v1::MaskUpdate first = w0.channel->Masks().at(0);
  const std::string queued = Submit(Spec(1));
  now_ += 100;

  Open();  // a new process on the same state dir

  EXPECT_EQ(StateOf(running), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(GetJob(running).job().mask_version(), 1) << "the stored progress survives";
  EXPECT_EQ(StateOf(queued), v1::JOB_STATE_QUEUED);
  auto workers = coordinator_->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->workers_size(), 2);
  EXPECT_EQ(workers->workers(0).state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(workers->workers(0).capabilities().rendezvous_port(), 29501);

  // The workers reconnect with their ids; their first heartbeat names the job they still run.
  EXPECT_EQ(Register("cpu", "host-1", 29501, w0.id), w0.id);
  EXPECT_EQ(Register("cpu", "host-2", 29502, w1.id), w1.id);
  auto c0 = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id, {running}), c0).ok());
  EXPECT_THAT(c0->Cancels(), IsEmpty());
  EXPECT_THAT(c0->Assigns(), IsEmpty()) << "a re-attached worker is not idle";
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(WorkerInfoOf(w0.id).rank(), 0);
  // Rank 0 resends its ModuleList and its unanswered report of step 10; rank 1 is back too and
  // resends the report of step 0 it got no mask for: that decision's mask again.
  auto c1 = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w1.id, {running}), c1).ok());
  SendOk(ModuleList(w0.id, running));
  SendOk(Spectra(w0.id, running, 0, 10, Lambda(0, 1)));
  SendOk(Spectra(w1.id, running, 1, 0, Lambda(1, 0)));
  ASSERT_EQ(c1->Masks().size(), 1u);
  EXPECT_TRUE(MessageDifferencer::Equals(c1->Masks()[0], first));
  SendOk(Spectra(w1.id, running, 1, 10, Lambda(1, 1)));
  ASSERT_EQ(c0->Masks().size(), 1u);
  std::unique_ptr<policy::Policy> local = LocalPolicy(Spec(2));
  for (int k = 0; k < 2; ++k) {
    std::vector<double> mean(10);
    for (int i = 0; i < 10; ++i) mean[i] = (Lambda(0, k)[i] + Lambda(1, k)[i]) / 2;
    ASSERT_TRUE(local->Observe(10 * k, mean).ok());
  }
  EXPECT_EQ(c0->Masks()[0].effective_step(), 10);
  EXPECT_EQ(c0->Masks()[0].mask_version(), 2);
  EXPECT_EQ(Unpack(c0->Masks()[0].bits(), 10), local->Schedule().every_step);
  // Both ranks finish: the job succeeds with rank 0's summary.
  SendOk(Done(w0.id, running, 0, true, "abc", R"({"steps":100})"));
  SendOk(Done(w1.id, running, 1, true, "abc"));
  EXPECT_EQ(StateOf(running), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(GetJob(running).job().summary_json(), R"({"steps":100})");
  // The queued job takes a worker now.
  EXPECT_EQ(StateOf(queued), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Register("cpu", "x", 1), "worker-000003") << "new ids continue after the old ones";
}

// The job's FLOPs sum every rank's latest report; after a coordinator restart the ranks that have
// not reported again count with what the store kept of them, not 0.
TEST_F(WorkerSessionsTest, ACoordinatorRestartKeepsEachRanksFlopsInTheJobsTotal) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  SendOk(Progress(w1.id, job, 1, 20, 4.5, 5e12, 10.0));
  SendOk(Progress(w0.id, job, 0, 20, 4.5, 6e12, 10.0));
  ASSERT_EQ(GetJob(job).job().flops_total(), 11e12);

  Open();  // a new process on the same state dir
  EXPECT_EQ(Register("cpu", "host-1", 29501, w0.id), w0.id);
  EXPECT_EQ(Register("cpu", "host-2", 29502, w1.id), w1.id);
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id, {job}),
                                        std::make_shared<FakeWorkerChannel>()).ok());
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w1.id, {job}),
                                        std::make_shared<FakeWorkerChannel>()).ok());
  SendOk(Progress(w0.id, job, 0, 30, 4.0, 7e12, 15.0));  // rank 1 has not reported again
  EXPECT_EQ(GetJob(job).job().flops_total(), 7e12 + 5e12);
  SendOk(Progress(w1.id, job, 1, 30, 4.0, 6.5e12, 15.0));
  SendOk(Progress(w0.id, job, 0, 40, 3.5, 8e12, 20.0));
  EXPECT_EQ(GetJob(job).job().flops_total(), 8e12 + 6.5e12);
}

TEST_F(WorkerSessionsTest, AJobWhoseRanksAllFinishedBeforeTheRestartSucceeds) {
  Worker w0, w1;
  const std::string job = FinishBothRanksThenRestart(&w0, &w1, "abc");
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(GetJob(job).job().summary_json(), R"({"steps":100})");
}

// The same with ranks that ended apart: the restart compares their checksums too (it used to end
// every such job SUCCEEDED).
TEST_F(WorkerSessionsTest, AJobWhoseRanksFinishedApartBeforeTheRestartFails) {
  Worker w0, w1;
  const std::string job = FinishBothRanksThenRestart(&w0, &w1, "abd");
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_FAILED);
  EXPECT_THAT(GetJob(job).job().error_message(),
              HasSubstr("the ranks' final parameters differ: rank 0 (" + w0.id +
                        ") has checksum abc, rank 1 (" + w1.id + ") abd"));
}

TEST_F(WorkerSessionsTest, AKeptJobWhoseWorkerDoesNotReturnRestarts) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  SendOk(Done(w0.id, job, 0, true, "abc", R"({"steps":100})"));  // rank 0 finished
  Open();
  ASSERT_EQ(Register("cpu", "host-2", 29502, w1.id), w1.id);
  auto c1 = std::make_shared<FakeWorkerChannel>();
  // Its runner ended meanwhile: the heartbeat lists nothing, so rank 1 stays detached.
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w1.id), c1).ok());
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_IDLE);
  for (int i = 0; i < 10; ++i) {
    now_ms_ += 1000;
    SendOk(Heartbeat(w1.id));
    coordinator_->CheckHeartbeats();
  }
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING) << "10 intervals are not over yet";
  now_ms_ += 1;
  coordinator_->CheckHeartbeats();
  const v1::Job restarting = GetJob(job).job();
  EXPECT_EQ(restarting.error_message(),
            "worker-000002 (rank 1) lost: did not reconnect within 10000 ms of the "
            "coordinator's restart");
  EXPECT_EQ(restarting.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(restarting.summary_json(), R"({"steps":100})") << "rank 0's summary was kept";
}

// A restarted coordinator fails a RUNNING job it cannot continue; when the store refused that
// (a full disk), the job read RUNNING for good with no one to end it. Now the end is kept as any
// refused end is: /readyz (UnstoredEnds) says so, and the heartbeat check stores it once the store
// takes writes again.
TEST_F(WorkerSessionsTest, AnEndTheStoreRefusesAtARestartIsKeptAndStoredLater) {
  AddWorker();
  const std::string job = Submit(Spec(1));
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  coordinator_.reset();
  RawSql(dir_ + "/state", "DELETE FROM assignments WHERE job_id = '" + job + "'");
  RawSql(dir_ + "/state",
         "CREATE TRIGGER full_disk BEFORE UPDATE OF state ON jobs WHEN NEW.state = 'FAILED' "
         "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END");
  Open();
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);  // what the store still says
  absl::Status ready = coordinator_->UnstoredEnds();
  EXPECT_EQ(ready.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(ready.message()),
              HasSubstr("job " + job + " ended FAILED but the store refused it: "));

  RawSql(dir_ + "/state", "DROP TRIGGER full_disk");
  coordinator_->CheckHeartbeats();
  const v1::Job stored = GetJob(job).job();
  EXPECT_EQ(stored.state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(stored.error_message(),
              HasSubstr("cannot continue the job after a coordinator restart: the store has 0 "
                        "rank assignments for 1 ranks"));
  EXPECT_TRUE(coordinator_->UnstoredEnds().ok()) << coordinator_->UnstoredEnds();
}

// A store that cannot list the workers (or the live jobs) at a restart: the coordinator used to
// log it and serve without them, its RUNNING jobs kept by no one. Now it is not created, and the
// error says what could not be read.
TEST_F(WorkerSessionsTest, ACoordinatorWhoseStoreCannotListTheWorkersIsNotCreated) {
  AddWorker();
  coordinator_.reset();
  RawSql(dir_ + "/state",
         "ALTER TABLE workers RENAME TO workers_kept; "
         "CREATE VIEW workers AS SELECT no_such_column FROM workers_kept");
  auto store = JobStore::Open(dir_ + "/state");
  ASSERT_TRUE(store.ok()) << store.status();
  auto coordinator = Coordinator::Create(std::move(*store), Options());
  ASSERT_FALSE(coordinator.ok());
  EXPECT_THAT(std::string(coordinator.status().message()),
              HasSubstr("cannot read the workers from the state store: "));
}

}  // namespace
}  // namespace mat::coordinator
