// Every Prometheus metric of mat-coordinator (DESIGN §9; STYLE habit 14: defined in this one
// file, dashboards use only these names). CoordinatorMetrics owns the daemon's metrics::Registry
// and a handle per family; the Coordinator (on its loop) updates them, the HTTP thread renders
// `registry.Expose()` on /metrics. The registry's mutex is the only thing the two share.
//
//   name                                          type       labels                      set by
//   mat_module_lambda_max                         gauge      mat_job, group, layer, module   decision: rank-mean λ_max of the module
//   mat_module_active                             gauge      mat_job, group, layer, module   decision: 1 = on under the latest mask
//   mat_policy_threshold                          gauge      mat_job, group                  decision: λ_α of the group (NaN in warm-up)
//   mat_job_step                                  gauge      mat_job                     rank 0's Progress
//   mat_job_loss                                  gauge      mat_job, split                  rank 0's Progress: train | val | test, nats/token
//   mat_job_flops_total                           counter    mat_job                     Σ ranks' latest Progress
//   mat_job_flops_by_phase_total                  counter    mat_job, phase                  rank 0's summary x world_size when the job succeeds:
//                                                                                        forward | activation_grad | weight_grad | spectral
//                                                                                        (they add up to the job's total, all ranks; no series
//                                                                                        is a sum of others)
//   mat_job_flops_saved_total                     counter    mat_job                     rank 0's summary (flops_saved) x world_size at the end
//   mat_job_active_modules                        gauge      mat_job                     decision: modules on under the latest mask
//   mat_coordinator_mask_latency_seconds          histogram  -                           the report completing a probe step entered
//                                                                                        HandleWorkerMessage -> every rank's MaskUpdate
//                                                                                        handed to its channel
//   mat_coordinator_workers                       gauge      state (idle|busy|disconnected|draining)
//   mat_coordinator_jobs                          gauge      state (queued|running|succeeded|failed|cancelled|restarting)
//   mat_coordinator_worker_heartbeat_age_seconds  gauge      worker                      open sessions: time since the last message
//   mat_coordinator_spectra_reports_total         counter    -                           SpectraReports taken into a probe
//   mat_coordinator_rejected_messages_total       counter    code (INVALID_ARGUMENT, …)  worker messages answered with a Reject
//   mat_coordinator_grpc_requests_total           counter    method, code                every gRPC call when it ends
//                                                                                        (grpc_metrics.h): method
//                                                                                        "mat.v1.JobService/GetJob", code "OK",
//                                                                                        "NOT_FOUND", …; a Session stream counts
//                                                                                        once, when it ends
//   mat_build_info, process_*                     (metrics/process_metrics.h)            the build; CPU, memory, fds, start time
//
// Every series with a `mat_job` label goes away `metrics_retention_seconds` after its job finished
// (Coordinator::RefreshMetrics).
//
// Thread-safety: the handles and the registry are thread-safe (metrics/registry.h). Not copyable.
#pragma once

#include <string>
#include <vector>

#include "metrics/process_metrics.h"
#include "metrics/registry.h"

namespace mat::coordinator {

struct CoordinatorMetrics {
  CoordinatorMetrics();
  CoordinatorMetrics(const CoordinatorMetrics&) = delete;
  CoordinatorMetrics& operator=(const CoordinatorMetrics&) = delete;

  metrics::Registry registry;  // declared first: the handles point into it

  metrics::Gauge module_lambda_max;
  metrics::Gauge module_active;
  metrics::Gauge policy_threshold;
  metrics::Gauge job_step;
  metrics::Gauge job_loss;
  metrics::Counter job_flops_total;
  metrics::Counter job_flops_by_phase_total;
  metrics::Counter job_flops_saved_total;
  metrics::Gauge job_active_modules;
  metrics::Histogram mask_latency_seconds;
  metrics::Gauge workers;
  metrics::Gauge jobs;
  metrics::Gauge worker_heartbeat_age_seconds;
  metrics::Counter spectra_reports_total;
  metrics::Counter rejected_messages_total;
  metrics::Counter grpc_requests_total;
  metrics::ProcessMetrics process;  // last: its families follow the mat_coordinator_* ones
};

// The upper bounds of mat_coordinator_mask_latency_seconds: 50 µs … 1 s.
std::vector<double> MaskLatencyBuckets();

// Every metric name of mat-coordinator, in definition order (for tests of dashboards).
std::vector<std::string> MetricNames();

}  // namespace mat::coordinator
