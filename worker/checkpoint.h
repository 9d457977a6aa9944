// Checkpoint files: a LibTorch archive wrapped in a small integrity envelope.
//
//   "MATCKPT1" | payload length (u64 LE) | FNV-1a 64 of payload (u64 LE) | payload
//
// Writes are atomic (temp file + fsync + rename); the previous checkpoint is kept as
// `<path>.prev`. A truncated or corrupt file is DATA_LOSS naming the file and what is wrong, and
// LoadNewestCheckpoint then falls back to the previous one.
#pragma once

#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"

namespace mat::worker {

absl::Status WriteCheckpoint(const std::string& path, torch::serialize::OutputArchive& archive);

// Reads and verifies one file into `archive`.
absl::Status ReadCheckpoint(const std::string& path, torch::serialize::InputArchive& archive);

// Tries `path`, then `path.prev`. Returns the path actually loaded; `warning` gets the reason
// the newest one was skipped (empty when it loaded).
absl::StatusOr<std::string> LoadNewestCheckpoint(const std::string& path,
                                                 torch::serialize::InputArchive& archive,
                                                 std::string* warning);

}  // namespace mat::worker
