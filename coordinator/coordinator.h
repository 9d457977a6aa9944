// Coordinator: the coordinator daemon's domain object behind JobService (DESIGN §7, §8). It owns
// the JobStore and answers the job RPCs in domain terms (mat.v1 messages in and out, absl::Status
// errors), with no gRPC and no threads, so it is unit-tested without a network; the gRPC adapter
// (coordinator/job_service.h) only converts and posts here.
//
//   SubmitJob   fills the spec's defaults, validates it (INVALID_ARGUMENT naming the field, also
//               for fields this server does not know), stores it QUEUED; idempotent by
//               client_request_id (ALREADY_EXISTS when reused for a different spec).
//   GetJob, ListJobs, GetSpectra   read the store (NOT_FOUND naming an unknown job).
//   CancelJob   QUEUED | RUNNING | RESTARTING -> CANCELLED; FAILED_PRECONDITION when finished.
//   WatchJob    subscribes a listener to a job's events (see JobEventListener).
//   UpdateJobState, PublishJobEvent   for the scheduler and worker sessions (the next slice):
//               every state change and progress event reaches the job's watchers.
//
// A request with an empty job id is INVALID_ARGUMENT ("job_id is empty").
//
// What remains after an error: nothing was written and no event was published.
//
// Thread-safety: not thread-safe; call on the coordinator loop (the daemon's one io_context
// thread). Listeners are called on that same thread, from inside the call that caused the event.
// Not copyable.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/job_store.h"
#include "mat/v1/job.pb.h"
#include "mat/v1/service.pb.h"

namespace mat::coordinator {

// Receives the events of one watched job on the coordinator loop. `last` is true exactly once,
// for the event that moves the job to a terminal state (SUCCEEDED, FAILED, CANCELLED); the
// subscription is already removed when that call happens, so nothing follows it.
// A listener may call UnwatchJob (its own id or another) and WatchJob; it must not destroy the
// Coordinator.
using JobEventListener = std::function<void(const v1::JobEvent& event, bool last)>;

// Identifies one subscription; 0 is never used.
using WatchId = uint64_t;

struct CoordinatorOptions {
  // Current time in seconds since the Unix epoch for events; the system clock when empty.
  std::function<int64_t()> now_unix_seconds;
};

// True for SUCCEEDED, FAILED and CANCELLED.
bool IsTerminalJobState(v1::JobState state);

// The wire form of a stored job (step and summary_json stay 0 / "" until workers report them).
v1::Job JobRecordToProto(const JobRecord& record);

class Coordinator {
 public:
  // Takes ownership of an open store. The store's own clock (JobStoreOptions) stamps jobs;
  // `options.now_unix_seconds` stamps events.
  explicit Coordinator(std::unique_ptr<JobStore> store, CoordinatorOptions options = {});
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;
  // Drops every subscription without calling its listener.
  ~Coordinator();

  // ----- JobService -----

  // Stores WithJobSpecDefaults(spec) as a QUEUED job. INVALID_ARGUMENT naming the field when the
  // spec carries a field unknown to this server's schema ("spec.model: unknown field number 42")
  // or fails ValidateJobSpec ("policy.alpha must be in [0,1], got 1.5"). Idempotent: the same
  // non-empty client_request_id with an equal spec (after defaults) returns the existing job with
  // created = false; with another spec ALREADY_EXISTS. A new job publishes nothing (no one can
  // watch it yet).
  absl::StatusOr<v1::SubmitJobReply> SubmitJob(const std::string& client_request_id,
                                               const v1::JobSpec& spec);
  // NOT_FOUND naming the id. `ranks` is empty until the scheduler assigns workers.
  absl::StatusOr<v1::GetJobReply> GetJob(const std::string& job_id);
  // Jobs in submission order, paged (page_size 0 = 100, at most 1000; INVALID_ARGUMENT for a
  // negative size or a malformed token), only `states` when not empty.
  absl::StatusOr<v1::ListJobsReply> ListJobs(const v1::ListJobsRequest& request);
  // Moves the job to CANCELLED with `reason` (or "cancelled by request" when empty) as its
  // error_message and publishes the change (its watchers get their last event).
  // NOT_FOUND naming an unknown id; FAILED_PRECONDITION naming the state of a finished job.
  absl::StatusOr<v1::CancelJobReply> CancelJob(const std::string& job_id,
                                               const std::string& reason);
  // λ_max history from the store, paged by probe steps (paging as ListJobs). `modules` is empty
  // until workers declare them. NOT_FOUND for an unknown job.
  absl::StatusOr<v1::GetSpectraReply> GetSpectra(const v1::GetSpectraRequest& request);

  // Subscribes `listener` to `job_id`. Before returning it calls the listener once with the
  // job's current state (a JobStateChange event; `last` = true when the job is already finished,
  // and then no subscription remains). NOT_FOUND for an unknown job (the listener is not called).
  // REQUIRES: listener is non-empty.
  absl::StatusOr<WatchId> WatchJob(const std::string& job_id, JobEventListener listener);
  // Ends a subscription; its listener is not called again. Unknown or ended ids are a no-op.
  void UnwatchJob(WatchId id);
  // Live subscriptions on `job_id` (for tests and metrics).
  int WatcherCount(const std::string& job_id) const;

  // ----- for the scheduler and worker sessions -----

  // Moves a job to `state` (store rules: IsLegalJobTransition, else FAILED_PRECONDITION;
  // NOT_FOUND) and publishes a JobStateChange at the job's current step.
  absl::Status UpdateJobState(const std::string& job_id, v1::JobState state,
                              const std::string& error_message = "");
  // Delivers a non-state event (progress, evaluation, mask change) to the job's watchers, with
  // time_unix_seconds filled in when 0. A state change must go through UpdateJobState.
  // REQUIRES: event.job_id() is set and the event is not a JobStateChange.
  void PublishJobEvent(v1::JobEvent event);

  // The store, for the scheduler and worker sessions (λ history, workers, assignments).
  JobStore& store() { return *store_; }

 private:
  int64_t Now() const;
  v1::JobEvent StateEvent(const JobRecord& job) const;
  // Calls every listener of event.job_id(); with `last`, each subscription is removed first.
  void Publish(const v1::JobEvent& event, bool last);

  std::unique_ptr<JobStore> store_;
  CoordinatorOptions options_;
  WatchId next_watch_id_ = 1;
  // job id -> its subscriptions; id order = subscription order = delivery order. A job with no
  // subscription has no entry.
  std::map<std::string, std::map<WatchId, JobEventListener>> watches_by_job_;
  std::map<WatchId, std::string> job_of_watch_;
};

}  // namespace mat::coordinator
