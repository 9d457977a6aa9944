// The view layout (trainer/models/bert.h: a layer's heads and FFN slices are row blocks of a few
// tensors) against the per-module leaf layout it replaced, on the same seed: the leaf model here
// holds every head's W_Q, W_K, W_V (with biases) and W_O, and every FFN slice's W_1, b_1, W_2, as
// leaves of their own, runs each head and slice as its own plain LibTorch ops with a masked
// module's leaves detached, and is trained by the masked optimizers over whole-leaf modules. After
// masked steps both give the same losses and parameters (float32 1e-6, float64 1e-10 relative).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "tests/trainer/leaf_layout.h"
#include "tests/trainer/toy_run.h"
#include "trainer/models/bert.h"
#include "trainer/optim/optimizer.h"
#include "trainer/optim/sgd.h"

namespace mat::trainer {
namespace {

namespace F = torch::nn::functional;

double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.detach() - b.detach()).norm().item<double>() /
         std::max(b.detach().norm().item<double>(), 1e-3);
}

// The leaf layout: the modules' parameters as leaves copied from a view model's rows, the rest
// (embeddings, layer norms, W_O's and W_2's biases, the MLM head) from a model of its own.
struct LeafBert {
  struct Head {
    torch::Tensor w[3], b[3], wo;  // [d_h, d], [d_h], [d, d_h]
  };
  struct Slice {
    torch::Tensor w1, b1, w2;  // [f, d], [f], [d, f]
  };
  BertConfig c;
  BertMlm rest{nullptr};
  std::vector<std::vector<Head>> heads;    // [layer][head]
  std::vector<std::vector<Slice>> slices;  // [layer][slice]
  std::vector<ParamEntry> entries;

  LeafBert(const BertConfig& config, BertMlm& view) : c(config) {
    rest = BertMlm(c);
    torch::NoGradGuard no_grad;
    auto src = view->named_parameters();
    for (auto& kv : rest->named_parameters()) kv.value().copy_(src[kv.key()]);
    const int64_t dh = c.d_model / c.heads, H = c.heads, G = c.ffn_groups;
    auto leaf = [](const torch::Tensor& rows) { return rows.clone().requires_grad_(true); };
    for (int64_t l = 0; l < c.layers; ++l) {
      BertLayerImpl& v = *view->layers[l];
      heads.emplace_back();
      for (int64_t h = 0; h < H; ++h) {
        Head hd;
        for (int k = 0; k < 3; ++k) {
          hd.w[k] = leaf(v.qkv_w.narrow(0, 3 * dh * h + dh * k, dh));
          hd.b[k] = leaf(v.qkv_b.narrow(0, 3 * dh * h + dh * k, dh));
          entries.push_back({Name(l, "w", h, k), hd.w[k], int(l * H + h), true, {}});
          entries.push_back({Name(l, "b", h, k), hd.b[k], int(l * H + h), false, {}});
        }
        hd.wo = leaf(v.o_w_t.narrow(0, dh * h, dh).t());
        entries.push_back({Name(l, "wo", h, 0), hd.wo, int(l * H + h), true, {}});
        heads.back().push_back(hd);
      }
      slices.emplace_back();
      const int64_t f = c.d_ff / G;
      for (int64_t g = 0; g < G; ++g) {
        Slice s{leaf(v.ff1_w.narrow(0, f * g, f)), leaf(v.ff1_b.narrow(0, f * g, f)),
                leaf(v.ff2_w_t.narrow(0, f * g, f).t())};
        const int m = int(c.layers * H + l * G + g);
        entries.push_back({Name(l, "w1_", g, 0), s.w1, m, true, {}});
        entries.push_back({Name(l, "b1_", g, 0), s.b1, m, false, {}});
        entries.push_back({Name(l, "w2_", g, 0), s.w2, m, true, {}});
        slices.back().push_back(s);
      }
    }
    // Everything outside the modules is shared; the view tensors of `rest` are unused.
    for (const auto& kv : rest->named_parameters()) {
      const std::string& n = kv.key();
      if (n.find("wqkv") != std::string::npos || n.find("bqkv") != std::string::npos ||
          n.find("wo_t") != std::string::npos || n.find("wff1") != std::string::npos ||
          n.find("bff1") != std::string::npos || n.find("wff2_t") != std::string::npos) {
        continue;
      }
      entries.push_back({n, kv.value(), -1, kv.value().dim() >= 2, {}});
    }
  }

  static std::string Name(int64_t l, const char* what, int64_t i, int k) {
    return "layer" + std::to_string(l) + "." + what + std::to_string(i) + "." + std::to_string(k);
  }

  // The old forward: every head and slice on its own; a masked module's leaves detached.
  torch::Tensor Forward(const torch::Tensor& ids, const torch::Tensor& positions,
                        const std::vector<uint8_t>& active) {
    const int64_t B = ids.size(0), T = ids.size(1), H = c.heads, G = c.ffn_groups;
    const double dh = double(c.d_model / c.heads);
    auto on = [](const torch::Tensor& t, bool a) { return a ? t : t.detach(); };
    torch::Tensor x = rest->tok_emb(ids) + rest->pos_emb(torch::arange(T, ids.options())).unsqueeze(0);
    x = rest->emb_ln(x);
    for (int64_t l = 0; l < c.layers; ++l) {
      BertLayerImpl& layer = *rest->layers[l];
      torch::Tensor attn = layer.o_b;
      for (int64_t h = 0; h < H; ++h) {
        const Head& hd = heads[l][h];
        const bool a = active[l * H + h] != 0;
        auto lin = [&](int k) { return F::linear(x, on(hd.w[k], a), on(hd.b[k], a)); };
        torch::Tensor p = torch::softmax(torch::matmul(lin(0), lin(1).transpose(1, 2)) / std::sqrt(dh), -1);
        attn = attn + F::linear(torch::matmul(p, lin(2)), on(hd.wo, a));
      }
      torch::Tensor h1 = layer.ln1(x + attn);
      torch::Tensor ffn = layer.ff2_b;
      for (int64_t g = 0; g < G; ++g) {
        const Slice& s = slices[l][g];
        const bool a = active[c.layers * H + l * G + g] != 0;
        ffn = ffn + F::linear(F::gelu(F::linear(h1, on(s.w1, a), on(s.b1, a))), on(s.w2, a));
      }
      x = layer.ln2(h1 + ffn);
    }
    torch::Tensor h = x.reshape({B * T, c.d_model}).index_select(0, positions);
    h = rest->head_ln(F::gelu(rest->head_dense(h)));
    return F::linear(h, rest->tok_emb->weight, rest->decoder_bias);
  }
};

struct Case {
  torch::Dtype dtype;
  bool sgd;  // MaskedSgd, else MaskedAdamW
  int steps;
  double tol;
};

class ViewLayoutTest : public ::testing::TestWithParam<Case> {};

TEST_P(ViewLayoutTest, MaskedTrainingEqualsTheLeafLayout) {
  const BertConfig c = testing::MaskingTestConfig();
  const double tol = GetParam().tol;
  torch::manual_seed(7);
  BertMlm view(c);
  view->to(GetParam().dtype);
  LeafBert leaves(c, view);
  leaves.rest->to(GetParam().dtype);
  const int modules = view->num_modules();
  ASSERT_EQ(modules, 2 * 4 + 2 * 2);
  auto train = [&](auto& view_opt, auto& leaf_opt) {
    torch::manual_seed(8);
    for (int step = 0; step < GetParam().steps; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      const torch::Tensor ids = torch::randint(0, 40, {4, 8}, torch::kLong);
      const torch::Tensor positions = torch::tensor({1, 5, 9, 14, 20, 27, 31}, torch::kLong);
      const torch::Tensor labels = torch::randint(0, 40, {7}, torch::kLong);
      std::vector<uint8_t> mask(modules);
      for (int m = 0; m < modules; ++m) mask[m] = (m * 7 + step * 3) % 5 != 0;  // 1 in 5 off
      if (step == 0) mask.assign(modules, 1);
      view->SetMask(mask);
      torch::Tensor lv = F::cross_entropy(view->forward(ids, positions), labels);
      torch::Tensor ll = F::cross_entropy(leaves.Forward(ids, positions, mask), labels);
      EXPECT_LE(std::abs(lv.item<double>() - ll.item<double>()), tol * std::abs(ll.item<double>()));
      lv.backward();
      ll.backward();
      const std::vector<double> ones(modules, 1.0);
      ASSERT_TRUE(view_opt.Step(1e-2, mask, ones).ok());
      ASSERT_TRUE(leaf_opt.Step(1e-2, mask, ones).ok());
    }
  };
  if (GetParam().sgd) {
    SgdOptions o;
    o.weight_decay = 0.01;
    MaskedSgd view_opt(BuildParamEntries(*view, view->Partition()), o);
    MaskedSgd leaf_opt(leaves.entries, o);
    train(view_opt, leaf_opt);
  } else {
    MaskedAdamW view_opt(BuildParamEntries(*view, view->Partition()), {});
    MaskedAdamW leaf_opt(leaves.entries, {});
    train(view_opt, leaf_opt);
  }
  // Every parameter: the view tensors' rows against the leaves, the rest against the rest.
  const int64_t dh = c.d_model / c.heads, f = c.d_ff / c.ffn_groups;
  int compared = 0;
  for (int64_t l = 0; l < c.layers; ++l) {
    const BertLayerImpl& v = *view->layers[l];
    for (int64_t h = 0; h < c.heads; ++h) {
      SCOPED_TRACE("layer " + std::to_string(l) + " head " + std::to_string(h));
      const LeafBert::Head& hd = leaves.heads[l][h];
      for (int k = 0; k < 3; ++k) {
        EXPECT_LE(RelDiff(v.qkv_w.narrow(0, 3 * dh * h + dh * k, dh), hd.w[k]), tol) << k;
        // Key biases: softmax is invariant to q·b_k, so their gradient is float round-off that
        // Adam's normalisation turns into ±lr steps; not comparable.
        if (k != 1) {
          EXPECT_LE(RelDiff(v.qkv_b.narrow(0, 3 * dh * h + dh * k, dh), hd.b[k]), tol) << k;
        }
      }
      EXPECT_LE(RelDiff(v.o_w_t.narrow(0, dh * h, dh).t(), hd.wo), tol);
      compared += 6;
    }
    for (int64_t g = 0; g < c.ffn_groups; ++g) {
      SCOPED_TRACE("layer " + std::to_string(l) + " slice " + std::to_string(g));
      const LeafBert::Slice& s = leaves.slices[l][g];
      EXPECT_LE(RelDiff(v.ff1_w.narrow(0, f * g, f), s.w1), tol);
      EXPECT_LE(RelDiff(v.ff1_b.narrow(0, f * g, f), s.b1), tol);
      EXPECT_LE(RelDiff(v.ff2_w_t.narrow(0, f * g, f).t(), s.w2), tol);
      compared += 3;
    }
  }
  auto rest = leaves.rest->named_parameters();
  for (const ParamEntry& e : leaves.entries) {
    if (e.module >= 0) continue;
    SCOPED_TRACE(e.name);
    EXPECT_LE(RelDiff(view->named_parameters()[e.name], rest[e.name]), tol);
    ++compared;
  }
  EXPECT_EQ(compared, 2 * (4 * 6 + 2 * 3) + 21);
}

// float32 at 1e-6 with SGD (momentum, weight decay); AdamW in float64 at 1e-10: in float32, Adam's
// first steps move every element by about ±lr whatever its gradient's size, so an element whose
// gradient is round-off level moves either way, and the two float32 runs differ by up to 2e-5
// (measured), for reasons of float rounding, not layout. Both optimizers at float64 too.
INSTANTIATE_TEST_SUITE_P(Float32AndFloat64, ViewLayoutTest,
                         ::testing::Values(Case{torch::kFloat, true, 6, 1e-6},
                                           Case{torch::kDouble, true, 6, 1e-10},
                                           Case{torch::kDouble, false, 6, 1e-10}));

// A checkpoint's model and optimizer tensors after masked steps, as Trainer::Save keeps them.
std::map<std::string, torch::Tensor> TrainedCheckpointTensors(const BertConfig& c) {
  torch::manual_seed(3);
  BertMlm model(c);
  MaskedAdamW opt(BuildParamEntries(*model, model->Partition()), {});
  for (int step = 0; step < 3; ++step) {
    std::vector<uint8_t> mask(model->num_modules(), 1);
    mask[step % mask.size()] = 0;
    model->SetMask(mask);
    const torch::Tensor ids = torch::randint(0, 40, {4, 8}, torch::kLong);
    F::cross_entropy(model->forward(ids, torch::tensor({1, 9, 20}, torch::kLong)),
                     torch::randint(0, 40, {3}, torch::kLong))
        .backward();
    EXPECT_TRUE(opt.Step(1e-2, mask, {}).ok());
  }
  std::map<std::string, torch::Tensor> t;
  for (const auto& kv : model->named_parameters()) t["model." + kv.key()] = kv.value().detach().clone();
  opt.Save(&t);
  return t;
}

void ExpectSameTensors(const std::map<std::string, torch::Tensor>& a,
                       const std::map<std::string, torch::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : b) {
    ASSERT_TRUE(a.count(name)) << name;
    EXPECT_TRUE(a.at(name).sizes().equals(t.sizes()) && torch::equal(a.at(name), t)) << name;
  }
}

TEST(UpgradeLeafLayoutTest, AnOldCheckpointBecomesThisLayoutBitForBit) {
  for (int64_t groups : {2, 0}) {
    SCOPED_TRACE("ffn_groups " + std::to_string(groups));
    BertConfig c = testing::MaskingTestConfig();
    c.ffn_groups = groups;
    const std::map<std::string, torch::Tensor> now = TrainedCheckpointTensors(c);
    std::map<std::string, torch::Tensor> old = testing::ToLeafLayout(c, now);
    ASSERT_TRUE(old.count("model.layer1.wq3") && old.count("opt.step.layer0.wff2_0"));
    EXPECT_EQ(UpgradeLeafLayout(c, &old), 2 * 4);  // two layers under four prefixes
    ExpectSameTensors(old, now);
    EXPECT_EQ(UpgradeLeafLayout(c, &old), 0) << "nothing left to rewrite";
  }
}

TEST(UpgradeLeafLayoutTest, SwitchExpertsAreStackedBack) {
  BertConfig c = testing::MaskingTestConfig();
  c.ffn_groups = 0;
  c.experts = 4;
  c.moe_every = 2;  // layer 0 has experts, layer 1 a dense FFN
  const std::map<std::string, torch::Tensor> now = TrainedCheckpointTensors(c);
  std::map<std::string, torch::Tensor> old = testing::ToLeafLayout(c, now);
  ASSERT_TRUE(old.count("model.layer0.moe.expert3_w2") && old.count("opt.step.layer0.moe.expert0_b1"));
  EXPECT_EQ(UpgradeLeafLayout(c, &old), 2 * 4 + 4);  // attention of 2 layers, experts of 1
  ExpectSameTensors(old, now);
}

TEST(UpgradeLeafLayoutTest, AnIncompleteLayerIsLeftForTheLoaderToReport) {
  const BertConfig c = testing::MaskingTestConfig();
  std::map<std::string, torch::Tensor> old = testing::ToLeafLayout(c, TrainedCheckpointTensors(c));
  old.erase("model.layer1.wk2");
  UpgradeLeafLayout(c, &old);
  EXPECT_EQ(old.count("model.layer1.wqkv"), 0u);
  EXPECT_EQ(old.count("model.layer1.wq2"), 1u) << "the incomplete group is kept as it was";
  EXPECT_EQ(old.count("model.layer0.wqkv"), 1u);
  EXPECT_EQ(old.count("model.layer1.wo_t"), 1u) << "W_O of layer 1 is complete";
}

}  // namespace
}  // namespace mat::trainer
