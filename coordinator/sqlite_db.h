// A small RAII layer over the sqlite3 C API, with absl::Status results: a connection, prepared
// statements and transactions. No ORM: callers write SQL.
//
// Error mapping (by what the caller should do): SQLITE_BUSY / SQLITE_LOCKED / SQLITE_CANTOPEN /
// SQLITE_IOERR / SQLITE_FULL -> UNAVAILABLE (retry, or fix the disk); a UNIQUE or PRIMARY KEY
// violation -> ALREADY_EXISTS; a FOREIGN KEY violation -> FAILED_PRECONDITION; another constraint
// (CHECK, NOT NULL) -> INVALID_ARGUMENT; SQLITE_CORRUPT / SQLITE_NOTADB -> DATA_LOSS; anything else
// -> INTERNAL. Every message carries SQLite's own text and the statement or path.
//
// Thread-safety: a SqliteDb and its statements belong to one thread (the coordinator loop); they
// are not thread-safe. Not copyable; movable.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mat::coordinator {

// Maps an SQLite result code (and the connection's message) to a Status; OK for SQLITE_OK,
// SQLITE_ROW and SQLITE_DONE. `what` names the statement or file in the message.
absl::Status SqliteStatus(int rc, sqlite3* db, const std::string& what);

// One prepared statement. Bind indices are 1-based, column indices 0-based (as in SQLite).
// REQUIRES: the SqliteDb that prepared it outlives it.
class SqliteStatement {
 public:
  SqliteStatement(SqliteStatement&& other) noexcept;
  SqliteStatement& operator=(SqliteStatement&& other) noexcept;
  SqliteStatement(const SqliteStatement&) = delete;
  SqliteStatement& operator=(const SqliteStatement&) = delete;
  ~SqliteStatement();

  absl::Status BindInt64(int index, int64_t value);
  absl::Status BindDouble(int index, double value);
  absl::Status BindText(int index, const std::string& value);
  absl::Status BindBlob(int index, const std::string& bytes);
  absl::Status BindNull(int index);

  // Runs one step: true when a row is available (read it with the Column* accessors), false when
  // the statement is done.
  absl::StatusOr<bool> Step();
  // Steps until done; for statements that return no rows.
  absl::Status Run();
  // Clears bindings and rewinds, so the statement can run again.
  void Reset();

  int64_t ColumnInt64(int column) const;
  double ColumnDouble(int column) const;
  std::string ColumnText(int column) const;  // "" for NULL
  std::string ColumnBlob(int column) const;  // raw bytes; "" for NULL
  bool ColumnIsNull(int column) const;

 private:
  friend class SqliteDb;
  SqliteStatement(sqlite3* db, sqlite3_stmt* stmt, std::string sql);

  sqlite3* db_ = nullptr;        // not owned
  sqlite3_stmt* stmt_ = nullptr;  // owned
  std::string sql_;              // for messages
};

// One connection to a database file.
class SqliteDb {
 public:
  // Opens (creating when missing) the database at `path`.
  static absl::StatusOr<std::unique_ptr<SqliteDb>> Open(const std::string& path);
  // Opens the existing database at `path` (read-write, never creating it): an error status
  // naming the path when it is missing or cannot be opened.
  static absl::StatusOr<std::unique_ptr<SqliteDb>> OpenExisting(const std::string& path);

  SqliteDb(const SqliteDb&) = delete;
  SqliteDb& operator=(const SqliteDb&) = delete;
  ~SqliteDb();

  // Runs one or more statements that return no rows we need (DDL, PRAGMA setters, BEGIN...).
  absl::Status Exec(const std::string& sql);
  // Prepares one statement.
  absl::StatusOr<SqliteStatement> Prepare(const std::string& sql);
  // Runs a statement returning one row of one column, as text ("" for NULL); NOT_FOUND when it
  // returns no row. For PRAGMA reads and scalar queries.
  absl::StatusOr<std::string> QueryText(const std::string& sql);

  sqlite3* raw() { return db_; }
  const std::string& path() const { return path_; }
  // Whether SQLite opened the file read-only (it does so, silently, for a file this process may
  // read but not write).
  bool read_only() const;

 private:
  SqliteDb(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}

  sqlite3* db_;  // owned
  std::string path_;
};

// A write transaction (BEGIN IMMEDIATE): rolled back on destruction unless Commit() succeeded.
// Usage:
//   MAT_ASSIGN_OR_RETURN(auto txn, SqliteTransaction::Begin(db));
//   ... statements ...
//   MAT_RETURN_IF_ERROR(txn.Commit());
// REQUIRES: `db` outlives the transaction; no other transaction is open on it.
class SqliteTransaction {
 public:
  static absl::StatusOr<SqliteTransaction> Begin(SqliteDb& db);

  SqliteTransaction(SqliteTransaction&& other) noexcept;
  SqliteTransaction& operator=(SqliteTransaction&&) = delete;
  SqliteTransaction(const SqliteTransaction&) = delete;
  SqliteTransaction& operator=(const SqliteTransaction&) = delete;
  ~SqliteTransaction();

  // Makes the writes durable (with synchronous=FULL, fsynced before it returns OK).
  absl::Status Commit();

 private:
  explicit SqliteTransaction(SqliteDb* db) : db_(db) {}

  SqliteDb* db_;  // not owned; null once committed, rolled back or moved from
};

}  // namespace mat::coordinator
