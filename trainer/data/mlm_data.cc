#include "trainer/data/mlm_data.h"

#include <sstream>

#include "common/status.h"

namespace mat::trainer {

double UniformUnit(std::mt19937_64& rng) { return double(rng() >> 11) * (1.0 / 9007199254740992.0); }

uint64_t UniformInt(std::mt19937_64& rng, uint64_t n) {
  MAT_CHECK(n > 0) << "UniformInt needs a non-empty range";
  // Rejection sampling: unbiased and independent of the standard library.
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = rng();
  while (x >= limit);
  return x % n;
}

MlmStream::MlmStream(const std::vector<int32_t>& tokens, MlmOptions opt, int rank, int world,
                     uint64_t seed)
    : tokens_(tokens), opt_(opt), seed_(seed), mask_rng_(seed * 0x9E3779B97F4A7C15ULL + 1) {
  const int64_t n = static_cast<int64_t>(tokens.size()) / opt.seq_len;
  for (int64_t b = 0; b < n; ++b)
    if (b % world == rank) blocks_.push_back(b * opt.seq_len);
  Reshuffle();
}

void MlmStream::Reshuffle() {
  perm_.resize(blocks_.size());
  for (size_t i = 0; i < perm_.size(); ++i) perm_[i] = static_cast<int64_t>(i);
  std::mt19937_64 g(seed_ ^ (0xD1B54A32D192ED03ULL * uint64_t(epoch_ + 1)));
  for (size_t i = perm_.size(); i > 1; --i) std::swap(perm_[i - 1], perm_[UniformInt(g, i)]);
}

MlmBatch MlmStream::Next(int64_t batch_size) {
  std::vector<std::vector<int32_t>> rows;
  rows.reserve(batch_size);
  for (int64_t r = 0; r < batch_size; ++r) {
    if (cursor_ >= static_cast<int64_t>(perm_.size())) {
      ++epoch_;
      cursor_ = 0;
      Reshuffle();
    }
    int64_t start = blocks_[perm_[cursor_++]];
    rows.emplace_back(tokens_.begin() + start, tokens_.begin() + start + opt_.seq_len);
  }
  return MaskBlocks(rows, opt_, mask_rng_);
}

std::string MlmStream::SaveState() const {
  std::ostringstream ss;
  ss << epoch_ << ' ' << cursor_ << ' ' << mask_rng_;
  return ss.str();
}

absl::Status MlmStream::LoadState(const std::string& state) {
  std::istringstream ss(state);
  int64_t epoch, cursor;
  std::mt19937_64 rng;
  if (!(ss >> epoch >> cursor >> rng) || epoch < 0 || cursor < 0 ||
      cursor > static_cast<int64_t>(blocks_.size())) {
    return absl::DataLossError("data cursor in checkpoint is malformed");
  }
  epoch_ = epoch;
  cursor_ = cursor;
  mask_rng_ = rng;
  Reshuffle();
  return absl::OkStatus();
}

MlmBatch MaskBlocks(const std::vector<std::vector<int32_t>>& rows, const MlmOptions& opt,
                    std::mt19937_64& rng) {
  const int64_t B = static_cast<int64_t>(rows.size());
  const int64_t T = opt.seq_len;
  torch::Tensor ids = torch::empty({B, T}, torch::kLong);
  auto acc = ids.accessor<int64_t, 2>();
  std::vector<int64_t> pos, lab;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> chosen;
    for (int64_t t = 0; t < T; ++t) {
      acc[b][t] = rows[b][t];
      if (UniformUnit(rng) < opt.mask_prob) chosen.push_back(t);
    }
    if (chosen.empty()) chosen.push_back(static_cast<int64_t>(UniformInt(rng, T)));
    for (int64_t t : chosen) {
      pos.push_back(b * T + t);
      lab.push_back(rows[b][t]);
      double u = UniformUnit(rng);
      if (u < 0.8) {
        acc[b][t] = opt.mask_id;
      } else if (u < 0.9) {
        acc[b][t] = static_cast<int64_t>(UniformInt(rng, opt.num_real_tokens));
      }
    }
  }
  MlmBatch batch;
  batch.input_ids = ids;
  batch.positions = torch::tensor(pos, torch::kLong);
  batch.labels = torch::tensor(lab, torch::kLong);
  return batch;
}

std::vector<MlmBatch> MakeEvalBatches(const std::vector<int32_t>& tokens, const MlmOptions& opt,
                                      int64_t batch_size, int64_t max_batches, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<MlmBatch> out;
  const int64_t n = static_cast<int64_t>(tokens.size()) / opt.seq_len;
  std::vector<std::vector<int32_t>> rows;
  for (int64_t b = 0; b < n; ++b) {
    int64_t start = b * opt.seq_len;
    rows.emplace_back(tokens.begin() + start, tokens.begin() + start + opt.seq_len);
    if (static_cast<int64_t>(rows.size()) == batch_size) {
      out.push_back(MaskBlocks(rows, opt, rng));
      rows.clear();
      if (max_batches > 0 && static_cast<int64_t>(out.size()) >= max_batches) break;
    }
  }
  if (!rows.empty() && (max_batches <= 0 || static_cast<int64_t>(out.size()) < max_batches)) {
    out.push_back(MaskBlocks(rows, opt, rng));
  }
  return out;
}

}  // namespace mat::trainer
