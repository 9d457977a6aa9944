// Masked-LM batches from a token stream: fixed-length blocks, seeded shuffling, rank sharding,
// dynamic masking (BERT's 15 %: 80 % [MASK], 10 % random token, 10 % unchanged).
//
// The stream is cut into blocks of seq_len tokens; blocks whose index % world == rank belong to
// this rank. Each epoch visits this rank's blocks in a permutation drawn from (seed, epoch).
// Masking draws from a separate generator; both generators and the cursor are in State, so a
// resumed stream continues with exactly the batches the uninterrupted one would have produced.
// All random draws use std::mt19937_64 and this file's own integer/uniform mapping, so batches
// are identical across standard libraries. Not thread-safe.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"

namespace mat::trainer {

struct MlmBatch {
  torch::Tensor input_ids;  // [B, T] int64, masked
  torch::Tensor positions;  // [M] int64, flat indices into B*T of the positions to predict
  torch::Tensor labels;     // [M] int64, original token ids at those positions
};

struct MlmOptions {
  int64_t seq_len = 128;
  double mask_prob = 0.15;
  int64_t mask_id = 0;     // the [MASK] token
  int64_t num_real_tokens = 0;  // > 0; random replacements are drawn from [0, num_real_tokens)
};

class MlmStream {
 public:
  // tokens: borrowed, must outlive the stream. REQUIRES before Next: num_blocks() > 0.
  MlmStream(const std::vector<int32_t>& tokens, MlmOptions opt, int rank, int world, uint64_t seed);

  MlmBatch Next(int64_t batch_size);
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t epoch() const { return epoch_; }

  std::string SaveState() const;  // cursor + generator states
  absl::Status LoadState(const std::string& state);

 private:
  void Reshuffle();

  const std::vector<int32_t>& tokens_;
  MlmOptions opt_;
  uint64_t seed_;
  std::vector<int64_t> blocks_;  // start offsets of this rank's blocks
  std::vector<int64_t> perm_;
  int64_t epoch_ = 0;
  int64_t cursor_ = 0;
  std::mt19937_64 mask_rng_;
};

// Masks `batch` blocks [B, T] in place of a copy; deterministic given rng. At least one position
// per row is predicted.
MlmBatch MaskBlocks(const std::vector<std::vector<int32_t>>& rows, const MlmOptions& opt,
                    std::mt19937_64& rng);

// Fixed evaluation batches: the first max_batches * batch_size blocks of `tokens` (all when
// max_batches <= 0), masked with a fixed seed so every evaluation sees the same positions.
std::vector<MlmBatch> MakeEvalBatches(const std::vector<int32_t>& tokens, const MlmOptions& opt,
                                      int64_t batch_size, int64_t max_batches, uint64_t seed);

// Uniform double in [0, 1) and integer in [0, n) from the raw generator output.
double UniformUnit(std::mt19937_64& rng);
uint64_t UniformInt(std::mt19937_64& rng, uint64_t n);

}  // namespace mat::trainer
