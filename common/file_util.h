// Small file helpers with Status results.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace mat::common {

// Reads a whole file. NOT_FOUND names the path when it cannot be opened.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Writes `data` to `path` atomically: a temp file beside it, fsync, then rename over `path`.
// After an error `path` is unchanged.
absl::Status WriteFileAtomic(const std::string& path, const std::string& data);

// Creates a directory and its parents (like mkdir -p).
absl::Status MakeDirs(const std::string& path);

}  // namespace mat::common
