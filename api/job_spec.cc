// Sections: reflection helpers · YAML -> JobSpec · JobSpec -> YAML · defaults and validation
// (through config/train_config.h) · admission limits.
#include "api/job_spec.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/path_util.h"
#include "common/status.h"
#include "config/train_config.h"
#include "config/vgg_layout.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "google/protobuf/stubs/common.h"
#include "yaml-cpp/yaml.h"

namespace mat::api {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

// ----- reflection helpers -----

// What a value of this field must be, for messages ("an integer").
std::string TypeName(const FieldDescriptor* f) {
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32:
      return "a 32-bit integer";
    case FieldDescriptor::CPPTYPE_INT64:
      return "an integer";
    case FieldDescriptor::CPPTYPE_UINT32:
    case FieldDescriptor::CPPTYPE_UINT64:
      return "a non-negative integer";
    case FieldDescriptor::CPPTYPE_FLOAT:
    case FieldDescriptor::CPPTYPE_DOUBLE:
      return "a number";
    case FieldDescriptor::CPPTYPE_BOOL:
      return "a boolean";
    case FieldDescriptor::CPPTYPE_STRING:
      return "a string";
    case FieldDescriptor::CPPTYPE_MESSAGE:
      return "a mapping";
    default:
      return "a supported value";
  }
}

std::string NodeKind(const YAML::Node& n) {
  if (n.IsNull()) return "null";
  if (n.IsMap()) return "a mapping";
  if (n.IsSequence()) return "a sequence";
  return "a scalar";
}

template <typename T>
bool Convert(const YAML::Node& n, T* out) {
  try {
    *out = n.as<T>();
    return true;
  } catch (const YAML::Exception&) {
    return false;
  }
}

// ----- YAML -> JobSpec -----

absl::Status SetScalar(const YAML::Node& value, const FieldDescriptor* f, const std::string& key,
                       Message* msg) {
  // `init_from:` with nothing after it is the empty string, as in mat-train's config
  // (config/train_config.h); a number or a flag has no empty value.
  if (value.IsNull() && f->cpp_type() == FieldDescriptor::CPPTYPE_STRING) {
    msg->GetReflection()->SetString(msg, f, "");
    return absl::OkStatus();
  }
  if (!value.IsScalar()) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": expected ", TypeName(f), ", got ", NodeKind(value)));
  }
  const Reflection* r = msg->GetReflection();
  bool ok = false;
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32: {
      int32_t v = 0;
      if ((ok = Convert(value, &v))) r->SetInt32(msg, f, v);
      break;
    }
    case FieldDescriptor::CPPTYPE_INT64: {
      int64_t v = 0;
      if ((ok = Convert(value, &v))) r->SetInt64(msg, f, v);
      break;
    }
    case FieldDescriptor::CPPTYPE_UINT64: {
      uint64_t v = 0;
      if ((ok = Convert(value, &v))) r->SetUInt64(msg, f, v);
      break;
    }
    case FieldDescriptor::CPPTYPE_DOUBLE: {
      double v = 0;
      if ((ok = Convert(value, &v))) r->SetDouble(msg, f, v);
      break;
    }
    case FieldDescriptor::CPPTYPE_BOOL: {
      bool v = false;
      if ((ok = Convert(value, &v))) r->SetBool(msg, f, v);
      break;
    }
    case FieldDescriptor::CPPTYPE_STRING: {
      std::string v;
      if ((ok = Convert(value, &v))) {
        // A proto string must be UTF-8: otherwise the request cannot be sent, and the user saw
        // an empty "UNIMPLEMENTED:" instead of the key.
        if (!google::protobuf::internal::IsStructurallyValidUTF8(v)) {
          return absl::InvalidArgumentError(
              absl::StrCat(key, ": not valid UTF-8 (save the file as UTF-8)"));
        }
        r->SetString(msg, f, v);
      }
      break;
    }
    default:
      return absl::InternalError(absl::StrCat(key, ": unsupported field type in the proto"));
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": '", value.Scalar(), "' is not ", TypeName(f)));
  }
  return absl::OkStatus();
}

// Sets the fields of `msg` from the mapping `node`; `prefix` is the section's key ("" at the top).
absl::Status ParseMessage(const YAML::Node& node, const std::string& prefix, Message* msg) {
  std::set<std::string> seen;
  for (const auto& kv : node) {
    if (!kv.first.IsScalar()) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix.empty() ? "top level" : prefix, ": a key must be a scalar, got ",
          NodeKind(kv.first)));
    }
    const std::string& name = kv.first.Scalar();
    const std::string key = prefix.empty() ? name : absl::StrCat(prefix, ".", name);
    if (!seen.insert(name).second) return absl::InvalidArgumentError(key + ": duplicate key");
    const FieldDescriptor* f = msg->GetDescriptor()->FindFieldByName(name);
    if (f == nullptr || f->is_repeated()) {
      return absl::InvalidArgumentError(key + ": unknown key");
    }
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      Message* section = msg->GetReflection()->MutableMessage(msg, f);
      if (kv.second.IsNull()) continue;  // `model:` alone: a present, empty section
      if (!kv.second.IsMap()) {
        return absl::InvalidArgumentError(
            absl::StrCat(key, ": expected a mapping, got ", NodeKind(kv.second)));
      }
      MAT_RETURN_IF_ERROR(ParseMessage(kv.second, key, section));
    } else {
      MAT_RETURN_IF_ERROR(SetScalar(kv.second, f, key, msg));
    }
  }
  return absl::OkStatus();
}

// ----- validation -----

absl::Status Check(bool ok, const std::string& msg) {
  return ok ? absl::OkStatus() : absl::InvalidArgumentError(msg);
}

// Input channels of the images of `data_kind` (the model-size estimate): 1 for Fashion-MNIST,
// 3 for CIFAR-10.
int64_t VggInChannels(const std::string& data_kind) {
  return data_kind == "fashion-mnist" ? 1 : 3;
}
constexpr int64_t kVggClasses = 10;  // Fashion-MNIST and CIFAR-10

// ----- JobSpec -> YAML -----

// Shortest text that reads back to exactly `v`, always with a '.' or an exponent marked as a
// float ("1.0", "1.0e-08") so YAML tools read it as a number; .nan/.inf/-.inf otherwise.
std::string FormatDouble(double v) {
  if (std::isnan(v)) return ".nan";
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, res.ptr);
  const size_t e = s.find_first_of("eE");
  const std::string mantissa = s.substr(0, e);
  if (mantissa.find('.') == std::string::npos) {
    s.insert(e == std::string::npos ? s.size() : e, ".0");
  }
  return s;
}

// True for the fields of the job-only keys (JobOnlyKeys): the `resources` section and
// policy.rand_schedule_job, which mat-train's schema does not have.
bool IsJobOnlyField(const FieldDescriptor* f) {
  return f == v1::JobSpec::descriptor()->FindFieldByName("resources") ||
         f == v1::PolicySpec::descriptor()->FindFieldByName("rand_schedule_job");
}

void EmitMessage(const Message& msg, bool skip_job_only, YAML::Emitter* out) {
  const Descriptor* d = msg.GetDescriptor();
  const Reflection* r = msg.GetReflection();
  *out << YAML::BeginMap;
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (f->is_repeated() || !r->HasField(msg, f)) continue;
    if (skip_job_only && IsJobOnlyField(f)) continue;
    *out << YAML::Key << f->name() << YAML::Value;
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_MESSAGE:
        EmitMessage(r->GetMessage(msg, f), skip_job_only, out);
        break;
      case FieldDescriptor::CPPTYPE_INT32:
        *out << std::to_string(r->GetInt32(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_INT64:
        *out << std::to_string(r->GetInt64(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_UINT64:
        *out << std::to_string(r->GetUInt64(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_DOUBLE:
        *out << FormatDouble(r->GetDouble(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_BOOL:
        *out << (r->GetBool(msg, f) ? "true" : "false");
        break;
      case FieldDescriptor::CPPTYPE_STRING:
        // Always quoted: "true", "~" or "123" stay strings for every YAML reader.
        *out << YAML::DoubleQuoted << r->GetString(msg, f);
        break;
      default:
        MAT_CHECK(false) << "job_spec: unsupported field type of " << f->full_name();
    }
  }
  *out << YAML::EndMap;
}

std::string ToYaml(const v1::JobSpec& spec, bool skip_job_only) {
  YAML::Emitter out;
  EmitMessage(spec, skip_job_only, &out);
  MAT_CHECK(out.good()) << "job_spec: YAML emitter failed: " << out.GetLastError();
  return std::string(out.c_str()) + "\n";
}

// Every key under `d` (`job_only`: only those of job-only fields, or of sections inside one).
void CollectKeys(const Descriptor* d, const std::string& prefix, bool job_only,
                 std::vector<std::string>* out) {
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    const std::string key = prefix.empty() ? f->name() : absl::StrCat(prefix, ".", f->name());
    const bool take = !job_only || IsJobOnlyField(f);
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      CollectKeys(f->message_type(), key, job_only && !take, out);
    } else if (take) {
      out->push_back(key);
    }
  }
}

}  // namespace

namespace {

absl::StatusOr<YAML::Node> LoadYaml(const std::string& yaml, const std::string& origin) {
  try {
    return YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": not valid YAML: ", e.what()));
  }
}

absl::StatusOr<v1::JobSpec> SpecFromYaml(const YAML::Node& root, const std::string& origin) {
  v1::JobSpec spec;
  if (root.IsNull()) return spec;
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": the top level must be a mapping, got ", NodeKind(root)));
  }
  absl::Status status = ParseMessage(root, "", &spec);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": ", status.message()));
  }
  return spec;
}

}  // namespace

absl::StatusOr<v1::JobSpec> ParseJobSpecYaml(const std::string& yaml, const std::string& origin) {
  MAT_ASSIGN_OR_RETURN(YAML::Node root, LoadYaml(yaml, origin));
  return SpecFromYaml(root, origin);
}

absl::StatusOr<v1::JobSpec> LoadJobSpecYaml(const std::string& path) {
  MAT_ASSIGN_OR_RETURN(std::string text, common::ReadFile(path));
  MAT_ASSIGN_OR_RETURN(YAML::Node root, LoadYaml(text, path));
  // An empty file (or only comments, or `null`) would submit the default 2000-step job: a
  // mistake, surely.
  if (root.IsNull()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the job spec is empty (see examples/ for one)"));
  }
  return SpecFromYaml(root, path);
}

v1::JobSpec JobSpecDefaults() {
  // TrainConfig's defaults (config/train_config.h, their one definition), key for key through
  // the descriptors, then the job-only keys. A TrainConfig key the schema lacks (other than
  // TrainerOnlyKeys) or a value it cannot hold is a bug here, caught by the first call (tests).
  static const v1::JobSpec* const kDefaults = [] {
    auto* s = new v1::JobSpec;
    const std::vector<std::string> trainer_only = TrainerOnlyKeys();
    for (const auto& [key, value] : config::ListConfig(config::TrainConfig{})) {
      if (std::find(trainer_only.begin(), trainer_only.end(), key) != trainer_only.end()) continue;
      Message* msg = s;
      std::string name = key;
      if (const size_t dot = key.find('.'); dot != std::string::npos) {
        const FieldDescriptor* section = s->GetDescriptor()->FindFieldByName(key.substr(0, dot));
        MAT_CHECK(section != nullptr) << "job.proto has no section for TrainConfig key " << key;
        msg = s->GetReflection()->MutableMessage(s, section);
        name = key.substr(dot + 1);
      }
      const FieldDescriptor* f = msg->GetDescriptor()->FindFieldByName(name);
      MAT_CHECK(f != nullptr) << "job.proto has no field for TrainConfig key " << key;
      const absl::Status set = SetScalar(YAML::Node(value), f, key, msg);
      MAT_CHECK(set.ok()) << "TrainConfig's default of " << key << ": " << set.message();
    }
    s->mutable_policy()->set_rand_schedule_job("");  // no replay
    s->mutable_resources()->set_workers(1);
    s->mutable_resources()->set_device("cpu");
    s->mutable_resources()->set_max_train_seconds(0);  // no limit
    return s;
  }();
  return *kDefaults;
}

v1::JobSpec WithJobSpecDefaults(const v1::JobSpec& spec) {
  // MergeFrom copies exactly the fields set in `spec` (proto3 optional tracks presence) over the
  // defaults.
  v1::JobSpec out = JobSpecDefaults();
  out.MergeFrom(spec);
  return out;
}

absl::Status ValidateJobSpec(const v1::JobSpec& spec) {
  const v1::JobSpec s = WithJobSpecDefaults(spec);
  // The trainer's keys: the trainer's own rules (config/train_config.h ValidateTrainConfig), on
  // the config a worker will build from this spec. The text is ours, so it parses.
  MAT_ASSIGN_OR_RETURN(const config::TrainConfig c,
                       config::ParseTrainConfig(JobSpecToTrainerYaml(s), "job spec"));
  MAT_RETURN_IF_ERROR(config::ValidateTrainConfig(c));

  // The job-only keys.
  const v1::PolicySpec& p = s.policy();
  // Whether the replayed job exists and fits is the Coordinator's check (it needs the store).
  MAT_RETURN_IF_ERROR(Check(p.rand_schedule_job().empty() || p.kind() == "rand" ||
                                p.kind() == "frozen-random" || p.kind() == "inverse",
                            "policy.rand_schedule_job replays a MAT job's decisions for "
                            "policy.kind rand, frozen-random or inverse only, got kind '" +
                                p.kind() + "'"));
  const v1::ResourceSpec& r = s.resources();
  MAT_RETURN_IF_ERROR(Check(r.workers() >= 1,
                            absl::StrCat("resources.workers must be >= 1, got ", r.workers())));
  MAT_RETURN_IF_ERROR(Check(r.device() == "cpu" || r.device() == "cuda",
                            "resources.device: unknown device '" + r.device() +
                                "' (expected cpu or cuda)"));
  MAT_RETURN_IF_ERROR(Check(std::isfinite(r.max_train_seconds()) && r.max_train_seconds() >= 0,
                            absl::StrCat("resources.max_train_seconds must be a number of "
                                         "seconds >= 0 (0: no limit), got ",
                                         r.max_train_seconds())));
  // Each worker is a rank: the batch splits evenly and each rank probes its own share.
  MAT_RETURN_IF_ERROR(config::ValidateRankShare(c, r.workers()));
  return absl::OkStatus();
}

std::string JobSpecToYaml(const v1::JobSpec& spec) { return ToYaml(spec, false); }

std::string JobSpecToTrainerYaml(const v1::JobSpec& spec) { return ToYaml(spec, true); }

std::vector<std::string> JobSpecKeys() {
  std::vector<std::string> keys;
  CollectKeys(v1::JobSpec::descriptor(), "", /*job_only=*/false, &keys);
  return keys;
}

std::vector<std::string> JobOnlyKeys() {
  std::vector<std::string> keys;
  CollectKeys(v1::JobSpec::descriptor(), "", /*job_only=*/true, &keys);
  return keys;
}

std::vector<std::string> TrainerOnlyKeys() { return {"train.device", "policy.rand_schedule"}; }

// ----- admission limits -----

namespace {

// EstimateModelParams for model.kind vgg (see job_spec.h).
// REQUIRES: `full` has its defaults filled in.
double EstimateVggParams(const v1::JobSpec& full) {
  const v1::ModelSpec& m = full.model();
  double in = static_cast<double>(VggInChannels(full.data().kind()));
  double total = 0;
  for (int64_t nominal : config::VggLayout(m.arch())) {
    if (nominal == config::kVggPool) continue;
    const double out = config::VggScaledChannels(nominal, m.width());
    total += out * in * 9 + 2 * out;  // 3x3 kernel (no bias), BatchNorm scale and shift
    in = out;
  }
  const double classes = static_cast<double>(kVggClasses);
  const double hidden = static_cast<double>(std::max<int64_t>(0, m.classifier_hidden()));
  total += hidden > 0 ? in * hidden + hidden + hidden * classes + classes : in * classes + classes;
  return total;
}

}  // namespace

double EstimateModelParams(const v1::JobSpec& spec, int64_t vocab_size) {
  const v1::JobSpec full = WithJobSpecDefaults(spec);
  if (full.model().kind() == "vgg") return EstimateVggParams(full);
  const v1::ModelSpec& m = full.model();
  const double d = static_cast<double>(m.d_model());
  const double ff = static_cast<double>(m.d_ff());
  const double layers = static_cast<double>(m.layers());
  const int64_t cap = full.data().vocab_size();  // data.vocab_size: 0 = no cap
  const double vocab = static_cast<double>(cap > 0 ? std::min(cap, vocab_size) : vocab_size);
  const double embeddings = vocab * d + static_cast<double>(m.max_seq_len()) * d + 2 * d;
  const double attention = 4 * d * d + 4 * d;  // Q, K, V, O with biases
  const double ffn = 2 * d * ff + ff + d;
  const double layer_norms = 4 * d;
  const double head = d * d + d + 2 * d + vocab;  // dense, LayerNorm, decoder bias (tied weights)
  double total = embeddings + layers * (attention + ffn + layer_norms) + head;
  if (m.kind() == "switch" && m.experts() >= 1 && m.moe_every() >= 1) {
    // Layers 0, moe_every, ...: E experts (each an FFN) and a router instead of the FFN.
    const double e = static_cast<double>(m.experts());
    const double switch_layers =
        std::ceil(layers / static_cast<double>(m.moe_every()));
    total += switch_layers * ((e - 1) * ffn + d * e + e);
  }
  return total;
}

absl::Status CheckJobSpecLimits(const v1::JobSpec& spec, const JobSpecLimits& limits) {
  const int64_t bytes = static_cast<int64_t>(spec.ByteSizeLong());
  if (limits.max_spec_bytes > 0 && bytes > limits.max_spec_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("job spec is ", bytes, " bytes; the limit is ",
                                                   limits.max_spec_bytes,
                                                   " (--max-spec-bytes)"));
  }
  const v1::JobSpec full = WithJobSpecDefaults(spec);
  // The files a worker reads lie under the data roots (init_from only when set).
  std::vector<std::pair<std::string, std::string>> paths = {{"data.dir", full.data().dir()}};
  if (!full.model().init_from().empty()) {
    paths.emplace_back("model.init_from", full.model().init_from());
  }
  for (const auto& [key, path] : paths) {
    if (absl::Status s = common::CheckUnderRoots(path, limits.data_roots); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(key, ": ", s.message(), " (--data-root)"));
    }
  }
  const double params = EstimateModelParams(full);
  if (limits.max_model_params > 0 && params > limits.max_model_params) {
    const v1::ModelSpec& m = full.model();
    if (m.kind() == "vgg") {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "model has about %.3g parameters (%s, width %g, classifier_hidden %d); the limit is "
          "%.3g (--max-model-params)",
          params, m.arch(), m.width(), m.classifier_hidden(), limits.max_model_params));
    }
    return absl::ResourceExhaustedError(absl::StrFormat(
        "model has about %.3g parameters (layers %d, d_model %d, d_ff %d, max_seq_len %d; "
        "vocabulary assumed %d); the limit is %.3g (--max-model-params)",
        params, m.layers(), m.d_model(), m.d_ff(), m.max_seq_len(), kAssumedVocabSize,
        limits.max_model_params));
  }
  return absl::OkStatus();
}

}  // namespace mat::api
