// Tests of the Coordinator's WorkerService side (coordinator/coordinator.h, worker_sessions*.cc)
// with a real JobStore in a temporary directory, fake worker channels and an injected clock, no
// network (fixture: worker_sessions_fixture.h): registration, sessions, gang scheduling (FIFO,
// backfilling, device kinds), the λ aggregation and the masks (checked against a local Policy
// fed the same means), mask acks, every refused message with its code and its Reject, rank 0's
// progress, the metrics, and a rand job replaying a MAT job's active counts. Failures and
// restarts: worker_sessions_faults_test.cc.
#include "tests/coordinator/worker_sessions_fixture.h"

#include <sstream>

namespace mat::coordinator {
namespace {

using namespace testing_sessions;  // NOLINT: the fixture, its helpers and their using-declarations

// ----- registration and sessions -----

TEST_F(WorkerSessionsTest, RegisterAssignsIdsInOrderAndKeepsAGivenOne) {
  EXPECT_EQ(Register("cpu", "a", 1), "worker-000001");
  EXPECT_EQ(Register("cuda:0", "b", 2), "worker-000002");
  EXPECT_EQ(Register("cpu", "c", 3, "worker-000007"), "worker-000007");  // resuming
  EXPECT_EQ(Register("cpu", "d", 4), "worker-000008");
  // Re-registering updates the capabilities and keeps the id.
  EXPECT_EQ(Register("cpu", "a2", 11, "worker-000001"), "worker-000001");
  // A worker that named itself with the largest number made the next id overflow into one
  // every later worker shared: such numbers are not counted, and a taken id is never reissued.
  EXPECT_EQ(Register("cpu", "e", 5, "worker-9223372036854775807"), "worker-9223372036854775807");
  EXPECT_EQ(Register("cpu", "f", 6, "worker-000009"), "worker-000009");
  EXPECT_EQ(Register("cpu", "g", 7), "worker-000010");
  EXPECT_EQ(Register("cpu", "h", 8), "worker-000011");

  v1::RegisterRequest request;
  request.mutable_capabilities()->set_device("cpu");
  request.mutable_capabilities()->set_host("h");
  request.mutable_capabilities()->set_rendezvous_port(1);
  auto reply = coordinator_->RegisterWorker(request, tests::TestWorkerSecret(1000));
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->heartbeat_interval_ms(), 1000);

  auto workers = coordinator_->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->workers_size(), 9);
  const v1::WorkerInfo& first = workers->workers(0);
  EXPECT_EQ(first.worker_id(), "worker-000001");
  EXPECT_EQ(first.capabilities().host(), "a2");
  EXPECT_EQ(first.capabilities().rendezvous_port(), 11);
  EXPECT_EQ(first.state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(first.registered_unix_seconds(), now_);
  EXPECT_EQ(workers->workers(1).capabilities().device(), "cuda:0");
}

TEST_F(WorkerSessionsTest, RegisterRejectsBadCapabilitiesNamingTheField) {
  struct Case {
    std::function<void(v1::RegisterRequest*)> change;
    std::string field;
  };
  const std::vector<Case> cases = {
      {[](v1::RegisterRequest* r) { r->mutable_capabilities()->set_device(""); },
       "capabilities.device"},
      {[](v1::RegisterRequest* r) { r->mutable_capabilities()->set_device("gpu"); },
       "capabilities.device"},
      {[](v1::RegisterRequest* r) { r->mutable_capabilities()->set_device("cuda:"); },
       "capabilities.device"},
      {[](v1::RegisterRequest* r) { r->mutable_capabilities()->set_device("cuda"); },
       "capabilities.device"},
      {[](v1::RegisterRequest* r) { r->mutable_capabilities()->set_host(""); },
       "capabilities.host"},
      {[](v1::RegisterRequest* r) { r->mutable_capabilities()->set_rendezvous_port(0); },
       "capabilities.rendezvous_port"},
      {[](v1::RegisterRequest* r) { r->mutable_capabilities()->set_rendezvous_port(65536); },
       "capabilities.rendezvous_port"},
      {[](v1::RegisterRequest* r) { r->mutable_capabilities()->set_memory_bytes(-1); },
       "capabilities.memory_bytes"},
      {[](v1::RegisterRequest* r) { r->set_worker_id("bad id"); }, "worker_id"},
  };
  for (const Case& c : cases) {
    v1::RegisterRequest request;
    request.mutable_capabilities()->set_device("cuda:1");
    request.mutable_capabilities()->set_host("h");
    request.mutable_capabilities()->set_rendezvous_port(29500);
    c.change(&request);
    auto reply = coordinator_->RegisterWorker(request, tests::TestWorkerSecret(1000));
    ASSERT_FALSE(reply.ok()) << c.field;
    EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument) << reply.status();
    EXPECT_THAT(reply.status().message(), HasSubstr(c.field));
  }
  auto workers = coordinator_->ListWorkers();
  ASSERT_TRUE(workers.ok());
  EXPECT_EQ(workers->workers_size(), 0) << "a refused registration stored a worker";
}

TEST_F(WorkerSessionsTest, OpenSessionNeedsARegisteredWorkerAndOneSessionAtATime) {
  auto channel = std::make_shared<FakeWorkerChannel>();
  EXPECT_EQ(coordinator_->OpenSession(Heartbeat("worker-000009"), channel).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(coordinator_->OpenSession(Heartbeat(""), channel).code(),
            absl::StatusCode::kInvalidArgument);
  const Worker w = AddWorker();
  EXPECT_EQ(coordinator_->OpenSession(Heartbeat(w.id), channel).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(coordinator_->OpenSessionCount(), 1);
  EXPECT_EQ(WorkerInfoOf(w.id).state(), v1::WORKER_STATE_IDLE);
  // Messages of a worker without a session: NOT_FOUND, and no channel to send a Reject on.
  EXPECT_EQ(Send(Heartbeat("worker-000009")).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(channel->sent.empty());
}

TEST_F(WorkerSessionsTest, LastSeenIsLiveButStoredOnlyEveryFewSeconds) {
  const Worker w = AddWorker();
  auto stored_last_seen = [&] {
    auto workers = coordinator_->store().ListWorkers();
    EXPECT_TRUE(workers.ok()) << workers.status();
    return workers->at(0).last_seen_unix_seconds;
  };
  const int64_t opened = now_;
  EXPECT_EQ(stored_last_seen(), opened);
  now_ += 3;
  now_ms_ += 3000;
  SendOk(Heartbeat(w.id));
  EXPECT_EQ(stored_last_seen(), opened) << "stored on every message";
  EXPECT_EQ(WorkerInfoOf(w.id).last_seen_unix_seconds(), now_) << "ListWorkers is live";
  now_ += 2;
  now_ms_ += Coordinator::kLastSeenPersistMs - 3000;
  SendOk(Heartbeat(w.id));
  EXPECT_EQ(stored_last_seen(), now_);
}

// ----- scheduling -----

TEST_F(WorkerSessionsTest, GangAllocationWaitsForAllRanksThenAssignsThemTogether) {
  const Worker w0 = AddWorker();
  const std::string job = Submit(Spec(2));
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_QUEUED) << "started with one of two workers";
  EXPECT_THAT(w0.channel->Assigns(), IsEmpty());
  EXPECT_THAT(GetJob(job).ranks(), IsEmpty());

  const Worker w1 = AddWorker();  // host-2:29502
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  const v1::JobSpec stored = GetJob(job).job().spec();
  for (int r = 0; r < 2; ++r) {
    const Worker& w = r == 0 ? w0 : w1;
    auto assigns = w.channel->Assigns();
    ASSERT_EQ(assigns.size(), 1u) << "rank " << r;
    EXPECT_EQ(assigns[0].job_id(), job);
    EXPECT_EQ(assigns[0].rank(), r);
    EXPECT_EQ(assigns[0].world_size(), 2);
    EXPECT_EQ(assigns[0].rendezvous_address(), "host-1:29501");  // rank 0's host and port
    EXPECT_EQ(assigns[0].attempt(), 0);
    EXPECT_FALSE(assigns[0].resume());
    EXPECT_TRUE(MessageDifferencer::Equals(assigns[0].spec(), stored));
    EXPECT_TRUE(assigns[0].spec().policy().has_alpha()) << "defaults are filled in";
  }
  const v1::GetJobReply reply = GetJob(job);
  ASSERT_EQ(reply.ranks_size(), 2);
  EXPECT_EQ(reply.ranks(0).worker_id(), w0.id);
  EXPECT_EQ(reply.ranks(1).worker_id(), w1.id);
  EXPECT_EQ(reply.ranks(1).rank(), 1);
  EXPECT_EQ(reply.job().attempt(), 0);
  const v1::WorkerInfo busy = WorkerInfoOf(w1.id);
  EXPECT_EQ(busy.state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(busy.job_id(), job);
  EXPECT_EQ(busy.rank(), 1);
}

TEST_F(WorkerSessionsTest, QueuedJobsStartInSubmissionOrderWithoutHeadOfLineBlocking) {
  const Worker w0 = AddWorker();
  const std::string big = Submit(Spec(2));    // needs two workers
  const std::string small = Submit(Spec(1));  // fits now: may pass the big one
  const std::string next = Submit(Spec(1));
  EXPECT_EQ(StateOf(big), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(StateOf(small), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(StateOf(next), v1::JOB_STATE_QUEUED);
  ASSERT_EQ(w0.channel->Assigns().size(), 1u);
  EXPECT_EQ(w0.channel->Assigns()[0].job_id(), small);

  // The small job ends: its one worker still cannot take the big job, so the next small one
  // gets it; with two more workers the big one starts.
  SendOk(ModuleList(w0.id, small));
  SendOk(Done(w0.id, small, 0, true, "abc"));
  EXPECT_EQ(StateOf(small), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(StateOf(next), v1::JOB_STATE_RUNNING) << "the one idle worker took the next fit";
  const Worker w1 = AddWorker();
  const Worker w2 = AddWorker();
  EXPECT_EQ(StateOf(big), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(w1.channel->Assigns()[0].job_id(), big);
  EXPECT_EQ(w2.channel->Assigns()[0].rank(), 1);
}

TEST_F(WorkerSessionsTest, JobsRunOnlyOnWorkersOfTheirDeviceKind) {
  const Worker cpu = AddWorker("cpu");
  const std::string gpu_job = Submit(Spec(1, "cuda"));
  EXPECT_EQ(StateOf(gpu_job), v1::JOB_STATE_QUEUED) << "a cuda job took a cpu worker";
  const Worker gpu = AddWorker("cuda:3");
  EXPECT_EQ(StateOf(gpu_job), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(gpu.channel->Assigns().size(), 1u);
  EXPECT_THAT(cpu.channel->Assigns(), IsEmpty());

  const Worker gpu2 = AddWorker("cuda:0");
  const std::string cpu_job = Submit(Spec(1, "cpu"));
  EXPECT_THAT(gpu2.channel->Assigns(), IsEmpty()) << "a cpu job took a cuda worker";
  ASSERT_EQ(cpu.channel->Assigns().size(), 1u);
  EXPECT_EQ(cpu.channel->Assigns()[0].job_id(), cpu_job);
}

// A finished rank's worker stays with its job until the job ends, so the job's workers are
// freed together and the oldest queued job that needs them all gets them. Freed one by one, the
// first went to a newer 1-rank job and the older 2-rank job was overtaken.
TEST_F(WorkerSessionsTest, AJobFreesItsWorkersTogetherForTheOldestQueuedJob) {
  Worker w0, w1;
  const std::string first = StartTwoRankJob(&w0, &w1);
  const std::string older = Submit(Spec(2));
  const std::string newer = Submit(Spec(1));
  SendOk(Done(w1.id, first, 1, true, "abc"));
  EXPECT_EQ(StateOf(newer), v1::JOB_STATE_QUEUED) << "took the worker of a finished rank";
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(WorkerInfoOf(w1.id).job_id(), first);
  SendOk(Done(w0.id, first, 0, true, "abc", R"({"steps":100})"));
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(StateOf(older), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(StateOf(newer), v1::JOB_STATE_QUEUED);
  EXPECT_THAT(w0.channel->Cancels(), IsEmpty());
  EXPECT_THAT(w1.channel->Cancels(), IsEmpty());
}

// The worker of a finished rank going away takes nothing with it: the job does not restart.
TEST_F(WorkerSessionsTest, TheWorkerOfAFinishedRankLeavingDoesNotRestartTheJob) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  SendOk(Done(w1.id, job, 1, true, "abc"));
  coordinator_->CloseSession(w1.id);
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  EXPECT_THAT(w0.channel->Cancels(), IsEmpty());
  SendOk(Done(w0.id, job, 0, true, "abc", R"({"steps":100})"));
  const v1::Job done = GetJob(job).job();
  EXPECT_EQ(done.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(done.attempt(), 0);
}

// ... and when that worker comes back (its session ended, or the coordinator restarted), it is
// still with its job: it reconnected idle, and the next pass gave it to a newer job before the
// job's end freed the gang.
TEST_F(WorkerSessionsTest, TheWorkerOfAFinishedRankComingBackWaitsForItsJobsEnd) {
  Worker w0, w1;
  const std::string first = StartTwoRankJob(&w0, &w1);
  SendOk(Done(w1.id, first, 1, true, "abc"));
  coordinator_->CloseSession(w1.id);
  const std::string newer = Submit(Spec(1));
  auto channel = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w1.id), channel).ok());
  EXPECT_EQ(StateOf(newer), v1::JOB_STATE_QUEUED) << "took the worker of a finished rank";
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(WorkerInfoOf(w1.id).job_id(), first);
  EXPECT_THAT(channel->Assigns(), IsEmpty());

  Open();  // a new coordinator process on the same state dir keeps the job
  ASSERT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
  auto c0 = std::make_shared<FakeWorkerChannel>();
  auto c1 = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w1.id), c1).ok());
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id, {first}), c0).ok());
  EXPECT_EQ(StateOf(newer), v1::JOB_STATE_QUEUED) << "took the worker of a finished rank";
  EXPECT_EQ(WorkerInfoOf(w1.id).job_id(), first);
  EXPECT_THAT(c1.get()->Assigns(), IsEmpty());
  SendOk(Done(w0.id, first, 0, true, "abc", R"({"steps":100})"));
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(StateOf(newer), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(c0->Assigns().size() + c1->Assigns().size(), 1u);
  EXPECT_THAT(c0->Cancels(), IsEmpty());
  EXPECT_THAT(c1->Cancels(), IsEmpty());
}

// ----- λ, decisions and masks -----

TEST_F(WorkerSessionsTest, RankAveragedLambdaIsStoredAndModulesAreListed) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  const std::vector<double> a = Lambda(0, 0), b = Lambda(1, 0);
  SendOk(Spectra(w1.id, job, 1, 0, b));
  EXPECT_THAT(w0.channel->Masks(), IsEmpty()) << "decided before every rank reported";
  SendOk(Spectra(w0.id, job, 0, 0, a));

  v1::GetSpectraRequest request;
  request.set_job_id(job);
  auto spectra = coordinator_->GetSpectra(request);
  ASSERT_TRUE(spectra.ok()) << spectra.status();
  ASSERT_EQ(spectra->points_size(), 1);
  EXPECT_EQ(spectra->points(0).step(), 0);
  ASSERT_EQ(spectra->points(0).lambda_max_size(), 10);
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(spectra->points(0).lambda_max(i), (a[i] + b[i]) / 2) << "module " << i;  // exact
  }
  ASSERT_EQ(spectra->modules_size(), 10);
  EXPECT_EQ(spectra->modules(6).name(), "layer1.head1");
  EXPECT_EQ(spectra->modules(6).group(), "heads");
  EXPECT_EQ(spectra->modules(6).layer(), 1);
  EXPECT_EQ(spectra->modules(6).index(), 1);
  EXPECT_EQ(GetJob(job).job().total_modules(), 10);
}

TEST_F(WorkerSessionsTest, MasksFollowALocalPolicyFedTheSameMeans) {
  Worker w0, w1;
  const v1::JobSpec spec = Spec(2);
  const std::string job = StartTwoRankJob(&w0, &w1, spec);
  std::vector<v1::JobEvent> events;
  Watch(job, &events);
  std::unique_ptr<policy::Policy> local = LocalPolicy(spec);
  ASSERT_NE(coordinator_->JobPolicy(job), nullptr);
  EXPECT_EQ(coordinator_->JobPolicy(job)->config().interval_steps, 10);

  bool saw_off = false;
  for (int k = 0; k < 6; ++k) {
    const int64_t step = 10 * k;
    const std::vector<double> a = Lambda(0, k), b = Lambda(1, k);
    SendOk(Spectra(w0.id, job, 0, step, a));
    SendOk(Spectra(w1.id, job, 1, step, b));
    std::vector<double> mean(10);
    for (int i = 0; i < 10; ++i) mean[i] = (a[i] + b[i]) / 2;
    auto decision = local->Observe(step, mean);
    ASSERT_TRUE(decision.ok()) << decision.status();
    const policy::MaskSchedule schedule = local->Schedule();

    for (const Worker* w : {&w0, &w1}) {
      auto masks = w->channel->Masks();
      ASSERT_EQ(masks.size(), static_cast<size_t>(k + 1));
      const v1::MaskUpdate& mask = masks.back();
      EXPECT_EQ(mask.job_id(), job);
      EXPECT_EQ(mask.mask_version(), k + 1);
      EXPECT_EQ(mask.effective_step(), step);
      EXPECT_EQ(mask.num_modules(), 10);
      ASSERT_EQ(mask.bits().size(), 2u);
      EXPECT_EQ(Unpack(mask.bits(), 10), schedule.every_step) << "probe " << k;
      EXPECT_EQ(static_cast<uint8_t>(mask.bits()[1]) & 0xfc, 0) << "bits past num_modules";
      EXPECT_TRUE(mask.slow_bits().empty());
      EXPECT_EQ(mask.slow_every_steps(), 0);
    }
    for (uint8_t on : schedule.every_step) saw_off = saw_off || on == 0;

    // The decision is stored as Decision::ToJson; the mask is published and persisted.
    auto decisions = coordinator_->store().GetDecisions(job, 0, "");
    ASSERT_TRUE(decisions.ok()) << decisions.status();
    ASSERT_EQ(decisions->decisions.size(), static_cast<size_t>(k + 1));
    EXPECT_EQ(decisions->decisions.back().step, step);
    EXPECT_EQ(nlohmann::json::parse(decisions->decisions.back().json),
              decision->ToJson(local->modules(), local->config()));
    int64_t active = 0;
    for (uint8_t on : schedule.every_step) active += on;
    ASSERT_FALSE(events.empty());
    const v1::JobEvent& event = events.back();
    ASSERT_TRUE(event.has_mask());
    EXPECT_EQ(event.step(), step);
    EXPECT_EQ(event.mask().mask_version(), k + 1);
    EXPECT_EQ(event.mask().effective_step(), step);
    EXPECT_EQ(event.mask().active_modules(), active);
    const v1::Job stored = GetJob(job).job();
    EXPECT_EQ(stored.mask_version(), k + 1);
    EXPECT_EQ(stored.active_modules(), active);
  }
  EXPECT_TRUE(saw_off) << "the test's λ never switched a module off";
}

TEST_F(WorkerSessionsTest, MaskBitsAreLeastSignificantBitFirst) {
  EXPECT_EQ(PackModuleBits({1, 0, 0, 0, 0, 0, 0, 0, 0, 1}), std::string("\x01\x02", 2));
  EXPECT_EQ(PackModuleBits({0, 1, 1}), std::string("\x06", 1));
  EXPECT_EQ(PackModuleBits({1, 1, 1, 1, 1, 1, 1, 1}), std::string("\xff", 1));
  EXPECT_EQ(PackModuleBits({}), "");
}

TEST_F(WorkerSessionsTest, MultirateJobsGetSlowBitsAndSendNoSpectra) {
  Worker w0, w1;
  const v1::JobSpec spec = Spec(2, "cpu", "multirate");
  const std::string job = StartTwoRankJob(&w0, &w1, spec);
  // A policy without spectra takes empty reports only.
  absl::Status st = Send(Spectra(w0.id, job, 0, 0, Lambda(0, 0)));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("lambda_max must be empty"));
  SendOk(Spectra(w0.id, job, 0, 0, {}));
  SendOk(Spectra(w1.id, job, 1, 0, {}));
  std::unique_ptr<policy::Policy> local = LocalPolicy(spec);
  ASSERT_TRUE(local->Observe(0, {}).ok());
  const policy::MaskSchedule schedule = local->Schedule();
  ASSERT_GT(schedule.slow_every, 0);
  auto masks = w1.channel->Masks();
  ASSERT_EQ(masks.size(), 1u);
  EXPECT_EQ(Unpack(masks[0].bits(), 10), schedule.every_step);
  EXPECT_EQ(Unpack(masks[0].slow_bits(), 10), schedule.slow);
  EXPECT_EQ(masks[0].slow_every_steps(), schedule.slow_every);
  auto spectra_page = coordinator_->store().GetLambdas(job, 0, "");
  ASSERT_TRUE(spectra_page.ok());
  EXPECT_THAT(spectra_page->points, IsEmpty()) << "no λ to store";
}

TEST_F(WorkerSessionsTest, MaskAcksAreRecordedAndStaleOnesAborted) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  for (int k = 0; k < 5; ++k) {
    SendProbe(w0, w1, job, k);
  }
  ASSERT_EQ(w0.channel->Masks().back().mask_version(), 5);
  SendOk(Ack(w0.id, job, 0, 5));
  SendOk(Ack(w0.id, job, 0, 5));  // repeated: accepted
  SendOk(Ack(w1.id, job, 1, 2));

  absl::Status st = Send(Ack(w0.id, job, 0, 3));
  EXPECT_EQ(st.code(), absl::StatusCode::kAborted) << st;
  EXPECT_EQ(st.message(), "stale mask version 3, rank 0 already acknowledged 5");
  st = Send(Ack(w0.id, job, 0, 6));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  st = Send(Ack(w1.id, job, 1, 0));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  auto rejects = w0.channel->Rejects();
  ASSERT_EQ(rejects.size(), 2u);
  EXPECT_EQ(rejects[0].job_id(), job);
  EXPECT_EQ(rejects[0].code(), static_cast<int>(absl::StatusCode::kAborted));
  EXPECT_EQ(rejects[0].message(), "stale mask version 3, rank 0 already acknowledged 5");
  EXPECT_EQ(rejects[1].code(), static_cast<int>(absl::StatusCode::kInvalidArgument));

  const v1::GetJobReply reply = GetJob(job);
  EXPECT_EQ(reply.ranks(0).mask_version(), 5);
  EXPECT_EQ(reply.ranks(1).mask_version(), 2);
}

// ----- refused messages -----

// Every bad input is refused with its code, answered with a Reject naming the job, and changes
// nothing: the job keeps running, no mask is sent, the next good report still decides.
TEST_F(WorkerSessionsTest, RefusedMessagesGetARejectWithTheirCodeAndChangeNothing) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  const Worker idle = AddWorker();
  const std::string queued = Submit(Spec(2));  // one idle worker: stays queued
  SendProbe(w0, w1, job, 0);  // step 0 decided
  SendOk(Ack(w1.id, job, 1, 1));                     // and rank 1 has its mask
  SendOk(Spectra(w0.id, job, 0, 10, Lambda(0, 1)));  // step 10 pending for rank 1

  std::vector<double> short_lambda = Lambda(1, 1);
  short_lambda.pop_back();
  v1::WorkerMessage bad_trace = Spectra(w1.id, job, 1, 10, Lambda(1, 1));
  bad_trace.mutable_spectra()->add_trace(1.0);
  v1::WorkerMessage no_body;
  no_body.set_worker_id(w1.id);
  std::vector<policy::ModuleInfo> other_modules = Modules();
  other_modules[3].name = "renamed";

  struct Case {
    std::string name;
    const Worker* from;
    v1::WorkerMessage message;
    absl::StatusCode code;
    std::string text;
  };
  const std::vector<Case> cases = {
      {"no body", &w1, no_body, absl::StatusCode::kInvalidArgument, "no body"},
      {"empty job id", &w1, Spectra(w1.id, "", 1, 10, Lambda(1, 1)),
       absl::StatusCode::kInvalidArgument, "job_id is empty"},
      {"unknown job", &w1, Spectra(w1.id, "job-000404", 1, 10, Lambda(1, 1)),
       absl::StatusCode::kNotFound, "job-000404"},
      {"not this worker's rank", &w1, Spectra(w1.id, job, 0, 10, Lambda(1, 1)),
       absl::StatusCode::kNotFound, "worker-000002 runs no rank 0 of job-000001"},
      {"rank out of range", &w1, Progress(w1.id, job, 5, 10, 1.0, 1.0, 1.0),
       absl::StatusCode::kNotFound, "runs no rank 5"},
      {"idle worker", &idle, Ack(idle.id, job, 1, 1), absl::StatusCode::kNotFound,
       "worker-000003 runs no rank 1 of job-000001"},
      {"queued job", &idle, Spectra(idle.id, queued, 0, 0, Lambda(0, 0)),
       absl::StatusCode::kNotFound, "runs no rank 0"},
      {"step not a probe step", &w1, Spectra(w1.id, job, 1, 15, Lambda(1, 1)),
       absl::StatusCode::kInvalidArgument, "probe_every"},
      {"negative step", &w1, Spectra(w1.id, job, 1, -10, Lambda(1, 1)),
       absl::StatusCode::kInvalidArgument, "step must be >= 0"},
      {"RankDone ok without a checksum", &w1, Done(w1.id, job, 1, true, ""),
       absl::StatusCode::kInvalidArgument, "ok without a param_checksum"},
      {"wrong module count", &w1, Spectra(w1.id, job, 1, 10, short_lambda),
       absl::StatusCode::kInvalidArgument, "lambda_max has 9 values, the job has 10 modules"},
      {"wrong trace count", &w1, bad_trace, absl::StatusCode::kInvalidArgument, "trace"},
      {"another attempt", &w1, Attempt(Spectra(w1.id, job, 1, 10, Lambda(1, 1)), 3),
       absl::StatusCode::kAborted, "stale attempt 3 of job job-000001 (rank 1), now 0"},
      {"stale step", &w1, Spectra(w1.id, job, 1, 0, Lambda(1, 0)), absl::StatusCode::kAborted,
       "stale"},
      {"second report of a pending step", &w0, Spectra(w0.id, job, 0, 10, Lambda(0, 1)),
       absl::StatusCode::kInvalidArgument, "rank 0 already reported"},
      {"ModuleList from rank 1", &w1, ModuleList(w1.id, job, other_modules),
       absl::StatusCode::kInvalidArgument, "only rank 0 declares the modules"},
      {"a different second ModuleList", &w0, ModuleList(w0.id, job, other_modules),
       absl::StatusCode::kFailedPrecondition, "already declared its 10 modules"},
      {"more modules than a job may have", &w0,
       ModuleList(w0.id, job,
                  std::vector<policy::ModuleInfo>(kMaxJobModules + 1,
                                                  policy::ModuleInfo{"heads", 0, 0, "m"})),
       absl::StatusCode::kInvalidArgument, "65537 modules; at most 65536"},
      {"non-finite loss", &w0,
       Progress(w0.id, job, 0, 10, std::numeric_limits<double>::quiet_NaN(), 1, 1),
       absl::StatusCode::kInvalidArgument, "train_loss must be a finite number"},
      {"negative flops", &w1, Progress(w1.id, job, 1, 10, 1.0, -1.0, 1.0),
       absl::StatusCode::kInvalidArgument, "flops_total must be >= 0"},
      {"RankDone with a negative step", &w1,
       [&] {
         v1::WorkerMessage m = Done(w1.id, job, 1, true, "x");
         m.mutable_done()->set_step(-1);
         return m;
       }(),
       absl::StatusCode::kInvalidArgument, "step must be >= 0"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const size_t rejects_before = c.from->channel->Rejects().size();
    absl::Status st = Send(c.message);
    EXPECT_EQ(st.code(), c.code) << st;
    EXPECT_THAT(st.message(), HasSubstr(c.text));
    auto rejects = c.from->channel->Rejects();
    ASSERT_EQ(rejects.size(), rejects_before + 1) << "no Reject sent";
    EXPECT_EQ(rejects.back().code(), static_cast<int>(c.code));
    EXPECT_EQ(rejects.back().message(), std::string(st.message()));
    const std::string named_job =
        c.message.has_spectra()    ? c.message.spectra().job_id()
        : c.message.has_progress() ? c.message.progress().job_id()
        : c.message.has_mask_ack() ? c.message.mask_ack().job_id()
        : c.message.has_modules()  ? c.message.modules().job_id()
        : c.message.has_done()     ? c.message.done().job_id()
                                   : "";
    EXPECT_EQ(rejects.back().job_id(), named_job);
    EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
    EXPECT_EQ(w0.channel->Masks().size(), 1u);
  }
  // An identical ModuleList, from any rank, is accepted and changes nothing.
  SendOk(ModuleList(w1.id, job));
  SendOk(ModuleList(w0.id, job));
  EXPECT_EQ(coordinator_->OpenSessionCount(), 3) << "a refused message closed a session";
  // State is as before: rank 1's report of step 10 completes it.
  SendOk(Spectra(w1.id, job, 1, 10, Lambda(1, 1)));
  ASSERT_EQ(w0.channel->Masks().size(), 2u);
  EXPECT_EQ(w0.channel->Masks().back().effective_step(), 10);
  EXPECT_EQ(GetJob(job).ranks(0).step(), 0) << "a refused Progress was recorded";
}

TEST_F(WorkerSessionsTest, AReportBeforeTheModuleListWaitsForItAndAfterTheJobEndedIsRefused) {
  const Worker w0 = AddWorker();
  const std::string job = Submit(Spec(1));
  // Rank 0's ModuleList may arrive after a report (another stream): the report is kept...
  SendOk(Spectra(w0.id, job, 0, 0, Lambda(0, 0)));
  EXPECT_TRUE(w0.channel->Masks().empty());
  // ...but only one per rank.
  absl::Status st = Send(Spectra(w0.id, job, 0, 10, Lambda(0, 1)));
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_THAT(st.message(), HasSubstr("no ModuleList yet"));
  // A ModuleList the policy refuses (duplicate names) is INVALID_ARGUMENT and declares nothing.
  std::vector<policy::ModuleInfo> duplicate = Modules();
  duplicate[1].name = duplicate[0].name;
  EXPECT_EQ(Send(ModuleList(w0.id, job, duplicate)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Send(ModuleList(w0.id, job, {})).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(coordinator_->JobPolicy(job), nullptr);
  EXPECT_TRUE(w0.channel->Masks().empty());
  // The list arrives: the kept report of step 0 is decided at once.
  SendOk(ModuleList(w0.id, job));
  ASSERT_EQ(w0.channel->Masks().size(), 1u);
  EXPECT_EQ(w0.channel->Masks()[0].effective_step(), 0);

  ASSERT_TRUE(coordinator_->CancelJob(job, "stop").ok());
  st = Send(Spectra(w0.id, job, 0, 0, Lambda(0, 0)));
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_THAT(st.message(), HasSubstr("CANCELLED"));
  // Another worker asking about that job still gets NOT_FOUND for the rank it never held.
  const Worker other = AddWorker();
  EXPECT_EQ(Send(Progress(other.id, job, 0, 1, 1, 1, 1)).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(w0.channel->Rejects().back().code(),
            static_cast<int>(absl::StatusCode::kFailedPrecondition));
}

// ----- progress -----

// resources.max_train_seconds: rank 0's reported training time past it fails the job (every
// rank told to stop); rank 1's does not count, and up to the limit the job goes on.
TEST_F(WorkerSessionsTest, AJobPastItsTrainingTimeLimitFails) {
  v1::JobSpec spec = Spec(2);
  spec.mutable_resources()->set_max_train_seconds(30);
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1, spec);
  SendOk(Progress(w0.id, job, 0, 20, 4.5, 6e12, 30.0));
  SendOk(Progress(w1.id, job, 1, 20, 4.5, 6e12, 45.0));
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING) << "at the limit, or rank 1 past it";
  SendOk(Progress(w0.id, job, 0, 40, 4.0, 8e12, 30.5));
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_FAILED);
  EXPECT_EQ(GetJob(job).job().error_message(),
            "trained for 30.500 s by step 40, past resources.max_train_seconds (30 s)");
  EXPECT_EQ(w0.channel->Cancels().size(), 1u);
  EXPECT_EQ(w1.channel->Cancels().size(), 1u);
}

TEST_F(WorkerSessionsTest, RankZeroProgressIsTheJobsProgressAndIsPublished) {
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  std::vector<v1::JobEvent> events;
  Watch(job, &events);
  events.clear();
  SendOk(Progress(w1.id, job, 1, 20, 9.0, 5e12, 10.0));
  EXPECT_THAT(events, IsEmpty()) << "rank 1's progress is not the job's";
  SendOk(Progress(w0.id, job, 0, 20, 4.5, 6e12, 10.0, 4.25));
  SendOk(Progress(w0.id, job, 0, 40, 4.0, 8e12, 20.0));

  const v1::GetJobReply reply = GetJob(job);
  const v1::Job& j = reply.job();
  EXPECT_EQ(j.step(), 40);
  EXPECT_EQ(j.train_loss(), 4.0);
  ASSERT_TRUE(j.has_val_loss());
  EXPECT_EQ(j.val_loss(), 4.25) << "a Progress without val_loss keeps the latest";
  EXPECT_FALSE(j.has_test_loss());
  EXPECT_EQ(j.flops_total(), 8e12 + 5e12);
  EXPECT_EQ(j.wall_seconds(), 20.0);
  EXPECT_EQ(reply.ranks(0).step(), 40);
  EXPECT_EQ(reply.ranks(1).step(), 20);

  ASSERT_EQ(events.size(), 3u);  // progress, evaluation, progress
  ASSERT_TRUE(events[0].has_progress());
  EXPECT_EQ(events[0].step(), 20);
  EXPECT_EQ(events[0].progress().train_loss(), 4.5);
  EXPECT_EQ(events[0].progress().flops_total(), 6e12 + 5e12);
  EXPECT_EQ(events[0].progress().total_modules(), 10);
  EXPECT_EQ(events[0].progress().active_modules(), 7);
  ASSERT_TRUE(events[1].has_evaluation());
  EXPECT_EQ(events[1].step(), 20);
  EXPECT_EQ(events[1].evaluation().val_loss(), 4.25);
  EXPECT_TRUE(std::isnan(events[1].evaluation().test_loss()));
  ASSERT_TRUE(events[2].has_progress());
  EXPECT_EQ(events[2].progress().steps_per_second(), 2.0);  // 20 steps in 10 s
}

// ----- metrics -----

namespace metrics_test {

metrics::LabelValues ModuleLabels(const std::string& job, int i) {
  const policy::ModuleInfo m = Modules()[i];
  return {job, m.group, std::to_string(m.layer), m.name};
}

}  // namespace metrics_test

TEST_F(WorkerSessionsTest, MetricsFollowDecisionsProgressAndTheEndOfAJob) {
  EnableMetrics();
  CoordinatorMetrics& m = *metrics_;
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  EXPECT_EQ(m.jobs.Value({"running"}), 1);
  EXPECT_EQ(m.jobs.Value({"queued"}), 0);
  EXPECT_EQ(m.workers.Value({"busy"}), 2);
  EXPECT_EQ(m.workers.Value({"idle"}), 0);
  EXPECT_FALSE(m.module_lambda_max.Exists(metrics_test::ModuleLabels(job, 0)));

  const std::vector<double> a = Lambda(0, 0), b = Lambda(1, 0);
  SendOk(Spectra(w0.id, job, 0, 0, a));
  SendOk(Spectra(w1.id, job, 1, 0, b));
  ASSERT_EQ(w0.channel->Masks().size(), 1u);
  const std::vector<uint8_t> bits = Unpack(w0.channel->Masks()[0].bits(), 10);
  int on = 0;
  for (int i = 0; i < 10; ++i) {
    const metrics::LabelValues labels = metrics_test::ModuleLabels(job, i);
    EXPECT_EQ(m.module_lambda_max.Value(labels), (a[i] + b[i]) / 2) << i;
    EXPECT_EQ(m.module_active.Value(labels), bits[i]) << i;
    on += bits[i];
  }
  EXPECT_GT(on, 0);
  EXPECT_LT(on, 10) << "the policy switched nothing off; the test checks less";
  EXPECT_EQ(m.job_active_modules.Value({job}), on);
  EXPECT_EQ(GetJob(job).job().active_modules(), on);
  const double threshold = m.policy_threshold.Value({job, "heads"});
  EXPECT_TRUE(std::isfinite(threshold)) << threshold;
  EXPECT_EQ(m.mask_latency_seconds.Get({}).count, 1u);
  EXPECT_EQ(m.spectra_reports_total.Value({}), 2);

  SendOk(Progress(w1.id, job, 1, 5, 4.0, 200, 1.0));
  SendOk(Progress(w0.id, job, 0, 5, 3.5, 100, 1.0, 3.25));
  EXPECT_EQ(m.job_step.Value({job}), 5);
  EXPECT_EQ(m.job_loss.Value({job, "train"}), 3.5);
  EXPECT_EQ(m.job_loss.Value({job, "val"}), 3.25);
  EXPECT_FALSE(m.job_loss.Exists({job, "test"}));
  EXPECT_EQ(m.job_flops_total.Value({job}), 300);

  // A refused message is counted by its code.
  EXPECT_EQ(Send(Spectra(w0.id, job, 0, 3, a)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.rejected_messages_total.Value({"INVALID_ARGUMENT"}), 1);

  // The end: the per-phase FLOPs and the savings from rank 0's summary.
  SendOk(Done(w1.id, job, 1, true, "c"));
  SendOk(Done(w0.id, job, 0, true, "c",
              R"({"flops_by_phase": {"forward": 10, "activation_grad": 20, "weight_grad": 5,)"
              R"( "spectral": 1}, "flops_saved": 7})"));
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(m.job_flops_by_phase_total.Value({job, "forward"}), 10);
  EXPECT_EQ(m.job_flops_by_phase_total.Value({job, "weight_grad"}), 5);
  EXPECT_EQ(m.job_flops_total.Value({job}), 300) << "the job's total is not a phase";
  EXPECT_EQ(m.job_flops_saved_total.Value({job}), 7);
  EXPECT_EQ(m.jobs.Value({"running"}), 0);
  EXPECT_EQ(m.jobs.Value({"succeeded"}), 1);
  EXPECT_EQ(m.workers.Value({"idle"}), 2);

  // Retention: the job's series stay 60 s after its end, then every one of them goes.
  now_ms_ += 59'000;
  coordinator_->RefreshMetrics();
  EXPECT_TRUE(m.module_active.Exists(metrics_test::ModuleLabels(job, 0)));
  EXPECT_THAT(m.registry.Expose(), HasSubstr("mat_job=\"" + job + "\""));
  EXPECT_EQ(m.worker_heartbeat_age_seconds.Value({w0.id}), 59);
  now_ms_ += 1'000;
  coordinator_->RefreshMetrics();
  EXPECT_FALSE(m.module_active.Exists(metrics_test::ModuleLabels(job, 0)));
  EXPECT_FALSE(m.policy_threshold.Exists({job, "heads"}));
  EXPECT_FALSE(m.job_step.Exists({job}));
  EXPECT_THAT(m.registry.Expose(), ::testing::Not(HasSubstr(job)));
  EXPECT_EQ(m.jobs.Value({"succeeded"}), 1) << "counts are not per job";
  EXPECT_EQ(m.rejected_messages_total.Value({"INVALID_ARGUMENT"}), 1);
}

// A coordinator restart within the retention restored a finished job's job-level series but not
// its module and policy series (the module-spectra dashboard lost the final mask and λ). They
// come back as the last decision set them, for every module and group, and expire on time.
TEST_F(WorkerSessionsTest, ARestartRestoresAFinishedJobsModuleAndPolicySeries) {
  EnableMetrics();
  Worker w0, w1;
  const std::string job = StartTwoRankJob(&w0, &w1);
  for (int k = 0; k < 2; ++k) {
    SendOk(Spectra(w0.id, job, 0, 10 * k, Lambda(0, k)));
    SendOk(Spectra(w1.id, job, 1, 10 * k, Lambda(1, k)));
  }
  SendOk(Done(w1.id, job, 1, true, "c"));
  SendOk(Done(w0.id, job, 0, true, "c", R"({"steps":100})"));
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_SUCCEEDED);
  const std::string before = metrics_->registry.Expose();
  std::vector<std::string> series;  // the module and policy lines of the job, as exposed
  auto lines_of = [&](const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      if ((line.rfind("mat_module_", 0) == 0 || line.rfind("mat_policy_threshold", 0) == 0) &&
          line.find("mat_job=\"" + job + "\"") != std::string::npos) {
        out.push_back(line);
      }
    }
    return out;
  };
  series = lines_of(before);
  ASSERT_EQ(series.size(), 10u * 2 + 1) << before;  // λ and active per module; one group

  now_ms_ += 20'000;
  now_ += 20;
  EnableMetrics();  // a new coordinator process (new metrics) on the same state dir
  EXPECT_EQ(lines_of(metrics_->registry.Expose()), series);
  now_ms_ += 40'000;  // 60 s after the job's end
  coordinator_->RefreshMetrics();
  EXPECT_TRUE(lines_of(metrics_->registry.Expose()).empty());
}

TEST_F(WorkerSessionsTest, MetricsThresholdIsNaNDuringWarmUpAndLostWorkersAreDisconnected) {
  EnableMetrics();
  CoordinatorMetrics& m = *metrics_;
  v1::JobSpec spec = Spec(1);
  spec.mutable_policy()->set_warmup_steps(50);
  Worker w0 = AddWorker();
  const std::string job = Submit(spec);
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  SendOk(ModuleList(w0.id, job));
  SendOk(Spectra(w0.id, job, 0, 0, Lambda(0, 0)));
  EXPECT_TRUE(std::isnan(m.policy_threshold.Value({job, "heads"})));
  EXPECT_EQ(m.module_active.Value(metrics_test::ModuleLabels(job, 3)), 1);  // warm-up: all on
  EXPECT_EQ(m.job_active_modules.Value({job}), 10);
  coordinator_->CloseSession(w0.id);
  EXPECT_EQ(m.workers.Value({"disconnected"}), 1);
  EXPECT_EQ(m.jobs.Value({"restarting"}), 1);
  EXPECT_EQ(m.jobs.Value({"running"}), 0);
  EXPECT_FALSE(m.worker_heartbeat_age_seconds.Exists({w0.id}));
  // Without metrics the Coordinator works the same (every other test here).
}

// ----- draining a worker (DrainWorker) -----

v1::DrainWorkerRequest DrainRequest(const std::string& worker, const std::string& reason,
                                    bool now = false) {
  v1::DrainWorkerRequest request;
  request.set_worker_id(worker);
  request.set_reason(reason);
  request.set_now(now);
  return request;
}

// A drained worker's rank runs to its job's end; no new rank goes to it meanwhile, and once
// idle it is told to stop (Drain), and leaves.
TEST_F(WorkerSessionsTest, ADrainedWorkerFinishesItsJobTakesNoOtherAndIsThenToldToStop) {
  EnableMetrics();
  const Worker w0 = AddWorker();
  const std::string first = Submit(Spec(1));
  ASSERT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
  const Worker w1 = AddWorker();

  auto drained = coordinator_->DrainWorker(DrainRequest(w0.id, "disk swap"));
  ASSERT_TRUE(drained.ok()) << drained.status();
  EXPECT_EQ(drained->worker().state(), v1::WORKER_STATE_DRAINING);
  EXPECT_EQ(drained->worker().job_id(), first);
  EXPECT_EQ(drained->worker().drain_reason(), "disk swap");
  EXPECT_THAT(w0.channel->Drains(), IsEmpty()) << "told to stop while its rank runs";
  EXPECT_THAT(w0.channel->Cancels(), IsEmpty()) << "its job was stopped";
  EXPECT_EQ(metrics_->workers.Value({"draining"}), 1);
  EXPECT_EQ(metrics_->workers.Value({"busy"}), 0);
  EXPECT_EQ(metrics_->workers.Value({"idle"}), 1);

  // New jobs go elsewhere or wait.
  const std::string second = Submit(Spec(1));
  EXPECT_EQ(StateOf(second), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(w1.channel->Assigns().size(), 1u);
  const std::string third = Submit(Spec(1));
  EXPECT_EQ(StateOf(third), v1::JOB_STATE_QUEUED);

  // Its job ends: it is told to stop, and the queued job still does not go to it.
  SendOk(Done(w0.id, first, 0, true, "abc", R"({"steps":100})"));
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(w0.channel->Drains().size(), 1u);
  EXPECT_EQ(w0.channel->Drains()[0].reason(), "disk swap");
  EXPECT_EQ(w0.channel->Assigns().size(), 1u);
  EXPECT_EQ(StateOf(third), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_DRAINING);
  EXPECT_EQ(WorkerInfoOf(w0.id).job_id(), "");
  // Draining again changes nothing and is not told twice.
  ASSERT_TRUE(coordinator_->DrainWorker(DrainRequest(w0.id, "again")).ok());
  EXPECT_EQ(w0.channel->Drains().size(), 1u);
  EXPECT_EQ(WorkerInfoOf(w0.id).drain_reason(), "disk swap");

  // It leaves; started again it is in service and takes the queued job.
  v1::WorkerMessage leaving = Heartbeat(w0.id);
  leaving.mutable_leaving()->set_reason("drained: disk swap");
  SendOk(leaving);
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(metrics_->workers.Value({"draining"}), 0);
  auto channel = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id), channel).ok());
  EXPECT_EQ(StateOf(third), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(channel->Assigns().size(), 1u);
}

// --now: the worker's job restarts at once (on another worker), as after a worker loss, and the
// worker is told to stop once its rank has stopped.
TEST_F(WorkerSessionsTest, DrainingNowRestartsTheWorkersJobElsewhere) {
  const Worker w0 = AddWorker();
  const std::string job = Submit(Spec(1));
  ASSERT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);

  auto drained = coordinator_->DrainWorker(DrainRequest(w0.id, "", /*now=*/true));
  ASSERT_TRUE(drained.ok()) << drained.status();
  EXPECT_EQ(drained->worker().state(), v1::WORKER_STATE_DRAINING);
  EXPECT_EQ(drained->worker().drain_reason(), "drained");
  ASSERT_EQ(w0.channel->Cancels().size(), 1u);
  const v1::Job restarting = GetJob(job).job();
  EXPECT_EQ(restarting.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(restarting.attempt(), 1);
  EXPECT_EQ(restarting.error_message(), "worker-000001 (rank 0) drained: drained");
  const Worker w1 = AddWorker();
  EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(w1.channel->Assigns().size(), 1u);
  EXPECT_TRUE(w1.channel->Assigns()[0].resume());
  EXPECT_THAT(w0.channel->Drains(), IsEmpty()) << "told to stop before its rank stopped";
  SendOk(Heartbeat(w0.id, {job}));  // still stopping
  EXPECT_THAT(w0.channel->Drains(), IsEmpty());
  SendOk(Heartbeat(w0.id));  // stopped
  EXPECT_EQ(w0.channel->Drains().size(), 1u);

  // An idle worker is told at once; unknown and disconnected ones are errors naming them.
  ASSERT_TRUE(coordinator_->DrainWorker(DrainRequest(w0.id, "x")).ok());
  EXPECT_EQ(w0.channel->Drains().size(), 1u);
  const Worker w2 = AddWorker();
  ASSERT_TRUE(coordinator_->DrainWorker(DrainRequest(w2.id, "idle")).ok());
  EXPECT_EQ(w2.channel->Drains().size(), 1u);
  auto unknown = coordinator_->DrainWorker(DrainRequest("worker-000099", ""));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(unknown.status().message(), HasSubstr("worker-000099"));
}

// A worker without a session can be drained: it stays DISCONNECTED with the drain waiting, and is
// told to stop when it comes back. A drain can be undone until the worker was told to stop; the
// undone drain is gone from the store too, and the worker takes the next job.
TEST_F(WorkerSessionsTest, ADisconnectedWorkerCanBeDrainedAndADrainUndoneUntilItIsToldToStop) {
  EnableMetrics();
  const Worker w0 = AddWorker();
  const Worker w1 = AddWorker();
  coordinator_->CloseSession(w1.id);
  auto away = coordinator_->DrainWorker(DrainRequest(w1.id, "rack move"));
  ASSERT_TRUE(away.ok()) << away.status();
  EXPECT_EQ(away->worker().state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(away->worker().drain_reason(), "rack move");
  EXPECT_EQ(metrics_->workers.Value({"disconnected"}), 1);
  EXPECT_EQ(metrics_->workers.Value({"draining"}), 0);
  // It comes back (after a coordinator restart, too): draining, told to stop at once.
  Open();
  EXPECT_EQ(Register("cpu", "host-2", 29502, w1.id), w1.id);
  auto back = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w1.id), back).ok());
  EXPECT_EQ(WorkerInfoOf(w1.id).state(), v1::WORKER_STATE_DRAINING);
  ASSERT_EQ(back->Drains().size(), 1u);
  EXPECT_EQ(back->Drains()[0].reason(), "rack move");
  EXPECT_THAT(back->Assigns(), IsEmpty());
  // Told to stop: too late to undo.
  v1::UndrainWorkerRequest undo;
  undo.set_worker_id(w1.id);
  auto leaving = coordinator_->UndrainWorker(undo);
  EXPECT_EQ(leaving.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(leaving.status().message(), HasSubstr("already told to stop"));

  // w0 (reconnected to this coordinator) runs a job and is drained while it does: undone, it
  // stays with its job and takes the queued one after it, as if never drained.
  EXPECT_EQ(Register("cpu", "host-1", 29501, w0.id), w0.id);
  auto channel = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id), channel).ok());
  const std::string first = Submit(Spec(1));
  ASSERT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(coordinator_->DrainWorker(DrainRequest(w0.id, "disk swap")).ok());
  const std::string second = Submit(Spec(1));
  EXPECT_EQ(StateOf(second), v1::JOB_STATE_QUEUED);
  undo.set_worker_id(w0.id);
  auto undone = coordinator_->UndrainWorker(undo);
  ASSERT_TRUE(undone.ok()) << undone.status();
  EXPECT_EQ(undone->worker().state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(undone->worker().job_id(), first);
  EXPECT_EQ(undone->worker().drain_reason(), "");
  auto again = coordinator_->UndrainWorker(undo);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(again.status().message(), HasSubstr(w0.id + " is not drained"));
  undo.set_worker_id("worker-000099");
  EXPECT_EQ(coordinator_->UndrainWorker(undo).status().code(), absl::StatusCode::kNotFound);
  auto stored = coordinator_->store().GetWorker(w0.id);
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_FALSE(stored->drain_reason.has_value()) << "the undone drain is still stored";
  SendOk(Done(w0.id, first, 0, true, "abc", R"({"steps":100})"));
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_SUCCEEDED);
  EXPECT_THAT(channel->Drains(), IsEmpty());
  EXPECT_EQ(StateOf(second), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(WorkerInfoOf(w0.id).job_id(), second);
}

// After a coordinator restart, a worker that has not come back yet still holds its rank of a
// running job: drained with `now`, that job restarts at once. An undone drain of a disconnected
// worker brings it back in service.
TEST_F(WorkerSessionsTest, DrainingNowAWorkerNotYetBackRestartsItsJobAndAnUndoneDrainIsForgotten) {
  const Worker w0 = AddWorker();
  const std::string first = Submit(Spec(1));
  ASSERT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
  Open();  // a new coordinator: w0 has no session yet, its rank is kept for it
  ASSERT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
  auto drained = coordinator_->DrainWorker(DrainRequest(w0.id, "bad disk", /*now=*/true));
  ASSERT_TRUE(drained.ok()) << drained.status();
  EXPECT_EQ(drained->worker().state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(drained->worker().drain_reason(), "bad disk");
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(GetJob(first).job().error_message(), w0.id + " (rank 0) drained: bad disk");

  v1::UndrainWorkerRequest undo;
  undo.set_worker_id(w0.id);
  auto undone = coordinator_->UndrainWorker(undo);
  ASSERT_TRUE(undone.ok()) << undone.status();
  EXPECT_EQ(undone->worker().state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(undone->worker().drain_reason(), "");
  // It comes back in service and takes its restarting job.
  EXPECT_EQ(Register("cpu", "host-1", 29501, w0.id), w0.id);
  auto channel = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id), channel).ok());
  EXPECT_THAT(channel->Drains(), IsEmpty());
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
}

// A drain lived in the coordinator's memory: after a coordinator restart the drained worker
// reconnected in service and took the next job. It is stored now: the worker comes back
// DRAINING with its reason and takes no queued job; when it loses its session before it was told
// to stop (its job restarts, as after any worker loss) it is still drained when it returns, and
// is told to stop; once it has left as told, it is in service again.
TEST_F(WorkerSessionsTest, ADrainSurvivesACoordinatorRestartAndALostSession) {
  const Worker w0 = AddWorker();
  const std::string first = Submit(Spec(1));
  ASSERT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(coordinator_->DrainWorker(DrainRequest(w0.id, "disk swap")).ok());

  Open();  // a new coordinator process on the same state dir
  ASSERT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Register("cpu", "host-1", 29501, w0.id), w0.id);
  auto channel = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id, {first}), channel).ok());
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_DRAINING);
  EXPECT_EQ(WorkerInfoOf(w0.id).drain_reason(), "disk swap");
  EXPECT_EQ(WorkerInfoOf(w0.id).job_id(), first);
  const std::string second = Submit(Spec(1));
  EXPECT_EQ(StateOf(second), v1::JOB_STATE_QUEUED);
  EXPECT_THAT(channel->Drains(), IsEmpty()) << "told to stop while its rank runs";

  // Its session is lost (its job restarts) and it comes back: still drained, so it takes
  // neither job and is told to stop.
  coordinator_->CloseSession(w0.id);
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_RESTARTING);
  channel = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id), channel).ok());
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_DRAINING);
  EXPECT_THAT(channel->Assigns(), IsEmpty());
  ASSERT_EQ(channel->Drains().size(), 1u);
  EXPECT_EQ(channel->Drains()[0].reason(), "disk swap");
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(StateOf(second), v1::JOB_STATE_QUEUED);

  // It leaves as told; the next coordinator and session see it in service: it takes the
  // restarting job first.
  v1::WorkerMessage leaving = Heartbeat(w0.id);
  leaving.mutable_leaving()->set_reason("drained: disk swap");
  SendOk(leaving);
  Open();
  EXPECT_EQ(Register("cpu", "host-1", 29501, w0.id), w0.id);
  channel = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w0.id), channel).ok());
  EXPECT_EQ(WorkerInfoOf(w0.id).state(), v1::WORKER_STATE_BUSY);
  EXPECT_EQ(StateOf(first), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(channel->Assigns().size(), 1u);
  EXPECT_EQ(channel->Assigns()[0].job_id(), first);
  EXPECT_THAT(channel->Drains(), IsEmpty());
}

// ----- rand replaying a MAT job (policy.rand_schedule_job) -----

// 2 layers × (3 heads + 2 FFN slices): two groups of different sizes, 10 modules (as Lambda).
std::vector<policy::ModuleInfo> TwoGroupModules() {
  std::vector<policy::ModuleInfo> out;
  for (int layer = 0; layer < 2; ++layer) {
    for (int i = 0; i < 3; ++i) {
      out.push_back({"heads", layer, i, "layer" + std::to_string(layer) + ".head" + std::to_string(i)});
    }
    for (int i = 0; i < 2; ++i) {
      out.push_back({"ffn", layer, i, "layer" + std::to_string(layer) + ".ffn" + std::to_string(i)});
    }
  }
  return out;
}

// Active modules per group of a mask over `modules`.
std::map<std::string, int> CountsByGroup(const v1::MaskUpdate& mask,
                                         const std::vector<policy::ModuleInfo>& modules) {
  std::map<std::string, int> out;
  const std::vector<uint8_t> on = Unpack(mask.bits(), static_cast<int>(modules.size()));
  for (size_t i = 0; i < modules.size(); ++i) out[modules[i].group] += on[i];
  return out;
}

// Jobs that replay a finished MAT job.
class ReplayTest : public WorkerSessionsTest {
 protected:
  static constexpr int kProbes = 6;
  // Runs a MAT job over `modules` on `w` through kProbes probes (steps 0, 10, ...) to SUCCEEDED:
  // its id and the masks the worker got.
  void RunMatJob(const Worker& w, const std::vector<policy::ModuleInfo>& modules,
                 std::string* mat, std::vector<v1::MaskUpdate>* masks) {
    *mat = Submit(Spec(1));
    ASSERT_EQ(StateOf(*mat), v1::JOB_STATE_RUNNING);
    SendOk(ModuleList(w.id, *mat, modules));
    for (int k = 0; k < kProbes; ++k) SendOk(Spectra(w.id, *mat, 0, 10 * k, Lambda(0, k)));
    SendOk(Done(w.id, *mat, 0, true, "abc", R"({"steps":100})"));
    ASSERT_EQ(StateOf(*mat), v1::JOB_STATE_SUCCEEDED);
    *masks = w.channel->Masks();
    ASSERT_EQ(masks->size(), static_cast<size_t>(kProbes));
  }
};

// A rand job with policy.rand_schedule_job draws, at every decision, as many modules per group
// as the finished MAT job had active at that step (which ones: at random), also after a
// coordinator restart (the schedule is not in the policy's saved state: it is set again).
TEST_F(ReplayTest, ARandJobReplaysTheActiveCountsOfAFinishedMatJob) {
  const std::vector<policy::ModuleInfo> modules = TwoGroupModules();
  Worker w = AddWorker();
  std::string mat;
  std::vector<v1::MaskUpdate> mat_masks;
  ASSERT_NO_FATAL_FAILURE(RunMatJob(w, modules, &mat, &mat_masks));
  // rand_fraction 0.5 alone would draw 3 of 6 heads and 2 of 4 FFN slices.
  const std::map<std::string, int> by_fraction = {{"ffn", 2}, {"heads", 3}};
  std::vector<bool> differs_from_fraction(kProbes);
  for (int k = 0; k < kProbes; ++k) {
    differs_from_fraction[k] = CountsByGroup(mat_masks[k], modules) != by_fraction;
  }
  ASSERT_TRUE(differs_from_fraction[1] || differs_from_fraction[2])
      << "the MAT job's counts equal rand_fraction's before the restart: the test checks less";
  ASSERT_TRUE(differs_from_fraction[3] || differs_from_fraction[4] || differs_from_fraction[5])
      << "the MAT job's counts equal rand_fraction's after the restart: the test checks less";

  v1::JobSpec spec = Spec(1, "cpu", "rand");
  spec.mutable_policy()->set_rand_schedule_job(mat);
  const std::string rand = Submit(spec);
  ASSERT_EQ(StateOf(rand), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(w.channel->Assigns().back().spec().policy().rand_schedule_job(), mat);
  SendOk(ModuleList(w.id, rand, modules));
  bool some_set_differs = false;
  auto expect_replayed = [&](const std::shared_ptr<FakeWorkerChannel>& channel, int k) {
    const v1::MaskUpdate mask = channel->Masks().back();
    ASSERT_EQ(mask.effective_step(), 10 * k);
    EXPECT_EQ(CountsByGroup(mask, modules), CountsByGroup(mat_masks[k], modules)) << "step " << 10 * k;
    some_set_differs = some_set_differs || mask.bits() != mat_masks[k].bits();
  };
  for (int k = 0; k < 3; ++k) {
    SendOk(Spectra(w.id, rand, 0, 10 * k, {}));
    expect_replayed(w.channel, k);
  }

  Open();  // a new coordinator process on the same state dir keeps the rand job
  ASSERT_EQ(StateOf(rand), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Register("cpu", "host-1", 29501, w.id), w.id);
  auto channel = std::make_shared<FakeWorkerChannel>();
  ASSERT_TRUE(coordinator_->OpenSession(Heartbeat(w.id, {rand}), channel).ok());
  SendOk(ModuleList(w.id, rand, modules));
  for (int k = 3; k < kProbes; ++k) {
    SendOk(Spectra(w.id, rand, 0, 10 * k, {}));
    ASSERT_EQ(channel->Masks().size(), static_cast<size_t>(k - 2));
    expect_replayed(channel, k);
  }
  EXPECT_TRUE(some_set_differs) << "the rand job copied the MAT job's masks";
  SendOk(Done(w.id, rand, 0, true, "def", R"({"steps":100})"));
  EXPECT_EQ(StateOf(rand), v1::JOB_STATE_SUCCEEDED);
}

// The frozen-random and inverse controls replay a finished MAT job too: at every decision they
// train its active count per group (their own MAT rule on these λ would not: inverse's count
// follows the same threshold, and here the λ differ from the MAT job's).
TEST_F(ReplayTest, TheControlsReplayTheActiveCountsOfAFinishedMatJob) {
  const std::vector<policy::ModuleInfo> modules = TwoGroupModules();
  Worker w = AddWorker();
  std::string mat;
  std::vector<v1::MaskUpdate> mat_masks;
  ASSERT_NO_FATAL_FAILURE(RunMatJob(w, modules, &mat, &mat_masks));
  for (const char* kind : {"frozen-random", "inverse"}) {
    v1::JobSpec spec = Spec(1, "cpu", kind);
    spec.mutable_policy()->set_rand_schedule_job(mat);
    const std::string control = Submit(spec);
    ASSERT_EQ(StateOf(control), v1::JOB_STATE_RUNNING) << kind;
    SendOk(ModuleList(w.id, control, modules));
    bool own_would_differ = false;
    for (int k = 0; k < kProbes; ++k) {
      // Other λ than the MAT job's: the same module ranks reversed.
      std::vector<double> lambda = Lambda(0, k);
      std::reverse(lambda.begin(), lambda.end());
      for (double& x : lambda) x = x * x;
      SendOk(Spectra(w.id, control, 0, 10 * k, lambda));
      const v1::MaskUpdate mask = w.channel->Masks().back();
      ASSERT_EQ(mask.effective_step(), 10 * k) << kind;
      EXPECT_EQ(CountsByGroup(mask, modules), CountsByGroup(mat_masks[k], modules))
          << kind << " step " << 10 * k;
      own_would_differ = own_would_differ || mask.bits() != mat_masks[k].bits();
    }
    EXPECT_TRUE(own_would_differ) << kind << " copied the MAT job's masks";
    SendOk(Done(w.id, control, 0, true, "def", R"({"steps":100})"));
    EXPECT_EQ(StateOf(control), v1::JOB_STATE_SUCCEEDED) << kind;
  }
}

// The replayed MAT job trained another model (other group sizes): the rand job fails at its
// ModuleList with a message naming both jobs, and its worker is told to stop.
TEST_F(WorkerSessionsTest, ARandJobReplayingAJobWithOtherModulesFailsNamingBoth) {
  Worker w = AddWorker();
  const std::string mat = Submit(Spec(1));
  SendOk(ModuleList(w.id, mat));  // 10 heads
  SendOk(Spectra(w.id, mat, 0, 0, Lambda(0, 0)));
  SendOk(Done(w.id, mat, 0, true, "abc", "{}"));
  ASSERT_EQ(StateOf(mat), v1::JOB_STATE_SUCCEEDED);

  v1::JobSpec spec = Spec(1, "cpu", "rand");
  spec.mutable_policy()->set_rand_schedule_job(mat);
  const std::string rand = Submit(spec);
  ASSERT_EQ(StateOf(rand), v1::JOB_STATE_RUNNING);
  std::vector<policy::ModuleInfo> eight = Modules();
  eight.resize(8);
  absl::Status st = Send(ModuleList(w.id, rand, eight));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  const v1::Job failed = GetJob(rand).job();
  EXPECT_EQ(failed.state(), v1::JOB_STATE_FAILED);
  for (const std::string& text : {rand, mat, std::string("group heads has 8 modules")}) {
    EXPECT_THAT(std::string(st.message()), HasSubstr(text));
    EXPECT_THAT(failed.error_message(), HasSubstr(text));
  }
  ASSERT_FALSE(w.channel->Cancels().empty());
  EXPECT_EQ(w.channel->Cancels().back().job_id(), rand);
  SendOk(Heartbeat(w.id));  // its rank stopped
  EXPECT_EQ(WorkerInfoOf(w.id).state(), v1::WORKER_STATE_IDLE);
}

}  // namespace
}  // namespace mat::coordinator
