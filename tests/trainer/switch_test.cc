// The Switch Transformer (model.kind switch): top-1 routing under the capacity, the
// load-balancing loss, experts as modules (partition, masked backward, optimizer), FLOPs by
// routed tokens, the gram probe on experts, the config keys, and a short MAT run over experts.
#include "trainer/models/switch_ffn.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>

#include "spectral/estimator.h"
#include "tests/trainer/toy_run.h"
#include "trainer/models/bert.h"
#include "trainer/models/flops.h"
#include "trainer/optim/optimizer.h"
#include "trainer/trainer.h"

namespace mat::trainer {
namespace {

namespace F = torch::nn::functional;
namespace fs = std::filesystem;

// ‖a − b‖ / max(‖b‖, 1e-3), as in masked_backward_test.
double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  double denom = std::max(b.norm().item<double>(), 1e-3);
  return (a - b).norm().item<double>() / denom;
}

// ----- routing -----

TEST(SwitchRoutingTest, AssignKeepsTheFirstTokensUpToTheCapacity) {
  // Tokens 0, 1, 3, 4 prefer expert 0, token 2 expert 1, token 5 expert 2.
  torch::Tensor probs = torch::tensor({{0.6, 0.3, 0.1},
                                       {0.5, 0.4, 0.1},
                                       {0.2, 0.7, 0.1},
                                       {0.8, 0.1, 0.1},
                                       {0.4, 0.3, 0.3},
                                       {0.1, 0.1, 0.8}});
  torch::Tensor expert_of;
  torch::Tensor kept = SwitchAssign(probs, /*capacity=*/2, &expert_of);
  EXPECT_TRUE(torch::equal(expert_of, torch::tensor({0, 0, 1, 0, 0, 2}, torch::kLong)));
  EXPECT_TRUE(torch::equal(kept, torch::tensor({0, 0, 1, -1, -1, 2}, torch::kLong))) << kept;
  EXPECT_EQ(SwitchCapacity(6, 3, 1.25), 3);   // ceil(2.5)
  EXPECT_EQ(SwitchCapacity(8, 4, 1.0), 2);
  EXPECT_EQ(SwitchCapacity(8, 4, 0.01), 1);  // ceil never gives 0 for tokens > 0
}

class SwitchFfnTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(3);
    c_.d_model = 8;
    c_.d_ff = 16;
    c_.experts = 4;
    c_.capacity_factor = 1.0;
    c_.dropout = 0;
    ffn_ = SwitchFfn(c_);
    ffn_->eval();
    {
      // Favour expert 0 so that it overflows: capacity = ceil(1.0 · 24 / 4) = 6.
      torch::NoGradGuard g;
      ffn_->router->bias.copy_(torch::tensor({1.5, 0.0, -0.5, 0.0}));
      ffn_->router->weight.normal_(0, 0.5);
    }
    x_ = torch::randn({3, 8, 8});
  }

  SwitchFfnConfig c_;
  SwitchFfn ffn_{nullptr};
  torch::Tensor x_;
};

TEST_F(SwitchFfnTest, RoutingRespectsTheCapacityAndOverflowTokensSkipTheFfn) {
  torch::NoGradGuard g;
  torch::Tensor y = ffn_->forward(x_, {}).reshape({24, 8});
  const int64_t capacity = SwitchCapacity(24, 4, 1.0);
  ASSERT_EQ(capacity, 6);
  int64_t routed = 0;
  for (int64_t n : ffn_->routed_tokens()) {
    EXPECT_LE(n, capacity);
    routed += n;
  }
  EXPECT_EQ(routed + ffn_->dropped_tokens(), 24);
  ASSERT_GT(ffn_->dropped_tokens(), 0) << "the test needs an overflowing expert";

  // Every token by hand: the first `capacity` tokens of each expert get gate · FFN_e(x), the
  // rest exactly zero (the encoder layer's residual then carries them unchanged).
  torch::Tensor flat = x_.reshape({24, 8});
  torch::Tensor probs = torch::softmax(ffn_->router(flat), -1);
  std::vector<int64_t> seen(4, 0);
  int64_t dropped = 0;
  for (int64_t t = 0; t < 24; ++t) {
    const int64_t e = probs[t].argmax().item<int64_t>();
    if (seen[e]++ >= capacity) {
      ++dropped;
      EXPECT_TRUE(torch::equal(y[t], torch::zeros({8}))) << "overflow token " << t;
      continue;
    }
    torch::Tensor h = F::gelu(F::linear(flat[t], ffn_->w1[e], ffn_->b1[e]));
    torch::Tensor want = probs[t][e] * F::linear(h, ffn_->w2[e], ffn_->b2[e]);
    EXPECT_LE(RelDiff(y[t], want), 1e-6) << "token " << t;
  }
  EXPECT_EQ(dropped, ffn_->dropped_tokens());
  for (int e = 0; e < 4; ++e) EXPECT_EQ(ffn_->routed_tokens()[e], std::min(seen[e], capacity));
}

TEST_F(SwitchFfnTest, OverflowTokensPassThroughAPreLnLayerUnchangedByTheFfn) {
  // A pre-LN Switch layer is h + FFN(ln2(h)) after attention: an overflow token's output is h.
  BertConfig c;
  c.vocab_size = 10;
  c.max_seq_len = 8;
  c.layers = 1;
  c.d_model = 8;
  c.heads = 2;
  c.d_ff = 16;
  c.dropout = 0;
  c.pre_ln = true;
  c.experts = 4;
  c.capacity_factor = 0.25;  // capacity ceil(0.25 · 24 / 4) = 2: most tokens overflow
  torch::manual_seed(5);
  BertLayer layer(c, 0);
  layer->eval();
  torch::NoGradGuard g;
  std::vector<bool> heads(2, true), none;
  torch::Tensor out = layer->forward(x_, heads, none);
  {
    std::vector<bool> off(4, false);  // masking experts off changes no forward value
    EXPECT_TRUE(torch::equal(layer->forward(x_, heads, none, off), out));
  }
  int64_t routed = 0;
  for (int64_t n : layer->moe->routed_tokens()) {
    EXPECT_LE(n, 2);
    routed += n;
  }
  EXPECT_EQ(layer->moe->dropped_tokens(), 24 - routed);
  ASSERT_GT(layer->moe->dropped_tokens(), 0);
  // The residual h of every token: the same layer with all expert weights zero (the same
  // routing, an FFN output of exactly 0).
  BertLayer zeroed(c, 0);
  zeroed->eval();
  {
    auto src = layer->named_parameters();
    for (auto& kv : zeroed->named_parameters()) {
      if (kv.key().find("moe.") != std::string::npos && kv.key().find("router") == std::string::npos) {
        kv.value().zero_();
      } else {
        kv.value().copy_(src[kv.key()]);
      }
    }
  }
  torch::Tensor h = zeroed->forward(x_, heads, none).reshape({24, 8});
  torch::Tensor o = out.reshape({24, 8});
  int same = 0;
  for (int64_t t = 0; t < 24; ++t) same += torch::equal(o[t], h[t]);
  EXPECT_EQ(same, 24 - routed) << "exactly the overflow tokens leave the layer as the residual h";
}

// ----- load-balancing loss -----

TEST(SwitchAuxLossTest, MatchesTheHandComputedValueAndGradient) {
  torch::Tensor probs = torch::tensor({{0.7, 0.2, 0.1},
                                       {0.6, 0.3, 0.1},
                                       {0.1, 0.8, 0.1},
                                       {0.2, 0.2, 0.6}},
                                      torch::kFloat64)
                            .requires_grad_();
  torch::Tensor expert_of = torch::tensor({0, 0, 1, 2}, torch::kLong);
  torch::Tensor aux = SwitchLoadBalancingLoss(probs, expert_of);
  // f = (2/4, 1/4, 1/4), P = (0.4, 0.375, 0.225): 3 · (0.2 + 0.09375 + 0.05625) = 1.05.
  EXPECT_NEAR(aux.item<double>(), 1.05, 1e-12);
  aux.backward();
  // d aux / d p[t, i] = E · f_i / N.
  torch::Tensor want = torch::tensor({0.375, 0.1875, 0.1875}, torch::kFloat64).expand({4, 3});
  EXPECT_LE((probs.grad() - want).abs().max().item<double>(), 1e-12);
  // Perfect balance with uniform probabilities gives the minimum, 1.
  torch::Tensor uniform = torch::full({4, 4}, 0.25, torch::kFloat64);
  torch::Tensor balanced = torch::tensor({0, 1, 2, 3}, torch::kLong);
  EXPECT_NEAR(SwitchLoadBalancingLoss(uniform, balanced).item<double>(), 1.0, 1e-12);
}

BertConfig SwitchConfig() {
  BertConfig c;
  c.vocab_size = 40;
  c.max_seq_len = 8;
  c.layers = 3;
  c.d_model = 16;
  c.heads = 2;
  c.d_ff = 32;
  c.dropout = 0;
  c.experts = 4;
  c.moe_every = 2;  // layers 0 and 2; layer 1 keeps a dense FFN
  c.capacity_factor = 1.0;
  c.aux_loss_weight = 0.5;
  return c;
}

TEST(SwitchAuxLossTest, ModelSumsTheSwitchLayersWeightedByAlpha) {
  torch::manual_seed(2);
  BertMlm m(SwitchConfig());
  torch::Tensor ids = torch::randint(0, 40, {4, 8}, torch::kLong);
  m->forward(ids, torch::tensor({1, 9, 20}, torch::kLong));
  torch::Tensor want = 0.5 * (m->layers[0]->moe->aux_loss() + m->layers[2]->moe->aux_loss());
  EXPECT_NEAR(m->aux_loss().item<double>(), want.item<double>(), 1e-7);
  EXPECT_TRUE(m->aux_loss().requires_grad());
  BertConfig dense = SwitchConfig();
  dense.experts = 0;
  BertMlm b(dense);
  b->forward(ids, torch::tensor({1}, torch::kLong));
  EXPECT_FALSE(b->aux_loss().defined());
  EXPECT_TRUE(b->RoutedTokens().empty());
}

// ----- partition -----

TEST(SwitchPartitionTest, CoversExactlyTheHeadsAndExperts) {
  torch::manual_seed(1);
  BertMlm m(SwitchConfig());
  spectral::ModulePartition p = m->Partition();
  ASSERT_EQ(p.size(), 3 * 2 + 2 * 4);
  ASSERT_EQ(m->num_modules(), p.size());
  EXPECT_EQ(p.GroupSize("heads"), 6);
  EXPECT_EQ(p.GroupSize("experts"), 8);
  EXPECT_EQ(p.GroupSize("ffn"), 0);
  std::vector<std::string> expert_names;
  for (const auto& mod : p.modules)
    if (mod.group == "experts") expert_names.push_back(mod.name);
  EXPECT_EQ(expert_names.front(), "layer0.expert0");
  EXPECT_EQ(expert_names[4], "layer2.expert0");
  EXPECT_EQ(expert_names.back(), "layer2.expert3");
  for (const auto& mod : p.modules) {
    if (mod.group != "experts") continue;
    EXPECT_EQ(mod.params.size(), 4u) << mod.name;
    EXPECT_EQ(mod.NumParams(), 2 * 16 * 32 + 32 + 16) << mod.name;
  }

  // Switchable by name: the layers' QKV and W_O tensors (split into head rows) and the Switch
  // layers' stacked expert tensors (split into expert rows); everything else (router, embeddings, LayerNorms, W_O's bias, layer 1's dense FFN, the
  // MLM head) is always trained. Every switchable tensor's rows are covered exactly once.
  const std::regex head(R"(layer\d+\.(wqkv|bqkv|wo_t))");
  const std::regex expert(R"(layer\d+\.moe\.(w1|b1|w2|b2))");
  std::map<const void*, std::string> name_of;
  std::set<const void*> switchable;
  for (const auto& kv : m->named_parameters()) {
    name_of[kv.value().unsafeGetTensorImpl()] = kv.key();
    if (std::regex_match(kv.key(), head) || std::regex_match(kv.key(), expert))
      switchable.insert(kv.value().unsafeGetTensorImpl());
  }
  std::map<const void*, std::vector<int>> rows_owned;  // per leaf: modules owning each row
  std::set<const void*> covered;
  for (size_t k = 0; k < p.modules.size(); ++k) {
    for (const auto& t : p.modules[k].params) {
      const void* leaf = t.param.unsafeGetTensorImpl();
      ASSERT_TRUE(name_of.count(leaf)) << p.modules[k].name << ": not a model parameter";
      covered.insert(leaf);
      auto& owners = rows_owned[leaf];
      owners.resize(t.param.size(0), -1);
      for (int64_t r = t.begin; r < t.end; ++r) {
        EXPECT_EQ(owners[r], -1) << name_of[leaf] << " row " << r << " is in two modules";
        owners[r] = int(k);
      }
    }
  }
  for (const auto& [leaf, owners] : rows_owned) {
    EXPECT_EQ(std::count(owners.begin(), owners.end(), -1), 0) << name_of[leaf] << " has rows in no module";
  }
  EXPECT_EQ(covered, switchable);
  EXPECT_EQ(switchable.size(), 3u * 3 + 2u * 4);
  bool router_seen = false;
  for (const auto& kv : m->named_parameters()) {
    if (kv.key().find("router") == std::string::npos) continue;
    router_seen = true;
    EXPECT_FALSE(covered.count(kv.value().unsafeGetTensorImpl())) << kv.key();
  }
  EXPECT_TRUE(router_seen);
}

// ----- masking -----

using testing::MakeNet;
using testing::Net;

class SwitchMaskTest : public ::testing::Test {
 protected:
  void SetUp() override {
    c_ = SwitchConfig();
    torch::manual_seed(11);
    ids_ = torch::randint(0, 40, {4, 8}, torch::kLong);
    positions_ = torch::tensor({1, 5, 9, 14, 20, 27, 31}, torch::kLong);
    labels_ = torch::randint(0, 40, {7}, torch::kLong);
  }

  // MLM loss + the load-balancing loss, as the trainer's step.
  double Backward(Net& n, const std::vector<uint8_t>& mask) {
    n.model->SetMask(mask);
    torch::Tensor loss = F::cross_entropy(n.model->forward(ids_, positions_), labels_);
    (loss + n.model->aux_loss()).backward();
    return loss.item<double>();
  }

  // Module indices: heads 0..5, experts of layer 0: 6..9, of layer 2: 10..13.
  BertConfig c_;
  torch::Tensor ids_, positions_, labels_;
};

TEST_F(SwitchMaskTest, MaskedOffExpertsGetNoGradientAndOthersMatchReference) {
  Net ref = MakeNet(c_), masked = MakeNet(c_);
  ASSERT_EQ(ref.partition.size(), 14);
  std::vector<uint8_t> all(14, 1), mask = all;
  mask[1] = 0;             // layer 0, head 1
  mask[6] = mask[8] = 0;   // layer 0, experts 0 and 2
  mask[13] = 0;            // layer 2, expert 3
  double l_ref = Backward(ref, all);
  double l_masked = Backward(masked, mask);
  EXPECT_NEAR(l_masked, l_ref, 1e-6 * std::abs(l_ref));  // masks do not change the forward
  // The routing was the same, and the masked-off experts did process tokens.
  EXPECT_EQ(masked.model->RoutedTokens(), ref.model->RoutedTokens());
  const auto routed = masked.model->RoutedTokens();
  EXPECT_GT(routed[0] + routed[2] + routed[7], 0);

  // Not computed: a masked-off head's or expert's rows of its layer's gradients are zero. Every
  // active module has its rows, zero when no token reached an expert.
  const auto [checked_off, checked_on] =
      testing::ExpectModuleGradients(masked.partition, ref.partition, mask, 1e-6);
  EXPECT_EQ(checked_off, 3 + 3 * 4);  // 1 head x 3 slices, 3 experts x 4 tensors
  EXPECT_GT(checked_on, 0);
  // The router is always trained.
  EXPECT_TRUE(masked.model->layers[0]->moe->router->weight.grad().defined());
}

// The update count of module m's first segment in `opt`'s entries (-1: not found).
int64_t StepsOf(const MaskedAdamW& opt, int m) {
  for (size_t i = 0; i < opt.params().size(); ++i) {
    const std::vector<ParamSegment> segments = opt.params()[i].Segments();
    for (size_t s = 0; s < segments.size(); ++s)
      if (segments[s].module == m) return opt.step_count(i, s);
  }
  return -1;
}

// Data-parallel ranks reduce the gradients of every active module: an active expert that no
// token reached still gets its rows of the gradient (zeros) and an update; a masked-off one's
// rows are zeros too, and it gets no update.
TEST_F(SwitchMaskTest, ActiveExpertsWithoutTokensGetAZeroGradient) {
  Net n = MakeNet(c_);
  {
    torch::NoGradGuard g;  // layer 2: experts 0 and 1 get no token
    n.model->layers[2]->moe->router->bias.copy_(torch::tensor({-1e4, -1e4, 0.0, 0.0}));
  }
  std::vector<uint8_t> mask(14, 1);
  mask[11] = 0;  // layer 2, expert 1
  Backward(n, mask);
  ASSERT_EQ(n.model->RoutedTokens()[4], 0);
  ASSERT_EQ(n.model->RoutedTokens()[5], 0);
  for (const auto& t : n.partition.modules[10].params) {
    ASSERT_TRUE(t.grad().defined());
    EXPECT_EQ(t.grad().abs().max().item<double>(), 0.0);
  }
  for (const auto& t : n.partition.modules[11].params) {
    EXPECT_TRUE(!t.grad().defined() || t.grad().abs().max().item<double>() == 0.0);
  }
  std::vector<double> ones(14, 1.0);
  EXPECT_TRUE(n.opt->Step(1e-2, mask, ones).ok());
  EXPECT_EQ(StepsOf(*n.opt, 10), 1);
  EXPECT_EQ(StepsOf(*n.opt, 11), 0);
}

TEST_F(SwitchMaskTest, OptimizerLeavesMaskedOffExpertsUntouched) {
  Net once = MakeNet(c_), masked = MakeNet(c_);
  std::vector<uint8_t> all(14, 1), mask = all;
  mask[7] = 0;   // layer 0, expert 1
  mask[12] = 0;  // layer 2, expert 2
  std::vector<double> ones(14, 1.0);
  Backward(once, all);
  ASSERT_TRUE(once.opt->Step(1e-2, all, ones).ok());
  Backward(masked, all);
  ASSERT_TRUE(masked.opt->Step(1e-2, all, ones).ok());
  Backward(masked, mask);
  ASSERT_TRUE(masked.opt->Step(1e-2, mask, ones).ok());
  const auto& entries = masked.opt->params();
  int off_seen = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::vector<ParamSegment> segments = entries[i].Segments();
    for (size_t k = 0; k < segments.size(); ++k) {
      const ParamSegment& seg = segments[k];
      SCOPED_TRACE(entries[i].name + " rows " + std::to_string(seg.begin));
      const bool is_off = seg.module >= 0 && !mask[seg.module];
      if (!is_off) {
        EXPECT_EQ(masked.opt->step_count(i, k), 2);
        continue;
      }
      ++off_seen;
      // Exactly the state after the first (unmasked) step: values, moments and step count.
      auto rows = [&](const torch::Tensor& t) { return t.detach().narrow(0, seg.begin, seg.end - seg.begin); };
      EXPECT_EQ(masked.opt->step_count(i, k), 1);
      EXPECT_TRUE(torch::equal(rows(entries[i].param), rows(once.opt->params()[i].param)));
      EXPECT_TRUE(torch::equal(rows(masked.opt->exp_avg(i)), rows(once.opt->exp_avg(i))));
      EXPECT_TRUE(torch::equal(rows(masked.opt->exp_avg_sq(i)), rows(once.opt->exp_avg_sq(i))));
    }
  }
  EXPECT_EQ(off_seen, 2 * 4);
}

// Weight decay on matrices only, as with the per-expert leaves the experts once were: an
// expert's weights (rows of the [E, ., .] stacks) decay, its biases (rows of [E, .]) do not,
// like every other bias and LayerNorm.
TEST(SwitchOptimizerTest, ExpertWeightsDecayAndExpertBiasesDoNot) {
  torch::manual_seed(4);
  BertMlm m(SwitchConfig());
  std::map<std::string, bool> decay;
  for (const ParamEntry& e : BuildParamEntries(*m, m->Partition())) decay[e.name] = e.decay;
  for (const char* layer : {"layer0.moe.", "layer2.moe."}) {
    SCOPED_TRACE(layer);
    ASSERT_EQ(decay.count(std::string(layer) + "b1"), 1u);
    EXPECT_TRUE(decay.at(std::string(layer) + "w1"));
    EXPECT_TRUE(decay.at(std::string(layer) + "w2"));
    EXPECT_FALSE(decay.at(std::string(layer) + "b1"));
    EXPECT_FALSE(decay.at(std::string(layer) + "b2"));
  }
  EXPECT_TRUE(decay.at("layer0.wqkv"));
  EXPECT_FALSE(decay.at("layer0.bqkv"));

  // And in a step: with no gradient signal (zero gradients), AdamW moves only what decays.
  torch::NoGradGuard guard;
  m->layers[0]->moe->b1.fill_(1.0);
  const torch::Tensor w1 = m->layers[0]->moe->w1.clone();
  MaskedAdamW opt(BuildParamEntries(*m, m->Partition()), {});
  for (auto& p : m->parameters()) p.mutable_grad() = torch::zeros_like(p);
  ASSERT_TRUE(opt.Step(1e-2, std::vector<uint8_t>(m->num_modules(), 1), {}).ok());
  EXPECT_TRUE(torch::equal(m->layers[0]->moe->b1, torch::ones_like(m->layers[0]->moe->b1)));
  EXPECT_FALSE(torch::equal(m->layers[0]->moe->w1, w1));
}

// ----- FLOPs -----

TEST(SwitchFlopsTest, ExpertsCountTheirRoutedTokensAndWeightGradsOnlyWhenActive) {
  BertConfig c = SwitchConfig();
  const double d = 16, f = 32;
  std::vector<int64_t> routed = {3, 5, 0, 8, 1, 1, 2, 4};  // layer 0 then layer 2
  std::vector<int64_t> none(8, 0);
  std::vector<uint8_t> all(14, 1), mask = all;
  mask[6 + 1] = 0;  // layer 0, expert 1 (5 tokens)
  mask[10 + 3] = 0;  // layer 2, expert 3 (4 tokens)
  FlopCounts full = BertStepFlops(c, 4, 8, 7, all, routed);
  FlopCounts empty = BertStepFlops(c, 4, 8, 7, all, none);
  FlopCounts masked = BertStepFlops(c, 4, 8, 7, mask, routed);
  const double per_token = 2 * 2 * d * f;  // both matmuls of one expert, one phase
  EXPECT_DOUBLE_EQ(full.forward - empty.forward, 24 * per_token);
  EXPECT_DOUBLE_EQ(full.activation_grad - empty.activation_grad, 24 * per_token);
  EXPECT_DOUBLE_EQ(full.weight_grad - masked.weight_grad, (5 + 4) * per_token);
  EXPECT_DOUBLE_EQ(full.forward, masked.forward);
  EXPECT_DOUBLE_EQ(full.activation_grad, masked.activation_grad);
  // Without routed counts every token is processed once, evenly spread: 32 tokens per layer.
  std::vector<int64_t> even(8, 8);
  EXPECT_DOUBLE_EQ(BertStepFlops(c, 4, 8, 7, all).total(),
                   BertStepFlops(c, 4, 8, 7, all, even).total());
  // A Switch layer with every token routed costs its router more than the dense FFN.
  BertConfig dense = c;
  dense.experts = 0;
  const double router = 2 * 32 * d * 4;
  EXPECT_DOUBLE_EQ(BertForwardFlops(c, 4, 8, 7, even).forward,
                   BertForwardFlops(dense, 4, 8, 7).forward + 2 * router);
}

// ----- the gram probe on experts -----

// Per-sample masked-LM losses [n] (sample = position / seq).
torch::Tensor PerSample(const torch::Tensor& logits, const torch::Tensor& labels,
                        const torch::Tensor& positions, int64_t seq, int64_t n) {
  torch::Tensor ce =
      F::cross_entropy(logits, labels, F::CrossEntropyFuncOptions().reduction(torch::kNone));
  torch::Tensor sample = torch::div(positions, seq, "floor");
  return torch::zeros({n}, ce.options()).index_add(0, sample, ce);
}

TEST(SwitchProbeTest, GramMatchesExactOnExpertsWithUnroutedSamplesAndOverflow) {
  BertConfig c = SwitchConfig();
  c.capacity_factor = 0.75;  // some tokens overflow
  torch::manual_seed(4);
  BertMlm m(c);
  m->to(torch::kFloat64);
  m->eval();
  {
    torch::NoGradGuard g;  // layer 2's expert 3 gets no token at all
    m->layers[2]->moe->router->bias[3].fill_(-1e4);
  }
  const int64_t n = 4, T = 8;
  torch::Tensor ids = torch::randint(0, 40, {n, T}, torch::kLong);
  torch::Tensor positions = torch::tensor({0, 3, 9, 12, 17, 18, 22, 27, 30}, torch::kLong);
  torch::Tensor labels = torch::randint(0, 40, {9}, torch::kLong);
  spectral::ModulePartition p = m->Partition();

  auto probe = [&]() {
    spectral::SiteRecorder rec;
    m->SetRecorder(&rec);
    torch::Tensor logits = m->forward(ids, positions);
    m->SetRecorder(nullptr);
    spectral::ProbeBatch b;
    b.losses = PerSample(logits, labels, positions, T, n);
    b.sites = rec.Take();
    return b;
  };
  auto gram = spectral::MakeEstimator("gram");
  auto exact = spectral::MakeEstimator("exact");
  ASSERT_TRUE(gram.ok() && exact.ok());
  auto g = (*gram)->Estimate(p, probe());
  auto routed = m->RoutedTokens();
  ASSERT_EQ(routed.size(), 8u);
  EXPECT_EQ(routed[7], 0);
  int64_t processed = 0;
  for (int64_t r : routed) processed += r;
  EXPECT_LT(processed, 2 * n * T) << "the test needs overflow tokens";
  auto e = (*exact)->Estimate(p, probe());
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_TRUE(e.ok()) << e.status();
  int compared = 0;
  for (int i = 0; i < p.size(); ++i) {
    SCOPED_TRACE(p.modules[i].name);
    const auto& a = g->modules[i];
    const auto& b = e->modules[i];
    EXPECT_TRUE(std::isfinite(a.lambda_max));
    EXPECT_NEAR(a.lambda_max, b.lambda_max, 1e-6 * std::max(1e-6, b.lambda_max));
    EXPECT_NEAR(a.trace, b.trace, 1e-6 * std::max(1e-6, b.trace));
    if (p.modules[i].group == "experts" && b.lambda_max > 0) ++compared;
  }
  EXPECT_GE(compared, 4);
  EXPECT_EQ(g->modules[13].lambda_max, 0.0) << "an expert without tokens has a zero kernel";
  for (auto& t : m->parameters()) t.mutable_grad().reset();
}

// ----- configuration and the trainer -----

TEST(SwitchConfigTest, KeysParseValidateAndReachTheModel) {
  auto c = config::ParseTrainConfig(
      "model: {kind: switch, experts: 4, capacity_factor: 1.5, aux_loss_weight: 0.02, "
      "moe_every: 2}\n",
      "switch.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(config::ValidateTrainConfig(*c).ok()) << config::ValidateTrainConfig(*c);
  BertConfig b = MakeBertConfig(*c, 100);
  EXPECT_EQ(b.experts, 4);
  EXPECT_EQ(b.moe_every, 2);
  EXPECT_DOUBLE_EQ(b.capacity_factor, 1.5);
  EXPECT_DOUBLE_EQ(b.aux_loss_weight, 0.02);
  c->model.kind = "bert";  // the switch keys do not turn a BERT into a Switch Transformer
  EXPECT_EQ(MakeBertConfig(*c, 100).experts, 0);

  for (const auto& [yaml, key] : std::vector<std::pair<std::string, std::string>>{
           {"model: {kind: switch, ffn_groups: 2}", "model.ffn_groups"},
           {"model: {kind: switch, experts: 0}", "model.experts"},
           {"model: {kind: switch, capacity_factor: -1}", "model.capacity_factor"},
           {"model: {kind: switch, capacity_factor: .nan}", "model.capacity_factor"},
           {"model: {kind: switch, aux_loss_weight: -0.5}", "model.aux_loss_weight"},
           {"model: {kind: switch, moe_every: 0}", "model.moe_every"}}) {
    auto bad = config::ParseTrainConfig(yaml, "bad.yaml");
    ASSERT_TRUE(bad.ok()) << yaml;
    absl::Status st = config::ValidateTrainConfig(*bad);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << yaml;
    EXPECT_NE(st.message().find(key), std::string::npos) << yaml << ": " << st;
  }
  auto typo = config::ParseTrainConfig("model: {experts: lots}", "typo.yaml");
  ASSERT_FALSE(typo.ok());
  EXPECT_NE(typo.status().message().find("model.experts"), std::string::npos) << typo.status();

  auto example = config::LoadTrainConfig(std::string(MAT_SOURCE_DIR) + "/examples/switch-wikitext2.yaml");
  ASSERT_TRUE(example.ok()) << example.status();
  EXPECT_EQ(example->model.kind, "switch");
  EXPECT_TRUE(config::ValidateTrainConfig(*example).ok()) << config::ValidateTrainConfig(*example);
}

// The trainer tests' tiny config as a switch model: 4 experts per layer, no FFN groups.
config::TrainConfig TinySwitch(const std::string& data) {
  config::TrainConfig c = testing::TinyTrainConfig(data, "mat");
  c.model.kind = "switch";
  c.model.ffn_groups = 0;
  c.model.experts = 4;
  c.policy.alpha = 0.5;
  c.policy.min_active_fraction = 0.25;
  return c;
}

TEST(SwitchTrainerTest, MatTrainsAndDecidesOverExperts) {
  const std::string data = testing::WriteToyCorpus("switch_mat");
  const fs::path out = fs::temp_directory_path() / ("mat_switch_out_" + std::to_string(::getpid()));
  fs::remove_all(out);
  auto t = Trainer::Create(TinySwitch(data), {out.string(), false, false});
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ((*t)->partition().GroupSize("experts"), 2 * 4);
  ASSERT_EQ((*t)->partition().GroupSize("heads"), 2 * 4);
  auto s = (*t)->Run();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(std::isfinite((*s)["best_val_loss"].get<double>()));
  EXPECT_LT((*s)["mean_active_fraction"].get<double>(), 1.0);
  EXPECT_GT((*s)["flops_saved"].get<double>(), 0);

  auto decisions = testing::ReadJsonLines((out / "decisions.jsonl").string());
  ASSERT_EQ(decisions.size(), 8u);
  bool expert_off = false;
  int experts_seen = 0;
  for (const auto& d : decisions) {
    for (const auto& m : d["modules"]) {
      if (m["group"] != "experts") continue;
      ++experts_seen;
      EXPECT_TRUE(m["lambda"].is_number()) << m;
      if (!m["active"].get<bool>()) expert_off = true;
    }
  }
  EXPECT_EQ(experts_seen, 8 * 8);
  EXPECT_TRUE(expert_off) << "MAT never switched an expert off";
  auto metrics = testing::ReadJsonLines((out / "metrics.jsonl").string());
  ASSERT_EQ(metrics.size(), 4u);
  for (const auto& m : metrics) {
    ASSERT_TRUE(m.contains("train_aux_loss")) << m;
    EXPECT_GT(m["train_aux_loss"].get<double>(), 0);
    EXPECT_TRUE(m["active_modules"].contains("experts")) << m;
  }
  if (!::testing::Test::HasFailure()) fs::remove_all(out);
  fs::remove_all(data);
}

TEST(SwitchTrainerTest, ResumeReproducesTheUninterruptedRun) {
  const std::string data = testing::WriteToyCorpus("switch_resume");
  const fs::path root =
      fs::temp_directory_path() / ("mat_switch_resume_out_" + std::to_string(::getpid()));
  fs::remove_all(root);
  config::TrainConfig c = TinySwitch(data);
  c.train.steps = 20;
  auto straight = Trainer::Create(c, {(root / "a").string(), false, false});
  ASSERT_TRUE(straight.ok()) << straight.status();
  ASSERT_TRUE((*straight)->Run().ok());
  {
    auto first = Trainer::Create(c, {(root / "b").string(), false, false});
    ASSERT_TRUE(first.ok());
    ASSERT_TRUE((*first)->Run(/*stop_at_step=*/13).ok());
  }
  auto second = Trainer::Create(c, {(root / "b").string(), false, true});
  ASSERT_TRUE(second.ok());
  auto summary = (*second)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  // It resumed at step 13: a fresh run would also end with the uninterrupted checksum.
  EXPECT_EQ((*second)->resumed_from_step(), 13);
  EXPECT_EQ((*second)->ParamChecksum(), (*straight)->ParamChecksum());
  // The load-balancing loss's average over an evaluation period that the resume splits is the
  // uninterrupted run's (its running sum is in the checkpoint).
  auto a = testing::ReadJsonLines((root / "a" / "metrics.jsonl").string());
  auto b = testing::ReadJsonLines((root / "b" / "metrics.jsonl").string());
  ASSERT_EQ(a.size(), b.size());
  ASSERT_FALSE(a.empty());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(a[i].contains("train_aux_loss")) << a[i];
    EXPECT_EQ(a[i]["train_aux_loss"].get<double>(), b[i]["train_aux_loss"].get<double>()) << i;
    EXPECT_EQ(a[i]["train_loss"].get<double>(), b[i]["train_loss"].get<double>()) << i;
  }
  fs::remove_all(root);
  fs::remove_all(data);
}

}  // namespace
}  // namespace mat::trainer
