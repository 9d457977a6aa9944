// RunSql: runs SQL on a database file through a connection of its own, as an operator's sqlite3
// shell would (a trigger standing in for a full disk, in the coordinator's tests). Waits up to
// 5 s for a daemon's write lock. Test failures name SQLite's error.
#pragma once

#include <sqlite3.h>

#include <string>

#include <gtest/gtest.h>

namespace mat::tests {

inline void RunSql(const std::string& db_path, const std::string& sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(db_path.c_str(), &db), SQLITE_OK) << db_path;
  sqlite3_busy_timeout(db, 5000);
  EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK)
      << sqlite3_errmsg(db) << ": " << sql;
  sqlite3_close(db);
}

}  // namespace mat::tests
