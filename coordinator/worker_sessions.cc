// The Coordinator facade's WorkerService side, part 1 (coordinator.h): restart recovery, the
// session flows over the SessionManager, heartbeats, starting jobs for the GangScheduler, and
// ending jobs. The job messages of a session (ModuleList, SpectraReport, MaskAck, Progress,
// RankDone) are in worker_sessions_reports.cc.
//
// Sections: helpers · recovery · registration and sessions · heartbeats · scheduling · ending
// jobs.
#include <algorithm>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/job_spec.h"
#include "common/status.h"
#include "config/train_config.h"
#include "coordinator/coordinator.h"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace {

// The store's modules of a job in the policy's form (index order kept).
std::vector<policy::ModuleInfo> ModuleInfos(const std::vector<ModuleRecord>& records) {
  std::vector<policy::ModuleInfo> out;
  for (const ModuleRecord& m : records) {
    out.push_back(policy::ModuleInfo{m.group, m.layer, m.index, m.name});
  }
  return out;
}

// The job id a worker message refers to ("" for a heartbeat or no body).
std::string JobIdOf(const v1::WorkerMessage& message) {
  switch (message.body_case()) {
    case v1::WorkerMessage::kProgress:
      return message.progress().job_id();
    case v1::WorkerMessage::kSpectra:
      return message.spectra().job_id();
    case v1::WorkerMessage::kMaskAck:
      return message.mask_ack().job_id();
    case v1::WorkerMessage::kModules:
      return message.modules().job_id();
    case v1::WorkerMessage::kDone:
      return message.done().job_id();
    case v1::WorkerMessage::kLogs:
      return message.logs().job_id();
    default:
      return "";
  }
}

}  // namespace

// ----- recovery -----

absl::Status Coordinator::Recover() {
  recovered_ms_ = clock_.NowMs();
  recovered_unix_seconds_ = clock_.Now();
  MAT_RETURN_IF_ERROR(sessions_.Load());
  // The ranks of a previous process's running jobs keep training and reconnect; RESTARTING
  // jobs are started again by the scheduler. A live job whose stored row is damaged (its spec
  // does not parse) can never run: it fails now, rather than wait in the queue for ever.
  std::string token;
  do {
    absl::StatusOr<JobPage> page = store_->ListJobs(
        kMaxPageSize, token,
        {v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING, v1::JOB_STATE_QUEUED});
    if (!page.ok()) {
      return absl::Status(page.status().code(),
                          absl::StrCat("cannot list the live jobs to recover from the state "
                                       "store: ", page.status().message()));
    }
    for (const JobRecord& job : page->jobs) {
      if (!job.damage.empty()) {
        spdlog::error("{}: failing it", job.damage);
        FailJob(job.id, "the coordinator cannot run it (failed at start)");
      } else if (job.state == v1::JOB_STATE_RUNNING) {
        KeepJob(job);
      }
    }
    token = page->next_page_token;
  } while (!token.empty());
  return absl::OkStatus();
}

Coordinator::JobRuntime& Coordinator::AddRuntime(const JobRecord& job, int world,
                                                 const policy::PolicyConfig& config,
                                                 bool resume) {
  JobRuntime& runtime = running_[job.id];
  runtime.spec = job.spec;
  runtime.world_size = world;
  runtime.ranks.resize(world);
  runtime.attempt = job.attempt;
  runtime.masks = std::make_unique<MaskEngine>(job.id, config, world, options_.metrics);
  if (resume) runtime.masks->Continue(job.mask_version);
  return runtime;
}

void Coordinator::KeepJob(const JobRecord& job) {
  auto fail = [&](const std::string& why) {
    FailJob(job.id, absl::StrCat("cannot continue the job after a coordinator restart: ", why));
  };
  absl::StatusOr<policy::PolicyConfig> config = JobPolicyConfig(job);
  if (!config.ok()) return fail(std::string(config.status().message()));
  absl::StatusOr<std::vector<AssignmentRecord>> assignments = store_->ListAssignments(job.id);
  if (!assignments.ok()) return fail(std::string(assignments.status().message()));
  const int world = job.spec.resources().workers();
  if (world < 1 || static_cast<int>(assignments->size()) != world) {
    return fail(absl::StrCat("the store has ", assignments->size(), " rank assignments for ",
                             world, " ranks"));
  }
  absl::StatusOr<std::vector<ModuleRecord>> stored_modules = store_->GetModules(job.id);
  if (!stored_modules.ok()) return fail(std::string(stored_modules.status().message()));
  JobRuntime& runtime = AddRuntime(job, world, *config, /*resume=*/true);
  runtime.attach_deadline_ms = clock_.NowMs() + 10 * options_.heartbeat_interval_ms;
  for (const AssignmentRecord& a : *assignments) {
    RankState& rank = runtime.ranks[a.rank];
    rank.worker_id = a.worker_id;
    rank.step = a.step;
    rank.acked_version = a.mask_version;
    rank.param_checksum = a.param_checksum;
    rank.flops_total = a.flops_total;  // the job's total sums it until the rank reports again
    rank.done = a.finished();
    rank.attached = false;
  }
  runtime.ranks[0].summary_json = job.summary_json;
  bool all_done = true;
  for (const RankState& rank : runtime.ranks) all_done = all_done && rank.done;
  if (all_done) {
    // Every rank finished before the previous process could record the end.
    spdlog::info("job {}: every rank had finished before the restart", job.id);
    EndFinishedJob(job.id, job.summary_json);
    return;
  }
  if (!stored_modules->empty()) {
    if (absl::Status st = CreatePolicy(job.id, runtime, ModuleInfos(*stored_modules)); !st.ok()) {
      running_.erase(job.id);
      return fail(std::string(st.message()));
    }
  }
  spdlog::info("job {}: kept across the restart (attempt {}, {} ranks); waiting for its workers",
               job.id, job.attempt, world);
}

absl::StatusOr<policy::PolicyConfig> Coordinator::JobPolicyConfig(const JobRecord& job) {
  // The policy config comes from the same text the workers' trainers read.
  absl::StatusOr<config::TrainConfig> config =
      config::ParseTrainConfig(api::JobSpecToTrainerYaml(api::WithJobSpecDefaults(job.spec)),
                               absl::StrCat("job ", job.id));
  absl::Status valid = config.ok() ? config::ValidateTrainConfig(*config) : config.status();
  if (valid.ok()) valid = policy::ValidatePolicyConfig(config::ToPolicyConfig(*config));
  if (!valid.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the job's spec is not a valid trainer config: ", valid.message()));
  }
  return config::ToPolicyConfig(*config);
}

absl::Status Coordinator::CreatePolicy(const std::string& job_id, JobRuntime& job,
                                       std::vector<policy::ModuleInfo> modules) {
  MAT_ASSIGN_OR_RETURN(std::unique_ptr<policy::Policy> created, job.masks->NewPolicy(modules));
  // Not part of the policy's saved state: set again on every policy made for the job.
  MAT_RETURN_IF_ERROR(jobs_.ApplyRandSchedule(job_id, job.spec, *created));
  job.masks->Adopt(std::move(modules), std::move(created));
  return absl::OkStatus();
}

// ----- registration and sessions -----

absl::StatusOr<v1::RegisterReply> Coordinator::RegisterWorker(const v1::RegisterRequest& request,
                                                              std::string_view secret) {
  return sessions_.Register(request, secret);
}

absl::Status Coordinator::AuthenticateWorker(const std::string& worker_id,
                                             std::string_view secret) const {
  return sessions_.Authenticate(worker_id, secret);
}

absl::StatusOr<v1::ListWorkersReply> Coordinator::ListWorkers() { return sessions_.List(); }

absl::Status Coordinator::OpenSession(const v1::WorkerMessage& first,
                                      std::shared_ptr<WorkerChannel> channel) {
  MAT_CHECK(channel != nullptr) << "OpenSession needs a channel";
  MAT_RETURN_IF_ERROR(sessions_.Open(first.worker_id(), std::move(channel)));
  if (first.has_heartbeat() && first.heartbeat().job_ids().empty()) {
    RejoinFinishedRank(first.worker_id());
  }
  // A refused first message got its Reject; the session stays open either way.
  HandleWorkerMessage(first).IgnoreError();
  Schedule();
  return absl::OkStatus();
}

void Coordinator::RejoinFinishedRank(const std::string& worker_id) {
  for (const auto& [job_id, runtime] : running_) {
    for (int r = 0; r < runtime.world_size; ++r) {
      if (!runtime.ranks[r].done || runtime.ranks[r].worker_id != worker_id) continue;
      sessions_.SetJob(worker_id, job_id, r);
      spdlog::info("job {}: {} is back; its rank {} finished, so it waits for the job's end",
                   job_id, worker_id, r);
      return;
    }
  }
}

absl::Status Coordinator::HandleWorkerMessage(const v1::WorkerMessage& message) {
  const std::string& id = message.worker_id();
  if (id.empty()) return absl::InvalidArgumentError("worker_id is empty");
  handling_since_ = std::chrono::steady_clock::now();
  if (!sessions_.Touch(id)) {
    return absl::NotFoundError(absl::StrCat("worker ", id, " has no open session"));
  }
  absl::Status status = HandleBody(id, message);
  if (!status.ok()) {
    spdlog::warn("worker {}: message refused: {}", id, status.ToString());
    if (options_.metrics != nullptr) {
      options_.metrics->rejected_messages_total.Inc({absl::StatusCodeToString(status.code())});
    }
    v1::CoordinatorMessage reject;
    reject.mutable_reject()->set_job_id(JobIdOf(message));
    reject.mutable_reject()->set_code(static_cast<int>(status.code()));
    reject.mutable_reject()->set_message(std::string(status.message()));
    sessions_.Send(id, reject);
  }
  return status;
}

absl::Status Coordinator::HandleBody(const std::string& worker_id,
                                     const v1::WorkerMessage& message) {
  switch (message.body_case()) {
    case v1::WorkerMessage::kHeartbeat:
      HandleHeartbeat(worker_id, message.heartbeat());
      return absl::OkStatus();
    case v1::WorkerMessage::kProgress:
      return HandleProgress(worker_id, message.progress());
    case v1::WorkerMessage::kSpectra:
      return HandleSpectra(worker_id, message.spectra());
    case v1::WorkerMessage::kMaskAck:
      return HandleMaskAck(worker_id, message.mask_ack());
    case v1::WorkerMessage::kModules:
      return HandleModuleList(worker_id, message.modules());
    case v1::WorkerMessage::kDone:
      return HandleRankDone(worker_id, message.done());
    case v1::WorkerMessage::kLogs:
      return HandleLogs(worker_id, message.logs());
    case v1::WorkerMessage::kLeaving:
      HandleLeaving(worker_id, message.leaving());
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("message from ", worker_id, " has no body"));
  }
}

void Coordinator::HandleHeartbeat(const std::string& worker_id, const v1::Heartbeat& heartbeat) {
  if (!sessions_.HasSession(worker_id)) return;
  const std::string current = sessions_.JobOf(worker_id);
  const std::string stopping = sessions_.StoppingJobOf(worker_id);
  if (!stopping.empty() && std::find(heartbeat.job_ids().begin(), heartbeat.job_ids().end(),
                                     stopping) == heartbeat.job_ids().end()) {
    sessions_.ClearStopping(worker_id, stopping);
    spdlog::info("worker {}: its rank of {} stopped", worker_id, stopping);
    Schedule();
  }
  std::set<std::string> told;  // one Cancel per job even when listed twice
  for (const std::string& job_id : heartbeat.job_ids()) {
    if (job_id.empty() || job_id == current || !told.insert(job_id).second) continue;
    // A rank kept across a coordinator restart: its worker is back.
    auto job = running_.find(job_id);
    if (current.empty() && job != running_.end()) {
      JobRuntime& runtime = job->second;
      bool attached = false;
      for (int r = 0; r < runtime.world_size && !attached; ++r) {
        RankState& rank = runtime.ranks[r];
        if (rank.worker_id != worker_id || rank.attached || rank.done) continue;
        rank.attached = true;
        attached = true;
        sessions_.SetJob(worker_id, job_id, r);
        spdlog::info("job {}: rank {} re-attached to {}", job_id, r, worker_id);
      }
      if (attached) {
        bool all = true;
        for (const RankState& rank : runtime.ranks) all = all && (rank.attached || rank.done);
        if (all) runtime.attach_deadline_ms = 0;
        continue;
      }
    }
    sessions_.SendCancel(
        worker_id, job_id,
        absl::StrCat(worker_id, " runs no rank of ", job_id,
                     " (the job finished or the rank was never assigned to it): stop it"));
    if (current.empty() && sessions_.StoppingJobOf(worker_id) != job_id) {
      sessions_.SetStopping(worker_id, job_id, -1);  // a rank this coordinator did not know of
    }
  }
}

void Coordinator::HandleLeaving(const std::string& worker_id, const v1::Leaving& leaving) {
  std::string reason = leaving.reason().empty() ? "no reason given" : leaving.reason();
  if (reason.size() > 200) reason = absl::StrCat(reason.substr(0, 200), "...");
  const std::string why = absl::StrCat("the worker is shutting down (", reason, ")");
  std::shared_ptr<WorkerChannel> channel = DropSession(worker_id, why);
  if (channel != nullptr) channel->Close(absl::OkStatus());
}

void Coordinator::CloseSession(const std::string& worker_id) {
  DropSession(worker_id, "session closed");  // the channel is dropped without a call
}

std::shared_ptr<WorkerChannel> Coordinator::DropSession(const std::string& worker_id,
                                                       const std::string& why) {
  std::optional<SessionManager::Dropped> dropped = sessions_.Drop(worker_id);
  if (!dropped.has_value()) return nullptr;
  spdlog::info("worker {}: session ended: {}", worker_id, why);
  auto job = running_.find(dropped->job_id);
  // A worker whose rank finished (it waits for its job's other ranks) takes nothing with it.
  const bool finished = job != running_.end() && dropped->rank >= 0 &&
                        dropped->rank < job->second.world_size &&
                        job->second.ranks[dropped->rank].done;
  if (!dropped->job_id.empty() && job != running_.end() && !finished) {
    RestartJob(dropped->job_id,
               absl::StrCat(worker_id, " (rank ", dropped->rank, ") lost: ", why), worker_id);
  }
  return std::move(dropped->channel);
}

void Coordinator::RestartJob(const std::string& job_id, const std::string& why,
                             const std::string& except_worker) {
  if (running_.count(job_id) == 0) return;
  absl::StatusOr<JobRecord> record = store_->GetJob(job_id);
  if (!record.ok()) return FailJob(job_id, why, except_worker);
  if (record->attempt >= options_.max_restarts) {
    return FailJob(job_id,
                   absl::StrCat(why, " (the job was restarted ", record->attempt,
                                " times already, the limit)"),
                   except_worker);
  }
  if (absl::Status st = UpdateJobState(job_id, v1::JOB_STATE_RESTARTING, why); !st.ok()) {
    spdlog::error("job {}: cannot store its restart: {}", job_id, st.ToString());
    return FailJob(job_id, why, except_worker);
  }
  DetachJob(job_id, why, /*cancel=*/true, except_worker);
  Schedule();
}

// ----- heartbeats -----

void Coordinator::CheckHeartbeats() {
  for (const auto& [id, silence] : sessions_.Silent()) {
    const std::string why = absl::StrCat("no heartbeat for ", silence, " ms");
    // Forgotten (and its job restarted) before it is closed.
    std::shared_ptr<WorkerChannel> channel = DropSession(id, why);
    if (channel != nullptr) channel->Close(absl::UnavailableError(why));
  }
  // Jobs kept across a restart whose workers did not all come back.
  const int64_t now_ms = clock_.NowMs();
  std::vector<std::pair<std::string, std::string>> overdue;  // job id, why
  for (const auto& [id, job] : running_) {
    if (job.attach_deadline_ms == 0 || now_ms <= job.attach_deadline_ms) continue;
    for (int r = 0; r < job.world_size; ++r) {
      const RankState& rank = job.ranks[r];
      if (rank.attached || rank.done) continue;
      overdue.emplace_back(id, absl::StrCat(rank.worker_id, " (rank ", r, ") lost: did not ",
                                            "reconnect within ", 10 * options_.heartbeat_interval_ms,
                                            " ms of the coordinator's restart"));
      break;
    }
  }
  for (const auto& [id, why] : overdue) RestartJob(id, why);
  StoreUnstoredEnds();
}

// ----- scheduling -----

void Coordinator::Schedule() {
  scheduler_.Run();
  for (const auto& [worker_id, reason] : sessions_.TakeDrained()) {
    spdlog::info("worker {}: drained ({}), runs no rank: told to stop", worker_id, reason);
    v1::CoordinatorMessage message;
    message.mutable_drain()->set_reason(reason);
    sessions_.Send(worker_id, message);
  }
}

absl::Status Coordinator::StartJob(const JobRecord& job, const std::vector<std::string>& workers) {
  const std::string& id = job.id;
  absl::StatusOr<policy::PolicyConfig> config = JobPolicyConfig(job);
  if (!config.ok()) {
    // Cannot happen for a spec that passed ValidateJobSpec; do not retry it forever.
    return UpdateJobState(id, v1::JOB_STATE_FAILED, std::string(config.status().message()));
  }
  const int world = static_cast<int>(workers.size());
  const int64_t attempt = job.attempt;
  std::vector<policy::ModuleInfo> modules;  // a restarted job's, from the store
  if (attempt > 0) {
    MAT_ASSIGN_OR_RETURN(std::vector<ModuleRecord> stored, store_->GetModules(id));
    modules = ModuleInfos(stored);
  }
  for (int r = 0; r < world; ++r) {
    MAT_RETURN_IF_ERROR(store_->PutAssignment(id, r, workers[r], attempt));
  }
  // The runtime and the workers' BUSY state exist before the state change is published, so a
  // listener sees a consistent Coordinator. A restart: the ranks resume from a checkpoint and
  // the policy from the store.
  JobRuntime& runtime = AddRuntime(job, world, *config, /*resume=*/attempt > 0);
  if (attempt > 0 && !modules.empty()) {
    if (absl::Status st = CreatePolicy(id, runtime, std::move(modules)); !st.ok()) {
      running_.erase(id);
      return UpdateJobState(id, v1::JOB_STATE_FAILED, std::string(st.message()));
    }
  }
  for (int r = 0; r < world; ++r) {
    runtime.ranks[r].worker_id = workers[r];
    sessions_.SetJob(workers[r], id, r);
  }
  if (absl::Status st = UpdateJobState(id, v1::JOB_STATE_RUNNING); !st.ok()) {
    running_.erase(id);
    for (const std::string& w : workers) sessions_.SetJob(w, "", -1);
    return st;
  }
  if (running_.count(id) == 0) return absl::OkStatus();  // a listener already ended it
  const WorkerRecord* rank0 = sessions_.Find(workers[0]);
  MAT_CHECK(rank0 != nullptr) << "the scheduler picked an unregistered worker " << workers[0];
  const std::string rendezvous = absl::StrCat(rank0->host, ":", rank0->rendezvous_port);
  spdlog::info("job {}: started on {} worker(s), rendezvous {}, attempt {}", id, world,
               rendezvous, attempt);
  for (int r = 0; r < world; ++r) {
    v1::CoordinatorMessage message;
    v1::Assign* assign = message.mutable_assign();
    assign->set_job_id(id);
    assign->set_rank(r);
    assign->set_world_size(world);
    *assign->mutable_spec() = job.spec;
    assign->set_rendezvous_address(rendezvous);
    assign->set_attempt(attempt);
    assign->set_resume(attempt > 0);
    sessions_.Send(workers[r], message);
  }
  return absl::OkStatus();
}

// ----- ending jobs -----

absl::Status Coordinator::EndJob(const std::string& job_id, v1::JobState state,
                                 const std::string& message, const std::string& except_worker) {
  MAT_RETURN_IF_ERROR(UpdateJobState(job_id, state, message));
  DetachJob(job_id, message, /*cancel=*/state != v1::JOB_STATE_SUCCEEDED, except_worker);
  Schedule();
  return absl::OkStatus();
}

void Coordinator::DetachJob(const std::string& job_id, const std::string& message, bool cancel,
                            const std::string& except_worker) {
  auto it = running_.find(job_id);
  if (it == running_.end()) return;
  const std::vector<RankState> ranks = std::move(it->second.ranks);
  running_.erase(it);
  for (size_t r = 0; r < ranks.size(); ++r) {
    const std::string& worker_id = ranks[r].worker_id;
    if (!sessions_.Runs(worker_id, job_id, static_cast<int>(r))) {
      continue;  // done, lost, or already moved on
    }
    sessions_.SetJob(worker_id, "", -1);
    if (cancel && worker_id != except_worker && !ranks[r].done) {
      sessions_.SendCancel(worker_id, job_id, message);
      // Not schedulable until the worker says the rank stopped (SessionManager::SetStopping):
      // the rank may be stuck in a collective with a peer that is gone, or the worker itself
      // may be gone without its session having ended yet.
      sessions_.SetStopping(worker_id, job_id, static_cast<int>(r));
    }
  }
}

void Coordinator::FailJob(const std::string& job_id, const std::string& message,
                          const std::string& except_worker) {
  EndOrKeepJob(job_id, v1::JOB_STATE_FAILED, message, except_worker);
}

void Coordinator::EndOrKeepJob(const std::string& job_id, v1::JobState state,
                               const std::string& message, const std::string& except_worker) {
  absl::Status st = EndJob(job_id, state, message, except_worker);
  if (st.ok()) return;
  KeepUnstoredEnd(job_id, state, message, st);
  DetachJob(job_id, message, /*cancel=*/state != v1::JOB_STATE_SUCCEEDED, except_worker);
  Schedule();
}

// ----- ends the store refused -----

void Coordinator::KeepUnstoredEnd(const std::string& job_id, v1::JobState state,
                                  const std::string& message, const absl::Status& refused) {
  spdlog::error("job {}: cannot store its end ({}{}{}): {}; it reads RUNNING until the store "
                "takes it (tried again every {} ms; /readyz is 503 meanwhile)",
                job_id, JobStateName(state), message.empty() ? "" : ": ", message,
                refused.ToString(), options_.heartbeat_interval_ms);
  unstored_ends_[job_id] = UnstoredEnd{state, message, refused};
}

void Coordinator::StoreUnstoredEnds() {
  for (auto it = unstored_ends_.begin(); it != unstored_ends_.end();) {
    const std::string& job_id = it->first;
    UnstoredEnd& end = it->second;
    absl::Status st = UpdateJobState(job_id, end.state, end.message);
    if (st.ok()) {
      spdlog::info("job {}: its end ({}) is stored now", job_id, JobStateName(end.state));
    } else if (absl::IsFailedPrecondition(st) || absl::IsNotFound(st)) {
      // Ended otherwise meanwhile (cancelled, or failed by a restarted coordinator's Recover).
      spdlog::info("job {}: its end ({}) is not stored: the job ended otherwise ({})", job_id,
                   JobStateName(end.state), st.ToString());
    } else {
      end.refused = st;
      ++it;
      continue;
    }
    it = unstored_ends_.erase(it);
  }
}

absl::Status Coordinator::UnstoredEnds() const {
  if (unstored_ends_.empty()) return absl::OkStatus();
  const auto& [job_id, end] = *unstored_ends_.begin();
  return absl::UnavailableError(absl::StrCat(
      "the state store refuses to record the end of ", unstored_ends_.size(), " job(s): job ",
      job_id, " ended ", JobStateName(end.state), " but the store refused it: ",
      end.refused.message(), " (the coordinator tries again every ",
      options_.heartbeat_interval_ms, " ms)"));
}

}  // namespace mat::coordinator
