#include "coordinator/sqlite_db.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace mat::coordinator {

absl::Status SqliteStatus(int rc, sqlite3* db, const std::string& what) {
  if (rc == SQLITE_OK || rc == SQLITE_ROW || rc == SQLITE_DONE) return absl::OkStatus();
  const char* detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  const std::string msg = absl::StrCat("sqlite: ", what, ": ", detail, " (code ", rc, ")");
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_CANTOPEN:
    case SQLITE_IOERR:
    case SQLITE_FULL:
      return absl::UnavailableError(msg);
    case SQLITE_CONSTRAINT:
      if (rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
        return absl::AlreadyExistsError(msg);
      }
      if (rc == SQLITE_CONSTRAINT_FOREIGNKEY) return absl::FailedPreconditionError(msg);
      return absl::InvalidArgumentError(msg);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::DataLossError(msg);
    default:
      return absl::InternalError(msg);
  }
}

// ----- SqliteStatement -----

SqliteStatement::SqliteStatement(sqlite3* db, sqlite3_stmt* stmt, std::string sql)
    : db_(db), stmt_(stmt), sql_(std::move(sql)) {}

SqliteStatement::SqliteStatement(SqliteStatement&& other) noexcept
    : db_(other.db_), stmt_(std::exchange(other.stmt_, nullptr)), sql_(std::move(other.sql_)) {}

SqliteStatement& SqliteStatement::operator=(SqliteStatement&& other) noexcept {
  if (this != &other) {
    if (stmt_ != nullptr) sqlite3_finalize(stmt_);
    db_ = other.db_;
    stmt_ = std::exchange(other.stmt_, nullptr);
    sql_ = std::move(other.sql_);
  }
  return *this;
}

SqliteStatement::~SqliteStatement() {
  if (stmt_ != nullptr) sqlite3_finalize(stmt_);
}

absl::Status SqliteStatement::BindInt64(int index, int64_t value) {
  return SqliteStatus(sqlite3_bind_int64(stmt_, index, value), db_, sql_);
}

absl::Status SqliteStatement::BindDouble(int index, double value) {
  return SqliteStatus(sqlite3_bind_double(stmt_, index, value), db_, sql_);
}

absl::Status SqliteStatement::BindText(int index, const std::string& value) {
  return SqliteStatus(sqlite3_bind_text64(stmt_, index, value.data(), value.size(),
                                          SQLITE_TRANSIENT, SQLITE_UTF8),
                      db_, sql_);
}

absl::Status SqliteStatement::BindBlob(int index, const std::string& bytes) {
  // A zero-length blob must still be a blob, not NULL: sqlite3_bind_blob64 with a null pointer
  // binds NULL, so point at a valid (empty) buffer.
  static const char kEmpty = 0;
  const void* data = bytes.empty() ? static_cast<const void*>(&kEmpty) : bytes.data();
  return SqliteStatus(sqlite3_bind_blob64(stmt_, index, data, bytes.size(), SQLITE_TRANSIENT),
                      db_, sql_);
}

absl::Status SqliteStatement::BindNull(int index) {
  return SqliteStatus(sqlite3_bind_null(stmt_, index), db_, sql_);
}

absl::StatusOr<bool> SqliteStatement::Step() {
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return SqliteStatus(rc, db_, sql_);
}

absl::Status SqliteStatement::Run() {
  while (true) {
    MAT_ASSIGN_OR_RETURN(bool row, Step());
    if (!row) return absl::OkStatus();
  }
}

void SqliteStatement::Reset() {
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
}

int64_t SqliteStatement::ColumnInt64(int column) const {
  return sqlite3_column_int64(stmt_, column);
}

double SqliteStatement::ColumnDouble(int column) const {
  return sqlite3_column_double(stmt_, column);
}

std::string SqliteStatement::ColumnText(int column) const {
  const unsigned char* text = sqlite3_column_text(stmt_, column);
  if (text == nullptr) return "";
  return std::string(reinterpret_cast<const char*>(text), sqlite3_column_bytes(stmt_, column));
}

std::string SqliteStatement::ColumnBlob(int column) const {
  const void* data = sqlite3_column_blob(stmt_, column);
  if (data == nullptr) return "";
  return std::string(static_cast<const char*>(data), sqlite3_column_bytes(stmt_, column));
}

bool SqliteStatement::ColumnIsNull(int column) const {
  return sqlite3_column_type(stmt_, column) == SQLITE_NULL;
}

// ----- SqliteDb -----

namespace {

absl::StatusOr<std::unique_ptr<sqlite3, int (*)(sqlite3*)>> OpenHandle(const std::string& path,
                                                                          int flags) {
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &db, flags, nullptr);
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> handle(db, sqlite3_close_v2);
  if (rc != SQLITE_OK) return SqliteStatus(rc, db, "open " + path);  // a handle even on failure
  sqlite3_extended_result_codes(db, 1);
  return handle;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SqliteDb>> SqliteDb::OpenExisting(const std::string& path) {
  MAT_ASSIGN_OR_RETURN(auto handle, OpenHandle(path, SQLITE_OPEN_READWRITE));
  return std::unique_ptr<SqliteDb>(new SqliteDb(handle.release(), path));
}

absl::StatusOr<std::unique_ptr<SqliteDb>> SqliteDb::Open(const std::string& path) {
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                                 nullptr);
  if (rc != SQLITE_OK) {
    absl::Status status = SqliteStatus(rc, db, "open " + path);
    sqlite3_close(db);  // sqlite3_open_v2 allocates a handle even on failure
    return status;
  }
  sqlite3_extended_result_codes(db, 1);
  return std::unique_ptr<SqliteDb>(new SqliteDb(db, path));
}

SqliteDb::~SqliteDb() { sqlite3_close_v2(db_); }

bool SqliteDb::read_only() const { return sqlite3_db_readonly(db_, "main") == 1; }

absl::Status SqliteDb::Exec(const std::string& sql) {
  return SqliteStatus(sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr), db_, sql);
}

absl::StatusOr<SqliteStatement> SqliteDb::Prepare(const std::string& sql) {
  sqlite3_stmt* stmt = nullptr;
  const int rc = sqlite3_prepare_v2(db_, sql.c_str(), static_cast<int>(sql.size()), &stmt,
                                    nullptr);
  if (rc != SQLITE_OK) {
    sqlite3_finalize(stmt);
    return SqliteStatus(rc, db_, sql);
  }
  return SqliteStatement(db_, stmt, sql);
}

absl::StatusOr<std::string> SqliteDb::QueryText(const std::string& sql) {
  MAT_ASSIGN_OR_RETURN(SqliteStatement stmt, Prepare(sql));
  MAT_ASSIGN_OR_RETURN(bool row, stmt.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("sqlite: ", sql, ": no row"));
  return stmt.ColumnText(0);
}

// ----- SqliteTransaction -----

absl::StatusOr<SqliteTransaction> SqliteTransaction::Begin(SqliteDb& db) {
  MAT_RETURN_IF_ERROR(db.Exec("BEGIN IMMEDIATE"));
  return SqliteTransaction(&db);
}

SqliteTransaction::SqliteTransaction(SqliteTransaction&& other) noexcept
    : db_(std::exchange(other.db_, nullptr)) {}

SqliteTransaction::~SqliteTransaction() {
  if (db_ != nullptr) db_->Exec("ROLLBACK").IgnoreError();
}

absl::Status SqliteTransaction::Commit() {
  if (db_ == nullptr) return absl::FailedPreconditionError("sqlite: transaction already ended");
  absl::Status status = db_->Exec("COMMIT");
  if (status.ok()) db_ = nullptr;  // on failure the destructor rolls back
  return status;
}

}  // namespace mat::coordinator
