#include "coordinator/daemon.h"


#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <future>
#include <memory>
#include <utility>

#include <boost/asio/post.hpp>
#include <systemd/sd-daemon.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "coordinator/artifact_store.h"
#include "common/file_util.h"
#include "common/net_util.h"
#include "common/status.h"
#include "coordinator/auth.h"
#include "coordinator/grpc_metrics.h"
#include "coordinator/job_service.h"
#include "coordinator/worker_service.h"
#include "metrics/http_server.h"
#include "spdlog/spdlog.h"

namespace mat::coordinator {

using metrics::HttpResponse;
using metrics::HttpServer;
using metrics::JoinHostPort;
using common::ParseHostPort;

std::string CoordinatorDaemon::AddressFilePath(const std::string& state_dir) {
  return state_dir + "/coordinator.addr";
}

std::string CoordinatorDaemon::MetricsAddressFilePath(const std::string& state_dir) {
  return state_dir + "/coordinator.metrics.addr";
}

namespace {

// --job-retention-days in whole seconds; at least 1 when not 0.
int64_t RetentionSeconds(double days) {
  if (!(days > 0)) return 0;
  return std::max<int64_t>(1, std::llround(days * 86400));
}

}  // namespace

CoordinatorDaemon::CoordinatorDaemon(CoordinatorDaemonConfig config)
    : config_(std::move(config)),
      work_guard_(boost::asio::make_work_guard(loop_)),
      job_retention_seconds_(RetentionSeconds(config_.job_retention_days)) {}

CoordinatorDaemon::~CoordinatorDaemon() { Shutdown(); }

absl::StatusOr<std::unique_ptr<CoordinatorDaemon>> CoordinatorDaemon::Start(
    const CoordinatorDaemonConfig& config) {
  std::unique_ptr<CoordinatorDaemon> daemon(new CoordinatorDaemon(config));
  // On error, the destructor stops whatever StartImpl had started.
  MAT_RETURN_IF_ERROR(daemon->StartImpl());
  return daemon;
}

namespace {

// The flags' values that Start refuses before it touches anything.
absl::Status ValidateDaemonConfig(const CoordinatorDaemonConfig& config) {
  if (config.health_timeout_ms < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("health timeout must be >= 1 ms, got ", config.health_timeout_ms));
  }
  if (config.max_artifact_bytes < 0) {  // before the store: its errors concern --artifact-dir
    return absl::InvalidArgumentError(
        absl::StrCat("--max-artifact-bytes must be >= 0, got ", config.max_artifact_bytes));
  }
  if (!config.admin_token_file.empty() && config.auth_token_file.empty()) {
    return absl::InvalidArgumentError(
        "--admin-token-file needs --auth-token-file (admin tokens are bearer tokens with more "
        "rights: without bearer tokens every client may already do everything)");
  }
  // Mutual TLS is no substitute: its CA admits every client certificate, matctl users' too.
  if (!config.auth_token_file.empty() && config.join_token_file.empty() &&
      !config.open_worker_service) {
    return absl::InvalidArgumentError(
        "--auth-token-file guards JobService, but without --join-token-file WorkerService admits "
        "every client: one that registers as a worker receives the full spec of every job it is "
        "given, and can fail it. Add --join-token-file, or --open-worker-service to run so on "
        "purpose");
  }
  if (config.heartbeat_interval_ms < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "heartbeat interval must be >= 1 ms, got ", config.heartbeat_interval_ms));
  }
  if (!(config.job_retention_days >= 0) || config.job_retention_days > 100 * 365) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--job-retention-days must be a number of days in [0, 36500], got ",
        config.job_retention_days));
  }
  if (config.metrics_refresh_interval_ms < 1 || config.metrics_retention_seconds < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics refresh interval must be >= 1 ms and retention >= 0 s, got ",
        config.metrics_refresh_interval_ms, " ms and ", config.metrics_retention_seconds, " s"));
  }
  if (!config.metrics_listen_address.empty()) {
    MAT_RETURN_IF_ERROR(ParseHostPort(config.metrics_listen_address).status());
  }
  if (config.max_receive_message_bytes < 1 || config.max_spec_bytes < 0 ||
      config.max_model_params < 0 || config.max_jobs_per_client < 0 ||
      config.max_log_lines < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "limits must be >= 0 (max message bytes >= 1), got max message bytes ",
        config.max_receive_message_bytes, ", max spec bytes ", config.max_spec_bytes,
        ", max model params ", config.max_model_params, ", max jobs per client ",
        config.max_jobs_per_client, ", max log lines ", config.max_log_lines));
  }
  for (const std::string& root : config.data_roots) {
    if (root.empty() || root.front() != '/') {
      return absl::InvalidArgumentError(
          absl::StrCat("--data-root '", root, "' is not an absolute path"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CoordinatorDaemon::StartImpl() {
  MAT_RETURN_IF_ERROR(ValidateDaemonConfig(config_));
  MAT_ASSIGN_OR_RETURN(const auto grpc_host_port, ParseHostPort(config_.listen_address));

  // Security material before anything starts, so a bad file stops the daemon early.
  if (!config_.auth_token_file.empty()) {
    MAT_ASSIGN_OR_RETURN(TokenSet tokens, TokenSet::LoadFile(config_.auth_token_file));
    if (!config_.admin_token_file.empty()) {
      MAT_ASSIGN_OR_RETURN(TokenSet admins, TokenSet::LoadFile(config_.admin_token_file));
      tokens = TokenSet::Union(tokens, admins);  // an admin token is a bearer token too
      admin_tokens_ = std::make_unique<TokenSet>(std::move(admins));
    }
    bearer_tokens_ = std::make_unique<TokenSet>(std::move(tokens));
  }
  if (!config_.join_token_file.empty()) {
    MAT_ASSIGN_OR_RETURN(TokenSet tokens, TokenSet::LoadFile(config_.join_token_file));
    join_tokens_ = std::make_unique<TokenSet>(std::move(tokens));
  }
  MAT_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                       MakeServerCredentials(config_.tls_cert_file, config_.tls_key_file,
                                             config_.tls_ca_file));

  // The store first: it takes the state dir's lock, so a second daemon stops here without
  // touching the first one's address files.
  MAT_ASSIGN_OR_RETURN(std::unique_ptr<JobStore> store, JobStore::Open(config_.state_dir));
  for (const std::string& path :
       {AddressFilePath(config_.state_dir), MetricsAddressFilePath(config_.state_dir)}) {
    std::remove(path.c_str());
  }
  const std::string artifact_dir =
      config_.artifact_dir.empty() ? config_.state_dir + "/artifacts" : config_.artifact_dir;
  std::error_code same_error;
  if (std::filesystem::equivalent(artifact_dir, config_.state_dir, same_error)) {
    return absl::InvalidArgumentError(
        "--artifact-dir must not be the --state-dir itself (the default is STATE_DIR/artifacts)");
  }
  // A job the store says it never had (not one it could not read) has its folder set aside; a
  // deleted one's folder (a stop between the delete and its files') is removed.
  auto known_job = [&store](const std::string& job_id) {
    const absl::StatusOr<bool> deleted = store->IsDeletedJob(job_id);
    if (deleted.ok() && *deleted) return KnownJob::kDeleted;
    return deleted.status().code() == absl::StatusCode::kNotFound ? KnownJob::kUnknown
                                                                   : KnownJob::kKnown;
  };
  absl::StatusOr<std::unique_ptr<ArtifactStore>> artifacts =
      ArtifactStore::Open(artifact_dir, config_.max_artifact_bytes, known_job);
  if (!artifacts.ok()) {
    return absl::Status(artifacts.status().code(),
                        absl::StrCat("--artifact-dir: ", artifacts.status().message()));
  }
  artifacts_ = std::move(*artifacts);
  CoordinatorOptions coordinator_options;
  coordinator_options.heartbeat_interval_ms = config_.heartbeat_interval_ms;
  coordinator_options.metrics = &metrics_;
  coordinator_options.metrics_retention_seconds = config_.metrics_retention_seconds;
  coordinator_options.spec_limits.data_roots = config_.data_roots;
  coordinator_options.spec_limits.max_spec_bytes = config_.max_spec_bytes;
  coordinator_options.spec_limits.max_model_params = config_.max_model_params;
  coordinator_options.max_jobs_per_client = config_.max_jobs_per_client;
  coordinator_options.max_log_lines_per_job = config_.max_log_lines;
  coordinator_options.job_retention_seconds = job_retention_seconds_;
  MAT_ASSIGN_OR_RETURN(coordinator_, Coordinator::Create(std::move(store), coordinator_options));
  heartbeat_timer_ = std::make_unique<boost::asio::steady_timer>(loop_);
  metrics_timer_ = std::make_unique<boost::asio::steady_timer>(loop_);
  watchdog_timer_ = std::make_unique<boost::asio::steady_timer>(loop_);
  loop_thread_ = std::thread([this] { loop_.run(); });
  boost::asio::post(loop_, [this] {
    ScheduleHeartbeatCheck();
    ScheduleMetricsRefresh();
  });

  MAT_RETURN_IF_ERROR(StartGrpc(credentials, grpc_host_port.first));
  LogAdmission();
  MAT_RETURN_IF_ERROR(StartHttp());
  return Announce();
}

absl::Status CoordinatorDaemon::StartGrpc(std::shared_ptr<grpc::ServerCredentials> credentials,
                                          const std::string& host) {
  JobServiceOptions service_options;
  service_options.max_queued_watch_events = config_.max_queued_watch_events;
  service_options.bearer_tokens = bearer_tokens_.get();
  service_options.admin_tokens = admin_tokens_.get();
  service_options.artifacts = artifacts_.get();
  job_service_ = std::make_unique<JobService>(loop_, *coordinator_, service_options);
  WorkerServiceOptions worker_options;
  worker_options.max_queued_session_messages = config_.max_queued_session_messages;
  worker_options.join_tokens = join_tokens_.get();
  worker_options.artifacts = artifacts_.get();
  worker_service_ = std::make_unique<WorkerService>(loop_, *coordinator_, worker_options);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config_.listen_address, credentials, &port);
  builder.RegisterService(job_service_.get());
  builder.RegisterService(worker_service_.get());
  builder.SetMaxReceiveMessageSize(config_.max_receive_message_bytes);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> counting;
  counting.push_back(MakeRequestCounter(
      metrics_.grpc_requests_total,
      ServedMethods({v1::JobService::service_full_name(), v1::WorkerService::service_full_name(),
                     "grpc.reflection.v1alpha.ServerReflection"})));
  builder.experimental().SetInterceptorCreators(std::move(counting));
  // gRPC sets SO_REUSEPORT by default, which would let a second coordinator share the port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) {
    // gRPC says why only on its own log line: a taken port, or a key that does not fit.
    return absl::UnavailableError(absl::StrCat(
        "cannot listen for gRPC on '", config_.listen_address, "'",
        config_.tls_cert_file.empty()
            ? ": is the port taken, or the address not one of this machine's?"
            : ": is the port taken, the address not one of this machine's, or --tls-key not "
              "the key of --tls-cert? (gRPC's own line above says which)"));
  }
  grpc_address_ = JoinHostPort(host, port);
  spdlog::info("listening on {} (gRPC: JobService, WorkerService, health, reflection; {})",
               grpc_address_,
               config_.tls_cert_file.empty() ? "plaintext"
               : config_.tls_ca_file.empty() ? "TLS"
                                             : "mutual TLS");
  return absl::OkStatus();
}

void CoordinatorDaemon::LogAdmission() const {
  if (bearer_tokens_ == nullptr) {
    spdlog::warn("no --auth-token-file: every JobService client is admitted");
  } else {
    spdlog::info("JobService requires a bearer token ({} known, admin tokens included)",
                 bearer_tokens_->size());
    if (admin_tokens_ != nullptr) {
      spdlog::info("{} admin token(s): other clients read, list, cancel and delete only their "
                   "own jobs and drain or undrain no worker",
                   admin_tokens_->size());
    } else {
      spdlog::warn("no --admin-token-file: every client may read, cancel and delete any job and "
                   "drain any worker");
    }
  }
  // Tokens in plaintext are readable on the wire beyond this host.
  if ((bearer_tokens_ != nullptr || join_tokens_ != nullptr) && config_.tls_cert_file.empty()) {
    // (Start refused an address that does not parse.)
    absl::StatusOr<std::pair<std::string, int>> listen =
        common::ParseHostPort(config_.listen_address);
    const std::string host = listen.ok() ? listen->first : "";
    if (listen.ok() && host.rfind("127.", 0) != 0 && host != "::1" && host != "localhost") {
      spdlog::warn("tokens travel in plaintext to {}: use --tls-cert/--tls-key beyond this host",
                   config_.listen_address);
    }
  }
  if (config_.data_roots.empty()) {
    spdlog::warn("no --data-root: jobs may read any data.dir (a trusted single host)");
  } else {
    spdlog::info("jobs may read data under: {}", absl::StrJoin(config_.data_roots, ", "));
  }
  spdlog::info("limits: messages {} bytes, specs {} bytes, models {:g} parameters, {} active "
               "jobs per client (0 = no limit)",
               config_.max_receive_message_bytes, config_.max_spec_bytes,
               config_.max_model_params, config_.max_jobs_per_client);
  if (join_tokens_ == nullptr && bearer_tokens_ != nullptr) {  // --open-worker-service
    spdlog::warn("WorkerService admits every worker (--open-worker-service): whoever registers "
                 "one receives the specs of the jobs it is given");
  } else if (join_tokens_ == nullptr) {
    spdlog::warn("no --join-token-file: every worker is admitted");
  } else {
    if (config_.open_worker_service) {
      spdlog::warn("--open-worker-service has no effect: --join-token-file closes WorkerService");
    }
    spdlog::info("workers must present a join token");
  }
}

absl::Status CoordinatorDaemon::StartHttp() {
  if (!config_.metrics_listen_address.empty()) {
    MAT_ASSIGN_OR_RETURN(
        http_, HttpServer::Start(
                   config_.metrics_listen_address,
                   [this](const std::string& target) {
                     // The HTTP thread: the registry (its own mutex) and Health, never the
                     // Coordinator itself.
                     if (target == "/metrics") {
                       metrics_.process.Update();
                       return metrics::MetricsResponse(metrics_.registry);
                     }
                     if (target == "/healthz") return Health(false);
                     if (target == "/readyz") return Health(true);
                     return HttpResponse{404, "text/plain", "not found\n"};
                   },
                   config_.http_request_timeout_seconds));
    metrics_address_ = http_->address();
    spdlog::info("metrics listening on {} (/healthz, /readyz, /metrics)", metrics_address_);
  }

  return absl::OkStatus();
}

absl::Status CoordinatorDaemon::Announce() {
  wrote_address_files_ = true;
  MAT_RETURN_IF_ERROR(
      common::WriteFileAtomic(AddressFilePath(config_.state_dir), grpc_address_ + "\n"));
  if (!metrics_address_.empty()) {
    MAT_RETURN_IF_ERROR(common::WriteFileAtomic(MetricsAddressFilePath(config_.state_dir),
                                                metrics_address_ + "\n"));
  }
  ready_ = true;
  // systemd (Type=notify): ready now; with WatchdogSec, pinged from the loop at half the period,
  // so a hung loop stops the pings and systemd restarts the daemon. Without NOTIFY_SOCKET
  // (not under systemd) both are no-ops.
  sd_notifyf(0, "READY=1\nSTATUS=serving gRPC on %s", grpc_address_.c_str());
  uint64_t watchdog_usec = 0;
  if (sd_watchdog_enabled(0, &watchdog_usec) > 0 && watchdog_usec > 0) {
    watchdog_interval_ = std::chrono::microseconds(std::max<uint64_t>(watchdog_usec / 2, 1000));
    spdlog::info("systemd watchdog: pinging every {} ms from the coordinator loop",
                 watchdog_interval_.count() / 1000);
    boost::asio::post(loop_, [this] { ScheduleWatchdog(); });
  }
  return absl::OkStatus();
}

void CoordinatorDaemon::ScheduleWatchdog() {
  if (heartbeats_stopped_) return;
  sd_notify(0, "WATCHDOG=1");
  watchdog_timer_->expires_after(watchdog_interval_);
  watchdog_timer_->async_wait([this](const boost::system::error_code& error) {
    if (error || heartbeats_stopped_) return;  // cancelled by Shutdown
    ScheduleWatchdog();
  });
}

void CoordinatorDaemon::ScheduleHeartbeatCheck() {
  if (heartbeats_stopped_) return;
  heartbeat_timer_->expires_after(std::chrono::milliseconds(config_.heartbeat_interval_ms));
  heartbeat_timer_->async_wait([this](const boost::system::error_code& error) {
    if (error || heartbeats_stopped_) return;  // cancelled by Shutdown
    coordinator_->CheckHeartbeats();
    ScheduleHeartbeatCheck();
  });
}

void CoordinatorDaemon::ScheduleMetricsRefresh() {
  if (heartbeats_stopped_) return;
  metrics_timer_->expires_after(std::chrono::milliseconds(config_.metrics_refresh_interval_ms));
  metrics_timer_->async_wait([this](const boost::system::error_code& error) {
    if (error || heartbeats_stopped_) return;  // cancelled by Shutdown
    coordinator_->RefreshMetrics();
    DeleteExpiredJobs();
    ScheduleMetricsRefresh();
  });
}

void CoordinatorDaemon::DeleteExpiredJobs() {
  const int64_t retention = job_retention_seconds_;
  if (retention <= 0) return;
  const auto now = std::chrono::steady_clock::now();
  if (now < next_retention_check_) return;
  bool more = false;
  const std::vector<std::string> deleted = coordinator_->DeleteExpiredJobs(10, &more);
  // A full round (a backlog) goes on at the next refresh, a few jobs at a time.
  next_retention_check_ =
      more ? now : now + std::chrono::seconds(std::clamp<int64_t>(retention / 10, 1, 60));
  for (const std::string& job_id : deleted) {
    if (artifacts_ == nullptr) continue;
    boost::asio::post(artifacts_->executor(), [store = artifacts_.get(), job_id] {
      if (absl::StatusOr<int64_t> freed = store->RemoveJob(job_id); !freed.ok()) {
        spdlog::error("job {}: its artifacts were not removed: {}", job_id,
                      freed.status().ToString());
      }
    });
  }
}

HttpResponse CoordinatorDaemon::Health(bool readiness) {
  if (readiness && !ready_.load()) return HttpResponse{503, "text/plain", "not ready\n"};
  // The check runs on the loop; a loop that never runs it (hung, or stopped) leaves the future
  // unanswered (or broken) and the deadline answers.
  auto answer = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> result = answer->get_future();
  boost::asio::post(loop_, [this, answer, readiness] {
    absl::Status st = coordinator_->store().CheckFile();
    // Liveness stays OK: a restart would not make a full disk writable.
    if (st.ok() && readiness) st = coordinator_->UnstoredEnds();
    answer->set_value(st);
  });
  absl::Status status = absl::DeadlineExceededError(
      absl::StrCat("coordinator loop did not answer within ", config_.health_timeout_ms, " ms"));
  if (result.wait_for(std::chrono::milliseconds(config_.health_timeout_ms)) ==
      std::future_status::ready) {
    try {
      status = result.get();
    } catch (const std::future_error&) {
      status = absl::UnavailableError("coordinator loop stopped");
    }
  }
  if (!status.ok()) {
    spdlog::warn("{}: unhealthy: {}", readiness ? "/readyz" : "/healthz", status.ToString());
    return HttpResponse{503, "text/plain", std::string(status.message()) + "\n"};
  }
  return HttpResponse{200, "text/plain", readiness ? "ready\n" : "ok\n"};
}

void CoordinatorDaemon::Post(std::function<void(Coordinator&)> fn) {
  boost::asio::post(loop_, [this, fn = std::move(fn)] { fn(*coordinator_); });
}

void CoordinatorDaemon::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  if (ready_.load()) sd_notify(0, "STOPPING=1");
  ready_ = false;
  if (loop_thread_.joinable()) {
    // The pending timer wait would keep the loop from returning.
    boost::asio::post(loop_, [this] {
      heartbeats_stopped_ = true;
      heartbeat_timer_->cancel();
      metrics_timer_->cancel();
      watchdog_timer_->cancel();
    });
  }
  // Sessions last as long as their workers: end them now rather than after the grace period.
  if (worker_service_ != nullptr) worker_service_->BeginShutdown();
  if (server_ != nullptr) {
    spdlog::info("shutting down: draining gRPC for up to {} s", config_.shutdown_grace_seconds);
    // The loop keeps running meanwhile: every outstanding RPC finishes there.
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(
                          static_cast<int64_t>(config_.shutdown_grace_seconds * 1000)));
    server_->Wait();
    server_.reset();
  }
  if (http_ != nullptr) http_->Stop();
  work_guard_.reset();
  if (loop_thread_.joinable()) loop_thread_.join();  // runs what gRPC's last callbacks posted
  job_service_.reset();
  worker_service_.reset();
  heartbeat_timer_.reset();
  metrics_timer_.reset();
  watchdog_timer_.reset();
  artifacts_.reset();    // after the loop: waits for the I/O thread's last piece
  coordinator_.reset();  // closes the store and releases the state dir
  if (wrote_address_files_) {
    std::remove(AddressFilePath(config_.state_dir).c_str());
    std::remove(MetricsAddressFilePath(config_.state_dir).c_str());
  }
  // A daemon that never listened did not start: its error says so, not "stopped".
  if (!grpc_address_.empty()) spdlog::info("coordinator stopped");
}

}  // namespace mat::coordinator
