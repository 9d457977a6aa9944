// The coordinator's durable state (DESIGN §8) in one SQLite database, `<state_dir>/coordinator.db`:
//
//   schema_version  one row: the schema this file was written with (kJobStoreSchemaVersion)
//   jobs            id, client_request_id (since v8 always NULL), spec (mat.v1.JobSpec bytes), state,
//                   created/updated (unix seconds), error message; since v2 also rank 0's
//                   progress (step, losses, FLOPs, wall time), the mask (version, active and
//                   total modules), attempt and summary_json
//   workers         id, host, device, memory, registered/last seen (unix seconds); since v2 the
//                   rendezvous port
//   assignments     (job, rank) -> worker, attempt; since v2 the rank's step, acknowledged mask
//                   version and final parameter checksum
//   lambda_history  (job, step, module index) -> λ_max (rank-averaged)
//   decisions       (job, step) -> the policy decision's JSON (policy Decision::ToJson)
//   modules         (job, module index) -> name, group, layer, index (v2; rank 0's ModuleList)
//   jobs.client     (v3) who submitted the job: a non-reversible id of the caller (never a
//                   token; JobService's ClientIdentity), "" for jobs stored before v3
//   decisions.policy_state, decisions.mask_update
//                   (v4) the policy's SaveState() text after the decision and the serialized
//                   mat.v1.MaskUpdate sent for it ("" for rows written before v4), so that a
//                   restarted job continues its policy from any decided step
//   job_logs        (v5) (job, seq) -> rank, time (ms), level, text: the lines its ranks
//                   forwarded (`matctl logs`), the newest max_lines per job
//   workers.drain_reason
//                   (v6) the operator's drain (`matctl drain`), NULL when the worker is in
//                   service: a drain survives a coordinator restart
//   workers.secret_sha256
//                   (v7) SHA-256 (64 lowercase hex) of the worker's secret (service.proto's
//                   worker credentials), "" for a worker that has none yet; never the secret
//   jobs.request_scope, jobs.request_key
//                   (v8) the submitter's client_request_id (request_key), unique within its
//                   scope (RequestScope: a bearer token's client, or '' shared by every client
//                   without one; an index on (request_scope, request_key)). Before v8
//                   jobs.client_request_id held it, unique across every client, so one token's
//                   key could name another's job. The migration moves the keys here (a row of a
//                   token client to that client's scope) and leaves the old column NULL
//                   (dropping its UNIQUE constraint would take a copy of the table)
//   jobs.deleted_unix_seconds
//                   (v9) when the job was deleted (DeleteJob), NULL while it is not: a deleted
//                   job keeps its row (ids come from MAX(seq) and are never given twice; the
//                   row keeps its state, client and figures, its request_key is freed and
//                   its spec, summary and error message cleared) and loses its assignments, λ history, decisions,
//                   modules and log lines
//   assignments.flops_total
//                   (v10) the rank's FLOPs so far
//   jobs_state_seq  (v11) an index on jobs (state, seq): ListJobs of some states (the
//                   scheduler's queue, a restart's live jobs) reads those jobs only
//
// Schema versions: 1 (the first release), 2 (the columns and table marked v2 above), 3 (the
// client column and its index), 4 (the decisions' policy state and mask), 5 (job_logs), 6
// (workers.drain_reason), 7 (workers.secret_sha256), 8 (jobs.request_scope, request_key), 9
// (jobs.deleted_unix_seconds), 10 (assignments.flops_total), 11 (the jobs_state_seq index). Open
// migrates an older database in place, in one transaction (ALTER TABLE ... ADD COLUMN with
// defaults: 0, "" or NULL for the losses; CREATE TABLE modules), so it either fully migrates or
// stays as it was.
//
// Durability: WAL journal, synchronous=FULL, so a call that returned OK survives a crash or a power
// loss; every mutating call is one transaction (all or nothing). A store reopened on the same
// directory sees everything written before. One process at a time: Open takes an exclusive lock
// on `<state_dir>/LOCK` and fails with FAILED_PRECONDITION while another JobStore holds it.
//
// Errors (absl::Status): INVALID_ARGUMENT bad input, naming it; NOT_FOUND unknown job;
// FAILED_PRECONDITION illegal state transition; ALREADY_EXISTS a client_request_id reused within
// its scope (RequestScope) for a different spec; UNAVAILABLE the disk or the database could not be used (retry or fix);
// DATA_LOSS a database that is not one or is corrupt. After an error nothing was written.
//
// Thread-safety: not thread-safe; call on the coordinator loop (one owner serialises all calls).
// Not copyable.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "api/job_state.h"
#include "mat/v1/job.pb.h"

namespace mat::coordinator {

class SqliteDb;  // coordinator/sqlite_db.h

// The schema this code reads and writes. A database with a higher version is refused.
inline constexpr int kJobStoreSchemaVersion = 11;

// How a bearer token's client id starts (coordinator/auth.h ClientIdentity: "token:" + a hash).
inline constexpr char kTokenClientPrefix[] = "token:";
// Whose client_request_ids a job's is unique among: a bearer token's client ("token:...") has
// its own; every other client ("peer:<host>", "") shares "", so that a resubmit from another
// address (a re-created pod, "localhost" as ::1 then as 127.0.0.1) still finds its job.
inline std::string RequestScope(const std::string& client) {
  return client.rfind(kTokenClientPrefix, 0) == 0 ? client : std::string();
}
// Page sizes: 0 means kDefaultPageSize; larger than kMaxPageSize is clamped.
inline constexpr int kDefaultPageSize = 100;
inline constexpr int kMaxPageSize = 1000;

struct JobStoreOptions {
  // Current time in seconds since the Unix epoch; the system clock when empty. Tests inject one.
  std::function<int64_t()> now_unix_seconds;
};

// One row of `jobs`.
struct JobRecord {
  std::string id;                 // "job-000001", assigned by CreateJob, in submission order
  std::string client_request_id;  // "" when the submitter gave none; unique in its RequestScope
  std::string client;             // CreateJob's `client` (who submitted it); "" before v3
  v1::JobSpec spec;               // as given to CreateJob
  v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
  int64_t created_unix_seconds = 0;
  int64_t updated_unix_seconds = 0;  // last state change
  std::string error_message;         // set by UpdateJobState; "" otherwise
  // Rank 0's latest progress (UpdateJobProgress); 0 / unset before the first.
  int64_t step = 0;                  // steps
  double train_loss = 0;             // nats per masked token
  std::optional<double> val_loss;    // nats per masked token; unset before an evaluation
  std::optional<double> test_loss;   // nats per masked token; unset before a test evaluation
  double flops_total = 0;            // summed over ranks, floating-point operations
  double wall_seconds = 0;           // rank 0's training wall time, seconds
  // The latest mask (RecordDecision) and the module count (PutModules); 0 before.
  int64_t mask_version = 0;
  int64_t active_modules = 0;
  int64_t total_modules = 0;
  int64_t attempt = 0;               // 0 for the first start, +1 per restart
  std::string summary_json;          // SetJobSummary; "" before
  // "" for an intact row; else what of it cannot be read ("... the stored spec does not parse"),
  // with `spec` empty. Listing shows such a job rather than failing for every job; the
  // coordinator fails it at start.
  std::string damage;
};

struct CreateJobResult {
  std::string job_id;
  bool created = false;  // false: client_request_id named an existing job with the same spec
};

struct JobPage {
  std::vector<JobRecord> jobs;  // submission order
  std::string next_page_token;  // "" on the last page
};

// λ_max of every module at one step.
struct LambdaPoint {
  int64_t step = 0;
  std::vector<double> lambda;  // index = module index
};

struct LambdaPage {
  std::vector<LambdaPoint> points;  // ascending step
  std::string next_page_token;      // "" on the last page
};

// One line of a job's log (`matctl logs`), as a rank forwarded it.
struct LogLineRecord {
  int64_t seq = 0;          // per job from 1, assigned by AppendJobLogs
  int rank = 0;
  int64_t time_unix_ms = 0;
  std::string level;
  std::string text;
};

struct JobLogPage {
  std::vector<LogLineRecord> lines;  // ascending seq
  int64_t dropped = 0;               // the job's lines removed by the bound so far
};

struct DecisionRecord {
  int64_t step = 0;
  std::string json;  // as appended
};

// One decision with what a restart needs (LatestDecisionAtOrBefore).
struct StoredDecision {
  int64_t step = 0;
  std::string decision_json;
  std::string policy_state;  // Policy::SaveState() after this decision; "" before schema v4
  std::string mask_update;   // serialized mat.v1.MaskUpdate sent for it; "" before schema v4
};

struct DecisionPage {
  std::vector<DecisionRecord> decisions;  // ascending step
  std::string next_page_token;            // "" on the last page
};

// One row of `workers`.
struct WorkerRecord {
  std::string id;
  std::string host;
  std::string device;        // "cpu" | "cuda:N"
  int64_t memory_bytes = 0;
  int64_t registered_unix_seconds = 0;  // set by the store on first upsert
  int64_t last_seen_unix_seconds = 0;   // set by the store on every upsert and TouchWorker
  int32_t rendezvous_port = 0;          // c10d TCPStore port on `host`; 0 in v1 rows
  // SetWorkerDrain: the reason of the operator's drain; nullopt when in service (and in rows
  // before v6). UpsertWorker and CreateWorker neither read nor change it.
  std::optional<std::string> drain_reason = std::nullopt;
  // SHA-256 (64 lowercase hex) of the worker's secret; "" = none (rows before v7). Written by
  // UpsertWorker and CreateWorker as given.
  std::string secret_sha256 = "";
};

// One row of `assignments`.
struct AssignmentRecord {
  std::string job_id;
  int32_t rank = 0;
  std::string worker_id;
  int64_t attempt = 0;  // 0 for the first start, +1 per restart
  int64_t assigned_unix_seconds = 0;
  // UpdateRankStatus; 0 / "" before.
  int64_t step = 0;            // latest step the rank reported, steps
  int64_t mask_version = 0;    // latest mask version it acknowledged
  double flops_total = 0;      // its latest Progress's flops_total (the job's sums the ranks')
  std::string param_checksum;  // its final parameters' checksum (hex), once it finished

  // It sent RankDone ok: only such a rank stores a checksum.
  bool finished() const { return !param_checksum.empty(); }
};

// One switchable module of a job, as rank 0 declared it (mat.v1.ModuleDescriptor).
struct ModuleRecord {
  std::string name;   // unique within the job
  std::string group;  // "heads" | "ffn" | ...
  int32_t layer = 0;
  int32_t index = 0;  // within its layer and group
};

// Rank 0's progress report, as stored on the job (UpdateJobProgress).
struct JobProgressUpdate {
  int64_t step = 0;                 // steps, >= 0
  double train_loss = 0;            // finite
  std::optional<double> val_loss;   // finite when set; unset keeps the stored value
  std::optional<double> test_loss;  // finite when set; unset keeps the stored value
  double flops_total = 0;           // finite, >= 0
  double wall_seconds = 0;          // finite, >= 0
};

// What one policy decision writes (RecordDecision).
struct DecisionUpdate {
  int64_t step = 0;             // the probe step, >= 0
  std::vector<double> lambda;   // rank-averaged λ_max per module; empty when the policy needs
                                // no spectra (then no λ row is written)
  std::string decision_json;    // Decision::ToJson text
  int64_t mask_version = 0;     // the MaskUpdate version sent for it, >= 1
  int64_t active_modules = 0;   // modules on in its every-step mask, >= 0
  std::string policy_state;     // Policy::SaveState() after the decision ("" = not kept)
  std::string mask_update;      // the serialized mat.v1.MaskUpdate sent for it ("" = not kept)
};

// True when a job may move from `from` to `to`:
//   QUEUED     -> RUNNING | CANCELLED | FAILED
//   RUNNING    -> SUCCEEDED | FAILED | CANCELLED | RESTARTING
//   RESTARTING -> RUNNING | FAILED | CANCELLED
// SUCCEEDED, FAILED and CANCELLED are terminal; no state moves to itself or to UNSPECIFIED.
bool IsLegalJobTransition(v1::JobState from, v1::JobState to);

// Job state names: api/job_state.h (api::JobStateName), used here unqualified.
using api::JobStateName;

class JobStore {
 public:
  // Opens (creating when missing) the store under `state_dir` (created with its parents).
  // FAILED_PRECONDITION when another JobStore holds the directory, when the database was written
  // by a newer schema, when WAL mode cannot be enabled, or when the database file is read-only to
  // this process; UNAVAILABLE when the directory or file cannot be created; DATA_LOSS for a file
  // that is not an SQLite database, or a database whose pages fail SQLite's `PRAGMA quick_check`
  // (a damaged page would otherwise surface only when a request first read it). Every error from
  // the database itself names its file.
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(const std::string& state_dir,
                                                        JobStoreOptions options = {});

  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;
  ~JobStore();

  // ----- jobs -----

  // Stores a new QUEUED job. Idempotent by `client_request_id` within RequestScope(client):
  // when a job of that scope with that id exists, returns it (created = false) if its spec
  // equals `spec` (both with api::WithJobSpecDefaults: a job stored before a field existed has
  // that field's default), else ALREADY_EXISTS naming both ids. Another token's job with the same id is
  // not seen (two tokens may use the same key). An empty client_request_id never matches (every
  // call creates a job).
  // REQUIRES: `spec` passed ValidateJobSpec (the store keeps whatever it is given); the service
  // stores WithJobSpecDefaults(spec).
  //
  // `client` (may be "") is stored with the job. With `max_active_jobs` > 0, a new job is
  // refused with RESOURCE_EXHAUSTED ("client 'peer:ipv4:127.0.0.1' has 2 active jobs (queued,
  // running or restarting); the limit is 2 (--max-jobs-per-client)") when `client` already has
  // that many; the idempotent return of an existing job is never refused. Check and insert are
  // one transaction.
  absl::StatusOr<CreateJobResult> CreateJob(const std::string& client_request_id,
                                            const v1::JobSpec& spec,
                                            const std::string& client = "",
                                            int64_t max_active_jobs = 0);
  // The job `client` submitted with `request_key` (a client_request_id, in its RequestScope),
  // if any.
  absl::StatusOr<std::optional<JobRecord>> FindRequest(const std::string& client,
                                                       const std::string& request_key);
  // Jobs of `client` in QUEUED, RUNNING or RESTARTING, count.
  absl::StatusOr<int64_t> CountActiveJobs(const std::string& client);
  // NOT_FOUND for an unknown id, and for a deleted job ("job 'X' was deleted (matctl delete or
  // --job-retention-days)"): every read and write of a job goes through here or RequireJob, so
  // a deleted job is gone from every call.
  absl::StatusOr<JobRecord> GetJob(const std::string& job_id);
  // Whether the job was deleted; NOT_FOUND when there never was such a job.
  absl::StatusOr<bool> IsDeletedJob(const std::string& job_id);
  // Deletes a finished job (DeleteJob): its row stays, marked deleted_unix_seconds (its id is
  // never given again, and GetJob, RequireJob and ListJobs no longer see it) with its
  // request_key freed and its spec, summary and error message cleared (a tombstone holds its id,
  // state, client and times only); its assignments, λ history, decisions, modules
  // and log lines are removed. One transaction. NOT_FOUND for an unknown or deleted job;
  // FAILED_PRECONDITION for one that is not SUCCEEDED, FAILED or CANCELLED, and for one whose
  // decisions an unfinished job still replays (policy.rand_schedule_job), naming it.
  absl::Status DeleteJob(const std::string& job_id);
  // Deleted jobs by the state they ended in (mat_coordinator_jobs counts every job the state dir
  // had).
  absl::StatusOr<std::map<v1::JobState, int64_t>> CountDeletedJobs();
  // Finished (SUCCEEDED, FAILED, CANCELLED) jobs that were not deleted and whose last state
  // change is more than `max_age_seconds` (>= 0) old, submitted after the job of seq
  // `after_seq` (0: from the first), in submission order, at most `limit`: (seq, id).
  absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> ListFinishedBefore(
      int64_t max_age_seconds, int limit, int64_t after_seq = 0);
  // Jobs that were not deleted, in submission order, `page_size` at a time (0:
  // kDefaultPageSize; clamped to kMaxPageSize); only `states` when not empty; only the jobs whose `client` equals `client`
  // when set. `page_token` is "" or a next_page_token from the same listing; INVALID_ARGUMENT
  // for a negative page_size or a malformed token.
  absl::StatusOr<JobPage> ListJobs(int page_size, const std::string& page_token,
                                   const std::vector<v1::JobState>& states = {},
                                   const std::optional<std::string>& client = {});
  // Moves a job to `state` and stores `error_message` (replacing the previous one), updating
  // updated_unix_seconds; moving to RESTARTING also increments `attempt` (same write).
  // FAILED_PRECONDITION (naming both states) unless IsLegalJobTransition(current, state);
  // NOT_FOUND for an unknown id.
  absl::Status UpdateJobState(const std::string& job_id, v1::JobState state,
                              const std::string& error_message = "");
  // Stores rank 0's progress on the job (step, losses, FLOPs, wall time; an unset val_loss or
  // test_loss keeps the stored one). INVALID_ARGUMENT naming the field for step < 0, a non-finite
  // number or negative FLOPs / wall time; NOT_FOUND for an unknown job.
  absl::Status UpdateJobProgress(const std::string& job_id, const JobProgressUpdate& progress);
  // Stores rank 0's summary.json text (any text; "" clears it). NOT_FOUND for an unknown job.
  absl::Status SetJobSummary(const std::string& job_id, const std::string& summary_json);

  // ----- modules -----

  // Stores a job's modules in index order, replacing any previous list, and sets the job's
  // total_modules. INVALID_ARGUMENT for an empty list or a module with an empty name or group or
  // a negative layer or index (naming its index); NOT_FOUND for an unknown job.
  absl::Status PutModules(const std::string& job_id, const std::vector<ModuleRecord>& modules);
  // A job's modules in index order (empty before PutModules). NOT_FOUND for an unknown job.
  absl::StatusOr<std::vector<ModuleRecord>> GetModules(const std::string& job_id);

  // ----- λ history and decisions -----

  // Stores λ_max of every module of `job_id` at `step` (index = module index). Re-appending a
  // step replaces its values (a job restarted from a checkpoint replays steps).
  // INVALID_ARGUMENT for step < 0, an empty vector, or a NaN/Inf value (naming the module index:
  // "module 3: lambda is nan"); NOT_FOUND for an unknown job.
  absl::Status AppendLambdas(const std::string& job_id, int64_t step,
                             const std::vector<double>& lambda);
  // λ history of a job in ascending step, `page_size` steps at a time (paging as ListJobs).
  absl::StatusOr<LambdaPage> GetLambdas(const std::string& job_id, int page_size,
                                        const std::string& page_token);
  // Stores the decision made at `step` (JSON text; re-appending a step replaces it).
  // INVALID_ARGUMENT for step < 0 or text that is not JSON; NOT_FOUND for an unknown job.
  absl::Status AppendDecision(const std::string& job_id, int64_t step,
                              const std::string& decision_json);
  // The decision with the highest step <= `step` (unset when there is none). NOT_FOUND for an
  // unknown job.
  absl::StatusOr<std::optional<StoredDecision>> LatestDecisionAtOrBefore(const std::string& job_id,
                                                                        int64_t step);
  // Decisions of a job in ascending step (paging as ListJobs).
  absl::StatusOr<DecisionPage> GetDecisions(const std::string& job_id, int page_size,
                                            const std::string& page_token);
  // One policy decision in one transaction: the λ row of update.step (as AppendLambdas, skipped
  // when update.lambda is empty), the decision (as AppendDecision) and the job's mask_version and
  // active_modules; and it removes the job's λ rows and decisions of later steps (an abandoned
  // attempt's, which got further than the checkpoint a restarted attempt resumed from: one
  // history, and a later restore no longer finds them). Not covered: a restarted attempt whose
  // first report is at a step the abandoned one decided (its checkpoint between two probe steps)
  // continues from that stored decision (MaskEngine::RestoreIfNeeded), as a coordinator restart
  // does; the same on deterministic kernels. INVALID_ARGUMENT as those two, or
  // for mask_version < 1 or active_modules < 0; NOT_FOUND for an unknown job.
  absl::Status RecordDecision(const std::string& job_id, const DecisionUpdate& update);

  // ----- logs -----

  // Appends `lines` (their seq and rank ignored) to the job's log as `rank`'s, numbered on from
  // the job's highest seq, then removes the job's oldest lines beyond `max_lines` (0 = no
  // bound). INVALID_ARGUMENT for rank < 0 or max_lines < 0; NOT_FOUND for an unknown job.
  absl::Status AppendJobLogs(const std::string& job_id, int rank,
                             const std::vector<LogLineRecord>& lines, int64_t max_lines);
  // The job's lines with seq > after_seq (only `rank`'s when set), ascending, at most `limit`
  // (1 … 10000, else INVALID_ARGUMENT). NOT_FOUND for an unknown job.
  absl::StatusOr<JobLogPage> GetJobLogs(const std::string& job_id, std::optional<int> rank,
                                        int64_t after_seq, int limit);

  // ----- workers and assignments -----

  // Inserts or updates a worker by id (keeps registered_unix_seconds and drain_reason of an
  // existing one; sets last_seen_unix_seconds to now; writes the other fields, secret_sha256
  // too). INVALID_ARGUMENT for an empty id.
  absl::Status UpsertWorker(const WorkerRecord& worker);
  // Inserts a new worker under the next free id "worker-NNNNNN" (one more than the highest such
  // id stored, from worker-000001) and returns the id; worker.id is ignored, the times are set
  // as by UpsertWorker.
  absl::StatusOr<std::string> CreateWorker(const WorkerRecord& worker);
  // NOT_FOUND for an unknown id.
  absl::StatusOr<WorkerRecord> GetWorker(const std::string& worker_id);
  // Sets a worker's last_seen_unix_seconds to now. NOT_FOUND for an unknown id.
  absl::Status TouchWorker(const std::string& worker_id);
  // Every worker, by id.
  absl::StatusOr<std::vector<WorkerRecord>> ListWorkers();
  // Stores the worker's drain (`reason`; "" is a drain without a reason) or ends it (nullopt).
  // NOT_FOUND for an unknown id.
  absl::Status SetWorkerDrain(const std::string& worker_id,
                              const std::optional<std::string>& reason);
  // Records that `worker_id` runs `rank` of `job_id` (replacing the rank's previous assignment).
  // NOT_FOUND for an unknown job or worker; INVALID_ARGUMENT for rank < 0 or attempt < 0.
  absl::Status PutAssignment(const std::string& job_id, int32_t rank,
                             const std::string& worker_id, int64_t attempt);
  // Stores what rank `rank` of `job_id` reported: its latest step, the latest mask version it
  // acknowledged, its FLOPs so far (a restarted coordinator sums the ranks' before each has
  // reported again) and its final parameter checksum ("" until it finished); with
  // `summary_json` set, also the job's summary (as SetJobSummary), in the same transaction: a
  // finished rank 0 is never stored without its summary. NOT_FOUND for an unknown job or a rank
  // without an assignment; INVALID_ARGUMENT for a negative step or version, or FLOPs negative or
  // not finite.
  absl::Status UpdateRankStatus(const std::string& job_id, int32_t rank, int64_t step,
                                int64_t mask_version, double flops_total,
                                const std::string& param_checksum,
                                const std::string* summary_json = nullptr);
  // A job's assignments in rank order (NOT_FOUND for an unknown job).
  absl::StatusOr<std::vector<AssignmentRecord>> ListAssignments(const std::string& job_id);

  // The value of `PRAGMA <name>` on this store's connection, as text ("wal", "2"). For tests and
  // diagnostics. REQUIRES: `name` is a plain identifier.
  absl::StatusOr<std::string> Pragma(const std::string& name);

  // `<state_dir>/coordinator.db`.
  static std::string DatabasePath(const std::string& state_dir);

  // Health: opens the database file afresh (a second connection, never creating it) and reads
  // the jobs table, so that a file deleted, truncated or overwritten under the open connection
  // (whose page cache would still answer) shows. OK, or the error naming the file (NOT_FOUND,
  // DATA_LOSS for "file is not a database", ...).
  absl::Status CheckFile() const;

 private:
  JobStore(std::unique_ptr<SqliteDb> db, int lock_fd, JobStoreOptions options);

  absl::Status Configure();     // pragmas
  absl::Status EnsureSchema();  // create, migrate or check the schema
  int64_t Now() const;
  // NOT_FOUND unless the job exists and was not deleted.
  absl::Status RequireJob(const std::string& job_id);
  // NOT_FOUND "job 'X' was deleted (matctl delete or --job-retention-days)".
  static absl::Status DeletedError(const std::string& job_id);
  // The statements of AppendLambdas / AppendDecision, inside the caller's transaction (after
  // RequireJob and input checks).
  absl::Status WriteLambdas(const std::string& job_id, int64_t step,
                            const std::vector<double>& lambda);
  absl::Status WriteDecision(const std::string& job_id, int64_t step,
                             const std::string& decision_json, const std::string& policy_state,
                             const std::string& mask_update);
  // The statement of SetJobSummary, inside the caller's transaction (after RequireJob).
  absl::Status WriteJobSummary(const std::string& job_id, const std::string& summary_json);

  std::unique_ptr<SqliteDb> db_;
  int lock_fd_;  // holds the flock on <state_dir>/LOCK; closed on destruction
  JobStoreOptions options_;
};

}  // namespace mat::coordinator
