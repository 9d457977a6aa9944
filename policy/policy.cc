#include "policy/policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace mat::policy {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A uniform integer in [0, n), n >= 1, from the raw 64-bit output of `rng` by rejection:
// outputs below 2^64 mod n are redrawn so every residue is equally likely. Unlike
// std::uniform_int_distribution, the result is the same on every standard library.
uint64_t UniformBelow(std::mt19937_64& rng, uint64_t n) {
  const uint64_t reject_below = (0 - n) % n;  // 2^64 mod n
  while (true) {
    const uint64_t r = rng();
    if (r >= reject_below) return r % n;
  }
}

// round(fraction·size), halves away from zero, clamped to [0, size].
int RoundedCount(double fraction, int size) {
  const long long n = std::llround(fraction * size);
  return static_cast<int>(std::clamp<long long>(n, 0, size));
}

std::string NonFiniteName(double v) {
  if (std::isnan(v)) return "nan";
  return v > 0 ? "inf" : "-inf";
}

nlohmann::json JsonNumber(double v) {
  if (std::isfinite(v)) return v;
  return NonFiniteName(v);
}

}  // namespace

nlohmann::json Decision::ToJson(const std::vector<ModuleInfo>& modules,
                                const PolicyConfig& config) const {
  MAT_CHECK(mask.size() == modules.size() && converged.size() == modules.size() &&
            lambda_smoothed.size() == modules.size() &&
            (rule.empty() || rule.size() == modules.size()) &&
            (lambda_raw.empty() || lambda_raw.size() == modules.size()))
      << "Decision::ToJson: decision for " << mask.size() << " modules, given " << modules.size();
  nlohmann::json thresholds = nlohmann::json::object();
  for (const auto& [group, value] : threshold) thresholds[group] = JsonNumber(value);
  nlohmann::json entries = nlohmann::json::array();
  nlohmann::json rules = nlohmann::json::object();
  int num_active = 0;
  for (size_t i = 0; i < modules.size(); ++i) {
    num_active += mask[i] ? 1 : 0;
    entries.push_back({
        {"name", modules[i].name},
        {"group", modules[i].group},
        {"layer", modules[i].layer},
        {"index", modules[i].index},
        {"lambda", lambda_raw.empty() ? nlohmann::json(nullptr) : JsonNumber(lambda_raw[i])},
        {"lambda_smoothed", JsonNumber(lambda_smoothed[i])},
        {"active", mask[i] != 0},
        {"converged", converged[i] != 0},
        {"rule", rule.empty() ? std::string() : rule[i]},
    });
    if (!rule.empty()) rules[rule[i]] = rules.value(rule[i], 0) + 1;
  }
  return nlohmann::json{
      {"step", step},
      {"phase", phase},
      {"policy", PolicyConfigToJson(config)},
      {"threshold", std::move(thresholds)},
      {"num_active", num_active},
      {"rules", std::move(rules)},
      {"rejected", rejected},
      {"modules", std::move(entries)},
  };
}

absl::StatusOr<std::unique_ptr<Policy>> Policy::Create(const PolicyConfig& config,
                                                       std::vector<ModuleInfo> modules) {
  MAT_RETURN_IF_ERROR(ValidatePolicyConfig(config));
  std::set<std::string> names;
  std::set<std::tuple<std::string, int, int>> positions;
  for (size_t i = 0; i < modules.size(); ++i) {
    const ModuleInfo& m = modules[i];
    if (m.name.empty() || m.group.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("policy module ", i,
                                                     " needs a name and a group (name \"", m.name,
                                                     "\", group \"", m.group, "\")"));
    }
    if (m.layer < 0 || m.index < 0) {
      return absl::InvalidArgumentError(absl::StrCat("policy module ", m.name,
                                                     ": layer and index must be >= 0, got ",
                                                     m.layer, " and ", m.index));
    }
    if (!names.insert(m.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("policy module name ", m.name, " repeats"));
    }
    if (!positions.insert({m.group, m.layer, m.index}).second) {
      return absl::InvalidArgumentError(absl::StrCat("policy module ", m.name, ": group ", m.group,
                                                     " layer ", m.layer, " index ", m.index,
                                                     " repeats"));
    }
  }
  return std::unique_ptr<Policy>(new Policy(config, std::move(modules)));
}

Policy::Policy(const PolicyConfig& config, std::vector<ModuleInfo> modules)
    : config_(config), modules_(std::move(modules)) {
  const size_t n = modules_.size();
  for (size_t i = 0; i < n; ++i) groups_[modules_[i].group].push_back(static_cast<int>(i));
  state_.smoothed.assign(n, 0.0);
  state_.has_smoothed.assign(n, 0);
  state_.delta1.assign(n, 0.0);
  state_.has_delta1.assign(n, 0);
  state_.below_count.assign(n, 0);
  state_.converged.assign(n, 0);
  state_.mask.assign(n, 1);
  state_.fast.assign(n, 1);
  state_.permutation.resize(n);
  for (size_t i = 0; i < n; ++i) state_.permutation[i] = static_cast<int>(i);
  state_.rng.seed(config_.seed);
}

bool Policy::NeedsSpectra() const { return UsesMatRules(config_.kind); }

absl::StatusOr<Decision> Policy::Observe(int64_t step, const std::vector<double>& lambda) {
  if (step < 0 || step % config_.interval_steps != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy observation at step ", step,
                     ": expected a step >= 0 that is a multiple of policy.interval_steps = ",
                     config_.interval_steps));
  }
  if (step <= state_.last_step) {
    return absl::FailedPreconditionError(absl::StrCat(
        "policy observation at step ", step, ": already observed step ", state_.last_step));
  }
  const bool may_be_empty = !NeedsSpectra() && lambda.empty();
  if (!may_be_empty && lambda.size() != modules_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "policy observation at step ", step, ": got ", lambda.size(), " lambda values for ",
        modules_.size(), " modules", NeedsSpectra() ? "" : " (or none)"));
  }

  Decision decision;
  decision.step = step;
  decision.lambda_raw = lambda;
  const bool warmup = step < config_.warmup_steps;
  decision.phase = warmup ? "warmup" : "policy";
  Smooth(step, lambda, &decision);
  for (const auto& group : groups_) decision.threshold[group.first] = kNaN;

  std::vector<uint8_t> mask(modules_.size(), 1);
  decision.rule.assign(modules_.size(), "warmup");
  if (!warmup) {
    switch (config_.kind) {
      case PolicyKind::kFull:
        decision.rule.assign(modules_.size(), "full");
        break;
      case PolicyKind::kMat:
        mask = MatMask(&decision);
        break;
      case PolicyKind::kFrozenRandom:
        mask = FrozenRandomMask(ReplayedMatMask(step, MatMask(&decision)), &decision);
        break;
      case PolicyKind::kInverse:
        mask = InverseMask(ReplayedMatMask(step, MatMask(&decision)), &decision);
        break;
      case PolicyKind::kRand:
        mask = replayed_.empty() ? RandomSubset(config_.rand_fraction) : RandomSubsetAt(step);
        decision.rule.assign(modules_.size(), "random");
        break;
      case PolicyKind::kMultirate:
        if (!state_.split_chosen) {
          state_.fast = RandomSubset(config_.multirate_fast_fraction);
          state_.split_chosen = true;
        }
        mask = state_.fast;
        decision.rule.assign(modules_.size(), "multirate");
        break;
    }
  }
  state_.mask = mask;
  state_.last_step = step;
  decision.mask = std::move(mask);
  decision.converged = state_.converged;
  decision.lambda_smoothed.resize(modules_.size());
  for (size_t i = 0; i < modules_.size(); ++i) {
    decision.lambda_smoothed[i] = state_.has_smoothed[i] ? state_.smoothed[i] : kNaN;
  }
  return decision;
}

void Policy::Smooth(int64_t step, const std::vector<double>& lambda, Decision* decision) {
  // Δ is tracked whenever the temporal policy is on; it counts only after warm-up.
  const bool tracked = UsesMatRules(config_.kind) && config_.beta > 0.0;
  const bool temporal = tracked && step >= config_.warmup_steps;
  for (size_t i = 0; i < lambda.size(); ++i) {
    const double x = lambda[i];
    if (!std::isfinite(x)) {
      decision->rejected.push_back(
          absl::StrCat(modules_[i].name, ": lambda is ", NonFiniteName(x)));
      continue;
    }
    if (!state_.has_smoothed[i]) {
      state_.smoothed[i] = x;
      state_.has_smoothed[i] = 1;
      continue;  // no Δ without a previous value
    }
    const double previous = state_.smoothed[i];
    state_.smoothed[i] = config_.gamma * previous + (1.0 - config_.gamma) * x;
    if (!tracked || state_.converged[i]) continue;
    const double delta = std::fabs(state_.smoothed[i] - previous);
    const bool take_delta1 = temporal || config_.delta1 == Delta1Reading::kFirstProbe;
    if (!state_.has_delta1[i] && take_delta1) {
      state_.delta1[i] = std::max(delta, config_.delta_floor);
      state_.has_delta1[i] = 1;
    }
    if (!temporal) continue;
    if (delta / state_.delta1[i] < config_.beta) {
      if (++state_.below_count[i] >= config_.patience) state_.converged[i] = 1;
    } else {
      state_.below_count[i] = 0;
    }
  }
}

std::vector<uint8_t> Policy::MatMask(Decision* decision) const {
  std::vector<uint8_t> mask(modules_.size(), 1);
  for (const auto& [group, members] : groups_) {
    double lo = std::numeric_limits<double>::infinity();
    double hi = -lo;
    for (int i : members) {
      if (!state_.has_smoothed[i]) continue;
      lo = std::min(lo, state_.smoothed[i]);
      hi = std::max(hi, state_.smoothed[i]);
    }
    const bool any = lo <= hi;
    const double threshold = any ? lo + (hi - lo) * config_.alpha : kNaN;
    decision->threshold[group] = threshold;
    for (int i : members) {
      const bool above = !state_.has_smoothed[i] || lo == hi || state_.smoothed[i] > threshold;
      mask[i] = above && !state_.converged[i] ? 1 : 0;
      decision->rule[i] = state_.converged[i]       ? "temporal"
                          : !state_.has_smoothed[i] ? "unmeasured"
                                                    : "threshold";
    }
  }
  ApplyGuard(&mask, &decision->rule);
  return mask;
}

std::vector<uint8_t> Policy::InverseMask(const std::vector<uint8_t>& mat,
                                         Decision* decision) const {
  std::vector<uint8_t> mask(modules_.size(), 0);
  for (const auto& [group, members] : groups_) {
    int count = 0;
    for (int i : members) count += mat[i];
    // Lowest s first (no s yet counts as highest), then lower index.
    std::vector<int> order = members;
    auto key = [this](int i) {
      const double s =
          state_.has_smoothed[i] ? state_.smoothed[i] : std::numeric_limits<double>::infinity();
      return std::make_pair(s, i);
    };
    std::sort(order.begin(), order.end(), [&key](int a, int b) { return key(a) < key(b); });
    for (int k = 0; k < count; ++k) mask[order[k]] = 1;
    for (int i : members) decision->rule[i] = "inverse";
  }
  return mask;
}

std::vector<uint8_t> Policy::FrozenRandomMask(const std::vector<uint8_t>& mat,
                                              Decision* decision) {
  if (!state_.permutation_chosen) {
    for (const auto& [group, members] : groups_) {
      const int size = static_cast<int>(members.size());
      std::vector<int> image = members;
      for (int k = 0; k + 1 < size; ++k) {  // Fisher–Yates, as RandomSubset draws
        const uint64_t j = k + UniformBelow(state_.rng, static_cast<uint64_t>(size - k));
        std::swap(image[k], image[j]);
      }
      for (int k = 0; k < size; ++k) state_.permutation[members[k]] = image[k];
    }
    state_.permutation_chosen = true;
  }
  std::vector<uint8_t> mask(modules_.size(), 0);
  for (size_t i = 0; i < modules_.size(); ++i) {
    mask[state_.permutation[i]] = mat[i];
    decision->rule[i] = "frozen-random";
  }
  return mask;
}

std::vector<uint8_t> Policy::RandomSubset(double fraction) {
  std::vector<uint8_t> mask(modules_.size(), 0);
  for (const auto& [group, members] : groups_) {
    const int size = static_cast<int>(members.size());
    const int count = std::max(GuardCount(size), RoundedCount(fraction, size));
    std::vector<int> order = members;
    for (int k = 0; k < count; ++k) {  // partial Fisher–Yates: order[0..count) is the subset
      const uint64_t j = k + UniformBelow(state_.rng, static_cast<uint64_t>(size - k));
      std::swap(order[k], order[j]);
      mask[order[k]] = 1;
    }
  }
  return mask;
}

absl::Status Policy::SetReplayedSchedule(std::vector<ScheduleEntry> schedule) {
  if (config_.kind != PolicyKind::kRand && config_.kind != PolicyKind::kFrozenRandom &&
      config_.kind != PolicyKind::kInverse) {
    return absl::InvalidArgumentError(
        "a replayed MAT schedule needs policy.kind rand, frozen-random or inverse, not " +
        PolicyKindName(config_.kind));
  }
  MAT_RETURN_IF_ERROR(CheckReplayedScheduleSteps(schedule, config_.interval_steps));
  for (size_t i = 0; i < schedule.size(); ++i) {
    if (i > 0 && schedule[i].step <= schedule[i - 1].step) {
      return absl::InvalidArgumentError(absl::StrCat("schedule steps must ascend: ",
                                                     schedule[i - 1].step, " then ",
                                                     schedule[i].step));
    }
    for (const auto& [group, count] : schedule[i].active) {
      if (count < 0) {
        return absl::InvalidArgumentError(absl::StrCat("schedule at step ", schedule[i].step,
                                                       ": group ", group, " has count ", count));
      }
      if (groups_.count(group) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("schedule at step ", schedule[i].step, ": group ", group,
                         " is not a group of this model's modules"));
      }
    }
    if (config_.kind == PolicyKind::kFrozenRandom) {
      // Its masks are replayed module by module: every module of this model, in its group.
      for (const ModuleInfo& m : modules_) {
        auto it = schedule[i].mask.find(m.name);
        if (it == schedule[i].mask.end() || it->second.first != m.group) {
          return absl::InvalidArgumentError(absl::StrCat(
              "schedule at step ", schedule[i].step, ": the replayed run's decision has no module ",
              m.name, " in group ", m.group,
              " (frozen-random replays the MAT run's mask module by module)"));
        }
      }
    }
    if (schedule[i].size.empty()) continue;
    // The replayed run's groups and sizes must be this model's, group for group.
    for (const auto& [group, members] : groups_) {
      auto it = schedule[i].size.find(group);
      const int mine = static_cast<int>(members.size());
      if (it == schedule[i].size.end() || it->second != mine) {
        return absl::InvalidArgumentError(absl::StrCat(
            "schedule at step ", schedule[i].step, ": group ", group, " has ", mine,
            " modules in this model, ",
            it == schedule[i].size.end() ? 0 : it->second, " in the replayed run"));
      }
    }
    for (const auto& [group, count] : schedule[i].size) {
      if (groups_.count(group) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("schedule at step ", schedule[i].step, ": the replayed run has group ",
                         group, " (", count, " modules), this model does not"));
      }
    }
  }
  replayed_ = std::move(schedule);
  return absl::OkStatus();
}

const Policy::ScheduleEntry* Policy::ReplayedAt(int64_t step) const {
  const ScheduleEntry* entry = nullptr;
  for (const ScheduleEntry& e : replayed_) {
    if (e.step > step) break;
    entry = &e;
  }
  return entry;
}

std::vector<uint8_t> Policy::ReplayedMatMask(int64_t step, std::vector<uint8_t> own) const {
  const ScheduleEntry* entry = ReplayedAt(step);
  if (entry == nullptr) return own;
  if (config_.kind == PolicyKind::kFrozenRandom) {  // every module is named (SetReplayedSchedule)
    for (size_t i = 0; i < modules_.size(); ++i) {
      own[i] = entry->mask.at(modules_[i].name).second ? 1 : 0;
    }
    return own;
  }
  for (const auto& [group, members] : groups_) {  // kInverse: the counts only
    auto it = entry->active.find(group);
    if (it == entry->active.end()) continue;
    const int count = std::min(it->second, static_cast<int>(members.size()));
    for (int k = 0; k < static_cast<int>(members.size()); ++k) own[members[k]] = k < count ? 1 : 0;
  }
  return own;
}

std::vector<uint8_t> Policy::RandomSubsetAt(int64_t step) {
  const ScheduleEntry* entry = ReplayedAt(step);
  std::vector<uint8_t> mask(modules_.size(), 0);
  for (const auto& [group, members] : groups_) {
    const int size = static_cast<int>(members.size());
    int wanted = RoundedCount(config_.rand_fraction, size);
    if (entry != nullptr) {
      auto it = entry->active.find(group);
      if (it != entry->active.end()) wanted = std::min(it->second, size);
    }
    const int count = std::max(GuardCount(size), wanted);
    std::vector<int> order = members;
    for (int k = 0; k < count; ++k) {  // as RandomSubset
      const uint64_t j = k + UniformBelow(state_.rng, static_cast<uint64_t>(size - k));
      std::swap(order[k], order[j]);
      mask[order[k]] = 1;
    }
  }
  return mask;
}

void Policy::ApplyGuard(std::vector<uint8_t>* mask, std::vector<std::string>* rule) const {
  for (const auto& [group, members] : groups_) {
    const int need = GuardCount(static_cast<int>(members.size()));
    std::vector<int> inactive;
    for (int i : members) {
      if (!(*mask)[i]) inactive.push_back(i);
    }
    int active = static_cast<int>(members.size() - inactive.size());
    if (active >= need) continue;
    // Non-converged first, then higher s (no s yet counts as highest), then lower index.
    auto key = [this](int i) {
      const double s =
          state_.has_smoothed[i] ? state_.smoothed[i] : std::numeric_limits<double>::infinity();
      return std::make_tuple(state_.converged[i], -s, i);
    };
    std::sort(inactive.begin(), inactive.end(), [&key](int a, int b) { return key(a) < key(b); });
    for (size_t k = 0; k < inactive.size() && active < need; ++k, ++active) {
      (*mask)[inactive[k]] = 1;
      if (rule != nullptr) (*rule)[inactive[k]] = "guard";
    }
  }
}

int Policy::GuardCount(int group_size) const {
  if (config_.min_active_fraction <= 0.0 || group_size == 0) return 0;
  // The 1e-9 keeps products such as 0.07·100 = 7.000000000000001 from rounding up to 8.
  const double exact = config_.min_active_fraction * group_size;
  const int count = static_cast<int>(std::ceil(exact - 1e-9));
  return std::clamp(count, 1, group_size);
}

StepMask Policy::MaskAt(int64_t step) const {
  if (step < config_.warmup_steps) {
    const size_t n = modules_.size();
    return StepMask{std::vector<uint8_t>(n, 1), std::vector<double>(n, 1.0)};
  }
  // The same masks the service sends (Schedule), read at `step`.
  return MaskFromSchedule(Schedule(), step);
}

MaskSchedule Policy::Schedule() const {
  const size_t n = modules_.size();
  MaskSchedule out{std::vector<uint8_t>(n, 1), std::vector<uint8_t>(n, 0), 0};
  switch (config_.kind) {
    case PolicyKind::kFull:
      break;
    case PolicyKind::kMat:
    case PolicyKind::kRand:
    case PolicyKind::kFrozenRandom:
    case PolicyKind::kInverse:
      out.every_step = state_.mask;
      break;
    case PolicyKind::kMultirate:
      if (!state_.split_chosen) break;
      for (size_t i = 0; i < n; ++i) {
        out.every_step[i] = state_.fast[i] ? 1 : 0;
        out.slow[i] = state_.fast[i] ? 0 : 1;
      }
      out.slow_every = config_.multirate_k;
      break;
  }
  return out;
}

StepMask MaskFromSchedule(const MaskSchedule& schedule, int64_t step) {
  const size_t n = schedule.every_step.size();
  StepMask out{schedule.every_step, std::vector<double>(n, 1.0)};
  if (schedule.slow_every > 0 && step % schedule.slow_every == 0) {
    for (size_t i = 0; i < n && i < schedule.slow.size(); ++i) {
      if (!schedule.slow[i]) continue;
      out.active[i] = 1;
      out.lr_scale[i] = double(schedule.slow_every);
    }
  }
  return out;
}

absl::Status CheckReplayedScheduleSteps(const std::vector<Policy::ScheduleEntry>& schedule,
                                        int64_t interval_steps) {
  MAT_CHECK(interval_steps >= 1) << "interval_steps " << interval_steps;
  for (const Policy::ScheduleEntry& entry : schedule) {
    if (entry.step % interval_steps != 0) {
      // The replaying run holds each entry from its own decision at or after the entry's step:
      // an entry between two of its decisions would not be matched until the next one.
      return absl::InvalidArgumentError(absl::StrCat(
          "the replayed run decided at step ", entry.step, ", not a multiple of this run's "
          "policy.probe_every (", interval_steps, "): replay a run whose probe_every is a multiple "
          "of this one's, or give this run a probe_every that divides it"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Policy::ScheduleEntry> ScheduleEntryFromDecisionJson(const nlohmann::json& d) {
  if (!d.is_object()) return absl::InvalidArgumentError("not a JSON object");
  if (!d.contains("step") || !d["step"].is_number_integer()) {
    return absl::InvalidArgumentError("no integer \"step\"");
  }
  if (!d.contains("modules") || !d["modules"].is_array()) {
    return absl::InvalidArgumentError("no \"modules\" array");
  }
  Policy::ScheduleEntry e;
  e.step = d["step"].get<int64_t>();
  bool named = true;
  for (const auto& m : d["modules"]) {
    if (!m.is_object() || !m.contains("group") || !m["group"].is_string() ||
        !m.contains("active") || !m["active"].is_boolean()) {
      return absl::InvalidArgumentError(
          "a module without string \"group\" and boolean \"active\"");
    }
    const std::string group = m["group"].get<std::string>();
    const bool active = m["active"].get<bool>();
    int& count = e.active[group];
    if (active) ++count;
    ++e.size[group];
    if (!m.contains("name")) {
      named = false;
      continue;
    }
    if (!m["name"].is_string()) {
      return absl::InvalidArgumentError("a module whose \"name\" is not a string");
    }
    if (!e.mask.emplace(m["name"].get<std::string>(), std::make_pair(group, active)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("module \"", m["name"].get<std::string>(), "\" appears twice"));
    }
  }
  if (!named) e.mask.clear();
  return e;
}

}  // namespace mat::policy
