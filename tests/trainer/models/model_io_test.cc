// trainer/models/model_io.h: a model's weights to safetensors and back (BERT with FFN slices, VGG with
// its BatchNorm statistics), and every refusal naming the file and the tensor.
#include "trainer/models/model_io.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "safetensors/safetensors.h"
#include "trainer/models/bert.h"
#include "trainer/models/vgg.h"
#include "tests/testing/temp_dir.h"
#include "tests/trainer/leaf_layout.h"

namespace mat::trainer {
namespace {

using ::testing::HasSubstr;

class ModelIoTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_model_io"};  // outlives the members below

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok()) << "cannot create a temporary directory";
    dir_ = tmp_.path();
    c_.vocab_size = 50;
    c_.max_seq_len = 16;
    c_.layers = 2;
    c_.d_model = 32;
    c_.heads = 4;
    c_.d_ff = 64;
    c_.ffn_groups = 2;
  }

  static std::string Shape(c10::IntArrayRef shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }

  static void ExpectSameState(torch::nn::Module& a, torch::nn::Module& b) {
    auto pa = a.named_parameters(), pb = b.named_parameters();
    ASSERT_EQ(pa.size(), pb.size());
    for (const auto& kv : pa) {
      EXPECT_TRUE(torch::equal(kv.value(), pb[kv.key()])) << kv.key();
    }
    auto ba = a.named_buffers(), bb = b.named_buffers();
    ASSERT_EQ(ba.size(), bb.size());
    for (const auto& kv : ba) EXPECT_TRUE(torch::equal(kv.value(), bb[kv.key()])) << kv.key();
  }

  std::string dir_;
  BertConfig c_;
};

TEST_F(ModelIoTest, BertRoundTripsAndTheFileIsPlainSafetensors) {
  torch::manual_seed(1);
  BertMlm a(c_);
  torch::manual_seed(2);
  BertMlm b(c_);
  ASSERT_FALSE(torch::equal(a->named_parameters()["tok_emb.weight"],
                            b->named_parameters()["tok_emb.weight"]));
  const std::string path = dir_ + "/model.safetensors";
  ASSERT_TRUE(SaveModelSafetensors(*a, path, {{"format", "pt"}, {"step", "7"}}).ok());
  ASSERT_TRUE(LoadModelSafetensors(*b, path).ok());
  ExpectSameState(*a, *b);

  // The file as any reader sees it: every parameter by its own name, F32, the metadata.
  auto file = safetensors::ReadFile(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata.at("step"), "7");
  EXPECT_EQ(file->tensors.size(), a->named_parameters().size() + a->named_buffers().size());
  for (const auto& kv : a->named_parameters()) {
    const auto& t = file->tensors.at(kv.key());
    EXPECT_EQ(t.dtype, safetensors::DType::kF32);
    EXPECT_TRUE(kv.value().sizes().equals(t.shape)) << kv.key();
    torch::Tensor v = kv.value().detach().contiguous();
    EXPECT_EQ(t.data, std::string(static_cast<const char*>(v.data_ptr()), v.nbytes()));
  }
}

// A model file of the per-module leaf layout (model.init_from of a model an earlier version
// trained): the upgrade hook rewrites it before the names are checked, and the model loads.
TEST_F(ModelIoTest, ALeafLayoutFileLoadsThroughTheUpgrade) {
  torch::manual_seed(1);
  BertMlm a(c_);
  torch::manual_seed(2);
  BertMlm b(c_);
  std::map<std::string, torch::Tensor> now;
  for (const auto& kv : a->named_parameters()) now["model." + kv.key()] = kv.value().detach();
  // The old names, written as a plain safetensors file (no "model." prefix there).
  safetensors::File file;
  for (const auto& [name, t] : testing::ToLeafLayout(c_, now)) {
    auto st = ToSafetensor(t);
    ASSERT_TRUE(st.ok());
    file.tensors.emplace(name.substr(std::string("model.").size()), *st);
  }
  const std::string path = dir_ + "/old.safetensors";
  ASSERT_TRUE(safetensors::WriteFile(path, file).ok());
  absl::Status plain = LoadModelSafetensors(*b, path);
  EXPECT_EQ(plain.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(plain.message()), HasSubstr("no tensor 'layer0.wqkv'"));
  int rewritten = 0;
  ASSERT_TRUE(LoadModelSafetensors(*b, path, [&](std::map<std::string, torch::Tensor>* t) {
                rewritten = UpgradeLeafLayout(c_, t);
              }).ok());
  EXPECT_EQ(rewritten, 2);
  ExpectSameState(*a, *b);
}

TEST_F(ModelIoTest, VggKeepsItsBatchNormStatistics) {
  VggConfig v;
  v.width = 0.125;
  v.in_channels = 1;
  v.image_size = 28;
  v.filter_groups = 2;
  torch::manual_seed(1);
  Vgg a(v);
  a->train();
  torch::NoGradGuard guard;
  a->forward(torch::randn({4, 1, 28, 28}));  // moves the running statistics
  torch::manual_seed(2);
  Vgg b(v);
  const std::string path = dir_ + "/vgg.safetensors";
  ASSERT_TRUE(SaveModelSafetensors(*a, path, {}).ok());
  ASSERT_TRUE(LoadModelSafetensors(*b, path).ok());
  ExpectSameState(*a, *b);
  EXPECT_GT(a->named_buffers().size(), 0u);
}

TEST_F(ModelIoTest, AnotherShapeAMissingOrAnExtraTensorIsRefusedNamingItAndChangesNothing) {
  torch::manual_seed(1);
  BertMlm a(c_);
  const std::string path = dir_ + "/model.safetensors";
  ASSERT_TRUE(SaveModelSafetensors(*a, path, {}).ok());

  BertConfig wider = c_;
  wider.d_ff = 128;
  torch::manual_seed(3);
  BertMlm w(wider);
  // tok_emb has the same shape in both: a loader that copied as it checked would change it.
  torch::Tensor before = w->named_parameters()["tok_emb.weight"].clone();
  absl::Status s = LoadModelSafetensors(*w, path);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  std::string expected;  // the first parameter, in the model's order, whose shape differs
  for (const auto& kv : w->named_parameters()) {
    const auto theirs = a->named_parameters()[kv.key()].sizes();
    if (!theirs.equals(kv.value().sizes())) {
      expected = path + ": tensor '" + kv.key() + "' has shape " + Shape(theirs) +
                 "; the model's is " + Shape(kv.value().sizes());
      break;
    }
  }
  ASSERT_FALSE(expected.empty());
  EXPECT_EQ(s.message(), expected);
  EXPECT_TRUE(torch::equal(before, w->named_parameters()["tok_emb.weight"]))
      << "a refused file changed the model";

  BertConfig deeper = c_;
  deeper.layers = 3;
  BertMlm d(deeper);
  s = LoadModelSafetensors(*d, path);
  EXPECT_THAT(s.message(), HasSubstr("no tensor 'layer2."));

  BertConfig shallower = c_;
  shallower.layers = 1;
  BertMlm h(shallower);
  s = LoadModelSafetensors(*h, path);
  EXPECT_THAT(s.message(), HasSubstr("tensor 'layer1."));
  EXPECT_THAT(s.message(), HasSubstr("is not in the model"));

  // A truncated file: the format's own error, naming the file.
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 3);
  s = LoadModelSafetensors(*a, path);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(path));
  EXPECT_EQ(LoadModelSafetensors(*a, dir_ + "/none.safetensors").code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace mat::trainer
