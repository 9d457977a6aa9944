// VGG with filter groups as modules: forward shapes for both configurations and both input
// kinds; the partition covers exactly the conv kernels and BatchNorm affine slices; the masked
// convolution matches a plain LibTorch reference (conv2d + batch_norm on the concatenated
// weights) in outputs and gradients (relative difference <= 1e-5 in float32); a masked-off group
// gets no gradient and no optimizer update (MaskedSgd and MaskedAdamW) while the others train;
// the FLOP counter against a hand count, and masked weight-gradient FLOPs equal the sum over the
// active groups; the probe forward (SetRecorder) gives the eval logits, and the gram estimator
// on its sites agrees with the exact estimator.
#include "trainer/models/vgg.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <numeric>
#include <random>
#include <map>
#include <set>

#include <ATen/record_function.h>

#include "spectral/estimator.h"
#include "trainer/data/image_data.h"
#include "trainer/optim/optimizer.h"
#include "trainer/optim/sgd.h"

namespace mat::trainer {
namespace {

using ::testing::HasSubstr;

const std::string kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-6);
}

VggConfig Small(const std::string& arch, int64_t in_channels, int64_t size) {
  VggConfig c;
  c.arch = arch;
  c.width = 0.125;  // 8 ... 64 channels
  c.in_channels = in_channels;
  c.image_size = size;
  c.filter_groups = 2;
  return c;
}

struct ShapeCase {
  std::string arch;
  int64_t channels, size;
  int64_t conv_layers;
  int64_t hidden;
};

class VggShapeTest : public ::testing::TestWithParam<ShapeCase> {};

TEST_P(VggShapeTest, ForwardGivesTenLogitsAndPoolsDownToOnePixel) {
  const ShapeCase p = GetParam();
  VggConfig c = Small(p.arch, p.channels, p.size);
  c.classifier_hidden = p.hidden;
  ASSERT_TRUE(ValidateVggConfig(c).ok());
  torch::manual_seed(1);
  Vgg model(c);
  ASSERT_EQ(int64_t(model->convs.size()), p.conv_layers);
  EXPECT_EQ(model->num_modules(), p.conv_layers * 2);
  const auto shapes = VggConvShapes(c);
  EXPECT_EQ(shapes.front().height, p.size);
  EXPECT_EQ(shapes.front().in_channels, p.channels);
  EXPECT_EQ(shapes.back().out_channels, 64);
  EXPECT_EQ(shapes.back().height, 2) << "the last pool takes 2x2 to 1x1";
  EXPECT_TRUE(shapes.back().pool_after);
  EXPECT_EQ(std::count_if(shapes.begin(), shapes.end(), [](auto& s) { return s.pool_after; }), 5);
  model->train();
  torch::Tensor logits = model->forward(torch::randn({3, p.channels, p.size, p.size}));
  EXPECT_EQ(logits.sizes(), torch::IntArrayRef({3, 10}));
  EXPECT_EQ(logits.scalar_type(), torch::kFloat);
  model->eval();
  torch::NoGradGuard no_grad;
  EXPECT_EQ(model->forward(torch::randn({2, p.channels, p.size, p.size})).sizes(),
            torch::IntArrayRef({2, 10}));
}

INSTANTIATE_TEST_SUITE_P(
    ConfigsAndInputs, VggShapeTest,
    ::testing::Values(ShapeCase{"vgg11", 1, 28, 8, 0}, ShapeCase{"vgg11", 3, 32, 8, 32},
                      ShapeCase{"vgg16", 1, 28, 13, 32}, ShapeCase{"vgg16", 3, 32, 13, 0}),
    [](const auto& info) {
      return info.param.arch + "_" + std::to_string(info.param.channels) + "x" +
             std::to_string(info.param.size) + (info.param.hidden ? "_hidden" : "");
    });

TEST(VggConfigTest, SpatialSizesUseCeilPoolingFor28) {
  const auto shapes = VggConvShapes(Small("vgg11", 1, 28));
  std::vector<int64_t> sizes;
  for (const auto& s : shapes) sizes.push_back(s.height);
  EXPECT_EQ(sizes, std::vector<int64_t>({28, 14, 7, 7, 4, 4, 2, 2}));
}

TEST(VggConfigTest, ValidationNamesTheField) {
  VggConfig c = Small("vgg13", 3, 32);
  EXPECT_THAT(std::string(ValidateVggConfig(c).message()), HasSubstr("vgg.arch"));
  c = Small("vgg11", 3, 32);
  c.width = 0;
  EXPECT_THAT(std::string(ValidateVggConfig(c).message()), HasSubstr("vgg.width"));
  c = Small("vgg11", 3, 32);
  c.filter_groups = 9;  // the first layer has 8 channels at width 1/8
  EXPECT_EQ(ValidateVggConfig(c).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ValidateVggConfig(c).message()),
              HasSubstr("vgg.filter_groups: 9 is outside [1, 8]"));
  c.filter_groups = 0;
  EXPECT_FALSE(ValidateVggConfig(c).ok());
  EXPECT_THROW(Vgg{c}, c10::Error);
  EXPECT_EQ(VggGroupSizes(10, 4), std::vector<int64_t>({3, 3, 2, 2}));
}

TEST(VggPartitionTest, CoversExactlyTheConvKernelsAndBatchNormSlices) {
  VggConfig c = Small("vgg16", 3, 32);
  c.width = 0.15;  // 10, 19, 38, 77 channels: uneven groups
  c.filter_groups = 3;
  c.classifier_hidden = 16;
  Vgg model(c);
  spectral::ModulePartition part = model->Partition();
  ASSERT_EQ(part.size(), 13 * 3);
  EXPECT_EQ(part.GroupSize("filters"), 39);
  std::set<const void*> in_partition;
  for (int m = 0; m < part.size(); ++m) {
    const auto& spec = part.modules[m];
    EXPECT_EQ(spec.layer, m / 3);
    EXPECT_EQ(spec.index, m % 3);
    EXPECT_EQ(spec.name, "conv" + std::to_string(m / 3) + ".filters" + std::to_string(m % 3));
    ASSERT_EQ(spec.params.size(), 3u);
    const int64_t channels = spec.params[0].value().size(0);
    EXPECT_EQ(spec.params[1].value().sizes(), torch::IntArrayRef({channels}));
    EXPECT_EQ(spec.params[2].value().sizes(), torch::IntArrayRef({channels}));
    for (const auto& t : spec.params) {
      in_partition.insert(t.param.unsafeGetTensorImpl());
      // The groups of a layer are consecutive row blocks of its three tensors.
      EXPECT_EQ(t.begin, m % 3 == 0 ? 0 : part.modules[m - 1].params[0].end) << spec.name;
      if (m % 3 == 2) {
        EXPECT_EQ(t.end, t.param.size(0)) << spec.name;
      }
    }
  }
  int64_t conv_params = 0;
  for (const auto& kv : model->named_parameters()) {
    const bool is_conv = kv.key().rfind("conv", 0) == 0;
    EXPECT_EQ(in_partition.count(kv.value().unsafeGetTensorImpl()), is_conv ? 1u : 0u) << kv.key();
    if (is_conv) conv_params += kv.value().numel();
  }
  EXPECT_EQ(in_partition.size(), 13u * 3);  // w, gamma, beta of each conv layer
  EXPECT_EQ(in_partition.size(), model->named_parameters().size() - 4);  // fc1, fc2: w, b
  EXPECT_EQ(part.NumParams(), conv_params);
  // Every output channel of every layer is in exactly one group.
  for (size_t l = 0; l < model->convs.size(); ++l) {
    int64_t sum = 0;
    for (int g = 0; g < 3; ++g) sum += part.modules[l * 3 + g].params[0].value().size(0);
    EXPECT_EQ(sum, model->shapes()[l].out_channels) << "layer " << l;
  }
}

// The same network in plain LibTorch ops on the model's own leaves: conv2d over the kernels,
// batch_norm with the affine vectors (running statistics on copies), ReLU, ceil-mode pooling,
// the classifier.
torch::Tensor ReferenceForward(Vgg& model, const torch::Tensor& images) {
  torch::Tensor x = images;
  for (size_t l = 0; l < model->convs.size(); ++l) {
    auto& conv = model->convs[l];
    x = torch::conv2d(x, conv->w, {}, 1, 1);
    torch::Tensor rm = conv->running_mean.clone(), rv = conv->running_var.clone();
    x = torch::relu(torch::batch_norm(x, conv->gamma, conv->beta, rm, rv, true, 0.1, 1e-5, false));
    if (model->shapes()[l].pool_after) x = torch::max_pool2d(x, 2, 2, 0, 1, true);
  }
  x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
  x = model->fc1(x);
  if (model->fc2) x = model->fc2(torch::relu(x));
  return x;
}

class VggMaskTest : public ::testing::Test {
 protected:
  void SetUp() override {
    c_ = Small("vgg11", 1, 28);
    c_.width = 0.1;  // 6, 13, 26, 51 channels: uneven groups
    c_.filter_groups = 3;
    torch::manual_seed(5);
    model_ = Vgg(c_);
    model_->train();
    images_ = torch::randn({4, 1, 28, 28});
    labels_ = torch::tensor({1, 7, 3, 9}, torch::kLong);
  }

  // Loss backward under `mask` through the model's masked path; returns d loss / d images.
  torch::Tensor Backward(const std::vector<uint8_t>& mask) {
    model_->SetMask(mask);
    torch::Tensor x = images_.clone().requires_grad_(true);
    torch::nn::functional::cross_entropy(model_->forward(x), labels_).backward();
    return x.grad();
  }

  std::vector<uint8_t> Mask(const std::vector<int>& off) {
    std::vector<uint8_t> m(model_->num_modules(), 1);
    for (int i : off) m[i] = 0;
    return m;
  }

  VggConfig c_;
  Vgg model_{nullptr};
  torch::Tensor images_, labels_;
};

TEST_F(VggMaskTest, MatchesThePlainLibTorchNetworkInOutputsAndGradients) {
  torch::Tensor x_ref = images_.clone().requires_grad_(true);
  torch::Tensor ref_logits = ReferenceForward(model_, x_ref);
  torch::nn::functional::cross_entropy(ref_logits, labels_).backward();
  std::vector<torch::Tensor> ref_grads;
  for (auto& p : model_->parameters()) {
    ref_grads.push_back(p.grad().clone());
    p.mutable_grad().reset();
  }
  model_->SetMask(Mask({}));
  EXPECT_LE(RelDiff(model_->forward(images_).detach(), ref_logits.detach()), 1e-6);
  torch::Tensor x_grad = Backward(Mask({}));
  EXPECT_LE(RelDiff(x_grad, x_ref.grad()), 1e-5);
  auto params = model_->named_parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    ASSERT_TRUE(params[i].value().grad().defined()) << params[i].key();
    EXPECT_LE(RelDiff(params[i].value().grad(), ref_grads[i]), 1e-5) << params[i].key();
  }
}

TEST_F(VggMaskTest, MaskedGroupsGetNoGradientAndTheOthersTheUnmaskedOne) {
  Backward(Mask({}));
  std::vector<torch::Tensor> full;
  for (auto& p : model_->parameters()) {
    full.push_back(p.grad().clone());
    p.mutable_grad().reset();
  }
  // Layer 0 group 0, all of layer 2, the last group of the last layer.
  const int last = model_->num_modules() - 1;
  const std::vector<uint8_t> mask = Mask({0, 6, 7, 8, last});
  torch::Tensor x_grad_masked = Backward(mask);
  spectral::ModulePartition part = model_->Partition();
  auto params = model_->named_parameters();
  std::map<const void*, size_t> index_of;
  for (size_t i = 0; i < params.size(); ++i) index_of[params[i].value().unsafeGetTensorImpl()] = i;
  int masked_slices = 0;
  for (int m = 0; m < part.size(); ++m) {
    for (const auto& t : part.modules[m].params) {
      SCOPED_TRACE(part.modules[m].name);
      const torch::Tensor g = t.grad();
      if (!mask[m]) {
        ++masked_slices;
        EXPECT_TRUE(!g.defined() || g.abs().max().item<double>() == 0.0)
            << "masked but its gradient was computed";
      } else {
        ASSERT_TRUE(g.defined());
        const torch::Tensor& f = full[index_of.at(t.param.unsafeGetTensorImpl())];
        EXPECT_LE(RelDiff(g, f.narrow(0, t.begin, t.end - t.begin)), 1e-5);
      }
    }
  }
  ASSERT_EQ(masked_slices, 15);
  // Layer 2 is masked whole: its tensors get no gradient at all. The classifier gets its own.
  for (const auto& kv : model_->convs[2]->named_parameters()) {
    EXPECT_FALSE(kv.value().grad().defined()) << kv.key();
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].key().rfind("fc", 0) != 0) continue;
    ASSERT_TRUE(params[i].value().grad().defined()) << params[i].key();
    EXPECT_LE(RelDiff(params[i].value().grad(), full[i]), 1e-5) << params[i].key();
  }
  // Activation gradients still pass through masked groups.
  model_->zero_grad();
  for (auto& p : model_->parameters()) p.mutable_grad().reset();
  EXPECT_LE(RelDiff(x_grad_masked, Backward(Mask({}))), 1e-5);
}

// Every aten::convolution_backward call while a ConvBackwardLog is alive: the channels of its
// output gradient and which gradients it was asked for (output_mask: input, weight, bias).
struct ConvBackwardCall {
  int64_t channels;
  bool input, weight;
};
std::mutex g_log_mu;
std::vector<ConvBackwardCall>* g_log = nullptr;

std::unique_ptr<at::ObserverContext> LogConvBackward(const at::RecordFunction& fn) {
  if (std::strcmp(fn.name(), "aten::convolution_backward") != 0) return nullptr;
  auto in = fn.inputs();
  if (in.size() < 11) return nullptr;
  c10::List<bool> mask = in[10].toBoolList();
  std::lock_guard<std::mutex> lock(g_log_mu);
  if (g_log) g_log->push_back({in[0].toTensor().size(1), mask.get(0), mask.get(1)});
  return nullptr;
}

class ConvBackwardLog {
 public:
  ConvBackwardLog() {
    std::lock_guard<std::mutex> lock(g_log_mu);
    g_log = &calls_;
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(LogConvBackward).needsInputs(true));
  }
  ~ConvBackwardLog() {
    at::removeCallback(handle_);
    std::lock_guard<std::mutex> lock(g_log_mu);
    g_log = nullptr;
  }
  const std::vector<ConvBackwardCall>& calls() const { return calls_; }

 private:
  std::vector<ConvBackwardCall> calls_;
  at::CallbackHandle handle_;
};

// What DESIGN §3 asks of a masked-off module, measured on the operators that run: kernel
// gradients are formed for the active groups' output channels only (one call per contiguous run
// of active groups), and a layer's input gradient only when something before it trains.
TEST_F(VggMaskTest, BackwardComputesKernelGradientsOfActiveChannelsOnly) {
  const int G = 3, L = int(model_->convs.size());
  auto expect = [&](const std::vector<uint8_t>& mask, int64_t input_grad_calls) {
    int64_t active_channels = 0, runs = 0;
    for (int l = 0; l < L; ++l) {
      const auto sizes = VggGroupSizes(model_->shapes()[l].out_channels, G);
      for (int g = 0; g < G; ++g) {
        if (!mask[l * G + g]) continue;
        active_channels += sizes[g];
        if (g == 0 || !mask[l * G + g - 1]) ++runs;
      }
    }
    for (auto& p : model_->parameters()) p.mutable_grad().reset();
    model_->SetMask(mask);
    ConvBackwardLog log;
    torch::nn::functional::cross_entropy(model_->forward(images_), labels_).backward();
    int64_t weight_calls = 0, weight_channels = 0, input_calls = 0;
    for (const auto& c : log.calls()) {
      EXPECT_NE(c.input, c.weight) << "input and kernel gradients are separate calls";
      if (c.weight) {
        ++weight_calls;
        weight_channels += c.channels;
      }
      if (c.input) ++input_calls;
    }
    EXPECT_EQ(weight_channels, active_channels);
    EXPECT_EQ(weight_calls, runs);
    EXPECT_EQ(input_calls, input_grad_calls);
  };
  ASSERT_NO_FATAL_FAILURE(expect(Mask({}), L - 1));  // the image needs no gradient
  // Layer 0 group 0, all of layer 2 and the last group off: runs {1,2}, {0,1,2} x4, {0,1}, ...
  expect(Mask({0, 6, 7, 8, L * G - 1}), L - 1);
  // Layers 0 and 1 off: no input gradient for layers 0..2.
  expect(Mask({0, 1, 2, 3, 4, 5}), L - 3);
  expect(std::vector<uint8_t>(L * G, 0), 0);
}

TEST_F(VggMaskTest, EverythingMaskedTrainsOnlyTheClassifier) {
  std::vector<uint8_t> none(model_->num_modules(), 0);
  Backward(none);
  for (const auto& kv : model_->named_parameters()) {
    EXPECT_EQ(kv.value().grad().defined(), kv.key().rfind("fc", 0) == 0) << kv.key();
  }
}

TEST_F(VggMaskTest, BatchNormRunningStatisticsUpdateForMaskedGroupsToo) {
  torch::Tensor before = model_->convs[0]->running_mean.clone();
  model_->SetMask(Mask({0, 1, 2}));  // all of layer 0
  torch::NoGradGuard no_grad;
  model_->forward(images_);
  EXPECT_FALSE(model_->convs[0]->running_mean.equal(before));
  EXPECT_TRUE(model_->convs[0]->running_mean.ne(before).all().item<bool>());
}

TEST_F(VggMaskTest, MaskedGroupsKeepTheirWeightsAndOptimizerStateUnderSgdAndAdamW) {
  spectral::ModulePartition part = model_->Partition();
  std::vector<ParamEntry> entries = BuildParamEntries(*model_, part);
  MaskedSgd sgd(entries, SgdOptions{});
  MaskedAdamW adamw(entries, AdamWOptions{});
  // One full step so every tensor has optimizer state, then three steps with groups masked.
  for (int opt = 0; opt < 2; ++opt) {
    auto step = [&](const std::vector<uint8_t>& mask) {
      Backward(mask);
      return opt == 0 ? sgd.Step(0.05, mask, {}) : adamw.Step(1e-3, mask, {});
    };
    ASSERT_TRUE(step(Mask({})).ok());
    std::vector<torch::Tensor> params, state1, state2;
    for (size_t i = 0; i < entries.size(); ++i) {
      params.push_back(entries[i].param.detach().clone());
      state1.push_back(opt == 0 ? sgd.momentum_buffer(i).clone() : adamw.exp_avg(i).clone());
      state2.push_back(opt == 0 ? sgd.momentum_buffer(i).clone() : adamw.exp_avg_sq(i).clone());
    }
    const std::vector<uint8_t> mask = Mask({1, 3, 4, 5, 10});
    for (int s = 0; s < 3; ++s) ASSERT_TRUE(step(mask).ok()) << "optimizer " << opt;
    int off_seen = 0;
    for (size_t i = 0; i < entries.size(); ++i) {
      const std::vector<ParamSegment> segments = entries[i].Segments();
      for (size_t k = 0; k < segments.size(); ++k) {
        const ParamSegment& seg = segments[k];
        SCOPED_TRACE(entries[i].name + " rows " + std::to_string(seg.begin));
        const bool off = seg.module >= 0 && !mask[seg.module];
        off_seen += off;
        auto rows = [&](const torch::Tensor& t) { return t.detach().narrow(0, seg.begin, seg.end - seg.begin); };
        const torch::Tensor& s1 = opt == 0 ? sgd.momentum_buffer(i) : adamw.exp_avg(i);
        const torch::Tensor& s2 = opt == 0 ? sgd.momentum_buffer(i) : adamw.exp_avg_sq(i);
        const int64_t count = opt == 0 ? sgd.step_count(i, k) : adamw.step_count(i, k);
        EXPECT_EQ(rows(entries[i].param).equal(rows(params[i])), off);
        EXPECT_EQ(rows(s1).equal(rows(state1[i])), off);
        EXPECT_EQ(rows(s2).equal(rows(state2[i])), off);
        EXPECT_EQ(count, off ? 1 : 4);
      }
    }
    EXPECT_EQ(off_seen, 5 * 3);
  }
}

// A checkpoint of the per-group leaf layout ("conv<l>.w<g>", "gamma<g>", "beta<g>", one update
// count per tensor), made here from this layout's tensors as the old names were, becomes this
// layout's tensors again, bit for bit.
TEST_F(VggMaskTest, AnOldLeafLayoutCheckpointUpgradesBitForBit) {
  spectral::ModulePartition part = model_->Partition();
  MaskedAdamW adamw(BuildParamEntries(*model_, part), AdamWOptions{});
  for (const auto& mask : {Mask({}), Mask({1, 3, 4, 5, 10})}) {
    Backward(mask);
    ASSERT_TRUE(adamw.Step(1e-3, mask, {}).ok());
  }
  std::map<std::string, torch::Tensor> now;
  for (const auto& kv : model_->named_parameters()) now["model." + kv.key()] = kv.value().detach().clone();
  adamw.Save(&now);
  std::map<std::string, torch::Tensor> old = now;
  const int G = 3;
  for (size_t l = 0; l < model_->convs.size(); ++l) {
    const auto& rows = model_->convs[l]->rows;
    ASSERT_EQ(rows.size(), size_t(G));
    for (const std::string p : {"model.", "opt.m.", "opt.v.", "opt.step."}) {
      for (const std::string part_name : {"w", "gamma", "beta"}) {
        const std::string key = p + "conv" + std::to_string(l) + "." + part_name;
        const torch::Tensor t = old.at(key);
        for (int g = 0; g < G; ++g) {
          old[key + std::to_string(g)] = p == "opt.step." ? t[g].clone()
                                                          : t.narrow(0, rows[g].begin, rows[g].end - rows[g].begin).clone();
        }
        old.erase(key);
      }
    }
  }
  ASSERT_TRUE(old.count("model.conv0.gamma2") && old.count("opt.step.conv3.w1"));
  EXPECT_EQ(UpgradeVggLeafLayout(model_->config(), &old), int(model_->convs.size()) * 4);
  ASSERT_EQ(old.size(), now.size());
  for (const auto& [name, t] : now) {
    ASSERT_TRUE(old.count(name)) << name;
    EXPECT_TRUE(old.at(name).sizes().equals(t.sizes()) && torch::equal(old.at(name), t)) << name;
  }
}

// vgg11, width 1/32 (2, 4, 8, 16 channels), one input channel, 28x28, batch 2, two groups:
//   layer (C_in, C_out, HxW):  (1,2,28²) (2,4,14²) (4,8,7²) (8,8,7²) (8,16,4²) (16,16,4²)
//                              (16,16,2²) (16,16,2²);  classifier 16 -> 10.
//   conv FLOPs = 2·B·9·H·W·C_in·C_out = 36·H·W·C_in·C_out.
TEST(VggFlopsTest, MatchesHandCount) {
  VggConfig c = Small("vgg11", 1, 28);
  c.width = 1.0 / 32;
  const std::vector<double> conv = {36.0 * 784 * 1 * 2,  36.0 * 196 * 2 * 4, 36.0 * 49 * 4 * 8,
                                    36.0 * 49 * 8 * 8,   36.0 * 16 * 8 * 16, 36.0 * 16 * 16 * 16,
                                    36.0 * 4 * 16 * 16,  36.0 * 4 * 16 * 16};
  const double fc = 2.0 * 2 * 16 * 10;
  const double conv_sum = std::accumulate(conv.begin(), conv.end(), 0.0);
  FlopCounts f = VggStepFlops(c, 2, {});
  EXPECT_DOUBLE_EQ(f.forward, conv_sum + fc);
  EXPECT_DOUBLE_EQ(f.activation_grad, conv_sum - conv[0] + fc);  // the image needs no gradient
  EXPECT_DOUBLE_EQ(f.weight_grad, conv_sum + fc);
  EXPECT_DOUBLE_EQ(f.spectral, 0);
  EXPECT_DOUBLE_EQ(f.decoder, 0);
  EXPECT_DOUBLE_EQ(VggForwardFlops(c, 2).total(), f.forward);

  // Layers 0 and 1 off entirely, layer 2's second group off: no input gradient for layers
  // 0..2 (nothing before them trains), weight gradients for layer 2's first half and 3..7.
  std::vector<uint8_t> mask(16, 1);
  for (int m : {0, 1, 2, 3, 5}) mask[m] = 0;
  FlopCounts g = VggStepFlops(c, 2, mask);
  EXPECT_DOUBLE_EQ(g.forward, f.forward);
  EXPECT_DOUBLE_EQ(g.activation_grad, conv_sum - conv[0] - conv[1] - conv[2] + fc);
  EXPECT_DOUBLE_EQ(g.weight_grad, conv_sum - conv[0] - conv[1] - conv[2] / 2 + fc);
  FlopCounts none = VggStepFlops(c, 2, std::vector<uint8_t>(16, 0));
  EXPECT_DOUBLE_EQ(none.weight_grad, fc);
  EXPECT_DOUBLE_EQ(none.activation_grad, 0);
}

TEST(VggFlopsTest, MaskedWeightGradientsAreTheSumOverActiveGroups) {
  VggConfig c = Small("vgg16", 3, 32);
  c.width = 0.3;  // 19, 38, 77, 154 channels: uneven groups
  c.filter_groups = 4;
  c.classifier_hidden = 24;
  const int64_t batch = 5;
  const std::vector<double> per_module = VggModuleWeightGradFlops(c, batch);
  ASSERT_EQ(per_module.size(), 13u * 4);
  const double classifier = VggStepFlops(c, batch, std::vector<uint8_t>(52, 0)).weight_grad;
  EXPECT_DOUBLE_EQ(classifier, 2.0 * batch * (154 * 24 + 24 * 10));
  std::mt19937 rng(3);
  for (int trial = 0; trial < 10; ++trial) {
    std::vector<uint8_t> mask(52);
    double expected = classifier;
    for (size_t m = 0; m < mask.size(); ++m) {
      mask[m] = rng() % 2;
      if (mask[m]) expected += per_module[m];
    }
    EXPECT_NEAR(VggStepFlops(c, batch, mask).weight_grad, expected, 1e-9 * expected);
  }
  const double all = std::accumulate(per_module.begin(), per_module.end(), classifier);
  EXPECT_NEAR(VggStepFlops(c, batch, {}).weight_grad, all, 1e-9 * all);
  EXPECT_NEAR(VggStepFlops(c, batch, {}).weight_grad, VggForwardFlops(c, batch).forward,
              1e-9 * all);
}


// The probe (SetRecorder): on a tiny VGG-11 whose BatchNorm running statistics and affine
// vectors have moved away from their initial values, the recorded forward gives the plain eval
// logits, and the gram estimator's λ_max, trace and effective rank of every filter group agree
// with the exact estimator (explicit per-sample gradients of the leaves through the plain
// forward): relative difference <= 1e-9 in float64 (seen ~1e-15), <= 1e-4 in float32 (~6e-7).
class VggProbeTest : public ::testing::TestWithParam<torch::Dtype> {
 protected:
  void SetUp() override {
    c_ = Small("vgg11", 1, 28);
    c_.width = 1.0 / 16;  // 4, 8, 16, 32 channels
    c_.filter_groups = 2;
    torch::manual_seed(11);
    model_ = Vgg(c_);
    images_ = torch::randn({5, 1, 28, 28});
    labels_ = torch::tensor({0, 3, 3, 8, 1}, torch::kLong);
  }

  // A few SGD steps in training mode under `mask` (BN statistics and affine vectors move).
  void Train(const std::vector<uint8_t>& mask, int steps) {
    model_->train();
    model_->SetMask(mask);
    torch::optim::SGD opt(model_->parameters(), torch::optim::SGDOptions(0.1));
    for (int s = 0; s < steps; ++s) {
      opt.zero_grad();
      torch::Tensor x = torch::randn({8, 1, 28, 28}, images_.options()) + 0.5;
      torch::Tensor y = torch::randint(0, 10, {8}, torch::kLong);
      torch::nn::functional::cross_entropy(model_->forward(x), y).backward();
      opt.step();
    }
    for (auto& p : model_->parameters()) p.mutable_grad().reset();
  }

  // Per-sample cross entropies [n] of the eval forward, recording the sites into `rec` when set.
  spectral::ProbeBatch Probe(spectral::SiteRecorder* rec) {
    model_->eval();
    model_->SetRecorder(rec);
    torch::Tensor logits = model_->forward(images_);
    model_->SetRecorder(nullptr);
    spectral::ProbeBatch b;
    b.losses = torch::nn::functional::cross_entropy(
        logits, labels_, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    if (rec != nullptr) rec->TakeInto(&b);
    return b;
  }

  void ExpectGramMatchesExact(double tol) {
    spectral::ModulePartition part = model_->Partition();
    auto gram = spectral::MakeEstimator("gram");
    auto exact = spectral::MakeEstimator("exact");
    ASSERT_TRUE(gram.ok() && exact.ok());
    spectral::SiteRecorder rec;
    auto g = (*gram)->Estimate(part, Probe(&rec));
    auto e = (*exact)->Estimate(part, Probe(nullptr));
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE(e.ok()) << e.status();
    // Without the BatchNorm sites every module's trace falls short: the test sees that part.
    spectral::ProbeBatch conv_only = Probe(&rec);
    conv_only.scale_shift_sites.clear();
    auto partial = (*gram)->Estimate(part, std::move(conv_only));
    ASSERT_TRUE(partial.ok()) << partial.status();
    ASSERT_EQ(g->modules.size(), size_t(model_->num_modules()));
    double worst = 0;
    for (size_t m = 0; m < g->modules.size(); ++m) {
      SCOPED_TRACE(part.modules[m].name);
      const auto& x = g->modules[m];
      const auto& y = e->modules[m];
      ASSERT_GT(y.lambda_max, 0);
      const double d[3] = {std::abs(x.lambda_max - y.lambda_max) / y.lambda_max,
                           std::abs(x.trace - y.trace) / y.trace,
                           std::abs(x.effective_rank - y.effective_rank) / y.effective_rank};
      for (double v : d) {
        EXPECT_LE(v, tol);
        worst = std::max(worst, v);
      }
      EXPECT_LT(partial->modules[m].trace, (1 - 10 * tol) * y.trace);
    }
    std::cout << "gram vs exact, largest relative difference: " << worst << "\n";
    EXPECT_GT(g->flops, 0);
  }

  double Tolerance() const { return GetParam() == torch::kFloat64 ? 1e-9 : 1e-4; }

  void ToDtype() {
    model_->to(GetParam());
    images_ = images_.to(GetParam());
  }

  VggConfig c_;
  Vgg model_{nullptr};
  torch::Tensor images_, labels_;
};

TEST_P(VggProbeTest, RecordedForwardGivesTheEvalLogitsAndOneSiteOfEachKindPerLayer) {
  Train(std::vector<uint8_t>(model_->num_modules(), 1), 3);
  ToDtype();
  model_->eval();
  torch::Tensor plain = model_->forward(images_).detach();
  spectral::SiteRecorder rec;
  spectral::ProbeBatch b = Probe(&rec);
  model_->SetRecorder(&rec);
  torch::Tensor recorded = model_->forward(images_);
  model_->SetRecorder(nullptr);
  EXPECT_LE(RelDiff(recorded.detach(), plain), GetParam() == torch::kFloat64 ? 1e-12 : 1e-5);
  EXPECT_EQ(recorded.scalar_type(), GetParam());
  // TakeInto emptied the recorder: it holds the second forward's sites only.
  EXPECT_EQ(rec.Take().size(), model_->convs.size());
  EXPECT_EQ(rec.TakeScaleShift().size(), model_->convs.size());
  ASSERT_EQ(b.sites.size(), model_->convs.size());
  ASSERT_EQ(b.scale_shift_sites.size(), model_->convs.size());
  for (size_t l = 0; l < model_->convs.size(); ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const VggConvShape& s = model_->shapes()[l];
    const int64_t hw = s.height * s.width;
    const auto& lin = b.sites[l];
    EXPECT_EQ(lin.input.sizes(), torch::IntArrayRef({5, hw, s.in_channels * 9}));
    EXPECT_EQ(lin.output.sizes(), torch::IntArrayRef({5, hw, s.out_channels}));
    EXPECT_FALSE(lin.input.requires_grad());
    const auto& bn = b.scale_shift_sites[l];
    EXPECT_EQ(bn.input.sizes(), torch::IntArrayRef({5, hw, s.out_channels}));
    EXPECT_EQ(bn.output.sizes(), torch::IntArrayRef({5, hw, s.out_channels}));
    EXPECT_FALSE(bn.input.requires_grad());
    const std::vector<int64_t> sizes = VggGroupSizes(s.out_channels, c_.filter_groups);
    ASSERT_EQ(lin.slices.size(), sizes.size());
    ASSERT_EQ(bn.slices.size(), sizes.size());
    int64_t at = 0;
    for (size_t g = 0; g < sizes.size(); ++g) {
      const int module = int(l * c_.filter_groups + g);
      EXPECT_EQ(lin.slices[g].module, module);
      EXPECT_EQ(lin.slices[g].axis, spectral::SliceAxis::kRows);
      EXPECT_EQ(lin.slices[g].begin, at);
      EXPECT_EQ(lin.slices[g].end, at + sizes[g]);
      EXPECT_FALSE(lin.slices[g].has_bias);
      EXPECT_EQ(bn.slices[g].module, module);
      EXPECT_EQ(bn.slices[g].begin, at);
      EXPECT_EQ(bn.slices[g].end, at + sizes[g]);
      EXPECT_TRUE(bn.slices[g].has_scale && bn.slices[g].has_shift);
      at += sizes[g];
    }
  }
}

TEST_P(VggProbeTest, ThrowsInTrainingMode) {
  spectral::SiteRecorder rec;
  model_->train();
  model_->SetRecorder(&rec);
  try {
    model_->forward(images_);
    ADD_FAILURE() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_THAT(std::string(e.what_without_backtrace()), HasSubstr("eval() mode"));
  }
  model_->SetRecorder(nullptr);
  model_->forward(images_);  // the plain training forward again
}

TEST_P(VggProbeTest, GramMatchesExact) {
  Train(std::vector<uint8_t>(model_->num_modules(), 1), 3);
  ToDtype();
  ExpectGramMatchesExact(Tolerance());
}

// After training with some groups masked off the caller sets every group active for the probe
// (as Trainer::Probe does); the masked groups' kernels are measured like the others'. The
// recorded forward ignores the mask: a probe under the partial mask gives the same spectra.
TEST_P(VggProbeTest, ProbeAfterMaskedTrainingMeasuresEveryGroup) {
  std::vector<uint8_t> mask(model_->num_modules(), 1);
  mask[1] = mask[4] = mask[11] = 0;
  Train(mask, 3);
  ToDtype();
  spectral::SiteRecorder rec;
  auto gram = spectral::MakeEstimator("gram");
  ASSERT_TRUE(gram.ok());
  auto partial = (*gram)->Estimate(model_->Partition(), Probe(&rec));
  ASSERT_TRUE(partial.ok()) << partial.status();
  model_->SetMask(std::vector<uint8_t>(model_->num_modules(), 1));
  ExpectGramMatchesExact(Tolerance());
  auto full = (*gram)->Estimate(model_->Partition(), Probe(&rec));
  ASSERT_TRUE(full.ok()) << full.status();
  for (size_t m = 0; m < full->modules.size(); ++m) {
    EXPECT_GT(full->modules[m].lambda_max, 0) << m;
    EXPECT_DOUBLE_EQ(partial->modules[m].lambda_max, full->modules[m].lambda_max) << m;
  }
}

INSTANTIATE_TEST_SUITE_P(Float64AndFloat32, VggProbeTest,
                         ::testing::Values(torch::kFloat64, torch::kFloat32),
                         [](const auto& info) {
                           return std::string(info.param == torch::kFloat64 ? "Float64"
                                                                            : "Float32");
                         });

TEST(VggTop1Test, CountsArgmaxHits) {
  torch::Tensor logits = torch::tensor({{0.1, 0.9}, {2.0, -1.0}, {0.3, 0.4}});
  EXPECT_EQ(CountTop1Correct(logits, torch::tensor({1, 0, 0}, torch::kLong)), 2);
}

// The pieces together: VGG-11 at width 1/8 with MaskedSgd on 512 Fashion-MNIST training images
// (ImageStream, batch 32, 48 steps ≈ 3 epochs), with every filter group training and with a
// third of them masked off for the whole run; the mean loss of the last 8 steps must fall below
// 60 % of the first 8 steps' in both runs, and the masked groups must end where they started.
TEST(VggTrainingTest, LearnsAFashionMnistSubsetWithAndWithoutMasking) {
  if (!std::filesystem::is_directory(kFashionMnistDir)) {
    GTEST_SKIP() << kFashionMnistDir << " is absent";
  }
  auto full = LoadFashionMnist(kFashionMnistDir, ImageSplit::kTrain);
  ASSERT_TRUE(full.ok()) << full.status();
  const ImageDataset data = SliceImages(*full, 0, 512);
  for (bool masked : {false, true}) {
    torch::manual_seed(21);
    VggConfig c = Small("vgg11", 1, 28);
    Vgg model(c);
    model->train();
    spectral::ModulePartition part = model->Partition();
    std::vector<uint8_t> mask(model->num_modules(), 1);
    if (masked) {
      for (size_t m = 0; m < mask.size(); m += 3) mask[m] = 0;
    }
    model->SetMask(mask);
    std::vector<torch::Tensor> initial;
    for (const auto& spec : part.modules) initial.push_back(spec.params[0].value().detach().clone());
    MaskedSgd opt(BuildParamEntries(*model, part), SgdOptions{});
    ImageStream stream(data, {}, 0, 1, 3);
    std::vector<double> losses;
    for (int step = 0; step < 48; ++step) {
      ImageBatch batch = stream.Next(32);
      torch::Tensor loss =
          torch::nn::functional::cross_entropy(model->forward(batch.images), batch.labels);
      loss.backward();
      ASSERT_TRUE(opt.Step(0.05, mask, {}).ok());
      losses.push_back(loss.item<double>());
    }
    const double first = std::accumulate(losses.begin(), losses.begin() + 8, 0.0) / 8;
    const double last = std::accumulate(losses.end() - 8, losses.end(), 0.0) / 8;
    std::cout << (masked ? "masked" : "full") << ": mean loss " << first << " -> " << last << "\n";
    EXPECT_LT(last, 0.6 * first) << (masked ? "masked" : "full") << ": " << first << " -> " << last;
    for (size_t m = 0; m < mask.size(); ++m) {
      EXPECT_EQ(part.modules[m].params[0].value().detach().equal(initial[m]), !mask[m])
          << part.modules[m].name;
    }
  }
}

}  // namespace
}  // namespace mat::trainer
