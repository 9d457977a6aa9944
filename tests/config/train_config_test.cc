// Tests of mat::config::TrainConfig: YAML parsing onto defaults, --set overrides, validation
// and ListConfig. Every error must be INVALID_ARGUMENT and name the offending key.
#include "config/train_config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mat::config {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// Every key of the schema, as documented in train_config.h.
const std::vector<std::string> kAllKeys = {
    "seed",
    "model.kind", "model.layers", "model.d_model", "model.heads", "model.d_ff", "model.ffn_groups",
    "model.max_seq_len", "model.dropout", "model.pre_ln", "model.experts",
    "model.capacity_factor", "model.aux_loss_weight", "model.moe_every",
    "model.arch", "model.width", "model.filter_groups", "model.classifier_hidden", "model.init_from",
    "data.kind", "data.dir", "data.seq_len", "data.mask_prob", "data.valid_size", "data.augment",
    "data.train_fraction", "data.vocab_size",
    "train.steps", "train.batch_size", "train.optimizer", "train.lr", "train.min_lr_ratio",
    "train.warmup_steps", "train.schedule", "train.decay_every", "train.decay_factor",
    "train.weight_decay", "train.beta1", "train.beta2", "train.eps", "train.momentum",
    "train.nesterov",
    "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.threads", "train.device",
    "train.precision", "train.deterministic",
    "policy.kind", "policy.alpha", "policy.beta", "policy.gamma", "policy.patience",
    "policy.warmup_steps", "policy.probe_every", "policy.probe_samples", "policy.estimator",
    "policy.lanczos_iterations", "policy.probe_projections", "policy.min_active_fraction",
    "policy.rand_fraction", "policy.rand_schedule", "policy.multirate_k",
    "policy.multirate_fast_fraction", "policy.delta1", "policy.probe_positions",
    "policy.backward"};

std::map<std::string, std::string> AsMap(const TrainConfig& c) {
  std::map<std::string, std::string> m;
  for (const auto& [k, v] : ListConfig(c)) m[k] = v;
  return m;
}

TEST(TrainConfigTest, DefaultsValidate) {
  TrainConfig c;
  EXPECT_TRUE(ValidateTrainConfig(c).ok()) << ValidateTrainConfig(c);
}

TEST(TrainConfigTest, DetachIsForTransformersOnly) {
  TrainConfig c;
  for (const char* a : {"model.kind=vgg", "data.kind=fashion-mnist", "policy.backward=detach"}) {
    ASSERT_TRUE(ApplyOverride(c, a).ok()) << a;
  }
  absl::Status st = ValidateTrainConfig(c);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("policy.backward detach"));
  ASSERT_TRUE(ApplyOverride(c, "policy.backward=weights").ok());
  EXPECT_TRUE(ValidateTrainConfig(c).ok()) << ValidateTrainConfig(c);
  TrainConfig bert;
  for (const char* a : {"policy.backward=detach", "policy.delta1=first-probe",
                        "policy.kind=frozen-random", "policy.min_active_fraction=0",
                        "data.vocab_size=8192", "policy.estimator=output",
                        "policy.probe_positions=2", "policy.probe_projections=4"}) {
    ASSERT_TRUE(ApplyOverride(bert, a).ok()) << a;
  }
  EXPECT_TRUE(ValidateTrainConfig(bert).ok()) << ValidateTrainConfig(bert);
  const policy::PolicyConfig p = ToPolicyConfig(bert);
  EXPECT_EQ(p.kind, policy::PolicyKind::kFrozenRandom);
  EXPECT_EQ(p.delta1, policy::Delta1Reading::kFirstProbe);
  EXPECT_EQ(p.min_active_fraction, 0.0);
}

TEST(TrainConfigTest, EveryEstimatorAndItsOptionsValidate) {
  for (const std::string name : {"gram", "output", "exact", "lanczos", "exact-output"}) {
    TrainConfig c;
    ASSERT_TRUE(ApplyOverride(c, "policy.estimator=" + name).ok()) << name;
    EXPECT_TRUE(ValidateTrainConfig(c).ok()) << name << ": " << ValidateTrainConfig(c);
  }
  auto c = ParseTrainConfig("policy: {estimator: lanczos, lanczos_iterations: 3, probe_projections: 2}\n",
                            "lanczos.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->policy.estimator, "lanczos");
  EXPECT_EQ(c->policy.lanczos_iterations, 3);
  EXPECT_EQ(c->policy.probe_projections, 2);
  EXPECT_EQ(TrainConfig{}.policy.lanczos_iterations, 8);
  EXPECT_EQ(TrainConfig{}.policy.probe_projections, 1);
}

TEST(TrainConfigTest, EmptyYamlGivesDefaults) {
  auto c = ParseTrainConfig("", "empty.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(AsMap(*c), AsMap(TrainConfig{}));
}

TEST(TrainConfigTest, ParsesEveryTypeOntoDefaults) {
  auto c = ParseTrainConfig(
      "seed: 42\n"
      "model: {layers: 3, pre_ln: true, dropout: 0.25}\n"
      "data:\n  dir: /some/where\n  seq_len: 32\n"
      "train: {lr: 1.0e-3, schedule: cosine}\n"
      "policy: {kind: full, probe_samples: 4}\n",
      "x.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->seed, 42u);
  EXPECT_EQ(c->model.layers, 3);
  EXPECT_TRUE(c->model.pre_ln);
  EXPECT_DOUBLE_EQ(c->model.dropout, 0.25);
  EXPECT_EQ(c->data.dir, "/some/where");
  EXPECT_EQ(c->data.seq_len, 32);
  EXPECT_DOUBLE_EQ(c->train.lr, 1e-3);
  EXPECT_EQ(c->train.schedule, "cosine");
  EXPECT_EQ(c->policy.kind, "full");
  EXPECT_EQ(c->policy.probe_samples, 4);
  // Untouched keys keep their defaults.
  TrainConfig d;
  EXPECT_EQ(c->model.d_model, d.model.d_model);
  EXPECT_EQ(c->train.steps, d.train.steps);
  EXPECT_DOUBLE_EQ(c->policy.alpha, d.policy.alpha);
  EXPECT_TRUE(ValidateTrainConfig(*c).ok()) << ValidateTrainConfig(*c);
}

// The example files in examples/ parse and validate.
class ExampleConfigTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ExampleConfigTest, ParsesAndValidates) {
  const std::string path = std::string(MAT_SOURCE_DIR) + "/examples/" + GetParam();
  auto c = LoadTrainConfig(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(ValidateTrainConfig(*c).ok()) << ValidateTrainConfig(*c);
  EXPECT_EQ(c->model.kind, "bert");
  EXPECT_EQ(c->data.kind, "wikitext");
}

INSTANTIATE_TEST_SUITE_P(Examples, ExampleConfigTest,
                         ::testing::Values("bert-wikitext2-tiny.yaml", "bert-wikitext2.yaml",
                                           "bert-wikitext2-verdict.yaml",
                                           "bert-wikitext2-regime.yaml"));

TEST(TrainConfigTest, TinyExampleHasItsDocumentedValues) {
  auto c = LoadTrainConfig(std::string(MAT_SOURCE_DIR) + "/examples/bert-wikitext2-tiny.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model.layers, 2);
  EXPECT_EQ(c->model.d_model, 128);
  EXPECT_EQ(c->data.seq_len, 64);
  EXPECT_EQ(c->train.steps, 1000);
  EXPECT_EQ(c->policy.kind, "mat");
  EXPECT_EQ(c->policy.probe_samples, 8);
}

TEST(TrainConfigTest, AServiceJobFileIsAConfigWhoseResourcesAreIgnored) {
  auto c = ParseTrainConfig("train: {steps: 7}\nresources: {workers: 2, device: cpu}\n", "job.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->train.steps, 7);
}

// Parse errors: the YAML, the key the message must name.
struct BadYaml {
  std::string name, yaml, key;
};

void PrintTo(const BadYaml& c, std::ostream* os) { *os << c.name; }

class BadYamlTest : public ::testing::TestWithParam<BadYaml> {};

TEST_P(BadYamlTest, IsInvalidArgumentNamingTheKey) {
  auto c = ParseTrainConfig(GetParam().yaml, "job.yaml");
  ASSERT_FALSE(c.ok()) << "accepted:\n" << GetParam().yaml;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_THAT(c.status().message(), HasSubstr(GetParam().key));
  EXPECT_THAT(c.status().message(), HasSubstr("job.yaml"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadYamlTest,
    ::testing::Values(
        BadYaml{"UnknownTopLevelKey", "sed: 1\n", "sed"},
        BadYaml{"UnknownNestedKey", "model:\n  layers: 2\n  colour: red\n", "model.colour"},
        BadYaml{"UnknownSection", "optimizer:\n  lr: 0.1\n", "optimizer"},
        BadYaml{"MapUnderAKey", "model:\n  layers: {a: 1}\n", "model.layers"},
        BadYaml{"SectionInsideSection", "train:\n  policy:\n    alpha: 0.5\n", "train.policy"},
        BadYaml{"NotAnInteger", "model:\n  layers: abc\n", "model.layers: 'abc' is not an integer"},
        BadYaml{"RepeatedTopLevelKey", "seed: 1\nseed: 2\n", "key 'seed' appears twice"},
        BadYaml{"RepeatedNestedKey", "train:\n  steps: 3\n  lr: 0.1\n  steps: 4\n",
                "key 'train.steps' appears twice"},
        BadYaml{"RepeatedSection", "train:\n  steps: 3\ntrain:\n  lr: 0.1\n", "key 'train' appears twice"},
        BadYaml{"RandScheduleJobOutsideTheService", "policy:\n  kind: rand\n  rand_schedule_job: job-000001\n",
                "policy.rand_schedule_job"},
        BadYaml{"FractionForInteger", "train:\n  steps: 2.5\n", "train.steps"},
        BadYaml{"NotABoolean", "model:\n  pre_ln: maybe\n", "model.pre_ln"},
        BadYaml{"NotANumber", "policy:\n  alpha: high\n", "policy.alpha"},
        BadYaml{"SequenceForScalar", "train:\n  steps: [1, 2]\n", "train.steps"},
        BadYaml{"NegativeSeed", "seed: -1\n", "seed"},
        BadYaml{"MalformedFlow", "model: [1, 2\n", "not valid YAML"},
        BadYaml{"UnclosedFlowMap", "train: {steps: 3\n", "not valid YAML"},
        BadYaml{"UnclosedSequence", "policy:\n  kind: [full\n", "not valid YAML"},
        BadYaml{"TopLevelSequence", "- a\n- b\n", "mapping"},
        BadYaml{"UnknownResourcesKey", "resources: {workers: 2, gpus: 1}\n", "resources.gpus"},
        BadYaml{"ResourcesNotAMapping", "resources: 2\n", "resources"}),
    [](const ::testing::TestParamInfo<BadYaml>& info) { return info.param.name; });

// Validation errors: an override on top of valid defaults, the text the message must contain.
struct BadValue {
  std::string name, assignment, key;
};

void PrintTo(const BadValue& c, std::ostream* os) { *os << c.assignment; }

class ValidateTest : public ::testing::TestWithParam<BadValue> {};

TEST_P(ValidateTest, IsInvalidArgumentNamingTheKey) {
  TrainConfig c;
  ASSERT_TRUE(ApplyOverride(c, GetParam().assignment).ok()) << GetParam().assignment;
  absl::Status st = ValidateTrainConfig(c);
  ASSERT_FALSE(st.ok()) << GetParam().assignment << " validated";
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr(GetParam().key));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ValidateTest,
    ::testing::Values(BadValue{"AlphaAboveOne", "policy.alpha=1.5", "policy.alpha"},
                      BadValue{"AlphaNegative", "policy.alpha=-0.1", "policy.alpha"},
                      BadValue{"ProbeSamplesOne", "policy.probe_samples=1", "policy.probe_samples"},
                      BadValue{"ProbeSamplesAboveBatch", "policy.probe_samples=33",
                               "policy.probe_samples"},
                      BadValue{"UnknownPolicyKind", "policy.kind=sometimes", "policy.kind"},
                      BadValue{"UnknownPolicyKindValue", "policy.kind=sometimes", "sometimes"},
                      BadValue{"UnknownEstimator", "policy.estimator=power", "policy.estimator"},
                      BadValue{"UnknownEstimatorValue", "policy.estimator=power", "power"},
                      BadValue{"ZeroLanczosIterations", "policy.lanczos_iterations=0",
                               "policy.lanczos_iterations"},
                      BadValue{"ZeroProbeProjections", "policy.probe_projections=0",
                               "policy.probe_projections"},
                      BadValue{"GammaOne", "policy.gamma=1", "policy.gamma"},
                      BadValue{"HugeBatch", "train.batch_size=99999999",
                               "train.batch_size must be in [1, 65536], got 99999999"},
                      BadValue{"ThousandsOfThreads", "train.threads=5000",
                               "train.threads must be in [0, 1024], got 5000"},
                      BadValue{"UnknownDelta1", "policy.delta1=first", "policy.delta1"},
                      BadValue{"UnknownBackward", "policy.backward=skip", "policy.backward"},
                      BadValue{"ZeroProbePositions", "policy.probe_positions=0",
                               "policy.probe_positions"},
                      BadValue{"VocabSizeOne", "data.vocab_size=1", "data.vocab_size"},
                      BadValue{"ZeroLayers", "model.layers=0", "model.layers"},
                      BadValue{"HeadsDoNotDivide", "model.heads=7", "model.d_model"},
                      BadValue{"SeqLenAboveMax", "data.seq_len=129", "data.seq_len"},
                      BadValue{"MaskProbOne", "data.mask_prob=1", "data.mask_prob"},
                      BadValue{"TrainFractionZero", "data.train_fraction=0", "data.train_fraction"},
                      BadValue{"TrainFractionAboveOne", "data.train_fraction=1.01",
                               "data.train_fraction"},
                      BadValue{"TrainFractionNaN", "data.train_fraction=.nan", "data.train_fraction"},
                      BadValue{"UnknownSchedule", "train.schedule=exponential", "train.schedule"},
                      BadValue{"UnknownOptimizer", "train.optimizer=lamb", "train.optimizer"},
                      BadValue{"ZeroDecayFactor", "train.decay_factor=0", "train.decay_factor"},
                      BadValue{"ZeroDecayEvery", "train.decay_every=0", "train.decay_every"},
                      BadValue{"MomentumOne", "train.momentum=1", "train.momentum"},
                      BadValue{"VggOnText", "model.kind=vgg", "data.kind"},
                      BadValue{"BertOnImages", "data.kind=fashion-mnist", "data.kind"},
                      BadValue{"UnknownDataKind", "data.kind=imagenet", "data.kind"},
                      BadValue{"UnknownModel", "model.kind=gpt", "model.kind"},
                      BadValue{"ZeroSteps", "train.steps=0", "train.steps"},
                      BadValue{"GroupsDoNotDivide", "model.ffn_groups=3", "model.ffn_groups"},
                      BadValue{"ZeroExperts", "model.experts=0", "model.experts"},
                      BadValue{"ZeroCapacity", "model.capacity_factor=0", "model.capacity_factor"},
                      BadValue{"NegativeAuxWeight", "model.aux_loss_weight=-1",
                               "model.aux_loss_weight"},
                      BadValue{"ZeroMoeEvery", "model.moe_every=0", "model.moe_every"}),
    [](const ::testing::TestParamInfo<BadValue>& info) { return info.param.name; });

TEST(ApplyOverrideTest, SetsValuesOfEveryType) {
  TrainConfig c;
  ASSERT_TRUE(ApplyOverride(c, "train.steps=40").ok());
  ASSERT_TRUE(ApplyOverride(c, "model.pre_ln=true").ok());
  ASSERT_TRUE(ApplyOverride(c, "policy.alpha=0.75").ok());
  ASSERT_TRUE(ApplyOverride(c, "policy.kind=full").ok());
  ASSERT_TRUE(ApplyOverride(c, "data.dir=/tmp/a=b").ok());  // only the first '=' splits
  ASSERT_TRUE(ApplyOverride(c, "seed=7").ok());
  EXPECT_EQ(c.train.steps, 40);
  EXPECT_TRUE(c.model.pre_ln);
  EXPECT_DOUBLE_EQ(c.policy.alpha, 0.75);
  EXPECT_EQ(c.policy.kind, "full");
  EXPECT_EQ(c.data.dir, "/tmp/a=b");
  EXPECT_EQ(c.seed, 7u);
  // A later override wins.
  ASSERT_TRUE(ApplyOverride(c, "train.steps=41").ok());
  EXPECT_EQ(c.train.steps, 41);
}

TEST(ApplyOverrideTest, RejectsUnknownKeysMalformedAssignmentsAndBadValues) {
  TrainConfig c;
  const auto before = AsMap(c);
  for (const auto& [assignment, needle] :
       std::vector<std::pair<std::string, std::string>>{{"train.stepz=3", "train.stepz"},
                                                        {"bogus=1", "bogus"},
                                                        {"model=3", "model"},
                                                        {"noequals", "noequals"},
                                                        {"=5", "=5"},
                                                        {"train.steps=abc", "train.steps"},
                                                        {"train.steps=", "train.steps"},
                                                        {"model.pre_ln=maybe", "model.pre_ln"},
                                                        {"train.steps=[1, 2]", "train.steps"}}) {
    absl::Status st = ApplyOverride(c, assignment);
    ASSERT_FALSE(st.ok()) << assignment;
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_THAT(st.message(), HasSubstr(needle)) << assignment;
  }
  EXPECT_EQ(AsMap(c), before) << "a rejected override changed the config";
}

TEST(ListConfigTest, ListsEveryKeyOnce) {
  std::vector<std::string> keys;
  for (const auto& [k, v] : ListConfig(TrainConfig{})) keys.push_back(k);
  EXPECT_EQ(keys.size(), std::set<std::string>(keys.begin(), keys.end()).size()) << "duplicates";
  EXPECT_EQ(std::set<std::string>(keys.begin(), keys.end()),
            std::set<std::string>(kAllKeys.begin(), kAllKeys.end()));
}

TEST(ListConfigTest, ReflectsValuesAndRoundTripsThroughOverrides) {
  TrainConfig c;
  ASSERT_TRUE(ApplyOverride(c, "model.layers=3").ok());
  ASSERT_TRUE(ApplyOverride(c, "model.pre_ln=true").ok());
  ASSERT_TRUE(ApplyOverride(c, "policy.kind=rand").ok());
  auto listed = AsMap(c);
  EXPECT_EQ(listed["model.layers"], "3");
  EXPECT_EQ(listed["model.pre_ln"], "true");
  EXPECT_EQ(listed["policy.kind"], "rand");
  EXPECT_EQ(listed["data.dir"], TrainConfig{}.data.dir);
  // Every listed "key: value" can be fed back through ApplyOverride and gives the same listing.
  TrainConfig copy;
  for (const auto& [k, v] : ListConfig(c)) {
    absl::Status st = ApplyOverride(copy, k + "=" + v);
    EXPECT_TRUE(st.ok()) << k << "=" << v << ": " << st;
  }
  EXPECT_EQ(AsMap(copy), listed);
}

// `mat-train --print-config` printed `model.init_from: ` (YAML null, refused when read back) and
// a data.dir holding ' #' unquoted (read back cut at the '#').
TEST(ListConfigTest, PrintedYamlReadsBackToTheSameConfig) {
  TrainConfig c;
  c.data.dir = "/data/wiki #2";
  c.model.init_from = "";
  c.policy.kind = "full";
  const std::string yaml = FormatConfigYaml(c);
  EXPECT_THAT(yaml, HasSubstr("model.init_from: \"\"\n"));
  EXPECT_THAT(yaml, HasSubstr("data.dir: \"/data/wiki #2\"\n"));
  EXPECT_THAT(yaml, HasSubstr("policy.kind: full\n"));
  absl::StatusOr<TrainConfig> back = ParseTrainConfig(yaml, "printed");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(AsMap(*back), AsMap(c));
  EXPECT_EQ(FormatConfigYaml(*back), yaml);
  // A key with nothing after it is the empty string, as `--set model.init_from=` is.
  absl::StatusOr<TrainConfig> empty =
      ParseTrainConfig("model:\n  init_from:\npolicy:\n  rand_schedule:\n", "empty");
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->model.init_from, "");
}

// `--set 'data.dir=/data/wiki #2'` silently set '/data/wiki' (YAML read the rest as a comment).
TEST(ApplyOverrideTest, AValueYamlWouldCutAtACommentIsRefusedUnlessQuoted) {
  TrainConfig c;
  absl::Status cut = ApplyOverride(c, "data.dir=/data/wiki #2");
  EXPECT_EQ(cut.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(cut.message()),
              HasSubstr("--set data.dir: '/data/wiki #2' holds a '#' that YAML reads as a "
                        "comment"));
  EXPECT_EQ(ApplyOverride(c, "data.dir=#x").code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(ApplyOverride(c, "data.dir=\"/data/wiki #2\"").ok());
  EXPECT_EQ(c.data.dir, "/data/wiki #2");
  ASSERT_TRUE(ApplyOverride(c, "data.dir=/data/wiki#2").ok());  // no space: not a comment
  EXPECT_EQ(c.data.dir, "/data/wiki#2");
}

TEST(LoadTrainConfigTest, MissingFileIsAnErrorNamingThePath) {
  const std::string path = (fs::temp_directory_path() / "mat_no_such_config.yaml").string();
  auto c = LoadTrainConfig(path);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr(path));
}

TEST(LoadTrainConfigTest, ADirectoryIsAnErrorNamingThePath) {
  std::string tmpl = (fs::temp_directory_path() / "mat_config_dir_XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  auto c = LoadTrainConfig(tmpl);
  std::error_code ec;
  fs::remove_all(tmpl, ec);
  ASSERT_FALSE(c.ok()) << "a directory was read as an empty (default) config";
  EXPECT_THAT(c.status().message(), HasSubstr(tmpl));
}

// An empty file (or one of comments only) trained the default model for 2000 steps.
TEST(LoadTrainConfigTest, AnEmptyFileIsAnErrorNamingThePath) {
  std::string tmpl = (fs::temp_directory_path() / "mat_config_XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  for (const std::string text : {"", "# only a comment\n", "\n\n"}) {
    const std::string path = tmpl + "/empty.yaml";
    { std::ofstream(path) << text; }
    auto c = LoadTrainConfig(path);
    ASSERT_FALSE(c.ok()) << "'" << text << "' trained the defaults";
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(c.status().message(), HasSubstr(path + ": the config is empty"));
  }
  std::error_code ec;
  fs::remove_all(tmpl, ec);
}

TEST(LoadTrainConfigTest, ErrorsNameTheFile) {
  std::string tmpl = (fs::temp_directory_path() / "mat_config_XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  const std::string path = tmpl + "/job.yaml";
  {
    std::ofstream out(path);
    out << "train:\n  stepz: 3\n";
  }
  auto c = LoadTrainConfig(path);
  std::error_code ec;
  fs::remove_all(tmpl, ec);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr(path));
  EXPECT_THAT(c.status().message(), HasSubstr("train.stepz"));
}

// Each of the ranks takes an equal share of the batch and probes its own share.
TEST(ValidateRankShareTest, TheBatchSplitsEvenlyAndTheProbeFitsARanksShare) {
  TrainConfig c;
  c.train.batch_size = 8;
  c.policy.probe_samples = 4;
  EXPECT_TRUE(ValidateRankShare(c, 1).ok());
  EXPECT_TRUE(ValidateRankShare(c, 2).ok());  // exactly a rank's share
  absl::Status uneven = ValidateRankShare(c, 3);
  EXPECT_EQ(uneven.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(uneven.message(), HasSubstr("train.batch_size 8 is not a multiple of the 3 ranks"));
  absl::Status probe = ValidateRankShare(c, 4);
  EXPECT_EQ(probe.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(probe.message(), HasSubstr("policy.probe_samples 4 is more than a rank's share of "
                                         "train.batch_size (2 of 8 over 4 ranks"));
}

TEST(ToPolicyConfigTest, CopiesThePolicySection) {
  TrainConfig c;
  ASSERT_TRUE(ApplyOverride(c, "policy.kind=multirate").ok());
  ASSERT_TRUE(ApplyOverride(c, "policy.alpha=0.4").ok());
  ASSERT_TRUE(ApplyOverride(c, "policy.probe_every=7").ok());
  ASSERT_TRUE(ApplyOverride(c, "policy.warmup_steps=9").ok());
  ASSERT_TRUE(ApplyOverride(c, "seed=5").ok());
  policy::PolicyConfig p = ToPolicyConfig(c);
  EXPECT_EQ(p.kind, policy::PolicyKind::kMultirate);
  EXPECT_DOUBLE_EQ(p.alpha, 0.4);
  EXPECT_EQ(p.interval_steps, 7);
  EXPECT_EQ(p.warmup_steps, 9);
  EXPECT_EQ(p.seed, 5u);
}

}  // namespace
}  // namespace mat::config

namespace mat::config {
namespace {

TEST(ActiveCountScheduleTest, ReadsCountsPerGroupAndNamesBadLines) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("mat_schedule_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return (dir / name).string();
  };
  const std::string good = write("good.jsonl",
      "{\"step\":0,\"modules\":[{\"group\":\"heads\",\"active\":true},"
      "{\"group\":\"heads\",\"active\":true},{\"group\":\"ffn\",\"active\":true}]}\n"
      "{\"step\":20,\"modules\":[{\"group\":\"heads\",\"active\":false},"
      "{\"group\":\"heads\",\"active\":true},{\"group\":\"ffn\",\"active\":false}]}\n");
  auto s = LoadActiveCountSchedule(good);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->size(), 2u);
  EXPECT_EQ((*s)[0].active.at("heads"), 2);
  EXPECT_EQ((*s)[1].step, 20);
  EXPECT_EQ((*s)[1].active.at("heads"), 1);
  EXPECT_EQ((*s)[1].active.at("ffn"), 0);

  auto bad = LoadActiveCountSchedule(write("bad.jsonl", "{\"step\":0,\"modules\":[]}\n{oops\n"));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("line 2"), std::string::npos) << bad.status();
  auto back = LoadActiveCountSchedule(
      write("back.jsonl", "{\"step\":20,\"modules\":[]}\n{\"step\":0,\"modules\":[]}\n"));
  EXPECT_EQ(back.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(LoadActiveCountSchedule((dir / "none.jsonl").string()).ok());
  fs::remove_all(dir);
}

TEST(ActiveCountScheduleTest, OnlyForKindRandAndTheControls) {
  TrainConfig c;
  c.policy.rand_schedule = "/x/decisions.jsonl";
  for (const char* kind : {"mat", "full", "multirate"}) {
    c.policy.kind = kind;
    absl::Status st = ValidateTrainConfig(c);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << kind;
    EXPECT_NE(st.message().find("for policy.kind rand, frozen-random or inverse only, got kind '" +
                                std::string(kind) + "'"),
              std::string::npos)
        << st;
  }
  for (const char* kind : {"rand", "frozen-random", "inverse"}) {
    c.policy.kind = kind;
    EXPECT_TRUE(ValidateTrainConfig(c).ok()) << kind;
  }
}

}  // namespace
}  // namespace mat::config
