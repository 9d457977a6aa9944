// mat-worker: flags -> WorkerAgentConfig, run the agent until SIGTERM/SIGINT (or a Drain).
// Exit codes: 0 after a stop, 1 when the agent cannot start or the coordinator refuses it (a
// missing or wrong join token), 2 for bad flags.
#include <signal.h>

#include <filesystem>
#include <iostream>
#include <system_error>
#include <thread>

#include "CLI/CLI.hpp"
#include "worker/log_forwarder.h"
#include "worker/worker_agent.h"
#include "common/allocator.h"
#include "common/logging.h"
#include "spdlog/spdlog.h"

namespace {
// Exit status when the coordinator refuses this worker for good (EX_CONFIG of sysexits.h).
constexpr int kExitRefused = 78;

// What the flags fill: the agent's config and what main turns into it.
struct Flags {
  mat::worker::WorkerAgentConfig config;
  std::string log_level = "info";
  bool log_json = false;
  int64_t mask_timeout_ms = config.mask_timeout.count();
  int64_t rendezvous_timeout_ms = config.rendezvous_timeout.count();
  int64_t metrics_linger_seconds = config.metrics_linger.count();
  int64_t shutdown_upload_timeout_ms = config.shutdown_upload_timeout.count();
};

void AddFlags(CLI::App& app, Flags& f) {
  app.footer("Exit status: 0 after SIGTERM/SIGINT (its rank's job restarts elsewhere; this is how "
             "to drain a worker), 2 for bad flags, 78 when the "
             "coordinator refuses this worker for good (UNAUTHENTICATED or PERMISSION_DENIED: a "
             "missing or wrong --join-token-file, or WORK_DIR/worker.id with another "
             "worker.secret; INVALID_ARGUMENT: say a bad WORK_DIR/worker.id; "
             "FAILED_PRECONDITION: another worker connected with this worker's id) or when "
             "WORK_DIR/worker.secret holds no secret, 1 for any other error.");
  app.add_option("--coordinator", f.config.coordinator_address, "coordinator HOST:PORT")
      ->capture_default_str();
  app.add_option("--work-dir", f.config.work_dir,
                 "checkpoints, logs and worker.id (created if missing)")
      ->capture_default_str();
  app.add_option("--checkpoint-dir", f.config.checkpoint_dir,
                 "where ranks keep checkpoints and logs (DIR/jobs/JOB/rankR); storage every "
                 "worker shares lets a job restarted on other workers resume (default: "
                 "--work-dir)");
  app.add_option("--device", f.config.device, "cpu or cuda:N")->capture_default_str();
  app.add_option("--host", f.config.host, "address other ranks reach this worker at")
      ->capture_default_str();
  app.add_option("--rendezvous-port", f.config.rendezvous_port,
                 "TCP port for a job's c10d store when this worker is rank 0 (0: a free one)")
      ->capture_default_str();
  app.add_option("--threads", f.config.threads,
                 "intra-op threads per rank (0: the job's train.threads)")
      ->capture_default_str();
  app.add_option("--artifact-piece-bytes", f.config.artifact_piece_bytes,
                 "bytes per piece when rank 0 uploads a job's artifacts to the coordinator")
      ->capture_default_str();
  app.add_option("--mask-timeout-ms", f.mask_timeout_ms,
                 "how long a rank waits for a due mask before failing (milliseconds)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-mask-staleness-steps", f.config.max_mask_staleness_steps,
                 "while the coordinator is away, train on under the previous mask for at most "
                 "this many steps (the ranks agree), then wait; 0: wait at the probe step (the "
                 "result then equals a fault-free run's)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--rendezvous-timeout-ms", f.rendezvous_timeout_ms,
                 "how long forming a job's process group may take (milliseconds)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--shutdown-upload-timeout-ms", f.shutdown_upload_timeout_ms,
                 "when stopped (SIGTERM, a drain) while running rank 0 of a job, upload the "
                 "job's artifacts (its newest checkpoint's model) for at most this long before "
                 "exiting (milliseconds; 0: none); keep it under the service manager's stop "
                 "timeout")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--metrics-listen", f.config.metrics_listen_address,
                 "HTTP address HOST:PORT for /metrics (port 0: a free one, logged and written to "
                 "WORK_DIR/worker.metrics.addr; '' = none)")
      ->capture_default_str();
  app.add_option("--metrics-linger-seconds", f.metrics_linger_seconds,
                 "how long a job's series stay on /metrics after its rank here ended (seconds)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--join-token-file", f.config.join_token_file,
                 "send the first token of this file (one per line, '#' comments) as the join "
                 "token a coordinator started with --join-token-file requires");
  app.add_option("--tls-ca", f.config.tls_ca_file,
                 "connect over TLS, verifying the coordinator's certificate against this CA (PEM)");
  app.add_option("--tls-cert", f.config.tls_cert_file,
                 "client certificate (PEM) for a coordinator that requires mutual TLS; needs "
                 "--tls-key and --tls-ca");
  app.add_option("--tls-key", f.config.tls_key_file, "the private key of --tls-cert (PEM)");
  app.add_option("--data-root", f.config.data_roots,
                 "only run jobs whose data.dir is under this directory (repeatable; relative "
                 "data.dir is resolved against the working directory; `..` and symlinks that "
                 "lead outside are refused); without it any data.dir is read");
  app.add_option("--log-level", f.log_level, "trace, debug, info, warn or error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->capture_default_str();
  app.add_flag("--log-json", f.log_json, "one JSON object per log line");
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  CLI::App app{"mat-worker: trains ranks of MAT jobs for a mat-coordinator"};
  AddFlags(app, f);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  for (std::string& root : f.config.data_roots) {
    std::error_code error;
    const std::filesystem::path absolute = std::filesystem::absolute(root, error);
    if (error || root.empty()) {
      std::cerr << "mat-worker: --data-root '" << root << "' is not a usable path\n";
      return 2;
    }
    root = absolute.lexically_normal().string();
  }
  f.config.mask_timeout = std::chrono::milliseconds(f.mask_timeout_ms);
  f.config.metrics_linger = std::chrono::seconds(f.metrics_linger_seconds);
  f.config.rendezvous_timeout = std::chrono::milliseconds(f.rendezvous_timeout_ms);
  f.config.shutdown_upload_timeout = std::chrono::milliseconds(f.shutdown_upload_timeout_ms);
  mat::common::InitLogging(f.log_level, f.log_json);
  // Each rank's lines also go to the coordinator (`matctl logs`).
  auto log_forwarder = std::make_shared<mat::worker::LogForwarder>();
  log_forwarder->set_level(spdlog::default_logger()->level());
  spdlog::default_logger()->sinks().push_back(log_forwarder);
  f.config.logs = log_forwarder.get();
  mat::common::ConfigureAllocatorForTraining();

  // Gloo writes to its peers' sockets without MSG_NOSIGNAL: a write to a peer that went away
  // (killed, or frozen until the collective timed out) would end this process with SIGPIPE,
  // silently, instead of failing the rank's collective with EPIPE and going on.
  ::signal(SIGPIPE, SIG_IGN);
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto agent = mat::worker::WorkerAgent::Create(f.config);
  if (!agent.ok()) {
    std::cerr << "mat-worker: " << agent.status().ToString() << "\n";
    // A flag the agent refused (device, threads, addresses): bad command-line usage.
    if (agent.status().code() == absl::StatusCode::kInvalidArgument) return 2;
    // A damaged WORK_DIR/worker.secret: a restart cannot help (systemd stops on 78).
    if (agent.status().code() == absl::StatusCode::kDataLoss) return kExitRefused;
    return 1;
  }
  std::thread signals([&] {
    int signal = 0;
    sigwait(&stop_signals, &signal);
    spdlog::info("signal {}: stopping", signal);
    (*agent)->Shutdown(signal == SIGTERM ? "SIGTERM" : "SIGINT");
  });
  signals.detach();
  absl::Status status = (*agent)->Run();
  if (!status.ok()) {
    std::cerr << "mat-worker: " << status.ToString() << "\n";
    // Refused for good (a missing or wrong join token, a worker id it does not take): retrying
    // cannot help, so a distinct
    // code that the systemd unit's RestartPreventExitStatus stops on.
    if (status.code() == absl::StatusCode::kUnauthenticated ||
        status.code() == absl::StatusCode::kPermissionDenied ||
        status.code() == absl::StatusCode::kInvalidArgument ||
        status.code() == absl::StatusCode::kFailedPrecondition) {
      return kExitRefused;
    }
    return 1;
  }
  return 0;
}
