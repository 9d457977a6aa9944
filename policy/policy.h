// The module-selection policy (DESIGN §5): from per-module λ_max reports to training masks.
//
// Inputs: one λ_max per module at every probe step (step % interval_steps == 0, from step 0).
// Output: a Decision per report, and the StepMask the trainer applies on each training step.
//
//   smoothing  s_t = γ·s_{t-1} + (1-γ)·λ_t per module; the first finite λ initialises s.
//   modular    (kMat, paper eq. 4–5) per group, over all layers:
//              λ_α = min(s) + (max(s) - min(s))·α;  active ⇔ s > λ_α (strictly; all active when
//              every s of the group is equal). Modules without any finite report yet are active
//              and do not enter min/max.
//   temporal   (kMat with β > 0, paper eq. 6–7) Δ_t = |s_t - s_{t-1}|; Δ_1 = the module's first
//              Δ at a step >= warmup_steps (delta1 kAfterWarmup), or its first Δ of training,
//              warm-up included (kFirstProbe), floored at delta_floor. Every post-warm-up Δ_t
//              (Δ_1 included) with Δ_t/Δ_1 < β increments a counter, any other resets it; at
//              `patience` the module is converged: inactive for good (but for the guard).
//              A rejected report leaves the counter as it was.
//   guard      per group at least ceil(min_active_fraction·size) active modules (>= 1 when the
//              fraction is > 0); when short, the inactive modules with the highest s are
//              re-activated, non-converged before converged, lower module index on ties.
//   warm-up    every decision at a step < warmup_steps, and MaskAt(step < warmup_steps), is all
//              active, for every kind.
//   kFull      all active always.
//   kRand      each post-warm-up decision picks, per group, max(guard, round(rand_fraction·size))
//              (or the count SetReplayedSchedule replays from another run) modules uniformly at random (partial Fisher–Yates on a std::mt19937_64 seeded with
//              `seed`, bounded by rejection sampling on its raw output: the same on every
//              platform).
//   kMultirate the first post-warm-up decision picks, per group, max(guard,
//              round(multirate_fast_fraction·size)) fast modules the same way; the split is then
//              fixed. Fast modules train on every step; slow ones on steps with step % k == 0,
//              with lr_scale = k.
//   kFrozenRandom  a MAT mask carried through a per-group random permutation π drawn (as the rand
//              draws) at the first post-warm-up decision and kept for the run:
//              mask[π(i)] = mat_mask[i]. With a replayed schedule (SetReplayedSchedule) mat_mask is
//              the replayed MAT run's mask at that step, so the control trains exactly its counts,
//              each module for as long as the MAT run kept the module it stands for; without one,
//              kMat's mask (threshold, temporal, guard) on this run's own reports, whose counts
//              drift from any other run's.
//   kInverse   per group, as many active modules as the MAT mask (replayed or own, as for
//              kFrozenRandom) has, filled with the lowest s (lower module index on ties).
// Every decision says, per module, which rule set its bit (Decision::rule).
// Groups are visited in lexicographic order of their names, modules in index order, so the
// random draws depend only on the config, the modules and the calls.
//
// NaN and ±Inf reports are rejected per module: listed in Decision::rejected, never used (the
// module keeps its previous smoothed value); the rest of the decision is made as usual.
//
// Deterministic: the same config, modules and Observe calls give the same decisions, masks and
// saved state, bit for bit. SaveState/LoadState carry everything (EMA, temporal counters, RNG,
// the multirate split, the latest mask), so a restored policy continues bit-identically.
//
// Thread-safety: not thread-safe; the owner (the coordinator's job loop) serialises all calls.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "policy/policy_config.h"

namespace mat::policy {

// One switchable module (DESIGN §3). A policy's modules are indexed 0..n-1 in the order given to
// Policy::Create; every per-module vector below uses that order.
struct ModuleInfo {
  std::string group;  // "heads" | "ffn" | "experts" | "filters"; thresholds are per group
  int layer = 0;
  int index = 0;     // index within its layer and group
  std::string name;  // unique, e.g. "layer0.head3"
};

// What the trainer applies on one training step.
struct StepMask {
  std::vector<uint8_t> active;   // one per module, 1 = weights get gradients and updates
  std::vector<double> lr_scale;  // one per module: 1.0, except multirate_k for a slow
                                 // multirate module on the steps it trains
};

// The masks of every step from the latest decision until the next one, in the form the service
// sends them (mat.v1.MaskUpdate): `every_step` modules train on every step; `slow` modules (only
// multirate) train on steps with step % slow_every == 0, with lr × slow_every.
struct MaskSchedule {
  std::vector<uint8_t> every_step;  // one per module
  std::vector<uint8_t> slow;        // one per module; all 0 (or empty) when slow_every == 0
  int64_t slow_every = 0;           // k, steps; 0 = no slow modules
};

// The StepMask `schedule` gives at `step`.
StepMask MaskFromSchedule(const MaskSchedule& schedule, int64_t step);

// One per Observe call; logged to decisions.jsonl.
struct Decision {
  int64_t step = 0;
  std::vector<double> lambda_raw;       // as reported (NaN/Inf kept here for the log); may be
                                        // empty when the policy does not need spectra
  std::vector<double> lambda_smoothed;  // EMA after this observation (NaN: no finite report yet)
  std::map<std::string, double> threshold;  // per group λ_α (NaN when not computed: warm-up,
                                            // kinds without MAT's rule, no smoothed value yet)
  std::vector<uint8_t> mask;          // applies to steps after `step` until the next decision;
                                      // kMultirate: the fast modules (see Policy::MaskAt)
  std::vector<uint8_t> converged;     // temporal policy verdict so far on this run's own λ
                                      // (kMat; kFrozenRandom and kInverse too, where they apply
                                      // MAT's rule to their own λ; else 0). With a replayed
                                      // schedule those two take the mask from the schedule, so
                                      // their `converged` and `threshold` are logged but decide
                                      // nothing.
  std::vector<std::string> rejected;  // e.g. "layer0.head3: lambda is nan"
  std::string phase;                  // "warmup" | "policy"
  // Per module, the rule that set its bit: "warmup" (a warm-up decision), "full", "threshold"
  // (kMat: s above λ_α or not), "unmeasured" (kMat: no finite report yet, active), "temporal"
  // (converged, inactive), "guard" (re-activated by min_active_fraction), "random" (kRand),
  // "multirate" (the fixed split), "frozen-random", "inverse".
  std::vector<std::string> rule;

  // One JSON object with the inputs and the policy parameters, for a replayable audit log:
  //   {"step", "phase", "policy": PolicyConfigToJson(config), "threshold": {group: x},
  //    "num_active", "rejected": [...],
  //    "rules": {rule: count},
  //    "modules": [{"name", "group", "layer", "index", "lambda", "lambda_smoothed", "active",
  //                 "converged", "rule"}, ...]}
  // Non-finite numbers are written as the strings "nan", "inf" and "-inf"; "lambda" is null when
  // lambda_raw is empty. REQUIRES: `modules` is the list this decision was made for.
  nlohmann::json ToJson(const std::vector<ModuleInfo>& modules, const PolicyConfig& config) const;
};

// The MAT modular + temporal policy and the baselines behind one interface (see the file
// comment). Deterministic. Not thread-safe. Not copyable.
class Policy {
 public:
  // INVALID_ARGUMENT for a config that fails ValidatePolicyConfig, a module with an empty name or
  // group, a negative layer or index, or a duplicate name or (group, layer, index).
  static absl::StatusOr<std::unique_ptr<Policy>> Create(const PolicyConfig& config,
                                                        std::vector<ModuleInfo> modules);

  Policy(const Policy&) = delete;
  Policy& operator=(const Policy&) = delete;

  // True for the kinds that use MAT's rules (UsesMatRules): the others accept an empty λ vector.
  bool NeedsSpectra() const;

  // Records the λ_max reports of the probe at `step` and decides the mask.
  // REQUIRES (else INVALID_ARGUMENT): step >= 0 and step % interval_steps == 0;
  //   lambda.size() == modules().size(), or lambda is empty when !NeedsSpectra().
  // FAILED_PRECONDITION when `step` is not after the previously observed step.
  // NaN/Inf entries are not errors: see Decision::rejected. After an error the policy is
  // unchanged.
  absl::StatusOr<Decision> Observe(int64_t step, const std::vector<double>& lambda);

  // The mask for training step `step`: all active (lr_scale 1) for step < warmup_steps, for
  // kFull, and before the first decision; otherwise the latest decision's mask (kMat, kRand), or
  // for kMultirate the fast modules plus, when step % multirate_k == 0, the slow ones with
  // lr_scale = multirate_k.
  StepMask MaskAt(int64_t step) const;

  // The latest decision as a MaskSchedule: MaskFromSchedule(Schedule(), t) == MaskAt(t) for every
  // t from the latest Observe'd step up to (not including) the next one (warm-up decisions are
  // all active, and so is every step after them until a post-warm-up decision).
  MaskSchedule Schedule() const;

  const std::vector<ModuleInfo>& modules() const { return modules_; }
  const PolicyConfig& config() const { return config_; }

  // A MAT run's decisions replayed by a control, so that it trains that run's active counts:
  //   kRand (the paper's "-Rand" baseline): each post-warm-up decision at step t draws, per
  //     group, max(guard, count) modules, where count is the group's active count in the entry
  //     with the largest step <= t (rand_fraction before the first entry and for groups an entry
  //     does not name);
  //   kFrozenRandom: that entry's mask (by module name) through the permutation;
  //   kInverse: that entry's per-group counts, filled with the lowest s.
  // kFrozenRandom and kInverse use their own MAT mask before the first entry. Entries: ascending
  // steps. An input, like the reports, not config: it is not in SaveState, the owner sets it
  // again on resume.
  // INVALID_ARGUMENT for another kind, an entry's step that is not a multiple of interval_steps
  // (the replayed run decided between this one's decisions, whose counts would then lag its
  // counts), unsorted steps, a negative count, a group this policy's
  // modules do not have, (for an entry with `size`) groups or group sizes other than this
  // policy's: the replayed run trained another model; and for kFrozenRandom an entry that does
  // not name every module of this policy with its group (`mask`). After an error the schedule is
  // unchanged.
  struct ScheduleEntry {
    int64_t step = 0;
    std::map<std::string, int> active;  // group -> active modules
    std::map<std::string, int> size;    // group -> modules in the replayed run; empty: unchecked
    // module name -> (group, active); empty when the decision named no modules
    std::map<std::string, std::pair<std::string, bool>> mask;
  };
  absl::Status SetReplayedSchedule(std::vector<ScheduleEntry> schedule);

  // JSON text with everything needed to continue bit-identically (format "mat.policy.state/1"),
  // including the config and the module names it was made for.
  std::string SaveState() const;
  // Replaces this policy's state with a SaveState() text. DATA_LOSS when the text is not JSON or
  // is not a well-formed state (missing field, wrong size or type, bad RNG state);
  // INVALID_ARGUMENT when it was saved by a policy with another config or other modules (the
  // message names the first difference). After an error the policy is unchanged.
  absl::Status LoadState(const std::string& state);

 private:
  // Everything that changes after Create; SaveState/LoadState move exactly this.
  struct State {
    int64_t last_step = -1;        // step of the latest Observe; -1 before the first
    std::vector<double> smoothed;  // s per module, valid where has_smoothed
    std::vector<uint8_t> has_smoothed;
    std::vector<double> delta1;  // Δ_1 per module (floored), valid where has_delta1
    std::vector<uint8_t> has_delta1;
    std::vector<int> below_count;  // consecutive post-warm-up Δ_t/Δ_1 < β
    std::vector<uint8_t> converged;
    std::vector<uint8_t> mask;  // latest decision's mask; all 1 before the first
    bool split_chosen = false;  // kMultirate
    std::vector<uint8_t> fast;  // kMultirate: 1 = fast, valid when split_chosen
    // kFrozenRandom: module i's bit goes to module permutation[i] (same group); identity until
    // permutation_chosen.
    bool permutation_chosen = false;
    std::vector<int> permutation;
    std::mt19937_64 rng;
  };

  Policy(const PolicyConfig& config, std::vector<ModuleInfo> modules);

  // Updates s (and the temporal counters) from `lambda`; fills decision->rejected.
  void Smooth(int64_t step, const std::vector<double>& lambda, Decision* decision);
  // The kMat mask from the current s and verdicts; fills decision->threshold and ->rule.
  std::vector<uint8_t> MatMask(Decision* decision) const;
  // kInverse: per group, MatMask's count filled with the lowest s; sets the rules to "inverse".
  std::vector<uint8_t> InverseMask(const std::vector<uint8_t>& mat, Decision* decision) const;
  // kFrozenRandom: `mat` through the permutation (drawn on first use); sets the rules.
  std::vector<uint8_t> FrozenRandomMask(const std::vector<uint8_t>& mat, Decision* decision);
  // Per group, max(guard, round(fraction·size)) members drawn uniformly from state_.rng.
  std::vector<uint8_t> RandomSubset(double fraction);
  // The same with each group's count from the replayed schedule at `step`.
  std::vector<uint8_t> RandomSubsetAt(int64_t step);
  // The replayed schedule's entry with the largest step <= `step`; nullptr before the first.
  const ScheduleEntry* ReplayedAt(int64_t step) const;
  // kFrozenRandom, kInverse: the replayed MAT mask at `step` (kFrozenRandom: by module name;
  // kInverse: each group's count, as its lowest-index members), or `own` without an entry.
  std::vector<uint8_t> ReplayedMatMask(int64_t step, std::vector<uint8_t> own) const;
  // Raises the active count of every group to the guard, in the order the file comment states;
  // marks the re-activated modules' rule "guard" when `rule` is given.
  void ApplyGuard(std::vector<uint8_t>* mask, std::vector<std::string>* rule = nullptr) const;
  // ceil(min_active_fraction·size), >= 1 when the fraction is > 0, <= size.
  int GuardCount(int group_size) const;

  const PolicyConfig config_;
  const std::vector<ModuleInfo> modules_;
  std::map<std::string, std::vector<int>> groups_;  // group name -> module indices, ascending
  State state_;
  std::vector<ScheduleEntry> replayed_;  // SetReplayedSchedule; empty: rand_fraction
};

// The per-group active counts and sizes of one logged decision (a Decision::ToJson object: one
// line of decisions.jsonl, one row of the coordinator's decisions table), for
// Policy::SetReplayedSchedule. Reads "step" and "modules": [{"group", "active", "name"}, ...]
// only ("name" optional: without it the entry has no mask).
// INVALID_ARGUMENT saying what is missing: "not a JSON object", "no integer \"step\"", "no
// \"modules\" array", "a module without string \"group\" and boolean \"active\"".
absl::StatusOr<Policy::ScheduleEntry> ScheduleEntryFromDecisionJson(const nlohmann::json& decision);

// OK when every entry of `schedule` is at a decision step of a run that decides every
// `interval_steps` steps (its policy.probe_every): the check SetReplayedSchedule makes, for a
// caller that knows the replaying run's interval before its policy exists (the coordinator, at
// submit). Else INVALID_ARGUMENT naming the first such entry's step and the interval.
// REQUIRES: interval_steps >= 1.
absl::Status CheckReplayedScheduleSteps(const std::vector<Policy::ScheduleEntry>& schedule,
                                        int64_t interval_steps);

}  // namespace mat::policy
