// Coordinator: the coordinator daemon's domain object behind JobService and WorkerService
// (DESIGN §7, §8): a thin facade over a few managers, in the style of Ray's GCS, each of which
// works on the one JobStore and is unit-tested alone (tests/coordinator/, fakes from
// tests/testing/):
//   JobManager      (job_manager.h)     admission, reads, state changes, watchers, job metrics;
//   SessionManager  (session_manager.h) registered workers, open sessions, heartbeats;
//   GangScheduler   (gang_scheduler.h)  all-or-nothing placement of queued and restarting jobs;
//   MaskEngine      (mask_engine.h)     per running job: policy, rank averaging, mask versions.
// The facade keeps what ties them together: the running jobs' ranks (who runs which rank, their
// steps and acknowledgements) and the flows that cross managers (start, restart, end, the job
// messages of a session). It answers the RPCs in domain terms (mat.v1 messages in and out, absl::Status
// errors), with no gRPC and no threads, so it is unit-tested without a network; the gRPC adapters
// (coordinator/job_service.h and the worker service) only convert and post here.
//
//   SubmitJob   fills the spec's defaults, validates it (INVALID_ARGUMENT naming the field, also
//               for fields this server does not know; policy.rand_schedule_job against the
//               store), stores it QUEUED, runs the scheduler; idempotent by client_request_id
//               (ALREADY_EXISTS when reused for a different spec).
//   GetJob, ListJobs, GetSpectra, GetJobLogs   read the store (NOT_FOUND naming an unknown job).
//   DeleteJob   a finished job's state is deleted (its row stays as a tombstone).
//   CancelJob   QUEUED | RUNNING | RESTARTING -> CANCELLED, Cancel to every rank still running;
//               FAILED_PRECONDITION when finished.
//   WatchJob    subscribes a listener to a job's events (see JobEventListener).
//   RegisterWorker, OpenSession, HandleWorkerMessage, CloseSession, CheckHeartbeats
//               the session protocol of proto/mat/v1/service.proto (implemented in
//               worker_sessions.cc and worker_sessions_reports.cc).
//   UpdateJobState, PublishJobEvent   every state change and progress event reaches the job's
//               watchers.
//
// Scheduling (Schedule): QUEUED jobs in submission order; a job starts when W =
// spec.resources.workers IDLE workers of its device kind have open sessions ("cpu" jobs on
// device "cpu" workers, "cuda" jobs on "cuda:N" workers), taking the idle workers in id order
// (rank 0 = the first). A job that cannot start does not block later ones: a smaller or
// other-device job behind it may start at once (backfilling, no reservation for QUEUED jobs; a
// RESTARTING one keeps the idle workers it needs, gang_scheduler.h). The price: a large job can
// wait as long as smaller jobs keep enough workers busy; the oldest such job still goes first
// whenever enough workers are idle at one Schedule() call. A finished rank's worker stays with
// its job until the job ends, so a job frees all its workers at once.
//
// Per running job the Coordinator keeps (in memory only) the ranks' workers and reports, the
// λ probes still waiting for ranks, the latest mask version and the job's mat::policy::Policy
// (made from the job spec when rank 0 declares its modules; for a rand, frozen-random or inverse
// job with policy.rand_schedule_job, replaying that MAT job's stored decisions:
// Policy::SetReplayedSchedule, applied again whenever the policy is made anew after a restart,
// since it is not part of the policy's saved state; a replayed job whose module groups or sizes
// differ fails the replaying job with a message naming both). The store keeps what must
// survive a restart: assignments with each rank's step, acknowledged mask and checksum, the modules, the
// λ history, the decisions, rank 0's progress and the summary.
//
// Worker loss (its session closed, a Leaving from a worker that stops, no heartbeat for 3
// intervals, or a rank reporting that its process group failed): the job moves to RESTARTING
// (the store counts the attempt), its other ranks get Cancel, and the scheduler starts it again,
// before any QUEUED job, once enough workers are idle: Assign {attempt, resume = true}. The ranks continue from the newest checkpoint they
// all hold; the job's policy is restored from the store (each decision keeps the policy's state
// and its MaskUpdate) to the decision at or before the first probe step a rank reports, and a
// report of that decided step is answered with its stored MaskUpdate. After
// options.max_restarts restarts a further loss fails the job.
//
// Coordinator restart: a Coordinator constructed on a store that holds RUNNING jobs keeps them
// RUNNING and rebuilds their runtime (spec, ranks, modules, policy as above); a worker
// reconnecting (RegisterWorker with its old id, OpenSession) whose Heartbeat lists such a job
// is re-attached to its rank. A rank whose worker has not come back within 10 heartbeat
// intervals is lost (a restart as above). RESTARTING jobs are started again by the scheduler;
// QUEUED jobs stay queued.
//
// Metrics (CoordinatorOptions::metrics, coordinator_metrics.h): decisions set the modules' λ and
// active series, the thresholds and the active count; rank 0's Progress the step and losses;
// every Progress the FLOPs; the success of a job the per-phase FLOPs and the savings from its
// summary; sessions and state changes the worker and job counts; refused messages count by code.
// RefreshMetrics (called periodically) updates heartbeat ages and drops a finished job's series
// after options.metrics_retention_seconds. Only the registry is shared with other threads.
//
// A request with an empty job id is INVALID_ARGUMENT ("job_id is empty").
//
// What remains after an error: nothing was written, no event was published and no worker was
// sent anything, except where a method says otherwise (a refused worker message is answered with
// a Reject; a NaN/Inf λ also fails its job).
//
// Thread-safety: not thread-safe; call on the coordinator loop (the daemon's one io_context
// thread). Listeners and WorkerChannel methods are called on that same thread, from inside the
// call that caused the event. Not copyable.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "api/job_spec.h"
#include "api/job_state.h"
#include "coordinator/clock.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/gang_scheduler.h"
#include "coordinator/job_manager.h"
#include "coordinator/job_store.h"
#include "coordinator/mask_engine.h"
#include "coordinator/session_manager.h"
#include "policy/policy.h"
#include "mat/v1/job.pb.h"
#include "mat/v1/service.pb.h"

namespace mat::coordinator {

// The most switchable modules a job may declare (a ModuleList): BERT-base has 144 heads; the
// bound keeps one worker's message from sizing every mask, λ row and decision of its job.
inline constexpr int kMaxJobModules = 65536;

struct CoordinatorOptions {
  // Current time in seconds since the Unix epoch for events; the system clock when empty.
  std::function<int64_t()> now_unix_seconds;
  // Current time in milliseconds (any epoch, monotonic) for heartbeats; steady_clock when empty.
  std::function<int64_t()> now_ms;
  // RegisterReply.heartbeat_interval_ms; a worker silent for 3 intervals is lost, milliseconds.
  int64_t heartbeat_interval_ms = 1000;
  // Where the Coordinator reports its metrics (coordinator_metrics.h); borrowed, must outlive
  // the Coordinator; nullptr = no metrics (unit tests).
  CoordinatorMetrics* metrics = nullptr;
  // A finished job's series stay this long (RefreshMetrics removes them later), seconds (by
  // now_ms).
  int64_t metrics_retention_seconds = 600;
  // Admission limits of SubmitJob (job_spec.h CheckJobSpecLimits: spec size, data roots, model
  // size). The defaults limit spec and model size and allow any data.dir.
  api::JobSpecLimits spec_limits;
  // Active (QUEUED, RUNNING, RESTARTING) jobs per client, count; 0 = unlimited.
  int64_t max_jobs_per_client = 0;
  // Restarts after worker losses per job, count; the next loss fails the job.
  int64_t max_restarts = 10;
  // Log lines kept per job (LogBatch; GetJobLogs), the newest; 0 = unbounded.
  int64_t max_log_lines_per_job = 10000;
  // A finished job is deleted (DeleteExpiredJobs) this long after its last state change,
  // seconds (by the store's clock); 0 = kept until DeleteJob.
  int64_t job_retention_seconds = 0;
};

class Coordinator {
 public:
  // Takes ownership of an open store. The store's own clock (JobStoreOptions) stamps jobs;
  // `options.now_unix_seconds` stamps events, `options.now_ms` times heartbeats. Keeps the
  // store's RUNNING jobs for their workers to re-attach and leaves its RESTARTING jobs to the
  // scheduler ("Coordinator restart" above). Fails with the store's error, saying what could not
  // be read, when the store cannot list the workers or the live jobs: a coordinator started
  // without them would leave those jobs RUNNING with no one to end them. A job that cannot run
  // and must fail at start but whose end the store refuses is kept as an unstored end (tried
  // again; UnstoredEnds() is not OK meanwhile).
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(std::unique_ptr<JobStore> store,
                                                             CoordinatorOptions options = {});
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;
  // Drops every subscription without calling its listener.
  ~Coordinator();

  // ----- JobService -----

  // Stores WithJobSpecDefaults(spec) as a QUEUED job. INVALID_ARGUMENT naming the field when the
  // spec carries a field unknown to this server's schema ("spec.model: unknown field number 42")
  // or fails ValidateJobSpec ("policy.alpha must be in [0,1], got 1.5"). Idempotent within
  // RequestScope(client) (a bearer token's own, else shared): the same non-empty
  // client_request_id with an equal spec (after defaults) returns the existing job with
  // created = false; with another spec ALREADY_EXISTS. A new job publishes nothing (no one can
  // watch it yet).
  // Admission (options.spec_limits, after validation): INVALID_ARGUMENT for a spec over
  // max_spec_bytes or a data.dir outside the data roots, RESOURCE_EXHAUSTED for a model over
  // max_model_params; RESOURCE_EXHAUSTED when `client` (the caller's non-reversible id, stored
  // with the job; JobService's ClientIdentity) already has options.max_jobs_per_client active
  // jobs (an idempotent retry of an existing job is still answered).
  // policy.rand_schedule_job (ValidateJobSpec: rand, frozen-random, inverse) must name a job of
  // the store
  // (INVALID_ARGUMENT "policy.rand_schedule_job: no job 'job-000009' on this coordinator") that
  // ran policy.kind mat (INVALID_ARGUMENT naming it and its kind), is SUCCEEDED
  // (FAILED_PRECONDITION naming it and its state), has at least one stored decision
  // (INVALID_ARGUMENT naming it) and decided only at multiples of this spec's policy.probe_every
  // (INVALID_ARGUMENT naming the first other step and the probe_every).
  absl::StatusOr<v1::SubmitJobReply> SubmitJob(const std::string& client_request_id,
                                               const v1::JobSpec& spec,
                                               const std::string& client = "");
  // NOT_FOUND naming the id. `ranks` (from the store's assignments) is empty until the scheduler
  // assigns workers. A QUEUED or RESTARTING job's `waiting` says which workers it waits for
  // (DescribeWait, gang_scheduler.h).
  absl::StatusOr<v1::GetJobReply> GetJob(const std::string& job_id);
  // Jobs in submission order, paged (page_size 0 = 100, at most 1000; INVALID_ARGUMENT for a
  // negative size or a malformed token), only `states` when not empty, only the jobs `client`
  // submitted when set (JobRecord::client).
  absl::StatusOr<v1::ListJobsReply> ListJobs(const v1::ListJobsRequest& request,
                                             const std::optional<std::string>& client = {});
  // Moves the job to CANCELLED with `reason` (or "cancelled by request" when empty) as its
  // error_message and publishes the change (its watchers get their last event). Every rank still
  // running gets Cancel {job, reason}; its worker becomes IDLE and the scheduler runs.
  // NOT_FOUND naming an unknown id; FAILED_PRECONDITION naming the state of a finished job.
  absl::StatusOr<v1::CancelJobReply> CancelJob(const std::string& job_id,
                                               const std::string& reason);
  // Deletes a finished job's state (JobManager::Delete): afterwards every call naming it is
  // NOT_FOUND "job 'J' was deleted", and its late artifact uploads and log lines are refused.
  // The caller removes its artifacts (ArtifactStore::RemoveJob). NOT_FOUND for an unknown or
  // deleted job, FAILED_PRECONDITION for one that has not finished or whose decisions an
  // unfinished job replays.
  absl::Status DeleteJob(const std::string& job_id);
  // Deletes, in submission order and at most `limit` (a round keeps the loop short), the
  // finished jobs whose last state change is more than options.job_retention_seconds old (none
  // when that is 0), and returns their ids: the caller removes their artifacts. A full round's
  // next one goes on after its last job, and `more` (when given) says so, so that the caller
  // comes back at once; a short round's next one starts from the first job again. A job whose
  // decisions an unfinished job replays waits for it (the rounds go past it); a store error is
  // logged and ends the round.
  std::vector<std::string> DeleteExpiredJobs(int limit = 10, bool* more = nullptr);
  // λ_max history from the store, paged by probe steps (paging as ListJobs). `modules` (every
  // page) is empty until rank 0 declares them. NOT_FOUND for an unknown job.
  absl::StatusOr<v1::GetSpectraReply> GetSpectra(const v1::GetSpectraRequest& request);
  // A job's log lines (GetJobLogs). INVALID_ARGUMENT for a negative rank, after_seq or
  // max_lines, and for a rank >= the job's workers (naming its ranks); NOT_FOUND for an
  // unknown job. log_complete is set (true or false): the job has ended and no rank will send
  // more lines (LogComplete).
  absl::StatusOr<v1::GetJobLogsReply> GetJobLogs(const v1::GetJobLogsRequest& request);
  // Whether `worker_id` may upload artifacts of `job_id` (UploadArtifact; the bytes go to the
  // daemon's ArtifactStore): it holds rank 0 of the job's newest started `attempt`, and the job
  // is RUNNING (before that rank's RankDone), RESTARTING (rank 0's part ended with a lost peer:
  // the next attempt's rank 0 replaces the files) or has ended without rank 0's RankDone ok
  // (FAILED, CANCELLED: a rank uploads what it has after a cancel too). PERMISSION_DENIED for another rank; NOT_FOUND /
  // ABORTED as for the session's job messages; FAILED_PRECONDITION once that rank 0 sent its
  // RankDone ok (it uploads before it: its artifacts are final); UNAVAILABLE while a RUNNING
  // job's rank 0 has not re-attached to this coordinator (after a restart: retry). The names a
  // job may give back (api::kJobArtifactNames) are the adapter's check.
  absl::Status CheckArtifactUpload(const std::string& worker_id, const std::string& job_id,
                                   int rank, int64_t attempt);

  // Subscribes `listener` to `job_id`. Before returning it calls the listener once with the
  // job's current state (a JobStateChange event; `last` = true when the job is already finished,
  // and then no subscription remains). NOT_FOUND for an unknown job (the listener is not called).
  // REQUIRES: listener is non-empty.
  absl::StatusOr<WatchId> WatchJob(const std::string& job_id, JobEventListener listener);
  // Ends a subscription; its listener is not called again. Unknown or ended ids are a no-op.
  void UnwatchJob(WatchId id);
  // Live subscriptions on `job_id` (for tests and metrics).
  int WatcherCount(const std::string& job_id) const;

  // Every worker the store knows, by id, with its live state (IDLE/BUSY/DRAINING while its
  // session is open, else DISCONNECTED). last_seen is live for an open session (the store's copy
  // is written at most every kLastSeenPersistMs, and on open, close and state changes).
  absl::StatusOr<v1::ListWorkersReply> ListWorkers();
  // Takes a worker out of service (DrainWorker): DRAINING, no new rank; with `now` its running
  // job restarts as after a worker loss ("<worker> (rank R) drained: <reason>", counting an
  // attempt); once it runs and stops no rank it gets Drain {reason} (Schedule) and leaves.
  // Stored: a restarted coordinator keeps the drain (SessionManager::SetDraining). A worker
  // without a session stays DISCONNECTED with the drain's reason and is told to stop when it
  // comes back. NOT_FOUND for an unknown worker.
  absl::StatusOr<v1::DrainWorkerReply> DrainWorker(const v1::DrainWorkerRequest& request);
  // Ends a drain before the worker was told to stop (UndrainWorker): it takes ranks again, and
  // the scheduler runs. NOT_FOUND for an unknown worker, FAILED_PRECONDITION for one that is not
  // drained or was already told to stop (SessionManager::Undrain).
  absl::StatusOr<v1::UndrainWorkerReply> UndrainWorker(const v1::UndrainWorkerRequest& request);

  // ----- WorkerService (the session protocol of proto/mat/v1/service.proto) -----

  // Stores the worker (a new id "worker-000001"... when request.worker_id is empty; the same id
  // when given, also one this store has never seen: a worker resuming after a coordinator lost
  // its state). INVALID_ARGUMENT naming the field for an empty device, a device other than
  // "cpu"/"cuda:N", a negative memory_bytes, an empty host, a rendezvous_port outside 1..65535 or
  // a worker_id that is not 1..128 of [A-Za-z0-9._-]. Re-registering an id updates its
  // capabilities; FAILED_PRECONDITION while its session is open. `secret` is the call's worker
  // secret (SessionManager::Register: INVALID_ARGUMENT unless 64 lowercase hex digits;
  // PERMISSION_DENIED when the id's stored secret is another; stored as SHA-256 for a new id or
  // one without a stored secret).
  absl::StatusOr<v1::RegisterReply> RegisterWorker(const v1::RegisterRequest& request,
                                                   std::string_view secret);
  // Whether a WorkerService call in `worker_id`'s name carries its secret (SessionManager::
  // Authenticate: INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED). The adapter checks it before
  // OpenSession and CheckArtifactUpload; HandleWorkerMessage trusts the open session.
  absl::Status AuthenticateWorker(const std::string& worker_id, std::string_view secret) const;
  // A worker opened its Session; `first` is its first message (any body; usually a Heartbeat),
  // handled as by HandleWorkerMessage once the session is open (a refused first message gets
  // its Reject; the session is open all the same and OK is returned). INVALID_ARGUMENT for an
  // empty worker_id; NOT_FOUND for an unregistered one; FAILED_PRECONDITION when that worker's
  // session is already open (the old one stays). On OK the Coordinator keeps `channel` until
  // CloseSession (or until it closes it) and runs the scheduler (the worker may get an Assign at
  // once). REQUIRES: channel is not null.
  absl::Status OpenSession(const v1::WorkerMessage& first, std::shared_ptr<WorkerChannel> channel);
  // A message of an open session (NOT_FOUND when the worker has none, INVALID_ARGUMENT for an
  // empty worker_id; no Reject then: there is no channel). Every message counts as a sign of
  // life. When the result is not OK the Coordinator has already sent the worker a Reject
  // {job_id, code, message} with it; the session stays open and nothing else changed, except
  // that a NaN/Inf λ also fails its job. A message with no body is INVALID_ARGUMENT. Checks of
  // the job messages, in order:
  //   every job message  empty job_id INVALID_ARGUMENT; unknown job NOT_FOUND; the worker holds
  //                      no such rank of the job NOT_FOUND ("worker-000002 runs no rank 1 of
  //                      job-000003"); job not RUNNING FAILED_PRECONDITION; the rank already
  //                      sent RankDone FAILED_PRECONDITION.
  //   ModuleList   more than kMaxJobModules INVALID_ARGUMENT (first); rank != 0
  //                INVALID_ARGUMENT; a second, different list FAILED_PRECONDITION (an
  //                identical one, from any rank, is accepted and changes nothing); empty or
  //                invalid modules INVALID_ARGUMENT; a rand job whose policy.rand_schedule_job
  //                does not fit these modules (other groups or group sizes) INVALID_ARGUMENT
  //                naming both jobs, and the job FAILS with that message.
  //   SpectraReport  no ModuleList yet FAILED_PRECONDITION; step < 0 or not a multiple of
  //                policy.probe_every INVALID_ARGUMENT; lambda_max size != module count (or not
  //                empty for a policy that needs no spectra), trace / effective_rank neither
  //                empty nor one per module INVALID_ARGUMENT; NaN/Inf INVALID_ARGUMENT naming
  //                rank, step, module index and name, and the job FAILS with that message (Cancel
  //                to every rank); step <= the last decided step ABORTED (stale); a second report
  //                of the rank for a pending step INVALID_ARGUMENT.
  //   MaskAck      version < 1 or > the latest sent INVALID_ARGUMENT; below the rank's latest
  //                ack ABORTED ("stale mask version 3, rank 0 already acknowledged 5").
  //   Progress     step < 0, a non-finite loss, negative or non-finite flops_total /
  //                wall_seconds, negative active_modules INVALID_ARGUMENT. Rank 0's is the job's
  //                progress (stored, and published as JobProgress, plus JobEvaluation with a
  //                val_loss); flops_total of the job sums every rank's latest.
  //   RankDone     ok with step < 0 or without param_checksum INVALID_ARGUMENT; ok = false
  //                fails the job ("rank R (worker-…): <error>"; Cancel to the other ranks still
  //                running); the last ok rank makes it SUCCEEDED with rank 0's
  //                summary_json, or FAILED when the ranks' param_checksums differ ("the ranks'
  //                final parameters differ: ..."). ok = false frees the sender at once; an ok
  //                rank's worker stays with the job until the job ends (then all its workers
  //                become IDLE together); the scheduler runs.
  //   Heartbeat    never refused; a listed RUNNING job whose rank this worker holds but whose
  //                session does not run it (after a coordinator restart) re-attaches the
  //                session to that rank; any other listed job id the worker runs no rank of
  //                (any more) gets a Cancel for that job.
  // Every job message carries the sender's attempt: one of another attempt than the job's is
  // ABORTED ("stale attempt 0 of job-000003, now 1"). RankDone with ok = false and retryable
  // = true (the rank's process group failed: a peer was lost) restarts the job like a worker
  // loss instead of failing it. Leaving ends the worker's session as CloseSession does, naming
  // its reason ("worker-000002 (rank 1) lost: the worker is shutting down (SIGTERM)"), and
  // closes its channel OK.
  // A store error (UNAVAILABLE) is refused the same way and changes nothing in memory (a rank 0
  // Progress may have stored the rank's step before its job write failed).
  absl::Status HandleWorkerMessage(const v1::WorkerMessage& message);
  // The worker's session ended (stream closed or broken); its channel is dropped without a call.
  // A rank it ran restarts its job ("worker-000002 (rank 1) lost: session closed"; see Worker
  // loss), the job's other ranks get Cancel and become IDLE. Unknown ids and workers without a
  // session are a no-op.
  void CloseSession(const std::string& worker_id);
  // Call every heartbeat interval: a worker with an open session and no message for more than 3
  // intervals is lost: its channel is closed (UNAVAILABLE "no heartbeat for N ms") and its job
  // restarts as by CloseSession ("worker-000002 (rank 1) lost: no heartbeat for N ms"). A job
  // kept across a coordinator restart whose ranks are not all re-attached 10 intervals after
  // the start restarts the same way ("... did not reconnect").
  void CheckHeartbeats();
  // OK, or UNAVAILABLE while the end of a job could not be stored ("job job-000002 ended FAILED
  // but the store refused it: sqlite: ... database or disk is full; ..."): the job still reads
  // RUNNING in the store, its workers were told to stop. CheckHeartbeats tries to store each
  // such end again, until it is stored or the job has ended otherwise. /readyz answers 503 with
  // this message meanwhile.
  absl::Status UnstoredEnds() const;
  // Starts every QUEUED job that can start now (see the protocol's gang scheduling), then sends
  // Drain to each draining worker that became idle. Called by SubmitJob, OpenSession and
  // whenever a worker becomes idle; public for tests.
  void Schedule();

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

  // The policy of a running job once rank 0 declared its modules, else null (for tests).
  const policy::Policy* JobPolicy(const std::string& job_id) const;
  // Workers with an open session (for tests and metrics).
  int OpenSessionCount() const { return sessions_.OpenCount(); }

  // ----- metrics (no-op without options.metrics) -----

  // Call periodically (the daemon: every second): refreshes the heartbeat ages of open sessions
  // and removes every series of a job that finished more than metrics_retention_seconds ago.
  // The other metrics are updated as events happen (see coordinator_metrics.h).
  void RefreshMetrics();

  // The store's last_seen of a worker with an open session is refreshed at most this often
  // (plus on open, close and state changes), milliseconds.
  static constexpr int64_t kLastSeenPersistMs = SessionManager::kLastSeenPersistMs;

 private:
  // One rank of a running job.
  struct RankState {
    std::string worker_id;
    int64_t step = 0;            // latest Progress step
    int64_t acked_version = 0;   // latest MaskAck
    double flops_total = 0;      // latest Progress flops_total (stored: kept across a restart)
    bool done = false;           // sent RankDone ok
    bool attached = true;        // its worker's session runs it (false after a coordinator
                                 // restart until the worker's Heartbeat re-attaches it)
    std::string param_checksum;  // from RankDone
    std::string summary_json;    // from RankDone (rank 0)
  };
  // A RUNNING job started (or kept) by this Coordinator. Erased when the job leaves RUNNING.
  struct JobRuntime {
    v1::JobSpec spec;
    int world_size = 0;
    std::vector<RankState> ranks;        // index = rank
    std::unique_ptr<MaskEngine> masks;   // its policy, probes and mask versions
    // SpectraReports that arrived before rank 0's ModuleList (other ranks' streams may overtake
    // it), replayed once it arrives; at most one per rank.
    std::vector<std::pair<std::string, v1::SpectraReport>> early_reports;
    int64_t rank0_step = -1;             // rank 0's previous Progress, for steps/s
    double rank0_wall_seconds = 0;
    int64_t attempt = 0;                 // the store's attempt when it (re)started
    // Kept across a coordinator restart: NowMs() by which every rank must be re-attached; 0 =
    // no deadline.
    int64_t attach_deadline_ms = 0;
  };

  // ----- recovery and job lifecycle (worker_sessions.cc) -----

  Coordinator(std::unique_ptr<JobStore> store, CoordinatorOptions options);
  // Create's recovery: loads the workers; keeps the RUNNING jobs of a previous process
  // (KeepJob), fails the damaged live ones (FailJob: kept as an unstored end when the store
  // refuses it). The store's error when it cannot list the workers or the live jobs.
  absl::Status Recover();
  // The runtime of a RUNNING job from the store: spec, ranks (not attached), modules and policy
  // (restored at its first report), attempt. A job that cannot be rebuilt fails (FailJob).
  void KeepJob(const JobRecord& job);
  // The spec's trainer config, validated (StartJob, KeepJob).
  absl::StatusOr<policy::PolicyConfig> JobPolicyConfig(const JobRecord& job);
  // A new runtime for `job` with `world` ranks and its mask engine (continued from the store's
  // mask version when `resume`), in running_.
  JobRuntime& AddRuntime(const JobRecord& job, int world, const policy::PolicyConfig& config,
                         bool resume);
  // Makes and adopts the policy of a restarted or kept job from the modules the store holds
  // (with its replayed schedule: JobManager::ApplyRandSchedule).
  absl::Status CreatePolicy(const std::string& job_id, JobRuntime& job,
                            std::vector<policy::ModuleInfo> modules);
  // A rank's worker was lost (or its process group failed): RESTARTING, Cancel to the other
  // ranks (but `except_worker`), Schedule; FailJob after options_.max_restarts restarts.
  void RestartJob(const std::string& job_id, const std::string& why,
                  const std::string& except_worker = "");
  // Starts `job` on `workers` (rank order): assignments, runtime, BUSY workers, RUNNING, Assigns.
  // A spec that is not a valid trainer config fails the job instead (OK is returned). On a store
  // error nothing was sent and the workers stay IDLE (assignment rows may remain; they are
  // replaced at the next start). The GangScheduler's start callback.
  absl::Status StartJob(const JobRecord& job, const std::vector<std::string>& workers);
  // A session opened without a running rank: the worker of a finished rank of a running job
  // stays with that job until it ends (the gang is freed together), also when it comes back
  // after its session or this coordinator restarted; idle, the next pass would give it to
  // another job first. Once per session (OpenSession), not per heartbeat.
  void RejoinFinishedRank(const std::string& worker_id);
  // Ends a job in `state` (FAILED, CANCELLED or SUCCEEDED) with `message`: UpdateJobState, then
  // DetachJob and Schedule. On a store error nothing changed (the caller decides whether to
  // DetachJob anyway).
  absl::Status EndJob(const std::string& job_id, v1::JobState state, const std::string& message,
                      const std::string& except_worker = "");
  // The in-memory half of EndJob: every rank whose worker still runs the job (but
  // `except_worker`) gets Cancel {job, message} when `cancel`, those workers become IDLE, the
  // runtime is dropped. No-op for a job without runtime.
  void DetachJob(const std::string& job_id, const std::string& message, bool cancel,
                 const std::string& except_worker);
  // EndJob, and when the store refuses, DetachJob anyway and Schedule; the end is kept
  // (KeepUnstoredEnd) until CheckHeartbeats stores it.
  void EndOrKeepJob(const std::string& job_id, v1::JobState state, const std::string& message,
                    const std::string& except_worker = "");
  // EndOrKeepJob(FAILED, message).
  void FailJob(const std::string& job_id, const std::string& message,
               const std::string& except_worker = "");
  // Every rank of the running `job_id` sent RankDone ok (now, or before a restart): SUCCEEDED
  // with `summary`'s metrics, or FAILED ("the ranks' final parameters differ: ...") when their
  // param_checksums differ. A refused store write is kept as FailJob's is.
  void EndFinishedJob(const std::string& job_id, const std::string& summary);
  // The store refused to end `job_id` in `state` (FAILED or SUCCEEDED): logged once, kept in
  // unstored_ends_ and tried again by CheckHeartbeats (StoreUnstoredEnds).
  void KeepUnstoredEnd(const std::string& job_id, v1::JobState state, const std::string& message,
                       const absl::Status& refused);
  // Stores the kept ends that the store now takes (logged); drops those whose job has ended
  // otherwise (a state that cannot move to theirs).
  void StoreUnstoredEnds();
  // A session ended (closed or lost): forgets it and restarts its job with "<worker> (rank R)
  // lost: <why>". Returns the session's channel (null when the worker had none).
  std::shared_ptr<WorkerChannel> DropSession(const std::string& worker_id, const std::string& why);
  absl::Status HandleBody(const std::string& worker_id, const v1::WorkerMessage& message);
  void HandleHeartbeat(const std::string& worker_id, const v1::Heartbeat& heartbeat);

  // ----- job messages (worker_sessions_reports.cc) -----

  // A rank of a running job, as CheckRank found it.
  struct RankRef {
    JobRuntime* job = nullptr;  // valid until the job ends
    int rank = 0;
  };
  // The checks every job message shares (see HandleWorkerMessage). `rank` unset (ModuleList,
  // which names none): whichever rank the worker holds.
  absl::StatusOr<RankRef> CheckRank(const std::string& worker_id, const std::string& job_id,
                                    std::optional<int> rank, int64_t attempt);
  absl::Status HandleModuleList(const std::string& worker_id, const v1::ModuleList& list);
  absl::Status HandleSpectra(const std::string& worker_id, const v1::SpectraReport& report);
  // All ranks reported `step`: the engine decides and stores; every rank gets the MaskUpdate.
  absl::Status Decide(const std::string& job_id, JobRuntime& job, int64_t step,
                      const std::vector<std::vector<double>>& lambda);
  absl::Status HandleMaskAck(const std::string& worker_id, const v1::MaskAck& ack);
  absl::Status HandleProgress(const std::string& worker_id, const v1::Progress& progress);
  absl::Status HandleRankDone(const std::string& worker_id, const v1::RankDone& done);
  // Stores a rank's log lines (more than 1000 in a batch: INVALID_ARGUMENT), also when they
  // arrive after the job moved on (another state or attempt) from the worker holding the rank,
  // but not after that rank's RankDone ok (FAILED_PRECONDITION: its log is complete).
  absl::Status HandleLogs(const std::string& worker_id, const v1::LogBatch& batch);
  // The worker stops: its session ends now (DropSession, its rank's job restarts naming the
  // reason) and its channel is closed OK.
  void HandleLeaving(const std::string& worker_id, const v1::Leaving& leaving);
  // GetJobLogsReply.log_complete of a job read in `state`: the state is terminal, no open
  // session runs or is stopping a rank of the job (a cancelled rank sends its last lines before
  // its worker's heartbeat stops listing the job), and, for a job that ended before this
  // coordinator started, within 10 heartbeat intervals of its start (as long as a re-attaching
  // rank gets), no rank of the job (its newest assignment) ended without its RankDone ok: its
  // worker may not have reconnected yet to send its last lines. A store error reads as not
  // complete (the follower asks again).
  bool LogComplete(const std::string& job_id, v1::JobState state);

  // Declared in this order: the managers borrow the clock, the store and the metrics.
  std::unique_ptr<JobStore> store_;
  CoordinatorOptions options_;
  Clock clock_;
  JobManager jobs_;
  SessionManager sessions_;
  GangScheduler scheduler_;
  // RUNNING jobs started (or kept) by this Coordinator, by id.
  std::map<std::string, JobRuntime> running_;
  // The worker's ListWorkers entry (empty when the store does not list it): the reply of
  // DrainWorker and UndrainWorker.
  absl::StatusOr<v1::WorkerInfo> WorkerInfoOf(const std::string& worker_id);
  // DeleteExpiredJobs' next round lists the jobs after this seq (0: from the first).
  int64_t retention_after_seq_ = 0;
  // clock_.NowMs() and clock_.Now() when Recover ran (LogComplete's restart window, for jobs
  // whose last state change came before it).
  int64_t recovered_ms_ = 0;
  int64_t recovered_unix_seconds_ = 0;
  // Ended jobs whose end the store refused (a full disk): tried again by CheckHeartbeats.
  struct UnstoredEnd {
    v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
    std::string message;  // the job's error message
    absl::Status refused;  // the store's latest answer
  };
  std::map<std::string, UnstoredEnd> unstored_ends_;
  // When the worker message being handled entered HandleWorkerMessage (mask latency).
  std::chrono::steady_clock::time_point handling_since_{};
};

}  // namespace mat::coordinator
