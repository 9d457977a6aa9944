// The training loop on VGG (model.kind vgg): it learns a generated image task and reports top-1
// accuracy; resume reproduces the uninterrupted run bit for bit (BatchNorm running statistics,
// SGD momentum and the augmenting stream included) under every policy; MAT switches filter
// groups off; the probe's gram estimate matches the exact one; bad configs name the key.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <tuple>

#include "tests/trainer/toy_run.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/trainer.h"

namespace mat::trainer {
namespace {

namespace fs = std::filesystem;
using testing::ReadJsonLines;

std::string BigEndian(uint32_t v) {
  return {char(v >> 24), char((v >> 16) & 0xff), char((v >> 8) & 0xff), char(v & 0xff)};
}

// A 10-class task in the Fashion-MNIST layout (plain IDX files, 28x28): class k is a bright bar
// across rows 2k+4 .. 2k+5 of random brightness, on noise. 700 training and 200 test images.
std::string MakeImages(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("mat_vgg_trainer_" + name + "_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::mt19937 rng(11);
  for (auto [prefix, n] : {std::pair{"train", 700}, {"t10k", 200}}) {
    std::string pixels, labels;
    for (int i = 0; i < n; ++i) {
      const int label = int(rng() % 10);
      const int bright = 120 + int(rng() % 100);
      labels.push_back(char(label));
      for (int r = 0; r < 28; ++r) {
        for (int c = 0; c < 28; ++c) {
          const int bar = 2 * label + 4;
          int v = int(rng() % 80);
          if (r == bar || r == bar + 1) v += bright;
          pixels.push_back(char(std::min(v, 255)));
        }
      }
    }
    std::ofstream img(dir / (std::string(prefix) + "-images-idx3-ubyte"), std::ios::binary);
    img << BigEndian(0x803) << BigEndian(n) << BigEndian(28) << BigEndian(28) << pixels;
    std::ofstream lab(dir / (std::string(prefix) + "-labels-idx1-ubyte"), std::ios::binary);
    lab << BigEndian(0x801) << BigEndian(n) << labels;
  }
  return dir.string();
}

const std::string& Images() {
  static const std::string* dir = new std::string(MakeImages("data"));
  return *dir;
}

// VGG-11 at width 1/16 (4 … 32 channels), 2 filter groups per layer (16 modules), SGD.
config::TrainConfig VggConfig(const std::string& kind) {
  config::TrainConfig c;
  c.seed = 5;
  c.model.kind = "vgg";
  c.model.arch = "vgg11";
  c.model.width = 1.0 / 16;
  c.model.filter_groups = 2;
  c.data.kind = "fashion-mnist";
  c.data.dir = Images();
  c.data.valid_size = 100;
  c.train.steps = 40;
  c.train.batch_size = 16;
  c.train.optimizer = "sgd";
  c.train.lr = 0.05;
  c.train.momentum = 0.9;
  c.train.weight_decay = 5e-4;
  c.train.warmup_steps = 5;
  c.train.schedule = "cosine";
  c.train.eval_every = 10;
  c.train.eval_batches = 0;
  c.train.threads = 1;
  c.policy.kind = kind;
  c.policy.warmup_steps = 10;
  c.policy.probe_every = 5;
  c.policy.probe_samples = 8;
  c.policy.alpha = 0.5;
  c.policy.min_active_fraction = 0.25;
  c.policy.multirate_k = 2;
  return c;
}

std::string Out(const std::string& tag) {
  fs::path p = fs::temp_directory_path() / ("mat_vgg_trainer_out_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p.string();
}

TEST(VggTrainerTest, LearnsAndReportsTopOneAccuracy) {
  config::TrainConfig c = VggConfig("full");
  c.train.steps = 150;
  c.train.eval_every = 25;
  const std::string out = Out("learn");
  auto t = Trainer::Create(c, {out, false, false});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE((*t)->is_vgg());
  EXPECT_EQ((*t)->partition().size(), 16);
  EXPECT_EQ((*t)->partition().GroupSize("filters"), 16);
  auto s = (*t)->Run();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)["test_metric_name"], "accuracy");
  EXPECT_EQ((*s)["test_metric"].get<double>(), (*s)["test_accuracy_at_best"].get<double>());
  // Chance is 0.1; the bars are easy to tell apart.
  EXPECT_GT((*s)["test_accuracy_at_best"].get<double>(), 0.5);
  EXPECT_GT((*s)["val_accuracy_at_best"].get<double>(), 0.5);
  EXPECT_FALSE(s->contains("test_loss_at_mask_at_best")) << "images have no [MASK] positions";
  std::printf("val accuracy %.3f, test accuracy %.3f at step %d\n",
              (*s)["val_accuracy_at_best"].get<double>(), (*s)["test_accuracy_at_best"].get<double>(),
              (*s)["best_step"].get<int>());
  auto metrics = ReadJsonLines(out + "/metrics.jsonl");
  ASSERT_EQ(metrics.size(), 6u);
  for (const auto& m : metrics) {
    ASSERT_TRUE(m.contains("val_accuracy")) << m.dump();
    EXPECT_FALSE(m.contains("val_loss_at_mask")) << m.dump();
    EXPECT_GE(m["val_accuracy"].get<double>(), 0.0);
    EXPECT_LE(m["val_accuracy"].get<double>(), 1.0);
  }
  EXPECT_LT(metrics.back()["val_loss"].get<double>(), metrics.front()["val_loss"].get<double>());
}

// Evaluate's loss and accuracy are the cross-entropy and the argmax counted by hand over the
// whole test split, here early in training where some images are still misclassified.
TEST(VggTrainerTest, EvaluateCountsTopOneByHand) {
  config::TrainConfig c = VggConfig("full");
  auto t = Trainer::Create(c, {"", false, false});
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->Run(6).ok());
  auto test = LoadFashionMnist(Images(), ImageSplit::kTest);
  ASSERT_TRUE(test.ok());
  EvalResult e = (*t)->Evaluate(MakeImageEvalBatches(*test, 32, 0));
  torch::NoGradGuard no_grad;
  (*t)->vgg()->eval();
  torch::Tensor logits = (*t)->vgg()->forward(NormalizeImages(test->images, test->mean, test->stddev));
  (*t)->vgg()->train();
  const double by_hand = logits.argmax(1).eq(test->labels).sum().item<double>() / 200.0;
  std::printf("accuracy after 6 steps %.3f\n", e.accuracy);
  EXPECT_DOUBLE_EQ(e.accuracy, by_hand);
  EXPECT_LT(e.accuracy, 1.0);
  EXPECT_NEAR(e.loss, torch::nn::functional::cross_entropy(logits, test->labels).item<double>(), 1e-5);
}

class VggResumeTest : public ::testing::TestWithParam<std::string> {};

// Stops mid-interval and mid-evaluation period, resumes from the checkpoint: parameters,
// BatchNorm running statistics (in ParamChecksum), SGD momentum, the augmenting stream and the
// policy continue exactly.
TEST_P(VggResumeTest, ResumeReproducesTheUninterruptedRun) {
  config::TrainConfig c = VggConfig(GetParam());
  c.data.augment = true;
  const std::string straight_dir = Out("straight" + GetParam()), split_dir = Out("split" + GetParam());
  auto straight = Trainer::Create(c, {straight_dir, false, false});
  ASSERT_TRUE(straight.ok()) << straight.status();
  ASSERT_TRUE((*straight)->Run().ok());
  const std::string straight_sum = (*straight)->ParamChecksum();
  {
    auto first = Trainer::Create(c, {split_dir, false, false});
    ASSERT_TRUE(first.ok());
    ASSERT_TRUE((*first)->Run(/*stop_at_step=*/17).ok());
    EXPECT_NE((*first)->ParamChecksum(), straight_sum);
  }
  auto second = Trainer::Create(c, {split_dir, false, true});
  ASSERT_TRUE(second.ok());
  auto summary = (*second)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  // It resumed at step 17: a fresh run would also end with the uninterrupted checksum.
  EXPECT_EQ((*second)->resumed_from_step(), 17);
  EXPECT_EQ((*second)->ParamChecksum(), straight_sum);
  auto a = ReadJsonLines(straight_dir + "/metrics.jsonl"), b = ReadJsonLines(split_dir + "/metrics.jsonl");
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]["train_loss"].get<double>(), b[i]["train_loss"].get<double>()) << i;
    EXPECT_EQ(a[i]["val_loss"].get<double>(), b[i]["val_loss"].get<double>()) << i;
    EXPECT_EQ(a[i]["val_accuracy"].get<double>(), b[i]["val_accuracy"].get<double>()) << i;
    EXPECT_EQ(a[i]["flops"]["total"].get<double>(), b[i]["flops"]["total"].get<double>()) << i;
  }
  auto da = ReadJsonLines(straight_dir + "/decisions.jsonl"), db = ReadJsonLines(split_dir + "/decisions.jsonl");
  ASSERT_EQ(da.size(), 8u);
  ASSERT_EQ(db.size(), da.size());
  for (size_t i = 0; i < da.size(); ++i) EXPECT_EQ(da[i].at("modules"), db[i].at("modules")) << i;
}

INSTANTIATE_TEST_SUITE_P(Policies, VggResumeTest, ::testing::Values("mat", "full", "rand", "multirate"));

// A checkpoint without the BatchNorm statistics (e.g. written before they were saved) is an
// error naming the checkpoint, not a silent reset of the statistics.
TEST(VggTrainerTest, CheckpointWithoutBuffersIsRejected) {
  config::TrainConfig c = VggConfig("full");
  const std::string dir = Out("nobuffers");
  auto t = Trainer::Create(c, {dir, false, false});
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->Run(3).ok());
  absl::StatusOr<Checkpoint> in = ReadCheckpoint(dir + "/checkpoint.pt");
  ASSERT_TRUE(in.ok()) << in.status();
  // Rewrite it without its "buffer.*" tensors.
  Checkpoint out;
  out.meta = in->meta;
  int dropped = 0;
  for (const auto& [key, t] : in->tensors) {
    if (key.rfind("buffer.", 0) == 0) {
      ++dropped;
      continue;
    }
    out.tensors[key] = t;
  }
  EXPECT_EQ(dropped, 16);  // 8 conv layers' running mean and variance
  const std::string stripped = dir + "/stripped.pt";
  ASSERT_TRUE(WriteCheckpoint(stripped, out).ok());
  auto again = Trainer::Create(c, {dir, false, true});
  ASSERT_TRUE(again.ok());
  absl::Status s = (*again)->LoadCheckpoint(stripped);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(std::string(s.message()).find("stripped.pt"), std::string::npos) << s;
  EXPECT_NE(std::string(s.message()).find("running_mean"), std::string::npos) << s;
  // The untouched checkpoint loads.
  EXPECT_TRUE((*again)->LoadCheckpoint(dir + "/checkpoint.pt").ok());
}

TEST(VggTrainerTest, MatSwitchesFilterGroupsOffAndSavesFlops) {
  config::TrainConfig c = VggConfig("mat");
  const std::string out = Out("mat");
  auto t = Trainer::Create(c, {out, false, false});
  ASSERT_TRUE(t.ok()) << t.status();
  auto s = (*t)->Run();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_LT((*s)["mean_active_fraction"].get<double>(), 1.0);
  EXPECT_GT((*s)["flops_saved"].get<double>(), 0);
  EXPECT_GT((*s)["flops_by_phase"]["spectral"].get<double>(), 0);
  // A VGG step's FLOPs depend on the batch only: the nominal full step times the steps is what
  // the run spent training plus what masking saved, which is less than switching every filter
  // group off (weight gradients, and activation gradients below the earliest active group)
  // on every step after the warm-up.
  const auto& sf = (*s)["step_flops"];
  const double full = sf["full"].get<double>(), off = sf["modules_off"].get<double>();
  const double trained = (*s)["flops_total"].get<double>() - (*s)["flops_by_phase"]["spectral"].get<double>();
  EXPECT_NEAR(trained + (*s)["flops_saved"].get<double>(), c.train.steps * full, 1e-9 * c.train.steps * full);
  EXPECT_LT(off, full);
  EXPECT_GT(off, 0);
  EXPECT_LT((*s)["flops_saved"].get<double>(), (c.train.steps - c.policy.warmup_steps) * (full - off));
  EXPECT_EQ(sf["full_without_decoder"].get<double>(), full);  // no decoder
  auto decisions = ReadJsonLines(out + "/decisions.jsonl");
  ASSERT_FALSE(decisions.empty());
  for (const auto& d : decisions) {
    ASSERT_EQ(d["modules"].size(), 16u);
    for (const auto& m : d["modules"]) {
      EXPECT_EQ(m["group"], "filters");
      EXPECT_TRUE(std::isfinite(m["lambda"].get<double>()));
      EXPECT_GT(m["lambda"].get<double>(), 0.0) << m.dump();
    }
  }
}

// The trainer's VGG probe (BatchNorm in eval mode, recorded sites) gives the gram estimator the
// same kernel as the exact per-sample Jacobian, and leaves no gradient behind.
TEST(VggTrainerTest, GramProbeMatchesTheExactEstimator) {
  config::TrainConfig c = VggConfig("mat");
  auto t = Trainer::Create(c, {"", false, false});
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->Run(8).ok());  // running statistics away from their initial values
  ImageBatch batch = (*t)->image_stream().Next(16);
  auto exact = spectral::MakeEstimator("exact");
  ASSERT_TRUE(exact.ok());
  auto gram = (*t)->Probe(batch);
  auto ex = (*t)->Probe(batch, exact->get());
  ASSERT_TRUE(gram.ok()) << gram.status();
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_EQ(gram->modules.size(), 16u);
  for (size_t m = 0; m < gram->modules.size(); ++m) {
    const double g = gram->modules[m].lambda_max, e = ex->modules[m].lambda_max;
    EXPECT_GT(e, 0) << m;
    EXPECT_NEAR(g, e, 2e-3 * e) << "module " << m;
    EXPECT_NEAR(gram->modules[m].trace, ex->modules[m].trace, 2e-3 * ex->modules[m].trace) << m;
  }
  EXPECT_GT(gram->flops, 0);
  for (const auto& p : (*t)->network().parameters()) EXPECT_FALSE(p.grad().defined());
  // The masked-LM building blocks refuse a VGG trainer.
  EXPECT_EQ((*t)->Probe(MlmBatch{}).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(VggTrainerTest, StepScheduleDecaysByTheFactor) {
  config::TrainConfig c = VggConfig("full");
  c.train.schedule = "step";
  c.train.lr = 1.0;
  c.train.warmup_steps = 2;
  c.train.decay_every = 10;
  c.train.decay_factor = 0.5;
  auto t = Trainer::Create(c, {"", false, false});
  ASSERT_TRUE(t.ok());
  EXPECT_DOUBLE_EQ((*t)->LearningRate(0), 0.5);
  EXPECT_DOUBLE_EQ((*t)->LearningRate(2), 1.0);
  EXPECT_DOUBLE_EQ((*t)->LearningRate(11), 1.0);
  EXPECT_DOUBLE_EQ((*t)->LearningRate(12), 0.5);
  EXPECT_DOUBLE_EQ((*t)->LearningRate(32), 0.125);
}

// data.train_fraction keeps the first images before the validation slice: at 0.5 the 700-image
// training file trains exactly like a file of its first 300 and last 100 (validation) images.
TEST(VggTrainerTest, TrainFractionKeepsTheFirstTrainingImages) {
  const fs::path cut = fs::temp_directory_path() / ("mat_vgg_trainer_cut_" + std::to_string(::getpid()));
  fs::create_directories(cut);
  auto read = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  const fs::path src = Images();
  for (const char* f : {"t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}) {
    fs::copy_file(src / f, cut / f, fs::copy_options::overwrite_existing);
  }
  // Images: 16-byte header, 784 bytes each; labels: 8-byte header, 1 byte each.
  for (auto [name, header, size] : {std::tuple{"train-images-idx3-ubyte", 16, 784},
                                    std::tuple{"train-labels-idx1-ubyte", 8, 1}}) {
    const std::string all = read(src / name);
    ASSERT_EQ(all.size(), size_t(header + 700 * size));
    std::string out = all.substr(0, header);
    out[4] = out[5] = 0, out[6] = char(400 >> 8), out[7] = char(400 & 0xff);  // count 400
    out += all.substr(header, 300 * size) + all.substr(header + 600 * size, 100 * size);
    std::ofstream(cut / name, std::ios::binary) << out;
  }
  auto run = [](const std::string& dir, double fraction, nlohmann::json* summary) {
    config::TrainConfig c = VggConfig("mat");
    c.data.dir = dir;
    c.data.train_fraction = fraction;
    c.data.augment = true;
    return testing::RunToEnd(c, summary);
  };
  nlohmann::json half, cut_whole, whole;
  const std::string a = run(Images(), 0.5, &half);
  const std::string b = run(cut.string(), 1.0, &cut_whole);
  const std::string c = run(Images(), 1.0, &whole);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_EQ(half["train_size"].get<int64_t>(), 300);
  EXPECT_EQ(half["train_size_unit"], "images");
  EXPECT_EQ(cut_whole["train_size"].get<int64_t>(), 300);
  EXPECT_EQ(whole["train_size"].get<int64_t>(), 600);
  EXPECT_EQ(half["test_accuracy_at_best"].get<double>(), cut_whole["test_accuracy_at_best"].get<double>());
}

TEST(VggTrainerTest, BadConfigsNameTheKeyOrFile) {
  auto error = [](config::TrainConfig c) {
    auto t = Trainer::Create(c, {"", false, false});
    return t.ok() ? std::string("ok") : std::string(t.status().message());
  };
  config::TrainConfig c = VggConfig("full");
  c.data.kind = "wikitext";
  EXPECT_NE(error(c).find("data.kind"), std::string::npos) << error(c);
  c = VggConfig("full");
  c.data.valid_size = 700;
  EXPECT_NE(error(c).find("data.valid_size"), std::string::npos) << error(c);
  c = VggConfig("full");
  c.data.dir = "/nonexistent/fashion";
  EXPECT_NE(error(c).find("/nonexistent/fashion"), std::string::npos) << error(c);
  c = VggConfig("full");
  c.model.filter_groups = 5;  // the first layer has 4 channels at width 1/16
  EXPECT_NE(error(c).find("filter_groups"), std::string::npos) << error(c);
  c = VggConfig("full");
  c.train.optimizer = "lamb";
  EXPECT_NE(error(c).find("train.optimizer"), std::string::npos) << error(c);
  c = VggConfig("full");
  c.model.arch = "vgg19";
  EXPECT_NE(error(c).find("model.arch"), std::string::npos) << error(c);
  c = VggConfig("full");
  c.model.kind = "bert";
  EXPECT_NE(error(c).find("data.kind"), std::string::npos) << error(c);
}

}  // namespace
}  // namespace mat::trainer
