// Checkpoint files: plain safetensors files (safetensors/safetensors.h) that any safetensors
// reader opens (Python: `safetensors.torch.load_file("checkpoint.pt")`). The metadata holds
//   "mat.format"  "checkpoint-2"
//   "mat.meta"    the trainer's state besides tensors, JSON text
//   "mat.fnv1a"   FNV-1a 64 (16 hex digits) over every tensor's name, dtype, shape and bytes in
//                 name order, then the meta text: what detects a flipped bit in the data
//
// Reading parses with the torch-free safetensors parser, which checks every offset, dtype and
// shape before a tensor is made, so no untrusted byte reaches LibTorch's own loader. Writes are
// atomic (temp file + fsync + rename); the previous checkpoint is kept as `<path>.prev` (through a
// hard link first, so `<path>` exists at every moment of a write: a crash leaves the old or the
// new file there, never none). A truncated or corrupt file is DATA_LOSS naming the file and what
// is wrong, and LoadNewestCheckpoint then falls back to the previous one. A checkpoint of the
// earlier format (a LibTorch archive behind a "MATCKPT1" header) is DATA_LOSS saying so: this
// version does not read it.
#pragma once

#include <map>
#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"

namespace mat::trainer {

// What a checkpoint holds.
struct Checkpoint {
  std::map<std::string, torch::Tensor> tensors;  // any device on write; CPU, contiguous on read
  std::string meta;                              // JSON text (the trainer's state besides tensors)
};

// INVALID_ARGUMENT naming the tensor for a dtype safetensors cannot hold; errors of the write.
absl::Status WriteCheckpoint(const std::string& path, const Checkpoint& checkpoint);

// Reads and verifies one file. Every failure is a Status (DATA_LOSS for a file that is not a
// valid checkpoint, naming `path`; "truncated or corrupt" when the safetensors parser refuses
// it, "corrupt: checksum mismatch" when the checksum does not match).
absl::StatusOr<Checkpoint> ReadCheckpoint(const std::string& path);

// Tries `path`, then `path.prev`, into `checkpoint`. Returns the path actually loaded; `warning`
// gets the reason the newest one was skipped (empty when it loaded).
absl::StatusOr<std::string> LoadNewestCheckpoint(const std::string& path, Checkpoint* checkpoint,
                                                 std::string* warning);

// The step of a Trainer checkpoint (its meta JSON's "step": steps completed), after verifying
// the file as ReadCheckpoint does; DATA_LOSS naming the file when it is not a valid checkpoint.
absl::StatusOr<int64_t> ReadCheckpointStep(const std::string& path);

}  // namespace mat::trainer
