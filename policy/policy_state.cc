// Policy::SaveState and Policy::LoadState: the policy's State as JSON text.
//
// Format "mat.policy.state/1":
//   {"format", "config": PolicyConfigToJson, "modules": [{"name","group","layer","index"}],
//    "last_step", "smoothed": [x|null], "delta1": [x|null], "below_count": [int],
//    "converged": [0|1], "mask": [0|1], "split_chosen": bool, "fast": [0|1],
//    "rng": std::mt19937_64 text state, "permutation_chosen": bool, "permutation": [int]}
// (the last two, kFrozenRandom's, may be absent in states saved before it existed: not chosen).
// Doubles are written by nlohmann::json in shortest round-trip form, so they load bit-identically.
#include <cmath>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "policy/policy.h"

namespace mat::policy {
namespace {

constexpr char kStateFormat[] = "mat.policy.state/1";

using Json = nlohmann::json;

absl::Status Corrupt(const std::string& what) {
  return absl::DataLossError(absl::StrCat("policy state: ", what));
}

absl::StatusOr<const Json*> Field(const Json& j, const char* name) {
  auto it = j.find(name);
  if (it == j.end()) return Corrupt(absl::StrCat("missing field \"", name, "\""));
  return &*it;
}

absl::StatusOr<const Json*> ArrayField(const Json& j, const char* name, size_t size) {
  MAT_ASSIGN_OR_RETURN(const Json* a, Field(j, name));
  if (!a->is_array() || a->size() != size) {
    return Corrupt(absl::StrCat("\"", name, "\" must be an array of ", size, " values"));
  }
  return a;
}

// Reads [x|null, ...]: finite numbers (> 0 when `positive`), or null for "no value".
absl::Status ReadOptionalDoubles(const Json& j, const char* name, bool positive,
                                 std::vector<double>* values, std::vector<uint8_t>* present) {
  MAT_ASSIGN_OR_RETURN(const Json* a, ArrayField(j, name, values->size()));
  for (size_t i = 0; i < a->size(); ++i) {
    const Json& v = (*a)[i];
    if (v.is_null()) {
      (*values)[i] = 0.0;
      (*present)[i] = 0;
      continue;
    }
    const bool ok =
        v.is_number() && std::isfinite(v.get<double>()) && (!positive || v.get<double>() > 0.0);
    if (!ok) {
      return Corrupt(absl::StrCat("\"", name, "\"[", i, "] must be null or a finite",
                                  positive ? " positive" : "", " number"));
    }
    (*values)[i] = v.get<double>();
    (*present)[i] = 1;
  }
  return absl::OkStatus();
}

absl::Status ReadBits(const Json& j, const char* name, std::vector<uint8_t>* bits) {
  MAT_ASSIGN_OR_RETURN(const Json* a, ArrayField(j, name, bits->size()));
  for (size_t i = 0; i < a->size(); ++i) {
    const Json& v = (*a)[i];
    if (!v.is_number_unsigned() || v.get<uint64_t>() > 1) {
      return Corrupt(absl::StrCat("\"", name, "\"[", i, "] must be 0 or 1"));
    }
    (*bits)[i] = static_cast<uint8_t>(v.get<uint64_t>());
  }
  return absl::OkStatus();
}

// INVALID_ARGUMENT naming the first field where the saved config differs from `mine`.
absl::Status CompareConfig(const Json& saved_json, const PolicyConfig& mine) {
  absl::StatusOr<PolicyConfig> saved = PolicyConfigFromJson(saved_json);
  if (!saved.ok()) return Corrupt(std::string(saved.status().message()));
  const Json a = PolicyConfigToJson(*saved);
  const Json b = PolicyConfigToJson(mine);
  for (auto it = b.begin(); it != b.end(); ++it) {
    if (a.at(it.key()) != it.value()) {
      return absl::InvalidArgumentError(absl::StrCat("policy state was saved with policy.",
                                                     it.key(), " = ", a.at(it.key()).dump(),
                                                     ", this policy has ", it.value().dump()));
    }
  }
  return absl::OkStatus();
}

// INVALID_ARGUMENT when the saved module list is not `mine`.
absl::Status CompareModules(const Json& saved, const std::vector<ModuleInfo>& mine) {
  if (!saved.is_array()) return Corrupt("\"modules\" must be an array");
  if (saved.size() != mine.size()) {
    return absl::InvalidArgumentError(absl::StrCat("policy state was saved for ", saved.size(),
                                                   " modules, this policy has ", mine.size()));
  }
  for (size_t i = 0; i < mine.size(); ++i) {
    const Json expected = {{"name", mine[i].name},
                           {"group", mine[i].group},
                           {"layer", mine[i].layer},
                           {"index", mine[i].index}};
    if (saved[i] != expected) {
      return absl::InvalidArgumentError(absl::StrCat("policy state was saved for module ",
                                                     saved[i].dump(), " at position ", i,
                                                     ", this policy has ", expected.dump()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string Policy::SaveState() const {
  Json modules = Json::array();
  for (const ModuleInfo& m : modules_) {
    modules.push_back(
        {{"name", m.name}, {"group", m.group}, {"layer", m.layer}, {"index", m.index}});
  }
  Json smoothed = Json::array();
  Json delta1 = Json::array();
  for (size_t i = 0; i < modules_.size(); ++i) {
    smoothed.push_back(state_.has_smoothed[i] ? Json(state_.smoothed[i]) : Json(nullptr));
    delta1.push_back(state_.has_delta1[i] ? Json(state_.delta1[i]) : Json(nullptr));
  }
  std::ostringstream rng;
  rng << state_.rng;
  const Json j = {
      {"format", kStateFormat},
      {"config", PolicyConfigToJson(config_)},
      {"modules", std::move(modules)},
      {"last_step", state_.last_step},
      {"smoothed", std::move(smoothed)},
      {"delta1", std::move(delta1)},
      {"below_count", state_.below_count},
      {"converged", state_.converged},
      {"mask", state_.mask},
      {"split_chosen", state_.split_chosen},
      {"fast", state_.fast},
      {"rng", rng.str()},
      {"permutation_chosen", state_.permutation_chosen},
      {"permutation", state_.permutation},
  };
  return j.dump();
}

absl::Status Policy::LoadState(const std::string& text) {
  const Json j = Json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Corrupt("not valid JSON");
  if (!j.is_object()) return Corrupt("not a JSON object");
  MAT_ASSIGN_OR_RETURN(const Json* format, Field(j, "format"));
  if (*format != kStateFormat) {
    return Corrupt(absl::StrCat("format is ", format->dump(), ", expected \"", kStateFormat, "\""));
  }
  MAT_ASSIGN_OR_RETURN(const Json* config, Field(j, "config"));
  MAT_RETURN_IF_ERROR(CompareConfig(*config, config_));
  MAT_ASSIGN_OR_RETURN(const Json* modules, Field(j, "modules"));
  MAT_RETURN_IF_ERROR(CompareModules(*modules, modules_));

  const size_t n = modules_.size();
  State s;
  MAT_ASSIGN_OR_RETURN(const Json* last_step, Field(j, "last_step"));
  if (!last_step->is_number_integer() || last_step->get<int64_t>() < -1) {
    return Corrupt("\"last_step\" must be an integer >= -1");
  }
  s.last_step = last_step->get<int64_t>();
  s.smoothed.resize(n);
  s.has_smoothed.resize(n);
  MAT_RETURN_IF_ERROR(ReadOptionalDoubles(j, "smoothed", false, &s.smoothed, &s.has_smoothed));
  s.delta1.resize(n);
  s.has_delta1.resize(n);
  MAT_RETURN_IF_ERROR(ReadOptionalDoubles(j, "delta1", true, &s.delta1, &s.has_delta1));
  MAT_ASSIGN_OR_RETURN(const Json* below, ArrayField(j, "below_count", n));
  s.below_count.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const Json& v = (*below)[i];
    if (!v.is_number_unsigned() || v.get<uint64_t>() > static_cast<uint64_t>(config_.patience)) {
      return Corrupt(absl::StrCat("\"below_count\"[", i, "] must be an integer in [0, ",
                                  config_.patience, "]"));
    }
    s.below_count[i] = static_cast<int>(v.get<uint64_t>());
  }
  s.converged.resize(n);
  MAT_RETURN_IF_ERROR(ReadBits(j, "converged", &s.converged));
  s.mask.resize(n);
  MAT_RETURN_IF_ERROR(ReadBits(j, "mask", &s.mask));
  MAT_ASSIGN_OR_RETURN(const Json* split_chosen, Field(j, "split_chosen"));
  if (!split_chosen->is_boolean()) return Corrupt("\"split_chosen\" must be a boolean");
  s.split_chosen = split_chosen->get<bool>();
  s.fast.resize(n);
  MAT_RETURN_IF_ERROR(ReadBits(j, "fast", &s.fast));
  MAT_ASSIGN_OR_RETURN(const Json* rng, Field(j, "rng"));
  if (!rng->is_string()) return Corrupt("\"rng\" must be a string");
  std::istringstream in(rng->get<std::string>());
  in >> s.rng;
  if (in.fail() || !(in >> std::ws).eof()) return Corrupt("\"rng\" is not a mt19937_64 state");

  s.permutation.resize(n);
  for (size_t i = 0; i < n; ++i) s.permutation[i] = static_cast<int>(i);
  if (auto chosen = j.find("permutation_chosen"); chosen != j.end()) {
    if (!chosen->is_boolean()) return Corrupt("\"permutation_chosen\" must be a boolean");
    s.permutation_chosen = chosen->get<bool>();
    MAT_ASSIGN_OR_RETURN(const Json* perm, ArrayField(j, "permutation", n));
    std::vector<uint8_t> seen(n, 0);
    for (size_t i = 0; i < n; ++i) {
      const Json& v = (*perm)[i];
      // A permutation within each group: every target once, in the source's group.
      const bool ok = v.is_number_unsigned() && v.get<uint64_t>() < n &&
                      !seen[v.get<uint64_t>()] &&
                      modules_[v.get<uint64_t>()].group == modules_[i].group;
      if (!ok) {
        return Corrupt(absl::StrCat("\"permutation\"[", i,
                                    "] must be a module of the same group, each once"));
      }
      seen[v.get<uint64_t>()] = 1;
      s.permutation[i] = static_cast<int>(v.get<uint64_t>());
    }
  }

  state_ = std::move(s);
  return absl::OkStatus();
}

}  // namespace mat::policy
