#include "coordinator/coordinator_metrics.h"

namespace mat::coordinator {

std::vector<double> MaskLatencyBuckets() {
  return {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
          25e-3, 50e-3,  100e-3, 250e-3, 500e-3, 1.0};
}

CoordinatorMetrics::CoordinatorMetrics()
    : module_lambda_max(registry.AddGauge(
          "mat_module_lambda_max",
          "Principal eigenvalue of the module's modular NTK (J_l J_l^T) at the job's last "
          "decision, the mean over the ranks.",
          {"mat_job", "group", "layer", "module"})),
      module_active(registry.AddGauge(
          "mat_module_active", "1 when the module is trained under the job's latest mask, else 0.",
          {"mat_job", "group", "layer", "module"})),
      policy_threshold(registry.AddGauge(
          "mat_policy_threshold",
          "The MAT policy's lambda threshold of the group at the last decision (NaN in warm-up).",
          {"mat_job", "group"})),
      job_step(registry.AddGauge("mat_job_step", "Latest training step of the job (rank 0).",
                                 {"mat_job"})),
      job_loss(registry.AddGauge(
          "mat_job_loss",
          "Latest loss of the job by split (train, val, test), nats per predicted token.",
          {"mat_job", "split"})),
      job_flops_total(registry.AddCounter(
          "mat_job_flops_total",
          "FLOPs the job spent so far, summed over its ranks' latest progress reports.",
          {"mat_job"})),
      job_flops_by_phase_total(registry.AddCounter(
          "mat_job_flops_by_phase_total",
          "The job's FLOPs by phase (forward, activation_grad, weight_grad, spectral), all ranks, "
          "from rank 0's summary times the ranks when the job ends; they add up to the job's "
          "total.",
          {"mat_job", "phase"})),
      job_flops_saved_total(registry.AddCounter(
          "mat_job_flops_saved_total",
          "FLOPs the masks saved against full training, all ranks (rank 0's summary times the "
          "ranks, at the end).",
          {"mat_job"})),
      job_active_modules(registry.AddGauge(
          "mat_job_active_modules", "Modules trained under the job's latest mask.", {"mat_job"})),
      mask_latency_seconds(registry.AddHistogram(
          "mat_coordinator_mask_latency_seconds",
          "From the spectra report completing a probe step to every rank's mask update queued.",
          {}, MaskLatencyBuckets())),
      workers(registry.AddGauge(
          "mat_coordinator_workers",
          "Registered workers by state (idle, busy, disconnected, draining).", {"state"})),
      jobs(registry.AddGauge(
          "mat_coordinator_jobs",
          "Jobs by state (queued, running, succeeded, failed, cancelled, restarting).",
          {"state"})),
      worker_heartbeat_age_seconds(registry.AddGauge(
          "mat_coordinator_worker_heartbeat_age_seconds",
          "Seconds since the worker's last message, for workers with an open session.",
          {"worker"})),
      spectra_reports_total(registry.AddCounter(
          "mat_coordinator_spectra_reports_total",
          "Spectra reports of ranks taken into a probe step.", {})),
      rejected_messages_total(registry.AddCounter(
          "mat_coordinator_rejected_messages_total",
          "Worker messages the coordinator refused (answered with a Reject), by status code.",
          {"code"})),
      grpc_requests_total(registry.AddCounter(
          "mat_coordinator_grpc_requests_total",
          "gRPC calls the coordinator finished, by full method name and status code.",
          {"method", "code"})),
      process(registry) {}

std::vector<std::string> MetricNames() {
  CoordinatorMetrics metrics;
  return metrics.registry.Names();
}

}  // namespace mat::coordinator
