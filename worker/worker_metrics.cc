#include "worker/worker_metrics.h"

namespace mat::worker {

WorkerMetrics::WorkerMetrics()
    : step_duration_seconds(registry.AddHistogram(
          "mat_worker_step_duration_seconds",
          "Wall time of one training step (without the probe, the mask wait and evaluation).",
          {"mat_job", "rank"}, metrics::ExponentialBuckets(1e-3, 2, 16))),
      spectral_duration_seconds(registry.AddHistogram(
          "mat_worker_spectral_duration_seconds", "Wall time of one lambda_max probe.",
          {"mat_job", "rank"}, metrics::ExponentialBuckets(1e-3, 2, 16))),
      mask_wait_seconds(registry.AddHistogram(
          "mat_worker_mask_wait_seconds",
          "From this rank's spectra report to the coordinator's mask for the step.",
          {"mat_job", "rank"}, metrics::ExponentialBuckets(1e-4, 2, 18))),
      allreduce_bytes_total(registry.AddCounter("mat_worker_allreduce_bytes_total",
                                                "Gradient bytes all-reduced over the ranks.",
                                                {"mat_job", "rank"})),
      allreduce_skipped_bytes_total(registry.AddCounter(
          "mat_worker_allreduce_skipped_bytes_total",
          "Gradient bytes of masked-off modules that were not all-reduced.", {"mat_job", "rank"})),
      last_step_timestamp_seconds(registry.AddGauge(
          "mat_worker_last_step_timestamp_seconds",
          "Unix time at which the rank's latest training step finished.", {"mat_job", "rank"})),
      step(registry.AddGauge("mat_worker_step", "Training steps the rank completed.",
                             {"mat_job", "rank"})),
      busy(registry.AddGauge("mat_worker_busy", "1 while the worker runs a rank of a job.", {})),
      process(registry) {}

std::vector<std::string> MetricNames() {
  WorkerMetrics metrics;
  return metrics.registry.Names();
}

}  // namespace mat::worker
