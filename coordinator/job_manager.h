// JobManager: the coordinator's job manager (one of the managers behind the Coordinator facade,
// coordinator.h; in the style of Ray's GCS job manager). It owns what a job is apart from its
// running ranks: admission and storage of new jobs, the JobService reads (job, list, spectra,
// logs), every state change and the events its watchers receive, the replayed schedule of a rand
// job, and the job-level metrics (mat_coordinator_jobs, a finished job's series retention, the
// summary's FLOPs). It works on the JobStore only; it sends nothing to workers (the facade does
// that around it) and knows nothing of sessions.
//
//   Submit       fills the spec's defaults, validates it (INVALID_ARGUMENT naming the field, also
//                for fields this server does not know), checks admission and
//                policy.rand_schedule_job (ReplayedSchedule's errors; INVALID_ARGUMENT when a
//                decision of the replayed job is not at a multiple of this spec's
//                policy.probe_every), stores it QUEUED; idempotent by client_request_id.
//                Module groups and sizes are checked when the job's worker declares its
//                modules (ApplyRandSchedule): the spec alone does not name them.
//   Get, List, GetSpectra, GetLogs   read the store (NOT_FOUND naming an unknown job).
//   CheckCancellable  FAILED_PRECONDITION naming the state of a finished job.
//   Watch, Unwatch, WatcherCount, UpdateState, PublishEvent   the watch subscriptions.
//
// The errors and messages are the Coordinator's (coordinator.h documents them per RPC).
// Thread-safety: not thread-safe; the coordinator loop only. Listeners are called on it, from
// inside the call that caused the event. Not copyable.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "api/job_spec.h"
#include "api/job_state.h"
#include "coordinator/clock.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_store.h"
#include "mat/v1/job.pb.h"
#include "mat/v1/service.pb.h"
#include "policy/policy.h"

namespace mat::coordinator {

// Receives the events of one watched job on the coordinator loop. `last` is true exactly once,
// for the event that moves the job to a terminal state (SUCCEEDED, FAILED, CANCELLED); the
// subscription is already removed when that call happens, so nothing follows it.
// A listener may call UnwatchJob (its own id or another) and WatchJob; it must not destroy the
// Coordinator.
using JobEventListener = std::function<void(const v1::JobEvent& event, bool last)>;

// Identifies one subscription; 0 is never used.
using WatchId = uint64_t;

// True for SUCCEEDED, FAILED and CANCELLED (api/job_state.h).
using api::IsTerminalJobState;

// The wire form of a stored job (progress fields stay 0 / "" / unset until workers report them).
v1::Job JobRecordToProto(const JobRecord& record);

// INVALID_ARGUMENT "job_id is empty" for a request that names no job.
absl::Status CheckJobId(const std::string& job_id);

struct JobManagerOptions {
  // Admission limits of Submit (api/job_spec.h CheckJobSpecLimits).
  api::JobSpecLimits spec_limits;
  // Active (QUEUED, RUNNING, RESTARTING) jobs per client, count; 0 = unlimited.
  int64_t max_jobs_per_client = 0;
  // A finished job's metric series stay this long (RefreshMetrics), seconds of clock.NowMs().
  int64_t metrics_retention_seconds = 600;
};

class JobManager {
 public:
  // `store`, `clock` and `metrics` (nullptr = no metrics) are borrowed and must outlive the
  // manager. With metrics, the job counts start from the store's jobs.
  JobManager(JobStore& store, const Clock& clock, CoordinatorMetrics* metrics,
             JobManagerOptions options);
  JobManager(const JobManager&) = delete;
  JobManager& operator=(const JobManager&) = delete;

  // Coordinator::SubmitJob without the scheduling: the caller schedules when reply.created().
  absl::StatusOr<v1::SubmitJobReply> Submit(const std::string& client_request_id,
                                            const v1::JobSpec& spec, const std::string& client);
  // The stored job and its rank assignments (none while QUEUED); the rank's mask_version is the
  // stored one (the facade raises it to a running rank's live acknowledgement).
  absl::StatusOr<v1::GetJobReply> Get(const std::string& job_id);
  // Only the jobs `client` submitted when set.
  absl::StatusOr<v1::ListJobsReply> List(const v1::ListJobsRequest& request,
                                         const std::optional<std::string>& client = {});
  absl::StatusOr<v1::GetSpectraReply> GetSpectra(const v1::GetSpectraRequest& request);
  absl::StatusOr<v1::GetJobLogsReply> GetLogs(const v1::GetJobLogsRequest& request);
  // OK when the job exists and has not finished (NOT_FOUND, FAILED_PRECONDITION "job J is
  // already SUCCEEDED: nothing to cancel").
  absl::Status CheckCancellable(const std::string& job_id);
  // Deletes a finished job from the store (JobStore::DeleteJob's errors; INVALID_ARGUMENT for an
  // empty id) and removes its metric series at once.
  absl::Status Delete(const std::string& job_id);

  // The active-count schedule of the MAT job `replayed_job_id` (policy.rand_schedule_job): one
  // entry per stored decision (policy::ScheduleEntryFromDecisionJson), ascending steps.
  // INVALID_ARGUMENT for no such job, a job that did not run policy mat, or one with no stored
  // decision; FAILED_PRECONDITION for one not SUCCEEDED; DATA_LOSS for a stored decision that is
  // not a Decision::ToJson object; a store error as it is.
  absl::StatusOr<std::vector<policy::Policy::ScheduleEntry>> ReplayedSchedule(
      const std::string& replayed_job_id);
  // For `spec` with policy.rand_schedule_job: `policy` (of job `job_id`) replays that job's
  // schedule (SetReplayedSchedule). No-op without one. The errors of ReplayedSchedule and
  // SetReplayedSchedule (other module groups or sizes), prefixed "job J cannot replay the
  // decisions of job R: "; the policy is unchanged then.
  absl::Status ApplyRandSchedule(const std::string& job_id, const v1::JobSpec& spec,
                                 policy::Policy& policy);

  // Subscribes `listener`; calls it once with the current state before returning (see
  // Coordinator::WatchJob). REQUIRES: listener is non-empty.
  absl::StatusOr<WatchId> Watch(const std::string& job_id, JobEventListener listener);
  void Unwatch(WatchId id);
  int WatcherCount(const std::string& job_id) const;
  // Stores the transition (IsLegalJobTransition, else FAILED_PRECONDITION; NOT_FOUND), counts it
  // for mat_coordinator_jobs, and publishes a JobStateChange (the last event for a terminal
  // state).
  absl::Status UpdateState(const std::string& job_id, v1::JobState state,
                           const std::string& error_message = "");
  // Delivers a non-state event, time_unix_seconds filled in when 0.
  // REQUIRES: event.job_id() is set and the event is not a JobStateChange.
  void PublishEvent(v1::JobEvent event);

  // rank 0's summary.json text -> the per-phase FLOPs and flops_saved series (no-op without
  // metrics, for empty or malformed text).
  void RecordSummaryMetrics(const std::string& job_id, const std::string& summary_json);
  // Removes every series of a job that finished more than metrics_retention_seconds ago.
  void ExpireFinishedSeries();

 private:
  v1::JobEvent StateEvent(const JobRecord& job) const;
  // Calls every listener of event.job_id(); with `last`, each subscription is removed first.
  void Publish(const v1::JobEvent& event, bool last);
  // Records a job's new state for mat_coordinator_jobs (a finished job's series expire later).
  void NoteJobState(const std::string& job_id, v1::JobState state);
  // At start: the job-level series (step, losses, FLOPs, active modules, the summary's) of a job
  // that finished less than metrics_retention_seconds ago (by its stored updated_unix_seconds),
  // expiring when they would have without the restart, and the series of its last decision
  // (RestoreDecisionSeries).
  void RestoreFinishedSeries(const JobRecord& job);
  // mat_module_lambda_max, mat_module_active and mat_policy_threshold of the job's last stored
  // decision, as MaskEngine set them then: the modules and λ from its JSON, active from the
  // MaskUpdate sent for it (the every-step bits; the JSON's mask before schema v4). Logs and
  // skips a decision it cannot read.
  void RestoreDecisionSeries(const std::string& job_id);
  void UpdateJobGauges();

  JobStore& store_;
  const Clock& clock_;
  CoordinatorMetrics* metrics_;
  JobManagerOptions options_;

  WatchId next_watch_id_ = 1;
  // job id -> its subscriptions; id order = subscription order = delivery order. A job with no
  // subscription has no entry.
  std::map<std::string, std::map<WatchId, JobEventListener>> watches_by_job_;
  std::map<WatchId, std::string> job_of_watch_;

  // Metrics only. Non-terminal jobs by id -> state, terminal jobs counted by state (both from
  // the store at start, then kept by NoteJobState); finished jobs -> NowMs() of their end, until
  // ExpireFinishedSeries removes their series.
  std::map<std::string, v1::JobState> live_job_states_;
  std::map<v1::JobState, int64_t> terminal_job_counts_;
  std::map<std::string, int64_t> finished_job_ms_;
};

}  // namespace mat::coordinator
