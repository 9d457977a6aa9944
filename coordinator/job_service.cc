#include "coordinator/job_service.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <optional>
#include <utility>

#include <boost/asio/post.hpp>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/artifact_store.h"
#include "coordinator/auth.h"
#include "api/grpc_status.h"
#include "coordinator/run_on_loop.h"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace {

// One WatchJob call. Its state (below the marker) is touched on the loop only; gRPC's callbacks
// post there. It deletes itself on the loop after OnDone, gRPC's last callback. `allowed` runs
// on the loop first: a refusal ends the call with it.
class WatchJobReactor final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  WatchJobReactor(boost::asio::io_context& loop, Coordinator& coordinator, std::string job_id,
                  size_t max_queued, std::function<absl::Status()> allowed)
      : loop_(loop), coordinator_(coordinator), job_id_(std::move(job_id)),
        max_queued_(max_queued), allowed_(std::move(allowed)) {
    boost::asio::post(loop_, [this] { Start(); });
  }

  void OnWriteDone(bool ok) override {
    boost::asio::post(loop_, [this, ok] {
      writing_ = false;
      if (!ok) client_gone_ = true;  // cancelled, or the connection broke
      Pump();
    });
  }

  void OnCancel() override {
    boost::asio::post(loop_, [this] {
      client_gone_ = true;
      Pump();
    });
  }

  void OnDone() override {
    boost::asio::post(loop_, [this] {
      Unwatch();  // already done on every path that finishes; kept as a safety net
      delete this;
    });
  }

 private:
  void Start() {
    if (absl::Status allowed = allowed_(); !allowed.ok()) {
      FinishOnce(api::ToGrpcStatus(allowed));
      return;
    }
    absl::StatusOr<WatchId> id = coordinator_.WatchJob(
        job_id_, [this](const v1::JobEvent& event, bool last) { Enqueue(event, last); });
    if (!id.ok()) {
      FinishOnce(api::ToGrpcStatus(id.status()));
      return;
    }
    if (!ended_) watch_id_ = *id;  // an already finished job leaves no subscription
    started_ = true;
    Pump();
  }

  void Enqueue(const v1::JobEvent& event, bool last) {
    if (finished_) return;
    // Progress and mask events, which the next one supersedes, are dropped first; evaluations
    // only when the queue holds 4 times as many events; state changes never.
    const size_t bound = event.has_evaluation() ? 4 * max_queued_ : max_queued_;
    if (queue_.size() >= bound && !event.has_state()) {
      if (dropped_++ == 0) {
        spdlog::warn("job {}: a WatchJob client reads too slowly; dropping its progress and mask "
                     "events (and evaluations past 4 x its queue)",
                     job_id_);
      }
      return;
    }
    queue_.push_back(event);
    if (last) ended_ = true;
    if (started_) Pump();  // inside Start's WatchJob call the subscription id is not known yet
  }

  // Starts the next write, or finishes when there is nothing more to send. At most one write is
  // in flight, and Finish never overlaps a write.
  void Pump() {
    if (finished_ || writing_) return;
    if (client_gone_) {
      FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "watch cancelled"));
      return;
    }
    if (!queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      StartWrite(&current_);
      return;
    }
    if (ended_) FinishOnce(grpc::Status::OK);
  }

  void FinishOnce(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Unwatch();
    queue_.clear();
    Finish(status);
  }

  void Unwatch() {
    if (watch_id_ != 0) coordinator_.UnwatchJob(watch_id_);
    watch_id_ = 0;
  }

  boost::asio::io_context& loop_;
  Coordinator& coordinator_;
  const std::string job_id_;
  const size_t max_queued_;
  const std::function<absl::Status()> allowed_;
  // ----- loop only -----
  WatchId watch_id_ = 0;  // 0: not subscribed
  bool started_ = false;  // Start has returned from Coordinator::WatchJob
  std::deque<v1::JobEvent> queue_;
  v1::JobEvent current_;  // the message of the write in flight
  bool writing_ = false;
  bool ended_ = false;        // the terminal event is queued (or sent)
  bool client_gone_ = false;  // cancelled or a write failed
  bool finished_ = false;
  int64_t dropped_ = 0;  // events not queued because the client was too slow
};

// A WatchJob refused before it started: finishes with the refusal at once.
class RefusedWatchReactor final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  explicit RefusedWatchReactor(const absl::Status& status) { Finish(api::ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

// Finishes a unary call with `status` on the calling (gRPC) thread.
grpc::ServerUnaryReactor* Refuse(grpc::CallbackServerContext* context,
                                 const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(api::ToGrpcStatus(status));
  return reactor;
}

}  // namespace

JobService::JobService(boost::asio::io_context& loop, Coordinator& coordinator,
                       JobServiceOptions options)
    : loop_(loop), coordinator_(coordinator), options_(options) {}

grpc::ServerUnaryReactor* JobService::SubmitJob(grpc::CallbackServerContext* context,
                                                const v1::SubmitJobRequest* request,
                                                v1::SubmitJobReply* reply) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return Refuse(context, auth);
  }
  return RunOnLoop(loop_, context, reply,
                   [this, request,
                    caller = CallerOf(*context)]() -> absl::StatusOr<v1::SubmitJobReply> {
                     // A replay reads the replayed job's decisions (and its errors its state).
                     // An unknown job is the spec's error (SubmitJob names the field).
                     if (absl::Status owner = CheckOwner(
                             caller, request->spec().policy().rand_schedule_job(), "replay");
                         !owner.ok() && !absl::IsNotFound(owner)) {
                       return owner;
                     }
                     return coordinator_.SubmitJob(request->client_request_id(),
                                                   request->spec(), caller.client);
                   });
}

grpc::ServerUnaryReactor* JobService::GetJob(grpc::CallbackServerContext* context,
                                             const v1::GetJobRequest* request,
                                             v1::GetJobReply* reply) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return Refuse(context, auth);
  }
  return RunOnLoop(loop_, context, reply,
                   [this, request,
                    caller = CallerOf(*context)]() -> absl::StatusOr<v1::GetJobReply> {
    MAT_RETURN_IF_ERROR(CheckOwner(caller, request->job_id(), "read"));
    absl::StatusOr<v1::GetJobReply> job = coordinator_.GetJob(request->job_id());
    if (job.ok() && options_.artifacts != nullptr) {
      job->mutable_job()->set_artifact_bytes(options_.artifacts->JobBytes(job->job().job_id()));
    }
    return job;
  });
}

grpc::ServerUnaryReactor* JobService::ListJobs(grpc::CallbackServerContext* context,
                                               const v1::ListJobsRequest* request,
                                               v1::ListJobsReply* reply) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return Refuse(context, auth);
  }
  const Caller caller = CallerOf(*context);
  std::optional<std::string> only;  // a restricted caller lists its own jobs
  if (caller.restricted) only = caller.client;
  return RunOnLoop(loop_, context, reply, [this, request, only = std::move(only)] {
    absl::StatusOr<v1::ListJobsReply> jobs = coordinator_.ListJobs(*request, only);
    if (jobs.ok() && options_.artifacts != nullptr) {
      for (v1::Job& job : *jobs->mutable_jobs()) {
        job.set_artifact_bytes(options_.artifacts->JobBytes(job.job_id()));
      }
    }
    return jobs;
  });
}

grpc::ServerUnaryReactor* JobService::CancelJob(grpc::CallbackServerContext* context,
                                                const v1::CancelJobRequest* request,
                                                v1::CancelJobReply* reply) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return Refuse(context, auth);
  }
  return RunOnLoop(
      loop_, context, reply,
      [this, request, caller = CallerOf(*context)]() -> absl::StatusOr<v1::CancelJobReply> {
        MAT_RETURN_IF_ERROR(CheckOwner(caller, request->job_id(), "cancel"));
        return coordinator_.CancelJob(request->job_id(), request->reason());
      });
}

grpc::ServerUnaryReactor* JobService::DeleteJob(grpc::CallbackServerContext* context,
                                                const v1::DeleteJobRequest* request,
                                                v1::DeleteJobReply* reply) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return Refuse(context, auth);
  }
  auto delete_state = [this, request, caller = CallerOf(*context)] {
    MAT_RETURN_IF_ERROR(CheckOwner(caller, request->job_id(), "delete"));
    return coordinator_.DeleteJob(request->job_id());
  };
  ArtifactStore* store = options_.artifacts;
  if (store == nullptr) {
    return RunOnLoop(loop_, context, reply,
                     [delete_state]() -> absl::StatusOr<v1::DeleteJobReply> {
                       MAT_RETURN_IF_ERROR(delete_state());
                       return v1::DeleteJobReply();
                     });
  }
  // Uploads are checked on the loop and written on the I/O thread in order: a piece that passed
  // its check before the delete is written before the files go, and none passes after it.
  return CheckOnLoopThenRun(loop_, store->executor().get_executor(), context, reply,
                            delete_state,
                            [store, request]() -> absl::StatusOr<v1::DeleteJobReply> {
                              MAT_ASSIGN_OR_RETURN(const int64_t freed,
                                                   store->RemoveJob(request->job_id()));
                              v1::DeleteJobReply deleted;
                              deleted.set_artifact_bytes_freed(freed);
                              return deleted;
                            });
}

grpc::ServerWriteReactor<v1::JobEvent>* JobService::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return new RefusedWatchReactor(auth);
  }
  return new WatchJobReactor(
      loop_, coordinator_, request->job_id(),
      static_cast<size_t>(std::max(1, options_.max_queued_watch_events)),
      [this, caller = CallerOf(*context), job_id = request->job_id()] {
        return CheckOwner(caller, job_id, "read");
      });
}

grpc::ServerUnaryReactor* JobService::GetSpectra(grpc::CallbackServerContext* context,
                                                 const v1::GetSpectraRequest* request,
                                                 v1::GetSpectraReply* reply) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return Refuse(context, auth);
  }
  return RunOnLoop(loop_, context, reply,
                   [this, request,
                    caller = CallerOf(*context)]() -> absl::StatusOr<v1::GetSpectraReply> {
                     MAT_RETURN_IF_ERROR(CheckOwner(caller, request->job_id(), "read"));
                     return coordinator_.GetSpectra(*request);
                   });
}

grpc::ServerUnaryReactor* JobService::ListWorkers(grpc::CallbackServerContext* context,
                                                  const v1::ListWorkersRequest* request,
                                                  v1::ListWorkersReply* reply) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return Refuse(context, auth);
  }
  return RunOnLoop(loop_, context, reply, [this] { return coordinator_.ListWorkers(); });
}

grpc::ServerUnaryReactor* JobService::DrainWorker(grpc::CallbackServerContext* context,
                                                  const v1::DrainWorkerRequest* request,
                                                  v1::DrainWorkerReply* reply) {
  if (absl::Status refused = CheckAdmin(*context, "draining a worker"); !refused.ok()) {
    return Refuse(context, refused);
  }
  return RunOnLoop(loop_, context, reply,
                   [this, request] { return coordinator_.DrainWorker(*request); });
}

grpc::ServerUnaryReactor* JobService::UndrainWorker(grpc::CallbackServerContext* context,
                                                    const v1::UndrainWorkerRequest* request,
                                                    v1::UndrainWorkerReply* reply) {
  if (absl::Status refused = CheckAdmin(*context, "undraining a worker"); !refused.ok()) {
    return Refuse(context, refused);
  }
  return RunOnLoop(loop_, context, reply,
                   [this, request] { return coordinator_.UndrainWorker(*request); });
}

grpc::ServerUnaryReactor* JobService::GetJobLogs(grpc::CallbackServerContext* context,
                                                 const v1::GetJobLogsRequest* request,
                                                 v1::GetJobLogsReply* reply) {
  if (absl::Status auth = CheckBearer(*context, options_.bearer_tokens); !auth.ok()) {
    return Refuse(context, auth);
  }
  return RunOnLoop(loop_, context, reply,
                   [this, request,
                    caller = CallerOf(*context)]() -> absl::StatusOr<v1::GetJobLogsReply> {
                     MAT_RETURN_IF_ERROR(CheckOwner(caller, request->job_id(), "read"));
                     return coordinator_.GetJobLogs(*request);
                   });
}

absl::Status JobService::CheckArtifactCall(const grpc::CallbackServerContext& context) const {
  MAT_RETURN_IF_ERROR(CheckBearer(context, options_.bearer_tokens));
  if (options_.artifacts == nullptr) {
    return absl::UnimplementedError("this coordinator keeps no artifacts");
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* JobService::ListArtifacts(grpc::CallbackServerContext* context,
                                                    const v1::ListArtifactsRequest* request,
                                                    v1::ListArtifactsReply* reply) {
  if (absl::Status refused = CheckArtifactCall(*context); !refused.ok()) {
    return Refuse(context, refused);
  }
  ArtifactStore* store = options_.artifacts;
  // On the loop: NOT_FOUND for an unknown job, rather than an empty list.
  return CheckOnLoopThenRun(
      loop_, store->executor().get_executor(), context, reply,
      [this, request, caller = CallerOf(*context)] {
        MAT_RETURN_IF_ERROR(CheckOwner(caller, request->job_id(), "read"));
        return coordinator_.GetJob(request->job_id()).status();
      },
      [store, request] { return store->List(request->job_id()); });
}

grpc::ServerUnaryReactor* JobService::ReadArtifact(grpc::CallbackServerContext* context,
                                                   const v1::ReadArtifactRequest* request,
                                                   v1::ReadArtifactReply* reply) {
  if (absl::Status refused = CheckArtifactCall(*context); !refused.ok()) {
    return Refuse(context, refused);
  }
  ArtifactStore* store = options_.artifacts;
  if (Caller caller = CallerOf(*context); caller.restricted) {
    // Whose job it is is known on the loop only: each piece passes there first.
    return CheckOnLoopThenRun(
        loop_, store->executor().get_executor(), context, reply,
        [this, request, caller = std::move(caller)] {
          return CheckOwner(caller, request->job_id(), "read");
        },
        [store, request] { return store->Read(*request); });
  }
  // Straight to the I/O thread: the store names what it does not hold (NOT_FOUND), so a
  // download's pieces never wait for, or add work to, the coordinator loop.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  boost::asio::post(store->executor(), [store, request, reply, reactor] {
    absl::StatusOr<v1::ReadArtifactReply> piece = store->Read(*request);
    if (piece.ok()) *reply = *std::move(piece);
    reactor->Finish(api::ToGrpcStatus(piece.status()));
  });
  return reactor;
}

absl::Status JobService::CheckAdmin(const grpc::CallbackServerContext& context,
                                    const char* action) const {
  MAT_RETURN_IF_ERROR(CheckBearer(context, options_.bearer_tokens));
  if (options_.admin_tokens != nullptr && !BearerIn(context, options_.admin_tokens)) {
    return absl::PermissionDeniedError(absl::StrCat(
        action, " needs an admin token (the coordinator's --admin-token-file)"));
  }
  return absl::OkStatus();
}

JobService::Caller JobService::CallerOf(const grpc::CallbackServerContext& context) const {
  Caller caller;
  caller.restricted =
      options_.admin_tokens != nullptr && !BearerIn(context, options_.admin_tokens);
  caller.client = ClientIdentity(context, options_.bearer_tokens);
  return caller;
}

absl::Status JobService::CheckOwner(const Caller& caller, const std::string& job_id,
                                    const char* action) {
  if (!caller.restricted || job_id.empty()) return absl::OkStatus();
  MAT_ASSIGN_OR_RETURN(JobRecord job, coordinator_.store().GetJob(job_id));
  if (job.client == caller.client) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      "job ", job.id, " was submitted by another client: only its submitter or an admin token "
      "(the coordinator's --admin-token-file) may ", action, " it"));
}

}  // namespace mat::coordinator
