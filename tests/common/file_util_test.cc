// common/file_util: LockDirectory, one holder per directory; WriteFileAtomic's errors and mode;
// CommitFile; RemoveAbandonedTemps; CheckWritableDir.
#include "common/file_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

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

// `matctl plot --out missing/x.svg` said INTERNAL: a local file error carries its errno's code.
TEST(WriteFileAtomicTest, ErrorsCarryTheErrnosCodeAndNameTheFile) {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("mat_write_test_" + std::to_string(::getpid()))).string();
  ASSERT_TRUE(MakeDirs(dir + "/a_directory").ok());
  absl::Status missing = WriteFileAtomic(dir + "/no/such/file", "x");
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound) << missing;
  EXPECT_NE(missing.message().find(dir + "/no/such/file"), std::string::npos) << missing;
  absl::Status onto_dir = WriteFileAtomic(dir + "/a_directory", "x");
  EXPECT_NE(onto_dir.code(), absl::StatusCode::kInternal) << onto_dir;
  EXPECT_NE(onto_dir.message().find("cannot rename"), std::string::npos) << onto_dir;
  EXPECT_TRUE(std::filesystem::is_directory(dir + "/a_directory")) << "left unchanged";
  ASSERT_TRUE(WriteFileAtomic(dir + "/file", "x").ok());
  std::filesystem::remove_all(dir);
}

// matctl download puts its finished `.NAME.download` in place with CommitFile: the bytes move
// over the old file; a failed commit leaves both files as they were and names them.
TEST(CommitFileTest, MovesTheFileOverItsNameOrLeavesBothAsTheyWere) {
  namespace fs = std::filesystem;
  const std::string dir = (fs::temp_directory_path() /
                           ("mat_commit_test_" + std::to_string(::getpid()))).string();
  ASSERT_TRUE(MakeDirs(dir + "/a_directory").ok());
  ASSERT_TRUE(WriteFileAtomic(dir + "/.model.download", "new bytes").ok());
  ASSERT_TRUE(WriteFileAtomic(dir + "/model", "old").ok());
  ASSERT_TRUE(CommitFile(dir + "/.model.download", dir + "/model").ok());
  EXPECT_EQ(*ReadFile(dir + "/model"), "new bytes");
  EXPECT_FALSE(fs::exists(dir + "/.model.download"));

  absl::Status missing = CommitFile(dir + "/.gone.download", dir + "/model");
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound) << missing;
  EXPECT_NE(missing.message().find(dir + "/.gone.download"), std::string::npos) << missing;
  ASSERT_TRUE(WriteFileAtomic(dir + "/.x.download", "x").ok());
  absl::Status onto_dir = CommitFile(dir + "/.x.download", dir + "/a_directory");
  EXPECT_NE(onto_dir.code(), absl::StatusCode::kOk);
  EXPECT_NE(onto_dir.message().find("cannot rename"), std::string::npos) << onto_dir;
  EXPECT_EQ(*ReadFile(dir + "/.x.download"), "x") << "the source is left for the caller";
  EXPECT_TRUE(fs::is_directory(dir + "/a_directory"));
  EXPECT_EQ(*ReadFile(dir + "/model"), "new bytes");
  fs::remove_all(dir);
}

// A worker's secret is written 0600 (also when it replaces a file of another mode).
TEST(WriteFileAtomicTest, TheFileGetsTheModeAskedFor) {
  namespace fs = std::filesystem;
  const std::string dir = (fs::temp_directory_path() /
                           ("mat_write_mode_test_" + std::to_string(::getpid()))).string();
  ASSERT_TRUE(MakeDirs(dir).ok());
  const std::string path = dir + "/worker.secret";
  ASSERT_TRUE(WriteFileAtomic(path, "public\n").ok());  // 0644 less the umask
  ASSERT_TRUE(WriteFileAtomic(path, "secret\n", 0600).ok());
  EXPECT_EQ(fs::status(path).permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1)
      << "a temp file was left";
  fs::remove_all(dir);
}

// The temp files of a writer that has ended go; a live writer's (this process's), other files'
// temps and names WriteFileAtomic does not make stay.
TEST(RemoveAbandonedTempsTest, RemovesOnlyTheNamedFilesTempsOfEndedWriters) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("mat_abandoned_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  ASSERT_TRUE(MakeDirs(dir.string()).ok());
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  const std::string dead = std::to_string(child), me = std::to_string(::getpid());
  for (const std::string& name : std::vector<std::string>{
           "a.json.tmp." + dead + ".0", "a.json.tmp." + me + ".1", "a.json.tmpsave",
        "a.json.tmp." + dead, "b.json.tmp." + dead + ".2", "a.json"}) {
    std::ofstream(dir / name) << "x";
  }
  EXPECT_EQ(RemoveAbandonedTemps(dir.string(), {"a.json"}),
            std::vector<std::string>{"a.json.tmp." + dead + ".0"});
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 5);
  fs::remove_all(dir);
}

// A folder written much later (a worker's checkpoints) is checked at start.
TEST(CheckWritableDirTest, OkForAWritableFolderLeavingNothingAndNamesOneItCannotWrite) {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("mat_writable_test_" + std::to_string(::getpid()))).string();
  ASSERT_TRUE(MakeDirs(dir).ok());
  EXPECT_TRUE(CheckWritableDir(dir).ok());
  EXPECT_TRUE(std::filesystem::is_empty(dir)) << "the probe file is removed";
  absl::Status missing = CheckWritableDir(dir + "/none");
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound) << missing;
  EXPECT_NE(missing.message().find("cannot write in '" + dir + "/none'"), std::string::npos)
      << missing;
  // Not even root writes in /proc: the check does not depend on who runs the tests.
  absl::Status proc = CheckWritableDir("/proc");
  EXPECT_FALSE(proc.ok());
  EXPECT_NE(proc.message().find("cannot write in '/proc'"), std::string::npos) << proc;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace mat::common
