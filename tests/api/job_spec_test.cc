// Tests of api/job_spec.h: job YAML -> mat.v1.JobSpec, defaults, validation and the YAML
// round trip. Every error must be INVALID_ARGUMENT and name the offending key.
#include "api/job_spec.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/util/message_differencer.h"
#include "config/train_config.h"
#include "yaml-cpp/yaml.h"

namespace mat::api {
namespace {

namespace fs = std::filesystem;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::util::MessageDifferencer;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kExamples = std::string(MAT_SOURCE_DIR) + "/examples";

// mat-train's keys, as listed in config/train_config.h and README.md (and
// config/train_config_test), less TrainerOnlyKeys(). The job schema must be exactly these plus the job-only keys (kJobOnlyKeys).
const std::vector<std::string> kTrainerKeys = {
    "seed",
    "model.kind", "model.layers", "model.d_model", "model.heads", "model.d_ff", "model.ffn_groups",
    "model.max_seq_len", "model.dropout", "model.pre_ln", "model.experts",
    "model.capacity_factor", "model.aux_loss_weight", "model.moe_every",
    "model.arch", "model.width", "model.filter_groups", "model.classifier_hidden",
    "model.init_from",
    "data.kind", "data.dir", "data.seq_len", "data.mask_prob", "data.valid_size", "data.augment",
    "data.train_fraction", "data.vocab_size",
    "train.steps", "train.batch_size", "train.optimizer", "train.lr", "train.min_lr_ratio",
    "train.warmup_steps", "train.schedule", "train.decay_every", "train.decay_factor",
    "train.weight_decay", "train.beta1", "train.beta2", "train.eps", "train.momentum",
    "train.nesterov", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.threads", "train.precision", "train.deterministic",
    "policy.kind", "policy.alpha", "policy.beta", "policy.gamma", "policy.patience",
    "policy.warmup_steps", "policy.probe_every", "policy.probe_samples", "policy.estimator",
    "policy.min_active_fraction", "policy.rand_fraction", "policy.multirate_k",
    "policy.multirate_fast_fraction", "policy.delta1", "policy.probe_projections",
    "policy.probe_positions", "policy.backward", "policy.lanczos_iterations"};

// The keys mat-train does not have: what the cluster must provide, and the stored MAT job a rand
// job replays. JobSpecToTrainerYaml leaves them out.
const std::vector<std::string> kJobOnlyKeys = {"policy.rand_schedule_job", "resources.workers",
                                               "resources.device", "resources.max_train_seconds"};

// Every set scalar of `msg` as key -> text (doubles via StrCat: 6 significant digits).
void Flatten(const Message& msg, const std::string& prefix, std::map<std::string, std::string>* out) {
  const auto* d = msg.GetDescriptor();
  const auto* r = msg.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (!r->HasField(msg, f)) continue;
    const std::string key = prefix.empty() ? f->name() : prefix + "." + f->name();
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_MESSAGE:
        Flatten(r->GetMessage(msg, f), key, out);
        break;
      case FieldDescriptor::CPPTYPE_INT32:
        (*out)[key] = absl::StrCat(r->GetInt32(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_INT64:
        (*out)[key] = absl::StrCat(r->GetInt64(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_UINT64:
        (*out)[key] = absl::StrCat(r->GetUInt64(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_DOUBLE:
        (*out)[key] = absl::StrCat(r->GetDouble(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_BOOL:
        (*out)[key] = r->GetBool(msg, f) ? "true" : "false";
        break;
      case FieldDescriptor::CPPTYPE_STRING:
        (*out)[key] = r->GetString(msg, f);
        break;
      default:
        ADD_FAILURE() << "unexpected field type of " << key;
    }
  }
}

std::map<std::string, std::string> Flatten(const v1::JobSpec& spec) {
  std::map<std::string, std::string> out;
  Flatten(spec, "", &out);
  return out;
}

// Sets every scalar of `msg` to a value unlike its default and unlike its neighbours', with
// awkward cases: doubles that need 17 digits, huge and tiny magnitudes, strings that YAML would
// read as other types or that need quoting.
void SetEverything(Message* msg, int* counter) {
  static const std::vector<std::string> kStrings = {
      "true", "~", "123", "a: b #c", "", "quote \" and \\ backslash", "ünïcødé", "- dash",
      "null", "line\nbreak", "  padded  ", "{not: a map}", "[1, 2]"};
  static const std::vector<double> kDoubles = {
      1.0 / 3.0, 0.1 + 0.2, 1e-300, 5e-4, 123456789.123456789, 0.0, -2.5, 1e300,
      std::numeric_limits<double>::denorm_min(), 0.999999999999, 7.0, -0.0, 2.0 / 3.0};
  const auto* d = msg->GetDescriptor();
  const auto* r = msg->GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    const int n = (*counter)++;
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_MESSAGE:
        SetEverything(r->MutableMessage(msg, f), counter);
        break;
      case FieldDescriptor::CPPTYPE_INT32:
        r->SetInt32(msg, f, n % 2 ? -1000 - n : std::numeric_limits<int32_t>::max() - n);
        break;
      case FieldDescriptor::CPPTYPE_INT64:
        r->SetInt64(msg, f, n % 2 ? -(int64_t{1} << 40) - n : std::numeric_limits<int64_t>::max() - n);
        break;
      case FieldDescriptor::CPPTYPE_UINT64:
        r->SetUInt64(msg, f, std::numeric_limits<uint64_t>::max() - n);
        break;
      case FieldDescriptor::CPPTYPE_DOUBLE:
        r->SetDouble(msg, f, kDoubles[n % kDoubles.size()]);
        break;
      case FieldDescriptor::CPPTYPE_BOOL:
        r->SetBool(msg, f, true);  // every default is false
        break;
      case FieldDescriptor::CPPTYPE_STRING:
        r->SetString(msg, f, kStrings[n % kStrings.size()]);
        break;
      default:
        ADD_FAILURE() << "unexpected field type of " << f->full_name();
    }
  }
}

// Equality that also tells -0.0 from 0.0 (MessageDifferencer compares doubles with ==).
void ExpectBitIdentical(const v1::JobSpec& a, const v1::JobSpec& b) {
  std::string diff;
  MessageDifferencer differ;
  differ.ReportDifferencesToString(&diff);
  EXPECT_TRUE(differ.Compare(a, b)) << diff;
  std::string sa, sb;
  ASSERT_TRUE(a.SerializeToString(&sa));
  ASSERT_TRUE(b.SerializeToString(&sb));
  EXPECT_EQ(sa, sb) << "serializations differ (a double's bits?)";
}

absl::StatusOr<v1::JobSpec> Parse(const std::string& yaml) {
  return ParseJobSpecYaml(yaml, "job.yaml");
}

// ----- parsing -----

TEST(JobSpecTest, TinyExampleParsesWithItsValuesAndValidates) {
  auto spec = LoadJobSpecYaml(kExamples + "/bert-wikitext2-tiny.yaml");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->seed(), 1u);
  EXPECT_EQ(spec->model().kind(), "bert");
  EXPECT_EQ(spec->model().layers(), 2);
  EXPECT_EQ(spec->model().d_model(), 128);
  EXPECT_EQ(spec->model().heads(), 4);
  EXPECT_EQ(spec->model().d_ff(), 512);
  EXPECT_EQ(spec->model().max_seq_len(), 64);
  EXPECT_DOUBLE_EQ(spec->model().dropout(), 0.1);
  EXPECT_EQ(spec->data().dir(), "../shared/data/wikitext-2");
  EXPECT_EQ(spec->data().seq_len(), 64);
  EXPECT_EQ(spec->train().batch_size(), 16);
  EXPECT_DOUBLE_EQ(spec->train().lr(), 1e-3);
  EXPECT_EQ(spec->train().warmup_steps(), 30);
  EXPECT_EQ(spec->policy().kind(), "mat");
  EXPECT_EQ(spec->policy().probe_samples(), 8);
  EXPECT_DOUBLE_EQ(spec->policy().min_active_fraction(), 0.25);
  // Keys the file does not set stay unset (they mean "the default").
  EXPECT_FALSE(spec->model().has_pre_ln());
  EXPECT_FALSE(spec->data().has_mask_prob());
  EXPECT_FALSE(spec->train().has_weight_decay());
  ASSERT_TRUE(spec->has_resources());
  EXPECT_EQ(spec->resources().workers(), 2);
  EXPECT_EQ(spec->resources().device(), "cpu");
  EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << ValidateJobSpec(*spec);
}

TEST(JobSpecTest, SwitchExampleParsesWithItsValuesAndValidates) {
  auto spec = LoadJobSpecYaml(kExamples + "/switch-wikitext2.yaml");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().kind(), "switch");
  EXPECT_EQ(spec->model().experts(), 8);
  EXPECT_DOUBLE_EQ(spec->model().capacity_factor(), 1.25);
  EXPECT_DOUBLE_EQ(spec->model().aux_loss_weight(), 0.01);
  EXPECT_EQ(spec->model().moe_every(), 1);
  EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << ValidateJobSpec(*spec);
}

TEST(JobSpecTest, SwitchKeysParseAndUnsetOnesTakeTheDefaults) {
  auto spec = Parse("model: {kind: switch, experts: 4, capacity_factor: 2, moe_every: 2}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().experts(), 4);
  EXPECT_DOUBLE_EQ(spec->model().capacity_factor(), 2.0);
  EXPECT_EQ(spec->model().moe_every(), 2);
  EXPECT_FALSE(spec->model().has_aux_loss_weight());
  EXPECT_DOUBLE_EQ(WithJobSpecDefaults(*spec).model().aux_loss_weight(), 0.01);
  EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << ValidateJobSpec(*spec);
}

TEST(JobSpecTest, VggSpecWithFashionMnistParsesWithItsValuesAndValidates) {
  auto spec = Parse(
      "model: {kind: vgg, arch: vgg16, width: 0.5, filter_groups: 8, classifier_hidden: 256}\n"
      "data: {kind: fashion-mnist, dir: /usr/share/datasets/fashion-mnist, valid_size: 6000,\n"
      "       augment: true}\n"
      "train: {optimizer: sgd, lr: 0.05, schedule: step, decay_every: 500, decay_factor: 0.2,\n"
      "        momentum: 0.85, nesterov: true, batch_size: 64}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().kind(), "vgg");
  EXPECT_EQ(spec->model().arch(), "vgg16");
  EXPECT_DOUBLE_EQ(spec->model().width(), 0.5);
  EXPECT_EQ(spec->model().filter_groups(), 8);
  EXPECT_EQ(spec->model().classifier_hidden(), 256);
  EXPECT_EQ(spec->data().kind(), "fashion-mnist");
  EXPECT_EQ(spec->data().dir(), "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(spec->data().valid_size(), 6000);
  EXPECT_TRUE(spec->data().augment());
  EXPECT_EQ(spec->train().optimizer(), "sgd");
  EXPECT_EQ(spec->train().schedule(), "step");
  EXPECT_EQ(spec->train().decay_every(), 500);
  EXPECT_DOUBLE_EQ(spec->train().decay_factor(), 0.2);
  EXPECT_DOUBLE_EQ(spec->train().momentum(), 0.85);
  EXPECT_TRUE(spec->train().nesterov());
  // The BERT keys stay unset; vgg ignores them.
  EXPECT_FALSE(spec->model().has_layers());
  EXPECT_FALSE(spec->data().has_seq_len());
  EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << ValidateJobSpec(*spec);
}

TEST(JobSpecTest, VggKeysTakeTheDefaultsWhenUnset) {
  auto spec = Parse("model: {kind: vgg}\ndata: {kind: cifar10}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(spec->model().has_arch());
  const v1::JobSpec full = WithJobSpecDefaults(*spec);
  EXPECT_EQ(full.model().arch(), "vgg11");
  EXPECT_DOUBLE_EQ(full.model().width(), 0.25);
  EXPECT_EQ(full.model().filter_groups(), 4);
  EXPECT_EQ(full.model().classifier_hidden(), 0);
  EXPECT_EQ(full.data().valid_size(), 5000);
  EXPECT_FALSE(full.data().augment());
  EXPECT_EQ(full.train().optimizer(), "adamw");
  EXPECT_EQ(full.train().decay_every(), 1000);
  EXPECT_DOUBLE_EQ(full.train().decay_factor(), 0.1);
  EXPECT_DOUBLE_EQ(full.train().momentum(), 0.9);
  EXPECT_FALSE(full.train().nesterov());
  EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << ValidateJobSpec(*spec);
}

TEST(JobSpecTest, NewKeysHaveTheirTypesChecked) {
  for (const auto& [yaml, key] : std::vector<std::pair<std::string, std::string>>{
           {"model: {width: wide}", "model.width: 'wide' is not a number"},
           {"model: {filter_groups: 2.5}", "model.filter_groups: '2.5' is not an integer"},
           {"model: {arch: [vgg11]}", "model.arch: expected a string"},
           {"data: {augment: sometimes}", "data.augment: 'sometimes' is not a boolean"},
           {"data: {valid_size: many}", "data.valid_size"},
           {"train: {nesterov: 2}", "train.nesterov"},
           {"train: {momentum: fast}", "train.momentum"},
           {"train: {decay_every: 1.5}", "train.decay_every"},
           {"train: {optimzer: sgd}", "train.optimzer: unknown key"}}) {
    auto spec = Parse(yaml);
    ASSERT_FALSE(spec.ok()) << "accepted: " << yaml;
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument) << spec.status();
    EXPECT_THAT(spec.status().message(), HasSubstr(key)) << yaml;
  }
}

TEST(JobSpecTest, EveryExampleParsesAndValidates) {
  int seen = 0;
  for (const auto& entry : fs::directory_iterator(kExamples)) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    ++seen;
    auto spec = LoadJobSpecYaml(entry.path().string());
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << ValidateJobSpec(*spec);
  }
  EXPECT_GE(seen, 2) << "expected the example job files in " << kExamples;
}

TEST(JobSpecTest, EmptyDocumentIsAnEmptySpec) {
  for (const std::string text : {"", "# only a comment\n", "~\n"}) {
    auto spec = Parse(text);
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->ByteSizeLong(), 0u) << "'" << text << "' set fields";
  }
}

TEST(JobSpecTest, ParsesEveryTypeAndKeepsExplicitDefaultValues) {
  auto spec = Parse(
      "seed: 18446744073709551615\n"
      "model: {layers: 3, pre_ln: true, dropout: 0, ffn_groups: 0}\n"
      "data:\n  dir: /some/where\n  mask_prob: 0.2\n"
      "train: {lr: 1.0e-3, schedule: cosine, steps: 16}\n"
      "resources: {workers: 2, device: cuda, max_train_seconds: 3600}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->seed(), std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(spec->model().layers(), 3);
  EXPECT_TRUE(spec->model().pre_ln());
  EXPECT_EQ(spec->data().dir(), "/some/where");
  EXPECT_DOUBLE_EQ(spec->data().mask_prob(), 0.2);
  EXPECT_DOUBLE_EQ(spec->train().lr(), 1e-3);
  EXPECT_EQ(spec->train().schedule(), "cosine");
  EXPECT_EQ(spec->train().steps(), 16);
  EXPECT_EQ(spec->resources().workers(), 2);
  EXPECT_EQ(spec->resources().device(), "cuda");
  EXPECT_EQ(spec->resources().max_train_seconds(), 3600);
  // Zero is a value, not "unset": presence survives and defaults do not overwrite it.
  ASSERT_TRUE(spec->model().has_dropout());
  ASSERT_TRUE(spec->model().has_ffn_groups());
  const v1::JobSpec full = WithJobSpecDefaults(*spec);
  EXPECT_EQ(full.model().dropout(), 0.0);
  EXPECT_EQ(full.model().layers(), 3);
  EXPECT_EQ(full.model().d_model(), 256);  // default filled in
  EXPECT_EQ(full.resources().workers(), 2);
}

TEST(JobSpecTest, AnEmptySectionIsPresentAndEmpty) {
  for (const std::string text : {"model:\n", "model: {}\n", "model: ~\n"}) {
    auto spec = Parse(text);
    ASSERT_TRUE(spec.ok()) << text << ": " << spec.status();
    EXPECT_TRUE(spec->has_model()) << text;
    EXPECT_EQ(spec->model().ByteSizeLong(), 0u) << text;
  }
}

// Parse errors: the YAML, the text the message must contain (the key, or what is wrong).
struct BadYaml {
  std::string name, yaml, key;
};

void PrintTo(const BadYaml& c, std::ostream* os) { *os << c.name; }

class BadYamlTest : public ::testing::TestWithParam<BadYaml> {};

TEST_P(BadYamlTest, IsInvalidArgumentNamingTheKeyAndFile) {
  auto spec = Parse(GetParam().yaml);
  ASSERT_FALSE(spec.ok()) << "accepted:\n" << GetParam().yaml;
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument) << spec.status();
  EXPECT_THAT(spec.status().message(), HasSubstr(GetParam().key));
  EXPECT_THAT(spec.status().message(), HasSubstr("job.yaml"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadYamlTest,
    ::testing::Values(
        BadYaml{"MisspelledKey", "model:\n  layres: 2\n", "model.layres: unknown key"},
        BadYaml{"UnknownTopLevelKey", "sed: 1\n", "sed: unknown key"},
        BadYaml{"UnknownSection", "optimizer:\n  lr: 0.1\n", "optimizer: unknown key"},
        BadYaml{"UnknownResourceKey", "resources: {gpus: 2}\n", "resources.gpus: unknown key"},
        BadYaml{"SectionInsideSection", "train:\n  policy:\n    alpha: 0.5\n",
                "train.policy: unknown key"},
        BadYaml{"DuplicateKey", "model:\n  layers: 2\n  layers: 3\n", "model.layers: duplicate"},
        BadYaml{"DuplicateSection", "model: {}\nmodel: {}\n", "model: duplicate"},
        BadYaml{"SectionIsAScalar", "model: 3\n", "model: expected a mapping"},
        BadYaml{"SectionIsASequence", "policy: [1, 2]\n", "policy: expected a mapping"},
        BadYaml{"MapUnderAKey", "model:\n  layers: {a: 1}\n", "model.layers"},
        BadYaml{"SequenceForScalar", "train:\n  steps: [1, 2]\n", "train.steps"},
        BadYaml{"NullValue", "train:\n  steps:\n", "train.steps: expected an integer, got null"},
        BadYaml{"NullFlag", "model:\n  pre_ln:\n", "model.pre_ln: expected a boolean, got null"},
        BadYaml{"NotAnInteger", "model:\n  layers: abc\n", "model.layers"},
        BadYaml{"FractionForInteger", "train:\n  steps: 2.5\n", "train.steps: '2.5'"},
        BadYaml{"ExponentForInteger", "train:\n  steps: 1e3\n", "train.steps"},
        BadYaml{"IntegerOverflow", "train:\n  steps: 9223372036854775808\n", "train.steps"},
        BadYaml{"Int32Overflow", "resources:\n  workers: 3000000000\n", "resources.workers"},
        BadYaml{"FractionForWorkers", "resources:\n  workers: 1.5\n", "resources.workers"},
        BadYaml{"NotABoolean", "model:\n  pre_ln: maybe\n", "model.pre_ln"},
        BadYaml{"ExpertsNotAnInteger", "model:\n  experts: many\n", "model.experts"},
        BadYaml{"CapacityNotANumber", "model:\n  capacity_factor: big\n",
                "model.capacity_factor"},
        BadYaml{"NotANumber", "policy:\n  alpha: high\n", "policy.alpha"},
        BadYaml{"NegativeSeed", "seed: -1\n", "seed"},
        BadYaml{"SeedOverflow", "seed: 18446744073709551616\n", "seed"},
        BadYaml{"NonScalarKey", "? [a, b]\n: 1\n", "key must be a scalar"},
        BadYaml{"MalformedFlow", "model: [1, 2\n", "not valid YAML"},
        BadYaml{"UnclosedFlowMap", "train: {steps: 3\n", "not valid YAML"},
        BadYaml{"TopLevelSequence", "- a\n- b\n", "mapping"},
        BadYaml{"TopLevelScalar", "hello\n", "mapping"}),
    [](const ::testing::TestParamInfo<BadYaml>& info) { return info.param.name; });

// `init_from:` with nothing after it read as "" in mat-train's config but was refused here.
TEST(JobSpecTest, AStringKeyWithNoValueIsEmpty) {
  auto spec = ParseJobSpecYaml("model:\n  init_from:\n  kind: bert\n", "job.yaml");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->model().has_init_from());
  EXPECT_EQ(spec->model().init_from(), "");
  EXPECT_EQ(spec->model().kind(), "bert");
}

// A Latin-1 path in a spec: the request could not be sent (a proto string must be UTF-8), and
// matctl said only "UNIMPLEMENTED: ". Now the key is named.
TEST(JobSpecTest, AStringThatIsNotUtf8IsRefusedNamingTheKey) {
  auto spec = ParseJobSpecYaml("data: {kind: wikitext, dir: /data/caf\xe9}\n", "latin1.yaml");
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("data.dir: not valid UTF-8"));
  auto utf8 = ParseJobSpecYaml("data: {kind: wikitext, dir: /data/caf\xc3\xa9}\n", "ok.yaml");
  ASSERT_TRUE(utf8.ok()) << utf8.status();
  EXPECT_EQ(utf8->data().dir(), "/data/caf\xc3\xa9");
}

TEST(JobSpecTest, LoadNamesAMissingFile) {
  const std::string path = (fs::temp_directory_path() / "mat_no_such_job.yaml").string();
  auto spec = LoadJobSpecYaml(path);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(spec.status().message(), HasSubstr(path));
}

// `matctl submit empty.yaml` started the default 2000-step job.
TEST(JobSpecTest, LoadRefusesAnEmptyFile) {
  const std::string path = (fs::temp_directory_path() / "mat_empty_job.yaml").string();
  for (const char* text : {"", "\n  \n", "# only a comment\n---\n", "~\n", "null\n"}) {
    std::ofstream(path) << text;
    auto spec = LoadJobSpecYaml(path);
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(spec.status().message(), HasSubstr(path + ": the job spec is empty")) << text;
  }
  std::ofstream(path) << "# a comment\ntrain: {steps: 3}\n";
  auto spec = LoadJobSpecYaml(path);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->train().steps(), 3);
  fs::remove(path);
}

// ----- schema and defaults -----

TEST(JobSpecTest, KeysAreMatTrainsSchemaPlusTheJobOnlyKeys) {
  std::vector<std::string> expected = kTrainerKeys;
  expected.insert(expected.end(), kJobOnlyKeys.begin(), kJobOnlyKeys.end());
  const std::vector<std::string> keys = JobSpecKeys();
  EXPECT_EQ(std::set<std::string>(keys.begin(), keys.end()),
            std::set<std::string>(expected.begin(), expected.end()));
  EXPECT_EQ(keys.size(), expected.size()) << "a key is listed twice";
  EXPECT_EQ(JobOnlyKeys(), kJobOnlyKeys) << "in proto field order";
}

// The two schemas cannot drift apart: every TrainConfig key is a job key, but for the trainer-only
// ones, and every job key is a TrainConfig key, but for the job-only ones.
TEST(JobSpecTest, JobKeysAreTrainConfigsKeysLessTrainerOnlyPlusJobOnly) {
  std::set<std::string> job;
  for (const std::string& k : JobSpecKeys()) job.insert(k);
  for (const std::string& k : JobOnlyKeys()) EXPECT_EQ(job.erase(k), 1u) << k;
  std::set<std::string> trainer;
  for (const auto& kv : config::ListConfig(config::TrainConfig{})) trainer.insert(kv.first);
  for (const std::string& k : TrainerOnlyKeys()) EXPECT_EQ(trainer.erase(k), 1u) << k;
  EXPECT_EQ(job, trainer);
}

// The defaults come from TrainConfig's, bit for bit (doubles included).
TEST(JobSpecTest, DefaultsAreTrainConfigsDefaults) {
  auto c = config::ParseTrainConfig(JobSpecToTrainerYaml(JobSpecDefaults()), "defaults");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(config::ListConfig(*c), config::ListConfig(config::TrainConfig{}));
}

TEST(JobSpecTest, DefaultsSetEveryKeyToTheDocumentedValue) {
  // README.md's configuration table (= config/train_config.h) and resources.
  const std::map<std::string, std::string> documented = {
      {"seed", "1"},
      {"model.kind", "bert"}, {"model.layers", "4"}, {"model.d_model", "256"},
      {"model.heads", "8"}, {"model.d_ff", "1024"}, {"model.ffn_groups", "0"},
      {"model.max_seq_len", "128"}, {"model.dropout", "0.1"}, {"model.pre_ln", "false"},
      {"model.experts", "8"}, {"model.capacity_factor", "1.25"},
      {"model.aux_loss_weight", "0.01"}, {"model.moe_every", "1"},
      {"model.arch", "vgg11"}, {"model.width", "0.25"}, {"model.filter_groups", "4"},
      {"model.classifier_hidden", "0"}, {"model.init_from", ""},
      {"data.kind", "wikitext"}, {"data.dir", "../shared/data/wikitext-2"},
      {"data.seq_len", "128"}, {"data.mask_prob", "0.15"}, {"data.valid_size", "5000"},
      {"data.augment", "false"}, {"data.train_fraction", "1"}, {"data.vocab_size", "0"},
      {"train.steps", "2000"}, {"train.batch_size", "32"}, {"train.lr", "0.0005"},
      {"train.min_lr_ratio", "0"}, {"train.warmup_steps", "100"}, {"train.schedule", "linear"},
      {"train.weight_decay", "0.01"}, {"train.beta1", "0.9"}, {"train.beta2", "0.999"},
      {"train.eps", "1e-08"}, {"train.eval_every", "200"}, {"train.eval_batches", "50"},
      {"train.checkpoint_every", "0"}, {"train.threads", "0"}, {"train.precision", "fp32"},
      {"train.optimizer", "adamw"}, {"train.decay_every", "1000"}, {"train.decay_factor", "0.1"},
      {"train.momentum", "0.9"}, {"train.nesterov", "false"},
      {"train.deterministic", "false"},
      {"policy.kind", "mat"}, {"policy.alpha", "0.3"}, {"policy.beta", "0"},
      {"policy.gamma", "0.5"}, {"policy.patience", "3"}, {"policy.warmup_steps", "200"},
      {"policy.probe_every", "20"}, {"policy.probe_samples", "16"},
      {"policy.estimator", "gram"}, {"policy.min_active_fraction", "0.25"},
      {"policy.rand_fraction", "0.5"}, {"policy.multirate_k", "4"},
      {"policy.multirate_fast_fraction", "0.5"}, {"policy.rand_schedule_job", ""},
      {"policy.delta1", "warmup"}, {"policy.probe_projections", "1"},
      {"policy.probe_positions", "1"}, {"policy.backward", "weights"},
      {"policy.lanczos_iterations", "8"},
      {"resources.workers", "1"}, {"resources.device", "cpu"},
      {"resources.max_train_seconds", "0"}};
  EXPECT_EQ(Flatten(JobSpecDefaults()), documented);
  EXPECT_TRUE(ValidateJobSpec(JobSpecDefaults()).ok()) << ValidateJobSpec(JobSpecDefaults());
  EXPECT_TRUE(ValidateJobSpec(v1::JobSpec()).ok()) << "an empty spec means all defaults";
}

// ----- validation -----

// A YAML snippet that parses but must not validate, and the text the message must contain.
struct BadValue {
  std::string name, yaml, key;
};

void PrintTo(const BadValue& c, std::ostream* os) { *os << c.yaml; }

class ValidateTest : public ::testing::TestWithParam<BadValue> {};

TEST_P(ValidateTest, IsInvalidArgumentNamingTheKey) {
  auto spec = Parse(GetParam().yaml);
  ASSERT_TRUE(spec.ok()) << spec.status();
  absl::Status st = ValidateJobSpec(*spec);
  ASSERT_FALSE(st.ok()) << GetParam().yaml << " validated";
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr(GetParam().key));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ValidateTest,
    ::testing::Values(
        BadValue{"UnknownModel", "model: {kind: gpt}", "model.kind"},
        BadValue{"ZeroLayers", "model: {layers: 0}", "model.layers"},
        BadValue{"HeadsDoNotDivide", "model: {heads: 7}", "model.d_model"},
        BadValue{"ZeroHeads", "model: {heads: 0}", "model.d_model"},
        BadValue{"ZeroDff", "model: {d_ff: 0}", "model.d_ff"},
        BadValue{"GroupsDoNotDivide", "model: {ffn_groups: 3}", "model.ffn_groups"},
        BadValue{"NegativeGroups", "model: {ffn_groups: -1}", "model.ffn_groups"},
        BadValue{"DropoutOne", "model: {dropout: 1}", "model.dropout"},
        BadValue{"DropoutNan", "model: {dropout: .nan}", "model.dropout"},
        BadValue{"ZeroExperts", "model: {kind: switch, experts: 0}", "model.experts"},
        BadValue{"TooManyExperts", "model: {kind: switch, experts: 5000}", "model.experts"},
        BadValue{"ZeroCapacity", "model: {kind: switch, capacity_factor: 0}",
                 "model.capacity_factor"},
        BadValue{"InfiniteCapacity", "model: {kind: switch, capacity_factor: .inf}",
                 "model.capacity_factor"},
        BadValue{"NegativeAuxWeight", "model: {kind: switch, aux_loss_weight: -0.1}",
                 "model.aux_loss_weight"},
        BadValue{"ZeroMoeEvery", "model: {kind: switch, moe_every: 0}", "model.moe_every"},
        BadValue{"SwitchWithFfnGroups", "model: {kind: switch, ffn_groups: 2}",
                 "model.ffn_groups"},
        BadValue{"UnknownData", "data: {kind: imagenet}", "data.kind"},
        BadValue{"UnknownArch", "model: {kind: vgg, arch: vgg19}\ndata: {kind: fashion-mnist}",
                 "model.arch"},
        BadValue{"UnknownArchValue", "model: {kind: vgg, arch: vgg19}\ndata: {kind: cifar10}",
                 "vgg19"},
        BadValue{"ZeroWidth", "model: {kind: vgg, width: 0}\ndata: {kind: fashion-mnist}",
                 "model.width"},
        BadValue{"WidthAbove64", "model: {kind: vgg, width: 65}\ndata: {kind: fashion-mnist}",
                 "model.width"},
        BadValue{"InfiniteWidth", "model: {kind: vgg, width: .inf}\ndata: {kind: fashion-mnist}",
                 "model.width"},
        BadValue{"ZeroFilterGroups",
                 "model: {kind: vgg, filter_groups: 0}\ndata: {kind: fashion-mnist}",
                 "model.filter_groups"},
        // width 0.25: the first layer has round(64 · 0.25) = 16 channels.
        BadValue{"MoreFilterGroupsThanChannels",
                 "model: {kind: vgg, filter_groups: 17}\ndata: {kind: fashion-mnist}",
                 "model.filter_groups must be <= 16"},
        BadValue{"NegativeClassifierHidden",
                 "model: {kind: vgg, classifier_hidden: -1}\ndata: {kind: cifar10}",
                 "model.classifier_hidden"},
        BadValue{"ZeroValidSize", "model: {kind: vgg}\ndata: {kind: cifar10, valid_size: 0}",
                 "data.valid_size"},
        BadValue{"VggWithWikitext", "model: {kind: vgg}",
                 "data.kind wikitext does not fit model.kind vgg"},
        BadValue{"BertWithFashionMnist", "data: {kind: fashion-mnist}",
                 "data.kind fashion-mnist does not fit model.kind bert"},
        BadValue{"SwitchWithCifar", "model: {kind: switch}\ndata: {kind: cifar10}",
                 "data.kind cifar10 does not fit model.kind switch"},
        BadValue{"SeqLenAboveMax", "data: {seq_len: 129}", "data.seq_len"},
        BadValue{"SeqLenOne", "data: {seq_len: 1}", "data.seq_len"},
        BadValue{"MaskProbOne", "data: {mask_prob: 1}", "data.mask_prob"},
        BadValue{"TrainFractionZero", "data: {train_fraction: 0}",
                 "data.train_fraction must be in (0, 1], got 0"},
        BadValue{"TrainFractionAboveOne", "data: {train_fraction: 1.5}", "data.train_fraction"},
        BadValue{"TrainFractionOfImagesZero",
                 "model: {kind: vgg}\ndata: {kind: fashion-mnist, train_fraction: -0.5}",
                 "data.train_fraction"},
        BadValue{"MaskProbZero", "data: {mask_prob: 0}", "data.mask_prob"},
        BadValue{"ZeroSteps", "train: {steps: 0}", "train.steps"},
        BadValue{"ZeroBatch", "train: {batch_size: 0}", "train.batch_size"},
        BadValue{"ZeroLr", "train: {lr: 0}", "train.lr"},
        BadValue{"InfiniteLr", "train: {lr: .inf}", "train.lr must be a finite number"},
        BadValue{"MinLrRatioAboveOne", "train: {min_lr_ratio: 1.5}", "train.min_lr_ratio"},
        BadValue{"NegativeWarmup", "train: {warmup_steps: -1}", "train.warmup_steps"},
        BadValue{"UnknownSchedule", "train: {schedule: exponential}", "train.schedule"},
        BadValue{"NegativeDecay", "train: {weight_decay: -0.1}", "train.weight_decay"},
        BadValue{"Beta1One", "train: {beta1: 1}", "train.beta1"},
        BadValue{"Beta2Negative", "train: {beta2: -0.5}", "train.beta2"},
        BadValue{"InfiniteEps", "train: {eps: -.inf}", "train.eps"},
        BadValue{"ZeroEvalEvery", "train: {eval_every: 0}", "train.eval_every"},
        BadValue{"NegativeEvalBatches", "train: {eval_batches: -1}", "train.eval_batches"},
        BadValue{"NegativeCheckpointEvery", "train: {checkpoint_every: -5}",
                 "train.checkpoint_every"},
        BadValue{"NegativeThreads", "train: {threads: -1}", "train.threads"},
        BadValue{"UnknownOptimizer", "train: {optimizer: adam}", "train.optimizer"},
        BadValue{"UnknownOptimizerValue", "train: {optimizer: adam}", "'adam'"},
        BadValue{"ZeroDecayEvery", "train: {schedule: step, decay_every: 0}", "train.decay_every"},
        BadValue{"ZeroDecayFactor", "train: {schedule: step, decay_factor: 0}",
                 "train.decay_factor"},
        BadValue{"DecayFactorAboveOne", "train: {decay_factor: 1.5}", "train.decay_factor"},
        BadValue{"MomentumOne", "train: {optimizer: sgd, momentum: 1}", "train.momentum"},
        BadValue{"NegativeMomentum", "train: {momentum: -0.1}", "train.momentum"},
        BadValue{"NesterovWithoutMomentum", "train: {optimizer: sgd, momentum: 0, nesterov: true}",
                 "train.nesterov needs train.momentum > 0"},
        BadValue{"ProbeSamplesOne", "policy: {probe_samples: 1}", "policy.probe_samples"},
        BadValue{"ProbeSamplesAboveBatch", "policy: {probe_samples: 33}", "policy.probe_samples"},
        BadValue{"ZeroProbeEvery", "policy: {probe_every: 0}", "policy.probe_every"},
        BadValue{"UnknownPrecision", "train: {precision: fp16}", "train.precision"},
        BadValue{"UnknownEstimator", "policy: {estimator: power}", "policy.estimator"},
        BadValue{"ZeroPatience", "policy: {patience: 0}", "policy.patience"},
        BadValue{"HugePatience", "policy: {patience: 4294967297}", "policy.patience"},
        BadValue{"UnknownPolicyKind", "policy: {kind: sometimes}", "policy.kind"},
        BadValue{"UnknownPolicyKindValue", "policy: {kind: sometimes}", "sometimes"},
        BadValue{"AlphaAboveOne", "policy: {alpha: 1.5}", "policy.alpha"},
        BadValue{"AlphaNegative", "policy: {alpha: -0.1}", "policy.alpha"},
        BadValue{"BetaAboveOne", "policy: {beta: 2}", "policy.beta"},
        BadValue{"GammaOne", "policy: {gamma: 1}", "policy.gamma"},
        BadValue{"UnknownDelta1", "policy: {delta1: first}", "policy.delta1"},
        BadValue{"UnknownBackward", "policy: {backward: skip}", "policy.backward"},
        BadValue{"ZeroProbePositions", "policy: {probe_positions: 0}", "policy.probe_positions"},
        BadValue{"ZeroProbeProjections", "policy: {probe_projections: 0}",
                 "policy.probe_projections"},
        BadValue{"VocabSizeOne", "data: {vocab_size: 1}", "data.vocab_size"},
        BadValue{"NegativePolicyWarmup", "policy: {warmup_steps: -1}", "policy.warmup_steps"},
        BadValue{"MinActiveAboveOne", "policy: {min_active_fraction: 1.1}",
                 "policy.min_active_fraction"},
        BadValue{"RandFractionNegative", "policy: {rand_fraction: -1}", "policy.rand_fraction"},
        BadValue{"ZeroMultirateK", "policy: {multirate_k: 0}", "policy.multirate_k"},
        BadValue{"HugeMultirateK", "policy: {multirate_k: 4294967300}", "policy.multirate_k"},
        BadValue{"FastFractionAboveOne", "policy: {multirate_fast_fraction: 3}",
                 "policy.multirate_fast_fraction"},
        BadValue{"ReplayForTheDefaultKindMat", "policy: {rand_schedule_job: job-000001}",
                 "policy.rand_schedule_job replays a MAT job's decisions for policy.kind "
                 "rand, frozen-random or inverse only, got kind 'mat'"},
        BadValue{"ReplayForKindFull", "policy: {kind: full, rand_schedule_job: job-000001}",
                 "policy.rand_schedule_job"},
        BadValue{"ReplayForKindMultirate",
                 "policy: {kind: multirate, rand_schedule_job: job-000001}",
                 "policy.rand_schedule_job"},
        BadValue{"ZeroWorkers", "resources: {workers: 0}", "resources.workers"},
        BadValue{"NegativeWorkers", "resources: {workers: -2}", "resources.workers"},
        BadValue{"UnknownDevice", "resources: {device: tpu}", "resources.device"},
        BadValue{"NegativeTimeLimit", "resources: {max_train_seconds: -1}",
                 "resources.max_train_seconds must be a number of seconds >= 0"},
        BadValue{"NaNTimeLimit", "resources: {max_train_seconds: .nan}",
                 "resources.max_train_seconds"},
        BadValue{"BatchNotSplittable", "resources: {workers: 3}", "resources.workers"},
        BadValue{"ProbeAbovePerRankBatch", "resources: {workers: 4}", "policy.probe_samples"}),
    [](const ::testing::TestParamInfo<BadValue>& info) { return info.param.name; });

TEST(JobSpecTest, BoundaryValuesValidate) {
  for (const std::string yaml :
       {"policy: {alpha: 0, beta: 1, gamma: 0, min_active_fraction: 1}",
        "policy: {alpha: 1, probe_samples: 2}",
        "model: {dropout: 0, ffn_groups: 4}",
        "model: {kind: switch}",
        "model: {kind: switch, experts: 1, capacity_factor: 0.01, aux_loss_weight: 0, "
        "moe_every: 9}",
        "data: {seq_len: 2}",
        "data: {seq_len: 128}",
        "train: {min_lr_ratio: 1, warmup_steps: 0, eval_batches: 0, threads: 0}",
        "resources: {workers: 2, device: cuda}",
        "resources: {workers: 32}\npolicy: {probe_samples: 2, kind: full}\ntrain: {batch_size: 64}",
        "policy: {kind: rand}", "policy: {kind: multirate, multirate_k: 1}",
        "policy: {kind: rand, rand_schedule_job: job-000001}",
        "policy: {kind: frozen-random, rand_schedule_job: job-000001}",
        "policy: {kind: inverse, rand_schedule_job: job-000001}",
        "policy: {kind: mat, rand_schedule_job: ''}",
        "policy: {estimator: exact}", "policy: {estimator: lanczos}",
        "policy: {estimator: exact-output}", "train: {schedule: constant}",
        "train: {schedule: step, decay_every: 1, decay_factor: 1}",
        "train: {optimizer: sgd, momentum: 0, nesterov: false, weight_decay: 0}",
        "train: {optimizer: sgd, momentum: 0.99, nesterov: true}",
        "model: {kind: vgg}\ndata: {kind: fashion-mnist}",
        "model: {kind: vgg, arch: vgg16, width: 64, filter_groups: 4096, classifier_hidden: 0}\n"
        "data: {kind: cifar10, valid_size: 1, augment: true}",
        "model: {kind: vgg, width: 0.001, filter_groups: 1}\ndata: {kind: fashion-mnist}",
        // vgg skips the BERT-only checks: these shapes would not do for bert.
        "model: {kind: vgg, layers: 0, heads: 7, ffn_groups: 3, dropout: 1}\n"
        "data: {kind: cifar10, seq_len: 1, mask_prob: 0}"}) {
    auto spec = Parse(yaml);
    ASSERT_TRUE(spec.ok()) << yaml << ": " << spec.status();
    EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << yaml << ": " << ValidateJobSpec(*spec);
  }
}

// ----- YAML round trip -----

TEST(JobSpecYamlTest, EveryFieldRoundTripsBitForBit) {
  v1::JobSpec spec;
  int counter = 0;
  SetEverything(&spec, &counter);
  ASSERT_EQ(Flatten(spec).size(), JobSpecKeys().size()) << "SetEverything missed a field";
  const std::string yaml = JobSpecToYaml(spec);
  auto back = Parse(yaml);
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << yaml;
  ExpectBitIdentical(spec, *back);
  EXPECT_EQ(Flatten(*back).size(), JobSpecKeys().size()) << yaml;
}

TEST(JobSpecYamlTest, NonFiniteNumbersRoundTrip) {
  v1::JobSpec spec;
  spec.mutable_train()->set_lr(std::numeric_limits<double>::infinity());
  spec.mutable_train()->set_eps(-std::numeric_limits<double>::infinity());
  spec.mutable_policy()->set_alpha(std::numeric_limits<double>::quiet_NaN());
  const std::string yaml = JobSpecToYaml(spec);
  auto back = Parse(yaml);
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << yaml;
  EXPECT_EQ(back->train().lr(), std::numeric_limits<double>::infinity()) << yaml;
  EXPECT_EQ(back->train().eps(), -std::numeric_limits<double>::infinity()) << yaml;
  EXPECT_TRUE(std::isnan(back->policy().alpha())) << yaml;
}

TEST(JobSpecYamlTest, UnsetFieldsStayUnset) {
  v1::JobSpec partial;
  partial.mutable_model()->set_layers(3);
  partial.mutable_model()->set_dropout(0.0);  // set to zero: must stay set
  partial.mutable_data();                     // present, empty section
  for (const v1::JobSpec& spec : {v1::JobSpec(), partial}) {
    const std::string yaml = JobSpecToYaml(spec);
    auto back = Parse(yaml);
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << yaml;
    ExpectBitIdentical(spec, *back);
  }
  const std::string yaml = JobSpecToYaml(partial);
  EXPECT_THAT(yaml, Not(HasSubstr("d_model"))) << yaml;
  EXPECT_THAT(yaml, HasSubstr("dropout")) << yaml;
}

TEST(JobSpecYamlTest, TinyExampleRoundTrips) {
  auto spec = LoadJobSpecYaml(kExamples + "/bert-wikitext2-tiny.yaml");
  ASSERT_TRUE(spec.ok()) << spec.status();
  for (const v1::JobSpec& s : {*spec, WithJobSpecDefaults(*spec)}) {
    auto back = Parse(JobSpecToYaml(s));
    ASSERT_TRUE(back.ok()) << back.status();
    ExpectBitIdentical(s, *back);
  }
}

// The job_spec.yaml a job gives back (`matctl download`: the spec as accepted, defaults filled in,
// rand_schedule_job "" among them) is also a mat-train config, so a service job reruns locally.
// A replay of a stored job is the service's alone: mat-train refuses it naming the key.
TEST(JobSpecYamlTest, TheGivenBackSpecIsAMatTrainConfig) {
  auto spec = LoadJobSpecYaml(kExamples + "/bert-wikitext2-tiny.yaml");
  ASSERT_TRUE(spec.ok()) << spec.status();
  const std::string yaml = JobSpecToYaml(WithJobSpecDefaults(*spec));
  ASSERT_THAT(yaml, HasSubstr("rand_schedule_job")) << yaml;
  absl::StatusOr<config::TrainConfig> config = config::ParseTrainConfig(yaml, "job_spec.yaml");
  ASSERT_TRUE(config.ok()) << config.status() << "\n" << yaml;
  EXPECT_TRUE(config::ValidateTrainConfig(*config).ok()) << config::ValidateTrainConfig(*config);
  EXPECT_EQ(config->policy.kind, spec->policy().kind());

  v1::JobSpec replay = WithJobSpecDefaults(*spec);
  replay.mutable_policy()->set_kind("rand");
  replay.mutable_policy()->set_rand_schedule_job("job-000001");
  absl::StatusOr<config::TrainConfig> refused =
      config::ParseTrainConfig(JobSpecToYaml(replay), "job_spec.yaml");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("job_spec.yaml: policy.rand_schedule_job"));
}

TEST(JobSpecYamlTest, TrainerYamlHasEveryTrainerKeyAndNoJobOnlyKey) {
  v1::JobSpec spec = WithJobSpecDefaults(v1::JobSpec());
  spec.mutable_resources()->set_workers(4);
  spec.mutable_policy()->set_kind("rand");
  spec.mutable_policy()->set_rand_schedule_job("job-000001");
  const std::string yaml = JobSpecToTrainerYaml(spec);
  const YAML::Node root = YAML::Load(yaml);
  ASSERT_TRUE(root.IsMap()) << yaml;
  EXPECT_FALSE(root["resources"]) << "mat-train rejects a resources section:\n" << yaml;
  EXPECT_FALSE(root["policy"]["rand_schedule_job"])
      << "mat-train rejects an unknown policy key:\n" << yaml;
  absl::StatusOr<config::TrainConfig> config = config::ParseTrainConfig(yaml, "trainer.yaml");
  ASSERT_TRUE(config.ok()) << config.status() << "\n" << yaml;
  EXPECT_TRUE(config::ValidateTrainConfig(*config).ok()) << config::ValidateTrainConfig(*config);
  EXPECT_EQ(config->policy.kind, "rand");
  EXPECT_EQ(config->policy.rand_schedule, "") << "the worker gets no file to replay";
  for (const std::string& key : kTrainerKeys) {
    const size_t dot = key.find('.');
    const YAML::Node value =
        dot == std::string::npos ? root[key] : root[key.substr(0, dot)][key.substr(dot + 1)];
    EXPECT_TRUE(value && value.IsScalar()) << key << " missing from\n" << yaml;
  }
  // Everything but the job-only keys comes back.
  auto back = Parse(yaml);
  ASSERT_TRUE(back.ok()) << back.status();
  v1::JobSpec expected = spec;
  expected.clear_resources();
  expected.mutable_policy()->clear_rand_schedule_job();
  ExpectBitIdentical(expected, *back);
}

// The config text a worker hands mat-train: ParseTrainConfig and ValidateTrainConfig (the
// trainer's own rules) accept it and read back every value the spec holds.
TEST(JobSpecYamlTest, VggTrainerYamlIsAValidMatTrainConfigWithTheSpecsValues) {
  auto spec = Parse(
      "seed: 7\n"
      "model: {kind: vgg, arch: vgg16, width: 0.125, filter_groups: 2, classifier_hidden: 32}\n"
      "data: {kind: fashion-mnist, dir: /usr/share/datasets/fashion-mnist, valid_size: 1000,\n"
      "       augment: true}\n"
      "train: {optimizer: sgd, lr: 0.1, schedule: step, decay_every: 300, decay_factor: 0.5,\n"
      "        momentum: 0.8, nesterov: true, weight_decay: 0.0005, batch_size: 16}\n"
      "policy: {probe_samples: 4}\n"
      "resources: {workers: 2}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_TRUE(ValidateJobSpec(*spec).ok()) << ValidateJobSpec(*spec);
  const std::string yaml = JobSpecToTrainerYaml(WithJobSpecDefaults(*spec));
  absl::StatusOr<config::TrainConfig> config = config::ParseTrainConfig(yaml, "trainer.yaml");
  ASSERT_TRUE(config.ok()) << config.status() << "\n" << yaml;
  EXPECT_TRUE(config::ValidateTrainConfig(*config).ok())
      << config::ValidateTrainConfig(*config) << "\n" << yaml;
  EXPECT_EQ(config->seed, 7u);
  EXPECT_EQ(config->model.kind, "vgg");
  EXPECT_EQ(config->model.arch, "vgg16");
  EXPECT_EQ(config->model.width, 0.125);
  EXPECT_EQ(config->model.filter_groups, 2);
  EXPECT_EQ(config->model.classifier_hidden, 32);
  EXPECT_EQ(config->data.kind, "fashion-mnist");
  EXPECT_EQ(config->data.dir, "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(config->data.valid_size, 1000);
  EXPECT_TRUE(config->data.augment);
  EXPECT_EQ(config->train.optimizer, "sgd");
  EXPECT_EQ(config->train.lr, 0.1);
  EXPECT_EQ(config->train.schedule, "step");
  EXPECT_EQ(config->train.decay_every, 300);
  EXPECT_EQ(config->train.decay_factor, 0.5);
  EXPECT_EQ(config->train.momentum, 0.8);
  EXPECT_TRUE(config->train.nesterov);
  EXPECT_EQ(config->train.weight_decay, 0.0005);
  EXPECT_EQ(config->train.batch_size, 16);
  EXPECT_EQ(config->policy.probe_samples, 4);
}

// Every key's default in JobSpecDefaults() is mat-train's (config/train_config.h), so a trainer
// handed WithJobSpecDefaults(spec) runs what the README documents.
TEST(JobSpecYamlTest, DefaultsAreMatTrainsDefaults) {
  const std::string yaml = JobSpecToTrainerYaml(JobSpecDefaults());
  absl::StatusOr<config::TrainConfig> config = config::ParseTrainConfig(yaml, "trainer.yaml");
  ASSERT_TRUE(config.ok()) << config.status() << "\n" << yaml;
  const auto from_spec = config::ListConfig(*config);
  const auto defaults = config::ListConfig(config::TrainConfig());
  ASSERT_EQ(from_spec.size(), defaults.size());
  for (size_t i = 0; i < defaults.size(); ++i) {
    EXPECT_EQ(from_spec[i], defaults[i]) << "the job spec's default of " << defaults[i].first;
  }
}

TEST(JobSpecYamlTest, StringsThatLookLikeOtherTypesStayStrings) {
  v1::JobSpec spec;
  spec.mutable_data()->set_dir("true");
  spec.mutable_model()->set_kind("123");
  spec.mutable_train()->set_schedule("~");
  const YAML::Node root = YAML::Load(JobSpecToYaml(spec));
  // A YAML 1.2 reader that resolves plain scalars would turn these into a bool, an int and null;
  // quoted, they are strings for everyone.
  EXPECT_EQ(root["data"]["dir"].Tag(), "!");
  EXPECT_EQ(root["model"]["kind"].Tag(), "!");
  EXPECT_EQ(root["train"]["schedule"].Tag(), "!");
  EXPECT_EQ(root["train"]["schedule"].as<std::string>(), "~");
}

}  // namespace
}  // namespace mat::api

// ----- admission limits -----

namespace mat::api {
namespace {

TEST(JobSpecLimitsTest, EstimateModelParamsCountsTheBertLayout) {
  v1::JobSpec spec;
  v1::ModelSpec* m = spec.mutable_model();
  m->set_layers(1);
  m->set_d_model(4);
  m->set_heads(2);
  m->set_d_ff(8);
  m->set_max_seq_len(3);
  // embeddings 10*4 + 3*4 + LN 8 = 60; layer: attention 4*16+16 = 80, FFN 2*4*8+8+4 = 76,
  // LNs 16 -> 172; head: 16+4+8+10 = 38.
  EXPECT_DOUBLE_EQ(EstimateModelParams(spec, 10), 60 + 172 + 38);
  // BERT-base's shape is about 110 M parameters with a 30k vocabulary.
  m->set_layers(12);
  m->set_d_model(768);
  m->set_heads(12);
  m->set_d_ff(3072);
  m->set_max_seq_len(512);
  EXPECT_NEAR(EstimateModelParams(spec, 30522), 110e6, 1e6);
}

TEST(JobSpecLimitsTest, EstimateModelParamsCountsTheSwitchLayout) {
  v1::JobSpec spec;
  v1::ModelSpec* m = spec.mutable_model();
  m->set_layers(3);
  m->set_d_model(4);
  m->set_heads(2);
  m->set_d_ff(8);
  m->set_max_seq_len(3);
  const double bert = EstimateModelParams(spec, 10);
  m->set_kind("switch");
  m->set_experts(5);
  m->set_moe_every(2);  // layers 0 and 2
  // Per Switch layer: 4 more FFNs of 76 and a router 4*5+5 = 25.
  EXPECT_DOUBLE_EQ(EstimateModelParams(spec, 10), bert + 2 * (4 * 76 + 25));
}

// Hand count of the VGG-11 layout at width 1/32: channels 2, 4, 8, 8, 16, 16, 16, 16.
TEST(JobSpecLimitsTest, EstimateModelParamsCountsTheVggLayout) {
  v1::JobSpec spec;
  spec.mutable_model()->set_kind("vgg");
  spec.mutable_model()->set_width(1.0 / 32);
  spec.mutable_model()->set_filter_groups(1);
  spec.mutable_data()->set_kind("fashion-mnist");  // 1 input channel
  // Per conv layer: 9 · C_in · C_out kernel weights and 2 · C_out BatchNorm scale and shift.
  double convs = 0;
  const std::vector<double> channels = {1, 2, 4, 8, 8, 16, 16, 16, 16};
  for (size_t l = 1; l < channels.size(); ++l) {
    convs += 9 * channels[l - 1] * channels[l] + 2 * channels[l];
  }
  EXPECT_DOUBLE_EQ(EstimateModelParams(spec), convs + 16 * 10 + 10);  // vocab_size unused
  spec.mutable_model()->set_classifier_hidden(5);
  EXPECT_DOUBLE_EQ(EstimateModelParams(spec, 10), convs + (16 * 5 + 5) + (5 * 10 + 10));
  spec.mutable_data()->set_kind("cifar10");  // 3 input channels: 9 · 2 · 2 more in layer 0
  EXPECT_DOUBLE_EQ(EstimateModelParams(spec), convs + 36 + (16 * 5 + 5) + (5 * 10 + 10));
  // Widths below 1/128 keep one channel per layer (max(1, round(c · width))).
  spec.mutable_model()->set_width(1e-6);
  spec.mutable_model()->set_classifier_hidden(0);
  EXPECT_DOUBLE_EQ(EstimateModelParams(spec), (9 * 3 + 2) + 7 * (9 + 2) + 1 * 10 + 10);
}

TEST(JobSpecLimitsTest, EstimateModelParamsOfFullWidthVggIsThePublishedSize) {
  // VGG-16's conv layers (configuration D, 3 input channels) hold 14,714,688 parameters with
  // biases, of which 4,224 biases; without them, with BatchNorm (2 · 4,224) and a 512 -> 10
  // classifier (5,130): 14,724,042. VGG-11's (A): 9,217,728 kernel weights + 2 · 2,752 + 5,130.
  v1::JobSpec spec;
  spec.mutable_model()->set_kind("vgg");
  spec.mutable_model()->set_arch("vgg16");
  spec.mutable_model()->set_width(1.0);
  spec.mutable_data()->set_kind("cifar10");
  EXPECT_DOUBLE_EQ(EstimateModelParams(spec), 14724042);
  spec.mutable_model()->set_arch("vgg11");
  EXPECT_DOUBLE_EQ(EstimateModelParams(spec), 9217728 + 2 * 2752 + 5130);
}

TEST(JobSpecLimitsTest, VggModelSizeIsLimitedNamingItsShape) {
  v1::JobSpec spec;
  spec.mutable_model()->set_kind("vgg");
  spec.mutable_model()->set_arch("vgg16");
  spec.mutable_model()->set_width(64);  // ~6e10 parameters
  spec.mutable_data()->set_kind("cifar10");
  absl::Status s = CheckJobSpecLimits(spec, JobSpecLimits{});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("(vgg16, width 64, classifier_hidden 0)"));
  EXPECT_THAT(s.message(), HasSubstr("the limit is 1e+09 (--max-model-params)"));
  spec.mutable_model()->set_width(0.25);
  EXPECT_TRUE(CheckJobSpecLimits(spec, JobSpecLimits{}).ok());
}

TEST(JobSpecLimitsTest, DefaultsAdmitTheExamples) {
  for (const auto& entry : fs::directory_iterator(kExamples)) {
    if (entry.path().extension() != ".yaml") continue;
    auto spec = LoadJobSpecYaml(entry.path().string());
    if (!spec.ok()) continue;  // not a job spec
    EXPECT_TRUE(CheckJobSpecLimits(*spec, JobSpecLimits{}).ok()) << entry.path();
  }
}

TEST(JobSpecLimitsTest, SpecSizeIsLimitedNamingSizeAndLimit) {
  v1::JobSpec spec;
  spec.mutable_data()->set_dir("/d/" + std::string(100, 'x'));
  JobSpecLimits limits;
  limits.max_spec_bytes = 50;
  absl::Status s = CheckJobSpecLimits(spec, limits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("job spec is ", spec.ByteSizeLong(),
                                                  " bytes; the limit is 50 (--max-spec-bytes)")));
  limits.max_spec_bytes = 0;  // no limit
  EXPECT_TRUE(CheckJobSpecLimits(spec, limits).ok());
}

TEST(JobSpecLimitsTest, DataDirMustBeUnderARootWhenRootsAreSet) {
  v1::JobSpec spec;
  JobSpecLimits limits;
  // No roots: anything, the relative default included.
  EXPECT_TRUE(CheckJobSpecLimits(spec, limits).ok());
  limits.data_roots = {"/srv/data", "/scratch"};
  absl::Status s = CheckJobSpecLimits(spec, limits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("data.dir: '../shared/data/wikitext-2' is a relative path"));
  spec.mutable_data()->set_dir("/srv/data/../../etc");
  s = CheckJobSpecLimits(spec, limits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("not under a data root (/srv/data, /scratch) (--data-root)"));
  spec.mutable_data()->set_dir("/scratch/wikitext-2");
  EXPECT_TRUE(CheckJobSpecLimits(spec, limits).ok());
  // model.init_from is a file the worker reads too: under the same roots.
  spec.mutable_model()->set_init_from("/home/someone/model.safetensors");
  s = CheckJobSpecLimits(spec, limits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model.init_from: '/home/someone/model.safetensors'"));
  spec.mutable_model()->set_init_from("/srv/data/runs/model.safetensors");
  EXPECT_TRUE(CheckJobSpecLimits(spec, limits).ok());
}

TEST(JobSpecLimitsTest, ModelSizeIsLimited) {
  v1::JobSpec spec;
  spec.mutable_model()->set_layers(48);
  spec.mutable_model()->set_d_model(4096);
  spec.mutable_model()->set_heads(32);
  spec.mutable_model()->set_d_ff(16384);
  JobSpecLimits limits;  // 1e9 by default
  absl::Status s = CheckJobSpecLimits(spec, limits);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("layers 48, d_model 4096, d_ff 16384"));
  EXPECT_THAT(s.message(), HasSubstr("the limit is 1e+09 (--max-model-params)"));
  limits.max_model_params = 0;
  EXPECT_TRUE(CheckJobSpecLimits(spec, limits).ok());
}

}  // namespace
}  // namespace mat::api
