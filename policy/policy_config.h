// Configuration of the module-selection policy (DESIGN §5): which policy, and its tunables.
//
// Every tunable of mat::policy is defined here once, with its default and its unit. Flags and job
// files only fill a PolicyConfig; ValidatePolicyConfig says what is wrong with one, naming the
// field as `policy.<field>`.
//
// Thread-safety: plain values and pure functions; safe to use from any thread.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mat::policy {

// Which policy decides the masks.
//   kFull       every module trains on every step (the baseline MAT must beat).
//   kMat        the MAT modular (eq. 4–5) + temporal (eq. 6–7) policy on smoothed λ_max.
//   kRand       a uniformly random subset of each group per interval, at a fixed fraction.
//   kMultirate  a fixed fast/slow split; slow modules train every k steps with lr × k.
//   Controls that separate the λ signal from persistence (both run kMat's rules on the same
//   reports, so they train as many modules per group as MAT would, and cost the same probes):
//   kFrozenRandom  MAT's mask carried through a random permutation of each group, drawn once at
//                  the first post-warm-up decision: module π(i) trains exactly while MAT would
//                  train module i, so counts and persistence are MAT's, identities are random.
//   kInverse       per group, as many modules as MAT would train, but the lowest smoothed λ.
enum class PolicyKind { kFull, kMat, kRand, kMultirate, kFrozenRandom, kInverse };

// "full" | "mat" | "rand" | "multirate" | "frozen-random" | "inverse" (exact, lower case).
// INVALID_ARGUMENT names the value.
absl::StatusOr<PolicyKind> ParsePolicyKind(const std::string& s);
// The inverse of ParsePolicyKind.
std::string PolicyKindName(PolicyKind k);
// True for the kinds that run MAT's threshold and temporal rules on λ reports (kMat,
// kFrozenRandom, kInverse): they need spectra.
bool UsesMatRules(PolicyKind k);

// Which change of λ̄ the temporal policy divides by (Δ_t / Δ_1):
//   kAfterWarmup  the module's first Δ at a step >= warmup_steps (this project's first reading:
//                 Δ_1 is taken where the policy starts deciding);
//   kFirstProbe   the module's first Δ of training, between its first two finite reports,
//                 warm-up or not (paper eq. 6–7: Δ_1 at the start of training).
enum class Delta1Reading { kAfterWarmup, kFirstProbe };
// "warmup" | "first-probe". INVALID_ARGUMENT names the value.
absl::StatusOr<Delta1Reading> ParseDelta1Reading(const std::string& s);
// The inverse of ParseDelta1Reading.
std::string Delta1ReadingName(Delta1Reading r);

struct PolicyConfig {
  PolicyKind kind = PolicyKind::kMat;
  // Training steps, counted from 0, during which every module trains: decisions made at a step
  // < warmup_steps are warm-up decisions (all active); λ history still accumulates.
  int64_t warmup_steps = 100;
  // Steps between decisions (the probe interval): Observe is called when step % interval == 0.
  int64_t interval_steps = 20;
  // Position of the modular threshold between a group's smallest and largest smoothed λ, [0,1].
  double alpha = 0.3;
  // Temporal convergence ratio: Δ_t/Δ_1 < beta for `patience` probes => converged. [0,1];
  // 0 disables the temporal policy.
  double beta = 0.0;
  // EMA factor of the λ smoothing, [0,1): s_t = gamma·s_{t-1} + (1-gamma)·λ_t. 0 = no smoothing.
  double gamma = 0.5;
  // Consecutive post-warm-up probes with Δ_t/Δ_1 < beta before a module is converged, >= 1.
  int patience = 3;
  // Per group, never fewer than ceil(fraction · group size) active modules (at least 1 when the
  // fraction is > 0). [0,1].
  double min_active_fraction = 0.25;
  // Which Δ is Δ_1 (see Delta1Reading).
  Delta1Reading delta1 = Delta1Reading::kAfterWarmup;
  // Floor of Δ_1, in λ units (absolute), > 0: keeps Δ_t/Δ_1 finite when λ̄ did not move.
  double delta_floor = 1e-12;
  // kRand: fraction of each group active per interval, [0,1] (raised to the guard count).
  double rand_fraction = 0.5;
  // kMultirate: slow modules train on steps with step % multirate_k == 0, lr × multirate_k. >= 1.
  int multirate_k = 4;
  // kMultirate: fraction of each group that is fast (trains every step), [0,1] (raised to the
  // guard count).
  double multirate_fast_fraction = 0.5;
  // Seed of the std::mt19937_64 behind kRand and kMultirate.
  uint64_t seed = 0;
};

// OK, or INVALID_ARGUMENT naming the first bad field: "policy.alpha must be in [0,1], got 1.5".
absl::Status ValidatePolicyConfig(const PolicyConfig& c);

// Every field, keyed by its name ("kind" as PolicyKindName); for logs and saved state.
nlohmann::json PolicyConfigToJson(const PolicyConfig& c);
// The inverse of PolicyConfigToJson. INVALID_ARGUMENT names a missing or mistyped field; the
// result is not validated (call ValidatePolicyConfig). "delta1" may be absent (states saved before
// it existed): kAfterWarmup, the reading they ran.
absl::StatusOr<PolicyConfig> PolicyConfigFromJson(const nlohmann::json& j);

}  // namespace mat::policy
