// JobStore's workers and assignments (job_store.h): the workers and assignments tables.
#include <algorithm>
#include <cmath>
#include <optional>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "coordinator/job_store.h"
#include "coordinator/job_store_internal.h"
#include "coordinator/sqlite_db.h"

namespace mat::coordinator {
using namespace store_internal;
namespace {

constexpr const char* kWorkerColumns =
    "id, host, device, memory_bytes, registered_unix_seconds, last_seen_unix_seconds, "
    "rendezvous_port, drain_reason, secret_sha256";

// Reads a row selected with kWorkerColumns.
WorkerRecord ReadWorker(const SqliteStatement& row) {
  WorkerRecord w;
  w.id = row.ColumnText(0);
  w.host = row.ColumnText(1);
  w.device = row.ColumnText(2);
  w.memory_bytes = row.ColumnInt64(3);
  w.registered_unix_seconds = row.ColumnInt64(4);
  w.last_seen_unix_seconds = row.ColumnInt64(5);
  w.rendezvous_port = static_cast<int32_t>(row.ColumnInt64(6));
  if (!row.ColumnIsNull(7)) w.drain_reason = row.ColumnText(7);
  w.secret_sha256 = row.ColumnText(8);
  return w;
}

}  // namespace

// ----- workers and assignments -----

absl::Status JobStore::UpsertWorker(const WorkerRecord& worker) {
  if (worker.id.empty()) return absl::InvalidArgumentError("worker id is empty");
  const int64_t now = Now();
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement q,
      db_->Prepare("INSERT INTO workers (id, host, device, memory_bytes, registered_unix_seconds, "
                   "last_seen_unix_seconds, rendezvous_port, secret_sha256) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                   "ON CONFLICT (id) DO UPDATE SET host = excluded.host, "
                   "device = excluded.device, memory_bytes = excluded.memory_bytes, "
                   "last_seen_unix_seconds = excluded.last_seen_unix_seconds, "
                   "rendezvous_port = excluded.rendezvous_port, "
                   "secret_sha256 = excluded.secret_sha256"));
  MAT_RETURN_IF_ERROR(q.BindText(1, worker.id));
  MAT_RETURN_IF_ERROR(q.BindText(2, worker.host));
  MAT_RETURN_IF_ERROR(q.BindText(3, worker.device));
  MAT_RETURN_IF_ERROR(q.BindInt64(4, worker.memory_bytes));
  MAT_RETURN_IF_ERROR(q.BindInt64(5, now));
  MAT_RETURN_IF_ERROR(q.BindInt64(6, now));
  MAT_RETURN_IF_ERROR(q.BindInt64(7, worker.rendezvous_port));
  MAT_RETURN_IF_ERROR(q.BindText(8, worker.secret_sha256));
  return q.Run();  // one statement: atomic on its own
}

absl::StatusOr<std::string> JobStore::CreateWorker(const WorkerRecord& worker) {
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  // Ids a worker brought along (resuming against a fresh state dir) count too, so a new id never
  // collides with one in use.
  MAT_ASSIGN_OR_RETURN(SqliteStatement q,
                       db_->Prepare("SELECT id FROM workers WHERE id GLOB 'worker-[0-9]*'"));
  // Numbers past kMaxIssuedWorkerNumber are not counted: a worker that registered itself as
  // worker-9223372036854775807 made the next id overflow into one every later worker shared.
  constexpr int64_t kMaxIssuedWorkerNumber = 999'999'999'999;
  int64_t highest = 0;
  std::set<std::string> taken;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    taken.insert(q.ColumnText(0));
    int64_t n = 0;
    if (absl::SimpleAtoi(q.ColumnText(0).substr(7), &n) && n >= 0 && n < kMaxIssuedWorkerNumber) {
      highest = std::max(highest, n);
    }
  }
  WorkerRecord stored = worker;
  stored.id = absl::StrFormat("worker-%06d", highest + 1);
  for (int64_t n = highest + 2; taken.count(stored.id) != 0; ++n) {  // a stored id may spell it
    stored.id = absl::StrFormat("worker-%06d", n);
  }
  MAT_RETURN_IF_ERROR(UpsertWorker(stored));
  MAT_RETURN_IF_ERROR(txn.Commit());
  return stored.id;
}

absl::StatusOr<WorkerRecord> JobStore::GetWorker(const std::string& worker_id) {
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement q,
      db_->Prepare(absl::StrCat("SELECT ", kWorkerColumns, " FROM workers WHERE id = ?")));
  MAT_RETURN_IF_ERROR(q.BindText(1, worker_id));
  MAT_ASSIGN_OR_RETURN(bool found, q.Step());
  if (!found) return absl::NotFoundError(absl::StrCat("worker '", worker_id, "' not found"));
  return ReadWorker(q);
}

absl::Status JobStore::TouchWorker(const std::string& worker_id) {
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_ASSIGN_OR_RETURN(SqliteStatement upd,
                       db_->Prepare("UPDATE workers SET last_seen_unix_seconds = ? WHERE id = ?"));
  MAT_RETURN_IF_ERROR(upd.BindInt64(1, Now()));
  MAT_RETURN_IF_ERROR(upd.BindText(2, worker_id));
  MAT_RETURN_IF_ERROR(upd.Run());
  if (sqlite3_changes(db_->raw()) == 0) {
    return absl::NotFoundError(absl::StrCat("worker '", worker_id, "' not found"));
  }
  return txn.Commit();
}

absl::StatusOr<std::vector<WorkerRecord>> JobStore::ListWorkers() {
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement q,
      db_->Prepare(absl::StrCat("SELECT ", kWorkerColumns, " FROM workers ORDER BY id")));
  std::vector<WorkerRecord> out;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    out.push_back(ReadWorker(q));
  }
  return out;
}

absl::Status JobStore::SetWorkerDrain(const std::string& worker_id,
                                      const std::optional<std::string>& reason) {
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_ASSIGN_OR_RETURN(SqliteStatement upd,
                       db_->Prepare("UPDATE workers SET drain_reason = ? WHERE id = ?"));
  if (reason.has_value()) {
    MAT_RETURN_IF_ERROR(upd.BindText(1, *reason));
  } else {
    MAT_RETURN_IF_ERROR(upd.BindNull(1));
  }
  MAT_RETURN_IF_ERROR(upd.BindText(2, worker_id));
  MAT_RETURN_IF_ERROR(upd.Run());
  if (sqlite3_changes(db_->raw()) == 0) {
    return absl::NotFoundError(absl::StrCat("worker '", worker_id, "' not found"));
  }
  return txn.Commit();
}

absl::Status JobStore::PutAssignment(const std::string& job_id, int32_t rank,
                                     const std::string& worker_id, int64_t attempt) {
  if (rank < 0) return absl::InvalidArgumentError(absl::StrCat("rank must be >= 0, got ", rank));
  if (attempt < 0) {
    return absl::InvalidArgumentError(absl::StrCat("attempt must be >= 0, got ", attempt));
  }
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  {
    MAT_ASSIGN_OR_RETURN(SqliteStatement q, db_->Prepare("SELECT 1 FROM workers WHERE id = ?"));
    MAT_RETURN_IF_ERROR(q.BindText(1, worker_id));
    MAT_ASSIGN_OR_RETURN(bool found, q.Step());
    if (!found) return absl::NotFoundError(absl::StrCat("worker '", worker_id, "' not found"));
  }
  // A new assignment starts with a fresh status (the rank's step, acks and checksum).
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement ins,
      db_->Prepare("INSERT OR REPLACE INTO assignments (job_id, rank, worker_id, attempt, "
                   "assigned_unix_seconds) VALUES (?, ?, ?, ?, ?)"));
  MAT_RETURN_IF_ERROR(ins.BindText(1, job_id));
  MAT_RETURN_IF_ERROR(ins.BindInt64(2, rank));
  MAT_RETURN_IF_ERROR(ins.BindText(3, worker_id));
  MAT_RETURN_IF_ERROR(ins.BindInt64(4, attempt));
  MAT_RETURN_IF_ERROR(ins.BindInt64(5, Now()));
  MAT_RETURN_IF_ERROR(ins.Run());
  return txn.Commit();
}

absl::Status JobStore::UpdateRankStatus(const std::string& job_id, int32_t rank, int64_t step,
                                        int64_t mask_version, double flops_total,
                                        const std::string& param_checksum,
                                        const std::string* summary_json) {
  if (step < 0) return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, got ", step));
  if (mask_version < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("mask_version must be >= 0, got ", mask_version));
  }
  MAT_RETURN_IF_ERROR(CheckNumber("flops_total", flops_total, /*non_negative=*/true));
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_ASSIGN_OR_RETURN(SqliteStatement upd,
                       db_->Prepare("UPDATE assignments SET step = ?, mask_version = ?, "
                                    "flops_total = ?, param_checksum = ? "
                                    "WHERE job_id = ? AND rank = ?"));
  MAT_RETURN_IF_ERROR(upd.BindInt64(1, step));
  MAT_RETURN_IF_ERROR(upd.BindInt64(2, mask_version));
  MAT_RETURN_IF_ERROR(upd.BindDouble(3, flops_total));
  MAT_RETURN_IF_ERROR(upd.BindText(4, param_checksum));
  MAT_RETURN_IF_ERROR(upd.BindText(5, job_id));
  MAT_RETURN_IF_ERROR(upd.BindInt64(6, rank));
  MAT_RETURN_IF_ERROR(upd.Run());
  if (sqlite3_changes(db_->raw()) == 0) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " has no rank ", rank));
  }
  if (summary_json != nullptr) MAT_RETURN_IF_ERROR(WriteJobSummary(job_id, *summary_json));
  return txn.Commit();
}

absl::StatusOr<std::vector<AssignmentRecord>> JobStore::ListAssignments(
    const std::string& job_id) {
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_ASSIGN_OR_RETURN(SqliteStatement q,
                       db_->Prepare("SELECT job_id, rank, worker_id, attempt, "
                                    "assigned_unix_seconds, step, mask_version, param_checksum, "
                                    "flops_total FROM assignments WHERE job_id = ? ORDER BY rank"));
  MAT_RETURN_IF_ERROR(q.BindText(1, job_id));
  std::vector<AssignmentRecord> out;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    AssignmentRecord a;
    a.job_id = q.ColumnText(0);
    a.rank = static_cast<int32_t>(q.ColumnInt64(1));
    a.worker_id = q.ColumnText(2);
    a.attempt = q.ColumnInt64(3);
    a.assigned_unix_seconds = q.ColumnInt64(4);
    a.step = q.ColumnInt64(5);
    a.mask_version = q.ColumnInt64(6);
    a.param_checksum = q.ColumnText(7);
    a.flops_total = q.ColumnDouble(8);
    out.push_back(std::move(a));
  }
  return out;
}

}  // namespace mat::coordinator
