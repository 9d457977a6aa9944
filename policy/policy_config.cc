#include "policy/policy_config.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace mat::policy {
namespace {

absl::Status RequireInUnit(const char* field, double v) {
  if (!(v >= 0.0 && v <= 1.0)) {  // also rejects NaN
    return absl::InvalidArgumentError(absl::StrCat("policy.", field, " must be in [0,1], got ", v));
  }
  return absl::OkStatus();
}

absl::Status RequireAtLeast(const char* field, int64_t v, int64_t min) {
  if (v < min) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.", field, " must be >= ", min, ", got ", v));
  }
  return absl::OkStatus();
}

absl::Status ReadDouble(const nlohmann::json& j, const char* field, double* out) {
  auto it = j.find(field);
  if (it == j.end() || !it->is_number()) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.", field, " is missing or not a number"));
  }
  *out = it->get<double>();
  return absl::OkStatus();
}

template <typename Int>
absl::Status ReadInt(const nlohmann::json& j, const char* field, Int* out) {
  auto it = j.find(field);
  bool ok = it != j.end() && it->is_number_integer();
  if (ok && it->is_number_unsigned()) {
    ok = it->get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<Int>::max());
  } else if (ok) {
    const int64_t v = it->get<int64_t>();
    ok = v >= std::numeric_limits<Int>::min() && v <= std::numeric_limits<Int>::max();
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.", field, " is missing or not an integer in range"));
  }
  *out = static_cast<Int>(it->get<int64_t>());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PolicyKind> ParsePolicyKind(const std::string& s) {
  if (s == "full") return PolicyKind::kFull;
  if (s == "mat") return PolicyKind::kMat;
  if (s == "rand") return PolicyKind::kRand;
  if (s == "multirate") return PolicyKind::kMultirate;
  if (s == "frozen-random") return PolicyKind::kFrozenRandom;
  if (s == "inverse") return PolicyKind::kInverse;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown policy kind \"", s,
      "\" (expected full, mat, rand, multirate, frozen-random or inverse)"));
}

bool UsesMatRules(PolicyKind k) {
  return k == PolicyKind::kMat || k == PolicyKind::kFrozenRandom || k == PolicyKind::kInverse;
}

absl::StatusOr<Delta1Reading> ParseDelta1Reading(const std::string& s) {
  if (s == "warmup") return Delta1Reading::kAfterWarmup;
  if (s == "first-probe") return Delta1Reading::kFirstProbe;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown delta1 reading \"", s, "\" (expected warmup or first-probe)"));
}

std::string Delta1ReadingName(Delta1Reading r) {
  return r == Delta1Reading::kFirstProbe ? "first-probe" : "warmup";
}

std::string PolicyKindName(PolicyKind k) {
  switch (k) {
    case PolicyKind::kFull:
      return "full";
    case PolicyKind::kMat:
      return "mat";
    case PolicyKind::kRand:
      return "rand";
    case PolicyKind::kMultirate:
      return "multirate";
    case PolicyKind::kFrozenRandom:
      return "frozen-random";
    case PolicyKind::kInverse:
      return "inverse";
  }
  return "unknown";
}

absl::Status ValidatePolicyConfig(const PolicyConfig& c) {
  if (PolicyKindName(c.kind) == "unknown") {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.kind is not a known kind: ", static_cast<int>(c.kind)));
  }
  MAT_RETURN_IF_ERROR(RequireAtLeast("warmup_steps", c.warmup_steps, 0));
  MAT_RETURN_IF_ERROR(RequireAtLeast("interval_steps", c.interval_steps, 1));
  MAT_RETURN_IF_ERROR(RequireInUnit("alpha", c.alpha));
  MAT_RETURN_IF_ERROR(RequireInUnit("beta", c.beta));
  if (!(c.gamma >= 0.0 && c.gamma < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("policy.gamma must be in [0,1), got ", c.gamma));
  }
  MAT_RETURN_IF_ERROR(RequireAtLeast("patience", c.patience, 1));
  MAT_RETURN_IF_ERROR(RequireInUnit("min_active_fraction", c.min_active_fraction));
  if (!(c.delta_floor > 0.0 && std::isfinite(c.delta_floor))) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.delta_floor must be finite and > 0, got ", c.delta_floor));
  }
  MAT_RETURN_IF_ERROR(RequireInUnit("rand_fraction", c.rand_fraction));
  MAT_RETURN_IF_ERROR(RequireAtLeast("multirate_k", c.multirate_k, 1));
  MAT_RETURN_IF_ERROR(RequireInUnit("multirate_fast_fraction", c.multirate_fast_fraction));
  return absl::OkStatus();
}

nlohmann::json PolicyConfigToJson(const PolicyConfig& c) {
  return nlohmann::json{
      {"kind", PolicyKindName(c.kind)},
      {"warmup_steps", c.warmup_steps},
      {"interval_steps", c.interval_steps},
      {"alpha", c.alpha},
      {"beta", c.beta},
      {"gamma", c.gamma},
      {"patience", c.patience},
      {"min_active_fraction", c.min_active_fraction},
      {"delta1", Delta1ReadingName(c.delta1)},
      {"delta_floor", c.delta_floor},
      {"rand_fraction", c.rand_fraction},
      {"multirate_k", c.multirate_k},
      {"multirate_fast_fraction", c.multirate_fast_fraction},
      {"seed", c.seed},
  };
}

absl::StatusOr<PolicyConfig> PolicyConfigFromJson(const nlohmann::json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("policy config is not a JSON object");
  PolicyConfig c;
  auto kind = j.find("kind");
  if (kind == j.end() || !kind->is_string()) {
    return absl::InvalidArgumentError("policy.kind is missing or not a string");
  }
  MAT_ASSIGN_OR_RETURN(c.kind, ParsePolicyKind(kind->get<std::string>()));
  MAT_RETURN_IF_ERROR(ReadInt(j, "warmup_steps", &c.warmup_steps));
  MAT_RETURN_IF_ERROR(ReadInt(j, "interval_steps", &c.interval_steps));
  MAT_RETURN_IF_ERROR(ReadDouble(j, "alpha", &c.alpha));
  MAT_RETURN_IF_ERROR(ReadDouble(j, "beta", &c.beta));
  MAT_RETURN_IF_ERROR(ReadDouble(j, "gamma", &c.gamma));
  MAT_RETURN_IF_ERROR(ReadInt(j, "patience", &c.patience));
  MAT_RETURN_IF_ERROR(ReadDouble(j, "min_active_fraction", &c.min_active_fraction));
  if (auto d1 = j.find("delta1"); d1 != j.end()) {
    if (!d1->is_string()) return absl::InvalidArgumentError("policy.delta1 is not a string");
    MAT_ASSIGN_OR_RETURN(c.delta1, ParseDelta1Reading(d1->get<std::string>()));
  }
  MAT_RETURN_IF_ERROR(ReadDouble(j, "delta_floor", &c.delta_floor));
  MAT_RETURN_IF_ERROR(ReadDouble(j, "rand_fraction", &c.rand_fraction));
  MAT_RETURN_IF_ERROR(ReadInt(j, "multirate_k", &c.multirate_k));
  MAT_RETURN_IF_ERROR(ReadDouble(j, "multirate_fast_fraction", &c.multirate_fast_fraction));
  auto seed = j.find("seed");
  if (seed == j.end() || !seed->is_number_unsigned()) {
    return absl::InvalidArgumentError("policy.seed is missing or not a non-negative integer");
  }
  c.seed = seed->get<uint64_t>();
  return c;
}

}  // namespace mat::policy
