// MaskEngine: the coordinator's mask engine for one running job (one of the managers behind the
// Coordinator facade, coordinator.h). It owns the job's mat::policy::Policy, the λ reports of
// probe steps that some ranks reported and others not yet, the rank averaging, the mask versions
// and the latest MaskUpdate, and it stores every decision in the JobStore before any rank can see
// its mask. It knows nothing of sessions: the facade sends the MaskUpdate it returns.
//
// Life of a probe step: CheckReport (shape), Add (per rank; complete when every rank reported),
// Decide (mean per module over ranks in rank order, then Policy::Observe, the schedule, the
// MaskUpdate with mask_version + 1, RecordDecision, the decision metrics).
// A restarted job (or one kept across a coordinator restart) continues its policy from the store:
// Continue() marks it, and the first report's step restores the decision at or before it
// (RestoreIfNeeded); a rank reporting that decided step again gets its stored MaskUpdate (Repeat).
//
// Thread-safety: not thread-safe; the coordinator loop only. Not copyable.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_store.h"
#include "mat/v1/service.pb.h"
#include "policy/policy.h"

namespace mat::coordinator {

// The wire form of a mask: module i is bit (i % 8) of byte (i / 8), least significant bit first;
// ceil(size / 8) bytes; a module is on when its entry is non-zero.
std::string PackModuleBits(const std::vector<uint8_t>& on);
// Its inverse for `n` modules (a missing byte reads as off).
std::vector<uint8_t> UnpackModuleBits(const std::string& bytes, size_t n);

// A decision's per-module series of `job_id`: mat_module_lambda_max (when `lambda` has one per
// module), mat_module_active (`active`, one per module) and mat_policy_threshold for every
// module group (NaN for a group `threshold` lacks: warm-up). MaskEngine at each decision, and
// JobManager restoring a finished job's series after a restart.
void SetModuleSeries(CoordinatorMetrics& metrics, const std::string& job_id,
                     const std::vector<policy::ModuleInfo>& modules,
                     const std::vector<double>& lambda, const std::vector<uint8_t>& active,
                     const std::map<std::string, double>& threshold);

// What Decide made of a complete probe step.
struct MaskDecision {
  v1::CoordinatorMessage message;  // the MaskUpdate every rank gets
  int64_t active_modules = 0;      // modules on at every step under it
  std::vector<double> mean;        // rank-mean λ per module
  policy::Decision decision;
  policy::MaskSchedule schedule;
};

class MaskEngine {
 public:
  // `metrics` (nullptr = none) is borrowed and must outlive the engine. world_size >= 1.
  MaskEngine(std::string job_id, policy::PolicyConfig config, int world_size,
             CoordinatorMetrics* metrics);
  MaskEngine(const MaskEngine&) = delete;
  MaskEngine& operator=(const MaskEngine&) = delete;

  // A restarted or kept job: the latest mask version sent before, and the policy is restored
  // from the store at the first report (RestoreIfNeeded).
  void Continue(int64_t mask_version);

  // A policy for `modules` with the job's config (not yet adopted): Policy::Create's error,
  // prefixed "ModuleList of job J: ".
  absl::StatusOr<std::unique_ptr<policy::Policy>> NewPolicy(
      const std::vector<policy::ModuleInfo>& modules) const;
  // Adopts the policy NewPolicy made for `modules`. REQUIRES: policy was made for modules.
  void Adopt(std::vector<policy::ModuleInfo> modules, std::unique_ptr<policy::Policy> policy);
  bool has_policy() const { return policy_ != nullptr; }
  const policy::Policy* policy() const { return policy_.get(); }
  const std::vector<policy::ModuleInfo>& modules() const { return modules_; }
  const policy::PolicyConfig& config() const { return config_; }

  // INVALID_ARGUMENT (prefixed `what`) unless the report fits the job: step >= 0 and a multiple
  // of policy.probe_every; one λ per module (none for a policy that needs no spectra); trace and
  // effective_rank empty or one per module. Non-finite λ are not checked here.
  // REQUIRES: has_policy().
  absl::Status CheckReport(const std::string& what, const v1::SpectraReport& report) const;
  // After Continue(): restores the policy, last decided step and last mask from the stored
  // decision at or before `step` (once; later calls are no-ops). FAILED_PRECONDITION for a
  // decision stored without the policy state; DATA_LOSS for a stored mask that is not a
  // MaskUpdate; a store error as it is.
  absl::Status RestoreIfNeeded(JobStore& store, int64_t step);
  // The stored MaskUpdate to send again when a rank that acknowledged `acked_version` reports
  // the last decided step again (after a restart); null otherwise.
  const v1::CoordinatorMessage* Repeat(int64_t step, int64_t acked_version) const;
  // Records `rank`'s λ of `step`. ABORTED (prefixed `what`) for a step already decided,
  // INVALID_ARGUMENT for a second report of the rank. Returns the reports of every rank (index =
  // rank) once the last rank reported, else nullopt.
  absl::StatusOr<std::optional<std::vector<std::vector<double>>>> Add(
      const std::string& what, int rank, int64_t step, std::vector<double> lambda);
  // Averages, observes, builds and stores the decision (RecordDecision). Policy errors as they
  // are. A store error comes back as its code with "cannot store
  // the decision of step N: …" and *store_failed = true: the job cannot go on.
  absl::StatusOr<MaskDecision> Decide(JobStore& store, int64_t step,
                                      const std::vector<std::vector<double>>& lambda,
                                      bool* store_failed);

  // Sets the decision's metrics (λ, active and threshold series, the active count); called after
  // the masks are sent, off the mask's critical path. No-op without metrics.
  void SetDecisionMetrics(const MaskDecision& decided) const;

  int64_t mask_version() const { return mask_version_; }
  int64_t last_decided_step() const { return last_decided_step_; }

 private:
  // A probe step some ranks reported and others not yet.
  struct PendingProbe {
    std::vector<std::optional<std::vector<double>>> lambda;  // per rank; unset = not yet
    int reported = 0;
  };
  std::string job_id_;
  policy::PolicyConfig config_;
  int world_size_;
  CoordinatorMetrics* metrics_;
  std::vector<policy::ModuleInfo> modules_;  // rank 0's ModuleList; empty before
  std::unique_ptr<policy::Policy> policy_;   // made with the modules; null before
  std::map<int64_t, PendingProbe> pending_;  // probe step -> reports so far
  int64_t last_decided_step_ = -1;
  int64_t mask_version_ = 0;  // latest MaskUpdate sent; 0 = none
  bool restore_ = false;      // Continue() called, RestoreIfNeeded not yet
  // The latest decision's MaskUpdate message, to answer a rank that reports that step again.
  std::optional<v1::CoordinatorMessage> last_mask_;
};

}  // namespace mat::coordinator
