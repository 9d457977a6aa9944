// JobStore's λ history and decisions (job_store.h): the lambdas and decisions tables.
#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/job_store.h"
#include "coordinator/job_store_internal.h"
#include "coordinator/sqlite_db.h"

namespace mat::coordinator {
using namespace store_internal;

// ----- λ history and decisions -----

absl::Status JobStore::AppendLambdas(const std::string& job_id, int64_t step,
                                     const std::vector<double>& lambda) {
  if (step < 0) return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, got ", step));
  if (lambda.empty()) return absl::InvalidArgumentError("lambda is empty (no modules)");
  MAT_RETURN_IF_ERROR(CheckLambdas(job_id, step, lambda));
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_RETURN_IF_ERROR(WriteLambdas(job_id, step, lambda));
  return txn.Commit();
}

absl::Status JobStore::WriteLambdas(const std::string& job_id, int64_t step,
                                    const std::vector<double>& lambda) {
  MAT_ASSIGN_OR_RETURN(SqliteStatement del,
                       db_->Prepare("DELETE FROM lambda_history WHERE job_id = ? AND step = ?"));
  MAT_RETURN_IF_ERROR(del.BindText(1, job_id));
  MAT_RETURN_IF_ERROR(del.BindInt64(2, step));
  MAT_RETURN_IF_ERROR(del.Run());
  MAT_ASSIGN_OR_RETURN(SqliteStatement ins,
                       db_->Prepare("INSERT INTO lambda_history (job_id, step, module_index, "
                                    "lambda) VALUES (?, ?, ?, ?)"));
  for (size_t i = 0; i < lambda.size(); ++i) {
    ins.Reset();
    MAT_RETURN_IF_ERROR(ins.BindText(1, job_id));
    MAT_RETURN_IF_ERROR(ins.BindInt64(2, step));
    MAT_RETURN_IF_ERROR(ins.BindInt64(3, static_cast<int64_t>(i)));
    MAT_RETURN_IF_ERROR(ins.BindDouble(4, lambda[i]));
    MAT_RETURN_IF_ERROR(ins.Run());
  }
  return absl::OkStatus();
}

absl::StatusOr<LambdaPage> JobStore::GetLambdas(const std::string& job_id, int page_size,
                                                const std::string& page_token) {
  MAT_ASSIGN_OR_RETURN(const int size, EffectivePageSize(page_size));
  MAT_ASSIGN_OR_RETURN(const int64_t start, ParsePageToken(page_token));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  // The steps of this page (and the first of the next one).
  MAT_ASSIGN_OR_RETURN(SqliteStatement steps,
                       db_->Prepare("SELECT DISTINCT step FROM lambda_history WHERE job_id = ? "
                                    "AND step >= ? ORDER BY step LIMIT ?"));
  MAT_RETURN_IF_ERROR(steps.BindText(1, job_id));
  MAT_RETURN_IF_ERROR(steps.BindInt64(2, start));
  MAT_RETURN_IF_ERROR(steps.BindInt64(3, size + 1));
  LambdaPage page;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, steps.Step());
    if (!row) break;
    if (static_cast<int>(page.points.size()) == size) {
      page.next_page_token = std::to_string(steps.ColumnInt64(0));
      break;
    }
    page.points.push_back(LambdaPoint{steps.ColumnInt64(0), {}});
  }
  if (page.points.empty()) return page;
  MAT_ASSIGN_OR_RETURN(SqliteStatement rows,
                       db_->Prepare("SELECT step, module_index, lambda FROM lambda_history "
                                    "WHERE job_id = ? AND step >= ? AND step <= ? "
                                    "ORDER BY step, module_index"));
  MAT_RETURN_IF_ERROR(rows.BindText(1, job_id));
  MAT_RETURN_IF_ERROR(rows.BindInt64(2, page.points.front().step));
  MAT_RETURN_IF_ERROR(rows.BindInt64(3, page.points.back().step));
  size_t p = 0;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, rows.Step());
    if (!row) break;
    const int64_t step = rows.ColumnInt64(0);
    while (page.points[p].step != step) ++p;  // both ascending; every row's step is listed
    std::vector<double>& lambda = page.points[p].lambda;
    if (rows.ColumnInt64(1) != static_cast<int64_t>(lambda.size())) {
      return absl::DataLossError(absl::StrCat("job ", job_id, " step ", step,
                                              ": module indices are not contiguous"));
    }
    lambda.push_back(rows.ColumnDouble(2));
  }
  return page;
}

absl::Status JobStore::AppendDecision(const std::string& job_id, int64_t step,
                                      const std::string& decision_json) {
  if (step < 0) return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, got ", step));
  if (!nlohmann::json::accept(decision_json)) {
    return absl::InvalidArgumentError(
        absl::StrCat("decision at step ", step, " of job ", job_id, " is not JSON"));
  }
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_RETURN_IF_ERROR(WriteDecision(job_id, step, decision_json, "", ""));
  return txn.Commit();
}

absl::Status JobStore::WriteDecision(const std::string& job_id, int64_t step,
                                     const std::string& decision_json,
                                     const std::string& policy_state,
                                     const std::string& mask_update) {
  MAT_ASSIGN_OR_RETURN(SqliteStatement ins,
                       db_->Prepare("INSERT OR REPLACE INTO decisions (job_id, step, "
                                    "decision_json, policy_state, mask_update) "
                                    "VALUES (?, ?, ?, ?, ?)"));
  MAT_RETURN_IF_ERROR(ins.BindText(1, job_id));
  MAT_RETURN_IF_ERROR(ins.BindInt64(2, step));
  MAT_RETURN_IF_ERROR(ins.BindText(3, decision_json));
  MAT_RETURN_IF_ERROR(ins.BindText(4, policy_state));
  MAT_RETURN_IF_ERROR(ins.BindBlob(5, mask_update));
  return ins.Run();
}

absl::StatusOr<std::optional<StoredDecision>> JobStore::LatestDecisionAtOrBefore(
    const std::string& job_id, int64_t step) {
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_ASSIGN_OR_RETURN(SqliteStatement q,
                       db_->Prepare("SELECT step, decision_json, policy_state, mask_update "
                                    "FROM decisions WHERE job_id = ? AND step <= ? "
                                    "ORDER BY step DESC LIMIT 1"));
  MAT_RETURN_IF_ERROR(q.BindText(1, job_id));
  MAT_RETURN_IF_ERROR(q.BindInt64(2, step));
  MAT_ASSIGN_OR_RETURN(bool row, q.Step());
  if (!row) return std::optional<StoredDecision>();
  StoredDecision d;
  d.step = q.ColumnInt64(0);
  d.decision_json = q.ColumnText(1);
  d.policy_state = q.ColumnText(2);
  d.mask_update = q.ColumnBlob(3);
  return std::optional<StoredDecision>(std::move(d));
}

absl::Status JobStore::RecordDecision(const std::string& job_id, const DecisionUpdate& update) {
  if (update.step < 0) {
    return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, got ", update.step));
  }
  MAT_RETURN_IF_ERROR(CheckLambdas(job_id, update.step, update.lambda));
  if (!nlohmann::json::accept(update.decision_json)) {
    return absl::InvalidArgumentError(
        absl::StrCat("decision at step ", update.step, " of job ", job_id, " is not JSON"));
  }
  if (update.mask_version < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("mask_version must be >= 1, got ", update.mask_version));
  }
  if (update.active_modules < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("active_modules must be >= 0, got ", update.active_modules));
  }
  MAT_ASSIGN_OR_RETURN(SqliteTransaction txn, SqliteTransaction::Begin(*db_));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  // A decision at `step` starts the job's history anew from there: rows of later steps are an
  // abandoned attempt's (it got further before it failed than the checkpoint this attempt
  // resumed from), and a later restore must not continue from them.
  for (const char* table : {"lambda_history", "decisions"}) {
    MAT_ASSIGN_OR_RETURN(SqliteStatement later,
                         db_->Prepare(absl::StrCat("DELETE FROM ", table,
                                                   " WHERE job_id = ? AND step > ?")));
    MAT_RETURN_IF_ERROR(later.BindText(1, job_id));
    MAT_RETURN_IF_ERROR(later.BindInt64(2, update.step));
    MAT_RETURN_IF_ERROR(later.Run());
  }
  if (!update.lambda.empty()) {
    MAT_RETURN_IF_ERROR(WriteLambdas(job_id, update.step, update.lambda));
  }
  MAT_RETURN_IF_ERROR(WriteDecision(job_id, update.step, update.decision_json,
                                    update.policy_state, update.mask_update));
  MAT_ASSIGN_OR_RETURN(
      SqliteStatement upd,
      db_->Prepare("UPDATE jobs SET mask_version = ?, active_modules = ? WHERE id = ?"));
  MAT_RETURN_IF_ERROR(upd.BindInt64(1, update.mask_version));
  MAT_RETURN_IF_ERROR(upd.BindInt64(2, update.active_modules));
  MAT_RETURN_IF_ERROR(upd.BindText(3, job_id));
  MAT_RETURN_IF_ERROR(upd.Run());
  return txn.Commit();
}

absl::StatusOr<DecisionPage> JobStore::GetDecisions(const std::string& job_id, int page_size,
                                                    const std::string& page_token) {
  MAT_ASSIGN_OR_RETURN(const int size, EffectivePageSize(page_size));
  MAT_ASSIGN_OR_RETURN(const int64_t start, ParsePageToken(page_token));
  MAT_RETURN_IF_ERROR(RequireJob(job_id));
  MAT_ASSIGN_OR_RETURN(SqliteStatement q,
                       db_->Prepare("SELECT step, decision_json FROM decisions WHERE job_id = ? "
                                    "AND step >= ? ORDER BY step LIMIT ?"));
  MAT_RETURN_IF_ERROR(q.BindText(1, job_id));
  MAT_RETURN_IF_ERROR(q.BindInt64(2, start));
  MAT_RETURN_IF_ERROR(q.BindInt64(3, size + 1));
  DecisionPage page;
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    if (static_cast<int>(page.decisions.size()) == size) {
      page.next_page_token = std::to_string(q.ColumnInt64(0));
      break;
    }
    page.decisions.push_back(DecisionRecord{q.ColumnInt64(0), q.ColumnText(1)});
  }
  return page;
}

}  // namespace mat::coordinator
