// The mat-coordinator daemon (DESIGN §2, §8): everything `mat-coordinator` runs, as a library so
// tests can start it in-process. main only fills CoordinatorDaemonConfig from flags, starts it
// and waits for SIGTERM/SIGINT.
//
// One Boost.Asio io_context with one thread (the coordinator loop) owns the Coordinator and its
// JobStore; the gRPC server (callback API) serves JobService and WorkerService through adapters
// that post to that loop, plus grpc.health.v1.Health (SERVING while up) and server reflection. A
// timer on the loop calls Coordinator::CheckHeartbeats every heartbeat interval (workers silent
// for 3 intervals are lost), and another every second Coordinator::RefreshMetrics (heartbeat ages;
// a finished job's series are removed metrics_retention_seconds after its end) and, with
// job_retention_days, Coordinator::DeleteExpiredJobs (the jobs' artifacts then go on the
// ArtifactStore's I/O thread). A second, small
// thread (metrics/http_server.h) serves HTTP `/healthz`, `/readyz` and `/metrics` (the
// Prometheus text of coordinator_metrics.h) on the metrics listener. `/healthz` posts a check to
// the coordinator loop and waits at most health_timeout_ms for it: the loop answers by opening
// the SQLite file afresh and reading it (JobStore::CheckFile). 200 "ok" when both answered; 503
// naming what failed ("coordinator loop did not answer within 2000 ms", or the store's error)
// otherwise, so a hung loop or a broken database file is not "healthy". `/readyz`: 503 "not
// ready" while starting or draining, else the same check ("ready"). The HTTP thread reads the
// metrics registry (its own mutex) and never touches the Coordinator itself.
//
// systemd: once ready, `READY=1` to $NOTIFY_SOCKET (Type=notify); with WatchdogSec
// ($WATCHDOG_USEC for this process), `WATCHDOG=1` from a timer on the loop every half period, so
// a hung loop gets the daemon restarted; `STOPPING=1` when a ready daemon shuts down. No-ops
// without $NOTIFY_SOCKET.
//
// Address files: once both listeners are bound, `<state_dir>/coordinator.addr` holds the gRPC
// address and `<state_dir>/coordinator.metrics.addr` the metrics address ("HOST:PORT\n", real
// ports, also when the configured port was 0). A starting daemon first removes stale ones; a
// graceful shutdown removes them.
//
// Thread-safety: Start, Shutdown and the accessors from one owner thread.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/coordinator.h"
#include "coordinator/coordinator_metrics.h"

namespace grpc {
class Server;
class ServerCredentials;
}

namespace mat::metrics {
class HttpServer;
struct HttpResponse;
}

namespace mat::coordinator {

class ArtifactStore;
class JobService;
class TokenSet;
class WorkerService;

// Every tunable of mat-coordinator, with its default. Flags only fill this.
struct CoordinatorDaemonConfig {
  // gRPC listener (JobService, WorkerService, health, reflection), "HOST:PORT"; port 0 binds a
  // free port.
  std::string listen_address = "127.0.0.1:50051";
  // HTTP listener for /healthz, /readyz and /metrics, "HOST:PORT" (port 0: a free port);
  // "" = none.
  std::string metrics_listen_address = "127.0.0.1:9464";
  // Directory of the SQLite state (coordinator.db), its LOCK and the address files; created
  // with its parents. One daemon per directory.
  std::string state_dir = ".mat/coordinator";
  // spdlog level: trace | debug | info | warn | error (read by main).
  std::string log_level = "info";
  // One JSON object per log line (read by main).
  bool log_json = false;
  // On shutdown, in-flight RPCs get this long to finish before they are cancelled, seconds.
  double shutdown_grace_seconds = 5;
  // Largest request message accepted (gRPC max receive message size; larger requests end
  // RESOURCE_EXHAUSTED before any handler runs), bytes.
  int max_receive_message_bytes = 16 * 1024 * 1024;
  // Admission limits of SubmitJob (Coordinator::SubmitJob, job_spec.h CheckJobSpecLimits).
  // data.dir must be an absolute path under one of these (no `..` or symlink escape); empty =
  // any path (a trusted single host).
  std::vector<std::string> data_roots;
  // Largest job spec, bytes of its serialized mat.v1.JobSpec; 0 = no limit.
  int64_t max_spec_bytes = 64 * 1024;
  // Largest model, parameters (EstimateModelParams, vocabulary assumed kAssumedVocabSize);
  // 0 = no limit.
  double max_model_params = 1e9;
  // Active (queued, running, restarting) jobs per client (bearer token, or peer host without
  // auth), count; 0 = unlimited.
  int64_t max_jobs_per_client = 100;
  // Log lines kept per job (the newest; `matctl logs`), count; 0 = unbounded.
  int64_t max_log_lines = 10000;
  // Where the jobs' artifacts are kept (coordinator/artifact_store.h); "" = <state_dir>/artifacts.
  std::string artifact_dir;
  // Bytes of artifacts kept per job (an upload that would pass it is refused and reported by
  // `matctl download`); 0 = no limit.
  int64_t max_artifact_bytes = int64_t{4} << 30;
  // Events queued per WatchJob stream before its progress and mask events are dropped (its
  // evaluations beyond 4 times as many), count.
  int max_queued_watch_events = 1024;
  // Workers must send something at least this often (RegisterReply.heartbeat_interval_ms); one
  // silent for 3 intervals is lost. Also the period of the loss check, milliseconds >= 1.
  int64_t heartbeat_interval_ms = 1000;
  // Messages queued for a worker whose Session does not read them before it is handled as
  // lost, count.
  int max_queued_session_messages = 4096;
  // An HTTP client must send its whole request within this time, seconds.
  double http_request_timeout_seconds = 5;
  // /healthz and /readyz wait this long for the coordinator loop's check, milliseconds >= 1.
  int64_t health_timeout_ms = 2000;
  // A finished job's metric series (every series with its `job` label) are removed this long
  // after it ended, seconds >= 0.
  int64_t metrics_retention_seconds = 600;
  // Period of the metrics refresh (heartbeat ages, retention), milliseconds >= 1.
  int64_t metrics_refresh_interval_ms = 1000;
  // A finished job and everything kept of it (artifacts, logs, λ history) is deleted this long
  // after it ended, days in [0, 36500] (fractions allowed; whole seconds, at least 1); 0 = kept
  // until `matctl delete`. Checked at a metrics refresh every tenth of it (at least every
  // second, at most every minute), at most 10 jobs a refresh.
  double job_retention_days = 0;
  // Security (coordinator/auth.h). Token files: one token per line, '#' comments.
  // JobService clients must send "authorization: Bearer <token>" with a token of this file;
  // "" = every client is admitted (a warning is logged at start).
  std::string auth_token_file;
  // Admin tokens (needs auth_token_file): also bearer tokens; with them, other clients may read,
  // list, cancel and delete only the jobs they submitted and may not drain or undrain workers
  // (JobServiceOptions::admin_tokens). "" = every admitted client may do all of it.
  std::string admin_token_file;
  // Workers must send "x-mat-join-token: <token>" with a token of this file on every call;
  // "" = every worker is admitted (each still needs its own secret: service.proto).
  std::string join_token_file;
  // With auth_token_file, Start refuses a WorkerService that admits every worker (no
  // join_token_file; mutual TLS does not count, its CA admits matctl's certificates too): a
  // client registering as a worker would receive the full spec of every job it is given, past
  // the bearer tokens. true = run so on purpose.
  bool open_worker_service = false;
  // TLS on the gRPC listener: certificate chain and private key (PEM), both or neither; ""
  // = plaintext.
  std::string tls_cert_file;
  std::string tls_key_file;
  // With TLS: CA (PEM) that client certificates must chain to; set = mutual TLS (a client
  // without a valid certificate is refused in the handshake). "" = no client certificates.
  std::string tls_ca_file;
};

class CoordinatorDaemon {
 public:
  // Opens the store, starts the loop, the gRPC server and the HTTP listener, writes the address
  // files. FAILED_PRECONDITION when another coordinator holds state_dir; INVALID_ARGUMENT for a
  // malformed address, a heartbeat or metrics refresh interval < 1 ms or a negative retention;
  // NOT_FOUND / INVALID_ARGUMENT naming a token, certificate or key file that cannot be read or
  // is empty; INVALID_ARGUMENT for auth_token_file without join_token_file (unless
  // open_worker_service) and for admin_token_file without auth_token_file;
  // UNAVAILABLE when a listener cannot be
  // bound or the state cannot be written. After an error nothing keeps running and the state dir
  // is released.
  static absl::StatusOr<std::unique_ptr<CoordinatorDaemon>> Start(
      const CoordinatorDaemonConfig& config);

  CoordinatorDaemon(const CoordinatorDaemon&) = delete;
  CoordinatorDaemon& operator=(const CoordinatorDaemon&) = delete;
  ~CoordinatorDaemon();  // Shutdown()

  // Bound addresses, "HOST:PORT" with the real ports ("" for a disabled metrics listener).
  const std::string& grpc_address() const { return grpc_address_; }
  const std::string& metrics_address() const { return metrics_address_; }
  // What /readyz reports.
  bool ready() const { return ready_.load(); }
  // The daemon's metrics (what /metrics renders); thread-safe.
  CoordinatorMetrics& metrics() { return metrics_; }

  // Runs `fn` on the coordinator loop (for tests and in-process tools); returns at once.
  // REQUIRES: called before Shutdown (afterwards `fn` never runs).
  void Post(std::function<void(Coordinator&)> fn);

  // Graceful stop: not ready, heartbeat checks stopped, open Session streams end UNAVAILABLE at
  // once (without failing their workers' jobs: see worker_service.h), gRPC drained (in-flight
  // RPCs get shutdown_grace_seconds, open WatchJob streams end CANCELLED), HTTP stopped, loop
  // joined, store closed, address files removed. Idempotent.
  void Shutdown();

  static std::string AddressFilePath(const std::string& state_dir);
  static std::string MetricsAddressFilePath(const std::string& state_dir);

 private:
  explicit CoordinatorDaemon(CoordinatorDaemonConfig config);

  absl::Status StartImpl();
  // StartImpl's steps: the gRPC server with both services (grpc_address_ on `host`), the
  // admission settings in the log, the HTTP listener, the address files and systemd's READY=1.
  absl::Status StartGrpc(std::shared_ptr<grpc::ServerCredentials> credentials,
                         const std::string& host);
  void LogAdmission() const;
  absl::Status StartHttp();
  absl::Status Announce();
  // Arms the heartbeat timer once more. Loop only.
  void ScheduleHeartbeatCheck();
  // Arms the metrics refresh timer once more; each refresh also deletes the expired jobs when
  // their check is due (DeleteExpiredJobs). Loop only.
  void ScheduleMetricsRefresh();
  // Deletes the jobs past --job-retention-days and posts the removal of their artifacts. Loop
  // only.
  void DeleteExpiredJobs();
  // Sends WATCHDOG=1 and arms the watchdog timer once more. Loop only.
  void ScheduleWatchdog();
  // /healthz (readiness=false) and /readyz: see the file comment. HTTP thread.
  metrics::HttpResponse Health(bool readiness);

  const CoordinatorDaemonConfig config_;
  CoordinatorMetrics metrics_;  // outlives the Coordinator and the HTTP server
  boost::asio::io_context loop_{1};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_guard_;
  std::thread loop_thread_;
  std::unique_ptr<Coordinator> coordinator_;  // used on the loop only once the loop runs
  std::unique_ptr<TokenSet> bearer_tokens_;  // null: open; outlives job_service_
  std::unique_ptr<TokenSet> admin_tokens_;   // null: no roles; outlives job_service_
  std::unique_ptr<TokenSet> join_tokens_;    // null: open; outlives worker_service_
  std::unique_ptr<ArtifactStore> artifacts_;       // outlives the services and the loop
  std::unique_ptr<JobService> job_service_;        // outlives server_
  std::unique_ptr<WorkerService> worker_service_;  // outlives server_ and the loop's last run
  // Calls CheckHeartbeats every heartbeat_interval_ms; used on the loop only once it runs.
  std::unique_ptr<boost::asio::steady_timer> heartbeat_timer_;
  bool heartbeats_stopped_ = false;  // loop only
  std::unique_ptr<boost::asio::steady_timer> metrics_timer_;  // RefreshMetrics; loop only
  std::chrono::steady_clock::time_point next_retention_check_{};  // loop only
  const int64_t job_retention_seconds_;  // job_retention_days in whole seconds; 0 = none
  std::unique_ptr<boost::asio::steady_timer> watchdog_timer_;  // systemd pings; loop only
  std::chrono::microseconds watchdog_interval_{0};  // 0: no watchdog
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<metrics::HttpServer> http_;
  std::string grpc_address_;
  std::string metrics_address_;
  bool wrote_address_files_ = false;
  std::atomic<bool> ready_{false};  // read by the HTTP thread
  bool shut_down_ = false;
};

}  // namespace mat::coordinator
