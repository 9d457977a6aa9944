#include "config/train_config.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <functional>
#include <set>
#include <sstream>
#include <string_view>

#include "common/file_util.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "config/vgg_layout.h"
#include "nlohmann/json.hpp"
#include "yaml-cpp/yaml.h"

namespace mat::config {
namespace {

// One typed key of the schema.
struct Field {
  std::string key;
  std::function<absl::Status(const YAML::Node&)> set;
  std::function<std::string()> get;
  const double* number = nullptr;  // the value of a "number" key (finite check)
};

// The shortest text that reads back to exactly `v` (ListConfig feeds JobSpecDefaults).
std::string FormatNumber(double v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, res.ptr);
}

template <typename T>
Field MakeField(const std::string& key, T* target, const char* type) {
  Field f;
  f.key = key;
  f.set = [key, target, type](const YAML::Node& n) -> absl::Status {
    if constexpr (std::is_same_v<T, std::string>) {
      // `init_from:` with nothing after it is the empty string, as `--set model.init_from=` is.
      if (n.IsNull()) {
        target->clear();
        return absl::OkStatus();
      }
    }
    if (!n.IsScalar()) return absl::InvalidArgumentError(key + ": expected a " + type + " scalar");
    try {
      *target = n.as<T>();
    } catch (const YAML::Exception&) {
      const bool vowel = std::string_view("aeiou").find(type[0]) != std::string_view::npos;
      return absl::InvalidArgumentError(key + ": '" + n.Scalar() + "' is not " +
                                        (vowel ? "an " : "a ") + type);
    }
    return absl::OkStatus();
  };
  f.get = [target]() {
    std::ostringstream ss;
    if constexpr (std::is_same_v<T, bool>) {
      ss << (*target ? "true" : "false");
    } else if constexpr (std::is_same_v<T, double>) {
      ss << FormatNumber(*target);
    } else {
      ss << *target;
    }
    return ss.str();
  };
  if constexpr (std::is_same_v<T, double>) f.number = target;
  return f;
}

std::vector<Field> Schema(TrainConfig& c) {
  std::vector<Field> f;
  f.push_back(MakeField("seed", &c.seed, "non-negative integer"));
  f.push_back(MakeField("model.kind", &c.model.kind, "string"));
  f.push_back(MakeField("model.layers", &c.model.layers, "integer"));
  f.push_back(MakeField("model.d_model", &c.model.d_model, "integer"));
  f.push_back(MakeField("model.heads", &c.model.heads, "integer"));
  f.push_back(MakeField("model.d_ff", &c.model.d_ff, "integer"));
  f.push_back(MakeField("model.ffn_groups", &c.model.ffn_groups, "integer"));
  f.push_back(MakeField("model.max_seq_len", &c.model.max_seq_len, "integer"));
  f.push_back(MakeField("model.dropout", &c.model.dropout, "number"));
  f.push_back(MakeField("model.pre_ln", &c.model.pre_ln, "boolean"));
  f.push_back(MakeField("model.experts", &c.model.experts, "integer"));
  f.push_back(MakeField("model.capacity_factor", &c.model.capacity_factor, "number"));
  f.push_back(MakeField("model.aux_loss_weight", &c.model.aux_loss_weight, "number"));
  f.push_back(MakeField("model.moe_every", &c.model.moe_every, "integer"));
  f.push_back(MakeField("model.arch", &c.model.arch, "string"));
  f.push_back(MakeField("model.width", &c.model.width, "number"));
  f.push_back(MakeField("model.filter_groups", &c.model.filter_groups, "integer"));
  f.push_back(MakeField("model.classifier_hidden", &c.model.classifier_hidden, "integer"));
  f.push_back(MakeField("model.init_from", &c.model.init_from, "string"));
  f.push_back(MakeField("data.kind", &c.data.kind, "string"));
  f.push_back(MakeField("data.dir", &c.data.dir, "string"));
  f.push_back(MakeField("data.seq_len", &c.data.seq_len, "integer"));
  f.push_back(MakeField("data.mask_prob", &c.data.mask_prob, "number"));
  f.push_back(MakeField("data.valid_size", &c.data.valid_size, "integer"));
  f.push_back(MakeField("data.augment", &c.data.augment, "boolean"));
  f.push_back(MakeField("data.train_fraction", &c.data.train_fraction, "number"));
  f.push_back(MakeField("data.vocab_size", &c.data.vocab_size, "integer"));
  f.push_back(MakeField("train.steps", &c.train.steps, "integer"));
  f.push_back(MakeField("train.batch_size", &c.train.batch_size, "integer"));
  f.push_back(MakeField("train.optimizer", &c.train.optimizer, "string"));
  f.push_back(MakeField("train.lr", &c.train.lr, "number"));
  f.push_back(MakeField("train.min_lr_ratio", &c.train.min_lr_ratio, "number"));
  f.push_back(MakeField("train.warmup_steps", &c.train.warmup_steps, "integer"));
  f.push_back(MakeField("train.schedule", &c.train.schedule, "string"));
  f.push_back(MakeField("train.decay_every", &c.train.decay_every, "integer"));
  f.push_back(MakeField("train.decay_factor", &c.train.decay_factor, "number"));
  f.push_back(MakeField("train.weight_decay", &c.train.weight_decay, "number"));
  f.push_back(MakeField("train.beta1", &c.train.beta1, "number"));
  f.push_back(MakeField("train.beta2", &c.train.beta2, "number"));
  f.push_back(MakeField("train.eps", &c.train.eps, "number"));
  f.push_back(MakeField("train.momentum", &c.train.momentum, "number"));
  f.push_back(MakeField("train.nesterov", &c.train.nesterov, "boolean"));
  f.push_back(MakeField("train.eval_every", &c.train.eval_every, "integer"));
  f.push_back(MakeField("train.eval_batches", &c.train.eval_batches, "integer"));
  f.push_back(MakeField("train.checkpoint_every", &c.train.checkpoint_every, "integer"));
  f.push_back(MakeField("train.threads", &c.train.threads, "integer"));
  f.push_back(MakeField("train.device", &c.train.device, "string"));
  f.push_back(MakeField("train.precision", &c.train.precision, "string"));
  f.push_back(MakeField("train.deterministic", &c.train.deterministic, "boolean"));
  f.push_back(MakeField("policy.kind", &c.policy.kind, "string"));
  f.push_back(MakeField("policy.alpha", &c.policy.alpha, "number"));
  f.push_back(MakeField("policy.beta", &c.policy.beta, "number"));
  f.push_back(MakeField("policy.gamma", &c.policy.gamma, "number"));
  f.push_back(MakeField("policy.patience", &c.policy.patience, "integer"));
  f.push_back(MakeField("policy.warmup_steps", &c.policy.warmup_steps, "integer"));
  f.push_back(MakeField("policy.probe_every", &c.policy.probe_every, "integer"));
  f.push_back(MakeField("policy.probe_samples", &c.policy.probe_samples, "integer"));
  f.push_back(MakeField("policy.estimator", &c.policy.estimator, "string"));
  f.push_back(MakeField("policy.lanczos_iterations", &c.policy.lanczos_iterations, "integer"));
  f.push_back(MakeField("policy.probe_projections", &c.policy.probe_projections, "integer"));
  f.push_back(MakeField("policy.probe_positions", &c.policy.probe_positions, "integer"));
  f.push_back(MakeField("policy.min_active_fraction", &c.policy.min_active_fraction, "number"));
  f.push_back(MakeField("policy.rand_fraction", &c.policy.rand_fraction, "number"));
  f.push_back(MakeField("policy.rand_schedule", &c.policy.rand_schedule, "string"));
  f.push_back(MakeField("policy.multirate_k", &c.policy.multirate_k, "integer"));
  f.push_back(MakeField("policy.multirate_fast_fraction", &c.policy.multirate_fast_fraction, "number"));
  f.push_back(MakeField("policy.delta1", &c.policy.delta1, "string"));
  f.push_back(MakeField("policy.backward", &c.policy.backward, "string"));
  return f;
}

absl::Status SetKey(TrainConfig& c, const std::string& key, const YAML::Node& value,
                    const std::string& origin) {
  for (Field& f : Schema(c)) {
    if (f.key == key) {
      absl::Status s = f.set(value);
      if (!s.ok()) return absl::InvalidArgumentError(origin + ": " + std::string(s.message()));
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(origin + ": unknown key '" + key + "'");
}

absl::Status Walk(TrainConfig& c, const YAML::Node& node, const std::string& prefix,
                  const std::string& origin) {
  std::set<std::string> seen;
  for (const auto& kv : node) {
    std::string name = kv.first.as<std::string>();
    std::string key = prefix.empty() ? name : prefix + "." + name;
    // yaml-cpp keeps both entries of a repeated key and the later one would win unseen.
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(origin + ": key '" + key + "' appears twice");
    }
    const bool section_name = prefix.empty() && (name == "model" || name == "data" ||
                                                 name == "train" || name == "policy");
    if (section_name && kv.second.IsNull()) continue;  // an empty section keeps the defaults
    if (prefix.empty() && name == "resources") {
      // A service job file (api/job_spec.h) is a mat-train config plus `resources`;
      // mat-train runs one process and ignores it, but still names a misspelt key.
      if (kv.second.IsNull()) continue;
      if (!kv.second.IsMap()) return absl::InvalidArgumentError(origin + ": resources must be a mapping");
      for (const auto& r : kv.second) {
        const std::string rkey = r.first.as<std::string>();
        if (rkey != "workers" && rkey != "device" && rkey != "max_train_seconds") {
          return absl::InvalidArgumentError(origin + ": unknown key 'resources." + rkey + "'");
        }
      }
      continue;
    }
    if (key == "policy.rand_schedule_job") {
      // The service's job-only key (api/job_spec.h), in every job_spec.yaml a job gives back
      // (empty: no replay), so that file runs here too; a replay needs the coordinator's store.
      if (kv.second.IsScalar() && kv.second.as<std::string>().empty()) continue;
      return absl::InvalidArgumentError(
          origin + ": policy.rand_schedule_job replays a coordinator's stored MAT job, which " +
          "mat-train cannot read; give a MAT run's decisions.jsonl as policy.rand_schedule instead");
    }
    if (kv.second.IsMap()) {
      bool is_section = prefix.empty() && (name == "model" || name == "data" || name == "train" ||
                                           name == "policy");
      if (!is_section) return absl::InvalidArgumentError(origin + ": unknown key '" + key + "'");
      MAT_RETURN_IF_ERROR(Walk(c, kv.second, key, origin));
    } else {
      MAT_RETURN_IF_ERROR(SetKey(c, key, kv.second, origin));
    }
  }
  return absl::OkStatus();
}

absl::Status Check(bool ok, const std::string& msg) {
  return ok ? absl::OkStatus() : absl::InvalidArgumentError(msg);
}

}  // namespace

absl::StatusOr<TrainConfig> ParseTrainConfig(const std::string& yaml, const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(origin + ": not valid YAML: " + e.what());
  }
  TrainConfig c;
  if (root.IsNull()) return c;
  if (!root.IsMap()) return absl::InvalidArgumentError(origin + ": the top level must be a mapping");
  MAT_RETURN_IF_ERROR(Walk(c, root, "", origin));
  return c;
}

absl::StatusOr<TrainConfig> LoadTrainConfig(const std::string& path) {
  MAT_ASSIGN_OR_RETURN(std::string text, common::ReadFile(path));
  // An empty file (or only comments) is a mistake, not "every default": a 2000-step run of the
  // default model used to start from a truncated or wrong file. `matctl submit` refuses it too.
  bool empty = false;
  try {
    empty = YAML::Load(text).IsNull();
  } catch (const YAML::Exception&) {
    // Not YAML: ParseTrainConfig says what is wrong.
  }
  if (empty) return absl::InvalidArgumentError(path + ": the config is empty (no key is set)");
  return ParseTrainConfig(text, path);
}

absl::Status ApplyOverride(TrainConfig& config, const std::string& assignment) {
  size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError("--set '" + assignment + "': expected key=value");
  }
  std::string key = assignment.substr(0, eq);
  YAML::Node value;
  try {
    value = YAML::Load(assignment.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError("--set " + key + ": " + e.what());
  }
  if (value.IsNull()) value = YAML::Node(std::string());
  // YAML reads " #..." as a comment: '/data/wiki #2' would silently become '/data/wiki'.
  const std::string raw = assignment.substr(eq + 1);
  const bool comment = absl::StartsWith(raw, "#") || absl::StrContains(raw, " #") ||
                       absl::StrContains(raw, "\t#");
  if (comment && !(value.IsScalar() && absl::StrContains(value.Scalar(), "#"))) {
    return absl::InvalidArgumentError("--set " + key + ": '" + raw +
                                      "' holds a '#' that YAML reads as a comment; quote the "
                                      "value: --set '" + key + "=\"" + raw + "\"'");
  }
  return SetKey(config, key, value, "--set");
}

namespace {

using absl::StrCat;

// Every number of the config is finite.
absl::Status ValidateFinite(const TrainConfig& c) {
  TrainConfig copy = c;  // Schema hands out pointers into a mutable config
  for (const Field& f : Schema(copy)) {
    if (f.number != nullptr) {
      MAT_RETURN_IF_ERROR(Check(std::isfinite(*f.number),
                                StrCat(f.key, " must be a finite number, got ", *f.number)));
    }
  }
  return absl::OkStatus();
}

// model.* and data.* (which model fits which data).
absl::Status ValidateModelAndData(const TrainConfig& c) {
  const auto& m = c.model;
  const auto& d = c.data;
  MAT_RETURN_IF_ERROR(Check(m.kind == "bert" || m.kind == "switch" || m.kind == "vgg",
                            "model.kind: unknown model '" + m.kind +
                                "' (expected bert, switch or vgg)"));
  const bool images = d.kind == "fashion-mnist" || d.kind == "cifar10";
  MAT_RETURN_IF_ERROR(Check(d.kind == "wikitext" || images,
                            "data.kind: unknown data kind '" + d.kind +
                                "' (expected wikitext, fashion-mnist or cifar10)"));
  if (m.kind == "vgg") {
    MAT_RETURN_IF_ERROR(Check(images, "data.kind " + d.kind +
                                          " does not fit model.kind vgg (expected fashion-mnist "
                                          "or cifar10)"));
    MAT_RETURN_IF_ERROR(Check(m.arch == "vgg11" || m.arch == "vgg16",
                              "model.arch: unknown VGG '" + m.arch + "' (expected vgg11 or vgg16)"));
    MAT_RETURN_IF_ERROR(Check(m.width > 0 && m.width <= 64,
                              StrCat("model.width must be a number in (0, 64], got ", m.width)));
    MAT_RETURN_IF_ERROR(Check(m.filter_groups >= 1,
                              StrCat("model.filter_groups must be >= 1, got ", m.filter_groups)));
    // A group per conv layer holds at least one channel; the narrowest layer is the first
    // (nominal 64 channels).
    const double narrowest = VggScaledChannels(64, m.width);
    MAT_RETURN_IF_ERROR(Check(static_cast<double>(m.filter_groups) <= narrowest,
                              StrCat("model.filter_groups must be <= ", narrowest,
                                     " (the narrowest conv layer's channels at model.width ",
                                     m.width, "), got ", m.filter_groups)));
    MAT_RETURN_IF_ERROR(Check(m.classifier_hidden >= 0,
                              StrCat("model.classifier_hidden must be >= 0, got ",
                                     m.classifier_hidden)));
    MAT_RETURN_IF_ERROR(Check(d.valid_size >= 1,
                              StrCat("data.valid_size must be >= 1, got ", d.valid_size)));
  } else {
    MAT_RETURN_IF_ERROR(Check(!images, "data.kind " + d.kind + " does not fit model.kind " +
                                           m.kind + " (expected wikitext)"));
    MAT_RETURN_IF_ERROR(Check(m.layers >= 1, StrCat("model.layers must be >= 1, got ", m.layers)));
    MAT_RETURN_IF_ERROR(Check(m.heads >= 1 && m.d_model >= 1 && m.d_model % m.heads == 0,
                              StrCat("model.d_model must be a positive multiple of model.heads, "
                                     "got d_model ",
                                     m.d_model, " and heads ", m.heads)));
    MAT_RETURN_IF_ERROR(Check(m.d_ff >= 1, StrCat("model.d_ff must be >= 1, got ", m.d_ff)));
    MAT_RETURN_IF_ERROR(
        Check(m.ffn_groups >= 0 && (m.ffn_groups == 0 || m.d_ff % m.ffn_groups == 0),
              StrCat("model.ffn_groups must be 0 or divide model.d_ff, got ", m.ffn_groups)));
    MAT_RETURN_IF_ERROR(Check(m.dropout >= 0 && m.dropout < 1,
                              StrCat("model.dropout must be in [0,1), got ", m.dropout)));
    MAT_RETURN_IF_ERROR(Check(m.experts >= 1 && m.experts <= 4096,
                              StrCat("model.experts must be in [1, 4096], got ", m.experts)));
    MAT_RETURN_IF_ERROR(Check(m.capacity_factor > 0,
                              StrCat("model.capacity_factor must be > 0, got ", m.capacity_factor)));
    MAT_RETURN_IF_ERROR(Check(m.aux_loss_weight >= 0,
                              StrCat("model.aux_loss_weight must be >= 0, got ", m.aux_loss_weight)));
    MAT_RETURN_IF_ERROR(
        Check(m.moe_every >= 1, StrCat("model.moe_every must be >= 1, got ", m.moe_every)));
    MAT_RETURN_IF_ERROR(Check(m.kind != "switch" || m.ffn_groups == 0,
                              StrCat("model.ffn_groups must be 0 for model.kind switch (its FFNs "
                                     "are experts), got ",
                                     m.ffn_groups)));
    MAT_RETURN_IF_ERROR(Check(d.seq_len >= 2 && d.seq_len <= m.max_seq_len,
                              StrCat("data.seq_len must be in [2, model.max_seq_len], got ",
                                     d.seq_len, " with model.max_seq_len ", m.max_seq_len)));
    MAT_RETURN_IF_ERROR(Check(d.mask_prob > 0 && d.mask_prob < 1,
                              StrCat("data.mask_prob must be in (0,1), got ", d.mask_prob)));
  }
  MAT_RETURN_IF_ERROR(Check(d.vocab_size == 0 || d.vocab_size >= 2,
                            StrCat("data.vocab_size must be 0 (no cap) or >= 2, got ",
                                   d.vocab_size)));
  MAT_RETURN_IF_ERROR(Check(d.train_fraction > 0 && d.train_fraction <= 1,
                            StrCat("data.train_fraction must be in (0, 1], got ", d.train_fraction)));
  return absl::OkStatus();
}

absl::Status ValidateTrain(const TrainConfig& c) {
  const auto& t = c.train;
  MAT_RETURN_IF_ERROR(Check(t.steps >= 1, StrCat("train.steps must be >= 1, got ", t.steps)));
  // Above the bound a typo (99999999) grew the batch's rows until the host ran out of memory.
  MAT_RETURN_IF_ERROR(Check(t.batch_size >= 1 && t.batch_size <= 65536,
                            StrCat("train.batch_size must be in [1, 65536], got ", t.batch_size)));
  MAT_RETURN_IF_ERROR(Check(t.lr > 0, StrCat("train.lr must be > 0, got ", t.lr)));
  MAT_RETURN_IF_ERROR(Check(t.min_lr_ratio >= 0 && t.min_lr_ratio <= 1,
                            StrCat("train.min_lr_ratio must be in [0,1], got ", t.min_lr_ratio)));
  MAT_RETURN_IF_ERROR(Check(t.warmup_steps >= 0,
                            StrCat("train.warmup_steps must be >= 0, got ", t.warmup_steps)));
  MAT_RETURN_IF_ERROR(Check(t.schedule == "linear" || t.schedule == "cosine" ||
                                t.schedule == "constant" || t.schedule == "step",
                            "train.schedule: unknown schedule '" + t.schedule +
                                "' (expected linear, cosine, constant or step)"));
  MAT_RETURN_IF_ERROR(
      Check(t.decay_every >= 1, StrCat("train.decay_every must be >= 1, got ", t.decay_every)));
  MAT_RETURN_IF_ERROR(Check(t.decay_factor > 0 && t.decay_factor <= 1,
                            StrCat("train.decay_factor must be in (0, 1], got ", t.decay_factor)));
  MAT_RETURN_IF_ERROR(Check(t.optimizer == "adamw" || t.optimizer == "sgd",
                            "train.optimizer: unknown optimizer '" + t.optimizer +
                                "' (expected adamw or sgd)"));
  MAT_RETURN_IF_ERROR(Check(t.momentum >= 0 && t.momentum < 1,
                            StrCat("train.momentum must be in [0,1), got ", t.momentum)));
  MAT_RETURN_IF_ERROR(Check(!t.nesterov || t.momentum > 0,
                            StrCat("train.nesterov needs train.momentum > 0, got ", t.momentum)));
  MAT_RETURN_IF_ERROR(Check(t.weight_decay >= 0,
                            StrCat("train.weight_decay must be >= 0, got ", t.weight_decay)));
  MAT_RETURN_IF_ERROR(Check(t.beta1 >= 0 && t.beta1 < 1 && t.beta2 >= 0 && t.beta2 < 1,
                            StrCat("train.beta1 and train.beta2 must be in [0,1), got ", t.beta1,
                                   " and ", t.beta2)));
  MAT_RETURN_IF_ERROR(
      Check(t.eval_every >= 1, StrCat("train.eval_every must be >= 1, got ", t.eval_every)));
  MAT_RETURN_IF_ERROR(Check(t.eval_batches >= 0,
                            StrCat("train.eval_batches must be >= 0, got ", t.eval_batches)));
  MAT_RETURN_IF_ERROR(Check(t.checkpoint_every >= 0, StrCat("train.checkpoint_every must be >= 0, got ",
                                                            t.checkpoint_every)));
  MAT_RETURN_IF_ERROR(Check(t.threads >= 0 && t.threads <= 1024,
                            StrCat("train.threads must be in [0, 1024], got ", t.threads)));
  MAT_RETURN_IF_ERROR(Check(t.device == "cpu" || t.device == "cuda" || t.device.rfind("cuda:", 0) == 0,
                            "train.device: unknown device '" + t.device + "' (expected cpu, cuda or cuda:N)"));
  MAT_RETURN_IF_ERROR(Check(t.precision == "fp32" || t.precision == "bf16",
                            "train.precision: unknown precision '" + t.precision + "' (expected fp32 or bf16)"));
  return absl::OkStatus();
}

absl::Status ValidatePolicy(const TrainConfig& c) {
  const auto& p = c.policy;
  MAT_RETURN_IF_ERROR(Check(p.probe_samples >= 2,
                            StrCat("policy.probe_samples must be >= 2, got ", p.probe_samples)));
  const auto& t = c.train;
  MAT_RETURN_IF_ERROR(Check(p.probe_samples <= t.batch_size,
                            StrCat("policy.probe_samples must be <= train.batch_size (the probe "
                                   "uses the step's first samples), got ",
                                   p.probe_samples, " with train.batch_size ", t.batch_size)));
  MAT_RETURN_IF_ERROR(
      Check(p.probe_every >= 1, StrCat("policy.probe_every must be >= 1, got ", p.probe_every)));
  MAT_RETURN_IF_ERROR(Check(p.estimator == "gram" || p.estimator == "exact" ||
                                p.estimator == "lanczos" || p.estimator == "exact-output" ||
                                p.estimator == "output",
                            "policy.estimator: unknown estimator '" + p.estimator +
                                "' (expected gram, output, exact, lanczos or exact-output)"));
  MAT_RETURN_IF_ERROR(Check(p.lanczos_iterations >= 1 && p.lanczos_iterations <= 1000000,
                            StrCat("policy.lanczos_iterations must be in [1, 1000000], got ",
                                   p.lanczos_iterations)));
  MAT_RETURN_IF_ERROR(Check(p.probe_projections >= 1 && p.probe_projections <= 1000000,
                            StrCat("policy.probe_projections must be in [1, 1000000], got ",
                                   p.probe_projections)));
  MAT_RETURN_IF_ERROR(Check(p.probe_positions >= 1 && p.probe_positions <= 1000000,
                            StrCat("policy.probe_positions must be in [1, 1000000], got ",
                                   p.probe_positions)));
  MAT_RETURN_IF_ERROR(
      Check(p.patience >= 1, StrCat("policy.patience must be >= 1, got ", p.patience)));
  // The policy keeps these as int (ToPolicyConfig).
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  MAT_RETURN_IF_ERROR(Check(p.patience <= kIntMax, StrCat("policy.patience must be <= ", kIntMax,
                                                          ", got ", p.patience)));
  MAT_RETURN_IF_ERROR(Check(p.multirate_k <= kIntMax, StrCat("policy.multirate_k must be <= ",
                                                             kIntMax, ", got ", p.multirate_k)));
  if (absl::StatusOr<policy::PolicyKind> kind = policy::ParsePolicyKind(p.kind); !kind.ok()) {
    return absl::InvalidArgumentError("policy.kind: " + std::string(kind.status().message()));
  }
  if (auto delta1 = policy::ParseDelta1Reading(p.delta1); !delta1.ok()) {
    return absl::InvalidArgumentError("policy.delta1: " + std::string(delta1.status().message()));
  }
  MAT_RETURN_IF_ERROR(Check(p.backward == "weights" || p.backward == "detach",
                            "policy.backward: unknown backward mode '" + p.backward +
                                "' (expected weights or detach)"));
  MAT_RETURN_IF_ERROR(Check(p.backward == "weights" || c.model.kind != "vgg",
                            "policy.backward detach is not implemented for model.kind vgg (its "
                            "filter groups support weights only)"));
  MAT_RETURN_IF_ERROR(Check(p.rand_schedule.empty() || p.kind == "rand" ||
                                p.kind == "frozen-random" || p.kind == "inverse",
                            "policy.rand_schedule replays a MAT run's decisions for policy.kind "
                            "rand, frozen-random or inverse only, got kind '" + p.kind + "'"));
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateTrainConfig(const TrainConfig& c) {
  MAT_RETURN_IF_ERROR(ValidateFinite(c));
  MAT_RETURN_IF_ERROR(ValidateModelAndData(c));
  MAT_RETURN_IF_ERROR(ValidateTrain(c));
  MAT_RETURN_IF_ERROR(ValidatePolicy(c));
  return policy::ValidatePolicyConfig(ToPolicyConfig(c));
}

absl::Status ValidateRankShare(const TrainConfig& c, int64_t world_size) {
  if (c.train.batch_size % world_size != 0) {
    return absl::InvalidArgumentError(
        StrCat("train.batch_size ", c.train.batch_size, " is not a multiple of the ", world_size,
               " ranks (resources.workers; each rank takes an equal share)"));
  }
  const int64_t per_rank = c.train.batch_size / world_size;
  if (c.policy.probe_samples > per_rank) {
    return absl::InvalidArgumentError(
        StrCat("policy.probe_samples ", c.policy.probe_samples,
               " is more than a rank's share of train.batch_size (", per_rank, " of ",
               c.train.batch_size, " over ", world_size,
               " ranks, resources.workers; each rank probes its own)"));
  }
  return absl::OkStatus();
}

policy::PolicyConfig ToPolicyConfig(const TrainConfig& c) {
  policy::PolicyConfig p;
  auto kind = policy::ParsePolicyKind(c.policy.kind);
  if (kind.ok()) p.kind = *kind;
  p.warmup_steps = c.policy.warmup_steps;
  p.interval_steps = c.policy.probe_every;
  p.alpha = c.policy.alpha;
  p.beta = c.policy.beta;
  p.gamma = c.policy.gamma;
  p.patience = static_cast<int>(c.policy.patience);
  p.min_active_fraction = c.policy.min_active_fraction;
  p.rand_fraction = c.policy.rand_fraction;
  p.multirate_k = static_cast<int>(c.policy.multirate_k);
  p.multirate_fast_fraction = c.policy.multirate_fast_fraction;
  auto delta1 = policy::ParseDelta1Reading(c.policy.delta1);
  if (delta1.ok()) p.delta1 = *delta1;
  p.seed = c.seed;
  return p;
}

absl::StatusOr<std::vector<policy::Policy::ScheduleEntry>> LoadActiveCountSchedule(
    const std::string& path) {
  absl::StatusOr<std::string> read = common::ReadFile(path);
  if (!read.ok()) {
    return absl::Status(read.status().code(),
                        absl::StrCat("policy.rand_schedule: ", read.status().message()));
  }
  const std::string& text = *read;
  std::vector<policy::Policy::ScheduleEntry> out;
  std::istringstream in(text);
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError("policy.rand_schedule: " + path + " line " +
                                        std::to_string(number) + ": " + what);
    };
    const nlohmann::json d = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (d.is_discarded()) return bad("not a JSON object");
    absl::StatusOr<policy::Policy::ScheduleEntry> entry = policy::ScheduleEntryFromDecisionJson(d);
    if (!entry.ok()) return bad(std::string(entry.status().message()));
    policy::Policy::ScheduleEntry& e = *entry;
    if (!out.empty() && e.step <= out.back().step) return bad("steps do not ascend");
    out.push_back(std::move(e));
  }
  if (out.empty()) return absl::InvalidArgumentError("policy.rand_schedule: " + path + " holds no decision");
  return out;
}

std::vector<std::pair<std::string, std::string>> ListConfig(const TrainConfig& config) {
  TrainConfig copy = config;
  std::vector<std::pair<std::string, std::string>> out;
  for (const Field& f : Schema(copy)) out.emplace_back(f.key, f.get());
  return out;
}

std::string FormatConfigYaml(const TrainConfig& config) {
  std::string out;
  for (const auto& [key, value] : ListConfig(config)) {
    // Plain when YAML reads the text back as itself; double-quoted otherwise (empty, a ' #',
    // a leading '*', '&', '{', ...).
    bool plain = !value.empty();
    if (plain) {
      try {
        const YAML::Node n = YAML::Load(value);
        plain = n.IsScalar() && n.Scalar() == value;
      } catch (const YAML::Exception&) {
        plain = false;
      }
    }
    if (plain) {
      absl::StrAppend(&out, key, ": ", value, "\n");
    } else {
      YAML::Emitter quoted;
      quoted << YAML::DoubleQuoted << value;
      absl::StrAppend(&out, key, ": ", quoted.c_str(), "\n");
    }
  }
  return out;
}

}  // namespace mat::config
