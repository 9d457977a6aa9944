// A fresh temporary directory for a test, removed with all it holds when the object goes: the
// one copy of the mkdtemp set-up that test fixtures share (declare it before the members that
// use the directory, so that it outlives them).
//
//   class StoreTest : public ::testing::Test {
//     tests::TempDir tmp_{"mat_job_store"};   // /tmp/mat_job_store_XXXXXX
//     void SetUp() override { ASSERT_TRUE(tmp_.ok()); ... tmp_.path() ... }
//   };
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace mat::tests {

class TempDir {
 public:
  // Makes <system temp dir>/<prefix>_XXXXXX; path() is "" (ok() false) when that fails.
  explicit TempDir(const std::string& prefix) {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
    if (::mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  bool ok() const { return !path_.empty(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace mat::tests
