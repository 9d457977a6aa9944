// The Coordinator facade's WorkerService side, part 2 (coordinator.h): the job messages of a session.
// Every handler checks first and changes state only once every check passed, so a refused
// message (answered with a Reject by HandleWorkerMessage) leaves everything as it was; the one
// exception is a NaN/Inf λ, which also fails its job.
//
// Sections: helpers · rank checks · ModuleList · SpectraReport and decisions · MaskAck ·
// Progress · RankDone.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "coordinator/coordinator.h"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace {

// "nan" or "inf" for a non-finite value.
const char* NonFiniteName(double v) { return std::isnan(v) ? "nan" : "inf"; }

bool SameModules(const std::vector<policy::ModuleInfo>& a,
                 const std::vector<policy::ModuleInfo>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].group != b[i].group || a[i].layer != b[i].layer ||
        a[i].index != b[i].index) {
      return false;
    }
  }
  return true;
}

// INVALID_ARGUMENT naming `field` of a report unless `value` is finite (and >= 0 when asked).
absl::Status CheckReportNumber(const std::string& what, const char* field, double value,
                               bool non_negative) {
  if (!std::isfinite(value)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", field, " must be a finite number, got ", NonFiniteName(value)));
  }
  if (non_negative && value < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", field, " must be >= 0, got ", value));
  }
  return absl::OkStatus();
}

}  // namespace

// ----- rank checks -----

absl::StatusOr<Coordinator::RankRef> Coordinator::CheckRank(const std::string& worker_id,
                                                            const std::string& job_id,
                                                            std::optional<int> rank,
                                                            int64_t attempt) {
  MAT_RETURN_IF_ERROR(CheckJobId(job_id));
  const std::string rank_text = rank ? absl::StrCat("rank ", *rank) : "rank";
  auto it = running_.find(job_id);
  if (it == running_.end()) {
    // Not running here: unknown, queued or finished (or lost by a failed store write).
    MAT_ASSIGN_OR_RETURN(JobRecord record, store_->GetJob(job_id));
    MAT_ASSIGN_OR_RETURN(std::vector<AssignmentRecord> assignments,
                         store_->ListAssignments(job_id));
    bool holds = false;
    for (const AssignmentRecord& a : assignments) {
      holds = holds || (a.worker_id == worker_id && (!rank || a.rank == *rank));
    }
    if (!holds) {
      return absl::NotFoundError(absl::StrCat(worker_id, " runs no ", rank_text, " of ", job_id));
    }
    if (record.state == v1::JOB_STATE_RUNNING) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", job_id, " is not running on this coordinator"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job_id, " is ", JobStateName(record.state), ", not RUNNING"));
  }
  JobRuntime& job = it->second;
  int r = -1;
  if (rank) {
    if (*rank >= 0 && *rank < job.world_size && job.ranks[*rank].worker_id == worker_id) r = *rank;
  } else {
    for (int i = 0; i < job.world_size && r < 0; ++i) {
      if (job.ranks[i].worker_id == worker_id) r = i;
    }
  }
  if (r < 0) {
    return absl::NotFoundError(absl::StrCat(worker_id, " runs no ", rank_text, " of ", job_id));
  }
  if (attempt != job.attempt) {
    return absl::AbortedError(absl::StrCat("stale attempt ", attempt, " of job ", job_id,
                                           " (rank ", r, "), now ", job.attempt));
  }
  if (job.ranks[r].done) {
    return absl::FailedPreconditionError(
        absl::StrCat("rank ", r, " of job ", job_id, " already finished (RankDone)"));
  }
  return RankRef{&job, r};
}

// ----- ModuleList -----

absl::Status Coordinator::HandleModuleList(const std::string& worker_id,
                                           const v1::ModuleList& list) {
  MAT_ASSIGN_OR_RETURN(RankRef ref,
                       CheckRank(worker_id, list.job_id(), std::nullopt, list.attempt()));
  JobRuntime& job = *ref.job;
  MaskEngine& masks = *job.masks;
  const std::string what = absl::StrCat("ModuleList of job ", list.job_id());
  if (list.modules_size() > kMaxJobModules) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", list.modules_size(),
                                                   " modules; at most ", kMaxJobModules));
  }
  std::vector<policy::ModuleInfo> modules;
  for (const v1::ModuleDescriptor& m : list.modules()) {
    modules.push_back(policy::ModuleInfo{m.group(), m.layer(), m.index(), m.name()});
  }
  // Every rank builds the same model: repeating the declared list is harmless.
  if (!masks.modules().empty() && SameModules(modules, masks.modules())) return absl::OkStatus();
  if (ref.rank != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " from rank ", ref.rank, " (", worker_id, "): only rank 0 declares the modules"));
  }
  if (!masks.modules().empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": the job already declared its ", masks.modules().size(),
                     " modules; a different list cannot replace them"));
  }
  if (modules.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": modules is empty"));
  MAT_ASSIGN_OR_RETURN(std::unique_ptr<policy::Policy> created, masks.NewPolicy(modules));
  if (absl::Status st = jobs_.ApplyRandSchedule(list.job_id(), job.spec, *created); !st.ok()) {
    // The replayed job trained another model (or is gone): this job cannot run as asked.
    const std::string job_id = list.job_id();
    FailJob(job_id, std::string(st.message()));  // `job` is gone after this
    return st;
  }
  std::vector<ModuleRecord> records;
  for (const policy::ModuleInfo& m : modules) {
    records.push_back(ModuleRecord{m.name, m.group, m.layer, m.index});
  }
  MAT_RETURN_IF_ERROR(store_->PutModules(list.job_id(), records));
  masks.Adopt(std::move(modules), std::move(created));
  spdlog::info("job {}: {} modules declared, policy {}", list.job_id(), masks.modules().size(),
               policy::PolicyKindName(masks.config().kind));
  std::vector<std::pair<std::string, v1::SpectraReport>> early;
  early.swap(job.early_reports);
  const std::string job_id = list.job_id();
  for (const auto& [from, report] : early) {
    // A replayed report is answered as if it arrived now (a Reject to its sender when refused).
    v1::WorkerMessage replay;
    replay.set_worker_id(from);
    *replay.mutable_spectra() = report;
    if (!sessions_.HasSession(from)) continue;
    (void)HandleWorkerMessage(replay);
    if (running_.count(job_id) == 0) break;  // the replay failed the job (a NaN λ)
  }
  return absl::OkStatus();
}

// ----- SpectraReport and decisions -----

absl::Status Coordinator::HandleSpectra(const std::string& worker_id,
                                        const v1::SpectraReport& report) {
  MAT_ASSIGN_OR_RETURN(RankRef ref,
                       CheckRank(worker_id, report.job_id(), report.rank(), report.attempt()));
  JobRuntime& job = *ref.job;
  MaskEngine& masks = *job.masks;
  const std::string& job_id = report.job_id();
  const int64_t step = report.step();
  const std::string what = absl::StrCat("spectra for ", job_id, " step ", step);
  if (!masks.has_policy()) {
    // Rank 0's ModuleList travels on another stream and may arrive later: keep one early report
    // per rank (the rank then waits for its mask) and replay it when the modules are known.
    for (const auto& early : job.early_reports) {
      if (early.second.rank() == ref.rank) {
        return absl::FailedPreconditionError(absl::StrCat(
            what, ": no ModuleList yet and rank ", ref.rank, " already has a report waiting for it"));
      }
    }
    job.early_reports.emplace_back(worker_id, report);
    return absl::OkStatus();
  }
  MAT_RETURN_IF_ERROR(masks.CheckReport(what, report));
  for (int i = 0; i < report.lambda_max_size(); ++i) {
    const double v = report.lambda_max(i);
    if (std::isfinite(v)) continue;
    // The policy cannot go on from here: the job fails, every rank stops.
    const std::string message =
        absl::StrCat(what, ": rank ", ref.rank, ": module ", i, " (", masks.modules()[i].name,
                     "): lambda is ", NonFiniteName(v));
    FailJob(job_id, message);  // `job` is gone after this
    return absl::InvalidArgumentError(message);
  }
  // A restarted (or kept) job: continue the policy from its stored decisions.
  if (absl::Status st = masks.RestoreIfNeeded(*store_, step); !st.ok()) {
    const std::string message =
        absl::StrCat("cannot continue the policy of ", job_id, ": ", st.message());
    FailJob(job_id, message);  // `job` is gone after this
    return absl::Status(st.code(), message);
  }
  if (const v1::CoordinatorMessage* again = masks.Repeat(step, job.ranks[ref.rank].acked_version)) {
    // Decided before a restart (of the job or of this coordinator): the same mask again.
    sessions_.Send(worker_id, *again);
    return absl::OkStatus();
  }
  MAT_ASSIGN_OR_RETURN(
      std::optional<std::vector<std::vector<double>>> complete,
      masks.Add(what, ref.rank, step,
                std::vector<double>(report.lambda_max().begin(), report.lambda_max().end())));
  if (options_.metrics != nullptr) options_.metrics->spectra_reports_total.Inc({});
  if (!complete.has_value()) return absl::OkStatus();
  return Decide(job_id, job, step, *complete);
}

absl::Status Coordinator::Decide(const std::string& job_id, JobRuntime& job, int64_t step,
                                 const std::vector<std::vector<double>>& lambda) {
  bool store_failed = false;
  absl::StatusOr<MaskDecision> decided = job.masks->Decide(*store_, step, lambda, &store_failed);
  if (store_failed) {
    // The history cannot be kept: the job stops rather than run on without its record.
    FailJob(job_id, std::string(decided.status().message()));  // `job` is gone after this
    return decided.status();
  }
  MAT_RETURN_IF_ERROR(decided.status());
  for (int r = 0; r < job.world_size; ++r) {
    const std::string& worker_id = job.ranks[r].worker_id;
    if (sessions_.Runs(worker_id, job_id, r)) sessions_.Send(worker_id, decided->message);
  }
  if (CoordinatorMetrics* m = options_.metrics; m != nullptr) {
    m->mask_latency_seconds.Observe(
        {}, std::chrono::duration<double>(std::chrono::steady_clock::now() - handling_since_)
                .count());
    job.masks->SetDecisionMetrics(*decided);
  }
  v1::JobEvent event;
  event.set_job_id(job_id);
  event.set_step(step);
  event.mutable_mask()->set_mask_version(job.masks->mask_version());
  event.mutable_mask()->set_effective_step(step);
  event.mutable_mask()->set_active_modules(decided->active_modules);
  PublishJobEvent(event);
  return absl::OkStatus();
}

// ----- MaskAck -----

absl::Status Coordinator::HandleMaskAck(const std::string& worker_id, const v1::MaskAck& ack) {
  MAT_ASSIGN_OR_RETURN(RankRef ref,
                       CheckRank(worker_id, ack.job_id(), ack.rank(), ack.attempt()));
  JobRuntime& job = *ref.job;
  RankState& rank = job.ranks[ref.rank];
  const int64_t version = ack.mask_version();
  if (version < 1 || version > job.masks->mask_version()) {
    return absl::InvalidArgumentError(
        absl::StrCat("mask ack for ", ack.job_id(), ": mask version ", version,
                     " was never sent (the latest is ", job.masks->mask_version(), ")"));
  }
  if (version < rank.acked_version) {
    return absl::AbortedError(absl::StrCat("stale mask version ", version, ", rank ", ref.rank,
                                           " already acknowledged ", rank.acked_version));
  }
  // Kept in memory here (one ack per rank per probe is on the mask's critical path); the store
  // gets it with the rank's next Progress or RankDone.
  rank.acked_version = version;
  return absl::OkStatus();
}

// ----- artifacts -----

absl::Status Coordinator::CheckArtifactUpload(const std::string& worker_id,
                                              const std::string& job_id, int rank,
                                              int64_t attempt) {
  if (rank != 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("only rank 0 uploads artifacts; ", worker_id, " sent rank ", rank));
  }
  if (running_.count(job_id) != 0) {
    return CheckRank(worker_id, job_id, 0, attempt).status();
  }
  MAT_ASSIGN_OR_RETURN(JobRecord record, store_->GetJob(job_id));
  MAT_ASSIGN_OR_RETURN(std::vector<AssignmentRecord> assignments, store_->ListAssignments(job_id));
  // The rank-0 row is the newest attempt that started (RESTARTING counts the next attempt in
  // record.attempt before any rank of it starts): that attempt's rank 0 may upload.
  const AssignmentRecord* rank0 = nullptr;
  for (const AssignmentRecord& a : assignments) {
    if (a.rank == 0 && a.worker_id == worker_id) rank0 = &a;
  }
  if (rank0 == nullptr) {
    return absl::NotFoundError(absl::StrCat(worker_id, " runs no rank 0 of ", job_id));
  }
  if (attempt != rank0->attempt) {
    return absl::AbortedError(absl::StrCat("stale attempt ", attempt, " of job ", job_id,
                                           ", now ", record.attempt));
  }
  // A rank that finished sent its files before its RankDone (only a finished rank stores its
  // checksum): nothing replaces them once the job's users may have read them.
  if (rank0->finished()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rank 0 of job ", job_id, " already finished (RankDone): its artifacts are final"));
  }
  switch (record.state) {
    case v1::JOB_STATE_SUCCEEDED:
    case v1::JOB_STATE_FAILED:
    case v1::JOB_STATE_CANCELLED:
    // A peer was lost: rank 0's part ended with its newest checkpoint's model. Kept, so that a
    // job cancelled before its next attempt starts still gives one back; the next attempt's
    // rank 0 replaces the files when it ends.
    case v1::JOB_STATE_RESTARTING:
      return absl::OkStatus();
    case v1::JOB_STATE_RUNNING:
      return absl::UnavailableError(absl::StrCat(
          "job ", job_id, " has not re-attached its rank 0 to this coordinator yet; retry"));
    default:
      return absl::FailedPreconditionError(
          absl::StrCat("job ", job_id, " is ", JobStateName(record.state)));
  }
}

// ----- Progress -----

absl::Status Coordinator::HandleLogs(const std::string& worker_id, const v1::LogBatch& batch) {
  // Lines change no state, and a failed attempt's last ones (its error) arrive after its job
  // moved on: kept from the worker holding the rank whatever the job's state or attempt now
  // (CheckRank refuses those FAILED_PRECONDITION or ABORTED only once it found the holder).
  absl::StatusOr<RankRef> held =
      CheckRank(worker_id, batch.job_id(), batch.rank(), batch.attempt());
  if (!held.ok() && held.status().code() != absl::StatusCode::kFailedPrecondition &&
      held.status().code() != absl::StatusCode::kAborted) {
    return held.status();
  }
  // Except from a rank that finished: its worker sends its last lines before its RankDone, so
  // later ones would only push the job's real lines out of the kept window.
  if (held.status().code() == absl::StatusCode::kFailedPrecondition) {
    bool finished = false;
    if (auto it = running_.find(batch.job_id()); it != running_.end()) {
      finished = it->second.ranks[batch.rank()].done;  // CheckRank found the holder: in range
    } else {
      MAT_ASSIGN_OR_RETURN(std::vector<AssignmentRecord> assignments,
                           store_->ListAssignments(batch.job_id()));
      for (const AssignmentRecord& a : assignments) {
        finished = finished || (a.rank == batch.rank() && a.worker_id == worker_id &&
                                a.attempt == batch.attempt() && a.finished());
      }
    }
    if (finished) {
      return absl::FailedPreconditionError(
          absl::StrCat("rank ", batch.rank(), " of job ", batch.job_id(),
                       " already finished (RankDone): its log is complete"));
    }
  }
  const RankRef ref{nullptr, held.ok() ? held->rank : batch.rank()};
  constexpr int kMaxLinesPerBatch = 1000;
  constexpr size_t kMaxTextBytes = 4096, kMaxLevelBytes = 16;
  if (batch.lines_size() > kMaxLinesPerBatch) {
    return absl::InvalidArgumentError(absl::StrCat("logs of ", batch.job_id(), " rank ", ref.rank,
                                                   ": ", batch.lines_size(),
                                                   " lines in one batch; at most ",
                                                   kMaxLinesPerBatch));
  }
  std::vector<LogLineRecord> lines;
  lines.reserve(batch.lines_size());
  for (const v1::LogLine& l : batch.lines()) {
    LogLineRecord r;
    r.time_unix_ms = l.time_unix_ms();
    r.level = l.level().substr(0, kMaxLevelBytes);
    r.text = l.text().substr(0, kMaxTextBytes);
    lines.push_back(std::move(r));
  }
  return store_->AppendJobLogs(batch.job_id(), ref.rank, lines, options_.max_log_lines_per_job);
}

absl::Status Coordinator::HandleProgress(const std::string& worker_id,
                                         const v1::Progress& progress) {
  MAT_ASSIGN_OR_RETURN(RankRef ref, CheckRank(worker_id, progress.job_id(), progress.rank(),
                                              progress.attempt()));
  JobRuntime& job = *ref.job;
  const std::string& job_id = progress.job_id();
  const std::string what = absl::StrCat("progress of ", job_id, " rank ", ref.rank);
  if (progress.step() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": step must be >= 0, got ", progress.step()));
  }
  MAT_RETURN_IF_ERROR(CheckReportNumber(what, "train_loss", progress.train_loss(), false));
  if (progress.has_val_loss()) {
    MAT_RETURN_IF_ERROR(CheckReportNumber(what, "val_loss", progress.val_loss(), false));
  }
  if (progress.has_test_loss()) {
    MAT_RETURN_IF_ERROR(CheckReportNumber(what, "test_loss", progress.test_loss(), false));
  }
  MAT_RETURN_IF_ERROR(CheckReportNumber(what, "flops_total", progress.flops_total(), true));
  MAT_RETURN_IF_ERROR(CheckReportNumber(what, "wall_seconds", progress.wall_seconds(), true));
  if (progress.active_modules() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": active_modules must be >= 0, got ", progress.active_modules()));
  }
  RankState& rank = job.ranks[ref.rank];
  double flops = 0;  // every rank's latest, this one's new value
  for (int r = 0; r < job.world_size; ++r) {
    flops += r == ref.rank ? progress.flops_total() : job.ranks[r].flops_total;
  }
  MAT_RETURN_IF_ERROR(store_->UpdateRankStatus(job_id, ref.rank, progress.step(),
                                               rank.acked_version, progress.flops_total(),
                                               rank.param_checksum));
  if (ref.rank == 0) {
    JobProgressUpdate update;
    update.step = progress.step();
    update.train_loss = progress.train_loss();
    if (progress.has_val_loss()) update.val_loss = progress.val_loss();
    if (progress.has_test_loss()) update.test_loss = progress.test_loss();
    update.flops_total = flops;
    update.wall_seconds = progress.wall_seconds();
    MAT_RETURN_IF_ERROR(store_->UpdateJobProgress(job_id, update));
  }
  rank.step = progress.step();
  rank.flops_total = progress.flops_total();
  if (CoordinatorMetrics* m = options_.metrics; m != nullptr) {
    m->job_flops_total.SetIfGreater({job_id}, flops);
    if (ref.rank == 0) {
      m->job_step.Set({job_id}, static_cast<double>(progress.step()));
      m->job_loss.Set({job_id, "train"}, progress.train_loss());
      if (progress.has_val_loss()) m->job_loss.Set({job_id, "val"}, progress.val_loss());
      if (progress.has_test_loss()) m->job_loss.Set({job_id, "test"}, progress.test_loss());
    }
  }
  if (ref.rank != 0) return absl::OkStatus();

  double steps_per_second = 0;
  if (job.rank0_step >= 0 && progress.step() > job.rank0_step &&
      progress.wall_seconds() > job.rank0_wall_seconds) {
    steps_per_second = static_cast<double>(progress.step() - job.rank0_step) /
                       (progress.wall_seconds() - job.rank0_wall_seconds);
  }
  job.rank0_step = progress.step();
  job.rank0_wall_seconds = progress.wall_seconds();
  v1::JobEvent event;
  event.set_job_id(job_id);
  event.set_step(progress.step());
  v1::JobProgress* p = event.mutable_progress();
  p->set_train_loss(progress.train_loss());
  p->set_active_modules(progress.active_modules());
  p->set_total_modules(static_cast<int64_t>(job.masks->modules().size()));
  p->set_flops_total(flops);
  p->set_wall_seconds(progress.wall_seconds());
  p->set_steps_per_second(steps_per_second);
  PublishJobEvent(event);
  if (progress.has_val_loss()) {
    v1::JobEvent eval;
    eval.set_job_id(job_id);
    eval.set_step(progress.step());
    eval.mutable_evaluation()->set_val_loss(progress.val_loss());
    eval.mutable_evaluation()->set_test_loss(progress.has_test_loss()
                                                 ? progress.test_loss()
                                                 : std::numeric_limits<double>::quiet_NaN());
    PublishJobEvent(eval);
  }
  if (const double limit = job.spec.resources().max_train_seconds();
      limit > 0 && progress.wall_seconds() > limit) {
    FailJob(job_id, absl::StrFormat("trained for %.3f s by step %d, past "
                                    "resources.max_train_seconds (%g s)",
                                    progress.wall_seconds(), progress.step(),
                                    limit));  // `job` is gone after this
  }
  return absl::OkStatus();
}

// ----- RankDone -----

absl::Status Coordinator::HandleRankDone(const std::string& worker_id, const v1::RankDone& done) {
  // A cancelled rank that ended anyway (its collective failed): the worker may take a new one.
  if (sessions_.ClearStopping(worker_id, done.job_id())) Schedule();
  MAT_ASSIGN_OR_RETURN(RankRef ref,
                       CheckRank(worker_id, done.job_id(), done.rank(), done.attempt()));
  JobRuntime& job = *ref.job;
  const std::string& job_id = done.job_id();
  if (!done.ok()) {
    // Best effort: the failure below must happen even when the store cannot take this.
    // No checksum: a stored one marks a rank that finished (AssignmentRecord::finished).
    if (absl::Status st = store_->UpdateRankStatus(
            job_id, ref.rank, std::max<int64_t>(done.step(), 0), job.ranks[ref.rank].acked_version,
            job.ranks[ref.rank].flops_total, "");
        !st.ok()) {
      spdlog::warn("job {}: cannot store rank {}'s last step: {}", job_id, ref.rank,
                   st.ToString());
    }
    std::string message =
        absl::StrCat("rank ", ref.rank, " (", worker_id, "): ",
                     done.error_message().empty() ? "failed without an error message"
                                                  : done.error_message());
    if (done.retryable()) {
      // The rank saw its process group fail; say which peer is gone when this coordinator
      // knows (a worker without a session, or not re-attached since a coordinator restart).
      std::vector<std::string> gone;
      for (int r = 0; r < job.world_size; ++r) {
        const RankState& peer = job.ranks[r];
        if (r == ref.rank || peer.done) continue;
        if (!peer.attached || !sessions_.HasSession(peer.worker_id)) {
          gone.push_back(absl::StrCat("rank ", r, " (", peer.worker_id, ")"));
        }
      }
      if (!gone.empty()) {
        absl::StrAppend(&message, "; not connected: ", absl::StrJoin(gone, ", "));
      }
      // Its process group failed (a peer was lost): the job continues from its checkpoints.
      RestartJob(job_id, message, worker_id);
    } else {
      FailJob(job_id, message, worker_id);  // the sender stopped already: no Cancel for it
    }
    return absl::OkStatus();
  }
  if (done.step() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("RankDone of ", job_id, " rank ", ref.rank,
                                                   ": step must be >= 0, got ", done.step()));
  }
  if (done.param_checksum().empty()) {
    return absl::InvalidArgumentError(absl::StrCat("RankDone of ", job_id, " rank ", ref.rank,
                                                   ": ok without a param_checksum"));
  }
  RankState& rank = job.ranks[ref.rank];
  int remaining = 0;
  for (int r = 0; r < job.world_size; ++r) remaining += job.ranks[r].done ? 0 : 1;
  const bool last = remaining == 1;  // this rank is the only one not done yet
  const std::string summary = ref.rank == 0 ? done.summary_json() : job.ranks[0].summary_json;
  // Rank 0's summary is stored at once, with its status: it must survive a coordinator restart,
  // and a restarted coordinator takes a rank stored as finished as done (it sends no RankDone
  // again).
  MAT_RETURN_IF_ERROR(store_->UpdateRankStatus(job_id, ref.rank, done.step(), rank.acked_version,
                                               rank.flops_total, done.param_checksum(),
                                               last || ref.rank == 0 ? &summary : nullptr));
  rank.done = true;
  rank.step = done.step();
  rank.param_checksum = done.param_checksum();
  rank.summary_json = done.summary_json();
  spdlog::info("job {}: rank {} ({}) finished at step {}, checksum {}", job_id, ref.rank,
               worker_id, done.step(), done.param_checksum());
  // The worker stays with the job until it ends (EndJob frees every rank's worker at once): freed
  // one by one, each went to whichever queued job fit first, and the oldest job that needs them
  // all was overtaken by newer, smaller ones.
  if (last) EndFinishedJob(job_id, summary);
  return absl::OkStatus();
}

void Coordinator::EndFinishedJob(const std::string& job_id, const std::string& summary) {
  const JobRuntime& job = running_.at(job_id);
  // Data-parallel ranks keep bitwise identical parameters (DESIGN.md): ranks that end apart did
  // not train the job asked for (a broken collective, or a rank that does not report what it
  // ran). The job fails saying so; rank 0's artifacts (its model) stay to be looked at.
  std::vector<std::string> apart;
  for (int r = 1; r < job.world_size; ++r) {
    if (job.ranks[r].param_checksum != job.ranks[0].param_checksum) {
      apart.push_back(absl::StrCat("rank ", r, " (", job.ranks[r].worker_id, ") ",
                                   job.ranks[r].param_checksum));
    }
  }
  if (!apart.empty()) {
    const std::string message = absl::StrCat(
        "the ranks' final parameters differ: rank 0 (", job.ranks[0].worker_id,
        ") has checksum ", job.ranks[0].param_checksum, ", ", absl::StrJoin(apart, ", "),
        "; data-parallel ranks must end bitwise identical");
    spdlog::error("job {}: {}", job_id, message);
    FailJob(job_id, message);  // every rank is done: nobody gets a Cancel
    return;
  }
  jobs_.RecordSummaryMetrics(job_id, summary);
  EndOrKeepJob(job_id, v1::JOB_STATE_SUCCEEDED, "");
}

}  // namespace mat::coordinator
