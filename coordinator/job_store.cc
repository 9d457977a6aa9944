// Sections: schema · helpers · open · jobs · modules. λ history and decisions are in
// job_store_history.cc, workers and assignments in job_store_workers.cc, logs in job_store_logs.cc.
#include "coordinator/job_store.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <iterator>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "api/job_spec.h"
#include "common/status.h"
#include "coordinator/job_store_internal.h"
#include "coordinator/sqlite_db.h"
#include "google/protobuf/util/message_differencer.h"

namespace mat::coordinator {
using namespace store_internal;
namespace {

// ----- schema -----

// Version 1. Append new versions as migrations; never edit this text once released.
constexpr const char* kSchemaV1 = R"sql(
CREATE TABLE schema_version (
  version INTEGER NOT NULL
);
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  client_request_id TEXT UNIQUE,
  spec BLOB NOT NULL,
  state TEXT NOT NULL CHECK (state IN
    ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED', 'RESTARTING')),
  created_unix_seconds INTEGER NOT NULL,
  updated_unix_seconds INTEGER NOT NULL,
  error_message TEXT NOT NULL DEFAULT ''
);
CREATE TABLE workers (
  id TEXT PRIMARY KEY,
  host TEXT NOT NULL,
  device TEXT NOT NULL,
  memory_bytes INTEGER NOT NULL,
  registered_unix_seconds INTEGER NOT NULL,
  last_seen_unix_seconds INTEGER NOT NULL
);
CREATE TABLE assignments (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  rank INTEGER NOT NULL CHECK (rank >= 0),
  worker_id TEXT NOT NULL REFERENCES workers(id),
  attempt INTEGER NOT NULL CHECK (attempt >= 0),
  assigned_unix_seconds INTEGER NOT NULL,
  PRIMARY KEY (job_id, rank)
);
CREATE TABLE lambda_history (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  step INTEGER NOT NULL CHECK (step >= 0),
  module_index INTEGER NOT NULL CHECK (module_index >= 0),
  lambda REAL NOT NULL,
  PRIMARY KEY (job_id, step, module_index)
) WITHOUT ROWID;
CREATE TABLE decisions (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  step INTEGER NOT NULL CHECK (step >= 0),
  decision_json TEXT NOT NULL,
  PRIMARY KEY (job_id, step)
) WITHOUT ROWID;
)sql";

// Version 2: rank 0's progress, the mask and the summary on jobs; the rendezvous port of
// workers; per-rank status on assignments; the modules table. Applied to a new database right
// after kSchemaV1, and to a version-1 database by Open.
constexpr const char* kMigrationV1ToV2 = R"sql(
ALTER TABLE jobs ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN train_loss REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN val_loss REAL;
ALTER TABLE jobs ADD COLUMN test_loss REAL;
ALTER TABLE jobs ADD COLUMN flops_total REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN wall_seconds REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN mask_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN active_modules INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN total_modules INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN summary_json TEXT NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN rendezvous_port INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assignments ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assignments ADD COLUMN mask_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assignments ADD COLUMN param_checksum TEXT NOT NULL DEFAULT '';
CREATE TABLE modules (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  module_index INTEGER NOT NULL CHECK (module_index >= 0),
  name TEXT NOT NULL,
  module_group TEXT NOT NULL,
  layer INTEGER NOT NULL CHECK (layer >= 0),
  index_in_layer INTEGER NOT NULL CHECK (index_in_layer >= 0),
  PRIMARY KEY (job_id, module_index)
) WITHOUT ROWID;
)sql";

// Version 3: who submitted each job (the per-client job limit). Applied after kMigrationV1ToV2.
constexpr const char* kMigrationV2ToV3 = R"sql(
ALTER TABLE jobs ADD COLUMN client TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_client_state ON jobs (client, state);
)sql";

// Version 4: what a restarted job needs to continue its policy bit for bit: the policy's state
// after each decision and the MaskUpdate sent for it. Applied after kMigrationV2ToV3.
constexpr const char* kMigrationV4ToV5 = R"sql(
CREATE TABLE job_logs (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  seq INTEGER NOT NULL CHECK (seq >= 1),
  rank INTEGER NOT NULL CHECK (rank >= 0),
  time_unix_ms INTEGER NOT NULL,
  level TEXT NOT NULL,
  text TEXT NOT NULL,
  PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
)sql";

// Version 6: the operator's drain of a worker (matctl drain), kept across a restart.
constexpr const char* kMigrationV5ToV6 = R"sql(
ALTER TABLE workers ADD COLUMN drain_reason TEXT;
)sql";

// Version 7: the SHA-256 of each worker's secret (service.proto's worker credentials).
constexpr const char* kMigrationV6ToV7 = R"sql(
ALTER TABLE workers ADD COLUMN secret_sha256 TEXT NOT NULL DEFAULT '';
)sql";

// Version 8: a bearer token's client_request_ids are its own (see job_store.h
// jobs.request_key). 'token:' is kTokenClientPrefix, compared as RequestScope does (LIKE would
// ignore case).
constexpr const char* kMigrationV7ToV8 = R"sql(
ALTER TABLE jobs ADD COLUMN request_scope TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN request_key TEXT;
UPDATE jobs SET request_key = client_request_id, client_request_id = NULL,
  request_scope = CASE WHEN substr(client, 1, 6) = 'token:' THEN client ELSE '' END
  WHERE client_request_id IS NOT NULL;
CREATE UNIQUE INDEX jobs_request_scope_key ON jobs (request_scope, request_key);
)sql";

// Version 9: a deleted job (DeleteJob) keeps its row, so that its id is never given again
// (ids come from MAX(seq)), marked with when it was deleted.
constexpr const char* kMigrationV8ToV9 = R"sql(
ALTER TABLE jobs ADD COLUMN deleted_unix_seconds INTEGER;
)sql";

// Version 10: each rank's FLOPs so far, so that a restarted coordinator's job total counts the
// ranks that have not reported since.
constexpr const char* kMigrationV9ToV10 = R"sql(
ALTER TABLE assignments ADD COLUMN flops_total REAL NOT NULL DEFAULT 0;
)sql";

// Version 11: the jobs of a state in seq order (the scheduler's queue, a restart's live jobs)
// without reading every job: without it, a page of QUEUED jobs walked every row by seq, each
// finished job included.
constexpr const char* kMigrationV10ToV11 = R"sql(
CREATE INDEX jobs_state_seq ON jobs (state, seq);
)sql";

constexpr const char* kMigrationV3ToV4 = R"sql(
ALTER TABLE decisions ADD COLUMN policy_state TEXT NOT NULL DEFAULT '';
ALTER TABLE decisions ADD COLUMN mask_update BLOB NOT NULL DEFAULT x'';
)sql";

// kMigrations[v - 1] takes a version-v file to version v + 1.
constexpr const char* kMigrations[] = {kMigrationV1ToV2, kMigrationV2ToV3, kMigrationV3ToV4,
                                       kMigrationV4ToV5, kMigrationV5ToV6, kMigrationV6ToV7,
                                       kMigrationV7ToV8, kMigrationV8ToV9, kMigrationV9ToV10,
                                       kMigrationV10ToV11};
static_assert(std::size(kMigrations) == kJobStoreSchemaVersion - 1,
              "one migration per schema version after the first");

constexpr const char* kJobColumns =
    "id, request_key, spec, state, created_unix_seconds, updated_unix_seconds, "
    "error_message, step, train_loss, val_loss, test_loss, flops_total, wall_seconds, "
    "mask_version, active_modules, total_modules, attempt, summary_json, client";
constexpr int kJobColumnCount = 19;  // the columns of kJobColumns



// ----- helpers -----

absl::StatusOr<v1::JobState> ParseJobState(const std::string& name) {
  for (v1::JobState s :
       {v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED,
        v1::JOB_STATE_FAILED, v1::JOB_STATE_CANCELLED, v1::JOB_STATE_RESTARTING}) {
    if (JobStateName(s) == name) return s;
  }
  return absl::DataLossError(absl::StrCat("jobs.state holds an unknown state '", name, "'"));
}

// Reads a row selected with kJobColumns.
absl::StatusOr<JobRecord> ReadJob(const SqliteStatement& row) {
  JobRecord job;
  job.id = row.ColumnText(0);
  job.client_request_id = row.ColumnText(1);
  // A damaged spec is read as far as it goes (JobRecord::damage): one unreadable job must not
  // make every listing fail.
  if (!job.spec.ParseFromString(row.ColumnBlob(2))) {
    job.spec.Clear();
    job.damage = absl::StrCat("job ", job.id,
                              " is damaged in the state database: the stored spec does not parse");
  }
  // (The state column's CHECK constraint admits only known names.)
  MAT_ASSIGN_OR_RETURN(job.state, ParseJobState(row.ColumnText(3)));
  job.created_unix_seconds = row.ColumnInt64(4);
  job.updated_unix_seconds = row.ColumnInt64(5);
  job.error_message = row.ColumnText(6);
  job.step = row.ColumnInt64(7);
  job.train_loss = row.ColumnDouble(8);
  if (!row.ColumnIsNull(9)) job.val_loss = row.ColumnDouble(9);
  if (!row.ColumnIsNull(10)) job.test_loss = row.ColumnDouble(10);
  job.flops_total = row.ColumnDouble(11);
  job.wall_seconds = row.ColumnDouble(12);
  job.mask_version = row.ColumnInt64(13);
  job.active_modules = row.ColumnInt64(14);
  job.total_modules = row.ColumnInt64(15);
  job.attempt = row.ColumnInt64(16);
  job.summary_json = row.ColumnText(17);
  job.client = row.ColumnText(18);
  return job;
}

std::string Placeholders(size_t n) {
  std::vector<std::string> q(n, "?");
  return absl::StrJoin(q, ", ");
}

}  // namespace

namespace store_internal {

// INVALID_ARGUMENT naming `field` unless `value` is finite (and >= 0 when `non_negative`).
absl::Status CheckNumber(const std::string& field, double value, bool non_negative) {
  if (!std::isfinite(value)) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must be a finite number, got ",
                                                   std::isnan(value) ? "nan" : "inf"));
  }
  if (non_negative && value < 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must be >= 0, got ", value));
  }
  return absl::OkStatus();
}

// INVALID_ARGUMENT naming the first non-finite λ (as AppendLambdas documents).
absl::Status CheckLambdas(const std::string& job_id, int64_t step,
                          const std::vector<double>& lambda) {
  for (size_t i = 0; i < lambda.size(); ++i) {
    if (!std::isfinite(lambda[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("module ", i, ": lambda is ", std::isnan(lambda[i]) ? "nan" : "inf",
                       " (job ", job_id, ", step ", step, ")"));
    }
  }
  return absl::OkStatus();
}

// Page size after defaults and clamping; INVALID_ARGUMENT when negative.
absl::StatusOr<int> EffectivePageSize(int page_size) {
  if (page_size < 0) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be >= 0, got ", page_size));
  }
  if (page_size == 0) return kDefaultPageSize;
  return std::min(page_size, kMaxPageSize);
}

// Page tokens are the decimal position (a job seq or a step) the next page starts at.
absl::StatusOr<int64_t> ParsePageToken(const std::string& token) {
  if (token.empty()) return 0;
  int64_t v = 0;
  if (!absl::SimpleAtoi(token, &v) || v < 0 || std::to_string(v) != token) {
    return absl::InvalidArgumentError(absl::StrCat("page_token '", token, "' is malformed"));
  }
  return v;
}

}  // namespace store_internal

bool IsLegalJobTransition(v1::JobState from, v1::JobState to) {
  switch (from) {
    case v1::JOB_STATE_QUEUED:
      return to == v1::JOB_STATE_RUNNING || to == v1::JOB_STATE_CANCELLED ||
             to == v1::JOB_STATE_FAILED;
    case v1::JOB_STATE_RUNNING:
      return to == v1::JOB_STATE_SUCCEEDED || to == v1::JOB_STATE_FAILED ||
             to == v1::JOB_STATE_CANCELLED || to == v1::JOB_STATE_RESTARTING;
    case v1::JOB_STATE_RESTARTING:
      return to == v1::JOB_STATE_RUNNING || to == v1::JOB_STATE_FAILED ||
             to == v1::JOB_STATE_CANCELLED;
    default:
      return false;
  }
}

// ----- open -----

std::string JobStore::DatabasePath(const std::string& state_dir) {
  return state_dir + "/coordinator.db";
}

JobStore::JobStore(std::unique_ptr<SqliteDb> db, int lock_fd, JobStoreOptions options)
    : db_(std::move(db)), lock_fd_(lock_fd), options_(std::move(options)) {}

JobStore::~JobStore() {
  db_.reset();  // close the database before releasing the lock
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(const std::string& state_dir,
                                                         JobStoreOptions options) {
  if (state_dir.empty()) return absl::InvalidArgumentError("state_dir is empty");
  if (absl::Status st = common::MakeDirs(state_dir); !st.ok()) {
    return absl::UnavailableError(st.message());
  }
  MAT_ASSIGN_OR_RETURN(const int lock_fd, common::LockDirectory(state_dir, "coordinator"));
  absl::StatusOr<std::unique_ptr<SqliteDb>> db = SqliteDb::Open(DatabasePath(state_dir));
  if (!db.ok()) {
    ::close(lock_fd);
    return db.status();
  }
  // From here the JobStore owns the lock and closes it on every path.
  std::unique_ptr<JobStore> store(new JobStore(std::move(*db), lock_fd, std::move(options)));
  const std::string& path = store->db_->path();
  auto named = [&path](const absl::Status& st) {  // "sqlite: ... (code 26)" alone names no file
    return absl::StrContains(st.message(), path)
               ? st
               : absl::Status(st.code(), absl::StrCat(path, ": ", st.message()));
  };
  if (absl::Status st = store->Configure(); !st.ok()) return named(st);
  // Otherwise it starts, reports ready, and fails every write (the first submit).
  if (store->db_->read_only()) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": the coordinator cannot write its database (the file is read-only to this user: "
              "check its owner and mode, and those of the state directory)"));
  }
  if (absl::Status st = store->EnsureSchema(); !st.ok()) return named(st);
  // Damage (a torn write, a bad disk) otherwise shows only when a request first reads that page.
  // quick_check reads every page (O(size): under a second for ~100 MB); its first line is "ok"
  // or the first problem found.
  absl::StatusOr<std::string> check = store->db_->QueryText("PRAGMA quick_check");
  if (!check.ok()) return named(check.status());
  if (*check != "ok") {
    return absl::DataLossError(absl::StrCat(
        path, ": the database is damaged (PRAGMA quick_check: ", *check,
        "); the coordinator does not start on it: restore it from a backup, or move it aside to "
        "start with an empty one"));
  }
  return store;
}

absl::Status JobStore::Configure() {
  MAT_ASSIGN_OR_RETURN(std::string mode, db_->QueryText("PRAGMA journal_mode=WAL"));
  if (mode != "wal") {
    return absl::FailedPreconditionError(absl::StrCat(
        db_->path(), ": cannot enable the WAL journal (journal_mode is '", mode, "')"));
  }
  MAT_RETURN_IF_ERROR(db_->Exec("PRAGMA synchronous=FULL"));
  MAT_RETURN_IF_ERROR(db_->Exec("PRAGMA foreign_keys=ON"));
  // Readers such as the sqlite3 shell may briefly hold locks: wait rather than fail at once.
  MAT_RETURN_IF_ERROR(db_->Exec("PRAGMA busy_timeout=5000"));
  return absl::OkStatus();
}

absl::Status JobStore::EnsureSchema() {
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_ASSIGN_OR_RETURN(
      std::string exists,
      db_->QueryText("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND "
                     "name = 'schema_version'"));
  if (exists == "0") {
    // A new database: the first schema, then every migration, as an old file would get them.
    MAT_RETURN_IF_ERROR(db_->Exec(kSchemaV1));
    for (const char* migration : kMigrations) MAT_RETURN_IF_ERROR(db_->Exec(migration));
    MAT_RETURN_IF_ERROR(
        db_->Exec(absl::StrCat("INSERT INTO schema_version (version) VALUES (",
                               kJobStoreSchemaVersion, ")")));
    return txn.Commit();
  }
  absl::StatusOr<std::string> text = db_->QueryText("SELECT version FROM schema_version");
  int version = 0;
  if (!text.ok() || !absl::SimpleAtoi(*text, &version)) {
    return absl::DataLossError(absl::StrCat(db_->path(), ": schema_version has no valid row"));
  }
  if (version > kJobStoreSchemaVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        db_->path(), ": written by a newer coordinator (schema version ", version,
        "; this one reads up to ", kJobStoreSchemaVersion, ")"));
  }
  if (version < 1) {
    return absl::DataLossError(
        absl::StrCat(db_->path(), ": unknown old schema version ", version));
  }
  if (version == kJobStoreSchemaVersion) return txn.Commit();
  // In the same transaction: a failed migration leaves the old file as it was.
  for (int v = version; v < kJobStoreSchemaVersion; ++v) {
    MAT_RETURN_IF_ERROR(db_->Exec(kMigrations[v - 1]));
  }
  MAT_RETURN_IF_ERROR(db_->Exec(
      absl::StrCat("UPDATE schema_version SET version = ", kJobStoreSchemaVersion)));
  return txn.Commit();
}

int64_t JobStore::Now() const {
  if (options_.now_unix_seconds) return options_.now_unix_seconds();
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::Status JobStore::CheckFile() const {
  MAT_ASSIGN_OR_RETURN(std::unique_ptr<SqliteDb> db, SqliteDb::OpenExisting(db_->path()));
  sqlite3_busy_timeout(db->raw(), 500);
  return db->QueryText("SELECT COUNT(*) FROM jobs").status();
}

absl::StatusOr<std::string> JobStore::Pragma(const std::string& name) {
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) {
      return absl::InvalidArgumentError(absl::StrCat("pragma name '", name, "' is not plain"));
    }
  }
  return db_->QueryText("PRAGMA " + name);
}

absl::Status JobStore::RequireJob(const std::string& job_id) {
  MAT_ASSIGN_OR_RETURN(bool deleted, IsDeletedJob(job_id));
  return deleted ? DeletedError(job_id) : absl::OkStatus();
}

absl::StatusOr<bool> JobStore::IsDeletedJob(const std::string& job_id) {
  MAT_ASSIGN_OR_RETURN(SqliteStatement q,
                       db_->Prepare("SELECT deleted_unix_seconds FROM jobs WHERE id = ?"));
  MAT_RETURN_IF_ERROR(q.BindText(1, job_id));
  MAT_ASSIGN_OR_RETURN(bool found, q.Step());
  if (!found) return absl::NotFoundError(absl::StrCat("job '", job_id, "' not found"));
  return !q.ColumnIsNull(0);
}

absl::Status JobStore::DeletedError(const std::string& job_id) {
  return absl::NotFoundError(
      absl::StrCat("job '", job_id, "' was deleted (matctl delete or --job-retention-days)"));
}

// ----- jobs -----

absl::StatusOr<int64_t> JobStore::CountActiveJobs(const std::string& client) {
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement q,
      db_->Prepare("SELECT count(*) FROM jobs WHERE client = ? AND state IN (?, ?, ?)"));
  MAT_RETURN_IF_ERROR(q.BindText(1, client));
  MAT_RETURN_IF_ERROR(q.BindText(2, JobStateName(v1::JOB_STATE_QUEUED)));
  MAT_RETURN_IF_ERROR(q.BindText(3, JobStateName(v1::JOB_STATE_RUNNING)));
  MAT_RETURN_IF_ERROR(q.BindText(4, JobStateName(v1::JOB_STATE_RESTARTING)));
  MAT_ASSIGN_OR_RETURN(bool row, q.Step());
  MAT_CHECK(row) << "count(*) returned no row";
  return q.ColumnInt64(0);
}

absl::StatusOr<CreateJobResult> JobStore::CreateJob(const std::string& client_request_id,
                                                    const v1::JobSpec& spec,
                                                    const std::string& client,
                                                    int64_t max_active_jobs) {
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  if (!client_request_id.empty()) {
    MAT_ASSIGN_OR_RETURN(std::optional<JobRecord> found, FindRequest(client, client_request_id));
    if (found.has_value()) {
      const JobRecord& existing = *found;
      // With the defaults on both sides: a job stored before a field existed has that field's
      // default (a resubmit after an upgrade is the same job).
      if (!google::protobuf::util::MessageDifferencer::Equals(
              api::WithJobSpecDefaults(existing.spec), api::WithJobSpecDefaults(spec))) {
        return absl::AlreadyExistsError(absl::StrCat(
            "client_request_id '", client_request_id, "' was used for job ", existing.id,
            " with a different spec"));
      }
      return CreateJobResult{existing.id, false};
    }
  }
  if (max_active_jobs > 0) {
    MAT_ASSIGN_OR_RETURN(int64_t active, CountActiveJobs(client));
    if (active >= max_active_jobs) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "client '", client, "' has ", active,
          " active jobs (queued, running or restarting); the limit is ", max_active_jobs,
          " (--max-jobs-per-client): wait for one to finish or cancel one"));
    }
  }
  MAT_ASSIGN_OR_RETURN(std::string max_seq,
                       db_->QueryText("SELECT COALESCE(MAX(seq), 0) FROM jobs"));
  int64_t seq = 0;
  MAT_CHECK(absl::SimpleAtoi(max_seq, &seq)) << "MAX(seq) is not an integer: " << max_seq;
  ++seq;
  const std::string id = absl::StrFormat("job-%06d", seq);
  std::string blob;
  MAT_CHECK(spec.SerializeToString(&blob)) << "JobSpec does not serialize";
  const int64_t now = Now();
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement ins,
      db_->Prepare("INSERT INTO jobs (seq, id, request_key, spec, state, "
                   "created_unix_seconds, updated_unix_seconds, client, request_scope) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"));
  MAT_RETURN_IF_ERROR(ins.BindInt64(1, seq));
  MAT_RETURN_IF_ERROR(ins.BindText(2, id));
  if (client_request_id.empty()) {
    MAT_RETURN_IF_ERROR(ins.BindNull(3));
  } else {
    MAT_RETURN_IF_ERROR(ins.BindText(3, client_request_id));
  }
  MAT_RETURN_IF_ERROR(ins.BindBlob(4, blob));
  MAT_RETURN_IF_ERROR(ins.BindText(5, JobStateName(v1::JOB_STATE_QUEUED)));
  MAT_RETURN_IF_ERROR(ins.BindInt64(6, now));
  MAT_RETURN_IF_ERROR(ins.BindInt64(7, now));
  MAT_RETURN_IF_ERROR(ins.BindText(8, client));
  MAT_RETURN_IF_ERROR(ins.BindText(9, RequestScope(client)));
  MAT_RETURN_IF_ERROR(ins.Run());
  MAT_RETURN_IF_ERROR(txn.Commit());
  return CreateJobResult{id, true};
}

absl::StatusOr<std::optional<JobRecord>> JobStore::FindRequest(const std::string& client,
                                                               const std::string& request_key) {
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement q,
      db_->Prepare(absl::StrCat("SELECT ", kJobColumns,
                                " FROM jobs WHERE request_scope = ? AND request_key = ?")));
  MAT_RETURN_IF_ERROR(q.BindText(1, RequestScope(client)));
  MAT_RETURN_IF_ERROR(q.BindText(2, request_key));
  MAT_ASSIGN_OR_RETURN(bool found, q.Step());
  if (!found) return std::nullopt;
  MAT_ASSIGN_OR_RETURN(JobRecord job, ReadJob(q));
  return job;
}

absl::StatusOr<JobRecord> JobStore::GetJob(const std::string& job_id) {
  MAT_ASSIGN_OR_RETURN(SqliteStatement q,
                       db_->Prepare(absl::StrCat("SELECT ", kJobColumns,
                                                 ", deleted_unix_seconds FROM jobs WHERE id = ?")));
  MAT_RETURN_IF_ERROR(q.BindText(1, job_id));
  MAT_ASSIGN_OR_RETURN(bool found, q.Step());
  if (!found) return absl::NotFoundError(absl::StrCat("job '", job_id, "' not found"));
  if (!q.ColumnIsNull(kJobColumnCount)) return DeletedError(job_id);
  return ReadJob(q);
}

absl::Status JobStore::DeleteJob(const std::string& job_id) {
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_ASSIGN_OR_RETURN(JobRecord job, GetJob(job_id));
  if (!api::IsTerminalJobState(job.state)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " is ", JobStateName(job.state),
        ": only a finished job (SUCCEEDED, FAILED or CANCELLED) can be deleted; cancel it first "
        "(matctl cancel ", job_id, ")"));
  }
  // A job that still has to replay this one's decisions (policy.rand_schedule_job).
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement active,
      db_->Prepare("SELECT id, spec FROM jobs WHERE state IN (?, ?, ?) "
                   "AND deleted_unix_seconds IS NULL ORDER BY seq"));
  int arg = 1;
  for (v1::JobState s : {v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING}) {
    MAT_RETURN_IF_ERROR(active.BindText(arg++, JobStateName(s)));
  }
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, active.Step());
    if (!row) break;
    v1::JobSpec spec;
    if (spec.ParseFromString(active.ColumnBlob(1)) &&
        spec.policy().rand_schedule_job() == job_id) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", active.ColumnText(0), " replays the decisions of job ", job_id,
          " (policy.rand_schedule_job) and has not finished: delete ", job_id, " after it"));
    }
  }
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement mark,
      db_->Prepare("UPDATE jobs SET deleted_unix_seconds = ?, request_key = NULL, "
                   "summary_json = '', spec = x'', error_message = '' WHERE id = ?"));
  MAT_RETURN_IF_ERROR(mark.BindInt64(1, Now()));
  MAT_RETURN_IF_ERROR(mark.BindText(2, job_id));
  MAT_RETURN_IF_ERROR(mark.Run());
  for (const char* table : {"assignments", "lambda_history", "decisions", "modules", "job_logs"}) {
    MAT_ASSIGN_OR_RETURN(SqliteStatement del,
                         db_->Prepare(absl::StrCat("DELETE FROM ", table, " WHERE job_id = ?")));
    MAT_RETURN_IF_ERROR(del.BindText(1, job_id));
    MAT_RETURN_IF_ERROR(del.Run());
  }
  return txn.Commit();
}

absl::StatusOr<std::map<v1::JobState, int64_t>> JobStore::CountDeletedJobs() {
  MAT_ASSIGN_OR_RETURN(SqliteStatement q,
                       db_->Prepare("SELECT state, count(*) FROM jobs "
                                    "WHERE deleted_unix_seconds IS NOT NULL GROUP BY state"));
  std::map<v1::JobState, int64_t> counts;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    MAT_ASSIGN_OR_RETURN(const v1::JobState state, ParseJobState(q.ColumnText(0)));
    counts[state] = q.ColumnInt64(1);
  }
  return counts;
}

absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> JobStore::ListFinishedBefore(
    int64_t max_age_seconds, int limit, int64_t after_seq) {
  // From `after_seq` on: seq is the rowid, so a round does not walk the rows before it.
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement q,
      db_->Prepare("SELECT seq, id FROM jobs WHERE seq > ? AND state IN (?, ?, ?) "
                   "AND deleted_unix_seconds IS NULL AND updated_unix_seconds < ? "
                   "ORDER BY seq LIMIT ?"));
  int arg = 1;
  MAT_RETURN_IF_ERROR(q.BindInt64(arg++, after_seq));
  for (v1::JobState s : {v1::JOB_STATE_SUCCEEDED, v1::JOB_STATE_FAILED, v1::JOB_STATE_CANCELLED}) {
    MAT_RETURN_IF_ERROR(q.BindText(arg++, JobStateName(s)));
  }
  MAT_RETURN_IF_ERROR(q.BindInt64(arg++, Now() - max_age_seconds));
  MAT_RETURN_IF_ERROR(q.BindInt64(arg++, limit));
  std::vector<std::pair<int64_t, std::string>> jobs;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    jobs.emplace_back(q.ColumnInt64(0), q.ColumnText(1));
  }
  return jobs;
}

absl::StatusOr<JobPage> JobStore::ListJobs(int page_size, const std::string& page_token,
                                           const std::vector<v1::JobState>& states,
                                           const std::optional<std::string>& client) {
  MAT_ASSIGN_OR_RETURN(const int size, EffectivePageSize(page_size));
  MAT_ASSIGN_OR_RETURN(const int64_t start, ParsePageToken(page_token));
  std::string sql = absl::StrCat("SELECT ", kJobColumns,
                                 ", seq FROM jobs WHERE seq >= ? AND deleted_unix_seconds IS NULL");
  if (!states.empty()) absl::StrAppend(&sql, " AND state IN (", Placeholders(states.size()), ")");
  if (client.has_value()) absl::StrAppend(&sql, " AND client = ?");
  absl::StrAppend(&sql, " ORDER BY seq LIMIT ?");
  MAT_ASSIGN_OR_RETURN(SqliteStatement q, db_->Prepare(sql));
  int arg = 1;
  MAT_RETURN_IF_ERROR(q.BindInt64(arg++, start));
  for (v1::JobState s : states) MAT_RETURN_IF_ERROR(q.BindText(arg++, JobStateName(s)));
  if (client.has_value()) MAT_RETURN_IF_ERROR(q.BindText(arg++, *client));
  MAT_RETURN_IF_ERROR(q.BindInt64(arg++, size + 1));  // one more tells whether a page follows
  JobPage page;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    if (static_cast<int>(page.jobs.size()) == size) {
      page.next_page_token = std::to_string(q.ColumnInt64(kJobColumnCount));
      break;
    }
    MAT_ASSIGN_OR_RETURN(JobRecord job, ReadJob(q));
    page.jobs.push_back(std::move(job));
  }
  return page;
}

absl::Status JobStore::UpdateJobState(const std::string& job_id, v1::JobState state,
                                      const std::string& error_message) {
  if (JobStateName(state) == "UNSPECIFIED") {
    return absl::InvalidArgumentError(
        absl::StrCat("state ", static_cast<int>(state), " is not a job state"));
  }
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_ASSIGN_OR_RETURN(JobRecord job, GetJob(job_id));
  if (!IsLegalJobTransition(job.state, state)) {
    return absl::FailedPreconditionError(absl::StrCat("job ", job_id, " is ",
                                                      JobStateName(job.state), ": cannot move to ",
                                                      JobStateName(state)));
  }
  // A restart is a new attempt (the ranks of different attempts never mix), counted with the
  // state change in one write.
  MAT_ASSIGN_OR_RETURN(SqliteStatement upd,
                       db_->Prepare(state == v1::JOB_STATE_RESTARTING
                                        ? "UPDATE jobs SET state = ?, error_message = ?, "
                                          "updated_unix_seconds = ?, attempt = attempt + 1 "
                                          "WHERE id = ?"
                                        : "UPDATE jobs SET state = ?, error_message = ?, "
                                          "updated_unix_seconds = ? WHERE id = ?"));
  MAT_RETURN_IF_ERROR(upd.BindText(1, JobStateName(state)));
  MAT_RETURN_IF_ERROR(upd.BindText(2, error_message));
  MAT_RETURN_IF_ERROR(upd.BindInt64(3, Now()));
  MAT_RETURN_IF_ERROR(upd.BindText(4, job_id));
  MAT_RETURN_IF_ERROR(upd.Run());
  return txn.Commit();
}

absl::Status JobStore::UpdateJobProgress(const std::string& job_id,
                                         const JobProgressUpdate& progress) {
  if (progress.step < 0) {
    return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, got ", progress.step));
  }
  MAT_RETURN_IF_ERROR(CheckNumber("train_loss", progress.train_loss, false));
  if (progress.val_loss) MAT_RETURN_IF_ERROR(CheckNumber("val_loss", *progress.val_loss, false));
  if (progress.test_loss) {
    MAT_RETURN_IF_ERROR(CheckNumber("test_loss", *progress.test_loss, false));
  }
  MAT_RETURN_IF_ERROR(CheckNumber("flops_total", progress.flops_total, true));
  MAT_RETURN_IF_ERROR(CheckNumber("wall_seconds", progress.wall_seconds, true));
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  // COALESCE keeps the stored loss when the update has none (bound as NULL).
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement upd,
      db_->Prepare("UPDATE jobs SET step = ?, train_loss = ?, val_loss = COALESCE(?, val_loss), "
                   "test_loss = COALESCE(?, test_loss), flops_total = ?, wall_seconds = ? "
                   "WHERE id = ?"));
  MAT_RETURN_IF_ERROR(upd.BindInt64(1, progress.step));
  MAT_RETURN_IF_ERROR(upd.BindDouble(2, progress.train_loss));
  MAT_RETURN_IF_ERROR(progress.val_loss ? upd.BindDouble(3, *progress.val_loss) : upd.BindNull(3));
  MAT_RETURN_IF_ERROR(progress.test_loss ? upd.BindDouble(4, *progress.test_loss)
                                         : upd.BindNull(4));
  MAT_RETURN_IF_ERROR(upd.BindDouble(5, progress.flops_total));
  MAT_RETURN_IF_ERROR(upd.BindDouble(6, progress.wall_seconds));
  MAT_RETURN_IF_ERROR(upd.BindText(7, job_id));
  MAT_RETURN_IF_ERROR(upd.Run());
  return txn.Commit();
}

absl::Status JobStore::SetJobSummary(const std::string& job_id, const std::string& summary_json) {
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_RETURN_IF_ERROR(WriteJobSummary(job_id, summary_json));
  return txn.Commit();
}

absl::Status JobStore::WriteJobSummary(const std::string& job_id, const std::string& summary_json) {
  MAT_ASSIGN_OR_RETURN(SqliteStatement upd,
                       db_->Prepare("UPDATE jobs SET summary_json = ? WHERE id = ?"));
  MAT_RETURN_IF_ERROR(upd.BindText(1, summary_json));
  MAT_RETURN_IF_ERROR(upd.BindText(2, job_id));
  return upd.Run();
}

// ----- modules -----

absl::Status JobStore::PutModules(const std::string& job_id,
                                  const std::vector<ModuleRecord>& modules) {
  if (modules.empty()) return absl::InvalidArgumentError("modules is empty");
  for (size_t i = 0; i < modules.size(); ++i) {
    const ModuleRecord& m = modules[i];
    if (m.name.empty() || m.group.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("module ", i, ": ", m.name.empty() ? "name" : "group", " is empty"));
    }
    if (m.layer < 0 || m.index < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "module ", i, " (", m.name, "): layer and index must be >= 0, got ", m.layer, " and ",
          m.index));
    }
  }
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_ASSIGN_OR_RETURN(SqliteStatement del, db_->Prepare("DELETE FROM modules WHERE job_id = ?"));
  MAT_RETURN_IF_ERROR(del.BindText(1, job_id));
  MAT_RETURN_IF_ERROR(del.Run());
  MAT_ASSIGN_OR_RETURN(SqliteStatement ins,
                       db_->Prepare("INSERT INTO modules (job_id, module_index, name, "
                                    "module_group, layer, index_in_layer) "
                                    "VALUES (?, ?, ?, ?, ?, ?)"));
  for (size_t i = 0; i < modules.size(); ++i) {
    ins.Reset();
    MAT_RETURN_IF_ERROR(ins.BindText(1, job_id));
    MAT_RETURN_IF_ERROR(ins.BindInt64(2, static_cast<int64_t>(i)));
    MAT_RETURN_IF_ERROR(ins.BindText(3, modules[i].name));
    MAT_RETURN_IF_ERROR(ins.BindText(4, modules[i].group));
    MAT_RETURN_IF_ERROR(ins.BindInt64(5, modules[i].layer));
    MAT_RETURN_IF_ERROR(ins.BindInt64(6, modules[i].index));
    MAT_RETURN_IF_ERROR(ins.Run());
  }
  MAT_ASSIGN_OR_RETURN(SqliteStatement upd,
                       db_->Prepare("UPDATE jobs SET total_modules = ? WHERE id = ?"));
  MAT_RETURN_IF_ERROR(upd.BindInt64(1, static_cast<int64_t>(modules.size())));
  MAT_RETURN_IF_ERROR(upd.BindText(2, job_id));
  MAT_RETURN_IF_ERROR(upd.Run());
  return txn.Commit();
}

absl::StatusOr<std::vector<ModuleRecord>> JobStore::GetModules(const std::string& job_id) {
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_ASSIGN_OR_RETURN(SqliteStatement q,
                       db_->Prepare("SELECT module_index, name, module_group, layer, "
                                    "index_in_layer FROM modules WHERE job_id = ? "
                                    "ORDER BY module_index"));
  MAT_RETURN_IF_ERROR(q.BindText(1, job_id));
  std::vector<ModuleRecord> out;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    if (q.ColumnInt64(0) != static_cast<int64_t>(out.size())) {
      return absl::DataLossError(
          absl::StrCat("job ", job_id, ": module indices are not contiguous"));
    }
    out.push_back(ModuleRecord{q.ColumnText(1), q.ColumnText(2),
                               static_cast<int32_t>(q.ColumnInt64(3)),
                               static_cast<int32_t>(q.ColumnInt64(4))});
  }
  return out;
}

}  // namespace mat::coordinator
