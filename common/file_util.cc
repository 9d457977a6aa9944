#include "common/file_util.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace mat::common {
namespace {

// WriteFileAtomic's temp files are PATH.tmp.PID.N (N counts its calls in process PID).
constexpr const char* kTempInfix = ".tmp.";

// Renames `from` (its bytes flushed) over `to`, then flushes their directory: the rename reaches
// the disk with it, or a power loss could bring the old file back. Best effort (some filesystems
// cannot flush a directory), since `to` already holds the bytes and an error would say it does
// not. After an error `from` is left where it was.
absl::Status RenameAndSyncDir(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    return absl::ErrnoToStatus(errno, "cannot rename '" + from + "' to '" + to + "'");
  }
  std::string dir = std::filesystem::path(to).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    (void)::fsync(dir_fd);
    ::close(dir_fd);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError("'" + path + "' is a directory, not a file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError("cannot open '" + path + "': " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError("error reading '" + path + "'");
  return ss.str();
}

absl::Status WriteFileAtomic(const std::string& path, const std::string& data, unsigned mode) {
  // A name of this call's own (two threads writing one path do not share a temp file), created
  // new (O_EXCL: it gets `mode`, and a link in its place is not followed).
  static std::atomic<uint64_t> calls{0};
  const std::string tmp = absl::StrCat(path, kTempInfix, ::getpid(), ".",
                                       calls.fetch_add(1, std::memory_order_relaxed));
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL, static_cast<mode_t>(mode));
  // The errno's code (NOT_FOUND for a missing folder, PERMISSION_DENIED, ...), not INTERNAL: a
  // local file error is the caller's to fix.
  if (fd < 0) return absl::ErrnoToStatus(errno, "cannot create '" + tmp + "'");
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return absl::ErrnoToStatus(err, "cannot write '" + tmp + "'");
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return absl::InternalError("cannot flush '" + tmp + "'");
  }
  absl::Status renamed = RenameAndSyncDir(tmp, path);
  if (!renamed.ok()) ::unlink(tmp.c_str());
  return renamed;
}

absl::Status CommitFile(const std::string& from, const std::string& to) {
  const int fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, "cannot open '" + from + "'");
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, "cannot flush '" + from + "'");
  }
  ::close(fd);
  return RenameAndSyncDir(from, to);
}

absl::Status MakeDirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return absl::InternalError("cannot create directory '" + path + "': " + ec.message());
  return absl::OkStatus();
}

absl::Status CheckWritableDir(const std::string& dir) {
  std::string path = dir + "/.mat-write-check-XXXXXX";
  const int fd = ::mkstemp(path.data());
  auto failed = [&dir](int err) {
    return absl::ErrnoToStatus(err, absl::StrCat("cannot write in '", dir, "'"));
  };
  if (fd < 0) return failed(errno);
  const bool wrote = ::write(fd, "x", 1) == 1;
  const int err = errno;
  ::close(fd);
  ::unlink(path.c_str());
  return wrote ? absl::OkStatus() : failed(err);
}

absl::StatusOr<int> LockDirectory(const std::string& dir, const std::string& owner) {
  const std::string path = absl::StrCat(dir, "/", kLockFileName);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot open '", path, "': ", std::strerror(errno)));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat("'", dir, "' is in use by another ", owner, " (", path, " is locked)"));
    }
    return absl::UnavailableError(absl::StrCat("cannot lock '", path, "': ", std::strerror(err)));
  }
  return fd;
}


std::vector<std::string> RemoveAbandonedTemps(const std::string& dir,
                                              const std::vector<std::string>& names) {
  std::vector<std::string> removed;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    const std::string file = entry.path().filename().string();
    for (const std::string& name : names) {
      const std::string prefix = absl::StrCat(name, kTempInfix);
      if (!absl::StartsWith(file, prefix)) continue;
      const std::vector<std::string> parts =
          absl::StrSplit(file.substr(prefix.size()), absl::MaxSplits('.', 1));
      int64_t pid = 0, n = 0;
      if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &pid) ||
          !absl::SimpleAtoi(parts[1], &n) || pid <= 0) {
        break;  // not a name WriteFileAtomic makes
      }
      const bool alive = pid == ::getpid() || ::kill(static_cast<pid_t>(pid), 0) == 0 ||
                         errno == EPERM;
      std::error_code ignored;
      if (!alive && std::filesystem::remove(entry.path(), ignored)) removed.push_back(file);
      break;
    }
  }
  return removed;
}

}  // namespace mat::common
