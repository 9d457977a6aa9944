#include "worker/worker_agent.h"

#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <thread>

#include <torch/cuda.h>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "api/artifacts.h"
#include "api/credentials.h"
#include "api/grpc_status.h"
#include "common/file_util.h"
#include "common/net_util.h"
#include "common/status.h"
#include "metrics/http_server.h"
#include "spdlog/spdlog.h"

namespace mat::worker {
namespace {

int64_t PhysicalMemoryBytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), size = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && size > 0 ? int64_t(pages) * int64_t(size) : 0;
}

bool ValidDevice(const std::string& d) {
  if (d == "cpu") return true;
  if (d.rfind("cuda:", 0) != 0 || d.size() == 5) return false;
  return d.find_first_not_of("0123456789", 5) == std::string::npos;
}

}  // namespace

absl::StatusOr<std::unique_ptr<WorkerAgent>> WorkerAgent::Create(WorkerAgentConfig config) {
  if (absl::Status st = common::ParseHostPort(config.coordinator_address, /*min_port=*/1).status();
      !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--coordinator: ", st.message()));
  }
  if (!ValidDevice(config.device)) {
    return absl::InvalidArgumentError("--device '" + config.device +
                                      "' is not cpu or cuda:N");
  }
  if (config.device != "cpu") {
    // Otherwise the worker registers IDLE and fails every CUDA job it is given, at its start.
    int index = 0;
    const int count = static_cast<int>(torch::cuda::device_count());
    if (!absl::SimpleAtoi(config.device.substr(5), &index) || index >= count) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--device ", config.device, ": this machine has ", count, " CUDA device",
          count == 1 ? "" : "s", " LibTorch can use",
          count == 0 ? " (no GPU or driver, or a CPU-only LibTorch)" : ""));
    }
  }
  if (config.host.empty()) return absl::InvalidArgumentError("--host is empty");
  if (config.rendezvous_port < 0 || config.rendezvous_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--rendezvous-port ", config.rendezvous_port, " is not in 0..65535"));
  }
  if (config.threads < 0 || config.threads > 1024) {
    // The trainer's bound (train.threads): above it every job would fail at its start.
    return absl::InvalidArgumentError(
        absl::StrCat("--threads ", config.threads, " is not in 0..1024"));
  }
  if (config.artifact_piece_bytes < 1 || config.artifact_piece_bytes > (4 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--artifact-piece-bytes ", config.artifact_piece_bytes, " is not in 1..4194304"));
  }
  MAT_RETURN_IF_ERROR(common::MakeDirs(config.work_dir));
  if (!config.checkpoint_dir.empty()) {
    // Otherwise the worker registers IDLE and fails every job it gets, at its first checkpoint.
    absl::Status st = common::MakeDirs(config.checkpoint_dir);
    if (st.ok()) st = common::CheckWritableDir(config.checkpoint_dir);
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat("--checkpoint-dir: ", st.message()));
    }
  }
  if (config.rendezvous_port == 0) {
    MAT_ASSIGN_OR_RETURN(config.rendezvous_port, common::PickFreePort(/*loopback_only=*/false));
  }
  if (config.memory_bytes <= 0) config.memory_bytes = PhysicalMemoryBytes();
  if (!config.metrics_listen_address.empty()) {
    if (absl::Status st = common::ParseHostPort(config.metrics_listen_address).status(); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--metrics-listen: ", st.message()));
    }
  }
  std::string join_token;
  if (!config.join_token_file.empty()) {
    absl::StatusOr<std::string> token = api::ReadFirstToken(config.join_token_file);
    if (!token.ok()) {
      return absl::Status(token.status().code(),
                          absl::StrCat("--join-token-file: ", token.status().message()));
    }
    join_token = *std::move(token);
  }
  MAT_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                       api::MakeChannelCredentials(api::TlsFiles{
                           config.tls_ca_file, config.tls_cert_file, config.tls_key_file}));
  // Two workers on one work dir would share worker.id (the second looped on "already has an
  // open session") and each other's checkpoints.
  absl::StatusOr<int> lock = common::LockDirectory(config.work_dir, "mat-worker");
  if (!lock.ok()) {
    return absl::Status(lock.status().code(), absl::StrCat("--work-dir ", lock.status().message()));
  }
  std::unique_ptr<WorkerAgent> agent(
      new WorkerAgent(std::move(config), std::move(credentials), std::move(join_token)));
  agent->lock_fd_ = *lock;  // released by the destructor
  MAT_ASSIGN_OR_RETURN(agent->worker_secret_, LoadOrMakeSecret(agent->config_.work_dir));
  const std::string addr_file = MetricsAddressFilePath(agent->config_.work_dir);
  std::remove(addr_file.c_str());
  if (!agent->config_.metrics_listen_address.empty()) {
    WorkerAgent* self = agent.get();
    MAT_ASSIGN_OR_RETURN(
        agent->http_,
        metrics::HttpServer::Start(agent->config_.metrics_listen_address,
                                   [self](const std::string& target) {
                                     // The HTTP thread: the registry (its own mutex) and
                                     // an atomic, nothing else.
                                     if (target == "/metrics") {
                                       self->metrics_.process.Update();
                                       return metrics::MetricsResponse(self->metrics_.registry);
                                     }
                                     if (target == "/healthz") {
                                       return metrics::HttpResponse{200, "text/plain", "ok\n"};
                                     }
                                     if (target == "/readyz") {
                                       if (self->connected()) {
                                         return metrics::HttpResponse{200, "text/plain",
                                                                      "ready\n"};
                                       }
                                       return metrics::HttpResponse{
                                           503, "text/plain",
                                           "not connected to the coordinator at " +
                                               self->config_.coordinator_address + "\n"};
                                     }
                                     return metrics::HttpResponse{404, "text/plain",
                                                                  "not found\n"};
                                   }));
    agent->metrics_address_ = agent->http_->address();
    MAT_RETURN_IF_ERROR(common::WriteFileAtomic(addr_file, agent->metrics_address_ + "\n"));
    spdlog::info("metrics listening on {} (/metrics, /healthz, /readyz)", agent->metrics_address_);
  }
  auto saved = common::ReadFile(agent->config_.work_dir + "/worker.id");
  if (saved.ok()) agent->worker_id_ = std::string(absl::StripAsciiWhitespace(*saved));
  return agent;
}

WorkerAgent::WorkerAgent(WorkerAgentConfig config,
                         std::shared_ptr<grpc::ChannelCredentials> credentials,
                         std::string join_token)
    : config_(std::move(config)), join_token_(std::move(join_token)) {
  grpc::ChannelArguments args;
  // A restarted coordinator is found within about a second.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  channel_ = grpc::CreateCustomChannel(config_.coordinator_address, credentials, args);
  stub_ = v1::WorkerService::NewStub(channel_);
}

WorkerAgent::~WorkerAgent() {
  Shutdown();
  ReapRunner(Reap::kShutdown, "worker shutting down");
  if (http_ != nullptr) {
    http_->Stop();
    std::remove(MetricsAddressFilePath(config_.work_dir).c_str());
  }
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

std::string WorkerAgent::MetricsAddressFilePath(const std::string& work_dir) {
  return work_dir + "/worker.metrics.addr";
}

std::string WorkerAgent::SecretFilePath(const std::string& work_dir) {
  return work_dir + "/worker.secret";
}

absl::StatusOr<std::string> WorkerAgent::LoadOrMakeSecret(const std::string& work_dir) {
  const std::string path = SecretFilePath(work_dir);
  absl::StatusOr<std::string> saved = common::ReadFile(path);
  if (saved.ok()) {
    std::string secret(absl::StripAsciiWhitespace(*saved));
    if (!api::CheckSha256Hex(secret).ok()) {
      return absl::DataLossError(absl::StrCat(
          path, " does not hold a worker secret (64 lowercase hex digits): remove it, and ",
          work_dir, "/worker.id with it, to register as a new worker"));
    }
    return secret;
  }
  if (!absl::IsNotFound(saved.status())) return saved.status();
  // 32 bytes of the kernel's CSPRNG, saved before the first Register sends them.
  std::string bytes(32, '\0');
  for (size_t got = 0; got < bytes.size();) {
    const ssize_t n = ::getrandom(bytes.data() + got, bytes.size() - got, 0);
    if (n < 0 && errno != EINTR) return absl::ErrnoToStatus(errno, "getrandom");
    if (n > 0) got += static_cast<size_t>(n);
  }
  std::string secret = absl::BytesToHexString(bytes);
  MAT_RETURN_IF_ERROR(common::WriteFileAtomic(path, secret + "\n", 0600));
  return secret;
}

std::string WorkerAgent::worker_id() const {
  std::lock_guard<std::mutex> lock(mu_);
  return worker_id_;
}

void WorkerAgent::Shutdown(const std::string& why) { Stop(why, /*on_session_thread=*/false); }

void WorkerAgent::Stop(const std::string& why, bool on_session_thread) {
  std::unique_lock<std::mutex> lock(mu_);
  const bool first = !stopping_.exchange(true);
  if (first) leaving_reason_ = why;
  cv_.notify_all();
  if (on_session_thread) return;  // the heartbeat thread says Leaving; the coordinator ends it
  // The heartbeat thread of an open session says Leaving, and the coordinator then ends the
  // session. Cancelling it earlier can drop Leaving in transit (the job then restarts as "lost:
  // session closed"); the cancel below ends a session (or a Write) that a coordinator which does
  // not answer would keep open.
  if (first && stream_ != nullptr && connected_.load()) {
    cv_.wait_for(lock, std::chrono::seconds(2), [&] { return stream_ == nullptr; });
  }
  if (session_context_ != nullptr) session_context_->TryCancel();
}

void WorkerAgent::AddCredentials(grpc::ClientContext& context) const {
  if (!join_token_.empty()) context.AddMetadata(api::kJoinTokenMetadataKey, join_token_);
  context.AddMetadata(api::kWorkerSecretMetadataKey, worker_secret_);
}

bool WorkerAgent::RefusedByCoordinator(const grpc::Status& status, const char* call) {
  if (status.error_code() != grpc::StatusCode::UNAUTHENTICATED &&
      status.error_code() != grpc::StatusCode::PERMISSION_DENIED) {
    return false;
  }
  spdlog::error("the coordinator at {} refused this worker's {} ({}: {}); check "
                "--join-token-file and the work dir's worker.id and worker.secret; stopping",
                config_.coordinator_address, call,
                status.error_code() == grpc::StatusCode::UNAUTHENTICATED ? "UNAUTHENTICATED"
                                                                         : "PERMISSION_DENIED",
                status.error_message());
  {
    std::lock_guard<std::mutex> lock(mu_);
    refused_ = absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                            absl::StrCat("the coordinator refused this worker: ",
                                         status.error_message()));
  }
  Shutdown();
  return true;
}

absl::Status WorkerAgent::Run() {
  // Since when every session was refused because another session holds this worker's id.
  std::optional<std::chrono::steady_clock::time_point> duplicate_since;
  while (!stopping_.load()) {
    if (!RegisterLoop()) break;
    const grpc::Status ended = SessionLoop();
    // A restarted worker's old session is dropped within 3 heartbeat intervals; one that stays
    // is another mat-worker with this id (a copied work dir), and retrying never ends.
    if (ended.error_code() == grpc::StatusCode::FAILED_PRECONDITION &&
        absl::StrContains(ended.error_message(), "already has an open session")) {
      const auto now = std::chrono::steady_clock::now();
      if (!duplicate_since.has_value()) duplicate_since = now;
      if (now - *duplicate_since >= kDuplicateIdFor) {
        const std::string why = absl::StrCat(
            "another mat-worker has been connected as ", worker_id(), " for ",
            std::chrono::duration_cast<std::chrono::seconds>(kDuplicateIdFor).count(),
            " s: a copied work dir? Remove ", config_.work_dir,
            "/worker.id on one of them to give it a new id");
        spdlog::error("{}", why);
        std::lock_guard<std::mutex> lock(mu_);
        refused_ = absl::FailedPreconditionError(why);
        stopping_.store(true);
        break;
      }
    } else {
      duplicate_since.reset();
    }
    // A running rank keeps training: the coordinator keeps the job and the rank is re-attached
    // by the next session's first Heartbeat (or cancelled there when the job is gone).
    if (stopping_.load()) break;
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, config_.reconnect_interval, [&] { return stopping_.load(); });
  }
  ReapRunner(Reap::kShutdown, "worker shutting down");
  spdlog::info("worker {} stopped", worker_id().empty() ? "(never registered)" : worker_id());
  std::lock_guard<std::mutex> lock(mu_);
  return refused_;
}

bool WorkerAgent::RegisterLoop() {
  // The error last logged: a new line when it changes (the coordinator came back serving TLS, say,
  // after "Connection refused"), none while it repeats.
  std::string warned;
  while (!stopping_.load()) {
    v1::RegisterRequest request;
    request.set_worker_id(worker_id());
    v1::WorkerCapabilities* caps = request.mutable_capabilities();
    caps->set_device(config_.device);
    caps->set_memory_bytes(config_.memory_bytes);
    caps->set_host(config_.host);
    caps->set_rendezvous_port(config_.rendezvous_port);
    v1::RegisterReply reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    AddCredentials(context);
    grpc::Status status = stub_->Register(&context, request, &reply);
    if (RefusedByCoordinator(status, "Register")) return false;
    if (status.ok()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        worker_id_ = reply.worker_id();
        heartbeat_interval_ms_ = std::max<int64_t>(10, reply.heartbeat_interval_ms());
      }
      absl::Status saved =
          common::WriteFileAtomic(config_.work_dir + "/worker.id", reply.worker_id() + "\n");
      if (!saved.ok()) spdlog::warn("cannot save the worker id: {}", saved.ToString());
      spdlog::info("registered with {} as {} (device {}, rendezvous {}:{})",
                   config_.coordinator_address, reply.worker_id(), config_.device, config_.host,
                   config_.rendezvous_port);
      return true;
    }
    if (status.error_code() == grpc::StatusCode::FAILED_PRECONDITION &&
        absl::StrContains(status.error_message(), "already has an open session") &&
        !worker_id().empty()) {
      // This id's session is still open: this worker's own, not yet dropped after a restart,
      // or a second mat-worker's with this id. The session attempt tells which (Run: it
      // retries, and gives up after kDuplicateIdFor).
      return true;
    }
    if (status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
      // Retrying cannot help: Run returns the refusal (mat-worker exits non-zero).
      const std::string id = worker_id();
      const std::string why = absl::StrCat(
          "the coordinator refused this worker: ", status.error_message(),
          id.empty() ? ""
                     : absl::StrCat(" (worker id '", id, "' from ", config_.work_dir,
                                    "/worker.id: remove that file to get a new id)"));
      spdlog::error("{}", why);
      {
        std::lock_guard<std::mutex> lock(mu_);
        refused_ = absl::InvalidArgumentError(why);
      }
      stopping_.store(true);
      return false;
    }
    const std::string error = absl::StrCat(
        status.error_message(),
        api::TlsMismatchHint(
            api::TlsFiles{config_.tls_ca_file, config_.tls_cert_file, config_.tls_key_file},
            status.error_message()));
    if (error != warned) {
      spdlog::warn("cannot register with the coordinator at {} ({}); retrying every {} ms",
                   config_.coordinator_address, error, config_.reconnect_interval.count());
      warned = error;
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, config_.reconnect_interval, [&] { return stopping_.load(); });
  }
  return false;
}

v1::WorkerMessage WorkerAgent::Heartbeat() {
  v1::WorkerMessage m;
  m.set_worker_id(worker_id());
  v1::Heartbeat* hb = m.mutable_heartbeat();
  hb->set_sent_time_unix_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count());
  std::lock_guard<std::mutex> lock(mu_);
  if (runner_ != nullptr && !runner_->done()) hb->add_job_ids(runner_->job_id());
  return m;
}

bool WorkerAgent::Send(const v1::WorkerMessage& message) {
  std::lock_guard<std::mutex> write_lock(write_mu_);
  grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>* stream;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stream = stream_;
  }
  if (stream == nullptr) return false;
  return stream->Write(message);
}

grpc::Status WorkerAgent::SessionLoop() {
  grpc::ClientContext context;
  AddCredentials(context);
  auto stream = stub_->Session(&context);
  {
    std::lock_guard<std::mutex> lock(mu_);
    session_context_ = &context;
    stream_ = stream.get();
    if (stopping_.load()) context.TryCancel();
  }
  std::thread heartbeats;
  if (Send(Heartbeat())) {
    connected_.store(true);
    // After the first Heartbeat (which re-attaches a running rank): what the coordinator may
    // have lost with the previous session. Not under mu_ (OnReconnect sends); runner_ changes
    // only on this thread (Dispatch) until the session ends.
    RankRunner* runner;
    {
      std::lock_guard<std::mutex> lock(mu_);
      runner = runner_.get();
    }
    if (runner != nullptr) {
      runner->SetConnected(true);
      runner->OnReconnect();
    }
    heartbeats = std::thread([this, s = stream.get()] { HeartbeatLoop(s); });
    v1::CoordinatorMessage message;
    while (stream->Read(&message)) Dispatch(message);
  }
  connected_.store(false);
  {
    std::lock_guard<std::mutex> write_lock(write_mu_);
    std::lock_guard<std::mutex> lock(mu_);
    stream_ = nullptr;
    if (runner_ != nullptr) runner_->SetConnected(false);
    cv_.notify_all();
  }
  if (heartbeats.joinable()) heartbeats.join();
  grpc::Status status = stream->Finish();
  {
    std::lock_guard<std::mutex> lock(mu_);
    session_context_ = nullptr;
  }
  if (RefusedByCoordinator(status, "Session")) return status;
  if (!stopping_.load()) {
    spdlog::warn("session with the coordinator at {} ended: {}", config_.coordinator_address,
                 api::StatusLine(api::FromGrpcStatus(status)));
  }
  return status;
}

void WorkerAgent::HeartbeatLoop(
    grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>* stream) {
  while (true) {
    std::unique_lock<std::mutex> lock(mu_);
    const auto interval = std::chrono::milliseconds(heartbeat_interval_ms_);
    cv_.wait_for(lock, interval, [&] { return stopping_.load() || stream_ != stream; });
    if (stream_ != stream) return;
    if (stopping_.load()) {
      v1::WorkerMessage leaving;
      leaving.set_worker_id(worker_id_);
      leaving.mutable_leaving()->set_reason(leaving_reason_);
      lock.unlock();
      Send(leaving);
      return;
    }
    lock.unlock();
    Send(Heartbeat());
    // A RankDone the coordinator could not store yet (RankRunner::OnReject): again.
    std::optional<v1::WorkerMessage> done;
    {
      std::lock_guard<std::mutex> runner_lock(mu_);
      if (runner_ != nullptr) done = runner_->TakeRefusedDone();
    }
    if (done.has_value()) Send(*done);
    ExpireEndedJobSeries();
  }
}

void WorkerAgent::ExpireEndedJobSeries() {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  // Earlier jobs' series, kept for their linger after this worker moved on to another job.
  for (auto it = lingering_jobs_.begin(); it != lingering_jobs_.end();) {
    if (now - it->second < config_.metrics_linger) {
      ++it;
      continue;
    }
    metrics_.registry.RemoveSeriesWithLabel("mat_job", it->first);
    it = lingering_jobs_.erase(it);
  }
  if (metrics_job_id_.empty() || runner_ == nullptr || !runner_->done()) {
    rank_ended_at_.reset();
    return;
  }
  if (!rank_ended_at_) rank_ended_at_ = now;
  if (now - *rank_ended_at_ < config_.metrics_linger) return;
  // Under mu_, so that an Assign of the same job (a restart) cannot interleave.
  metrics_.registry.RemoveSeriesWithLabel("mat_job", metrics_job_id_);
  metrics_job_id_.clear();
  rank_ended_at_.reset();
}

void WorkerAgent::ReapRunner(Reap how, const std::string& reason) {
  std::unique_ptr<RankRunner> runner;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (runner_ == nullptr) return;
    runner = std::move(runner_);
  }
  if (how == Reap::kSupersede) runner->AbandonUploads();
  if (how == Reap::kShutdown) runner->LimitUploads(config_.shutdown_upload_timeout);
  runner->Cancel(reason);
  runner->Join();
  metrics_.busy.Set({}, 0);
}

void WorkerAgent::Dispatch(const v1::CoordinatorMessage& message) {
  switch (message.body_case()) {
    case v1::CoordinatorMessage::kAssign: {
      const v1::Assign& a = message.assign();
      // A rank still running here was cancelled by the coordinator (it gives a worker a new
      // rank only once the old one ended or was cancelled): stop it before starting the new one.
      ReapRunner(Reap::kSupersede, "superseded by " + a.job_id());
      spdlog::info("assigned rank {}/{} of {} (attempt {})", a.rank(), a.world_size(), a.job_id(),
                   a.attempt());
      {
        // The previous job's series linger (their final values are still to be scraped) from
        // when its rank here ended, or now; this job's go on (a restart) or start afresh.
        std::lock_guard<std::mutex> lock(mu_);
        if (!metrics_job_id_.empty() && metrics_job_id_ != a.job_id()) {
          lingering_jobs_.emplace(metrics_job_id_,
                                  rank_ended_at_.value_or(std::chrono::steady_clock::now()));
        }
        lingering_jobs_.erase(a.job_id());
        metrics_job_id_ = a.job_id();
        rank_ended_at_.reset();
      }
      metrics_.busy.Set({}, 1);
      RankRunnerOptions o;
      o.metrics = &metrics_;
      o.worker_id = worker_id();
      o.work_dir = config_.work_dir;
      o.checkpoint_dir = config_.checkpoint_dir;
      o.device = config_.device;
      o.local_host = config_.host;
      o.threads = config_.threads;
      o.mask_timeout = config_.mask_timeout;
      o.max_mask_staleness_steps = config_.max_mask_staleness_steps;
      o.rendezvous_timeout = config_.rendezvous_timeout;
      o.progress_interval = config_.progress_interval;
      o.data_roots = config_.data_roots;
      o.logs = config_.logs;
      o.artifact_upload.piece_bytes = config_.artifact_piece_bytes;
      o.upload_artifact = [this](const v1::UploadArtifactRequest& request,
                                 v1::UploadArtifactReply* reply) {
        grpc::ClientContext context;
        AddCredentials(context);
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
        return stub_->UploadArtifact(&context, request, reply);
      };
      auto runner = std::make_unique<RankRunner>(a, o, [this](const v1::WorkerMessage& m) {
        return Send(m);
      });
      runner->Start();
      std::lock_guard<std::mutex> lock(mu_);
      runner_ = std::move(runner);
      return;
    }
    case v1::CoordinatorMessage::kMask: {
      std::lock_guard<std::mutex> lock(mu_);
      if (runner_ != nullptr && runner_->job_id() == message.mask().job_id()) {
        runner_->OnMask(message.mask());
      }
      return;
    }
    case v1::CoordinatorMessage::kCancel: {
      const std::string& job_id = message.cancel().job_id();
      bool again;  // the coordinator repeats a cancel while a stopped rank still uploads
      {
        std::lock_guard<std::mutex> lock(mu_);
        const bool ours = runner_ != nullptr && runner_->job_id() == job_id;
        again = ours ? runner_->cancelled() : job_id == last_cancelled_job_;
        last_cancelled_job_ = job_id;
        if (ours) runner_->Cancel(message.cancel().reason());
      }
      spdlog::log(again ? spdlog::level::debug : spdlog::level::info, "coordinator cancelled {}: {}",
                  job_id, message.cancel().reason());
      return;
    }
    case v1::CoordinatorMessage::kDrain:
      spdlog::info("coordinator asked this worker to drain: {}", message.drain().reason());
      Stop(absl::StrCat("drained: ", message.drain().reason()), /*on_session_thread=*/true);
      return;
    case v1::CoordinatorMessage::kReject: {
      // A report that crossed its job's end (a cancel) on the way is expected, not an error.
      bool ended = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        const bool ours = runner_ != nullptr && runner_->job_id() == message.reject().job_id();
        ended = ours && (runner_->cancelled() || runner_->done());
        if (ours) runner_->OnReject(message.reject());
      }
      const auto level = ended ? spdlog::level::info : spdlog::level::err;
      spdlog::log(level, "coordinator refused a message about {}{}: {}",
                  message.reject().job_id(), ended ? " (its rank here has stopped)" : "",
                  api::StatusLine(absl::Status(static_cast<absl::StatusCode>(
                                                   message.reject().code()),
                                               message.reject().message())));
      return;
    }
    default:
      spdlog::warn("ignoring a coordinator message this worker does not know (field {})",
                   int(message.body_case()));
  }
}

}  // namespace mat::worker
