// Tests of mat::trainer::MlmStream, MaskBlocks, MakeEvalBatches and the uniform draws.
//
// The token stream is 0, 1, 2, ... so every block is identified by its first token, and a
// batch's original rows are recovered by writing `labels` back at `positions`.
// Statistical checks are deterministic (fixed seeds) but their bounds are stated as 6 standard
// deviations of the binomial count, so any correct implementation passes them for any seed.
#include "trainer/data/mlm_data.h"

#include <cmath>
#include <numeric>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

namespace mat::trainer {
namespace {

std::vector<int32_t> Iota(int64_t n) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), 0);
  return t;
}

MlmOptions Options(int64_t seq_len, double mask_prob, int64_t num_real_tokens) {
  MlmOptions o;
  o.seq_len = seq_len;
  o.mask_prob = mask_prob;
  o.mask_id = num_real_tokens;  // outside [0, num_real_tokens), as the trainer uses it
  o.num_real_tokens = num_real_tokens;
  return o;
}

// The unmasked rows [B, T] of a batch: input_ids with the labels written back at positions.
torch::Tensor Unmask(const MlmBatch& b) {
  torch::Tensor flat = b.input_ids.flatten().clone();
  flat.index_put_({b.positions}, b.labels);
  return flat.view(b.input_ids.sizes());
}

// First token of each row of the unmasked batch, i.e. the block start for an Iota stream.
std::vector<int64_t> BlockStarts(const MlmBatch& b) {
  torch::Tensor rows = Unmask(b);
  std::vector<int64_t> out;
  for (int64_t r = 0; r < rows.size(0); ++r) out.push_back(rows[r][0].item<int64_t>());
  return out;
}

bool SameBatch(const MlmBatch& a, const MlmBatch& b) {
  return torch::equal(a.input_ids, b.input_ids) && torch::equal(a.positions, b.positions) &&
         torch::equal(a.labels, b.labels);
}

// Checks that every row of `b` is a whole block of an Iota stream: consecutive tokens starting at
// a multiple of T.
void ExpectWholeIotaBlocks(const MlmBatch& b, int64_t T) {
  torch::Tensor rows = Unmask(b);
  for (int64_t r = 0; r < rows.size(0); ++r) {
    const int64_t start = rows[r][0].item<int64_t>();
    EXPECT_EQ(start % T, 0) << "row " << r;
    EXPECT_TRUE(torch::equal(rows[r], torch::arange(start, start + T, torch::kLong))) << "row " << r;
  }
}

// ---------------------------------------------------------------------------------------------
// MaskBlocks invariants over several shapes and mask probabilities.

struct MaskCase {
  int64_t batch, seq_len;
  double mask_prob;
};

void PrintTo(const MaskCase& c, std::ostream* os) {
  *os << "B=" << c.batch << " T=" << c.seq_len << " p=" << c.mask_prob;
}

class MaskBlocksTest : public ::testing::TestWithParam<MaskCase> {};

TEST_P(MaskBlocksTest, PositionsLabelsAndUnmaskedTokensAreConsistent) {
  const MaskCase c = GetParam();
  const int64_t V = 5000;
  MlmOptions opt = Options(c.seq_len, c.mask_prob, V);
  std::mt19937_64 data_rng(99);
  std::vector<std::vector<int32_t>> rows(c.batch, std::vector<int32_t>(c.seq_len));
  for (auto& r : rows)
    for (auto& t : r) t = static_cast<int32_t>(UniformInt(data_rng, V));
  std::mt19937_64 rng(5);
  MlmBatch b = MaskBlocks(rows, opt, rng);

  ASSERT_EQ(b.input_ids.sizes(), (std::vector<int64_t>{c.batch, c.seq_len}));
  EXPECT_EQ(b.input_ids.dtype(), torch::kLong);
  ASSERT_EQ(b.positions.dim(), 1);
  ASSERT_EQ(b.labels.sizes(), b.positions.sizes());
  EXPECT_EQ(b.positions.dtype(), torch::kLong);
  EXPECT_EQ(b.labels.dtype(), torch::kLong);

  auto ids = b.input_ids.accessor<int64_t, 2>();
  auto pos = b.positions.accessor<int64_t, 1>();
  auto lab = b.labels.accessor<int64_t, 1>();
  std::vector<int> per_row(c.batch, 0);
  std::set<int64_t> chosen;
  int64_t prev = -1;
  for (int64_t i = 0; i < b.positions.size(0); ++i) {
    const int64_t p = pos[i];
    ASSERT_GE(p, 0);
    ASSERT_LT(p, c.batch * c.seq_len);
    EXPECT_GT(p, prev) << "positions are not strictly increasing at " << i;
    prev = p;
    chosen.insert(p);
    const int64_t r = p / c.seq_len, t = p % c.seq_len;
    ++per_row[r];
    EXPECT_EQ(lab[i], rows[r][t]) << "label at position " << p;
    const int64_t in = ids[r][t];
    EXPECT_TRUE(in == opt.mask_id || (in >= 0 && in < V)) << "input " << in << " at " << p;
  }
  for (int64_t r = 0; r < c.batch; ++r) EXPECT_GE(per_row[r], 1) << "row " << r;
  // Positions not chosen keep their token.
  for (int64_t r = 0; r < c.batch; ++r) {
    for (int64_t t = 0; t < c.seq_len; ++t) {
      if (!chosen.count(r * c.seq_len + t)) {
        ASSERT_EQ(ids[r][t], rows[r][t]) << r << "," << t;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, MaskBlocksTest,
                         ::testing::Values(MaskCase{1, 1, 0.15}, MaskCase{4, 8, 1e-9},
                                           MaskCase{16, 32, 0.15}, MaskCase{8, 128, 0.5},
                                           MaskCase{3, 16, 0.999}));

TEST(MaskBlocksStatsTest, MaskFractionAndSplitAreCloseToBert) {
  // B*T = 32,768 tokens, p = 0.15: E[M] = 4915.2, sd = sqrt(N p (1-p)) = 64.6; bound 6 sd.
  // Rows with no draw get one forced position: P = 0.85^128 ~ 1e-9 per row, negligible.
  const int64_t B = 256, T = 128, V = 30000;
  const double p = 0.15;
  MlmOptions opt = Options(T, p, V);
  std::vector<std::vector<int32_t>> rows(B, std::vector<int32_t>(T));
  std::mt19937_64 data_rng(17);
  for (auto& r : rows)
    for (auto& t : r) t = static_cast<int32_t>(UniformInt(data_rng, V));
  std::mt19937_64 rng(3);
  MlmBatch b = MaskBlocks(rows, opt, rng);
  const double N = double(B * T);
  const double M = double(b.positions.size(0));
  EXPECT_NEAR(M, N * p, 6 * std::sqrt(N * p * (1 - p)));

  // Of the M chosen positions: 80 % [MASK], 10 % a random token, 10 % unchanged. A random token
  // equals the original with probability 1/V, which moves 0.1/V of M into "unchanged".
  auto ids = b.input_ids.accessor<int64_t, 2>();
  auto pos = b.positions.accessor<int64_t, 1>();
  double masked = 0, random = 0, same = 0;
  for (int64_t i = 0; i < b.positions.size(0); ++i) {
    const int64_t r = pos[i] / T, t = pos[i] % T;
    if (ids[r][t] == opt.mask_id) {
      ++masked;
    } else if (ids[r][t] == rows[r][t]) {
      ++same;
    } else {
      ++random;
    }
  }
  auto bound = [M](double q) { return 6 * std::sqrt(M * q * (1 - q)); };
  EXPECT_NEAR(masked, 0.8 * M, bound(0.8));
  EXPECT_NEAR(random, 0.1 * M, bound(0.1));
  EXPECT_NEAR(same, 0.1 * M, bound(0.1));
}

TEST(MaskBlocksStatsTest, SameGeneratorStateGivesSameBatch) {
  MlmOptions opt = Options(16, 0.15, 1000);
  std::vector<std::vector<int32_t>> rows(8, std::vector<int32_t>(16, 7));
  std::mt19937_64 a(11), b(11), c(12);
  MlmBatch x = MaskBlocks(rows, opt, a), y = MaskBlocks(rows, opt, b), z = MaskBlocks(rows, opt, c);
  EXPECT_TRUE(SameBatch(x, y));
  EXPECT_FALSE(SameBatch(x, z));
  EXPECT_EQ(a, b);  // the generators advanced identically
}

// ---------------------------------------------------------------------------------------------
// Uniform draws.

TEST(UniformTest, IntIsInRangeAndRoughlyUniform) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(UniformInt(rng, 1), 0u);
  // n = 10, 100,000 draws: each count ~ Binomial(1e5, 0.1), sd = 94.9; bound 6 sd.
  std::vector<int> counts(10, 0);
  for (int i = 0; i < 100000; ++i) {
    uint64_t x = UniformInt(rng, 10);
    ASSERT_LT(x, 10u);
    ++counts[x];
  }
  for (int k = 0; k < 10; ++k) EXPECT_NEAR(counts[k], 10000, 6 * 94.9) << "value " << k;
  // A range just above 2^63 rejects about half the raw draws; results still below n.
  const uint64_t big = (uint64_t(1) << 63) + 12345;
  uint64_t above_half = 0;
  for (int i = 0; i < 2000; ++i) {
    uint64_t x = UniformInt(rng, big);
    ASSERT_LT(x, big);
    above_half += x >= big / 2;
  }
  EXPECT_NEAR(double(above_half), 1000, 6 * std::sqrt(2000 * 0.25));
}

TEST(UniformTest, UnitIsInHalfOpenIntervalWithMeanOneHalf) {
  std::mt19937_64 rng(2);
  double sum = 0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) {
    double u = UniformUnit(rng);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  // sd of the mean = sqrt(1/12 / n) = 0.000913; bound 6 sd.
  EXPECT_NEAR(sum / n, 0.5, 6 * std::sqrt(1.0 / 12 / n));
}

// ---------------------------------------------------------------------------------------------
// MlmStream.

class MlmStreamTest : public ::testing::Test {
 protected:
  static constexpr int64_t kT = 16;
  // 37 whole blocks and 5 leftover tokens that no block may contain.
  const std::vector<int32_t> tokens_ = Iota(37 * kT + 5);
  const MlmOptions opt_ = Options(kT, 0.15, 37 * kT + 5);
};

TEST_F(MlmStreamTest, SameSeedGivesSameBatchesAndDifferentSeedDifferent) {
  MlmStream a(tokens_, opt_, 0, 1, 7), b(tokens_, opt_, 0, 1, 7), c(tokens_, opt_, 0, 1, 8);
  bool any_diff = false;
  for (int i = 0; i < 12; ++i) {  // 96 rows: crosses two epoch boundaries
    MlmBatch x = a.Next(8), y = b.Next(8), z = c.Next(8);
    EXPECT_TRUE(SameBatch(x, y)) << "batch " << i;
    any_diff |= !SameBatch(x, z);
  }
  EXPECT_TRUE(any_diff);
  EXPECT_EQ(a.SaveState(), b.SaveState());
  EXPECT_NE(a.SaveState(), c.SaveState());
}

TEST_F(MlmStreamTest, RowsAreWholeBlocks) {
  MlmStream s(tokens_, opt_, 0, 1, 3);
  EXPECT_EQ(s.num_blocks(), 37);
  for (int i = 0; i < 10; ++i) {
    MlmBatch b = s.Next(5);
    ASSERT_EQ(b.input_ids.size(0), 5);
    ExpectWholeIotaBlocks(b, kT);
    for (int64_t start : BlockStarts(b)) EXPECT_LT(start, 37 * kT);  // never the 5 leftovers
  }
}

TEST_F(MlmStreamTest, EachEpochVisitsEveryBlockOnce) {
  MlmStream s(tokens_, opt_, 0, 1, 21);
  const int64_t K = s.num_blocks();
  ASSERT_EQ(K, 37);
  // Batches of 5 do not divide 37: epochs end in the middle of a batch.
  std::vector<int64_t> starts;
  std::vector<int64_t> epoch_after;
  while (int64_t(starts.size()) < 3 * K) {
    MlmBatch b = s.Next(5);
    for (int64_t x : BlockStarts(b)) starts.push_back(x);
    epoch_after.push_back(s.epoch());
  }
  std::vector<std::vector<int64_t>> epochs;
  for (int e = 0; e < 3; ++e) {
    std::vector<int64_t> v(starts.begin() + e * K, starts.begin() + (e + 1) * K);
    std::vector<int64_t> sorted = v;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> want(K);
    for (int64_t k = 0; k < K; ++k) want[k] = k * kT;
    EXPECT_EQ(sorted, want) << "epoch " << e;
    epochs.push_back(v);
  }
  EXPECT_NE(epochs[0], epochs[1]) << "the order should be reshuffled each epoch";
  // After 8 batches (40 rows) we are in epoch 1; after 15 batches (75 rows) in epoch 2.
  EXPECT_EQ(epoch_after[7], 1);
  EXPECT_EQ(epoch_after[14], 2);
  EXPECT_EQ(epoch_after[0], 0);
}

TEST_F(MlmStreamTest, EpochAdvancesOnlyWhenTheNextBlockIsNeeded) {
  MlmStream s(tokens_, opt_, 0, 1, 21);
  for (int64_t i = 0; i < s.num_blocks(); ++i) s.Next(1);
  EXPECT_EQ(s.epoch(), 0);
  s.Next(1);
  EXPECT_EQ(s.epoch(), 1);
}

TEST_F(MlmStreamTest, TwoRanksSeeDisjointBlocksCoveringAll) {
  const int world = 2;
  std::set<int64_t> seen[2];
  for (int rank = 0; rank < world; ++rank) {
    MlmStream s(tokens_, opt_, rank, world, 5);
    EXPECT_EQ(s.num_blocks(), rank == 0 ? 19 : 18);
    MlmBatch b = s.Next(s.num_blocks());
    ExpectWholeIotaBlocks(b, kT);
    for (int64_t start : BlockStarts(b)) {
      EXPECT_EQ((start / kT) % world, rank) << "block " << start / kT << " on rank " << rank;
      EXPECT_TRUE(seen[rank].insert(start).second) << "block " << start / kT << " twice";
    }
  }
  for (int64_t x : seen[0]) EXPECT_EQ(seen[1].count(x), 0u) << "block " << x / kT << " on both";
  EXPECT_EQ(seen[0].size() + seen[1].size(), 37u);
}

TEST_F(MlmStreamTest, ThreeRanksPartitionTheBlocks) {
  std::vector<int64_t> all;
  for (int rank = 0; rank < 3; ++rank) {
    MlmStream s(tokens_, opt_, rank, 3, 5);
    for (int64_t x : BlockStarts(s.Next(s.num_blocks()))) all.push_back(x);
  }
  std::sort(all.begin(), all.end());
  std::vector<int64_t> want(37);
  for (int64_t k = 0; k < 37; ++k) want[k] = k * kT;
  EXPECT_EQ(all, want);
}

// SaveState after `GetParam()` batches of 4 from 37 blocks, LoadState into a fresh stream: the
// next batches equal the uninterrupted stream's. Save points cover epoch 0, the middle of a batch
// that crosses an epoch boundary, and later epochs.
class MlmStreamResumeTest : public MlmStreamTest, public ::testing::WithParamInterface<int> {};

TEST_P(MlmStreamResumeTest, LoadStateContinuesWithIdenticalBatches) {
  MlmStream original(tokens_, opt_, 0, 1, 13);
  for (int i = 0; i < GetParam(); ++i) original.Next(4);
  const std::string state = original.SaveState();
  MlmStream resumed(tokens_, opt_, 0, 1, 13);
  resumed.Next(3);  // arbitrary progress that LoadState must discard
  ASSERT_TRUE(resumed.LoadState(state).ok());
  EXPECT_EQ(resumed.epoch(), original.epoch());
  EXPECT_EQ(resumed.SaveState(), state);
  for (int i = 0; i < 25; ++i) {  // 100 rows: at least two more epoch boundaries
    ASSERT_TRUE(SameBatch(original.Next(4), resumed.Next(4))) << "batch " << i << " after resume";
  }
}

INSTANTIATE_TEST_SUITE_P(SavePoints, MlmStreamResumeTest, ::testing::Values(0, 1, 9, 10, 18, 30));

TEST_F(MlmStreamTest, LoadStateRejectsMalformedStateAndKeepsGoing) {
  MlmStream s(tokens_, opt_, 0, 1, 13), untouched(tokens_, opt_, 0, 1, 13);
  s.Next(4);
  untouched.Next(4);
  const std::string good = s.SaveState();
  const std::string rng_part = good.substr(good.find(' ', good.find(' ') + 1) + 1);
  for (const std::string& bad : {std::string(""), std::string("garbage"), std::string("0 1"),
                                 "-1 0 " + rng_part, "0 -1 " + rng_part, "0 38 " + rng_part}) {
    absl::Status st = s.LoadState(bad);
    EXPECT_FALSE(st.ok()) << "'" << bad.substr(0, 20) << "'";
  }
  EXPECT_TRUE(SameBatch(s.Next(4), untouched.Next(4)));
}

// ---------------------------------------------------------------------------------------------
// MakeEvalBatches.

TEST(MakeEvalBatchesTest, IsDeterministicAndUsesTheFirstBlocksInOrder) {
  const int64_t T = 8;
  const std::vector<int32_t> tokens = Iota(23 * T + 3);  // 23 blocks
  MlmOptions opt = Options(T, 0.15, 23 * T + 3);
  std::vector<MlmBatch> a = MakeEvalBatches(tokens, opt, 4, 3, 1234);
  std::vector<MlmBatch> b = MakeEvalBatches(tokens, opt, 4, 3, 1234);
  std::vector<MlmBatch> c = MakeEvalBatches(tokens, opt, 4, 3, 4321);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  ASSERT_EQ(c.size(), 3u);
  bool any_diff = false;
  int64_t next_start = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(SameBatch(a[i], b[i])) << "batch " << i;
    any_diff |= !SameBatch(a[i], c[i]);
    ASSERT_EQ(a[i].input_ids.size(0), 4);
    ExpectWholeIotaBlocks(a[i], T);
    for (int64_t start : BlockStarts(a[i])) {
      EXPECT_EQ(start, next_start);
      next_start += T;
    }
  }
  EXPECT_TRUE(any_diff) << "a different seed should mask different positions";
}

TEST(MakeEvalBatchesTest, AllBlocksWhenMaxBatchesIsZeroWithAPartialLastBatch) {
  const int64_t T = 8;
  const std::vector<int32_t> tokens = Iota(23 * T + 3);
  MlmOptions opt = Options(T, 0.15, 23 * T + 3);
  for (int64_t max_batches : {int64_t(0), int64_t(-1), int64_t(100)}) {
    std::vector<MlmBatch> all = MakeEvalBatches(tokens, opt, 4, max_batches, 1);
    ASSERT_EQ(all.size(), 6u) << "max_batches " << max_batches;  // 5 full + 1 of 3 blocks
    EXPECT_EQ(all.back().input_ids.size(0), 3);
    int64_t next_start = 0;
    for (const MlmBatch& b : all) {
      ExpectWholeIotaBlocks(b, T);
      for (int64_t start : BlockStarts(b)) {
        EXPECT_EQ(start, next_start);
        next_start += T;
      }
    }
    EXPECT_EQ(next_start, 23 * T);
  }
  // A prefix of the batches does not change with max_batches: the masks are fixed.
  std::vector<MlmBatch> two = MakeEvalBatches(tokens, opt, 4, 2, 1);
  std::vector<MlmBatch> all = MakeEvalBatches(tokens, opt, 4, 0, 1);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_TRUE(SameBatch(two[0], all[0]));
  EXPECT_TRUE(SameBatch(two[1], all[1]));
}

TEST(MakeEvalBatchesTest, FewerTokensThanOneBlockGivesNoBatches) {
  MlmOptions opt = Options(8, 0.15, 100);
  EXPECT_TRUE(MakeEvalBatches(Iota(7), opt, 4, 0, 1).empty());
}

}  // namespace
}  // namespace mat::trainer
