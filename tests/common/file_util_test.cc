// common/file_util: LockDirectory, one holder per directory.
#include "common/file_util.h"

#include <unistd.h>

#include <filesystem>

#include <gtest/gtest.h>

namespace mat::common {
namespace {

TEST(LockDirectoryTest, OneHolderAtATimeNamingTheDirectoryAndTheOwner) {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("mat_lock_test_" + std::to_string(::getpid()))).string();
  ASSERT_TRUE(MakeDirs(dir).ok());
  absl::StatusOr<int> first = LockDirectory(dir, "mat-worker");
  ASSERT_TRUE(first.ok()) << first.status();
  // flock: another open of the same file is refused, in this process as in another.
  absl::StatusOr<int> second = LockDirectory(dir, "mat-worker");
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find("'" + dir + "' is in use by another mat-worker"),
            std::string::npos)
      << second.status();
  ::close(*first);
  absl::StatusOr<int> again = LockDirectory(dir, "mat-worker");
  ASSERT_TRUE(again.ok()) << again.status();
  ::close(*again);
  absl::StatusOr<int> missing = LockDirectory(dir + "/no/such/dir", "x");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kUnavailable) << missing.status();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace mat::common
