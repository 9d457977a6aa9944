// Small file helpers with Status results.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace mat::common {

// Reads a whole file. NOT_FOUND names the path when it cannot be opened.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Writes `data` to `path` atomically: a temp file beside it, fsync, then rename over `path`, then
// fsync of its directory (best effort: not every filesystem can).
// After an error `path` is unchanged; the error carries the errno's code (NOT_FOUND for a
// missing folder, PERMISSION_DENIED, FAILED_PRECONDITION for a directory in the way, ...) and
// names the file. The file gets `mode` (less the umask), also when it replaces one with others:
// 0600 for a secret.
absl::Status WriteFileAtomic(const std::string& path, const std::string& data,
                             unsigned mode = 0644);

// Puts a file written in full at `from` (a temp file beside `to`) in place as WriteFileAtomic
// does: fsync of its bytes, rename over `to`, fsync of the directory (best effort). After an
// error `to` is unchanged and `from` is left for the caller; the error carries the errno's code
// and names the file.
absl::Status CommitFile(const std::string& from, const std::string& to);

// Removes the temp files WriteFileAtomic left in `dir` for the files named `names` (writes cut
// short: full-size files nothing else reads) whose writing process, on this host, has ended; a
// live process's may be a write in progress. Only for a folder no other host writes. Returns
// the names removed.
std::vector<std::string> RemoveAbandonedTemps(const std::string& dir,
                                              const std::vector<std::string>& names);

// Creates a directory and its parents (like mkdir -p).
absl::Status MakeDirs(const std::string& path);

// OK when this process can create, write and remove a file in the directory `dir` (a short-lived
// hidden file); otherwise the errno's code naming the directory ("cannot write in 'DIR': Read-only
// file system"). For a folder a daemon writes much later (checkpoints), checked at its start.
absl::Status CheckWritableDir(const std::string& dir);

// The file LockDirectory locks in its directory.
inline constexpr const char* kLockFileName = "LOCK";

// Takes an exclusive advisory lock (flock) on `dir`/LOCK, creating the file: one process per
// directory. Returns the descriptor, which holds the lock until the caller closes it (the kernel
// releases it when the process dies). FAILED_PRECONDITION "'DIR' is in use by another OWNER"
// when another process holds it; UNAVAILABLE when the file cannot be opened or locked.
absl::StatusOr<int> LockDirectory(const std::string& dir, const std::string& owner);

}  // namespace mat::common
