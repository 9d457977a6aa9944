// The training loop: resume from a checkpoint reproduces the uninterrupted run exactly; probes
// and policies are wired; a truncated newest checkpoint falls back to the previous one.
#include "trainer/trainer.h"

#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <set>

#include "common/file_util.h"
#include "tests/trainer/leaf_layout.h"
#include "tests/trainer/toy_run.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/lm_task.h"

namespace mat::trainer {
namespace {

namespace fs = std::filesystem;
using testing::ReadJsonLines;
using testing::TinyTrainConfig;

// A small corpus in the WikiText layout with a Zipf-like word distribution.
std::string MakeCorpus(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("mat_trainer_test_" + name + "_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::mt19937 rng(3);
  for (auto [split, lines] : {std::pair{"train", 400}, {"valid", 60}, {"test", 60}}) {
    std::ofstream out(dir / (std::string(split) + ".txt"));
    for (int l = 0; l < lines; ++l) {
      int words = 5 + rng() % 15;
      for (int w = 0; w < words; ++w) out << "w" << (rng() % 50) * (rng() % 4) << ' ';
      out << "\n";
    }
  }
  return dir.string();
}

class TrainerTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() { data_ = new std::string(MakeCorpus("resume")); }
  static std::string* data_;
  std::string Out(const std::string& tag) {
    fs::path p = fs::temp_directory_path() /
                 ("mat_trainer_out_" + tag + GetParam() + "_" + std::to_string(::getpid()));
    fs::remove_all(p);
    return p.string();
  }
};
std::string* TrainerTest::data_ = nullptr;

TEST_P(TrainerTest, ResumeReproducesTheUninterruptedRun) {
  config::TrainConfig c = TinyTrainConfig(*data_, GetParam());
  std::string straight_dir = Out("straight"), split_dir = Out("split");
  auto straight = Trainer::Create(c, {straight_dir, false, false});
  ASSERT_TRUE(straight.ok()) << straight.status();
  auto straight_summary = (*straight)->Run();
  ASSERT_TRUE(straight_summary.ok()) << straight_summary.status();
  std::string straight_sum = (*straight)->ParamChecksum();
  EXPECT_EQ((*straight)->resumed_from_step(), -1) << "a run without resume starts afresh";
  {
    auto first = Trainer::Create(c, {split_dir, false, false});
    ASSERT_TRUE(first.ok());
    ASSERT_TRUE((*first)->Run(/*stop_at_step=*/23).ok());  // mid-interval, mid-eval-period
    EXPECT_EQ((*first)->step(), 23);
  }
  auto second = Trainer::Create(c, {split_dir, false, true});
  ASSERT_TRUE(second.ok());
  auto summary = (*second)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  // It resumed at step 23: a fresh run would also end with the uninterrupted checksum.
  EXPECT_EQ((*second)->resumed_from_step(), 23);
  EXPECT_EQ((*second)->ParamChecksum(), straight_sum);

  auto a = ReadJsonLines(straight_dir + "/metrics.jsonl"), b = ReadJsonLines(split_dir + "/metrics.jsonl");
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].at("step"), b[i].at("step"));
    EXPECT_EQ(a[i]["train_loss"].get<double>(), b[i]["train_loss"].get<double>()) << i;
    EXPECT_EQ(a[i]["val_loss"].get<double>(), b[i]["val_loss"].get<double>()) << i;
    EXPECT_EQ(a[i]["flops"]["total"].get<double>(), b[i]["flops"]["total"].get<double>()) << i;
    EXPECT_EQ(a[i].at("val_loss_at_mask").get<double>(), b[i].at("val_loss_at_mask").get<double>())
        << i;
    EXPECT_EQ(a[i].contains("test_loss_at_mask"), a[i].contains("test_loss")) << i;
    EXPECT_EQ(a[i].value("test_loss_at_mask", -1.0), b[i].value("test_loss_at_mask", -1.0)) << i;
  }
  EXPECT_EQ(summary->at("test_loss_at_mask_at_best").get<double>(),
            straight_summary->at("test_loss_at_mask_at_best").get<double>());
  auto da = ReadJsonLines(straight_dir + "/decisions.jsonl"), db = ReadJsonLines(split_dir + "/decisions.jsonl");
  ASSERT_EQ(da.size(), 8u);
  ASSERT_EQ(db.size(), da.size());
  for (size_t i = 0; i < da.size(); ++i) EXPECT_EQ(da[i].at("modules"), db[i].at("modules")) << i;
}

INSTANTIATE_TEST_SUITE_P(Policies, TrainerTest, ::testing::Values("mat", "full", "rand", "multirate"));

// A checkpoint written before the view layout (every head and FFN slice its own leaves, one
// update count each) resumes as the same run: LoadCheckpoint rewrites it (UpgradeLeafLayout),
// and the run ends with the uninterrupted run's parameters.
TEST(TrainerSingleTest, ACheckpointOfTheLeafLayoutResumesTheSameRun) {
  std::string data = MakeCorpus("leaf_layout");
  config::TrainConfig c = TinyTrainConfig(data, "mat");
  const fs::path straight_dir = fs::temp_directory_path() / ("mat_trainer_leaf_a_" + std::to_string(::getpid()));
  const fs::path split_dir = fs::temp_directory_path() / ("mat_trainer_leaf_b_" + std::to_string(::getpid()));
  fs::remove_all(straight_dir);
  fs::remove_all(split_dir);
  auto straight = Trainer::Create(c, {straight_dir.string(), false, false});
  ASSERT_TRUE(straight.ok()) << straight.status();
  ASSERT_TRUE((*straight)->Run().ok());
  {
    auto first = Trainer::Create(c, {split_dir.string(), false, false});
    ASSERT_TRUE(first.ok());
    ASSERT_TRUE((*first)->Run(/*stop_at_step=*/23).ok());
  }
  // Rewrite the step-23 checkpoint in the old layout (and drop its predecessor).
  const std::string ckpt = (split_dir / "checkpoint.pt").string();
  auto read = ReadCheckpoint(ckpt);
  ASSERT_TRUE(read.ok()) << read.status();
  Checkpoint old = *read;
  old.tensors = testing::ToLeafLayout(MakeBertConfig(c, 0), read->tensors);
  ASSERT_TRUE(old.tensors.count("model.layer1.wv3") && old.tensors.count("opt.step.layer0.bff1_1"));
  ASSERT_FALSE(old.tensors.count("model.layer0.wqkv"));
  fs::remove(ckpt + ".prev");
  ASSERT_TRUE(WriteCheckpoint(ckpt, old).ok());
  fs::remove(ckpt + ".prev");

  auto second = Trainer::Create(c, {split_dir.string(), false, true});
  ASSERT_TRUE(second.ok());
  auto summary = (*second)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ((*second)->resumed_from_step(), 23);
  EXPECT_EQ((*second)->ParamChecksum(), (*straight)->ParamChecksum());
}

// A checkpoint records the settings it was written under: one from before they were saved
// resumes (not checked), a damaged record is DATA_LOSS naming it, and a setting that shapes
// training refuses the resume naming it with both values.
TEST(TrainerSingleTest, ResumeChecksTheSettingsTheCheckpointRecords) {
  std::string data = MakeCorpus("resume_settings");
  config::TrainConfig c = TinyTrainConfig(data, "full");
  const fs::path dir = fs::temp_directory_path() / ("mat_trainer_settings_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  {
    auto first = Trainer::Create(c, {dir.string(), false, false});
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_TRUE((*first)->Run(/*stop_at_step=*/10).ok());
  }
  const std::string ckpt = (dir / "checkpoint.pt").string();
  fs::remove(ckpt + ".prev");
  auto read = ReadCheckpoint(ckpt);
  ASSERT_TRUE(read.ok()) << read.status();
  const nlohmann::json meta = nlohmann::json::parse(read->meta);
  ASSERT_TRUE(meta.at("config").is_object());
  EXPECT_EQ(meta["config"].at("train.batch_size"), std::to_string(c.train.batch_size));
  auto resume_with = [&](const nlohmann::json& m, const config::TrainConfig& config) {
    Checkpoint edited = *read;
    edited.meta = m.dump();
    EXPECT_TRUE(WriteCheckpoint(ckpt, edited).ok());
    fs::remove(ckpt + ".prev");
    auto t = Trainer::Create(config, {dir.string(), false, true});
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? (*t)->Run(/*stop_at_step=*/11) : absl::StatusOr<nlohmann::json>(t.status());
  };
  nlohmann::json older = meta;
  older.erase("config");
  EXPECT_TRUE(resume_with(older, c).ok());

  // The test loss at [MASK] at the best step (10, before the checkpoint) comes back with it; a
  // checkpoint written before it was saved leaves it unknown, and NaN (no [MASK] position,
  // written as null) stays NaN.
  ASSERT_TRUE(meta.at("test_at_mask").is_number());
  auto resumed = resume_with(meta, c);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(resumed->at("best_step"), 10);
  EXPECT_EQ(resumed->at("test_loss_at_mask_at_best").get<double>(), meta["test_at_mask"].get<double>());
  nlohmann::json before_at_mask = meta;
  before_at_mask.erase("test_at_mask");
  resumed = resume_with(before_at_mask, c);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_FALSE(resumed->contains("test_loss_at_mask_at_best"));
  nlohmann::json nan_at_mask = meta;
  nan_at_mask["test_at_mask"] = nullptr;
  resumed = resume_with(nan_at_mask, c);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_TRUE(std::isnan(resumed->at("test_loss_at_mask_at_best").get<double>()));

  nlohmann::json not_object = meta;
  not_object["config"] = "batch 8";
  absl::Status s = resume_with(not_object, c).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(std::string(s.message()).find("config is not an object"), std::string::npos) << s;
  nlohmann::json not_string = meta;
  not_string["config"]["train.batch_size"] = 8;
  s = resume_with(not_string, c).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(std::string(s.message()).find("config.train.batch_size is not a string"), std::string::npos) << s;
  config::TrainConfig other = c;
  other.train.lr *= 2;
  s = resume_with(meta, other).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find("train.lr: "), std::string::npos) << s;
  fs::remove_all(dir);
}

// Each rank probes its own share of the batch: a probe larger than that share is refused at
// creation, naming the key (the service checks it at submit; a trainer built directly, too).
TEST(TrainerSingleTest, CreateRefusesAProbeLargerThanARanksShareOfTheBatch) {
  std::string data = MakeCorpus("probe_share");
  config::TrainConfig c = TinyTrainConfig(data, "mat");  // batch 8, probe 4
  TrainerOptions four;
  four.world_size = 4;
  auto t = Trainer::Create(c, four);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(t.status().message()).find("policy.probe_samples 4 is more than a rank's "
                                                   "share of train.batch_size (2 of 8 over 4 ranks"),
            std::string::npos)
      << t.status();
  TrainerOptions two;
  two.world_size = 2;  // 4 of 8: exactly a rank's share
  EXPECT_TRUE(Trainer::Create(c, two).ok());
  fs::remove_all(data);
}

// summary.json's test loss at [MASK] comes with the first test evaluation (at the first
// evaluation, step 10), not before it.
TEST(TrainerSingleTest, TheTestLossAtMaskComesWithTheFirstTestEvaluation) {
  std::string data = MakeCorpus("at_mask_first");
  config::TrainConfig c = TinyTrainConfig(data, "full");
  for (const auto& [stop, has] : {std::pair{5, false}, std::pair{10, true}}) {
    auto t = Trainer::Create(c, {"", false, false});
    ASSERT_TRUE(t.ok()) << t.status();
    auto summary = (*t)->Run(stop);
    ASSERT_TRUE(summary.ok()) << summary.status();
    EXPECT_EQ(summary->contains("test_loss_at_mask_at_best"), has) << "stopped at " << stop;
    if (has) {
      EXPECT_TRUE(std::isfinite(summary->at("test_loss_at_mask_at_best").get<double>()));
    }
  }
  fs::remove_all(data);
}

TEST(TrainerSingleTest, MatSwitchesModulesOffAndSavesFlops) {
  std::string data = MakeCorpus("mat");
  config::TrainConfig c = TinyTrainConfig(data, "mat");
  c.policy.alpha = 0.5;
  c.policy.min_active_fraction = 0.25;
  auto t = Trainer::Create(c, {"", false, false});
  ASSERT_TRUE(t.ok()) << t.status();
  auto s = (*t)->Run();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_LT((*s)["mean_active_fraction"].get<double>(), 1.0);
  EXPECT_GT((*s)["flops_by_phase"]["spectral"].get<double>(), 0);
  EXPECT_GT((*s)["spectral_seconds"].get<double>(), 0);
  EXPECT_TRUE(std::isfinite((*s)["best_val_loss"].get<double>()));
  // The masking floor: with every module off a step still costs its forward, its activation
  // gradients and the always-trained weights' gradients; the decoder's share does not change.
  const auto& sf = (*s)["step_flops"];
  const double full = sf["full"].get<double>(), off = sf["modules_off"].get<double>();
  const double full_wo = sf["full_without_decoder"].get<double>();
  const double off_wo = sf["modules_off_without_decoder"].get<double>();
  EXPECT_LT(off, full);
  EXPECT_GT(off, 0.5 * full);
  EXPECT_LT(full_wo, full);
  EXPECT_NEAR(full - off, full_wo - off_wo, 1e-9 * full);
  EXPECT_EQ(sf["backward"], c.policy.backward);  // what the floor assumes
  // Masking saved less than switching every module off after the warm-up would have (the
  // modules' weight gradients do not depend on the batch's masked-token count).
  EXPECT_GT((*s)["flops_saved"].get<double>(), 0);
  EXPECT_LT((*s)["flops_saved"].get<double>(),
            (c.train.steps - c.policy.warmup_steps) * (full - off));
}

// The "-Rand" baseline: rand replaying a MAT run's decisions.jsonl trains the same number of
// modules per group at every decision (other modules: random), and says so in its own log.
TEST(TrainerSingleTest, RandReplaysAMatRunsActiveCounts) {
  namespace fs = std::filesystem;
  std::string data = MakeCorpus("replay");
  const fs::path root = fs::temp_directory_path() / ("mat_replay_" + std::to_string(::getpid()));
  config::TrainConfig mat = TinyTrainConfig(data, "mat");
  mat.policy.alpha = 0.5;
  mat.policy.min_active_fraction = 0.25;
  auto tm = Trainer::Create(mat, {(root / "mat").string(), false, false});
  ASSERT_TRUE(tm.ok()) << tm.status();
  ASSERT_TRUE((*tm)->Run().ok());

  config::TrainConfig rand = TinyTrainConfig(data, "rand");
  rand.policy.rand_schedule = (root / "mat" / "decisions.jsonl").string();
  auto tr = Trainer::Create(rand, {(root / "rand").string(), false, false});
  ASSERT_TRUE(tr.ok()) << tr.status();
  ASSERT_TRUE((*tr)->Run().ok());

  auto counts = [](const fs::path& file) {
    std::vector<std::pair<int64_t, int64_t>> out;  // (step, num_active)
    std::ifstream in(file);
    std::string line;
    while (std::getline(in, line)) {
      auto d = nlohmann::json::parse(line);
      out.emplace_back(d["step"].get<int64_t>(), d["num_active"].get<int64_t>());
    }
    return out;
  };
  auto a = counts(root / "mat" / "decisions.jsonl"), b = counts(root / "rand" / "decisions.jsonl");
  ASSERT_EQ(a.size(), b.size());
  bool some_masked = false;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i], b[i]) << "decision " << i;
    some_masked = some_masked || a[i].second < int64_t((*tm)->partition().size());
  }
  EXPECT_TRUE(some_masked) << "the MAT run never masked a module: the replay shows nothing";

  // The controls replay it too: the same counts per group at every decision (inverse), and
  // frozen-random the MAT run's masks through one permutation per group: each module's on/off
  // history over the decisions is one of the MAT run's modules' histories, in the same group.
  auto histories = [](const fs::path& file) {
    std::map<std::string, std::multiset<std::string>> out;  // group -> per-module bit strings
    std::map<std::string, std::string> bits;                  // name -> bits over decisions
    std::map<std::string, std::string> group;
    std::ifstream in(file);
    std::string line;
    while (std::getline(in, line)) {
      for (const auto& m : nlohmann::json::parse(line)["modules"]) {
        bits[m["name"].get<std::string>()] += m["active"].get<bool>() ? '1' : '0';
        group[m["name"].get<std::string>()] = m["group"].get<std::string>();
      }
    }
    for (const auto& [name, b] : bits) out[group[name]].insert(b);
    return out;
  };
  auto group_counts = [](const fs::path& file) {
    std::vector<std::map<std::string, int>> out;  // per decision: group -> active
    std::ifstream in(file);
    std::string line;
    while (std::getline(in, line)) {
      std::map<std::string, int>& c = out.emplace_back();
      for (const auto& m : nlohmann::json::parse(line)["modules"]) {
        c[m["group"].get<std::string>()] += m["active"].get<bool>() ? 1 : 0;
      }
    }
    return out;
  };
  for (const char* kind : {"frozen-random", "inverse"}) {
    config::TrainConfig control = TinyTrainConfig(data, "mat");
    control.policy.kind = kind;
    control.policy.alpha = 0.9;  // its own MAT mask would train fewer modules than the replay
    control.policy.rand_schedule = rand.policy.rand_schedule;
    auto tc = Trainer::Create(control, {(root / kind).string(), false, false});
    ASSERT_TRUE(tc.ok()) << kind << ": " << tc.status();
    ASSERT_TRUE((*tc)->Run().ok()) << kind;
    EXPECT_EQ(group_counts(root / kind / "decisions.jsonl"),
              group_counts(root / "mat" / "decisions.jsonl"))
        << kind;
    if (std::string(kind) == "frozen-random") {
      EXPECT_EQ(histories(root / kind / "decisions.jsonl"),
                histories(root / "mat" / "decisions.jsonl"));
    }
  }

  config::TrainConfig wrong = TinyTrainConfig(data, "mat");
  wrong.policy.rand_schedule = rand.policy.rand_schedule;
  EXPECT_EQ(Trainer::Create(wrong, {"", false, false}).status().code(),
            absl::StatusCode::kInvalidArgument);
  config::TrainConfig missing = TinyTrainConfig(data, "rand");
  missing.policy.rand_schedule = (root / "nope.jsonl").string();
  auto m = Trainer::Create(missing, {"", false, false});
  EXPECT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("nope.jsonl"), std::string::npos) << m.status();
  EXPECT_EQ(m.status().message().rfind("policy.rand_schedule: ", 0), 0u) << m.status();
  fs::remove_all(root);
}

TEST(TrainerSingleTest, ProbeReportsAFiniteSpectrumPerModule) {
  std::string data = MakeCorpus("probe");
  auto t = Trainer::Create(TinyTrainConfig(data, "mat"), {"", false, false});
  ASSERT_TRUE(t.ok());
  MlmBatch batch = (*t)->train_stream().Next(8);
  auto r = (*t)->Probe(batch);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(int(r->modules.size()), (*t)->partition().size());
  for (const auto& m : r->modules) {
    EXPECT_TRUE(std::isfinite(m.lambda_max));
    EXPECT_GT(m.lambda_max, 0);
    EXPECT_GE(m.trace, m.lambda_max * (1 - 1e-9));
    EXPECT_GE(m.effective_rank, 1.0 - 1e-9);
    EXPECT_LE(m.effective_rank, 4.0 + 1e-9);
  }
  // The probe leaves no gradients behind.
  for (const auto& p : (*t)->model()->parameters()) EXPECT_FALSE(p.grad().defined());
  // Its decoder FLOPs (counted out of the "without decoder" figures): the tied decoder's forward
  // on the probe's predicted positions, and the gram estimator's one backward pass through it.
  const int64_t n = (*t)->config().policy.probe_samples, T = (*t)->config().data.seq_len;
  const int64_t m = (batch.positions < n * T).sum().item<int64_t>();
  const auto& bc = (*t)->model()->config();
  ASSERT_GT(m, 0);
  EXPECT_DOUBLE_EQ(r->decoder_flops, 2.0 * (2.0 * double(m) * double(bc.d_model) * double(bc.vocab_size)));
  EXPECT_LT(r->decoder_flops, r->flops);
}

// policy.estimator=lanczos (output kernel of the projected logits) through the real model: the
// probes of a short run succeed and every module gets a finite λ; with K = d = n·k the Ritz
// values are the exact-output kernel's spectrum.
TEST(TrainerSingleTest, LanczosProbesGiveFiniteSpectraAndMatchExactOutput) {
  std::string data = MakeCorpus("lanczos");
  config::TrainConfig c = TinyTrainConfig(data, "mat");
  c.train.steps = 12;
  c.policy.estimator = "lanczos";
  c.policy.probe_projections = 2;  // d = 4 · 2 = 8
  c.policy.lanczos_iterations = 8;
  auto t = Trainer::Create(c, {"", false, false});
  ASSERT_TRUE(t.ok()) << t.status();
  auto s = (*t)->Run();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_GT((*s)["flops_by_phase"]["spectral"].get<double>(), 0);
  MlmBatch batch = (*t)->train_stream().Next(8);
  auto lz = (*t)->Probe(batch);
  ASSERT_TRUE(lz.ok()) << lz.status();
  spectral::EstimatorOptions o;
  o.projections = 2;
  auto exact = spectral::MakeEstimator("exact-output", o);
  ASSERT_TRUE(exact.ok());
  auto ex = (*t)->Probe(batch, exact->get());
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_EQ(int(lz->modules.size()), (*t)->partition().size());
  for (size_t m = 0; m < lz->modules.size(); ++m) {
    SCOPED_TRACE((*t)->partition().modules[m].name);
    const auto& l = lz->modules[m];
    EXPECT_TRUE(std::isfinite(l.lambda_max));
    EXPECT_GT(l.lambda_max, 0);
    EXPECT_GE(l.trace, l.lambda_max * (1 - 1e-6));
    EXPECT_NEAR(l.lambda_max, ex->modules[m].lambda_max, 1e-3 * ex->modules[m].lambda_max);
    EXPECT_NEAR(l.trace, ex->modules[m].trace, 1e-3 * ex->modules[m].trace);
  }
  for (const auto& p : (*t)->model()->parameters()) EXPECT_FALSE(p.grad().defined());
}

// policy.estimator=output (the paper's mNTK at the masked positions) through the real model:
// a short run probes with it, and on one batch its kernels equal exact-output's brute-force
// Jacobian kernels on the same outputs (P = 2 positions × k = 2 projections per sample, d = 16),
// from q = 4 backward passes instead of 16. The FLOP count includes every backward pass.
TEST(TrainerSingleTest, OutputEstimatorMatchesTheBruteForceOutputKernel) {
  std::string data = MakeCorpus("output");
  config::TrainConfig c = TinyTrainConfig(data, "mat");
  c.train.steps = 12;
  c.policy.estimator = "output";
  c.policy.probe_projections = 2;
  c.policy.probe_positions = 2;
  auto t = Trainer::Create(c, {"", false, false});
  ASSERT_TRUE(t.ok()) << t.status();
  auto s = (*t)->Run();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_GT((*s)["flops_by_phase"]["spectral"].get<double>(), 0);
  MlmBatch batch = (*t)->train_stream().Next(8);
  auto fast = (*t)->Probe(batch);
  ASSERT_TRUE(fast.ok()) << fast.status();
  spectral::EstimatorOptions o;
  o.projections = 2;
  o.positions = 2;
  auto exact = spectral::MakeEstimator("exact-output", o);
  ASSERT_TRUE(exact.ok());
  auto ex = (*t)->Probe(batch, exact->get());
  ASSERT_TRUE(ex.ok()) << ex.status();
  auto gram_estimator = spectral::MakeEstimator("gram");
  ASSERT_TRUE(gram_estimator.ok());
  auto gram = (*t)->Probe(batch, gram_estimator->get());
  ASSERT_TRUE(gram.ok()) << gram.status();
  ASSERT_EQ(int(fast->modules.size()), (*t)->partition().size());
  for (size_t m = 0; m < fast->modules.size(); ++m) {
    SCOPED_TRACE((*t)->partition().modules[m].name);
    const auto& f = fast->modules[m];
    EXPECT_TRUE(std::isfinite(f.lambda_max));
    EXPECT_GT(f.lambda_max, 0);
    EXPECT_NEAR(f.lambda_max, ex->modules[m].lambda_max, 1e-3 * ex->modules[m].lambda_max);
    EXPECT_NEAR(f.trace, ex->modules[m].trace, 1e-3 * ex->modules[m].trace);
    EXPECT_NEAR(f.effective_rank, ex->modules[m].effective_rank,
                1e-3 * ex->modules[m].effective_rank);
  }
  // The probe's FLOPs count its 4 backward passes: more than one forward and backward.
  EXPECT_GT(fast->flops, gram->flops);
  // Every logit, unprojected (the exact mNTK at one position per sample: d = 8·V): the same.
  spectral::EstimatorOptions every;
  every.every_logit = true;
  auto all_fast = spectral::MakeEstimator("output", every);
  auto all_brute = spectral::MakeEstimator("exact-output", every);
  ASSERT_TRUE(all_fast.ok() && all_brute.ok());
  EXPECT_EQ((*all_fast)->OutputProjections(), 0);
  auto af = (*t)->Probe(batch, all_fast->get());
  auto ab = (*t)->Probe(batch, all_brute->get());
  ASSERT_TRUE(af.ok()) << af.status();
  ASSERT_TRUE(ab.ok()) << ab.status();
  for (size_t m = 0; m < af->modules.size(); ++m) {
    EXPECT_NEAR(af->modules[m].lambda_max, ab->modules[m].lambda_max,
                1e-3 * ab->modules[m].lambda_max);
  }
  for (const auto& p : (*t)->model()->parameters()) EXPECT_FALSE(p.grad().defined());
}

TEST(TrainerSingleTest, TruncatedNewestCheckpointFallsBackToPrevious) {
  std::string data = MakeCorpus("ckpt");
  config::TrainConfig c = TinyTrainConfig(data, "mat");
  c.train.checkpoint_every = 10;
  fs::path out = fs::temp_directory_path() / ("mat_trainer_ckpt_" + std::to_string(::getpid()));
  fs::remove_all(out);
  {
    auto t = Trainer::Create(c, {out.string(), false, false});
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->Run(25).ok());  // checkpoints at 10, 20 (-> .prev) and 25
  }
  const fs::path ckpt = out / "checkpoint.pt";
  ASSERT_TRUE(fs::exists(ckpt.string() + ".prev"));
  fs::resize_file(ckpt, fs::file_size(ckpt) / 2);
  auto t = Trainer::Create(c, {out.string(), false, true});
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->LoadCheckpoint(ckpt.string()).ok());
  EXPECT_EQ((*t)->step(), 20);
  // Both broken: a clear error naming the file.
  fs::resize_file(ckpt.string() + ".prev", 100);
  absl::Status s = (*t)->LoadCheckpoint(ckpt.string());
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(s.message()).find("truncated"), std::string::npos) << s;
}

// The unreadable newest checkpoint goes aside (kept, byte for byte, as checkpoint.pt.corrupt):
// left in place, the resumed run's next save would rotate it over `.prev`, the one good
// checkpoint, and a crash before the save after that would leave none.
TEST(TrainerSingleTest, AnUnreadableNewestCheckpointGoesAsideAndPrevIsKept) {
  std::string data = MakeCorpus("aside");
  config::TrainConfig c = TinyTrainConfig(data, "mat");
  c.train.checkpoint_every = 10;
  fs::path out = fs::temp_directory_path() / ("mat_trainer_aside_" + std::to_string(::getpid()));
  fs::remove_all(out);
  {
    auto t = Trainer::Create(c, {out.string(), false, false});
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->Run(25).ok());  // checkpoints at 10, 20 (-> .prev) and 25
  }
  const fs::path ckpt = out / "checkpoint.pt";
  fs::resize_file(ckpt, fs::file_size(ckpt) / 2);
  const auto half = fs::file_size(ckpt);
  auto t = Trainer::Create(c, {out.string(), false, true});
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->Run(30).ok());  // resumes at 20 (.prev), saves once, at 30
  EXPECT_EQ((*t)->resumed_from_step(), 20);
  ASSERT_TRUE(fs::exists(ckpt.string() + ".corrupt"));
  EXPECT_EQ(fs::file_size(ckpt.string() + ".corrupt"), half);
  auto prev = ReadCheckpointStep(ckpt.string() + ".prev");
  ASSERT_TRUE(prev.ok()) << prev.status();
  EXPECT_EQ(*prev, 20) << "the save rotated the truncated file over .prev";
  auto newest = ReadCheckpointStep(ckpt.string());
  ASSERT_TRUE(newest.ok()) << newest.status();
  EXPECT_EQ(*newest, 30);
  fs::remove_all(out);
}

// A fresh run into a folder that holds another run's outputs replaces them, its checkpoints too:
// the old checkpoint.pt used to become the new run's checkpoint.pt.prev, and a --resume whose
// newest checkpoint was broken then continued the other run (its step, its parameters). A
// checkpoint past train.steps is refused, not taken as a finished run of other length.
TEST(TrainerSingleTest, AFreshRunLeavesNoCheckpointOfAnEarlierRun) {
  std::string data = MakeCorpus("fresh");
  config::TrainConfig c = TinyTrainConfig(data, "mat");
  c.train.checkpoint_every = 10;
  fs::path out = fs::temp_directory_path() / ("mat_trainer_fresh_" + std::to_string(::getpid()));
  fs::remove_all(out);
  const fs::path ckpt = out / "checkpoint.pt";
  {
    auto t = Trainer::Create(c, {out.string(), false, false});
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->Run(25).ok());  // checkpoints at 10, 20 (-> .prev) and 25
  }
  ASSERT_TRUE(fs::exists(ckpt.string() + ".prev"));
  config::TrainConfig shorter = c;
  shorter.train.steps = 20;
  {
    auto past = Trainer::Create(shorter, {out.string(), false, true});
    ASSERT_TRUE(past.ok());
    auto s = (*past)->Run();
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(s.status().message()).find("at step 25, past train.steps 20"),
              std::string::npos) << s.status();
  }
  {
    shorter.train.steps = 4;  // a fresh run with no checkpoint of its own
    auto fresh = Trainer::Create(shorter, {out.string(), false, false});
    ASSERT_TRUE(fresh.ok());
    ASSERT_TRUE((*fresh)->Run().ok());
  }
  // Only the new run's final checkpoint (step 4); nothing of the earlier run to fall back to.
  EXPECT_FALSE(fs::exists(ckpt.string() + ".prev")) << "the earlier run's checkpoint is still there";
  fs::resize_file(ckpt, 100);
  auto resumed = Trainer::Create(shorter, {out.string(), false, true});
  ASSERT_TRUE(resumed.ok());
  auto s = (*resumed)->Run();
  ASSERT_FALSE(s.ok()) << "resumed the earlier run at step " << (*resumed)->resumed_from_step();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kDataLoss) << s.status();
  fs::remove_all(out);
}

// What a write cut short leaves (a full-size temp file per crash, NAME.tmp.PID.N) is removed
// when the next run of mat-train starts in the folder, resumed or fresh, once process PID has
// ended. A live PID's file (a write in progress) and files that are not the run's own stay.
TEST(TrainerSingleTest, ARunRemovesTheTempFilesOfAnInterruptedWrite) {
  std::string data = MakeCorpus("temps");
  config::TrainConfig c = TinyTrainConfig(data, "full");
  c.train.steps = 4;
  c.train.checkpoint_every = 2;
  fs::path out = fs::temp_directory_path() / ("mat_trainer_temps_" + std::to_string(::getpid()));
  fs::remove_all(out);
  fs::create_directories(out);
  const pid_t child = ::fork();  // a process that has ended: its temp files are leftovers
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  const std::string dead = std::to_string(child), me = std::to_string(::getpid());
  const std::vector<std::string> leftovers = {"checkpoint.pt.tmp." + dead + ".0",
                                              "model.safetensors.tmp." + dead + ".3"};
  const std::vector<std::string> kept = {"model.safetensors.tmp." + me + ".9",
                                         "checkpoint.pt.tmpsave", "notes.tmp." + dead + ".2"};
  for (bool resume : {false, true}) {
    for (const std::string& name : leftovers) std::ofstream(out / name) << "cut short";
    for (const std::string& name : kept) std::ofstream(out / name) << "in use";
    auto t = Trainer::Create(c, {out.string(), false, resume});
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->Run().ok());
    for (const std::string& name : leftovers) {
      EXPECT_FALSE(fs::exists(out / name)) << name << (resume ? " (resumed)" : " (fresh)");
    }
    for (const std::string& name : kept) EXPECT_TRUE(fs::exists(out / name)) << name;
  }
  fs::remove_all(out);
}

// A finished run continued with a larger train.steps loses its summary.json at the resume: if
// the continuation dies, nothing reads the earlier end's summary as this run's result.
TEST(TrainerSingleTest, ContinuingAFinishedRunRemovesItsSummaryUntilItEnds) {
  std::string data = MakeCorpus("longer");
  config::TrainConfig c = TinyTrainConfig(data, "full");
  c.train.steps = 4;
  fs::path out = fs::temp_directory_path() / ("mat_trainer_longer_" + std::to_string(::getpid()));
  fs::remove_all(out);
  {
    auto t = Trainer::Create(c, {out.string(), false, false});
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->Run().ok());
  }
  ASSERT_TRUE(fs::exists(out / "summary.json"));
  c.train.steps = 8;
  {
    auto t = Trainer::Create(c, {out.string(), false, true});
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->Run(6).ok());  // stops at step 6, as if killed
    EXPECT_EQ((*t)->resumed_from_step(), 4);
  }
  EXPECT_FALSE(fs::exists(out / "summary.json")) << "the 4-step summary still stands";
  auto t = Trainer::Create(c, {out.string(), false, true});
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->Run().ok());
  std::ifstream in(out / "summary.json");
  const nlohmann::json summary = nlohmann::json::parse(in);
  EXPECT_EQ(summary.at("steps").get<int64_t>(), 8);
  fs::remove_all(out);
}

// A run stopped between evaluations and then ended where it stopped (--resume with train.steps
// lowered to the checkpoint's step) is evaluated there: its metrics and summary end with that
// evaluation, as a run that stepped to train.steps would, not with no best at all.
TEST(TrainerSingleTest, EndingARunAtItsCheckpointEvaluatesThere) {
  std::string data = MakeCorpus("lowered");
  config::TrainConfig c = TinyTrainConfig(data, "mat");
  ASSERT_EQ(c.train.eval_every, 10);
  fs::path out = fs::temp_directory_path() / ("mat_trainer_lowered_" + std::to_string(::getpid()));
  fs::remove_all(out);
  {
    auto t = Trainer::Create(c, {out.string(), false, false});
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->Run(6).ok());  // stops at step 6, before the first evaluation
  }
  EXPECT_TRUE(ReadJsonLines((out / "metrics.jsonl").string()).empty());
  c.train.steps = 6;
  auto t = Trainer::Create(c, {out.string(), false, true});
  ASSERT_TRUE(t.ok()) << t.status();
  auto summary = (*t)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ((*t)->resumed_from_step(), 6);
  const std::vector<nlohmann::json> metrics = ReadJsonLines((out / "metrics.jsonl").string());
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0].value("step", -1), 6);
  EXPECT_TRUE(std::isfinite(metrics[0].value("val_loss", NAN))) << metrics[0].dump();
  EXPECT_EQ(metrics[0]["active_modules"].value("heads", -1), 8) << "the warm-up trains every head";
  EXPECT_EQ(summary->value("best_step", -1), 6);
  EXPECT_NEAR(summary->value("best_val_loss", NAN), metrics[0].value("val_loss", 0.0), 1e-6);
  EXPECT_EQ((*summary)["eval_curve"].value("step", nlohmann::json()), nlohmann::json({6}));
  // Resumed again at its end, it has nothing left to evaluate: no second line.
  auto again = Trainer::Create(c, {out.string(), false, true});
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE((*again)->Run().ok());
  EXPECT_EQ(ReadJsonLines((out / "metrics.jsonl").string()).size(), 1u);
  fs::remove_all(out);
}

TEST(TrainerSingleTest, LearningRateSchedule) {
  std::string data = MakeCorpus("lr");
  config::TrainConfig c = TinyTrainConfig(data, "full");
  c.train.lr = 1.0;
  c.train.warmup_steps = 4;
  c.train.steps = 14;
  c.train.min_lr_ratio = 0.0;
  auto t = Trainer::Create(c, {"", false, false});
  ASSERT_TRUE(t.ok());
  EXPECT_DOUBLE_EQ((*t)->LearningRate(0), 0.25);
  EXPECT_DOUBLE_EQ((*t)->LearningRate(3), 1.0);
  EXPECT_DOUBLE_EQ((*t)->LearningRate(4), 1.0);
  EXPECT_DOUBLE_EQ((*t)->LearningRate(9), 0.5);
  EXPECT_DOUBLE_EQ((*t)->LearningRate(14), 0.0);
}

// data.train_fraction trains on the train split's prefix only: a corpus whose train split is
// the same lines twice, at fraction 0.5, trains exactly like the corpus of those lines once
// (same vocabulary, same blocks); at fraction 1 it trains differently. Validation and test are
// the whole splits either way.
TEST(TrainerSingleTest, TrainFractionTrainsOnThePrefixOnly) {
  const std::string once = MakeCorpus("fraction_once");
  const fs::path twice = fs::temp_directory_path() / ("mat_trainer_test_fraction_twice_" + std::to_string(::getpid()));
  fs::create_directories(twice);
  for (const char* split : {"valid", "test"}) {
    fs::copy_file(fs::path(once) / (std::string(split) + ".txt"), twice / (std::string(split) + ".txt"),
                  fs::copy_options::overwrite_existing);
  }
  {
    std::ifstream in(fs::path(once) / "train.txt");
    std::string lines((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(twice / "train.txt") << lines << lines;
  }
  auto run = [](const std::string& data, double fraction, nlohmann::json* summary) {
    config::TrainConfig c = TinyTrainConfig(data, "mat");
    c.data.train_fraction = fraction;
    return testing::RunToEnd(c, summary);
  };
  nlohmann::json a, b, c;
  const std::string whole_once = run(once, 1.0, &a);
  const std::string half_twice = run(twice.string(), 0.5, &b);
  const std::string whole_twice = run(twice.string(), 1.0, &c);
  EXPECT_EQ(half_twice, whole_once);
  EXPECT_NE(whole_twice, whole_once);
  EXPECT_EQ(a["train_size_unit"], "tokens");
  EXPECT_EQ(b["train_size"].get<int64_t>(), a["train_size"].get<int64_t>());
  EXPECT_EQ(c["train_size"].get<int64_t>(), 2 * a["train_size"].get<int64_t>());
  EXPECT_EQ(b["best_val_loss"].get<double>(), a["best_val_loss"].get<double>());
  EXPECT_EQ(b["test_loss_at_best"].get<double>(), a["test_loss_at_best"].get<double>());

  // A fraction that leaves less than one sequence is an error naming the key.
  config::TrainConfig tiny = TinyTrainConfig(once, "full");
  tiny.data.train_fraction = 1e-6;
  auto t = Trainer::Create(tiny, {"", false, false});
  ASSERT_FALSE(t.ok());
  EXPECT_NE(std::string(t.status().message()).find("data.train_fraction"), std::string::npos)
      << t.status();
}

}  // namespace
}  // namespace mat::trainer
