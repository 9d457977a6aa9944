// Checkpoint files: named tensors and a JSON text as a safetensors file
// (safetensors/safetensors.h; the JSON under the metadata key "mat.meta"), wrapped in a small
// integrity envelope.
//
//   "MATCKPT2" | payload length (u64 LE) | FNV-1a 64 of payload (u64 LE) | payload (safetensors)
//
// Reading parses the payload with the torch-free safetensors parser, which checks every offset,
// dtype and shape before a tensor is made, so no untrusted byte reaches LibTorch's own loader.
// Writes are atomic (temp file + fsync + rename); the previous checkpoint is kept as
// `<path>.prev` (through a hard link first, so `<path>` exists at every moment of a write: a
// crash leaves the old or the new file there, never none). A truncated or corrupt file is
// DATA_LOSS naming the file and what is wrong, and LoadNewestCheckpoint then falls back to the
// previous one. A checkpoint of the earlier format (MATCKPT1, a LibTorch archive) is DATA_LOSS
// saying so: this version does not read it.
#pragma once

#include <map>
#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mat::worker {

// What a checkpoint holds.
struct Checkpoint {
  std::map<std::string, torch::Tensor> tensors;  // any device on write; CPU, contiguous on read
  std::string meta;                              // JSON text (the trainer's state besides tensors)
};

// INVALID_ARGUMENT naming the tensor for a dtype safetensors cannot hold; errors of the write.
absl::Status WriteCheckpoint(const std::string& path, const Checkpoint& checkpoint);

// Reads and verifies one file. Every failure is a Status (DATA_LOSS for a file that is not a
// valid checkpoint, naming `path`).
absl::StatusOr<Checkpoint> ReadCheckpoint(const std::string& path);

// The envelope alone (no LibTorch): the payload of checkpoint `bytes`, or DATA_LOSS naming
// `name` when the magic, the length or the checksum is wrong.
absl::StatusOr<std::string> ParseEnvelope(absl::string_view bytes, const std::string& name);

// The envelope around `payload` (what WriteCheckpoint writes).
std::string MakeEnvelope(absl::string_view payload);

// Tries `path`, then `path.prev`, into `checkpoint`. Returns the path actually loaded; `warning`
// gets the reason the newest one was skipped (empty when it loaded).
absl::StatusOr<std::string> LoadNewestCheckpoint(const std::string& path, Checkpoint* checkpoint,
                                                 std::string* warning);

// The step of a Trainer checkpoint (its meta JSON's "step": steps completed), after verifying
// the file as ReadCheckpoint does; DATA_LOSS naming the file when it is not a valid checkpoint.
absl::StatusOr<int64_t> ReadCheckpointStep(const std::string& path);

}  // namespace mat::worker
