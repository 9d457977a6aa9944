// Tests of coordinator/worker_service.h (and JobService.ListWorkers) through an in-process gRPC
// channel: a real Coordinator on its own io_context thread (as in the daemon), both adapters on a
// grpc::Server, fake workers that drive Session streams (grpc::ClientReaderWriter, a reader thread
// each). Checks Register, the ways a Session opens and ends (unknown worker, second session,
// half-close, cancel, heartbeat loss, server shutdown, an overflowing send queue) and one 2-rank
// job end to end: Assign, ModuleList, spectra, the MaskUpdate both ranks get, a NaN report's
// Reject, FAILED and Cancel; and that every call in a worker's name needs its secret (an
// artifact upload, a Register, a Session).
#include "coordinator/worker_service.h"

#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "coordinator/job_service.h"
#include "api/artifacts.h"
#include "api/job_spec.h"
#include "coordinator/artifact_store.h"
#include "coordinator/auth.h"
#include "mat/v1/service.grpc.pb.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/worker_secret.h"

namespace mat::coordinator {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

// A 2-rank job whose policy probes at every step from step 0.
v1::JobSpec TwoRankSpec() {
  auto spec = api::ParseJobSpecYaml(
      "train: {steps: 1000, batch_size: 4}\n"
      "policy: {kind: mat, probe_every: 1, warmup_steps: 0, probe_samples: 2}\n"
      "resources: {workers: 2, device: cpu}\n",
      "test");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

// One worker's Session stream. A reader thread collects what the coordinator sends; the test
// thread writes (gRPC allows one reader and one writer at a time on a stream).
class FakeWorker {
 public:
  // `secret`: sent as the call's "x-mat-worker-secret" metadata; "" = none.
  FakeWorker(v1::WorkerService::Stub& stub, std::string worker_id, const std::string& secret)
      : worker_id_(std::move(worker_id)) {
    if (!secret.empty()) context_.AddMetadata(kWorkerSecretMetadataKey, secret);
    stream_ = stub.Session(&context_);
    reader_ = std::thread([this] {
      v1::CoordinatorMessage message;
      while (stream_->Read(&message)) {
        std::lock_guard<std::mutex> lock(mu_);
        inbox_.push_back(message);
        cv_.notify_all();
      }
      std::lock_guard<std::mutex> lock(mu_);
      ended_ = true;
      cv_.notify_all();
    });
  }

  ~FakeWorker() {
    if (!finished_) {
      context_.TryCancel();
      Finish();
    }
  }

  const std::string& id() const { return worker_id_; }

  bool Send(v1::WorkerMessage message) {
    message.set_worker_id(worker_id_);
    return stream_->Write(message);
  }
  // Writes `message` with the worker id it carries (another worker's, in the tests of that).
  bool SendAsIs(const v1::WorkerMessage& message) { return stream_->Write(message); }

  bool Heartbeat() {
    v1::WorkerMessage message;
    message.mutable_heartbeat()->set_sent_time_unix_ms(1);
    return Send(message);
  }

  bool SendSpectra(const std::string& job_id, int rank, int64_t step,
                   const std::vector<double>& lambda) {
    v1::WorkerMessage message;
    v1::SpectraReport* report = message.mutable_spectra();
    report->set_job_id(job_id);
    report->set_rank(rank);
    report->set_step(step);
    for (double value : lambda) report->add_lambda_max(value);
    return Send(message);
  }

  // Removes and returns the first received message that matches `match`, waiting up to
  // `timeout`; nullopt when none came (or the stream ended without one).
  std::optional<v1::CoordinatorMessage> WaitFor(
      const std::function<bool(const v1::CoordinatorMessage&)>& match,
      std::chrono::milliseconds timeout = 5000ms) {
    std::unique_lock<std::mutex> lock(mu_);
    std::optional<v1::CoordinatorMessage> found;
    cv_.wait_for(lock, timeout, [&] {
      for (auto it = inbox_.begin(); it != inbox_.end(); ++it) {
        if (match(*it)) {
          found = std::move(*it);
          inbox_.erase(it);
          return true;
        }
      }
      return ended_;
    });
    return found;
  }

  // Waits up to 5 s for the server to end the stream; true when it did.
  bool WaitEnded() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 5s, [&] { return ended_; });
  }

  void HalfClose() { stream_->WritesDone(); }
  void Cancel() { context_.TryCancel(); }

  // Waits for the stream's end and returns its status. Call once.
  grpc::Status Finish() {
    finished_ = true;
    reader_.join();
    return stream_->Finish();
  }

 private:
  const std::string worker_id_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>> stream_;
  std::thread reader_;
  bool finished_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::CoordinatorMessage> inbox_;  // guarded by mu_
  bool ended_ = false;                        // guarded by mu_
};

class WorkerServiceTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_worker_service"};  // outlives the members below

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok()) << "cannot create a temporary directory";
    dir_ = tmp_.path();
    auto store = JobStore::Open(dir_ + "/state");
    ASSERT_TRUE(store.ok()) << store.status();
    CoordinatorOptions options;
    options.heartbeat_interval_ms = HeartbeatIntervalMs();
    auto coordinator = Coordinator::Create(std::move(*store), options);
    ASSERT_TRUE(coordinator.ok()) << coordinator.status();
    coordinator_ = std::move(*coordinator);
    loop_thread_ = std::thread([this] { loop_.run(); });
    job_service_ = std::make_unique<JobService>(loop_, *coordinator_);
    worker_service_ = std::make_unique<WorkerService>(loop_, *coordinator_, ServiceOptions());
    grpc::ServerBuilder builder;
    builder.RegisterService(job_service_.get());
    builder.RegisterService(worker_service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    auto channel = server_->InProcessChannel(grpc::ChannelArguments());
    jobs_ = v1::JobService::NewStub(channel);
    workers_ = v1::WorkerService::NewStub(channel);
  }

  void TearDown() override {
    fakes_.clear();  // cancels what is still open
    ShutdownServer();
    work_.reset();
    if (loop_thread_.joinable()) loop_thread_.join();
    worker_service_.reset();
    job_service_.reset();
    coordinator_.reset();
  }

  virtual int64_t HeartbeatIntervalMs() const { return 1000; }
  virtual WorkerServiceOptions ServiceOptions() const { return {}; }

  void ShutdownServer() {
    if (server_ == nullptr) return;
    worker_service_->BeginShutdown();
    server_->Shutdown(std::chrono::system_clock::now() + 2s);
    server_->Wait();
    server_.reset();
  }

  // Runs `fn` on the loop (the only thread that may touch the Coordinator) and waits for it.
  template <typename Fn>
  auto OnLoop(Fn fn) -> decltype(fn()) {
    std::packaged_task<decltype(fn())()> task(std::move(fn));
    auto result = task.get_future();
    boost::asio::post(loop_, [&task] { task(); });
    return result.get();
  }

  int SessionCount() {
    return OnLoop([&] { return worker_service_->SessionCount(); });
  }

  std::unique_ptr<grpc::ClientContext> Context() {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + 10s);
    return context;
  }

  // Register with the worker's secret, as mat-worker does: request.worker_id's when known, a
  // new one for a new worker.
  grpc::Status Register(const v1::RegisterRequest& request, v1::RegisterReply* reply) {
    std::string secret = SecretOf(request.worker_id());
    if (secret.empty()) secret = tests::TestWorkerSecret(secrets_.size() + 1);
    std::unique_ptr<grpc::ClientContext> context = Context();
    context->AddMetadata(kWorkerSecretMetadataKey, secret);
    grpc::Status s = workers_->Register(context.get(), request, reply);
    if (s.ok()) secrets_[reply->worker_id()] = secret;
    return s;
  }

  // The secret Register gave `worker_id` ("" = none).
  std::string SecretOf(const std::string& worker_id) const {
    auto known = secrets_.find(worker_id);
    return known == secrets_.end() ? "" : known->second;
  }

  v1::RegisterRequest CpuWorker(int port) {
    v1::RegisterRequest request;
    request.mutable_capabilities()->set_device("cpu");
    request.mutable_capabilities()->set_host("127.0.0.1");
    request.mutable_capabilities()->set_rendezvous_port(port);
    request.mutable_capabilities()->set_memory_bytes(int64_t{1} << 30);
    return request;
  }

  std::string RegisterOk(int port) {
    v1::RegisterReply reply;
    grpc::Status s = Register(CpuWorker(port), &reply);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return reply.worker_id();
  }

  // Registers a worker, opens its Session with a Heartbeat and waits until it is IDLE.
  FakeWorker& ConnectOk(int port) {
    const std::string id = RegisterOk(port);
    fakes_.push_back(std::make_unique<FakeWorker>(*workers_, id, SecretOf(id)));
    EXPECT_TRUE(fakes_.back()->Heartbeat());
    EXPECT_TRUE(WaitForWorkerState(id, v1::WORKER_STATE_IDLE)) << id << " never became IDLE";
    return *fakes_.back();
  }

  // A Session in `worker_id`'s name with `secret` (its own by default).
  FakeWorker& OpenSession(const std::string& worker_id) {
    return OpenSession(worker_id, SecretOf(worker_id));
  }
  FakeWorker& OpenSession(const std::string& worker_id, const std::string& secret) {
    fakes_.push_back(std::make_unique<FakeWorker>(*workers_, worker_id, secret));
    return *fakes_.back();
  }

  v1::ListWorkersReply ListWorkers() {
    v1::ListWorkersReply reply;
    grpc::Status s = jobs_->ListWorkers(Context().get(), v1::ListWorkersRequest(), &reply);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return reply;
  }

  std::optional<v1::WorkerInfo> FindWorker(const std::string& worker_id) {
    const v1::ListWorkersReply list = ListWorkers();
    for (const v1::WorkerInfo& info : list.workers()) {
      if (info.worker_id() == worker_id) return info;
    }
    return std::nullopt;
  }

  bool WaitUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout = 5000ms) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (done()) return true;
      std::this_thread::sleep_for(10ms);
    }
    return done();
  }

  bool WaitForWorkerState(const std::string& worker_id, v1::WorkerState state) {
    return WaitUntil([&] {
      auto info = FindWorker(worker_id);
      return info.has_value() && info->state() == state;
    });
  }

  std::string SubmitOk(const v1::JobSpec& spec) {
    v1::SubmitJobRequest request;
    *request.mutable_spec() = spec;
    v1::SubmitJobReply reply;
    grpc::Status s = jobs_->SubmitJob(Context().get(), request, &reply);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return reply.job_id();
  }

  v1::Job GetJob(const std::string& job_id) {
    v1::GetJobRequest request;
    request.set_job_id(job_id);
    v1::GetJobReply reply;
    grpc::Status s = jobs_->GetJob(Context().get(), request, &reply);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return reply.job();
  }

  bool WaitForJobState(const std::string& job_id, v1::JobState state) {
    return WaitUntil([&] { return GetJob(job_id).state() == state; });
  }

  static bool IsAssign(const v1::CoordinatorMessage& m) { return m.has_assign(); }
  static bool IsMask(const v1::CoordinatorMessage& m) { return m.has_mask(); }
  static bool IsCancel(const v1::CoordinatorMessage& m) { return m.has_cancel(); }
  static bool IsReject(const v1::CoordinatorMessage& m) { return m.has_reject(); }

  // Two connected workers and a submitted 2-rank job, both ranks assigned; rank r runs on
  // *ranks[r].
  struct RunningJob {
    std::string job_id;
    FakeWorker* ranks[2] = {nullptr, nullptr};
  };
  RunningJob StartTwoRankJob() {
    RunningJob job;
    FakeWorker& a = ConnectOk(29500);
    FakeWorker& b = ConnectOk(29501);
    job.job_id = SubmitOk(TwoRankSpec());
    for (FakeWorker* worker : {&a, &b}) {
      auto assign = worker->WaitFor(IsAssign);
      EXPECT_TRUE(assign.has_value()) << worker->id() << " got no Assign";
      if (!assign.has_value()) continue;
      EXPECT_EQ(assign->assign().job_id(), job.job_id);
      EXPECT_EQ(assign->assign().world_size(), 2);
      const int rank = assign->assign().rank();
      EXPECT_TRUE(rank == 0 || rank == 1) << rank;
      if (rank == 0 || rank == 1) job.ranks[rank] = worker;
    }
    return job;
  }

  std::string dir_;
  boost::asio::io_context loop_{1};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_ =
      boost::asio::make_work_guard(loop_);
  std::thread loop_thread_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<JobService> job_service_;
  std::unique_ptr<WorkerService> worker_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  std::unique_ptr<v1::WorkerService::Stub> workers_;
  std::vector<std::unique_ptr<FakeWorker>> fakes_;  // destroyed (cancelled) before the server
  std::map<std::string, std::string> secrets_;      // each worker's secret, by id (Register)
};

TEST_F(WorkerServiceTest, RegisterReturnsAnIdAndTheHeartbeatIntervalAndNamesABadField) {
  v1::RegisterReply first, second;
  ASSERT_TRUE(Register(CpuWorker(29500), &first).ok());
  ASSERT_TRUE(Register(CpuWorker(29501), &second).ok());
  EXPECT_FALSE(first.worker_id().empty());
  EXPECT_NE(first.worker_id(), second.worker_id());
  EXPECT_EQ(first.heartbeat_interval_ms(), 1000);

  v1::RegisterRequest again = CpuWorker(29500);
  again.set_worker_id(first.worker_id());
  v1::RegisterReply resumed;
  ASSERT_TRUE(Register(again, &resumed).ok());
  EXPECT_EQ(resumed.worker_id(), first.worker_id());

  v1::RegisterRequest bad = CpuWorker(29500);
  bad.mutable_capabilities()->set_device("tpu");
  v1::RegisterReply ignored;
  grpc::Status s = Register(bad, &ignored);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("device"));

  const v1::ListWorkersReply list = ListWorkers();
  ASSERT_EQ(list.workers_size(), 2);
  for (const v1::WorkerInfo& info : list.workers()) {
    EXPECT_EQ(info.state(), v1::WORKER_STATE_DISCONNECTED) << info.worker_id();
  }
}

TEST_F(WorkerServiceTest, SessionOfAnUnknownWorkerEndsNotFound) {
  FakeWorker& stranger = OpenSession("worker-999999");
  stranger.Heartbeat();
  ASSERT_TRUE(stranger.WaitEnded());
  grpc::Status s = stranger.Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("worker-999999"));
  EXPECT_TRUE(WaitUntil([&] { return SessionCount() == 0; }))
      << "the reactor of an ended stream was not deleted";
}

TEST_F(WorkerServiceTest, SecondSessionIsRefusedAndHalfCloseEndsOkAndDisconnects) {
  FakeWorker& first = ConnectOk(29500);
  FakeWorker& second = OpenSession(first.id());
  second.Heartbeat();
  ASSERT_TRUE(second.WaitEnded());
  EXPECT_EQ(second.Finish().error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  // The first session is untouched.
  EXPECT_TRUE(first.Heartbeat());
  EXPECT_EQ(FindWorker(first.id())->state(), v1::WORKER_STATE_IDLE);

  first.HalfClose();
  ASSERT_TRUE(first.WaitEnded());
  grpc::Status s = first.Finish();
  EXPECT_TRUE(s.ok()) << s.error_code() << " " << s.error_message();
  EXPECT_TRUE(WaitForWorkerState(first.id(), v1::WORKER_STATE_DISCONNECTED));

  // The worker may open a new session afterwards.
  FakeWorker& reopened = OpenSession(first.id());
  EXPECT_TRUE(reopened.Heartbeat());
  EXPECT_TRUE(WaitForWorkerState(first.id(), v1::WORKER_STATE_IDLE));
}

// A session took the worker id of each message, not the one that opened it: a registered
// worker (any process with the join token) could send a Leaving in a busy worker's name, which
// ended that worker's session and restarted its job. Such a message now ends the session it
// came on; the named worker and its job are untouched.
TEST_F(WorkerServiceTest, AMessageInAnotherWorkersNameEndsTheSessionItCameOn) {
  RunningJob job = StartTwoRankJob();
  ASSERT_NE(job.ranks[0], nullptr);
  FakeWorker& intruder = ConnectOk(29510);
  v1::WorkerMessage leaving;
  leaving.set_worker_id(job.ranks[0]->id());
  leaving.mutable_leaving()->set_reason("pwned");
  intruder.SendAsIs(leaving);
  ASSERT_TRUE(intruder.WaitEnded());
  const grpc::Status s = intruder.Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("this session is worker " + intruder.id() + "'s"));
  EXPECT_THAT(s.error_message(), HasSubstr(job.ranks[0]->id()));
  EXPECT_TRUE(WaitForWorkerState(intruder.id(), v1::WORKER_STATE_DISCONNECTED));
  EXPECT_EQ(FindWorker(job.ranks[0]->id())->state(), v1::WORKER_STATE_BUSY);
  EXPECT_TRUE(job.ranks[0]->Heartbeat());
  const v1::Job now = GetJob(job.job_id);
  EXPECT_EQ(now.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(now.attempt(), 0);
}

// Registering a connected worker's id again replaced its host and rendezvous port, so the next
// job's ranks would meet at an address of the caller's choosing. It is refused while the session
// is open; after it ends, the worker may register again (its restart).
TEST_F(WorkerServiceTest, RegisteringAConnectedWorkersIdIsRefused) {
  FakeWorker& worker = ConnectOk(29500);
  v1::RegisterRequest again = CpuWorker(29599);
  again.set_worker_id(worker.id());
  again.mutable_capabilities()->set_host("10.6.6.6");
  v1::RegisterReply reply;
  grpc::Status s = Register(again, &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr(worker.id() + " already has an open session"));
  EXPECT_EQ(FindWorker(worker.id())->capabilities().host(), CpuWorker(29500).capabilities().host());
  EXPECT_EQ(FindWorker(worker.id())->capabilities().rendezvous_port(), 29500);
  EXPECT_TRUE(worker.Heartbeat());
  worker.HalfClose();
  ASSERT_TRUE(worker.WaitEnded());
  EXPECT_TRUE(WaitForWorkerState(worker.id(), v1::WORKER_STATE_DISCONNECTED));
  s = Register(again, &reply);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(FindWorker(worker.id())->capabilities().host(), "10.6.6.6");
}

TEST_F(WorkerServiceTest, TwoRanksGetAssignSameMaskThenNanRejectFailsTheJobAndCancelsBoth) {
  RunningJob job = StartTwoRankJob();
  ASSERT_NE(job.ranks[0], nullptr);
  ASSERT_NE(job.ranks[1], nullptr);
  EXPECT_EQ(GetJob(job.job_id).state(), v1::JOB_STATE_RUNNING);

  const v1::ListWorkersReply busy = ListWorkers();
  ASSERT_EQ(busy.workers_size(), 2);
  for (const v1::WorkerInfo& info : busy.workers()) {
    EXPECT_EQ(info.state(), v1::WORKER_STATE_BUSY) << info.worker_id();
    EXPECT_EQ(info.job_id(), job.job_id);
    EXPECT_EQ(info.rank(), info.worker_id() == job.ranks[0]->id() ? 0 : 1);
    EXPECT_EQ(info.capabilities().device(), "cpu");
  }

  v1::WorkerMessage modules;
  modules.mutable_modules()->set_job_id(job.job_id);
  for (int i = 0; i < 4; ++i) {
    v1::ModuleDescriptor* module = modules.mutable_modules()->add_modules();
    module->set_name("layer" + std::to_string(i / 2) + ".head" + std::to_string(i % 2));
    module->set_group("heads");
    module->set_layer(i / 2);
    module->set_index(i % 2);
  }
  ASSERT_TRUE(job.ranks[0]->Send(modules));
  ASSERT_TRUE(WaitUntil([&] { return GetJob(job.job_id).total_modules() == 4; }));

  ASSERT_TRUE(job.ranks[0]->SendSpectra(job.job_id, 0, 0, {1.0, 2.0, 3.0, 4.0}));
  ASSERT_TRUE(job.ranks[1]->SendSpectra(job.job_id, 1, 0, {3.0, 2.0, 1.0, 0.5}));
  auto mask0 = job.ranks[0]->WaitFor(IsMask);
  auto mask1 = job.ranks[1]->WaitFor(IsMask);
  ASSERT_TRUE(mask0.has_value());
  ASSERT_TRUE(mask1.has_value());
  EXPECT_EQ(mask0->mask().job_id(), job.job_id);
  EXPECT_EQ(mask0->mask().mask_version(), 1);
  EXPECT_EQ(mask0->mask().effective_step(), 0);
  EXPECT_EQ(mask0->mask().num_modules(), 4);
  EXPECT_EQ(mask0->mask().bits().size(), 1u);
  EXPECT_EQ(mask1->SerializeAsString(), mask0->SerializeAsString())
      << "the ranks got different masks";
  for (int rank = 0; rank < 2; ++rank) {
    v1::WorkerMessage ack;
    ack.mutable_mask_ack()->set_job_id(job.job_id);
    ack.mutable_mask_ack()->set_rank(rank);
    ack.mutable_mask_ack()->set_mask_version(1);
    ASSERT_TRUE(job.ranks[rank]->Send(ack));
  }

  ASSERT_TRUE(job.ranks[0]->SendSpectra(job.job_id, 0, 1, {1.0, 2.0, 3.0, 4.0}));
  ASSERT_TRUE(job.ranks[1]->SendSpectra(job.job_id, 1, 1,
                                        {1.0, std::numeric_limits<double>::quiet_NaN(), 1.0,
                                         1.0}));
  auto reject = job.ranks[1]->WaitFor(IsReject);
  ASSERT_TRUE(reject.has_value()) << "a NaN report got no Reject";
  EXPECT_EQ(reject->reject().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(reject->reject().job_id(), job.job_id);
  EXPECT_THAT(reject->reject().message(), HasSubstr("nan"));
  ASSERT_TRUE(WaitForJobState(job.job_id, v1::JOB_STATE_FAILED));
  EXPECT_THAT(GetJob(job.job_id).error_message(), HasSubstr("nan"));
  for (FakeWorker* rank : job.ranks) {
    auto cancel = rank->WaitFor(IsCancel);
    ASSERT_TRUE(cancel.has_value()) << rank->id() << " got no Cancel";
    EXPECT_EQ(cancel->cancel().job_id(), job.job_id);
  }

  // The sessions stay open; both workers are idle again.
  for (FakeWorker* rank : job.ranks) {
    EXPECT_TRUE(rank->Heartbeat());
    EXPECT_TRUE(WaitForWorkerState(rank->id(), v1::WORKER_STATE_IDLE)) << rank->id();
  }
}

TEST_F(WorkerServiceTest, AClientCancellingItsSessionRestartsItsJobAndCancelsTheOtherRank) {
  RunningJob job = StartTwoRankJob();
  ASSERT_NE(job.ranks[0], nullptr);
  ASSERT_NE(job.ranks[1], nullptr);

  job.ranks[1]->Cancel();
  ASSERT_TRUE(job.ranks[1]->WaitEnded());
  EXPECT_EQ(job.ranks[1]->Finish().error_code(), grpc::StatusCode::CANCELLED);

  // A lost worker: the job waits for workers to start again from its checkpoints.
  ASSERT_TRUE(WaitForJobState(job.job_id, v1::JOB_STATE_RESTARTING));
  EXPECT_EQ(GetJob(job.job_id).attempt(), 1);
  EXPECT_THAT(GetJob(job.job_id).error_message(), HasSubstr(job.ranks[1]->id()));
  auto cancel = job.ranks[0]->WaitFor(IsCancel);
  ASSERT_TRUE(cancel.has_value()) << "the other rank got no Cancel";
  EXPECT_EQ(cancel->cancel().job_id(), job.job_id);
  EXPECT_TRUE(WaitForWorkerState(job.ranks[1]->id(), v1::WORKER_STATE_DISCONNECTED));
  // Busy until its heartbeat no longer lists the job: its rank stopped.
  EXPECT_TRUE(WaitForWorkerState(job.ranks[0]->id(), v1::WORKER_STATE_BUSY));
  ASSERT_TRUE(job.ranks[0]->Heartbeat());
  EXPECT_TRUE(WaitForWorkerState(job.ranks[0]->id(), v1::WORKER_STATE_IDLE));
}

TEST_F(WorkerServiceTest, ServerShutdownEndsOpenSessionsPromptlyWithoutFailingTheirJob) {
  RunningJob job = StartTwoRankJob();
  ASSERT_NE(job.ranks[0], nullptr);
  ASSERT_NE(job.ranks[1], nullptr);

  const auto start = std::chrono::steady_clock::now();
  ShutdownServer();  // BeginShutdown, then a 2 s grace
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1500ms)
      << "shutdown waited for the grace period instead of ending the sessions";
  for (FakeWorker* rank : job.ranks) {
    ASSERT_TRUE(rank->WaitEnded());
    EXPECT_EQ(rank->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  EXPECT_TRUE(WaitUntil([&] { return SessionCount() == 0; }));
  auto stored = OnLoop([&] { return coordinator_->GetJob(job.job_id); });
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(stored->job().state(), v1::JOB_STATE_RUNNING)
      << "the coordinator's own shutdown failed a job: " << stored->job().error_message();
}

// A coordinator with a 50 ms heartbeat interval.
class WorkerServiceHeartbeatTest : public WorkerServiceTest {
 protected:
  int64_t HeartbeatIntervalMs() const override { return 50; }
};

TEST_F(WorkerServiceHeartbeatTest, ASilentWorkerIsLostItsStreamEndsUnavailable) {
  v1::RegisterReply reply;
  ASSERT_TRUE(Register(CpuWorker(29500), &reply).ok());
  EXPECT_EQ(reply.heartbeat_interval_ms(), 50);
  FakeWorker& worker = OpenSession(reply.worker_id());
  ASSERT_TRUE(worker.Heartbeat());
  ASSERT_TRUE(WaitForWorkerState(worker.id(), v1::WORKER_STATE_IDLE));

  std::this_thread::sleep_for(250ms);  // > 3 intervals without a message
  OnLoop([&] {
    coordinator_->CheckHeartbeats();
    return 0;
  });
  ASSERT_TRUE(worker.WaitEnded());
  EXPECT_EQ(worker.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(FindWorker(worker.id())->state(), v1::WORKER_STATE_DISCONNECTED);
}

// A service that queues at most 4 messages per worker.
class WorkerServiceSmallQueueTest : public WorkerServiceTest {
 protected:
  WorkerServiceOptions ServiceOptions() const override {
    WorkerServiceOptions options;
    options.max_queued_session_messages = 4;
    return options;
  }
};

TEST_F(WorkerServiceSmallQueueTest, AWorkerWhoseQueueOverflowsIsDroppedAsLost) {
  FakeWorker& worker = ConnectOk(29500);
  // One Heartbeat naming 10 jobs the worker runs no rank of: 10 Cancels in one loop turn, while
  // the first write is still in flight (its completion waits behind that turn).
  v1::WorkerMessage heartbeat;
  for (int i = 0; i < 10; ++i) {
    heartbeat.mutable_heartbeat()->add_job_ids("job-00010" + std::to_string(i));
  }
  ASSERT_TRUE(worker.Send(heartbeat));
  ASSERT_TRUE(worker.WaitEnded());
  grpc::Status s = worker.Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_TRUE(WaitForWorkerState(worker.id(), v1::WORKER_STATE_DISCONNECTED));
}


// A coordinator that keeps artifacts (in the test's temporary directory).
class WorkerServiceArtifactTest : public WorkerServiceTest {
 protected:
  WorkerServiceOptions ServiceOptions() const override {
    auto store = ArtifactStore::Open(tmp_.path() + "/artifacts", 0);
    EXPECT_TRUE(store.ok()) << store.status();
    if (store.ok()) artifacts_ = std::move(*store);
    WorkerServiceOptions options;
    options.artifacts = artifacts_.get();
    return options;
  }

  // Uploads `data` whole as `job_id`'s artifact `name` in `worker_id`'s name (rank 0, attempt
  // 0), with `secret` as the call's worker secret ("" = none).
  grpc::Status Upload(const std::string& worker_id, const std::string& secret,
                      const std::string& job_id, const std::string& data,
                      v1::UploadArtifactReply* reply,
                      const std::string& name = "summary.json") {
    v1::UploadArtifactRequest request;
    request.set_worker_id(worker_id);
    request.set_job_id(job_id);
    request.set_rank(0);
    request.set_attempt(0);
    request.set_name(name);
    request.set_total_bytes(static_cast<int64_t>(data.size()));
    api::Sha256 digest;
    digest.Add(data);
    request.set_sha256(digest.Hex());
    request.set_offset(0);
    request.set_data(data);
    std::unique_ptr<grpc::ClientContext> context = Context();
    if (!secret.empty()) context->AddMetadata(kWorkerSecretMetadataKey, secret);
    return workers_->UploadArtifact(context.get(), request, reply);
  }

  mutable std::unique_ptr<ArtifactStore> artifacts_;  // outlives the service (TearDown)
};

// Rank 0 gives back the files its worker knows (api::kJobArtifactNames); any other name a
// worker sent was stored and listed, and `matctl download` wrote it into the user's folder.
TEST_F(WorkerServiceArtifactTest, OnlyTheFilesAJobGivesBackAreTaken) {
  RunningJob job = StartTwoRankJob();
  ASSERT_NE(job.ranks[0], nullptr);
  const std::string rank0 = job.ranks[0]->id();
  v1::UploadArtifactReply reply;
  for (const std::string name : {"notes.txt", "model.safetensors.bak", "Summary.json"}) {
    grpc::Status s = Upload(rank0, SecretOf(rank0), job.job_id, "{}", &reply, name);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << name;
    EXPECT_THAT(s.error_message(), HasSubstr("artifact name '" + name + "' is not one a job"));
    EXPECT_THAT(s.error_message(), HasSubstr("job_spec.yaml, summary.json, metrics.jsonl"));
  }
  for (const char* name : api::kJobArtifactNames) {
    grpc::Status s = Upload(rank0, SecretOf(rank0), job.job_id, "{}", &reply, name);
    EXPECT_TRUE(s.ok()) << name << ": " << s.error_message();
  }
  absl::StatusOr<v1::ListArtifactsReply> listed = artifacts_->List(job.job_id);
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->artifacts_size(), static_cast<int>(api::kJobArtifactNames.size()));
}

// Any caller that could reach WorkerService could upload (or replace) a job's artifacts by
// naming its rank 0's worker id, and speak as a worker whose session had ended by registering
// or opening a session with its id. Every call in a worker's name now needs that worker's
// secret (the "x-mat-worker-secret" its first Register stored).
TEST_F(WorkerServiceArtifactTest, CallsInAWorkersNameNeedThatWorkersSecret) {
  RunningJob job = StartTwoRankJob();
  ASSERT_NE(job.ranks[0], nullptr);
  ASSERT_NE(job.ranks[1], nullptr);
  const std::string rank0 = job.ranks[0]->id();
  const std::string rank1 = job.ranks[1]->id();
  ASSERT_EQ(SecretOf(rank0).size(), 64u);

  v1::UploadArtifactReply reply;
  grpc::Status s = Upload(rank0, "", job.job_id, "{\"forged\": 1}", &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(),
              HasSubstr("worker " + rank0 + " has a worker secret and this call carries none"));
  s = Upload(rank0, SecretOf(rank1), job.job_id, "{\"forged\": 1}", &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("is not worker " + rank0 + "'s"));
  s = Upload(rank0, SecretOf(rank0), job.job_id, "{}", &reply);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(reply.complete());
  EXPECT_EQ(reply.committed_bytes(), 2);

  // Registering a worker's id with another secret is refused before anything else is said
  // (not "already has an open session"), and changes nothing; without one it is malformed.
  v1::RegisterRequest claim = CpuWorker(29666);
  claim.set_worker_id(rank1);
  claim.mutable_capabilities()->set_host("10.6.6.6");
  v1::RegisterReply claimed;
  auto claim_with = [&](const std::string& secret) {
    std::unique_ptr<grpc::ClientContext> context = Context();
    if (!secret.empty()) context->AddMetadata(kWorkerSecretMetadataKey, secret);
    return workers_->Register(context.get(), claim, &claimed);
  };
  s = claim_with(SecretOf(rank0));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("is not worker " + rank1 + "'s"));
  s = claim_with("");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("carries no worker secret"));

  // A session in a disconnected worker's name needs its secret too.
  job.ranks[1]->HalfClose();
  ASSERT_TRUE(job.ranks[1]->WaitEnded());
  ASSERT_TRUE(WaitForWorkerState(rank1, v1::WORKER_STATE_DISCONNECTED));
  s = claim_with(tests::TestWorkerSecret(666));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << "once disconnected";
  for (const std::string& secret : {std::string(), SecretOf(rank0)}) {
    FakeWorker& intruder = OpenSession(rank1, secret);
    intruder.Heartbeat();
    ASSERT_TRUE(intruder.WaitEnded());
    s = intruder.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << "secret '" << secret << "'";
    EXPECT_THAT(s.error_message(), HasSubstr(rank1));
  }
  const std::optional<v1::WorkerInfo> after = FindWorker(rank1);
  ASSERT_TRUE(after.has_value());
  EXPECT_EQ(after->state(), v1::WORKER_STATE_DISCONNECTED);
  EXPECT_EQ(after->capabilities().host(), "127.0.0.1");
  FakeWorker& back = OpenSession(rank1);  // with its own secret
  EXPECT_TRUE(back.Heartbeat());
  EXPECT_TRUE(WaitUntil([&] {
    auto info = FindWorker(rank1);
    return info.has_value() && info->state() != v1::WORKER_STATE_DISCONNECTED;
  }));
}

}  // namespace
}  // namespace mat::coordinator
