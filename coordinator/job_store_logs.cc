// JobStore's log section (job_store.h "logs"): the job_logs table (schema v5).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/job_store.h"
#include "coordinator/sqlite_db.h"

namespace mat::coordinator {

absl::Status JobStore::AppendJobLogs(const std::string& job_id, int rank,
                                     const std::vector<LogLineRecord>& lines,
                                     int64_t max_lines) {
  if (rank < 0) return absl::InvalidArgumentError(absl::StrCat("rank must be >= 0, got ", rank));
  if (max_lines < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_lines must be >= 0, got ", max_lines));
  }
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_ASSIGN_OR_RETURN(SqliteStatement last,
                       db_->Prepare("SELECT COALESCE(MAX(seq), 0) FROM job_logs WHERE job_id = ?"));
  MAT_RETURN_IF_ERROR(last.BindText(1, job_id));
  MAT_ASSIGN_OR_RETURN(bool row, last.Step());
  int64_t seq = row ? last.ColumnInt64(0) : 0;
  MAT_ASSIGN_OR_RETURN(SqliteStatement ins,
                       db_->Prepare("INSERT INTO job_logs (job_id, seq, rank, time_unix_ms, "
                                    "level, text) VALUES (?, ?, ?, ?, ?, ?)"));
  for (const LogLineRecord& line : lines) {
    ins.Reset();
    MAT_RETURN_IF_ERROR(ins.BindText(1, job_id));
    MAT_RETURN_IF_ERROR(ins.BindInt64(2, ++seq));
    MAT_RETURN_IF_ERROR(ins.BindInt64(3, rank));
    MAT_RETURN_IF_ERROR(ins.BindInt64(4, line.time_unix_ms));
    MAT_RETURN_IF_ERROR(ins.BindText(5, line.level));
    MAT_RETURN_IF_ERROR(ins.BindText(6, line.text));
    MAT_RETURN_IF_ERROR(ins.Run());
  }
  if (max_lines > 0 && seq > max_lines) {
    MAT_ASSIGN_OR_RETURN(SqliteStatement del,
                         db_->Prepare("DELETE FROM job_logs WHERE job_id = ? AND seq <= ?"));
    MAT_RETURN_IF_ERROR(del.BindText(1, job_id));
    MAT_RETURN_IF_ERROR(del.BindInt64(2, seq - max_lines));
    MAT_RETURN_IF_ERROR(del.Run());
  }
  return txn.Commit();
}

absl::StatusOr<JobLogPage> JobStore::GetJobLogs(const std::string& job_id,
                                                std::optional<int> rank, int64_t after_seq,
                                                int limit) {
  if (limit < 1 || limit > 10000) {
    return absl::InvalidArgumentError(absl::StrCat("limit must be in [1, 10000], got ", limit));
  }
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  JobLogPage page;
  // Dropped: every seq ever assigned (the highest kept) minus the lines kept.
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement count,
      db_->Prepare("SELECT COALESCE(MAX(seq), 0) - COUNT(*) FROM job_logs WHERE job_id = ?"));
  MAT_RETURN_IF_ERROR(count.BindText(1, job_id));
  MAT_ASSIGN_OR_RETURN(bool counted, count.Step());
  if (counted) page.dropped = count.ColumnInt64(0);
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement q,
      db_->Prepare(rank.has_value()
                       ? "SELECT seq, rank, time_unix_ms, level, text FROM job_logs WHERE "
                         "job_id = ? AND seq > ? AND rank = ? ORDER BY seq LIMIT ?"
                       : "SELECT seq, rank, time_unix_ms, level, text FROM job_logs WHERE "
                         "job_id = ? AND seq > ? ORDER BY seq LIMIT ?"));
  int column = 1;
  MAT_RETURN_IF_ERROR(q.BindText(column++, job_id));
  MAT_RETURN_IF_ERROR(q.BindInt64(column++, after_seq));
  if (rank.has_value()) MAT_RETURN_IF_ERROR(q.BindInt64(column++, *rank));
  MAT_RETURN_IF_ERROR(q.BindInt64(column++, limit));
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool found, q.Step());
    if (!found) break;
    LogLineRecord line;
    line.seq = q.ColumnInt64(0);
    line.rank = static_cast<int>(q.ColumnInt64(1));
    line.time_unix_ms = q.ColumnInt64(2);
    line.level = q.ColumnText(3);
    line.text = q.ColumnText(4);
    page.lines.push_back(std::move(line));
  }
  return page;
}

}  // namespace mat::coordinator
