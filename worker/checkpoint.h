// Checkpoint files: a LibTorch archive wrapped in a small integrity envelope.
//
//   "MATCKPT1" | payload length (u64 LE) | FNV-1a 64 of payload (u64 LE) | payload
//
// Writes are atomic (temp file + fsync + rename); the previous checkpoint is kept as
// `<path>.prev` (through a hard link first, so `<path>` exists at every moment of a write: a
// crash leaves the old or the new file there, never none). A truncated or corrupt file is DATA_LOSS naming the file and what is wrong, and
// LoadNewestCheckpoint then falls back to the previous one.
#pragma once

#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mat::worker {

absl::Status WriteCheckpoint(const std::string& path, torch::serialize::OutputArchive& archive);

// Reads and verifies one file into `archive`. Every failure is a Status (DATA_LOSS for a file
// that is not a valid checkpoint); LibTorch's exceptions do not escape.
absl::Status ReadCheckpoint(const std::string& path, torch::serialize::InputArchive& archive);

// The envelope alone (no LibTorch): the payload of checkpoint `bytes`, or DATA_LOSS naming
// `name` when the magic, the length or the checksum is wrong.
absl::StatusOr<std::string> ParseEnvelope(absl::string_view bytes, const std::string& name);

// The envelope around `payload` (what WriteCheckpoint writes).
std::string MakeEnvelope(absl::string_view payload);

// Tries `path`, then `path.prev`. Returns the path actually loaded; `warning` gets the reason
// the newest one was skipped (empty when it loaded).
absl::StatusOr<std::string> LoadNewestCheckpoint(const std::string& path,
                                                 torch::serialize::InputArchive& archive,
                                                 std::string* warning);

// The step of a Trainer checkpoint (its "meta" JSON's "step": steps completed), after verifying
// the file as ReadCheckpoint does; DATA_LOSS naming the file when it is not a valid checkpoint.
absl::StatusOr<int64_t> ReadCheckpointStep(const std::string& path);

}  // namespace mat::worker
