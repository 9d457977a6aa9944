// mat-coordinator: flags -> CoordinatorDaemonConfig, start the daemon, wait for SIGTERM/SIGINT,
// shut down gracefully. Exit codes: 0 after a graceful stop, 1 when the daemon cannot start,
// 2 for bad flags.
#include <signal.h>

#include <cstdio>
#include <iostream>

#include "CLI/CLI.hpp"
#include "common/logging.h"
#include "coordinator/daemon.h"
#include "api/grpc_status.h"
#include "spdlog/spdlog.h"

namespace {

// Every flag, filling `config`.
void AddFlags(CLI::App& app, mat::coordinator::CoordinatorDaemonConfig& config) {
  app.add_option("--listen", config.listen_address,
                 "gRPC address HOST:PORT (port 0: a free port, printed and written to "
                 "STATE_DIR/coordinator.addr)")
      ->capture_default_str();
  app.add_option("--metrics-listen", config.metrics_listen_address,
                 "HTTP address HOST:PORT for /healthz, /readyz and /metrics ('' = none)")
      ->capture_default_str();
  app.add_option("--state-dir", config.state_dir, "directory of the SQLite state")
      ->capture_default_str();
  app.add_option("--log-level", config.log_level, "trace, debug, info, warn or error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->capture_default_str();
  app.add_flag("--log-json", config.log_json, "one JSON object per log line");
  app.add_option("--shutdown-grace-seconds", config.shutdown_grace_seconds,
                 "how long in-flight RPCs may run on shutdown")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--heartbeat-interval-ms", config.heartbeat_interval_ms,
                 "workers send something at least this often; one silent for 3 intervals is "
                 "lost (milliseconds)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--health-timeout-ms", config.health_timeout_ms,
                 "/healthz and /readyz answer 503 when the coordinator loop has not checked the "
                 "store within this time (milliseconds)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--metrics-retention-seconds", config.metrics_retention_seconds,
                 "how long a finished job's metric series stay on /metrics (seconds)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--job-retention-days", config.job_retention_days,
                 "delete a finished job and everything kept of it (model and other artifacts, "
                 "logs, λ history) this many days after it ended (fractions allowed); 0 = keep "
                 "until `matctl delete`")
      ->check(CLI::Range(0.0, 36500.0))
      ->capture_default_str();
  app.add_option("--auth-token-file", config.auth_token_file,
                 "JobService clients must send 'authorization: Bearer TOKEN' with a token of this "
                 "file (one per line, '#' comments); without it EVERY client is admitted "
                 "(a warning is logged)");
  app.add_option("--admin-token-file", config.admin_token_file,
                 "operators' bearer tokens (one per line, '#' comments; needs --auth-token-file): "
                 "with it, other clients may read, list, cancel and delete only the jobs they "
                 "submitted and may not drain or undrain workers; without it every admitted "
                 "client may do all of it");
  app.add_option("--join-token-file", config.join_token_file,
                 "workers must send a token of this file (one per line, '#' comments) as "
                 "x-mat-join-token; without it every worker is admitted (a trusted single host)");
  app.add_flag("--open-worker-service", config.open_worker_service,
               "with --auth-token-file but no --join-token-file, start anyway (every worker "
               "admitted; refused otherwise)");
  app.add_option("--tls-cert", config.tls_cert_file,
                 "serve gRPC over TLS with this certificate chain (PEM; needs --tls-key)");
  app.add_option("--tls-key", config.tls_key_file, "the private key of --tls-cert (PEM)");
  app.add_option("--tls-ca", config.tls_ca_file,
                 "mutual TLS: require client certificates signed by this CA (PEM; needs "
                 "--tls-cert)");
  // Limits and data roots (issue 6, "Security").
  app.add_option("--data-root", config.data_roots,
                 "job specs may only name a data.dir (absolute) under this directory; "
                 "repeatable; `..` and symlinks that lead outside are refused. Without it any "
                 "data.dir is accepted (a trusted single host)");
  app.add_option("--max-message-bytes", config.max_receive_message_bytes,
                 "largest gRPC request accepted (bytes)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-spec-bytes", config.max_spec_bytes,
                 "largest job spec accepted, serialized (bytes; 0 = no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--max-model-params", config.max_model_params,
                 "largest model accepted, parameters computed from the spec's model shape with "
                 "a vocabulary of 50000 (0 = no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--max-jobs-per-client", config.max_jobs_per_client,
                 "queued, running or restarting jobs one client may have (client = its bearer "
                 "token, or its host without --auth-token-file; 0 = no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--max-log-lines", config.max_log_lines,
                 "log lines kept per job, the newest (matctl logs; 0 = no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--artifact-dir", config.artifact_dir,
                 "where the jobs' artifacts are kept (matctl download; default "
                 "<state-dir>/artifacts)");
  app.add_option("--max-artifact-bytes", config.max_artifact_bytes,
                 "bytes of artifacts kept per job; a larger upload is refused (0 = no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
}

}  // namespace

int main(int argc, char** argv) {
  mat::coordinator::CoordinatorDaemonConfig config;
  CLI::App app{
      "mat-coordinator: the MAT service's scheduler daemon (JobService and WorkerService over "
      "gRPC)"};
  AddFlags(app, config);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }

  mat::common::InitLogging(config.log_level, config.log_json);

  // Block the stop signals in every thread (gRPC's and Asio's inherit this mask), and take them
  // synchronously below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto daemon = mat::coordinator::CoordinatorDaemon::Start(config);
  if (!daemon.ok()) {
    spdlog::error("cannot start: {}", mat::api::StatusLine(daemon.status()));
    std::cerr << "mat-coordinator: " << mat::api::StatusLine(daemon.status()) << "\n";
    return 1;
  }
  std::cout << "listening on " << (*daemon)->grpc_address() << "\n";
  if (!(*daemon)->metrics_address().empty()) {
    std::cout << "metrics listening on " << (*daemon)->metrics_address() << "\n";
  }
  std::cout.flush();

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  spdlog::info("received signal {}; stopping", signal_number);
  (*daemon)->Shutdown();
  return 0;
}
