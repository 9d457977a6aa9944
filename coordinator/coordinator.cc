// The Coordinator facade (coordinator.h): construction and the JobService side, which delegates
// to the JobManager (the reads, watchers and state changes) and adds what needs the running
// jobs: scheduling after a submit, a rank's live acknowledgement, the ranks a cancel stops.
// The WorkerService side is in worker_sessions.cc and worker_sessions_reports.cc.
#include "coordinator/coordinator.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace {

JobStore& OpenStore(const std::unique_ptr<JobStore>& store) {
  MAT_CHECK(store != nullptr) << "Coordinator needs an open JobStore";
  return *store;
}

}  // namespace

Coordinator::Coordinator(std::unique_ptr<JobStore> store, CoordinatorOptions options)
    : store_(std::move(store)),
      options_(std::move(options)),
      clock_(options_.now_unix_seconds, options_.now_ms),
      jobs_(OpenStore(store_), clock_, options_.metrics,
            JobManagerOptions{options_.spec_limits, options_.max_jobs_per_client,
                              options_.metrics_retention_seconds}),
      sessions_(*store_, clock_, options_.metrics, options_.heartbeat_interval_ms),
      scheduler_(
          *store_, [this] { return sessions_.Idle(); }, [this] { return sessions_.InService(); },
          [this](const JobRecord& job, const std::vector<std::string>& workers) {
            return StartJob(job, workers);
          }) {}

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(std::unique_ptr<JobStore> store,
                                                                 CoordinatorOptions options) {
  std::unique_ptr<Coordinator> coordinator(new Coordinator(std::move(store), std::move(options)));
  MAT_RETURN_IF_ERROR(coordinator->Recover());
  return coordinator;
}

Coordinator::~Coordinator() = default;

// ----- JobService -----

absl::StatusOr<v1::SubmitJobReply> Coordinator::SubmitJob(const std::string& client_request_id,
                                                          const v1::JobSpec& spec,
                                                          const std::string& client) {
  MAT_ASSIGN_OR_RETURN(v1::SubmitJobReply reply, jobs_.Submit(client_request_id, spec, client));
  if (reply.created()) Schedule();
  return reply;
}

absl::StatusOr<v1::GetJobReply> Coordinator::GetJob(const std::string& job_id) {
  MAT_ASSIGN_OR_RETURN(v1::GetJobReply reply, jobs_.Get(job_id));
  const v1::JobState state = reply.job().state();
  if (state == v1::JOB_STATE_QUEUED || state == v1::JOB_STATE_RESTARTING) {
    MAT_ASSIGN_OR_RETURN(v1::ListWorkersReply workers, sessions_.List());
    const v1::ResourceSpec& resources = reply.job().spec().resources();
    MAT_ASSIGN_OR_RETURN(const std::vector<std::string> ahead,
                         scheduler_.JobsAhead(job_id, state, resources.device()));
    reply.set_waiting(DescribeWait(resources.workers(), resources.device(),
                                   {workers.workers().begin(), workers.workers().end()}, ahead));
  }
  // A running job's live state (mask acks are kept in memory between Progress messages).
  auto live = running_.find(job_id);
  if (live == running_.end()) return reply;
  for (v1::RankStatus& rank : *reply.mutable_ranks()) {
    if (rank.rank() < 0 || rank.rank() >= live->second.world_size) continue;
    const RankState& state = live->second.ranks[rank.rank()];
    rank.set_mask_version(std::max(rank.mask_version(), state.acked_version));
  }
  return reply;
}

absl::StatusOr<v1::ListJobsReply> Coordinator::ListJobs(const v1::ListJobsRequest& request,
                                                        const std::optional<std::string>& client) {
  return jobs_.List(request, client);
}

absl::StatusOr<v1::CancelJobReply> Coordinator::CancelJob(const std::string& job_id,
                                                          const std::string& reason) {
  MAT_RETURN_IF_ERROR(jobs_.CheckCancellable(job_id));
  // Also tells the job's running ranks to stop and frees their workers.
  MAT_RETURN_IF_ERROR(EndJob(job_id, v1::JOB_STATE_CANCELLED,
                             reason.empty() ? "cancelled by request" : reason));
  v1::CancelJobReply reply;
  reply.set_state(v1::JOB_STATE_CANCELLED);
  return reply;
}

absl::Status Coordinator::DeleteJob(const std::string& job_id) {
  MAT_RETURN_IF_ERROR(jobs_.Delete(job_id));
  spdlog::info("job {}: deleted", job_id);
  return absl::OkStatus();
}

std::vector<std::string> Coordinator::DeleteExpiredJobs(int limit, bool* more) {
  std::vector<std::string> deleted;
  if (more != nullptr) *more = false;
  if (options_.job_retention_seconds <= 0) return deleted;
  absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> expired =
      store_->ListFinishedBefore(options_.job_retention_seconds, limit, retention_after_seq_);
  if (!expired.ok()) {
    spdlog::error("job retention: cannot list finished jobs: {}", expired.status().ToString());
    return deleted;
  }
  // A full round goes on after its last job next time (past jobs that must wait); a short one
  // starts again from the first.
  const bool full = static_cast<int>(expired->size()) == limit;
  retention_after_seq_ = full ? expired->back().first : 0;
  if (more != nullptr) *more = full;
  for (const auto& [seq, job_id] : *expired) {
    const absl::Status s = jobs_.Delete(job_id);
    if (s.code() == absl::StatusCode::kFailedPrecondition) continue;  // replayed: later
    if (!s.ok()) {
      spdlog::error("job retention: cannot delete {}: {}", job_id, s.ToString());
      retention_after_seq_ = 0;
      if (more != nullptr) *more = false;
      break;
    }
    spdlog::info("job {}: deleted, finished more than {} s ago (--job-retention-days)", job_id,
                 options_.job_retention_seconds);
    deleted.push_back(job_id);
  }
  return deleted;
}

absl::StatusOr<v1::DrainWorkerReply> Coordinator::DrainWorker(
    const v1::DrainWorkerRequest& request) {
  const std::string& id = request.worker_id();
  const std::string reason = request.reason().empty() ? "drained" : request.reason();
  MAT_RETURN_IF_ERROR(sessions_.SetDraining(id, reason));
  // The rank it runs and has not finished (a finished one waits for its job's other ranks):
  // its session's; without a session, the one a restarted coordinator keeps for it to come back.
  const bool connected = sessions_.HasSession(id);
  const std::string session_job = sessions_.JobOf(id);
  std::string job;
  int rank = -1;
  for (const auto& [job_id, live] : running_) {
    if (connected && job_id != session_job) continue;
    for (int r = 0; r < live.world_size; ++r) {
      const RankState& state = live.ranks[r];
      if (state.worker_id == id && !state.done) {
        job = job_id;
        rank = r;
      }
    }
  }
  spdlog::info("worker {}: draining ({}){}{}", id, reason,
               connected ? "" : "; not connected: told to stop when it comes back",
               job.empty()     ? ""
               : request.now() ? absl::StrCat("; stops its rank of ", job, " now")
                               : absl::StrCat("; its rank of ", job, " runs to the job's end"));
  if (request.now() && !job.empty()) {
    RestartJob(job, absl::StrCat(id, " (rank ", rank, ") drained: ", reason), "");
  }
  Schedule();  // an idle worker is told to stop now
  v1::DrainWorkerReply reply;
  MAT_ASSIGN_OR_RETURN(*reply.mutable_worker(), WorkerInfoOf(id));
  return reply;
}

absl::StatusOr<v1::WorkerInfo> Coordinator::WorkerInfoOf(const std::string& worker_id) {
  MAT_ASSIGN_OR_RETURN(v1::ListWorkersReply workers, sessions_.List());
  for (const v1::WorkerInfo& w : workers.workers()) {
    if (w.worker_id() == worker_id) return w;
  }
  return v1::WorkerInfo();
}

absl::StatusOr<v1::UndrainWorkerReply> Coordinator::UndrainWorker(
    const v1::UndrainWorkerRequest& request) {
  const std::string& id = request.worker_id();
  MAT_RETURN_IF_ERROR(sessions_.Undrain(id));
  spdlog::info("worker {}: drain ended, in service again", id);
  Schedule();  // it may take a queued job now
  v1::UndrainWorkerReply reply;
  MAT_ASSIGN_OR_RETURN(*reply.mutable_worker(), WorkerInfoOf(id));
  return reply;
}

absl::StatusOr<v1::GetJobLogsReply> Coordinator::GetJobLogs(
    const v1::GetJobLogsRequest& request) {
  MAT_ASSIGN_OR_RETURN(v1::GetJobLogsReply reply, jobs_.GetLogs(request));
  reply.set_log_complete(LogComplete(request.job_id(), reply.state()));  // on this loop turn
  return reply;
}

bool Coordinator::LogComplete(const std::string& job_id, v1::JobState state) {
  if (!IsTerminalJobState(state) || sessions_.Holds(job_id)) return false;
  if (clock_.NowMs() > recovered_ms_ + 10 * options_.heartbeat_interval_ms) return true;
  absl::StatusOr<JobRecord> job = store_->GetJob(job_id);
  if (!job.ok()) return false;
  if (job->updated_unix_seconds >= recovered_unix_seconds_) return true;  // ended by this process
  absl::StatusOr<std::vector<AssignmentRecord>> ranks = store_->ListAssignments(job_id);
  if (!ranks.ok()) return false;
  // One row per rank (its newest assignment): an unfinished one may still send lines.
  return std::all_of(ranks->begin(), ranks->end(),
                     [](const AssignmentRecord& rank) { return rank.finished(); });
}

absl::StatusOr<v1::GetSpectraReply> Coordinator::GetSpectra(
    const v1::GetSpectraRequest& request) {
  return jobs_.GetSpectra(request);
}

absl::StatusOr<WatchId> Coordinator::WatchJob(const std::string& job_id,
                                              JobEventListener listener) {
  return jobs_.Watch(job_id, std::move(listener));
}

void Coordinator::UnwatchJob(WatchId id) { jobs_.Unwatch(id); }

int Coordinator::WatcherCount(const std::string& job_id) const {
  return jobs_.WatcherCount(job_id);
}

absl::Status Coordinator::UpdateJobState(const std::string& job_id, v1::JobState state,
                                         const std::string& error_message) {
  return jobs_.UpdateState(job_id, state, error_message);
}

void Coordinator::PublishJobEvent(v1::JobEvent event) { jobs_.PublishEvent(std::move(event)); }

// ----- metrics -----

void Coordinator::RefreshMetrics() {
  if (options_.metrics == nullptr) return;
  sessions_.RefreshHeartbeatAges();
  jobs_.ExpireFinishedSeries();
}

const policy::Policy* Coordinator::JobPolicy(const std::string& job_id) const {
  auto it = running_.find(job_id);
  return it == running_.end() ? nullptr : it->second.masks->policy();
}

}  // namespace mat::coordinator
