// The fixture of the Coordinator's WorkerService tests (worker_sessions_test.cc and
// worker_sessions_faults_test.cc): a real JobStore in a temporary directory, fake worker channels
// (tests/testing/fake_worker_channel.h) and an injected clock; worker message builders; a valid
// small job spec; the policy a job must follow.
#pragma once

#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "coordinator/coordinator.h"
#include "api/job_spec.h"
#include "policy/policy.h"
#include "google/protobuf/util/message_differencer.h"
#include "config/train_config.h"
#include "tests/coordinator/coordinator_fixture.h"
#include "tests/testing/fake_worker_channel.h"
#include "tests/testing/policy_fixtures.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/worker_secret.h"

namespace mat::coordinator::testing_sessions {


using tests::Lambda;
using tests::Modules;

namespace fs = std::filesystem;
using google::protobuf::util::MessageDifferencer;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

using tests::FakeWorkerChannel;

struct Worker {
  std::string id;
  std::shared_ptr<FakeWorkerChannel> channel;
};

// A valid job: 2 small layers, warm-up off and a probe every 10 steps, so the policy decides
// from the first probe.
inline v1::JobSpec Spec(int workers = 1, const std::string& device = "cpu",
                 const std::string& policy = "mat") {
  v1::JobSpec spec;
  spec.mutable_model()->set_layers(2);
  spec.mutable_train()->set_steps(100);
  spec.mutable_resources()->set_workers(workers);
  spec.mutable_resources()->set_device(device);
  spec.mutable_policy()->set_kind(policy);
  spec.mutable_policy()->set_warmup_steps(0);
  spec.mutable_policy()->set_probe_every(10);
  return spec;
}


// Module i is bit (i % 8) of byte (i / 8), LSB first (the proto's rule, decoded independently of
// PackModuleBits).
inline std::vector<uint8_t> Unpack(const std::string& bytes, int n) {
  std::vector<uint8_t> out(n);
  for (int i = 0; i < n; ++i) out[i] = (static_cast<uint8_t>(bytes[i / 8]) >> (i % 8)) & 1;
  return out;
}

// The policy a job with `spec` and Modules() must follow, made the way the service documents.
inline std::unique_ptr<policy::Policy> LocalPolicy(const v1::JobSpec& spec) {
  auto config = config::ParseTrainConfig(api::JobSpecToTrainerYaml(api::WithJobSpecDefaults(spec)), "t");
  EXPECT_TRUE(config.ok()) << config.status();
  auto created = policy::Policy::Create(config::ToPolicyConfig(*config), Modules());
  EXPECT_TRUE(created.ok()) << created.status();
  return std::move(*created);
}

// ----- worker messages -----

inline v1::WorkerMessage Heartbeat(const std::string& worker, std::vector<std::string> jobs = {}) {
  v1::WorkerMessage m;
  m.set_worker_id(worker);
  m.mutable_heartbeat()->set_sent_time_unix_ms(1);
  for (const std::string& j : jobs) m.mutable_heartbeat()->add_job_ids(j);
  return m;
}

inline v1::WorkerMessage ModuleList(const std::string& worker, const std::string& job,
                             const std::vector<policy::ModuleInfo>& modules = Modules()) {
  v1::WorkerMessage m;
  m.set_worker_id(worker);
  m.mutable_modules()->set_job_id(job);
  for (const policy::ModuleInfo& info : modules) {
    v1::ModuleDescriptor* d = m.mutable_modules()->add_modules();
    d->set_name(info.name);
    d->set_group(info.group);
    d->set_layer(info.layer);
    d->set_index(info.index);
  }
  return m;
}

inline v1::WorkerMessage Spectra(const std::string& worker, const std::string& job, int rank,
                          int64_t step, const std::vector<double>& lambda) {
  v1::WorkerMessage m;
  m.set_worker_id(worker);
  v1::SpectraReport* r = m.mutable_spectra();
  r->set_job_id(job);
  r->set_rank(rank);
  r->set_step(step);
  r->mutable_lambda_max()->Add(lambda.begin(), lambda.end());
  return m;
}

inline v1::WorkerMessage Ack(const std::string& worker, const std::string& job, int rank,
                      int64_t version) {
  v1::WorkerMessage m;
  m.set_worker_id(worker);
  m.mutable_mask_ack()->set_job_id(job);
  m.mutable_mask_ack()->set_rank(rank);
  m.mutable_mask_ack()->set_mask_version(version);
  return m;
}

inline v1::WorkerMessage Progress(const std::string& worker, const std::string& job, int rank,
                           int64_t step, double train_loss, double flops, double wall,
                           std::optional<double> val_loss = std::nullopt) {
  v1::WorkerMessage m;
  m.set_worker_id(worker);
  v1::Progress* p = m.mutable_progress();
  p->set_job_id(job);
  p->set_rank(rank);
  p->set_step(step);
  p->set_train_loss(train_loss);
  p->set_flops_total(flops);
  p->set_wall_seconds(wall);
  p->set_active_modules(7);
  if (val_loss) p->set_val_loss(*val_loss);
  return m;
}

// An ok RankDone must carry a checksum (the default); a failed one's is not stored.
inline v1::WorkerMessage Done(const std::string& worker, const std::string& job, int rank, bool ok,
                       const std::string& checksum = "abc", const std::string& summary = "",
                       const std::string& error = "") {
  v1::WorkerMessage m;
  m.set_worker_id(worker);
  v1::RankDone* d = m.mutable_done();
  d->set_job_id(job);
  d->set_rank(rank);
  d->set_ok(ok);
  d->set_param_checksum(checksum);
  d->set_summary_json(summary);
  d->set_error_message(error);
  d->set_step(100);
  return m;
}

// The RankDone of a rank whose process group failed (a peer was lost): ok = false, retryable.
inline v1::WorkerMessage CollectiveFailed(const std::string& worker, const std::string& job,
                                          int rank, const std::string& checksum = "") {
  v1::WorkerMessage m = Done(worker, job, rank, false, checksum, "", "gradient all-reduce failed");
  m.mutable_done()->set_retryable(true);
  return m;
}

// One log line of a rank (attempt 0; Attempt() sets another).
inline v1::WorkerMessage Logs(const std::string& worker, const std::string& job, int rank,
                              const std::string& text, const std::string& level = "info") {
  v1::WorkerMessage m;
  m.set_worker_id(worker);
  v1::LogBatch* batch = m.mutable_logs();
  batch->set_job_id(job);
  batch->set_rank(rank);
  v1::LogLine* line = batch->add_lines();
  line->set_level(level);
  line->set_text(text);
  return m;
}

// `m` (a job message) as sent by a rank of `attempt`.
inline v1::WorkerMessage Attempt(v1::WorkerMessage m, int64_t attempt) {
  switch (m.body_case()) {
    case v1::WorkerMessage::kProgress: m.mutable_progress()->set_attempt(attempt); break;
    case v1::WorkerMessage::kSpectra: m.mutable_spectra()->set_attempt(attempt); break;
    case v1::WorkerMessage::kMaskAck: m.mutable_mask_ack()->set_attempt(attempt); break;
    case v1::WorkerMessage::kModules: m.mutable_modules()->set_attempt(attempt); break;
    case v1::WorkerMessage::kDone: m.mutable_done()->set_attempt(attempt); break;
    case v1::WorkerMessage::kLogs: m.mutable_logs()->set_attempt(attempt); break;
    default: break;
  }
  return m;
}


class WorkerSessionsTest : public CoordinatorFixture {
 protected:
  WorkerSessionsTest() : CoordinatorFixture("mat_worker_sessions") {}
  // The Coordinator goes before metrics_, which it points into.
  ~WorkerSessionsTest() override { coordinator_.reset(); }

  // On the fake clocks; heartbeats every second; metrics when EnableMetrics made them.
  CoordinatorOptions Options() override {
    CoordinatorOptions options;
    options.now_unix_seconds = [this] { return now_; };
    options.now_ms = [this] { return now_ms_; };
    options.heartbeat_interval_ms = 1000;
    options.metrics = metrics_.get();
    options.metrics_retention_seconds = 60;
    options.max_restarts = max_restarts_;
    return options;
  }

  // Reopens the Coordinator with metrics (retention 60 s).
  void EnableMetrics() {
    coordinator_.reset();
    metrics_ = std::make_unique<CoordinatorMetrics>();
    Open();
  }

  std::string Register(const std::string& device, const std::string& host, int port,
                       const std::string& id = "") {
    v1::RegisterRequest request;
    request.set_worker_id(id);
    request.mutable_capabilities()->set_device(device);
    request.mutable_capabilities()->set_host(host);
    request.mutable_capabilities()->set_rendezvous_port(port);
    request.mutable_capabilities()->set_memory_bytes(int64_t{1} << 30);
    // With the worker's secret, as mat-worker sends it (the adapter reads it from the call's
    // metadata): a new one for a new worker.
    auto known = secrets_.find(id);
    const std::string secret = known != secrets_.end()
                                   ? known->second
                                   : tests::TestWorkerSecret(secrets_.size() + 1);
    auto reply = coordinator_->RegisterWorker(request, secret);
    EXPECT_TRUE(reply.ok()) << reply.status();
    if (!reply.ok()) return "";
    secrets_[reply->worker_id()] = secret;
    return reply->worker_id();
  }

  std::shared_ptr<FakeWorkerChannel> Connect(const std::string& id) {
    auto channel = std::make_shared<FakeWorkerChannel>();
    absl::Status st = coordinator_->OpenSession(Heartbeat(id), channel);
    EXPECT_TRUE(st.ok()) << st;
    return channel;
  }

  // Registers a worker on host "host-N", port 29500 + N (N counts from 1), and opens its
  // session.
  Worker AddWorker(const std::string& device = "cpu") {
    ++workers_added_;
    const std::string id = Register(device, "host-" + std::to_string(workers_added_),
                                    29500 + workers_added_);
    return Worker{id, Connect(id)};
  }

  std::string Submit(const v1::JobSpec& spec) {
    auto reply = coordinator_->SubmitJob("", spec);
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? reply->job_id() : "";
  }

  v1::GetJobReply GetJob(const std::string& id) {
    auto reply = coordinator_->GetJob(id);
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? *reply : v1::GetJobReply();
  }
  v1::JobState StateOf(const std::string& id) { return GetJob(id).job().state(); }

  absl::Status Send(const v1::WorkerMessage& m) { return coordinator_->HandleWorkerMessage(m); }
  void SendOk(const v1::WorkerMessage& m) {
    absl::Status st = Send(m);
    EXPECT_TRUE(st.ok()) << st;
  }
  // Both ranks' λ of probe k: step 10·k, Lambda(rank, k).
  void SendProbe(const Worker& w0, const Worker& w1, const std::string& job, int k) {
    SendOk(Spectra(w0.id, job, 0, 10 * k, Lambda(0, k)));
    SendOk(Spectra(w1.id, job, 1, 10 * k, Lambda(1, k)));
  }

  // Records every event of `job` into `out`.
  void Watch(const std::string& job, std::vector<v1::JobEvent>* out) {
    auto id = coordinator_->WatchJob(
        job, [out](const v1::JobEvent& e, bool) { out->push_back(e); });
    ASSERT_TRUE(id.ok()) << id.status();
  }

  v1::WorkerInfo WorkerInfoOf(const std::string& id) {
    auto reply = coordinator_->ListWorkers();
    EXPECT_TRUE(reply.ok()) << reply.status();
    for (const v1::WorkerInfo& w : reply->workers()) {
      if (w.worker_id() == id) return w;
    }
    ADD_FAILURE() << "worker " << id << " not listed";
    return v1::WorkerInfo();
  }

  // A RUNNING 2-rank job on two new workers, with its modules declared by rank 0.
  std::string StartTwoRankJob(Worker* w0, Worker* w1, const v1::JobSpec& spec = Spec(2)) {
    *w0 = AddWorker();
    *w1 = AddWorker();
    const std::string job = Submit(spec);
    EXPECT_EQ(StateOf(job), v1::JOB_STATE_RUNNING);
    SendOk(ModuleList(w0->id, job));
    return job;
  }

  // A two-rank job whose rank 0 finished (checksum "abc") and whose rank 1's end, with
  // `rank1_checksum`, the previous process stored before it died, before the job's end; then a
  // coordinator restart (Open).
  std::string FinishBothRanksThenRestart(Worker* w0, Worker* w1,
                                         const std::string& rank1_checksum) {
    const std::string job = StartTwoRankJob(w0, w1);
    SendOk(Done(w0->id, job, 0, true, "abc", R"({"steps":100})"));
    EXPECT_TRUE(coordinator_->store().UpdateRankStatus(job, 1, 100, 0, 0, rank1_checksum).ok());
    Open();
    return job;
  }

  int64_t now_ms_ = 5'000'000;
  int workers_added_ = 0;
  std::map<std::string, std::string> secrets_;  // each worker's secret, by id (Register)
  int64_t max_restarts_ = 10;
  std::unique_ptr<CoordinatorMetrics> metrics_;  // outlives coordinator_ (see the destructor)
};

}  // namespace mat::coordinator::testing_sessions
