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
enum class PolicyKind { kFull, kMat, kRand, kMultirate };

// "full" | "mat" | "rand" | "multirate" (exact, lower case). INVALID_ARGUMENT names the value.
absl::StatusOr<PolicyKind> ParsePolicyKind(const std::string& s);
// The inverse of ParsePolicyKind: "full" | "mat" | "rand" | "multirate".
std::string PolicyKindName(PolicyKind k);

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
// result is not validated (call ValidatePolicyConfig).
absl::StatusOr<PolicyConfig> PolicyConfigFromJson(const nlohmann::json& j);

}  // namespace mat::policy
