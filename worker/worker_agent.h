// WorkerAgent: everything `mat-worker` does, as a library (main only fills the config, starts it
// and turns SIGTERM/SIGINT into Shutdown).
//
//   1. Register with the coordinator (retrying every reconnect_interval while it is down), with
//      the worker id saved in <work_dir>/worker.id when there is one, so a restarted worker keeps
//      its id; the rendezvous port is reserved at start (a free one when 0).
//   2. Open the Session stream, send a Heartbeat at once and then every heartbeat interval the
//      coordinator asked for (listing the job this worker runs a rank of).
//   3. Assign starts a RankRunner (worker/rank_runner.h); MaskUpdate goes to it; Cancel stops it;
//      Reject is logged (the runner fails on its own when the coordinator cannot serve it);
//      Drain stops it and ends the agent (rank 0 first uploads its artifacts, for at most
//      shutdown_upload_timeout). A stopping agent (Shutdown, a Drain) first says
//      Leaving {reason} on its open session (the heartbeat thread writes it; Shutdown waits at
//      most 2 s for it), so its job restarts naming the reason, not "lost: session closed".
//   4. Security: every call carries the worker's own secret as "x-mat-worker-secret" metadata
//      (made by the first Create on a work dir and kept in <work_dir>/worker.secret, mode 0600;
//      the coordinator refuses calls in this worker's name with another), and with
//      `join_token_file` also that file's first token as "x-mat-join-token". With `tls_ca_file`, the
//      channel is TLS (verifying the coordinator), with `tls_cert_file`/`tls_key_file` also
//      presenting a client certificate (mutual TLS). A coordinator that refuses the worker
//      (UNAUTHENTICATED or PERMISSION_DENIED on Register or Session: a join token, or this id
//      with another secret, such as a work dir that kept worker.id but lost worker.secret) ends
//      Run with that error instead of retrying.
//   5. Sessions (and Registers: the coordinator refuses both while a session with the id is open)
//      refused for kDuplicateIdFor because another mat-worker is connected with this worker's id
//      (a work dir copied with its worker.id and worker.secret) end Run with FAILED_PRECONDITION
//      naming the file. A restart's own old session, not yet dropped, only delays the new one.
//   6. When the session breaks (coordinator gone or restarted), the running rank keeps training
//      (waiting at its next probe step for the mask) and the agent registers again with the same
//      id every reconnect_interval; the new session's first Heartbeat lists the rank's job, and
//      the runner then resends what the coordinator may have lost (RankRunner::OnReconnect).
//
// Metrics (worker/worker_metrics.h): the agent owns the registry; its RankRunner updates it; with
// `metrics_listen_address` set, Create starts an HTTP listener (metrics/http_server.h, its own
// thread) serving `/metrics`, `/healthz` (200 while the process serves HTTP) and `/readyz` (200
// "ready" while a Session with the coordinator is open, 503 "not connected to the coordinator at
// HOST:PORT" before the first one and between sessions), writes the bound address to
// <work_dir>/worker.metrics.addr ("HOST:PORT\n", removed again by the destructor) and logs it.
// Starting a rank of another job removes the previous job's series.
//
// Thread-safety: Run blocks on the calling thread; Shutdown may be called from any thread, once
// or more. Not copyable.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/log_forwarder.h"
#include "worker/rank_runner.h"
#include "worker/worker_metrics.h"
#include "mat/v1/service.grpc.pb.h"

namespace mat::metrics {
class HttpServer;
}

namespace mat::worker {

// Every tunable of mat-worker, with its default. Flags only fill this.
struct WorkerAgentConfig {
  std::string coordinator_address = "127.0.0.1:50051";  // HOST:PORT of mat-coordinator
  std::string work_dir = ".mat/worker";  // checkpoints, logs, worker.id; created with parents
  // Where ranks keep their checkpoints and logs (<dir>/jobs/<job>/rank<r>/); storage shared by
  // every worker lets a job restarted on other workers resume; "" = work_dir.
  std::string checkpoint_dir;
  std::string device = "cpu";            // "cpu" | "cuda:N": where this worker trains
  std::string host = "127.0.0.1";        // the address other ranks reach this worker at
  int rendezvous_port = 0;               // TCP port for a job's c10d store when rank 0; 0 = free
  int threads = 0;                       // > 0: intra-op threads per rank (overrides the spec)
  int64_t memory_bytes = 0;              // advertised; 0 = this machine's physical memory
  std::chrono::milliseconds mask_timeout{120000};        // wait for a due mask, then fail
  // Without a coordinator session, train on under the previous mask for at most this many
  // steps (RankRunnerOptions::max_mask_staleness_steps); 0 = wait at the probe step.
  int64_t max_mask_staleness_steps = 0;
  std::chrono::milliseconds rendezvous_timeout{120000};  // process group formation
  std::chrono::milliseconds reconnect_interval{1000};    // between Register attempts
  std::chrono::milliseconds progress_interval{1000};     // Progress at most this often
  // HTTP listener for /metrics, "HOST:PORT" (port 0: a free one, written to
  // <work_dir>/worker.metrics.addr); "" = none.
  std::string metrics_listen_address;
  // How long a job's {mat_job, rank} series stay on /metrics after its rank here ended, so that
  // the final values are scraped; then they are removed (checked at each heartbeat).
  std::chrono::seconds metrics_linger{60};
  // Join token file (one token per line, '#' comments; the first is sent); "" = none.
  std::string join_token_file;
  // TLS to the coordinator: its CA (PEM; "" = plaintext) and, for mutual TLS, this worker's
  // certificate chain and key (PEM; both or neither, only with a CA).
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  // Directories a job's data.dir must lie in (absolute; common/path_util.h CheckUnderRoots),
  // checked by each rank before it opens data (RankRunnerOptions::data_roots); empty = any.
  std::vector<std::string> data_roots;
  // The process's log sink whose lines each rank forwards to the coordinator (`matctl logs`);
  // borrowed, must outlive the agent; nullptr = none (mat-worker installs one).
  LogForwarder* logs = nullptr;
  // Bytes per piece of rank 0's artifact upload (worker/artifact_upload.h), 1 .. 4 MiB.
  int64_t artifact_piece_bytes = 1 << 20;
  // A stopping agent (SIGTERM, a Drain) that runs rank 0 of a job uploads that job's artifacts
  // (the model as of its newest checkpoint) for at most this long before it exits; 0 = none. Keep it under the service manager's stop timeout (systemd's
  // TimeoutStopSec, 90 s by default; Kubernetes' terminationGracePeriodSeconds, 30 s).
  std::chrono::milliseconds shutdown_upload_timeout{20000};
};

class WorkerAgent {
 public:
  // Validates the config (INVALID_ARGUMENT naming the flag; FAILED_PRECONDITION for a cuda:N
  // device LibTorch does not see), reads the join token and TLS files
  // (errors name the file), creates the work dir, reserves the
  // rendezvous port, starts the metrics listener (UNAVAILABLE when it cannot bind). Does not
  // contact the coordinator yet.
  static absl::StatusOr<std::unique_ptr<WorkerAgent>> Create(WorkerAgentConfig config);
  ~WorkerAgent();
  WorkerAgent(const WorkerAgent&) = delete;
  WorkerAgent& operator=(const WorkerAgent&) = delete;

  // Serves until Shutdown (OK) or a Drain (OK). UNAUTHENTICATED / PERMISSION_DENIED when the
  // coordinator refuses this worker (a missing or wrong join token, see above).
  absl::Status Run();
  // Stops: says Leaving {why} on an open session and waits (at most 2 s) for the coordinator to
  // end it, then cancels the session; Run then stops the running rank (see
  // shutdown_upload_timeout) and returns. The first call's `why` is the one said.
  void Shutdown(const std::string& why = "shutting down");

  // Whether a Session with the coordinator is open (what /readyz reports); thread-safe.
  bool connected() const { return connected_.load(); }
  // The id the coordinator gave ("" before the first registration).
  std::string worker_id() const;
  int rendezvous_port() const { return config_.rendezvous_port; }
  // The metrics listener's bound address ("" without one).
  const std::string& metrics_address() const { return metrics_address_; }
  // The worker's metrics; thread-safe.
  WorkerMetrics& metrics() { return metrics_; }
  static std::string MetricsAddressFilePath(const std::string& work_dir);
  // Where the worker keeps its secret (service.proto's worker credentials), mode 0600.
  static std::string SecretFilePath(const std::string& work_dir);

 private:
  WorkerAgent(WorkerAgentConfig config, std::shared_ptr<grpc::ChannelCredentials> credentials,
              std::string join_token);
  // Adds the join token (if any) and the worker secret to `context`'s metadata.
  void AddCredentials(grpc::ClientContext& context) const;
  // The secret in SecretFilePath(work_dir), or a new one written there (0600) when the file is
  // missing. DATA_LOSS naming the file when it holds no secret; a read or write error names the
  // file.
  static absl::StatusOr<std::string> LoadOrMakeSecret(const std::string& work_dir);
  // Whether `status` is the coordinator refusing this worker; if so, records it as Run's result
  // and stops the agent.
  bool RefusedByCoordinator(const grpc::Status& status, const char* call);
  // Shutdown's work. On the session's own thread (a Drain) it waits only for Leaving to be
  // written and leaves the session for the coordinator to end (that thread reads its end).
  void Stop(const std::string& why, bool on_session_thread);
  // Registers (retrying); false when shut down meanwhile.
  bool RegisterLoop();
  // One session until it ends; how it ended.
  grpc::Status SessionLoop();
  void HeartbeatLoop(grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>* stream);
  // Removes the shown job's series once its rank here has been over for config_.metrics_linger,
  // and those of earlier jobs (lingering_jobs_) once theirs have.
  void ExpireEndedJobSeries();
  void Dispatch(const v1::CoordinatorMessage& message);
  bool Send(const v1::WorkerMessage& message);
  v1::WorkerMessage Heartbeat();
  // Stops and joins the runner, if any: kSupersede abandons its upload (a new Assign: the
  // coordinator moved on); kShutdown lets rank 0 upload for at most
  // config_.shutdown_upload_timeout.
  enum class Reap { kSupersede, kShutdown };
  void ReapRunner(Reap how, const std::string& reason);

  // Sessions refused this long because another one holds this worker's id end Run with
  // FAILED_PRECONDITION (a copied work dir); a restarted worker's old session goes sooner.
  static constexpr std::chrono::seconds kDuplicateIdFor{15};

  WorkerAgentConfig config_;
  int lock_fd_ = -1;                            // holds the flock on <work_dir>/LOCK
  WorkerMetrics metrics_;                       // outlives http_ and every runner
  std::unique_ptr<metrics::HttpServer> http_;   // /metrics; null without a listener
  std::string metrics_address_;
  std::string metrics_job_id_;                  // guarded by mu_; the job whose series are shown
  // guarded by mu_; earlier jobs whose series still linger -> when their rank here ended
  std::map<std::string, std::chrono::steady_clock::time_point> lingering_jobs_;
  // guarded by mu_; when the heartbeat thread first saw that job's rank ended (unset: running).
  std::optional<std::chrono::steady_clock::time_point> rank_ended_at_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  const std::string join_token_;               // "" = none
  std::atomic<bool> connected_{false};  // read by the HTTP thread
  std::atomic<bool> stopping_{false};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::string worker_id_;                       // guarded by mu_
  std::string worker_secret_;                   // set by Create, then constant
  absl::Status refused_;                        // guarded by mu_; Run's result when not OK
  int64_t heartbeat_interval_ms_ = 1000;        // guarded by mu_
  grpc::ClientContext* session_context_ = nullptr;  // guarded by mu_; the open session's
  grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>* stream_ = nullptr;  // mu_
  std::mutex write_mu_;                         // one Write at a time
  std::string leaving_reason_;                  // guarded by mu_; the first Shutdown's `why`
  std::unique_ptr<RankRunner> runner_;          // guarded by mu_; set by the reader thread
  std::string last_cancelled_job_;              // guarded by mu_; the latest Cancel's job
};

}  // namespace mat::worker
