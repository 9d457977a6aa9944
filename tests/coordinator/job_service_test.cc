// Tests of coordinator/job_service.h through an in-process gRPC channel: a real Coordinator on its
// own io_context thread (as in the daemon), the adapter registered on a grpc::Server, and the
// generated stub. Checks the status mapping of every unary RPC (ListWorkers too), concurrent
// calls, and the WatchJob stream: first event, live events, OK end on a terminal state,
// NOT_FOUND, a client that cancels (its subscription is removed on the loop), and a server
// shutdown with open streams.
#include "coordinator/job_service.h"

#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/artifacts.h"
#include "coordinator/artifact_store.h"
#include "coordinator/auth.h"
#include "google/protobuf/unknown_field_set.h"
#include "mat/v1/service.grpc.pb.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/worker_secret.h"

namespace mat::coordinator {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

v1::JobSpec SmallSpec() {
  v1::JobSpec spec;
  spec.mutable_model()->set_layers(2);
  spec.mutable_train()->set_steps(10);
  return spec;
}

class JobServiceTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_job_service"};  // outlives the members below

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok()) << "cannot create a temporary directory";
    dir_ = tmp_.path();
    auto store = JobStore::Open(dir_ + "/state");
    ASSERT_TRUE(store.ok()) << store.status();
    auto coordinator = Coordinator::Create(std::move(*store), CoordinatorOpts());
    ASSERT_TRUE(coordinator.ok()) << coordinator.status();
    coordinator_ = std::move(*coordinator);
    loop_thread_ = std::thread([this] { loop_.run(); });
    service_ = std::make_unique<JobService>(loop_, *coordinator_, ServiceOptions());
    grpc::ServerBuilder builder;
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::JobService::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }

  void TearDown() override {
    ShutdownServer();
    work_.reset();
    if (loop_thread_.joinable()) loop_thread_.join();
    service_.reset();
    coordinator_.reset();
  }

  virtual JobServiceOptions ServiceOptions() const { return {}; }
  virtual CoordinatorOptions CoordinatorOpts() const { return {}; }

  void ShutdownServer() {
    if (server_ == nullptr) return;
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

  // Polls (on the loop) until the job has `n` watchers or 5 s pass.
  bool WaitForWatchers(const std::string& job_id, int n) {
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < deadline) {
      if (OnLoop([&] { return coordinator_->WatcherCount(job_id); }) == n) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  std::unique_ptr<grpc::ClientContext> Context() {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + 10s);
    return context;
  }

  grpc::Status Submit(const std::string& request_id, const v1::JobSpec& spec,
                      v1::SubmitJobReply* reply) {
    v1::SubmitJobRequest request;
    request.set_client_request_id(request_id);
    *request.mutable_spec() = spec;
    return stub_->SubmitJob(Context().get(), request, reply);
  }

  std::string SubmitOk() {
    v1::SubmitJobReply reply;
    grpc::Status s = Submit("", SmallSpec(), &reply);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return reply.job_id();
  }

  std::string dir_;
  boost::asio::io_context loop_{1};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_ =
      boost::asio::make_work_guard(loop_);
  std::thread loop_thread_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<JobService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::JobService::Stub> stub_;
};

TEST_F(JobServiceTest, SubmitJobIsIdempotentAndNamesTheBadField) {
  v1::SubmitJobReply first, again, other;
  ASSERT_TRUE(Submit("req", SmallSpec(), &first).ok());
  EXPECT_TRUE(first.created());
  ASSERT_TRUE(Submit("req", SmallSpec(), &again).ok());
  EXPECT_EQ(again.job_id(), first.job_id());
  EXPECT_FALSE(again.created());
  ASSERT_TRUE(Submit("", SmallSpec(), &other).ok());
  EXPECT_NE(other.job_id(), first.job_id());

  v1::JobSpec bad = SmallSpec();
  bad.mutable_policy()->set_alpha(1.5);
  v1::SubmitJobReply ignored;
  grpc::Status s = Submit("", bad, &ignored);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("policy.alpha"));

  v1::JobSpec unknown = SmallSpec();
  unknown.mutable_train()->GetReflection()->MutableUnknownFields(unknown.mutable_train())
      ->AddVarint(77, 1);
  s = Submit("", unknown, &ignored);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("spec.train: unknown field number 77"));

  v1::JobSpec changed = SmallSpec();
  changed.mutable_model()->set_layers(3);
  s = Submit("req", changed, &ignored);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS) << s.error_message();
}

TEST_F(JobServiceTest, UnaryCallsMapTheCoordinatorsStatus) {
  const std::string id = SubmitOk();

  v1::GetJobRequest get;
  get.set_job_id(id);
  v1::GetJobReply job;
  ASSERT_TRUE(stub_->GetJob(Context().get(), get, &job).ok());
  EXPECT_EQ(job.job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job.job().spec().model().layers(), 2);

  get.set_job_id("job-000999");
  grpc::Status s = stub_->GetJob(Context().get(), get, &job);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("job-000999"));

  v1::CancelJobRequest cancel;
  cancel.set_job_id(id);
  cancel.set_reason("because");
  v1::CancelJobReply cancelled;
  ASSERT_TRUE(stub_->CancelJob(Context().get(), cancel, &cancelled).ok());
  EXPECT_EQ(cancelled.state(), v1::JOB_STATE_CANCELLED);
  s = stub_->CancelJob(Context().get(), cancel, &cancelled);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  v1::ListJobsRequest list;
  v1::ListJobsReply jobs;
  ASSERT_TRUE(stub_->ListJobs(Context().get(), list, &jobs).ok());
  ASSERT_EQ(jobs.jobs_size(), 1);
  EXPECT_EQ(jobs.jobs(0).state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(jobs.jobs(0).error_message(), "because");
  list.set_page_token("not-a-token");
  s = stub_->ListJobs(Context().get(), list, &jobs);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  ASSERT_TRUE(OnLoop([&] { return coordinator_->store().AppendLambdas(id, 20, {1.5, 2.5}); }).ok());
  v1::GetSpectraRequest spectra;
  spectra.set_job_id(id);
  v1::GetSpectraReply points;
  ASSERT_TRUE(stub_->GetSpectra(Context().get(), spectra, &points).ok());
  ASSERT_EQ(points.points_size(), 1);
  EXPECT_EQ(points.points(0).step(), 20);
  EXPECT_THAT(points.points(0).lambda_max(), ::testing::ElementsAre(1.5, 2.5));
  spectra.set_job_id("job-000998");
  EXPECT_EQ(stub_->GetSpectra(Context().get(), spectra, &points).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(JobServiceTest, ListWorkersListsRegisteredWorkersById) {
  v1::ListWorkersReply workers;
  ASSERT_TRUE(stub_->ListWorkers(Context().get(), v1::ListWorkersRequest(), &workers).ok());
  EXPECT_EQ(workers.workers_size(), 0);

  for (int port : {29501, 29500}) {
    v1::RegisterRequest request;
    request.mutable_capabilities()->set_device("cpu");
    request.mutable_capabilities()->set_host("127.0.0.1");
    request.mutable_capabilities()->set_rendezvous_port(port);
    ASSERT_TRUE(OnLoop([&] { return coordinator_->RegisterWorker(request, tests::TestWorkerSecret(port)); }).ok());
  }
  ASSERT_TRUE(stub_->ListWorkers(Context().get(), v1::ListWorkersRequest(), &workers).ok());
  ASSERT_EQ(workers.workers_size(), 2);
  EXPECT_LT(workers.workers(0).worker_id(), workers.workers(1).worker_id());
  EXPECT_EQ(workers.workers(0).state(), v1::WORKER_STATE_DISCONNECTED);  // no session yet
  EXPECT_EQ(workers.workers(0).capabilities().rendezvous_port(), 29501);
}

TEST_F(JobServiceTest, ConcurrentSubmissionsFromManyThreadsAllLand) {
  constexpr int kThreads = 6;
  constexpr int kPerThread = 15;
  std::vector<std::thread> threads;
  std::vector<std::vector<std::string>> ids(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        v1::SubmitJobReply reply;
        // Every other call repeats the previous request id: idempotency under concurrency.
        const std::string request_id = "t" + std::to_string(t) + "-" + std::to_string(i / 2);
        if (Submit(request_id, SmallSpec(), &reply).ok()) ids[t].push_back(reply.job_id());
      }
    });
  }
  for (auto& thread : threads) thread.join();
  std::set<std::string> distinct;
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_EQ(ids[t].size(), static_cast<size_t>(kPerThread));
    distinct.insert(ids[t].begin(), ids[t].end());
  }
  EXPECT_EQ(distinct.size(), static_cast<size_t>(kThreads * ((kPerThread + 1) / 2)));
}

TEST_F(JobServiceTest, WatchJobStreamsCurrentStateThenEventsAndEndsOkOnTerminalState) {
  const std::string id = SubmitOk();
  grpc::ClientContext context;
  v1::WatchJobRequest request;
  request.set_job_id(id);
  auto reader = stub_->WatchJob(&context, request);

  v1::JobEvent event;
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.job_id(), id);
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_QUEUED);
  ASSERT_TRUE(WaitForWatchers(id, 1));

  ASSERT_TRUE(
      OnLoop([&] { return coordinator_->UpdateJobState(id, v1::JOB_STATE_RUNNING); }).ok());
  OnLoop([&] {
    for (int step = 1; step <= 50; ++step) {  // a burst: queued behind the write in flight
      v1::JobEvent progress;
      progress.set_job_id(id);
      progress.set_step(step);
      progress.mutable_progress()->set_train_loss(10.0 - step * 0.1);
      coordinator_->PublishJobEvent(progress);
    }
    return 0;
  });
  JobProgressUpdate last;
  last.step = 50;
  last.train_loss = 5.0;
  ASSERT_TRUE(OnLoop([&] { return coordinator_->store().UpdateJobProgress(id, last); }).ok());
  ASSERT_TRUE(OnLoop([&] { return coordinator_->UpdateJobState(id, v1::JOB_STATE_SUCCEEDED); })
                  .ok());

  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_RUNNING);
  for (int step = 1; step <= 50; ++step) {
    ASSERT_TRUE(reader->Read(&event));
    ASSERT_TRUE(event.has_progress());
    EXPECT_EQ(event.step(), step) << "events out of order";
  }
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(event.step(), 50) << "a state event carries the job's latest step (matctl watch)";
  EXPECT_FALSE(reader->Read(&event)) << "the stream must end after the terminal state";
  grpc::Status s = reader->Finish();
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(WaitForWatchers(id, 0));
}

TEST_F(JobServiceTest, WatchJobOfUnknownJobEndsNotFound) {
  grpc::ClientContext context;
  v1::WatchJobRequest request;
  request.set_job_id("job-000555");
  auto reader = stub_->WatchJob(&context, request);
  v1::JobEvent event;
  EXPECT_FALSE(reader->Read(&event));
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("job-000555"));
}

TEST_F(JobServiceTest, WatchJobOfFinishedJobSendsItsStateAndEndsOk) {
  const std::string id = SubmitOk();
  ASSERT_TRUE(OnLoop([&] { return coordinator_->CancelJob(id, "done"); }).ok());
  grpc::ClientContext context;
  v1::WatchJobRequest request;
  request.set_job_id(id);
  auto reader = stub_->WatchJob(&context, request);
  v1::JobEvent event;
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_CANCELLED);
  EXPECT_FALSE(reader->Read(&event));
  EXPECT_TRUE(reader->Finish().ok());
}

TEST_F(JobServiceTest, ClientCancellingAWatchRemovesItsSubscription) {
  const std::string id = SubmitOk();
  grpc::ClientContext context;
  v1::WatchJobRequest request;
  request.set_job_id(id);
  auto reader = stub_->WatchJob(&context, request);
  v1::JobEvent event;
  ASSERT_TRUE(reader->Read(&event));
  ASSERT_TRUE(WaitForWatchers(id, 1));

  context.TryCancel();
  EXPECT_FALSE(reader->Read(&event));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitForWatchers(id, 0)) << "a cancelled watch left its subscription behind";

  // The job itself is untouched and later events go nowhere.
  ASSERT_TRUE(
      OnLoop([&] { return coordinator_->UpdateJobState(id, v1::JOB_STATE_RUNNING); }).ok());
}

TEST_F(JobServiceTest, ServerShutdownEndsOpenWatchesAndReturnsPromptly) {
  const std::string id = SubmitOk();
  constexpr int kWatchers = 3;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::JobEvent>>> readers;
  for (int i = 0; i < kWatchers; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    v1::WatchJobRequest request;
    request.set_job_id(id);
    readers.push_back(stub_->WatchJob(contexts.back().get(), request));
    v1::JobEvent event;
    ASSERT_TRUE(readers.back()->Read(&event));
  }
  ASSERT_TRUE(WaitForWatchers(id, kWatchers));

  const auto start = std::chrono::steady_clock::now();
  ShutdownServer();  // 2 s grace, then the open streams are cancelled
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
  for (auto& reader : readers) {
    v1::JobEvent event;
    EXPECT_FALSE(reader->Read(&event));
    EXPECT_FALSE(reader->Finish().ok());
  }
  EXPECT_TRUE(WaitForWatchers(id, 0));
}

// A service whose watchers may queue only a few events.
class JobServiceSlowWatcherTest : public JobServiceTest {
 protected:
  JobServiceOptions ServiceOptions() const override {
    JobServiceOptions options;
    options.max_queued_watch_events = 4;
    return options;
  }
};

TEST_F(JobServiceSlowWatcherTest, ABurstBeyondTheQueueDropsProgressButNeverStatesOrEvaluations) {
  const std::string id = SubmitOk();
  grpc::ClientContext context;
  v1::WatchJobRequest request;
  request.set_job_id(id);
  auto reader = stub_->WatchJob(&context, request);
  v1::JobEvent event;
  ASSERT_TRUE(reader->Read(&event));
  ASSERT_TRUE(WaitForWatchers(id, 1));

  OnLoop([&] {  // one loop turn: OnWriteDone waits behind it, so nothing drains the queue
    EXPECT_TRUE(coordinator_->UpdateJobState(id, v1::JOB_STATE_RUNNING).ok());
    for (int step = 1; step <= 50; ++step) {
      v1::JobEvent progress;
      progress.set_job_id(id);
      progress.set_step(step);
      progress.mutable_progress();
      coordinator_->PublishJobEvent(progress);
      if (step % 10 == 0) {  // five evaluations, all after the queue is full
        v1::JobEvent evaluation;
        evaluation.set_job_id(id);
        evaluation.set_step(step);
        evaluation.mutable_evaluation()->set_val_loss(7.0 - step / 10);
        coordinator_->PublishJobEvent(evaluation);
      }
    }
    for (int step = 51; step <= 80; ++step) {  // evaluations are bounded too (4 x 4 queued)
      v1::JobEvent evaluation;
      evaluation.set_job_id(id);
      evaluation.set_step(step);
      evaluation.mutable_evaluation()->set_val_loss(1.0);
      coordinator_->PublishJobEvent(evaluation);
    }
    EXPECT_TRUE(coordinator_->UpdateJobState(id, v1::JOB_STATE_SUCCEEDED).ok());
    return 0;
  });

  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_RUNNING);
  int progress_events = 0;
  int64_t last_step = 0;
  std::vector<int64_t> evaluated;
  while (reader->Read(&event) && !event.has_state()) {
    EXPECT_GE(event.step(), last_step) << "events out of order";
    last_step = event.step();
    if (event.has_evaluation()) evaluated.push_back(event.step());
    if (event.has_progress()) ++progress_events;
  }
  EXPECT_GE(progress_events, 1);
  EXPECT_LE(progress_events, 4) << "the queue bound was not applied";
  ASSERT_GE(evaluated.size(), 5u);
  EXPECT_EQ(std::vector<int64_t>(evaluated.begin(), evaluated.begin() + 5),
            (std::vector<int64_t>{10, 20, 30, 40, 50}))
      << "an evaluation was dropped while progress events could make room";
  EXPECT_LE(evaluated.size(), 16u) << "the evaluations' bound was not applied";
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_SUCCEEDED) << "the terminal state was dropped";
  EXPECT_FALSE(reader->Read(&event));
  EXPECT_TRUE(reader->Finish().ok());
}

}  // namespace
}  // namespace mat::coordinator

namespace mat::coordinator {
namespace {

// Admission limits (issue 6): data roots, spec size, model size, jobs per client.
class JobServiceLimitsTest : public JobServiceTest {
 protected:
  CoordinatorOptions CoordinatorOpts() const override {
    CoordinatorOptions options;
    options.spec_limits.data_roots = {"/srv/mat-data"};
    options.spec_limits.max_spec_bytes = 1024;
    options.spec_limits.max_model_params = 5e6;
    options.max_jobs_per_client = 2;
    return options;
  }

  static v1::JobSpec SpecIn(const std::string& dir) {
    v1::JobSpec spec = SmallSpec();
    spec.mutable_model()->set_d_model(64);
    spec.mutable_model()->set_heads(4);
    spec.mutable_model()->set_d_ff(128);
    spec.mutable_data()->set_dir(dir);
    return spec;
  }
};

TEST_F(JobServiceLimitsTest, DataDirMustBeUnderARoot) {
  v1::SubmitJobReply reply;
  grpc::Status s = Submit("", SpecIn("/srv/mat-data/wikitext-2"), &reply);
  EXPECT_TRUE(s.ok()) << s.error_message();
  for (const std::string dir : {"/etc", "/srv/mat-data/../../etc", "/srv/mat-data-2",
                                "../shared/data/wikitext-2"}) {
    s = Submit("", SpecIn(dir), &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << dir;
    EXPECT_THAT(s.error_message(), HasSubstr("data.dir: '" + dir + "'"));
    EXPECT_THAT(s.error_message(), HasSubstr("/srv/mat-data"));
  }
  // The default data.dir is relative: refused once roots are set.
  v1::JobSpec no_dir = SpecIn("");
  no_dir.mutable_data()->clear_dir();
  s = Submit("", no_dir, &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("relative path"));
}

TEST_F(JobServiceLimitsTest, SpecAndModelSizeAreLimited) {
  v1::SubmitJobReply reply;
  v1::JobSpec big = SpecIn("/srv/mat-data/" + std::string(2000, 'x'));
  grpc::Status s = Submit("", big, &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("the limit is 1024 (--max-spec-bytes)"));

  v1::JobSpec wide = SpecIn("/srv/mat-data/w");
  wide.mutable_model()->set_d_model(1024);
  wide.mutable_model()->set_d_ff(4096);
  s = Submit("", wide, &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("(--max-model-params)"));
  EXPECT_THAT(s.error_message(), HasSubstr("d_model 1024"));
}

TEST_F(JobServiceLimitsTest, ActiveJobsPerClientAreLimited) {
  v1::SubmitJobReply first, second, third;
  ASSERT_TRUE(Submit("r1", SpecIn("/srv/mat-data/a"), &first).ok());
  ASSERT_TRUE(Submit("r2", SpecIn("/srv/mat-data/a"), &second).ok());
  grpc::Status s = Submit("r3", SpecIn("/srv/mat-data/a"), &third);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("has 2 active jobs"));
  EXPECT_THAT(s.error_message(), HasSubstr("the limit is 2 (--max-jobs-per-client)"));
  // A retry of an accepted job still answers; a cancelled job frees its slot.
  v1::SubmitJobReply again;
  ASSERT_TRUE(Submit("r1", SpecIn("/srv/mat-data/a"), &again).ok());
  EXPECT_EQ(again.job_id(), first.job_id());
  ASSERT_TRUE(OnLoop([&] { return coordinator_->CancelJob(first.job_id(), "").status(); }).ok());
  EXPECT_TRUE(Submit("r3", SpecIn("/srv/mat-data/a"), &third).ok());
}

// With bearer tokens, each token is its own client, stored by a hash, never the token.
class JobServiceTokenLimitsTest : public JobServiceLimitsTest {
 protected:
  JobServiceOptions ServiceOptions() const override {
    JobServiceOptions options;
    options.bearer_tokens = &tokens_;
    return options;
  }
  grpc::Status SubmitAs(const std::string& token, v1::SubmitJobReply* reply) {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + token);
    v1::SubmitJobRequest request;
    *request.mutable_spec() = SpecIn("/srv/mat-data/a");
    return stub_->SubmitJob(&context, request, reply);
  }
  TokenSet tokens_ = *TokenSet::Parse("alice-secret\nbob-secret\n", "test");
};

TEST_F(JobServiceTokenLimitsTest, EachTokenIsOneClient) {
  v1::SubmitJobReply reply;
  ASSERT_TRUE(SubmitAs("alice-secret", &reply).ok());
  ASSERT_TRUE(SubmitAs("alice-secret", &reply).ok());
  grpc::Status s = SubmitAs("alice-secret", &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("client 'token:"));
  EXPECT_THAT(s.error_message(), ::testing::Not(HasSubstr("alice-secret")));
  EXPECT_TRUE(SubmitAs("bob-secret", &reply).ok());
}

TEST_F(JobServiceTokenLimitsTest, WithoutAdminTokensEveryTokenReadsAndListsEveryJob) {
  v1::SubmitJobReply alices;
  ASSERT_TRUE(SubmitAs("alice-secret", &alices).ok());
  grpc::ClientContext get_context;
  get_context.AddMetadata("authorization", "Bearer bob-secret");
  v1::GetJobRequest get;
  get.set_job_id(alices.job_id());
  v1::GetJobReply job;
  EXPECT_TRUE(stub_->GetJob(&get_context, get, &job).ok());
  grpc::ClientContext list_context;
  list_context.AddMetadata("authorization", "Bearer bob-secret");
  v1::ListJobsReply list;
  ASSERT_TRUE(stub_->ListJobs(&list_context, {}, &list).ok());
  EXPECT_EQ(list.jobs_size(), 1);
}

// With admin tokens (roles), a job is its submitter's: another client reads, lists and cancels
// none of it; an admin token reads every job.
class JobServiceRolesTest : public JobServiceTest {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    auto artifacts = ArtifactStore::Open(tmp_.path() + "/artifacts", 0);
    ASSERT_TRUE(artifacts.ok()) << artifacts.status();
    artifacts_ = std::move(*artifacts);
    JobServiceTest::SetUp();
  }
  void TearDown() override {
    JobServiceTest::TearDown();
    artifacts_.reset();
  }
  JobServiceOptions ServiceOptions() const override {
    JobServiceOptions options;
    options.bearer_tokens = &tokens_;
    options.admin_tokens = &admins_;
    options.artifacts = artifacts_.get();
    return options;
  }
  static std::unique_ptr<grpc::ClientContext> As(const std::string& token) {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + 10s);
    context->AddMetadata("authorization", "Bearer " + token);
    return context;
  }
  std::string SubmitAs(const std::string& token) {
    v1::SubmitJobRequest request;
    *request.mutable_spec() = SmallSpec();
    v1::SubmitJobReply reply;
    const grpc::Status s = stub_->SubmitJob(As(token).get(), request, &reply);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return reply.job_id();
  }
  // Every reading call and CancelJob on `job_id` as `token`, by name.
  std::map<std::string, grpc::Status> ReadAll(const std::string& token, const std::string& job_id) {
    std::map<std::string, grpc::Status> calls;
    v1::GetJobRequest get;
    get.set_job_id(job_id);
    v1::GetJobReply job;
    calls["GetJob"] = stub_->GetJob(As(token).get(), get, &job);
    v1::GetSpectraRequest spectra_request;
    spectra_request.set_job_id(job_id);
    v1::GetSpectraReply spectra;
    calls["GetSpectra"] = stub_->GetSpectra(As(token).get(), spectra_request, &spectra);
    v1::GetJobLogsRequest logs_request;
    logs_request.set_job_id(job_id);
    v1::GetJobLogsReply logs;
    calls["GetJobLogs"] = stub_->GetJobLogs(As(token).get(), logs_request, &logs);
    v1::ListArtifactsRequest list_request;
    list_request.set_job_id(job_id);
    v1::ListArtifactsReply listed;
    calls["ListArtifacts"] = stub_->ListArtifacts(As(token).get(), list_request, &listed);
    v1::ReadArtifactRequest read_request;
    read_request.set_job_id(job_id);
    read_request.set_name("summary.json");
    v1::ReadArtifactReply piece;
    calls["ReadArtifact"] = stub_->ReadArtifact(As(token).get(), read_request, &piece);
    if (calls["ReadArtifact"].ok()) {
      EXPECT_EQ(piece.data(), "{}") << token;
    }
    v1::WatchJobRequest watch_request;
    watch_request.set_job_id(job_id);
    auto watch_context = As(token);
    auto reader = stub_->WatchJob(watch_context.get(), watch_request);
    v1::JobEvent event;
    if (reader->Read(&event)) {
      EXPECT_EQ(event.state().state(), v1::JOB_STATE_QUEUED) << token;
      watch_context->TryCancel();
      while (reader->Read(&event)) {
      }
      reader->Finish().IgnoreError();
      calls["WatchJob"] = grpc::Status::OK;
    } else {
      calls["WatchJob"] = reader->Finish();
    }
    return calls;
  }
  std::vector<std::string> ListAs(const std::string& token, int page_size) {
    std::vector<std::string> ids;
    v1::ListJobsRequest request;
    request.set_page_size(page_size);
    do {
      v1::ListJobsReply page;
      const grpc::Status s = stub_->ListJobs(As(token).get(), request, &page);
      EXPECT_TRUE(s.ok()) << s.error_message();
      if (!s.ok()) break;
      for (const v1::Job& job : page.jobs()) ids.push_back(job.job_id());
      request.set_page_token(page.next_page_token());
    } while (!request.page_token().empty());
    return ids;
  }

  TokenSet tokens_ = *TokenSet::Parse("alice-secret\nbob-secret\nops-secret\n", "test");
  TokenSet admins_ = *TokenSet::Parse("ops-secret\n", "admins");
  std::unique_ptr<ArtifactStore> artifacts_;
};

TEST_F(JobServiceRolesTest, AJobIsItsSubmittersAndAnAdminsOnly) {
  const std::string a1 = SubmitAs("alice-secret");
  const std::string b1 = SubmitAs("bob-secret");
  const std::string a2 = SubmitAs("alice-secret");
  v1::UploadArtifactRequest upload;
  upload.set_job_id(a1);
  upload.set_name("summary.json");
  upload.set_data("{}");
  upload.set_total_bytes(2);
  api::Sha256 sha;
  sha.Add("{}");
  upload.set_sha256(sha.Hex());
  auto uploaded = artifacts_->Upload(upload);
  ASSERT_TRUE(uploaded.ok() && uploaded->complete()) << uploaded.status();

  for (const auto& [call, status] : ReadAll("bob-secret", a1)) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << call;
    EXPECT_THAT(status.error_message(),
                HasSubstr("job " + a1 + " was submitted by another client: only its submitter "
                          "or an admin token (the coordinator's --admin-token-file) may read it"))
        << call;
  }
  v1::CancelJobRequest cancel;
  cancel.set_job_id(a1);
  v1::CancelJobReply cancelled;
  grpc::Status s = stub_->CancelJob(As("bob-secret").get(), cancel, &cancelled);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("may cancel it"));
  // An unknown job is NOT_FOUND, as without roles.
  for (const auto& [call, status] : ReadAll("bob-secret", "job-000099")) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << call;
  }
  for (const std::string token : {"alice-secret", "ops-secret"}) {
    for (const auto& [call, status] : ReadAll(token, a1)) {
      EXPECT_TRUE(status.ok()) << token << " " << call << ": " << status.error_message();
    }
  }
  // Each client lists its own jobs, page by page; an admin lists every job.
  EXPECT_EQ(ListAs("alice-secret", 1), (std::vector<std::string>{a1, a2}));
  EXPECT_EQ(ListAs("bob-secret", 1), (std::vector<std::string>{b1}));
  EXPECT_EQ(ListAs("ops-secret", 0), (std::vector<std::string>{a1, b1, a2}));
  s = stub_->CancelJob(As("alice-secret").get(), cancel, &cancelled);
  EXPECT_TRUE(s.ok()) << s.error_message();

  // Replaying another client's job would read its decisions.
  v1::SubmitJobRequest replay;
  *replay.mutable_spec() = SmallSpec();
  replay.mutable_spec()->mutable_policy()->set_kind("rand");
  replay.mutable_spec()->mutable_policy()->set_rand_schedule_job(b1);
  v1::SubmitJobReply replayed;
  s = stub_->SubmitJob(As("alice-secret").get(), replay, &replayed);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("job " + b1 + " was submitted by another client"));
  EXPECT_THAT(s.error_message(), HasSubstr("may replay it"));
  EXPECT_EQ(ListAs("ops-secret", 0).size(), 3u) << "no job was stored";
  // Her own job passes the owner check (and is refused for what it is: cancelled, not mat).
  replay.mutable_spec()->mutable_policy()->set_rand_schedule_job(a1);
  s = stub_->SubmitJob(As("alice-secret").get(), replay, &replayed);
  EXPECT_NE(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("policy.rand_schedule_job: job " + a1));

  // Deleting: the submitter's (or an admin's), and only once the job finished.
  v1::DeleteJobRequest del;
  del.set_job_id(a1);
  v1::DeleteJobReply deleted;
  s = stub_->DeleteJob(As("bob-secret").get(), del, &deleted);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("may delete it"));
  del.set_job_id(a2);
  s = stub_->DeleteJob(As("alice-secret").get(), del, &deleted);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("is QUEUED: only a finished job"));
  del.set_job_id(a1);
  s = stub_->DeleteJob(As("alice-secret").get(), del, &deleted);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_GE(deleted.artifact_bytes_freed(), 2);  // summary.json and the manifest
  EXPECT_FALSE(fs::exists(tmp_.path() + "/artifacts/" + a1));
  for (const std::string token : {"alice-secret", "ops-secret"}) {
    for (const auto& [call, status] : ReadAll(token, a1)) {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << token << " " << call;
      // An admin's ReadArtifact goes straight to the files, which are gone.
      EXPECT_THAT(status.error_message(),
                  HasSubstr(token == "ops-secret" && call == "ReadArtifact" ? "has no artifact"
                                                                            : "was deleted"))
          << token << " " << call;
    }
  }
  EXPECT_EQ(ListAs("ops-secret", 0), (std::vector<std::string>{b1, a2}));
  // A replay of it names the field and the delete, for its submitter and for another client.
  for (const std::string token : {"alice-secret", "bob-secret"}) {
    s = stub_->SubmitJob(As(token).get(), replay, &replayed);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << token;
    EXPECT_THAT(s.error_message(),
                HasSubstr("policy.rand_schedule_job: job '" + a1 + "' was deleted"))
        << token;
  }
}

TEST(ClientIdentityTest, HashesTokensAndDropsThePeerPort) {
  EXPECT_EQ(ClientIdentity({}, nullptr, "ipv4:127.0.0.1:43210"), "peer:ipv4:127.0.0.1");
  EXPECT_EQ(ClientIdentity({}, nullptr, "ipv6:[::1]:5000"), "peer:ipv6:[::1]");
  EXPECT_EQ(ClientIdentity({}, nullptr, "inproc"), "peer:inproc");
  TokenSet tokens = *TokenSet::Parse("abc\n", "test");
  ClientMetadata metadata;
  const std::string value = "Bearer abc";
  metadata.emplace("authorization", grpc::string_ref(value.data(), value.size()));
  // SHA-256("abc") = ba7816bf8f01cfea...
  EXPECT_EQ(ClientIdentity(metadata, &tokens, "ipv4:10.0.0.1:1"), "token:ba7816bf8f01cfea");
}

}  // namespace
}  // namespace mat::coordinator
