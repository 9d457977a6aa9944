// Sections: reflection helpers · YAML -> JobSpec · validation (transformer, VGG shapes) ·
// JobSpec -> YAML · defaults · admission limits.
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
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/path_util.h"
#include "common/status.h"
#include "policy/policy_config.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
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
      if ((ok = Convert(value, &v))) r->SetString(msg, f, v);
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

// Every double field of `msg` (and its sections) must be finite.
absl::Status CheckFinite(const Message& msg, const std::string& prefix) {
  const Descriptor* d = msg.GetDescriptor();
  const Reflection* r = msg.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    const std::string key = prefix.empty() ? f->name() : absl::StrCat(prefix, ".", f->name());
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && !f->is_repeated()) {
      MAT_RETURN_IF_ERROR(CheckFinite(r->GetMessage(msg, f), key));
    } else if (f->cpp_type() == FieldDescriptor::CPPTYPE_DOUBLE && !f->is_repeated()) {
      const double v = r->GetDouble(msg, f);
      MAT_RETURN_IF_ERROR(
          Check(std::isfinite(v), absl::StrCat(key, " must be a finite number, got ", v)));
    }
  }
  return absl::OkStatus();
}

policy::PolicyConfig ToPolicyConfig(const v1::JobSpec& s) {
  const v1::PolicySpec& p = s.policy();
  policy::PolicyConfig c;
  absl::StatusOr<policy::PolicyKind> kind = policy::ParsePolicyKind(p.kind());
  if (kind.ok()) c.kind = *kind;
  c.warmup_steps = p.warmup_steps();
  c.interval_steps = p.probe_every();
  c.alpha = p.alpha();
  c.beta = p.beta();
  c.gamma = p.gamma();
  c.patience = static_cast<int>(p.patience());  // range-checked before
  c.min_active_fraction = p.min_active_fraction();
  c.rand_fraction = p.rand_fraction();
  c.multirate_k = static_cast<int>(p.multirate_k());  // range-checked before
  c.multirate_fast_fraction = p.multirate_fast_fraction();
  absl::StatusOr<policy::Delta1Reading> delta1 = policy::ParseDelta1Reading(p.delta1());
  if (delta1.ok()) c.delta1 = *delta1;
  c.seed = s.seed();
  return c;
}

bool IsImageData(const std::string& kind) { return kind == "fashion-mnist" || kind == "cifar10"; }

// The model and data keys of bert and switch (worker/train_config.cc's rules; vgg skips them).
absl::Status ValidateTransformerSpec(const v1::ModelSpec& m, const v1::DataSpec& d) {
  MAT_RETURN_IF_ERROR(
      Check(m.layers() >= 1, absl::StrCat("model.layers must be >= 1, got ", m.layers())));
  MAT_RETURN_IF_ERROR(Check(m.heads() >= 1 && m.d_model() >= 1 && m.d_model() % m.heads() == 0,
                            absl::StrCat("model.d_model must be a positive multiple of "
                                         "model.heads, got d_model ",
                                         m.d_model(), " and heads ", m.heads())));
  MAT_RETURN_IF_ERROR(
      Check(m.d_ff() >= 1, absl::StrCat("model.d_ff must be >= 1, got ", m.d_ff())));
  MAT_RETURN_IF_ERROR(
      Check(m.ffn_groups() >= 0 && (m.ffn_groups() == 0 || m.d_ff() % m.ffn_groups() == 0),
            absl::StrCat("model.ffn_groups must be 0 or divide model.d_ff, got ",
                         m.ffn_groups())));
  MAT_RETURN_IF_ERROR(Check(m.dropout() >= 0 && m.dropout() < 1,
                            absl::StrCat("model.dropout must be in [0,1), got ", m.dropout())));
  MAT_RETURN_IF_ERROR(
      Check(m.experts() >= 1 && m.experts() <= 4096,
            absl::StrCat("model.experts must be in [1, 4096], got ", m.experts())));
  MAT_RETURN_IF_ERROR(
      Check(m.capacity_factor() > 0,
            absl::StrCat("model.capacity_factor must be > 0, got ", m.capacity_factor())));
  MAT_RETURN_IF_ERROR(
      Check(m.aux_loss_weight() >= 0,
            absl::StrCat("model.aux_loss_weight must be >= 0, got ", m.aux_loss_weight())));
  MAT_RETURN_IF_ERROR(
      Check(m.moe_every() >= 1, absl::StrCat("model.moe_every must be >= 1, got ", m.moe_every())));
  MAT_RETURN_IF_ERROR(
      Check(m.kind() != "switch" || m.ffn_groups() == 0,
            absl::StrCat("model.ffn_groups must be 0 for model.kind switch (its FFNs are "
                         "experts), got ",
                         m.ffn_groups())));
  MAT_RETURN_IF_ERROR(Check(d.seq_len() >= 2 && d.seq_len() <= m.max_seq_len(),
                            absl::StrCat("data.seq_len must be in [2, model.max_seq_len], got ",
                                         d.seq_len(), " with model.max_seq_len ",
                                         m.max_seq_len())));
  MAT_RETURN_IF_ERROR(Check(d.mask_prob() > 0 && d.mask_prob() < 1,
                            absl::StrCat("data.mask_prob must be in (0,1), got ", d.mask_prob())));
  return absl::OkStatus();
}

// ----- VGG shapes (worker/vgg.h's layout, computed here without LibTorch) -----

constexpr int64_t kVggPool = -1;
constexpr int64_t kVggClasses = 10;  // Fashion-MNIST and CIFAR-10

// Nominal conv channels with kVggPool for a 2x2 max-pool: configurations A and D of Simonyan &
// Zisserman (worker/vgg.cc's kConfigA, kConfigD).
const std::vector<int64_t>& VggLayout(const std::string& arch) {
  static const std::vector<int64_t> kA = {64,  kVggPool, 128, kVggPool, 256, 256,  kVggPool,
                                          512, 512,      kVggPool, 512, 512, kVggPool};
  static const std::vector<int64_t> kD = {64,  64,  kVggPool, 128, 128, kVggPool, 256,
                                          256, 256, kVggPool, 512, 512, 512, kVggPool,
                                          512, 512, 512, kVggPool};
  return arch == "vgg16" ? kD : kA;
}

// Channels of a layer of nominal width c: max(1, round(c · width)), in double so an absurd width
// does not overflow (ValidateVggSpec bounds width to (0, 64]).
double VggScaled(int64_t channels, double width) {
  return std::max(1.0, std::round(static_cast<double>(channels) * width));
}

// Input channels of the images of `data_kind`: 1 for Fashion-MNIST, 3 for CIFAR-10.
int64_t VggInChannels(const std::string& data_kind) {
  return data_kind == "fashion-mnist" ? 1 : 3;
}

absl::Status ValidateVggSpec(const v1::ModelSpec& m, const v1::DataSpec& d) {
  MAT_RETURN_IF_ERROR(Check(IsImageData(d.kind()),
                            "data.kind " + d.kind() +
                                " does not fit model.kind vgg (expected fashion-mnist or "
                                "cifar10)"));
  MAT_RETURN_IF_ERROR(Check(m.arch() == "vgg11" || m.arch() == "vgg16",
                            "model.arch: unknown VGG '" + m.arch() +
                                "' (expected vgg11 or vgg16)"));
  MAT_RETURN_IF_ERROR(Check(m.width() > 0 && m.width() <= 64,
                            absl::StrCat("model.width must be a number in (0, 64], got ",
                                         m.width())));
  MAT_RETURN_IF_ERROR(
      Check(m.filter_groups() >= 1,
            absl::StrCat("model.filter_groups must be >= 1, got ", m.filter_groups())));
  // The worker's VGG (worker/vgg.h ValidateVggConfig) also needs a group per layer to hold at
  // least one channel; the narrowest layer is the first (nominal 64).
  const double narrowest = VggScaled(64, m.width());
  MAT_RETURN_IF_ERROR(Check(static_cast<double>(m.filter_groups()) <= narrowest,
                            absl::StrCat("model.filter_groups must be <= ", narrowest,
                                         " (the narrowest conv layer's channels at model.width ",
                                         m.width(), "), got ", m.filter_groups())));
  MAT_RETURN_IF_ERROR(
      Check(m.classifier_hidden() >= 0,
            absl::StrCat("model.classifier_hidden must be >= 0, got ", m.classifier_hidden())));
  MAT_RETURN_IF_ERROR(Check(d.valid_size() >= 1,
                            absl::StrCat("data.valid_size must be >= 1, got ", d.valid_size())));
  return absl::OkStatus();
}

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

absl::StatusOr<v1::JobSpec> ParseJobSpecYaml(const std::string& yaml, const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": not valid YAML: ", e.what()));
  }
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

absl::StatusOr<v1::JobSpec> LoadJobSpecYaml(const std::string& path) {
  MAT_ASSIGN_OR_RETURN(std::string text, common::ReadFile(path));
  return ParseJobSpecYaml(text, path);
}

v1::JobSpec JobSpecDefaults() {
  // The defaults of worker/train_config.h (TrainConfig), key for key; tests check that every
  // field is set here.
  v1::JobSpec s;
  s.set_seed(1);
  v1::ModelSpec* m = s.mutable_model();
  m->set_kind("bert");
  m->set_layers(4);
  m->set_d_model(256);
  m->set_heads(8);
  m->set_d_ff(1024);
  m->set_ffn_groups(0);
  m->set_max_seq_len(128);
  m->set_dropout(0.1);
  m->set_pre_ln(false);
  m->set_experts(8);
  m->set_capacity_factor(1.25);
  m->set_aux_loss_weight(0.01);
  m->set_moe_every(1);
  m->set_arch("vgg11");
  m->set_width(0.25);
  m->set_filter_groups(4);
  m->set_classifier_hidden(0);
  m->set_init_from("");
  v1::DataSpec* d = s.mutable_data();
  d->set_kind("wikitext");
  d->set_dir("../shared/data/wikitext-2");
  d->set_seq_len(128);
  d->set_mask_prob(0.15);
  d->set_valid_size(5000);
  d->set_augment(false);
  d->set_train_fraction(1.0);
  d->set_vocab_size(0);
  v1::TrainSpec* t = s.mutable_train();
  t->set_steps(2000);
  t->set_batch_size(32);
  t->set_lr(5e-4);
  t->set_min_lr_ratio(0.0);
  t->set_warmup_steps(100);
  t->set_schedule("linear");
  t->set_weight_decay(0.01);
  t->set_beta1(0.9);
  t->set_beta2(0.999);
  t->set_eps(1e-8);
  t->set_eval_every(200);
  t->set_eval_batches(50);
  t->set_checkpoint_every(0);
  t->set_threads(0);
  t->set_precision("fp32");
  t->set_optimizer("adamw");
  t->set_decay_every(1000);
  t->set_decay_factor(0.1);
  t->set_momentum(0.9);
  t->set_nesterov(false);
  t->set_deterministic(false);
  v1::PolicySpec* p = s.mutable_policy();
  p->set_kind("mat");
  p->set_alpha(0.3);
  p->set_beta(0.0);
  p->set_gamma(0.5);
  p->set_patience(3);
  p->set_warmup_steps(200);
  p->set_probe_every(20);
  p->set_probe_samples(16);
  p->set_estimator("gram");
  p->set_min_active_fraction(0.25);
  p->set_rand_fraction(0.5);
  p->set_multirate_k(4);
  p->set_multirate_fast_fraction(0.5);
  p->set_rand_schedule_job("");  // job-only: no replay
  p->set_delta1("warmup");
  p->set_probe_projections(1);
  p->set_probe_positions(1);
  p->set_backward("weights");
  v1::ResourceSpec* r = s.mutable_resources();
  r->set_workers(1);
  r->set_device("cpu");
  return s;
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
  MAT_RETURN_IF_ERROR(CheckFinite(s, ""));

  const v1::ModelSpec& m = s.model();
  const v1::DataSpec& d = s.data();
  MAT_RETURN_IF_ERROR(Check(m.kind() == "bert" || m.kind() == "switch" || m.kind() == "vgg",
                            "model.kind: unknown model '" + m.kind() +
                                "' (expected bert, switch or vgg)"));
  const bool images = IsImageData(d.kind());
  MAT_RETURN_IF_ERROR(Check(d.kind() == "wikitext" || images,
                            "data.kind: unknown data kind '" + d.kind() +
                                "' (expected wikitext, fashion-mnist or cifar10)"));
  if (m.kind() == "vgg") {
    MAT_RETURN_IF_ERROR(ValidateVggSpec(m, d));
  } else {
    MAT_RETURN_IF_ERROR(Check(!images, "data.kind " + d.kind() + " does not fit model.kind " +
                                           m.kind() + " (expected wikitext)"));
    MAT_RETURN_IF_ERROR(ValidateTransformerSpec(m, d));
  }
  MAT_RETURN_IF_ERROR(Check(d.vocab_size() == 0 || d.vocab_size() >= 2,
                            absl::StrCat("data.vocab_size must be 0 (no cap) or >= 2, got ",
                                         d.vocab_size())));
  MAT_RETURN_IF_ERROR(Check(d.train_fraction() > 0 && d.train_fraction() <= 1,
                            absl::StrCat("data.train_fraction must be in (0, 1], got ",
                                         d.train_fraction())));

  const v1::TrainSpec& t = s.train();
  MAT_RETURN_IF_ERROR(
      Check(t.steps() >= 1, absl::StrCat("train.steps must be >= 1, got ", t.steps())));
  MAT_RETURN_IF_ERROR(Check(t.batch_size() >= 1,
                            absl::StrCat("train.batch_size must be >= 1, got ", t.batch_size())));
  MAT_RETURN_IF_ERROR(Check(t.lr() > 0, absl::StrCat("train.lr must be > 0, got ", t.lr())));
  MAT_RETURN_IF_ERROR(
      Check(t.min_lr_ratio() >= 0 && t.min_lr_ratio() <= 1,
            absl::StrCat("train.min_lr_ratio must be in [0,1], got ", t.min_lr_ratio())));
  MAT_RETURN_IF_ERROR(
      Check(t.warmup_steps() >= 0,
            absl::StrCat("train.warmup_steps must be >= 0, got ", t.warmup_steps())));
  MAT_RETURN_IF_ERROR(Check(t.schedule() == "linear" || t.schedule() == "cosine" ||
                                t.schedule() == "constant" || t.schedule() == "step",
                            "train.schedule: unknown schedule '" + t.schedule() +
                                "' (expected linear, cosine, constant or step)"));
  MAT_RETURN_IF_ERROR(
      Check(t.decay_every() >= 1,
            absl::StrCat("train.decay_every must be >= 1, got ", t.decay_every())));
  MAT_RETURN_IF_ERROR(
      Check(t.decay_factor() > 0 && t.decay_factor() <= 1,
            absl::StrCat("train.decay_factor must be in (0, 1], got ", t.decay_factor())));
  MAT_RETURN_IF_ERROR(Check(t.optimizer() == "adamw" || t.optimizer() == "sgd",
                            "train.optimizer: unknown optimizer '" + t.optimizer() +
                                "' (expected adamw or sgd)"));
  MAT_RETURN_IF_ERROR(
      Check(t.momentum() >= 0 && t.momentum() < 1,
            absl::StrCat("train.momentum must be in [0,1), got ", t.momentum())));
  MAT_RETURN_IF_ERROR(Check(!t.nesterov() || t.momentum() > 0,
                            absl::StrCat("train.nesterov needs train.momentum > 0, got ",
                                         t.momentum())));
  MAT_RETURN_IF_ERROR(
      Check(t.weight_decay() >= 0,
            absl::StrCat("train.weight_decay must be >= 0, got ", t.weight_decay())));
  MAT_RETURN_IF_ERROR(Check(t.beta1() >= 0 && t.beta1() < 1 && t.beta2() >= 0 && t.beta2() < 1,
                            absl::StrCat("train.beta1 and train.beta2 must be in [0,1), got ",
                                         t.beta1(), " and ", t.beta2())));
  MAT_RETURN_IF_ERROR(Check(t.eval_every() >= 1,
                            absl::StrCat("train.eval_every must be >= 1, got ", t.eval_every())));
  MAT_RETURN_IF_ERROR(
      Check(t.eval_batches() >= 0,
            absl::StrCat("train.eval_batches must be >= 0, got ", t.eval_batches())));
  MAT_RETURN_IF_ERROR(
      Check(t.checkpoint_every() >= 0,
            absl::StrCat("train.checkpoint_every must be >= 0, got ", t.checkpoint_every())));
  MAT_RETURN_IF_ERROR(
      Check(t.threads() >= 0, absl::StrCat("train.threads must be >= 0, got ", t.threads())));
  MAT_RETURN_IF_ERROR(Check(t.precision() == "fp32" || t.precision() == "bf16",
                            "train.precision: unknown precision '" + t.precision() +
                                "' (expected fp32 or bf16)"));

  const v1::PolicySpec& p = s.policy();
  MAT_RETURN_IF_ERROR(
      Check(p.probe_samples() >= 2,
            absl::StrCat("policy.probe_samples must be >= 2, got ", p.probe_samples())));
  MAT_RETURN_IF_ERROR(Check(p.probe_samples() <= t.batch_size(),
                            absl::StrCat("policy.probe_samples must be <= train.batch_size (the "
                                         "probe uses the step's first samples), got ",
                                         p.probe_samples(), " with train.batch_size ",
                                         t.batch_size())));
  MAT_RETURN_IF_ERROR(
      Check(p.probe_every() >= 1,
            absl::StrCat("policy.probe_every must be >= 1, got ", p.probe_every())));
  MAT_RETURN_IF_ERROR(Check(p.estimator() == "gram" || p.estimator() == "exact" ||
                                p.estimator() == "lanczos" || p.estimator() == "exact-output" ||
                                p.estimator() == "output",
                            "policy.estimator: unknown estimator '" + p.estimator() +
                                "' (expected gram, output, exact, lanczos or exact-output)"));
  MAT_RETURN_IF_ERROR(
      Check(p.patience() >= 1, absl::StrCat("policy.patience must be >= 1, got ", p.patience())));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  MAT_RETURN_IF_ERROR(Check(p.patience() <= kIntMax,
                            absl::StrCat("policy.patience must be <= ", kIntMax, ", got ",
                                         p.patience())));
  MAT_RETURN_IF_ERROR(Check(p.multirate_k() <= kIntMax,
                            absl::StrCat("policy.multirate_k must be <= ", kIntMax, ", got ",
                                         p.multirate_k())));
  if (absl::StatusOr<policy::PolicyKind> kind = policy::ParsePolicyKind(p.kind()); !kind.ok()) {
    return absl::InvalidArgumentError("policy.kind: " + std::string(kind.status().message()));
  }
  if (auto delta1 = policy::ParseDelta1Reading(p.delta1()); !delta1.ok()) {
    return absl::InvalidArgumentError("policy.delta1: " + std::string(delta1.status().message()));
  }
  MAT_RETURN_IF_ERROR(Check(p.probe_projections() >= 1 && p.probe_projections() <= 1000000,
                            absl::StrCat("policy.probe_projections must be in [1, 1000000], got ",
                                         p.probe_projections())));
  MAT_RETURN_IF_ERROR(Check(p.backward() == "weights" || p.backward() == "detach",
                            "policy.backward: unknown backward mode '" + p.backward() +
                                "' (expected weights or detach)"));
  MAT_RETURN_IF_ERROR(Check(p.backward() == "weights" || s.model().kind() != "vgg",
                            "policy.backward detach is not implemented for model.kind vgg (its "
                            "filter groups support weights only)"));
  MAT_RETURN_IF_ERROR(Check(p.probe_positions() >= 1 && p.probe_positions() <= 1000000,
                            absl::StrCat("policy.probe_positions must be in [1, 1000000], got ",
                                         p.probe_positions())));
  MAT_RETURN_IF_ERROR(policy::ValidatePolicyConfig(ToPolicyConfig(s)));
  // Whether the replayed job exists and fits is the Coordinator's check (it needs the store).
  MAT_RETURN_IF_ERROR(Check(p.rand_schedule_job().empty() || p.kind() == "rand",
                            "policy.rand_schedule_job replays a MAT job's active counts for "
                            "policy.kind rand only, got kind '" +
                                p.kind() + "'"));

  const v1::ResourceSpec& r = s.resources();
  MAT_RETURN_IF_ERROR(Check(r.workers() >= 1,
                            absl::StrCat("resources.workers must be >= 1, got ", r.workers())));
  MAT_RETURN_IF_ERROR(Check(r.device() == "cpu" || r.device() == "cuda",
                            "resources.device: unknown device '" + r.device() +
                                "' (expected cpu or cuda)"));
  MAT_RETURN_IF_ERROR(Check(t.batch_size() % r.workers() == 0,
                            absl::StrCat("train.batch_size must be a multiple of "
                                         "resources.workers (each rank takes an equal share), "
                                         "got ",
                                         t.batch_size(), " for ", r.workers(), " workers")));
  const int64_t per_rank = t.batch_size() / r.workers();
  MAT_RETURN_IF_ERROR(Check(p.probe_samples() <= per_rank,
                            absl::StrCat("policy.probe_samples must be <= train.batch_size / "
                                         "resources.workers (each rank probes its own batch), "
                                         "got ",
                                         p.probe_samples(), " with ", per_rank,
                                         " samples per rank")));
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

// ----- admission limits -----

namespace {

// EstimateModelParams for model.kind vgg (see job_spec.h).
// REQUIRES: `full` has its defaults filled in.
double EstimateVggParams(const v1::JobSpec& full) {
  const v1::ModelSpec& m = full.model();
  double in = static_cast<double>(VggInChannels(full.data().kind()));
  double total = 0;
  for (int64_t nominal : VggLayout(m.arch())) {
    if (nominal == kVggPool) continue;
    const double out = VggScaled(nominal, m.width());
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
