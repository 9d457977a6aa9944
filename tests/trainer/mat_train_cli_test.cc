// Integration tests of the mat-train binary (MAT_BIN_DIR/mat-train): a tiny BERT on a generated
// corpus, driven through --config examples/bert-wikitext2-tiny.yaml and --set overrides.
// Checks the files it writes (summary.json, metrics.jsonl, decisions.jsonl) against each other,
// --resume, and that bad input exits with 2 and a message naming the problem.
//
// Every command runs with the working directory set to a fresh temporary directory, so the
// default relative data.dir never points at real data.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nlohmann/json.hpp"
#include "safetensors/safetensors.h"

namespace mat::trainer {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using nlohmann::json;

const std::string kBinary = std::string(MAT_BIN_DIR) + "/mat-train";
const std::string kTinyConfig = std::string(MAT_SOURCE_DIR) + "/examples/bert-wikitext2-tiny.yaml";

std::string ReadText(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::vector<json> ReadJsonl(const fs::path& path) {
  std::vector<json> out;
  std::istringstream in(ReadText(path));
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    json j = json::parse(line, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << path << ": not JSON: " << line.substr(0, 200);
    out.push_back(j);
  }
  return out;
}

std::vector<int64_t> Steps(const std::vector<json>& lines) {
  std::vector<int64_t> s;
  for (const json& j : lines) s.push_back(j.value("step", int64_t(-1)));
  return s;
}

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

// Generated WikiText-layout corpus: 150 word types, lines of 3-15 words.
void WriteCorpus(const fs::path& dir) {
  fs::create_directories(dir);
  std::mt19937_64 rng(2024);
  auto split = [&](const char* name, int lines) {
    std::string text;
    for (int l = 0; l < lines; ++l) {
      const int n = 3 + int(rng() % 13);
      text += " ";
      for (int i = 0; i < n; ++i) text += "w" + std::to_string(rng() % 150) + " ";
      text += "\n";
      if (l % 10 == 0) text += " \n";  // blank lines, as in WikiText
    }
    WriteText(dir / name, text);
  };
  split("train.txt", 300);
  split("valid.txt", 60);
  split("test.txt", 60);
}

class MatTrainCliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string tmpl = (fs::temp_directory_path() / "mat_train_cli_test_XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) return;
    root_ = new fs::path(tmpl);
    WriteCorpus(*root_ / "corpus");
    WriteText(*root_ / "malformed.yaml", "model: [1, 2\ntrain:\n  steps: 3\n");
    WriteText(*root_ / "empty.yaml", "# nothing set\n");
    WriteText(*root_ / "unknown_key.yaml", "train:\n  stepz: 3\n");
    fs::create_directories(*root_ / "config_dir");
  }
  static void TearDownTestSuite() {
    if (root_) {
      std::error_code ec;
      fs::remove_all(*root_, ec);
    }
    delete root_;
    root_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(root_, nullptr) << "cannot create a temporary directory";
    ASSERT_TRUE(fs::exists(kBinary)) << kBinary << " is not built";
  }

  static fs::path root() { return *root_; }

  // The tiny job of the brief on top of the tiny example, writing to root/<out>.
  static std::vector<std::string> TinyArgs(const std::string& out, const std::string& config = kTinyConfig) {
    std::vector<std::string> a = {"--config", config, "--out", (root() / out).string(),
                                  "--no-progress", "--set", "data.dir=" + (root() / "corpus").string()};
    for (const char* s :
         {"model.layers=1", "model.d_model=16", "model.heads=2", "model.d_ff=32",
          "model.max_seq_len=16", "data.seq_len=16", "train.steps=30", "train.batch_size=8",
          "train.eval_every=10", "train.eval_batches=2", "policy.warmup_steps=10",
          "policy.probe_every=5", "policy.probe_samples=4", "train.threads=1"}) {
      a.push_back("--set");
      a.push_back(s);
    }
    return a;
  }

  // Runs mat-train with `args` in root(); stdout and stderr are captured.
  static RunResult Run(const std::vector<std::string>& args) {
    static int counter = 0;
    const std::string tag = std::to_string(++counter);
    const fs::path out = root() / ("stdout." + tag), err = root() / ("stderr." + tag);
    std::string cmd = "cd " + Quote(root().string()) + " && timeout 600 " + Quote(kBinary);
    for (const std::string& a : args) cmd += " " + Quote(a);
    cmd += " > " + Quote(out.string()) + " 2> " + Quote(err.string());
    const int rc = std::system(cmd.c_str());
    RunResult r;
    r.exit_code = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    r.out = ReadText(out);
    r.err = ReadText(err);
    return r;
  }

  static std::vector<std::string> With(std::vector<std::string> args,
                                       const std::vector<std::string>& sets) {
    for (const std::string& s : sets) {
      args.push_back("--set");
      args.push_back(s);
    }
    return args;
  }

  static fs::path* root_;
};
fs::path* MatTrainCliTest::root_ = nullptr;

// The metrics line of `step`, or null.
json LineAt(const std::vector<json>& lines, int64_t step) {
  for (const json& j : lines)
    if (j.value("step", int64_t(-1)) == step) return j;
  return json();
}

// Checks summary.json, metrics.jsonl and decisions.jsonl of a finished 30-step tiny run, and that
// they agree with each other. Returns the summary.
json CheckFinishedRun(const fs::path& out, const RunResult& r, const std::string& mode) {
  EXPECT_EQ(r.exit_code, 0) << r.err;
  const json summary = json::parse(ReadText(out / "summary.json"), nullptr, false);
  EXPECT_FALSE(summary.is_discarded()) << "summary.json is missing or not JSON";
  if (summary.is_discarded()) return summary;
  for (const char* key : {"mode", "steps", "best_val_loss", "best_step", "test_loss_at_best",
                          "flops_total", "flops_to_best", "flops_saved", "spectral_seconds",
                          "wall_seconds"}) {
    EXPECT_TRUE(summary.contains(key)) << "summary.json lacks " << key;
  }
  EXPECT_EQ(summary.value("mode", ""), mode);
  EXPECT_EQ(summary.value("steps", -1), 30);
  // stdout carries the same summary.
  EXPECT_EQ(json::parse(r.out, nullptr, false), summary);
  // The trained model, as safetensors: every tensor by its name, finite, the step in metadata.
  auto model = safetensors::ReadFile((out / "model.safetensors").string());
  EXPECT_TRUE(model.ok()) << model.status();
  if (model.ok()) {
    EXPECT_EQ(model->metadata["mat.step"], "30");
    EXPECT_EQ(model->metadata["mat.model"], "bert");
    EXPECT_TRUE(model->tensors.count("tok_emb.weight"));
    for (const auto& [name, t] : model->tensors) {
      EXPECT_EQ(t.dtype, safetensors::DType::kF32) << name;
      std::vector<float> v(t.data.size() / 4);
      std::memcpy(v.data(), t.data.data(), v.size() * 4);
      EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); }))
          << name;
    }
  }

  const std::vector<json> metrics = ReadJsonl(out / "metrics.jsonl");
  EXPECT_EQ(metrics.size(), 3u);
  EXPECT_EQ(Steps(metrics), (std::vector<int64_t>{10, 20, 30}));
  double min_val = INFINITY, prev_flops = 0, prev_wall = 0;
  for (const json& m : metrics) {
    SCOPED_TRACE("metrics line " + m.dump().substr(0, 300));
    for (const char* key : {"step", "train_loss", "val_loss", "flops", "active_modules", "wall_seconds"})
      EXPECT_TRUE(m.contains(key)) << key;
    for (const char* key : {"forward", "activation_grad", "weight_grad", "spectral"})
      EXPECT_TRUE(m["flops"].contains(key)) << "flops." << key;
    EXPECT_TRUE(m["active_modules"].is_object());
    // The test loss at [MASK] comes with the test loss, on the lines with a new best only.
    EXPECT_EQ(m.contains("test_loss_at_mask"), m.contains("test_loss"));
    const double train_loss = m.value("train_loss", NAN), val_loss = m.value("val_loss", NAN);
    EXPECT_TRUE(std::isfinite(train_loss) && train_loss > 0) << train_loss;
    EXPECT_TRUE(std::isfinite(val_loss) && val_loss > 0) << val_loss;
    min_val = std::min(min_val, val_loss);
    const double total = m["flops"].value("total", 0.0);
    EXPECT_GT(total, prev_flops) << "flops must grow with steps";
    EXPECT_DOUBLE_EQ(total, m["flops"].value("forward", 0.0) + m["flops"].value("activation_grad", 0.0) +
                                m["flops"].value("weight_grad", 0.0) + m["flops"].value("spectral", 0.0));
    prev_flops = total;
    EXPECT_GE(m.value("wall_seconds", -1.0), prev_wall);
    prev_wall = m.value("wall_seconds", -1.0);
  }
  // The summary agrees with the metrics.
  const int64_t best_step = summary.value("best_step", int64_t(-1));
  const json best = LineAt(metrics, best_step);
  EXPECT_FALSE(best.is_null()) << "best_step " << best_step << " has no metrics line";
  EXPECT_DOUBLE_EQ(summary.value("best_val_loss", NAN), min_val);
  if (!best.is_null()) {
    EXPECT_DOUBLE_EQ(best.value("val_loss", NAN), min_val);
    EXPECT_DOUBLE_EQ(summary.value("test_loss_at_best", NAN), best.value("test_loss", NAN));
    EXPECT_DOUBLE_EQ(summary.value("test_loss_at_mask_at_best", NAN),
                     best.value("test_loss_at_mask", NAN));
    EXPECT_DOUBLE_EQ(summary.value("flops_to_best", NAN), best["flops"].value("total", NAN));
  }
  if (!metrics.empty()) {
    EXPECT_DOUBLE_EQ(summary.value("flops_total", NAN), metrics.back()["flops"].value("total", NAN));
    EXPECT_DOUBLE_EQ(summary["flops_by_phase"].value("spectral", NAN),
                     metrics.back()["flops"].value("spectral", NAN));
  }
  EXPECT_GT(summary.value("wall_seconds", 0.0), 0.0);
  EXPECT_GE(summary.value("spectral_seconds", -1.0), 0.0);
  // The evaluation curve (matctl compare) is the metrics' evaluations, point for point.
  const json curve = summary.value("eval_curve", json());
  EXPECT_TRUE(curve.is_object()) << "summary.json lacks eval_curve";
  if (curve.is_object()) {
    EXPECT_EQ(curve.value("step", json()).get<std::vector<int64_t>>(), Steps(metrics));
    for (size_t i = 0; i < metrics.size() && i < curve["flops"].size(); ++i) {
      EXPECT_EQ(curve.at("flops").at(i), metrics[i].at("flops").at("total")) << i;
      EXPECT_EQ(curve.at("val_loss").at(i), metrics[i].at("val_loss")) << i;
      EXPECT_EQ(curve.at("wall_seconds").at(i), metrics[i].at("wall_seconds")) << i;
    }
  }

  const std::vector<json> decisions = ReadJsonl(out / "decisions.jsonl");
  EXPECT_EQ(decisions.size(), 6u);  // probes at steps 0, 5, ..., 25
  EXPECT_EQ(Steps(decisions), (std::vector<int64_t>{0, 5, 10, 15, 20, 25}));
  for (const json& d : decisions) {
    EXPECT_TRUE(d.contains("modules") && d["modules"].is_array()) << d.dump().substr(0, 200);
    EXPECT_TRUE(d.contains("num_active"));
  }
  return summary;
}

TEST_F(MatTrainCliTest, MatRunWritesConsistentSummaryMetricsAndDecisions) {
  RunResult r = Run(TinyArgs("mat"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json summary = CheckFinishedRun(root() / "mat", r, "mat");
  ASSERT_FALSE(summary.is_discarded());
  // MAT probes spectra: spectral FLOPs and time are spent, from the first probe (step 0) on.
  EXPECT_GT(summary["flops_by_phase"].value("spectral", 0.0), 0.0);
  EXPECT_GT(summary.value("spectral_seconds", 0.0), 0.0);
  for (const json& m : ReadJsonl(root() / "mat" / "metrics.jsonl"))
    EXPECT_GT(m["flops"].value("spectral", 0.0), 0.0) << "step " << m.value("step", -1);
  // The decisions carry the probe's per-module values.
  for (const json& d : ReadJsonl(root() / "mat" / "decisions.jsonl"))
    EXPECT_TRUE(d.contains("trace")) << "step " << d.value("step", -1);
}

// policy.warmup_steps 12 with probes every 5: decisions come at probe steps, so every module
// trained to step 15. The run says so; the decisions show it (none masks before 15).
TEST_F(MatTrainCliTest, AWarmupBetweenProbesIsNamedWithTheStepItReallyEnds) {
  RunResult r = Run(With(TinyArgs("warmup12"), {"policy.warmup_steps=12", "policy.alpha=0.9"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, ::testing::HasSubstr(
                         "policy.warmup_steps 12 is not a multiple of policy.probe_every 5: "
                         "every module trains until the first decision after it, at step 15"));
  int64_t first_policy = -1;
  for (const json& d : ReadJsonl(root() / "warmup12" / "decisions.jsonl")) {
    if (d["phase"] == "policy" && first_policy < 0) first_policy = d["step"].get<int64_t>();
  }
  EXPECT_EQ(first_policy, 15);
  RunResult aligned = Run(With(TinyArgs("warmup10"), {"train.steps=12"}));
  ASSERT_EQ(aligned.exit_code, 0) << aligned.err;
  EXPECT_EQ(aligned.err.find("is not a multiple of policy.probe_every"), std::string::npos)
      << aligned.err;
}

// A warm-up that outlasts the run leaves nothing for the policy to mask: named, as is a
// learning-rate warm-up longer than the run; a warm-up with a decision inside the run is not.
TEST_F(MatTrainCliTest, AWarmupThatCoversTheWholeRunIsNamed) {
  // Decisions come every 5 steps: after a warm-up of 26 the first is at step 30, train.steps.
  RunResult r = Run(With(TinyArgs("warmup_all"), {"policy.warmup_steps=26", "train.warmup_steps=40"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("policy.kind mat masks nothing in this run: its first decision after "
                               "policy.warmup_steps 26 would come at step 30, not before "
                               "train.steps 30"));
  EXPECT_THAT(r.err, HasSubstr("train.warmup_steps 40 is more than train.steps 30"));
  const json summary = json::parse(ReadText(root() / "warmup_all" / "summary.json"), nullptr, false);
  ASSERT_FALSE(summary.is_discarded());
  EXPECT_EQ(summary.value("mean_active_fraction", -1.0), 1.0);
  RunResult inside = Run(With(TinyArgs("warmup_inside"), {"policy.warmup_steps=25"}));
  ASSERT_EQ(inside.exit_code, 0) << inside.err;
  EXPECT_THAT(inside.err, ::testing::Not(HasSubstr("masks nothing")));
  EXPECT_THAT(inside.err, ::testing::Not(HasSubstr("train.warmup_steps")));
}

// Multirate's lr × k for its slow modules compensates plain SGD; under AdamW (the default) each
// slow step is k times as large, which stalled every multirate seed of the verdict: named at start.
TEST_F(MatTrainCliTest, MultirateUnderAdamWIsNamed) {
  const std::vector<std::string> multirate = {"policy.kind=multirate", "policy.multirate_k=3",
                                              "train.steps=2", "train.eval_every=2"};
  RunResult adamw = Run(With(TinyArgs("multirate_adamw"), multirate));
  ASSERT_EQ(adamw.exit_code, 0) << adamw.err;
  EXPECT_THAT(adamw.err, HasSubstr("policy.kind multirate under train.optimizer adamw: slow modules "
                                   "step every policy.multirate_k 3 steps with lr × 3"));
  RunResult sgd = Run(With(With(TinyArgs("multirate_sgd"), multirate), {"train.optimizer=sgd"}));
  ASSERT_EQ(sgd.exit_code, 0) << sgd.err;
  EXPECT_THAT(sgd.err, ::testing::Not(HasSubstr("policy.kind multirate under")));
}

// --resume where the earlier run has no checkpoint left (deleted to save disk, or never written
// under checkpoint_every 0) would start afresh and replace that run: refused, every file kept;
// --resume on a folder without an earlier run starts afresh.
TEST_F(MatTrainCliTest, ResumeWithoutACheckpointKeepsTheEarlierRun) {
  const std::vector<std::string> args = With(TinyArgs("nockpt"), {"train.steps=10"});
  RunResult first = Run(args);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const fs::path out = root() / "nockpt";
  fs::remove(out / "checkpoint.pt");
  fs::remove(out / "checkpoint.pt.prev");
  std::map<std::string, std::string> before;
  for (const char* f : {"summary.json", "metrics.jsonl", "decisions.jsonl", "model.safetensors"}) {
    ASSERT_TRUE(fs::exists(out / f)) << f;
    before[f] = ReadText(out / f);
  }
  std::vector<std::string> resume = args;
  resume.push_back("--resume");
  RunResult refused = Run(resume);
  EXPECT_EQ(refused.exit_code, 2) << refused.err;
  EXPECT_THAT(refused.err, HasSubstr(out.string() + " holds an earlier run ("));
  EXPECT_THAT(refused.err, HasSubstr("but no checkpoint"));
  EXPECT_THAT(refused.err, HasSubstr("--overwrite replaces it"));
  for (const auto& [f, text] : before) EXPECT_EQ(ReadText(out / f), text) << f << " changed";

  std::vector<std::string> fresh = With(TinyArgs("nockpt_fresh"), {"train.steps=10"});
  fresh.push_back("--resume");
  RunResult started = Run(fresh);
  ASSERT_EQ(started.exit_code, 0) << started.err;
  EXPECT_THAT(started.err, HasSubstr("no checkpoint in"));
  EXPECT_TRUE(fs::exists(root() / "nockpt_fresh" / "summary.json"));
}

TEST_F(MatTrainCliTest, FullPolicySpendsNoSpectralFlops) {
  RunResult r = Run(With(TinyArgs("full"), {"policy.kind=full"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json summary = CheckFinishedRun(root() / "full", r, "full");
  ASSERT_FALSE(summary.is_discarded());
  EXPECT_EQ(summary["flops_by_phase"].value("spectral", -1.0), 0.0);
  EXPECT_EQ(summary.value("spectral_seconds", -1.0), 0.0);
  for (const json& m : ReadJsonl(root() / "full" / "metrics.jsonl"))
    EXPECT_EQ(m["flops"].value("spectral", -1.0), 0.0) << "step " << m.value("step", -1);
  // Full training trains every module: nothing is saved and everything stays active.
  const double total = summary.value("flops_total", 0.0);
  EXPECT_NEAR(summary.value("flops_saved", -1.0), 0.0, 1e-9 * total);
  EXPECT_DOUBLE_EQ(summary.value("mean_active_fraction", -1.0), 1.0);
}

// A run whose training loss stops being finite (here an lr of 1e30: the first update blows the
// weights up) ends with exit 1 naming the step, without a summary that would pass it off as a
// finished run and without a crash; its folder's lock is released, so the same --out can be run
// again (--overwrite) at once.
TEST_F(MatTrainCliTest, ANonFiniteLossEndsTheRunNamingTheStep) {
  RunResult r = Run(With(TinyArgs("diverged"), {"train.lr=1e30", "train.warmup_steps=0"}));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("mat-train: training loss is not finite at step "));
  EXPECT_THAT(r.err, ::testing::Not(HasSubstr("terminate called")));
  EXPECT_FALSE(fs::exists(root() / "diverged" / "summary.json"));
  std::vector<std::string> again = With(TinyArgs("diverged"), {"train.steps=2", "train.eval_every=2"});
  again.push_back("--overwrite");
  RunResult sane = Run(again);
  EXPECT_EQ(sane.exit_code, 0) << sane.err;
  EXPECT_TRUE(fs::exists(root() / "diverged" / "summary.json"));
}

// train.deterministic (torch's deterministic kernels; what bench/gpu/service.sh sets on CUDA to
// compare a service job with mat-train) changes nothing on the CPU: the same checksum, the same
// losses. The checksum in summary.json is the same FNV-1a hash a service rank reports.
TEST_F(MatTrainCliTest, DeterministicKernelsTrainTheSameParametersOnCpu) {
  RunResult plain = Run(TinyArgs("plain"));
  RunResult det = Run(With(TinyArgs("det"), {"train.deterministic=true"}));
  json a = CheckFinishedRun(root() / "plain", plain, "mat");
  json b = CheckFinishedRun(root() / "det", det, "mat");
  ASSERT_FALSE(a.is_discarded());
  ASSERT_FALSE(b.is_discarded());
  const std::string ca = a.value("param_checksum", ""), cb = b.value("param_checksum", "");
  EXPECT_EQ(ca.size(), 16u) << a.dump(2);
  EXPECT_EQ(ca, cb);
  EXPECT_EQ(a.value("best_val_loss", NAN), b.value("best_val_loss", NAN));
  // Every decision the same, but for its probe's wall time.
  std::vector<json> da = ReadJsonl(root() / "plain" / "decisions.jsonl");
  std::vector<json> db = ReadJsonl(root() / "det" / "decisions.jsonl");
  ASSERT_EQ(da.size(), db.size());
  ASSERT_FALSE(da.empty());
  for (size_t i = 0; i < da.size(); ++i) {
    da[i].erase("probe_seconds");
    db[i].erase("probe_seconds");
    EXPECT_EQ(da[i], db[i]) << "decision " << i;
  }
}

TEST_F(MatTrainCliTest, ResumeWithMoreStepsContinuesFromTheLastStep) {
  RunResult first = Run(TinyArgs("resume"));
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const fs::path out = root() / "resume";
  const std::vector<json> metrics_before = ReadJsonl(out / "metrics.jsonl");
  const std::vector<json> decisions_before = ReadJsonl(out / "decisions.jsonl");
  ASSERT_EQ(metrics_before.size(), 3u);
  ASSERT_TRUE(fs::exists(out / "checkpoint.pt"));

  // Settings that shape training must be the checkpoint's: refused (exit 2, naming each with
  // both values), and the run's files are left as they were.
  const std::string checkpoint_before = ReadText(out / "checkpoint.pt");
  std::vector<std::string> other =
      With(TinyArgs("resume"), {"train.steps=40", "data.mask_prob=0.25", "policy.alpha=0.9"});
  other.push_back("--resume");
  RunResult refused = Run(other);
  EXPECT_EQ(refused.exit_code, 2) << refused.err;
  EXPECT_THAT(refused.err, HasSubstr("was written under other settings"));
  EXPECT_THAT(refused.err, HasSubstr("data.mask_prob: 0.15 -> 0.25"));
  EXPECT_THAT(refused.err, HasSubstr("policy.alpha: "));
  EXPECT_THAT(refused.err, ::testing::Not(HasSubstr("train.steps:")));
  EXPECT_EQ(ReadJsonl(out / "metrics.jsonl"), metrics_before);
  EXPECT_EQ(ReadText(out / "checkpoint.pt"), checkpoint_before);

  std::vector<std::string> args =
      With(TinyArgs("resume"), {"train.steps=40", "train.checkpoint_every=7"});
  args.push_back("--resume");
  RunResult second = Run(args);
  ASSERT_EQ(second.exit_code, 0) << second.err;
  EXPECT_THAT(second.out + second.err, HasSubstr("at step 30"));
  const json summary = json::parse(ReadText(out / "summary.json"), nullptr, false);
  ASSERT_FALSE(summary.is_discarded());
  EXPECT_EQ(summary.value("steps", -1), 40);

  const std::vector<json> metrics = ReadJsonl(out / "metrics.jsonl");
  EXPECT_EQ(Steps(metrics), (std::vector<int64_t>{10, 20, 30, 40}));
  // The first run's lines are kept as they were (their wall_seconds would differ on a rerun).
  for (size_t i = 0; i < std::min<size_t>(3, metrics.size()); ++i)
    EXPECT_EQ(metrics[i], metrics_before[i]) << "metrics line " << i;
  const std::vector<json> decisions = ReadJsonl(out / "decisions.jsonl");
  EXPECT_EQ(Steps(decisions), (std::vector<int64_t>{0, 5, 10, 15, 20, 25, 30, 35}));
  for (size_t i = 0; i < std::min(decisions.size(), decisions_before.size()); ++i)
    EXPECT_EQ(decisions[i], decisions_before[i]) << "decision line " << i;
  // The evaluation curve survives the restart: all four evaluations.
  EXPECT_EQ(summary["eval_curve"].value("step", json()), json({10, 20, 30, 40}));
  // Time and FLOPs accumulate across the restart.
  if (metrics.size() == 4) {
    EXPECT_GT(metrics[3]["flops"].value("total", 0.0), metrics[2]["flops"].value("total", 0.0));
    EXPECT_GE(metrics[3].value("wall_seconds", 0.0), metrics[2].value("wall_seconds", 0.0));
    EXPECT_DOUBLE_EQ(summary.value("flops_total", NAN), metrics[3]["flops"].value("total", NAN));
  }
}

// A rerun on a folder that holds a finished run deleted that run's checkpoint, model and summary
// before its first step. Now it is refused (exit 2, naming the files and both flags), the earlier
// run is left byte for byte; --overwrite replaces it; --resume and --overwrite exclude each
// other; and a checkpoint --resume cannot load is bad input (exit 2), not a training failure.
TEST_F(MatTrainCliTest, AFolderWithAnEarlierRunIsKeptUnlessOverwriteOrResume) {
  const std::vector<std::string> args = With(TinyArgs("rerun"), {"train.steps=10"});
  RunResult first = Run(args);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const fs::path out = root() / "rerun";
  std::map<std::string, std::string> before;
  for (const char* f : {"summary.json", "metrics.jsonl", "checkpoint.pt", "model.safetensors"}) {
    ASSERT_TRUE(fs::exists(out / f)) << f;
    before[f] = ReadText(out / f);
  }

  RunResult again = Run(With(args, {"seed=7"}));
  EXPECT_EQ(again.exit_code, 2) << again.err;
  EXPECT_THAT(again.err, HasSubstr(out.string() + " holds an earlier run ("));
  EXPECT_THAT(again.err, HasSubstr("summary.json"));
  EXPECT_THAT(again.err, HasSubstr("checkpoint.pt"));
  EXPECT_THAT(again.err, HasSubstr("--resume continues it, --overwrite replaces it"));
  for (const auto& [f, text] : before) EXPECT_EQ(ReadText(out / f), text) << f << " changed";

  std::vector<std::string> both = args;
  both.push_back("--resume");
  both.push_back("--overwrite");
  RunResult conflicting = Run(both);
  EXPECT_EQ(conflicting.exit_code, 2) << conflicting.err;
  EXPECT_THAT(conflicting.err, HasSubstr("excludes"));
  for (const auto& [f, text] : before) EXPECT_EQ(ReadText(out / f), text) << f << " changed";

  std::vector<std::string> overwrite = With(args, {"seed=7"});
  overwrite.push_back("--overwrite");
  RunResult replaced = Run(overwrite);
  ASSERT_EQ(replaced.exit_code, 0) << replaced.err;
  EXPECT_THAT(replaced.err, HasSubstr("replaced by this fresh run"));
  EXPECT_NE(ReadText(out / "model.safetensors"), before["model.safetensors"])
      << "seed 7's model equals seed 1's: the earlier run was not replaced";

  // A truncated checkpoint (and no .prev to fall back to): --resume names it and exits 2.
  fs::remove(out / "checkpoint.pt.prev");
  const std::string ckpt = ReadText(out / "checkpoint.pt");
  ASSERT_GT(ckpt.size(), 100u);
  WriteText(out / "checkpoint.pt", ckpt.substr(0, ckpt.size() / 2));
  std::vector<std::string> resume = With(args, {"train.steps=20"});
  resume.push_back("--resume");
  RunResult truncated = Run(resume);
  EXPECT_EQ(truncated.exit_code, 2) << truncated.err;
  EXPECT_THAT(truncated.err, HasSubstr("checkpoint.pt"));
  EXPECT_THAT(truncated.err, HasSubstr("truncated"));
}

// model.init_from: a run started from another run's model.safetensors evaluates as that model
// did (one step at a vanishing learning rate leaves the weights as loaded); a model of another
// shape is refused naming the tensor.
TEST_F(MatTrainCliTest, InitFromStartsFromTheSavedWeightsAndRefusesAnotherShape) {
  RunResult first = Run(With(TinyArgs("init_source"), {"policy.kind=full"}));
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const fs::path model = root() / "init_source" / "model.safetensors";
  const std::vector<json> source = ReadJsonl(root() / "init_source" / "metrics.jsonl");
  ASSERT_EQ(source.size(), 3u);
  const double trained_val = source.back().value("val_loss", NAN);

  RunResult from = Run(With(TinyArgs("init_from"),
                            {"policy.kind=full", "train.steps=1", "train.warmup_steps=0",
                             "train.lr=1e-12", "model.init_from=" + model.string()}));
  ASSERT_EQ(from.exit_code, 0) << from.err;
  const std::vector<json> metrics = ReadJsonl(root() / "init_from" / "metrics.jsonl");
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_NEAR(metrics[0].value("val_loss", NAN), trained_val, 1e-5);
  // The same step from a fresh initialisation evaluates far from the trained model.
  RunResult fresh = Run(With(TinyArgs("init_fresh"), {"policy.kind=full", "train.steps=1",
                                                       "train.warmup_steps=0", "train.lr=1e-12"}));
  ASSERT_EQ(fresh.exit_code, 0) << fresh.err;
  const std::vector<json> fresh_metrics = ReadJsonl(root() / "init_fresh" / "metrics.jsonl");
  ASSERT_EQ(fresh_metrics.size(), 1u);
  EXPECT_GT(std::abs(fresh_metrics[0].value("val_loss", NAN) - trained_val), 1e-3);

  RunResult wrong = Run(With(TinyArgs("init_wrong"),
                             {"model.d_ff=64", "model.init_from=" + model.string()}));
  EXPECT_NE(wrong.exit_code, 0);
  EXPECT_THAT(wrong.err, HasSubstr("model.init_from"));
  EXPECT_THAT(wrong.err, HasSubstr("has shape"));
  EXPECT_FALSE(fs::exists(root() / "init_wrong" / "summary.json"));

  RunResult missing = Run(With(TinyArgs("init_missing"),
                               {"model.init_from=" + (root() / "nope.safetensors").string()}));
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_THAT(missing.err, HasSubstr("nope.safetensors"));
}

// Bad command-line usage is exit code 2 too, named on stderr: an unknown --log-level used to
// switch logging off silently (exit 0), and CLI11's own codes (106, 109) leaked out.
TEST_F(MatTrainCliTest, BadFlagsExitWithTwoAndNameTheFlag) {
  std::vector<std::string> loud = TinyArgs("bad_log_level");
  loud.insert(loud.end(), {"--log-level", "loud", "--print-config"});
  RunResult r = Run(loud);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--log-level"));
  r = Run({"--config", kTinyConfig});  // no --out
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--out"));
  std::vector<std::string> extra = TinyArgs("bad_extra");
  extra.push_back("stray");
  r = Run(extra);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("stray"));
  r = Run({"--help"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("--log-level"));
  // An unset $OUT trained and kept nothing, exit 0.
  r = Run({"--config", kTinyConfig, "--out", ""});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--out is empty"));
  // --print-config printed a config that would not run (policy.alpha 1.5), exit 0.
  std::vector<std::string> print = With(TinyArgs("print_bad"), {"policy.alpha=1.5"});
  print.push_back("--print-config");
  r = Run(print);
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_THAT(r.err, HasSubstr("policy.alpha"));
  EXPECT_EQ(r.out, "");
}

// Two mat-train runs on one --out interleaved their metrics, decisions and checkpoints: the
// second is refused while the first holds OUT/LOCK (here: this test holds it).
TEST_F(MatTrainCliTest, ASecondRunOnTheSameOutIsRefused) {
  const fs::path busy = root() / "busy";
  fs::create_directories(busy);
  const int fd = ::open((busy / "LOCK").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  RunResult r = Run(With(TinyArgs("busy"), {"train.steps=2"}));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("'" + busy.string() + "' is in use by another mat-train"));
  EXPECT_FALSE(fs::exists(busy / "metrics.jsonl"));
  ::close(fd);
  r = Run(With(TinyArgs("busy"), {"train.steps=2", "train.eval_every=2"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

// A model too large for memory aborted with an uncaught c10::Error and a stack dump (exit
// 134): the trainer returns what LibTorch throws as a status; mat-train names it and exits 2
// (a model this machine cannot hold) or 1 (a batch that ran out while training).
TEST_F(MatTrainCliTest, RunningOutOfMemoryIsAnErrorNotACrash) {
  struct Case {
    std::string name;
    std::vector<std::string> sets;
    int exit_code;
    std::string says;
  };
  for (const Case& c : {Case{"model", {"model.d_model=1048576", "model.d_ff=64"}, 2,
                             "mat-train: building the trainer failed: "},
                        Case{"batch", {"train.batch_size=65536", "model.d_ff=4096"}, 1,
                             "mat-train: training"}}) {
    std::vector<std::string> args =
        With(TinyArgs("oom_" + c.name), {"train.steps=1", "train.eval_every=1"});
    args = With(args, c.sets);
    std::string cmd = "ulimit -v 6000000 && cd " + Quote(root().string()) + " && timeout 300 " +
                      Quote(kBinary);
    for (const std::string& a : args) cmd += " " + Quote(a);
    const fs::path err = root() / ("oom_" + c.name + ".err");
    cmd += " > /dev/null 2> " + Quote(err.string());
    const int rc = std::system(("bash -c " + Quote(cmd)).c_str());
    ASSERT_TRUE(WIFEXITED(rc)) << c.name << ": " << ReadText(err);
    EXPECT_EQ(WEXITSTATUS(rc), c.exit_code) << c.name << ": " << ReadText(err);
    EXPECT_THAT(ReadText(err), HasSubstr(c.says)) << c.name;
    EXPECT_THAT(ReadText(err), HasSubstr("can't allocate memory")) << c.name;
    EXPECT_THAT(ReadText(err), ::testing::Not(HasSubstr("terminate called"))) << c.name;
  }
}

// Bad input: exit code 2, nothing trained, and stderr names the problem. "{root}" in the case
// strings is the test's temporary directory.
struct BadInput {
  std::string name;
  std::string config;               // --config (empty: the tiny example)
  std::vector<std::string> sets;    // extra --set assignments
  std::vector<std::string> needles;  // each must appear on stderr
};

void PrintTo(const BadInput& c, std::ostream* os) { *os << c.name; }

std::string Expand(std::string s, const fs::path& root) {
  const std::string key = "{root}";
  for (size_t at; (at = s.find(key)) != std::string::npos;) s.replace(at, key.size(), root.string());
  return s;
}

class MatTrainBadInputTest : public MatTrainCliTest, public ::testing::WithParamInterface<BadInput> {};

TEST_P(MatTrainBadInputTest, ExitsWithTwoAndNamesTheProblem) {
  const BadInput& c = GetParam();
  const std::string out = "bad_" + c.name;
  std::vector<std::string> sets;
  for (const std::string& s : c.sets) sets.push_back(Expand(s, root()));
  RunResult r = Run(With(TinyArgs(out, c.config.empty() ? kTinyConfig : Expand(c.config, root())), sets));
  EXPECT_EQ(r.exit_code, 2) << "stderr:\n" << r.err;
  for (const std::string& n : c.needles) EXPECT_THAT(r.err, HasSubstr(Expand(n, root())));
  EXPECT_FALSE(fs::exists(root() / out / "summary.json"));
  EXPECT_FALSE(fs::exists(root() / out / "metrics.jsonl"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MatTrainBadInputTest,
    ::testing::Values(
        BadInput{"MissingDataDir", "", {"data.dir={root}/no_such_corpus"},
                 {"data.dir", "{root}/no_such_corpus/train.txt"}},
        BadInput{"NonexistentConfig", "{root}/no_such_config.yaml", {}, {"{root}/no_such_config.yaml"}},
        BadInput{"MalformedYaml", "{root}/malformed.yaml", {}, {"{root}/malformed.yaml", "YAML"}},
        BadInput{"ConfigIsADirectory", "{root}/config_dir", {}, {"{root}/config_dir"}},
        BadInput{"EmptyConfig", "{root}/empty.yaml", {},
                 {"{root}/empty.yaml: the config is empty"}},
        BadInput{"UnknownKeyInConfig", "{root}/unknown_key.yaml", {},
                 {"{root}/unknown_key.yaml", "train.stepz"}},
        BadInput{"AlphaAboveOne", "", {"policy.alpha=1.5"}, {"policy.alpha"}},
        BadInput{"ProbeSamplesOne", "", {"policy.probe_samples=1"}, {"policy.probe_samples"}},
        BadInput{"UnknownSetKey", "", {"train.stepz=3"}, {"train.stepz"}},
        BadInput{"SetWithoutEquals", "", {"noequals"}, {"noequals"}},
        BadInput{"IllTypedSetValue", "", {"model.layers=abc"}, {"model.layers"}}),
    [](const ::testing::TestParamInfo<BadInput>& info) { return info.param.name; });

}  // namespace
}  // namespace mat::trainer
