// The Coordinator's WorkerService side, part 1 (coordinator.h): restart recovery, registration,
// sessions and heartbeats, the gang scheduler, and ending jobs. The job messages of a session
// (ModuleList, SpectraReport, MaskAck, Progress, RankDone) are in worker_sessions_reports.cc.
//
// Sections: helpers · recovery · registration · sessions · heartbeats · scheduling · ending jobs ·
// metrics.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/coordinator.h"
#include "api/job_spec.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"
#include "config/train_config.h"

namespace mat::coordinator {
namespace {

// Longest worker id a worker may bring along, characters.
constexpr size_t kMaxWorkerIdLength = 128;

// True for "cuda:N" with N one or more decimal digits.
bool IsCudaDevice(const std::string& device) {
  if (!absl::StartsWith(device, "cuda:") || device.size() == 5) return false;
  return std::all_of(device.begin() + 5, device.end(),
                     [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; });
}

// True when a worker training on `worker_device` can run a rank of a job of kind `job_device`
// ("cpu" | "cuda", JobSpec.resources.device).
bool DeviceMatches(const std::string& job_device, const std::string& worker_device) {
  if (job_device == "cpu") return worker_device == "cpu";
  if (job_device == "cuda") return IsCudaDevice(worker_device);
  return false;
}

absl::Status ValidateRegisterRequest(const v1::RegisterRequest& request) {
  const v1::WorkerCapabilities& caps = request.capabilities();
  if (caps.device().empty()) return absl::InvalidArgumentError("capabilities.device is empty");
  if (caps.device() != "cpu" && !IsCudaDevice(caps.device())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "capabilities.device must be \"cpu\" or \"cuda:N\", got '", caps.device(), "'"));
  }
  if (caps.memory_bytes() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capabilities.memory_bytes must be >= 0, got ", caps.memory_bytes()));
  }
  if (caps.host().empty()) return absl::InvalidArgumentError("capabilities.host is empty");
  if (caps.rendezvous_port() < 1 || caps.rendezvous_port() > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "capabilities.rendezvous_port must be in 1..65535, got ", caps.rendezvous_port()));
  }
  const std::string& id = request.worker_id();
  const bool plain = std::all_of(id.begin(), id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_' || c == '.';
  });
  if (!plain || id.size() > kMaxWorkerIdLength) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker_id '", id, "' must be at most ", kMaxWorkerIdLength,
                     " letters, digits, '-', '_' or '.'"));
  }
  return absl::OkStatus();
}

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

void Coordinator::Recover() {
  absl::StatusOr<std::vector<WorkerRecord>> workers = store_->ListWorkers();
  if (workers.ok()) {
    for (WorkerRecord& w : *workers) {
      std::string id = w.id;
      workers_.emplace(std::move(id), std::move(w));
    }
  } else {
    spdlog::error("cannot read the workers from the store: {}", workers.status().ToString());
  }
  // The ranks of a previous process's running jobs keep training and reconnect; RESTARTING
  // jobs are started again by the scheduler.
  std::string token;
  do {
    absl::StatusOr<JobPage> page = store_->ListJobs(kMaxPageSize, token, {v1::JOB_STATE_RUNNING});
    if (!page.ok()) {
      spdlog::error("cannot list the running jobs to recover: {}", page.status().ToString());
      return;
    }
    for (const JobRecord& job : page->jobs) KeepJob(job);
    token = page->next_page_token;
  } while (!token.empty());
}

void Coordinator::KeepJob(const JobRecord& job) {
  auto fail = [&](const std::string& why) {
    const std::string message =
        absl::StrCat("cannot continue the job after a coordinator restart: ", why);
    if (absl::Status st = UpdateJobState(job.id, v1::JOB_STATE_FAILED, message); !st.ok()) {
      spdlog::error("job {}: cannot fail it ({}): {}", job.id, message, st.ToString());
    }
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
  JobRuntime& runtime = jobs_[job.id];
  runtime.spec = job.spec;
  runtime.world_size = world;
  runtime.policy_config = *config;
  runtime.ranks.resize(world);
  runtime.attempt = job.attempt;
  runtime.mask_version = job.mask_version;
  runtime.restore_policy = true;
  runtime.attach_deadline_ms = NowMs() + 10 * options_.heartbeat_interval_ms;
  for (const AssignmentRecord& a : *assignments) {
    RankState& rank = runtime.ranks[a.rank];
    rank.worker_id = a.worker_id;
    rank.step = a.step;
    rank.acked_version = a.mask_version;
    rank.param_checksum = a.param_checksum;
    rank.done = !a.param_checksum.empty();  // only a finished rank stores its checksum
    rank.attached = false;
  }
  runtime.ranks[0].summary_json = job.summary_json;
  bool all_done = true;
  for (const RankState& rank : runtime.ranks) all_done = all_done && rank.done;
  if (all_done) {
    // Every rank finished before the previous process could record the end.
    spdlog::info("job {}: every rank had finished before the restart", job.id);
    RecordSummaryMetrics(job.id, job.summary_json);
    if (absl::Status st = EndJob(job.id, v1::JOB_STATE_SUCCEEDED, ""); !st.ok()) {
      spdlog::error("job {}: cannot store its success: {}", job.id, st.ToString());
      jobs_.erase(job.id);
    }
    return;
  }
  if (!stored_modules->empty()) {
    if (absl::Status st = CreatePolicy(job.id, runtime, ModuleInfos(*stored_modules)); !st.ok()) {
      jobs_.erase(job.id);
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
  absl::StatusOr<std::unique_ptr<policy::Policy>> created =
      policy::Policy::Create(job.policy_config, modules);
  if (!created.ok()) {
    return absl::Status(created.status().code(), absl::StrCat("ModuleList of job ", job_id, ": ",
                                                              created.status().message()));
  }
  // Not part of the policy's saved state: set again on every policy made for the job.
  MAT_RETURN_IF_ERROR(ApplyRandSchedule(job_id, job.spec, **created));
  job.modules = std::move(modules);
  job.policy = std::move(*created);
  return absl::OkStatus();
}

// ----- registration -----

absl::StatusOr<v1::RegisterReply> Coordinator::RegisterWorker(const v1::RegisterRequest& request) {
  MAT_RETURN_IF_ERROR(ValidateRegisterRequest(request));
  const v1::WorkerCapabilities& caps = request.capabilities();
  WorkerRecord record;
  record.id = request.worker_id();
  record.host = caps.host();
  record.device = caps.device();
  record.memory_bytes = caps.memory_bytes();
  record.rendezvous_port = caps.rendezvous_port();
  if (record.id.empty()) {
    MAT_ASSIGN_OR_RETURN(record.id, store_->CreateWorker(record));
  } else {
    MAT_RETURN_IF_ERROR(store_->UpsertWorker(record));
  }
  absl::StatusOr<WorkerRecord> stored = store_->GetWorker(record.id);
  workers_[record.id] = stored.ok() ? *stored : record;
  UpdateWorkerGauges();
  spdlog::info("worker {}: registered ({} on {}, rendezvous port {})", record.id, record.device,
               record.host, record.rendezvous_port);
  v1::RegisterReply reply;
  reply.set_worker_id(record.id);
  reply.set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  return reply;
}

absl::StatusOr<v1::ListWorkersReply> Coordinator::ListWorkers() {
  MAT_ASSIGN_OR_RETURN(std::vector<WorkerRecord> workers, store_->ListWorkers());
  const int64_t now_ms = NowMs();
  const int64_t now = Now();
  v1::ListWorkersReply reply;
  for (const WorkerRecord& w : workers) {
    v1::WorkerInfo* info = reply.add_workers();
    info->set_worker_id(w.id);
    info->mutable_capabilities()->set_device(w.device);
    info->mutable_capabilities()->set_memory_bytes(w.memory_bytes);
    info->mutable_capabilities()->set_host(w.host);
    info->mutable_capabilities()->set_rendezvous_port(w.rendezvous_port);
    info->set_registered_unix_seconds(w.registered_unix_seconds);
    auto session = sessions_.find(w.id);
    if (session == sessions_.end()) {
      info->set_state(v1::WORKER_STATE_DISCONNECTED);
      info->set_last_seen_unix_seconds(w.last_seen_unix_seconds);
      continue;
    }
    const Session& s = session->second;
    info->set_state(s.job_id.empty() ? v1::WORKER_STATE_IDLE : v1::WORKER_STATE_BUSY);
    if (!s.job_id.empty()) {
      info->set_job_id(s.job_id);
      info->set_rank(s.rank);
    }
    // Live: the store's copy may be up to kLastSeenPersistMs old.
    info->set_last_seen_unix_seconds(
        std::max(w.last_seen_unix_seconds, now - (now_ms - s.last_message_ms) / 1000));
  }
  return reply;
}

// ----- sessions -----

absl::Status Coordinator::OpenSession(const v1::WorkerMessage& first,
                                      std::shared_ptr<WorkerChannel> channel) {
  MAT_CHECK(channel != nullptr) << "OpenSession needs a channel";
  const std::string& id = first.worker_id();
  if (id.empty()) return absl::InvalidArgumentError("worker_id is empty");
  if (workers_.count(id) == 0) {
    return absl::NotFoundError(
        absl::StrCat("worker '", id, "' is not registered (call Register first)"));
  }
  if (sessions_.count(id) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", id, " already has an open session"));
  }
  Session& session = sessions_[id];
  session.channel = std::move(channel);
  session.last_message_ms = NowMs();
  PersistLastSeen(id, session, /*force=*/true);
  spdlog::info("worker {}: session opened", id);
  UpdateWorkerGauges();
  // A refused first message got its Reject; the session stays open either way.
  HandleWorkerMessage(first).IgnoreError();
  Schedule();
  return absl::OkStatus();
}

absl::Status Coordinator::HandleWorkerMessage(const v1::WorkerMessage& message) {
  const std::string& id = message.worker_id();
  if (id.empty()) return absl::InvalidArgumentError("worker_id is empty");
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    return absl::NotFoundError(absl::StrCat("worker ", id, " has no open session"));
  }
  handling_since_ = std::chrono::steady_clock::now();
  it->second.last_message_ms = NowMs();
  PersistLastSeen(id, it->second, /*force=*/false);
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
    SendTo(id, reject);
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
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("message from ", worker_id, " has no body"));
  }
}

void Coordinator::HandleHeartbeat(const std::string& worker_id, const v1::Heartbeat& heartbeat) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end()) return;
  const std::string current = it->second.job_id;
  std::set<std::string> told;  // one Cancel per job even when listed twice
  for (const std::string& job_id : heartbeat.job_ids()) {
    if (job_id.empty() || job_id == current || !told.insert(job_id).second) continue;
    // A rank kept across a coordinator restart: its worker is back.
    auto job = jobs_.find(job_id);
    if (current.empty() && job != jobs_.end()) {
      JobRuntime& runtime = job->second;
      bool attached = false;
      for (int r = 0; r < runtime.world_size && !attached; ++r) {
        RankState& rank = runtime.ranks[r];
        if (rank.worker_id != worker_id || rank.attached || rank.done) continue;
        rank.attached = true;
        attached = true;
        SetWorkerJob(worker_id, job_id, r);
        spdlog::info("job {}: rank {} re-attached to {}", job_id, r, worker_id);
      }
      if (attached) {
        bool all = true;
        for (const RankState& rank : runtime.ranks) all = all && (rank.attached || rank.done);
        if (all) runtime.attach_deadline_ms = 0;
        continue;
      }
    }
    SendCancel(worker_id, job_id,
               absl::StrCat(worker_id, " runs no rank of ", job_id,
                            " (the job finished or the rank was never assigned to it): stop it"));
  }
}

void Coordinator::CloseSession(const std::string& worker_id) {
  DropSession(worker_id, "session closed");
}

void Coordinator::DropSession(const std::string& worker_id, const std::string& why) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end()) return;
  const std::string job_id = it->second.job_id;
  const int rank = it->second.rank;
  sessions_.erase(it);
  if (options_.metrics != nullptr) {
    options_.metrics->worker_heartbeat_age_seconds.Remove({worker_id});
  }
  UpdateWorkerGauges();
  if (absl::Status st = store_->TouchWorker(worker_id); !st.ok()) {
    spdlog::warn("worker {}: cannot store last_seen: {}", worker_id, st.ToString());
  }
  spdlog::info("worker {}: session ended: {}", worker_id, why);
  if (!job_id.empty() && jobs_.count(job_id) != 0) {
    RestartJob(job_id, absl::StrCat(worker_id, " (rank ", rank, ") lost: ", why), worker_id);
  }
}

void Coordinator::RestartJob(const std::string& job_id, const std::string& why,
                             const std::string& except_worker) {
  if (jobs_.count(job_id) == 0) return;
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

void Coordinator::SendTo(const std::string& worker_id, const v1::CoordinatorMessage& message) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end()) return;
  // A copy: Send may not re-enter, but the map may change after it returns.
  std::shared_ptr<WorkerChannel> channel = it->second.channel;
  channel->Send(message);
}

void Coordinator::SendCancel(const std::string& worker_id, const std::string& job_id,
                             const std::string& reason) {
  v1::CoordinatorMessage message;
  message.mutable_cancel()->set_job_id(job_id);
  message.mutable_cancel()->set_reason(reason);
  SendTo(worker_id, message);
}

void Coordinator::SetWorkerJob(const std::string& worker_id, const std::string& job_id,
                               int rank) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end()) return;
  it->second.job_id = job_id;
  it->second.rank = job_id.empty() ? -1 : rank;
  PersistLastSeen(worker_id, it->second, /*force=*/true);
  UpdateWorkerGauges();
}

void Coordinator::PersistLastSeen(const std::string& worker_id, Session& session, bool force) {
  const int64_t now_ms = NowMs();
  if (!force && now_ms - session.last_persisted_ms < kLastSeenPersistMs) return;
  if (absl::Status st = store_->TouchWorker(worker_id); !st.ok()) {
    spdlog::warn("worker {}: cannot store last_seen: {}", worker_id, st.ToString());
    return;
  }
  session.last_persisted_ms = now_ms;
}

// ----- heartbeats -----

void Coordinator::CheckHeartbeats() {
  const int64_t now_ms = NowMs();
  const int64_t limit_ms = 3 * options_.heartbeat_interval_ms;
  std::vector<std::pair<std::string, int64_t>> lost;  // worker id, silence in ms
  for (const auto& [id, session] : sessions_) {
    const int64_t silence = now_ms - session.last_message_ms;
    if (silence > limit_ms) lost.emplace_back(id, silence);
  }
  for (const auto& [id, silence] : lost) {
    auto it = sessions_.find(id);
    if (it == sessions_.end()) continue;
    std::shared_ptr<WorkerChannel> channel = it->second.channel;
    const std::string why = absl::StrCat("no heartbeat for ", silence, " ms");
    DropSession(id, why);  // forgets the channel before it is closed
    channel->Close(absl::UnavailableError(why));
  }
  // Jobs kept across a restart whose workers did not all come back.
  std::vector<std::pair<std::string, std::string>> overdue;  // job id, why
  for (const auto& [id, job] : jobs_) {
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
}

// ----- scheduling -----

void Coordinator::Schedule() {
  if (scheduling_) {
    schedule_again_ = true;
    return;
  }
  scheduling_ = true;
  do {
    schedule_again_ = false;
    SchedulePass();
  } while (schedule_again_);
  scheduling_ = false;
}

void Coordinator::SchedulePass() {
  std::vector<std::string> idle;  // id order
  auto find_idle = [&] {
    idle.clear();
    for (const auto& [id, session] : sessions_) {
      if (session.job_id.empty() && workers_.count(id) != 0) idle.push_back(id);
    }
  };
  find_idle();
  // Restarting jobs first (they hold work already done), then the queue, each in submission
  // order.
  for (v1::JobState state : {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_QUEUED}) {
    std::string token;
    while (!idle.empty()) {
      absl::StatusOr<JobPage> page = store_->ListJobs(kMaxPageSize, token, {state});
      if (!page.ok()) {
        spdlog::error("scheduler: cannot list the {} jobs: {}", JobStateName(state),
                      page.status().ToString());
        return;
      }
      for (const JobRecord& job : page->jobs) {
        if (idle.empty()) return;
        const int world = job.spec.resources().workers();
        const std::string& device = job.spec.resources().device();
        std::vector<std::string> picked;
        for (const std::string& id : idle) {
          if (static_cast<int>(picked.size()) == world) break;
          if (DeviceMatches(device, workers_.at(id).device)) picked.push_back(id);
        }
        // Not enough workers for this one: later jobs may still fit (no head-of-line blocking).
        if (world < 1 || static_cast<int>(picked.size()) < world) continue;
        if (absl::Status st = StartJob(job, picked); !st.ok()) {
          spdlog::error("scheduler: job {} could not start: {}", job.id, st.ToString());
          return;  // a store error: try again at the next Schedule()
        }
        find_idle();  // the picked workers, unless the job failed to start or already ended
      }
      token = page->next_page_token;
      if (token.empty()) break;
    }
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
  // listener sees a consistent Coordinator.
  JobRuntime& runtime = jobs_[id];
  runtime.spec = job.spec;
  runtime.world_size = world;
  runtime.policy_config = *config;
  runtime.ranks.resize(world);
  runtime.attempt = attempt;
  if (attempt > 0) {
    // A restart: the ranks resume from a checkpoint and the policy from the store.
    runtime.mask_version = job.mask_version;
    runtime.restore_policy = true;
    if (!modules.empty()) {
      if (absl::Status st = CreatePolicy(id, runtime, std::move(modules)); !st.ok()) {
        jobs_.erase(id);
        return UpdateJobState(id, v1::JOB_STATE_FAILED, std::string(st.message()));
      }
    }
  }
  for (int r = 0; r < world; ++r) {
    runtime.ranks[r].worker_id = workers[r];
    SetWorkerJob(workers[r], id, r);
  }
  if (absl::Status st = UpdateJobState(id, v1::JOB_STATE_RUNNING); !st.ok()) {
    jobs_.erase(id);
    for (const std::string& w : workers) SetWorkerJob(w, "", -1);
    return st;
  }
  if (jobs_.count(id) == 0) return absl::OkStatus();  // a listener already ended it
  const WorkerRecord& rank0 = workers_.at(workers[0]);
  const std::string rendezvous = absl::StrCat(rank0.host, ":", rank0.rendezvous_port);
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
    SendTo(workers[r], message);
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
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  const std::vector<RankState> ranks = std::move(it->second.ranks);
  jobs_.erase(it);
  for (size_t r = 0; r < ranks.size(); ++r) {
    const std::string& worker_id = ranks[r].worker_id;
    auto session = sessions_.find(worker_id);
    if (session == sessions_.end() || session->second.job_id != job_id ||
        session->second.rank != static_cast<int>(r)) {
      continue;  // done, lost, or already moved on
    }
    if (cancel && worker_id != except_worker) SendCancel(worker_id, job_id, message);
    SetWorkerJob(worker_id, "", -1);
  }
}

void Coordinator::FailJob(const std::string& job_id, const std::string& message,
                          const std::string& except_worker) {
  absl::Status st = EndJob(job_id, v1::JOB_STATE_FAILED, message, except_worker);
  if (st.ok()) return;
  spdlog::error("job {}: cannot store its failure ({}): {}", job_id, message, st.ToString());
  DetachJob(job_id, message, /*cancel=*/true, except_worker);
  Schedule();
}

// ----- metrics -----

void Coordinator::UpdateWorkerGauges() {
  if (options_.metrics == nullptr) return;
  int64_t idle = 0, busy = 0, disconnected = 0;
  for (const auto& [id, worker] : workers_) {
    auto session = sessions_.find(id);
    if (session == sessions_.end()) {
      ++disconnected;
    } else if (session->second.job_id.empty()) {
      ++idle;
    } else {
      ++busy;
    }
  }
  const metrics::Gauge& gauge = options_.metrics->workers;
  gauge.Set({"idle"}, static_cast<double>(idle));
  gauge.Set({"busy"}, static_cast<double>(busy));
  gauge.Set({"disconnected"}, static_cast<double>(disconnected));
}

void Coordinator::NoteJobState(const std::string& job_id, v1::JobState state) {
  if (options_.metrics == nullptr) return;
  if (IsTerminalJobState(state)) {
    // A job moves into a terminal state once (the store refuses any later transition).
    live_job_states_.erase(job_id);
    ++terminal_job_counts_[state];
    finished_job_ms_[job_id] = NowMs();
  } else {
    live_job_states_[job_id] = state;
  }
  UpdateJobGauges();
}

void Coordinator::UpdateJobGauges() {
  if (options_.metrics == nullptr) return;
  std::map<v1::JobState, int64_t> counts = terminal_job_counts_;
  for (const auto& [id, state] : live_job_states_) ++counts[state];
  for (v1::JobState state :
       {v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED,
        v1::JOB_STATE_FAILED, v1::JOB_STATE_CANCELLED, v1::JOB_STATE_RESTARTING}) {
    std::string name = JobStateName(state);
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    options_.metrics->jobs.Set({name}, static_cast<double>(counts[state]));
  }
}

void Coordinator::RecordSummaryMetrics(const std::string& job_id,
                                       const std::string& summary_json) {
  if (options_.metrics == nullptr || summary_json.empty()) return;
  const nlohmann::json summary = nlohmann::json::parse(summary_json, nullptr, false);
  if (!summary.is_object()) return;
  auto number = [](const nlohmann::json& v) {
    return v.is_number() ? v.get<double>() : std::numeric_limits<double>::quiet_NaN();
  };
  if (summary.contains("flops_by_phase") && summary["flops_by_phase"].is_object()) {
    for (const auto& [phase, value] : summary["flops_by_phase"].items()) {
      const double v = number(value);
      if (std::isfinite(v) && v >= 0) {
        options_.metrics->job_flops_by_phase_total.SetIfGreater({job_id, phase}, v);
      }
    }
  }
  if (summary.contains("flops_saved")) {
    const double saved = number(summary["flops_saved"]);
    if (std::isfinite(saved) && saved >= 0) {
      options_.metrics->job_flops_saved_total.SetIfGreater({job_id}, saved);
    }
  }
}

void Coordinator::RefreshMetrics() {
  if (options_.metrics == nullptr) return;
  const int64_t now_ms = NowMs();
  for (const auto& [id, session] : sessions_) {
    options_.metrics->worker_heartbeat_age_seconds.Set(
        {id}, static_cast<double>(now_ms - session.last_message_ms) / 1000.0);
  }
  const int64_t retention_ms = options_.metrics_retention_seconds * 1000;
  for (auto it = finished_job_ms_.begin(); it != finished_job_ms_.end();) {
    if (now_ms - it->second >= retention_ms) {
      options_.metrics->registry.RemoveSeriesWithLabel("mat_job", it->first);
      it = finished_job_ms_.erase(it);
    } else {
      ++it;
    }
  }
}

const policy::Policy* Coordinator::JobPolicy(const std::string& job_id) const {
  auto it = jobs_.find(job_id);
  return it == jobs_.end() ? nullptr : it->second.policy.get();
}

}  // namespace mat::coordinator
