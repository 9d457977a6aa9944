// MaskEngine (mask_engine.h): one running job's policy, rank averaging and mask versions.
#include "coordinator/mask_engine.h"

#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace {

int64_t CountOn(const std::vector<uint8_t>& bits) {
  int64_t n = 0;
  for (uint8_t b : bits) n += b != 0 ? 1 : 0;
  return n;
}

}  // namespace

std::string PackModuleBits(const std::vector<uint8_t>& on) {
  std::string bytes((on.size() + 7) / 8, '\0');
  for (size_t i = 0; i < on.size(); ++i) {
    if (on[i] != 0) bytes[i / 8] = static_cast<char>(bytes[i / 8] | (1u << (i % 8)));
  }
  return bytes;
}

std::vector<uint8_t> UnpackModuleBits(const std::string& bytes, size_t n) {
  std::vector<uint8_t> on(n, 0);
  for (size_t i = 0; i < n && i / 8 < bytes.size(); ++i) {
    on[i] = (static_cast<unsigned char>(bytes[i / 8]) >> (i % 8)) & 1u;
  }
  return on;
}

void SetModuleSeries(CoordinatorMetrics& metrics, const std::string& job_id,
                     const std::vector<policy::ModuleInfo>& modules,
                     const std::vector<double>& lambda, const std::vector<uint8_t>& active,
                     const std::map<std::string, double>& threshold) {
  std::set<std::string> groups;
  for (size_t i = 0; i < modules.size(); ++i) {
    const metrics::LabelValues labels = {job_id, modules[i].group,
                                         std::to_string(modules[i].layer), modules[i].name};
    if (lambda.size() == modules.size()) metrics.module_lambda_max.Set(labels, lambda[i]);
    metrics.module_active.Set(labels, i < active.size() && active[i] != 0 ? 1.0 : 0.0);
    groups.insert(modules[i].group);
  }
  for (const std::string& group : groups) {
    auto t = threshold.find(group);
    metrics.policy_threshold.Set(
        {job_id, group},
        t != threshold.end() ? t->second : std::numeric_limits<double>::quiet_NaN());
  }
}

MaskEngine::MaskEngine(std::string job_id, policy::PolicyConfig config, int world_size,
                       CoordinatorMetrics* metrics)
    : job_id_(std::move(job_id)), config_(std::move(config)), world_size_(world_size),
      metrics_(metrics) {
  MAT_CHECK(world_size_ >= 1) << "a job has at least one rank, got " << world_size_;
}

void MaskEngine::Continue(int64_t mask_version) {
  mask_version_ = mask_version;
  restore_ = true;
}

absl::StatusOr<std::unique_ptr<policy::Policy>> MaskEngine::NewPolicy(
    const std::vector<policy::ModuleInfo>& modules) const {
  absl::StatusOr<std::unique_ptr<policy::Policy>> created = policy::Policy::Create(config_, modules);
  if (!created.ok()) {
    return absl::Status(created.status().code(), absl::StrCat("ModuleList of job ", job_id_, ": ",
                                                              created.status().message()));
  }
  return created;
}

void MaskEngine::Adopt(std::vector<policy::ModuleInfo> modules,
                       std::unique_ptr<policy::Policy> policy) {
  MAT_CHECK(policy != nullptr) << "Adopt needs a policy";
  modules_ = std::move(modules);
  policy_ = std::move(policy);
}

absl::Status MaskEngine::CheckReport(const std::string& what,
                                     const v1::SpectraReport& report) const {
  MAT_CHECK(policy_ != nullptr) << "CheckReport before the modules are known";
  const int64_t step = report.step();
  const int64_t probe_every = policy_->config().interval_steps;
  if (step < 0 || step % probe_every != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": step must be >= 0 and a multiple of policy.probe_every (", probe_every, ")"));
  }
  const size_t n = modules_.size();
  const size_t got = static_cast<size_t>(report.lambda_max_size());
  if (policy_->NeedsSpectra() && got != n) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": lambda_max has ", got,
                                                   " values, the job has ", n, " modules"));
  }
  if (!policy_->NeedsSpectra() && got != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": policy ", policy::PolicyKindName(config_.kind),
        " needs no spectra: lambda_max must be empty, got ", got, " values"));
  }
  for (const auto& [field, size] : {std::pair<const char*, int>{"trace", report.trace_size()},
                                    {"effective_rank", report.effective_rank_size()}}) {
    if (size != 0 && static_cast<size_t>(size) != n) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": ", field, " has ", size, " values, want none or one per module (", n, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status MaskEngine::RestoreIfNeeded(JobStore& store, int64_t step) {
  if (!restore_) return absl::OkStatus();
  restore_ = false;
  MAT_ASSIGN_OR_RETURN(std::optional<StoredDecision> decision,
                       store.LatestDecisionAtOrBefore(job_id_, step));
  if (!decision.has_value()) return absl::OkStatus();  // nothing decided yet: the new policy
  if (decision->policy_state.empty() || decision->mask_update.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "its decision at step ", decision->step,
        " was stored without the policy state (by a coordinator before schema version 4)"));
  }
  MAT_CHECK(policy_ != nullptr) << "RestoreIfNeeded before the modules are known";
  MAT_RETURN_IF_ERROR(policy_->LoadState(decision->policy_state));
  v1::CoordinatorMessage mask;
  if (!mask.mutable_mask()->ParseFromString(decision->mask_update)) {
    return absl::DataLossError(
        absl::StrCat("the stored mask of step ", decision->step, " is not a MaskUpdate"));
  }
  last_mask_ = std::move(mask);
  last_decided_step_ = decision->step;
  pending_.erase(pending_.begin(), pending_.upper_bound(decision->step));
  spdlog::info("job {}: policy restored from its decision at step {} (first report: step {})",
               job_id_, decision->step, step);
  return absl::OkStatus();
}

const v1::CoordinatorMessage* MaskEngine::Repeat(int64_t step, int64_t acked_version) const {
  if (step != last_decided_step_ || !last_mask_.has_value()) return nullptr;
  if (acked_version >= last_mask_->mask().mask_version()) return nullptr;
  return &*last_mask_;
}

absl::StatusOr<std::optional<std::vector<std::vector<double>>>> MaskEngine::Add(
    const std::string& what, int rank, int64_t step, std::vector<double> lambda) {
  MAT_CHECK(rank >= 0 && rank < world_size_) << "rank " << rank << " of " << world_size_;
  if (step <= last_decided_step_) {
    return absl::AbortedError(
        absl::StrCat(what, ": stale, step ", last_decided_step_, " was already decided"));
  }
  auto pending = pending_.find(step);
  if (pending != pending_.end() && pending->second.lambda[rank].has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": rank ", rank, " already reported this step"));
  }
  // Every check passed: record in place (no copy of the other ranks' reports).
  if (pending == pending_.end()) {
    pending = pending_.emplace(step, PendingProbe{}).first;
    pending->second.lambda.resize(world_size_);
  }
  PendingProbe& probe = pending->second;
  probe.lambda[rank].emplace(std::move(lambda));
  ++probe.reported;
  if (probe.reported < world_size_) return std::nullopt;
  std::vector<std::vector<double>> by_rank;
  by_rank.reserve(world_size_);
  for (std::optional<std::vector<double>>& l : probe.lambda) by_rank.push_back(std::move(*l));
  return by_rank;
}

absl::StatusOr<MaskDecision> MaskEngine::Decide(JobStore& store, int64_t step,
                                                const std::vector<std::vector<double>>& lambda,
                                                bool* store_failed) {
  MAT_CHECK(policy_ != nullptr) << "Decide before the modules are known";
  *store_failed = false;
  // Mean per module: the sum over ranks in rank order, / W (the same bits on every run).
  const size_t n = lambda.empty() ? 0 : lambda[0].size();
  std::vector<double> mean(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    double sum = 0;
    for (const std::vector<double>& rank : lambda) sum += rank[i];
    mean[i] = sum / static_cast<double>(world_size_);
  }
  MAT_ASSIGN_OR_RETURN(policy::Decision decision, policy_->Observe(step, mean));
  policy::MaskSchedule schedule = policy_->Schedule();
  DecisionUpdate update;
  update.step = step;
  update.lambda = mean;
  update.mask_version = mask_version_ + 1;
  update.active_modules = CountOn(schedule.every_step);
  mask_version_ = update.mask_version;
  last_decided_step_ = step;
  pending_.erase(pending_.begin(), pending_.upper_bound(step));

  // Persisted before any rank sees it: a mask a rank trained with is never lost by a crash.
  MaskDecision out;
  out.active_modules = update.active_modules;
  v1::MaskUpdate* mask = out.message.mutable_mask();
  mask->set_job_id(job_id_);
  mask->set_mask_version(mask_version_);
  mask->set_effective_step(step);
  mask->set_bits(PackModuleBits(schedule.every_step));
  mask->set_num_modules(static_cast<int32_t>(modules_.size()));
  if (schedule.slow_every > 0) {
    mask->set_slow_bits(PackModuleBits(schedule.slow));
    mask->set_slow_every_steps(schedule.slow_every);
  }
  update.decision_json = decision.ToJson(policy_->modules(), policy_->config())
                             .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  update.policy_state = policy_->SaveState();
  update.mask_update = mask->SerializeAsString();
  if (absl::Status st = store.RecordDecision(job_id_, update); !st.ok()) {
    // The history cannot be kept: the job stops rather than run on without its record.
    *store_failed = true;
    return absl::Status(st.code(), absl::StrCat("cannot store the decision of step ", step, ": ",
                                                st.message()));
  }
  last_mask_ = out.message;
  out.mean = std::move(mean);
  out.decision = std::move(decision);
  out.schedule = std::move(schedule);
  return out;
}

void MaskEngine::SetDecisionMetrics(const MaskDecision& decided) const {
  if (metrics_ == nullptr) return;
  SetModuleSeries(*metrics_, job_id_, policy_->modules(), decided.mean,
                  decided.schedule.every_step, decided.decision.threshold);
  metrics_->job_active_modules.Set({job_id_}, static_cast<double>(decided.active_modules));
}

}  // namespace mat::coordinator
