// Every Prometheus metric of mat-worker (DESIGN §9; STYLE habit 14: defined in this one file,
// dashboards use only these names). WorkerMetrics owns the worker's metrics::Registry, which
// WorkerAgent serves on `--metrics-listen` at /metrics; RankRunner updates the series of its
// job and rank from the training thread (its TrainerHooks calls).
//
//   name                                       type       labels     meaning
//   mat_worker_step_duration_seconds           histogram  mat_job, rank  one training step's wall time, without the probe, the
//                                                                    wait for the mask and evaluation (Δ TrainerProgress.wall_seconds
//                                                                    minus the two)
//   mat_worker_spectral_duration_seconds       histogram  mat_job, rank  one λ probe (ProbeResult.seconds), MAT policies only
//   mat_worker_mask_wait_seconds               histogram  mat_job, rank  from this rank's SpectraReport sent to the step's MaskUpdate here
//   mat_worker_allreduce_bytes_total           counter    mat_job, rank  gradient bytes all-reduced (trainer/grad_sync.h)
//   mat_worker_allreduce_skipped_bytes_total   counter    mat_job, rank  gradient bytes of masked-off modules not sent
//   mat_worker_last_step_timestamp_seconds     gauge      mat_job, rank  Unix time at which the latest step finished
//   mat_worker_step                            gauge      mat_job, rank  steps completed
//   mat_worker_busy                            gauge      -          1 while this worker runs a rank, else 0
//   mat_build_info, process_*                  (metrics/process_metrics.h: the build; CPU, memory, fds,
//                                              start time; read at each scrape)
//
// A job's series are removed --metrics-linger-seconds after its rank here ended (so that the final
// values are scraped), also when the worker has started a rank of another job meanwhile.
//
// Thread-safety: the handles and the registry are thread-safe (metrics/registry.h). Not copyable.
#pragma once

#include <string>
#include <vector>

#include "metrics/process_metrics.h"
#include "metrics/registry.h"

namespace mat::worker {

struct WorkerMetrics {
  WorkerMetrics();
  WorkerMetrics(const WorkerMetrics&) = delete;
  WorkerMetrics& operator=(const WorkerMetrics&) = delete;

  metrics::Registry registry;  // declared first: the handles point into it

  metrics::Histogram step_duration_seconds;
  metrics::Histogram spectral_duration_seconds;
  metrics::Histogram mask_wait_seconds;
  metrics::Counter allreduce_bytes_total;
  metrics::Counter allreduce_skipped_bytes_total;
  metrics::Gauge last_step_timestamp_seconds;
  metrics::Gauge step;
  metrics::Gauge busy;
  metrics::ProcessMetrics process;  // last: its families follow the mat_worker_* ones
};

// Every metric name of mat-worker, in definition order (for tests of dashboards).
std::vector<std::string> MetricNames();

}  // namespace mat::worker
