#include "coordinator/worker_service.h"

#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <boost/asio/post.hpp>

#include "absl/strings/str_cat.h"
#include "api/artifacts.h"
#include "api/grpc_status.h"
#include "common/status.h"
#include "coordinator/artifact_store.h"
#include "coordinator/auth.h"
#include "coordinator/run_on_loop.h"
#include "spdlog/spdlog.h"

namespace mat::coordinator {

// The WorkerChannel of one Session stream, held by the Coordinator (shared) and by the reactor.
// Everything here runs on the loop (WorkerChannel's contract), so the reactor pointer needs no
// lock: the reactor clears it on the loop just before it deletes itself, and a channel the
// Coordinator still holds afterwards drops what it is given.
class WorkerSessionChannel final : public WorkerChannel {
 public:
  WorkerSessionChannel(boost::asio::io_context& loop, WorkerSessionReactor* reactor)
      : loop_(loop), reactor_(reactor) {}

  void Send(const v1::CoordinatorMessage& message) override;
  void Close(const absl::Status& status) override;
  void Detach() { reactor_ = nullptr; }

 private:
  boost::asio::io_context& loop_;
  WorkerSessionReactor* reactor_;  // null once the stream is gone
};

// One Session call. gRPC's callbacks only post to the loop; every member below the marker is
// touched on the loop only. It deletes itself on the loop after OnDone, gRPC's last callback
// (everything it posted before is ahead of that in the loop's FIFO queue).
class WorkerSessionReactor final
    : public grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage> {
 public:
  // `secret`: the call's worker secret, checked against the worker the first message names.
  WorkerSessionReactor(WorkerService& service, std::string secret)
      : service_(service),
        channel_(std::make_shared<WorkerSessionChannel>(service.loop_, this)),
        secret_(std::move(secret)) {
    // Start is queued before the read below can complete, so it runs first.
    boost::asio::post(service_.loop_, [this] { Start(); });
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    boost::asio::post(service_.loop_, [this, ok] { HandleRead(ok); });
  }

  void OnWriteDone(bool ok) override {
    boost::asio::post(service_.loop_, [this, ok] {
      writing_ = false;
      if (!ok) {  // cancelled, or the connection broke
        queue_.clear();
        StreamEnded(grpc::Status(grpc::StatusCode::CANCELLED, "session write failed"));
      }
      Pump();
    });
  }

  void OnCancel() override {
    boost::asio::post(service_.loop_, [this] {
      queue_.clear();  // nobody reads them any more
      StreamEnded(grpc::Status(grpc::StatusCode::CANCELLED, "session cancelled"));
    });
  }

  void OnDone() override {
    boost::asio::post(service_.loop_, [this] {
      channel_->Detach();
      service_.sessions_.erase(this);
      delete this;
    });
  }

  // ----- from the channel (loop) -----

  void Enqueue(const v1::CoordinatorMessage& message) {
    if (ending_) return;  // the stream is ending; the Coordinator is told (or was) separately
    if (queue_.size() >= static_cast<size_t>(service_.options_.max_queued_session_messages)) {
      spdlog::warn("worker {}: {} messages wait for a session that does not read; dropping it",
                   worker_id_, queue_.size());
      queue_.clear();
      if (open_) {
        open_ = false;
        // Not from inside this Send: the Coordinator is in the middle of a call. Posted before
        // Finish, so it runs before a new session of this worker could open.
        boost::asio::post(service_.loop_,
                          [&coordinator = service_.coordinator_, id = worker_id_] {
                            coordinator.CloseSession(id);
                          });
      }
      End(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                       "session dropped: the worker does not read its messages"));
      return;
    }
    queue_.push_back(message);
    Pump();
  }

  void CloseByCoordinator(const absl::Status& status) {
    open_ = false;  // the Coordinator has forgotten the channel
    End(api::ToGrpcStatus(status));
  }

  // BeginShutdown: end without CloseSession, after the queued messages.
  void EndForShutdown() {
    open_ = false;
    End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"));
  }

 private:
  void Start() {
    service_.sessions_.insert(this);
    if (service_.shutting_down_.load()) EndForShutdown();
  }

  void HandleRead(bool ok) {
    if (!ok) {  // the worker half-closed, or the call was cancelled or broke
      StreamEnded(grpc::Status::OK);
      return;
    }
    if (ending_) return;  // no further reads once the stream is ending
    Coordinator& coordinator = service_.coordinator_;
    if (!opened_) {
      opened_ = true;
      worker_id_ = in_.worker_id();
      absl::Status status = coordinator.AuthenticateWorker(worker_id_, secret_);
      if (!status.ok()) {
        spdlog::warn("refused a session for worker '{}': {}", worker_id_.substr(0, 64),
                     std::string(status.message()));
        End(api::ToGrpcStatus(status));
        return;
      }
      open_ = true;  // before the call: the Coordinator may Close the channel from inside it
      status = coordinator.OpenSession(in_, channel_);
      if (!status.ok()) {
        open_ = false;
        End(api::ToGrpcStatus(status));
        return;
      }
    } else if (in_.worker_id() != worker_id_) {
      // A session speaks for the worker that opened it: a message in another worker's name (a
      // Leaving that would end its session and restart its job) ends this session instead.
      spdlog::warn("worker {}: its session carried a message for worker '{}': ending it",
                   worker_id_, in_.worker_id().substr(0, 64));
      StreamEnded(grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                               absl::StrCat("this session is worker ", worker_id_,
                                            "'s: it carried a message for worker '",
                                            in_.worker_id().substr(0, 64), "'")));
      return;
    } else {
      // A refused message was already answered with a Reject through the channel.
      coordinator.HandleWorkerMessage(in_).IgnoreError();
    }
    if (!ending_) StartRead(&in_);
  }

  // The stream is over from the worker's side: the Coordinator forgets the session (unless it
  // closed it first or the daemon is stopping), and the RPC finishes after the queue.
  void StreamEnded(const grpc::Status& status) {
    if (open_) {
      open_ = false;
      if (!service_.shutting_down_.load()) service_.coordinator_.CloseSession(worker_id_);
    }
    End(status);
  }

  // Finishes with `status` once the queue is written (the first end wins).
  void End(const grpc::Status& status) {
    if (ending_) return;
    ending_ = true;
    finish_status_ = status;
    Pump();
  }

  // Starts the next write, or finishes when ending and nothing is left. At most one write is in
  // flight, and Finish never overlaps a write.
  void Pump() {
    if (finished_ || writing_) return;
    if (!queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      StartWrite(&current_);
      return;
    }
    if (ending_) {
      finished_ = true;
      Finish(*finish_status_);  // a pending read completes with ok = false
    }
  }

  WorkerService& service_;
  const std::shared_ptr<WorkerSessionChannel> channel_;
  const std::string secret_;  // the call's "x-mat-worker-secret" ("" = none)
  v1::WorkerMessage in_;  // the read in flight; read on the loop until the next StartRead
  // ----- loop only -----
  std::string worker_id_;     // from the first message
  bool opened_ = false;       // the first message was handled
  bool open_ = false;         // the Coordinator holds channel_ (OpenSession OK, no end yet)
  std::deque<v1::CoordinatorMessage> queue_;
  v1::CoordinatorMessage current_;  // the message of the write in flight
  bool writing_ = false;
  bool ending_ = false;             // finish_status_ is set; nothing more is read or queued
  std::optional<grpc::Status> finish_status_;
  bool finished_ = false;           // Finish was called
};

namespace {

// A Session refused before it started: finishes with the refusal at once.
class RefusedSessionReactor final
    : public grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage> {
 public:
  explicit RefusedSessionReactor(const absl::Status& status) { Finish(api::ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

}  // namespace

void WorkerSessionChannel::Send(const v1::CoordinatorMessage& message) {
  MAT_CHECK(loop_.get_executor().running_in_this_thread())
      << "WorkerChannel::Send called off the coordinator loop";
  if (reactor_ != nullptr) reactor_->Enqueue(message);
}

void WorkerSessionChannel::Close(const absl::Status& status) {
  MAT_CHECK(loop_.get_executor().running_in_this_thread())
      << "WorkerChannel::Close called off the coordinator loop";
  if (reactor_ != nullptr) reactor_->CloseByCoordinator(status);
}

WorkerService::WorkerService(boost::asio::io_context& loop, Coordinator& coordinator,
                             WorkerServiceOptions options)
    : loop_(loop), coordinator_(coordinator), options_(options) {}

WorkerService::~WorkerService() {
  MAT_CHECK(sessions_.empty()) << sessions_.size()
                               << " Session streams outlive the WorkerService";
}

grpc::ServerUnaryReactor* WorkerService::Register(grpc::CallbackServerContext* context,
                                                  const v1::RegisterRequest* request,
                                                  v1::RegisterReply* reply) {
  if (absl::Status auth = CheckJoinToken(*context, options_.join_tokens); !auth.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(api::ToGrpcStatus(auth));
    return reactor;
  }
  return RunOnLoop(loop_, context, reply, [this, request, secret = WorkerSecret(*context)] {
    return coordinator_.RegisterWorker(*request, secret);
  });
}

grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>* WorkerService::Session(
    grpc::CallbackServerContext* context) {
  if (absl::Status auth = CheckJoinToken(*context, options_.join_tokens); !auth.ok()) {
    return new RefusedSessionReactor(auth);
  }
  return new WorkerSessionReactor(*this, WorkerSecret(*context));
}

grpc::ServerUnaryReactor* WorkerService::UploadArtifact(grpc::CallbackServerContext* context,
                                                        const v1::UploadArtifactRequest* request,
                                                        v1::UploadArtifactReply* reply) {
  absl::Status refused = CheckJoinToken(*context, options_.join_tokens);
  if (refused.ok() && options_.artifacts == nullptr) {
    refused = absl::UnimplementedError("this coordinator keeps no artifacts");
  }
  if (refused.ok()) refused = api::CheckJobArtifactName(request->name());
  if (!refused.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(api::ToGrpcStatus(refused));
    return reactor;
  }
  ArtifactStore* store = options_.artifacts;
  return CheckOnLoopThenRun(
      loop_, store->executor().get_executor(), context, reply,
      [this, request, secret = WorkerSecret(*context)] {
        MAT_RETURN_IF_ERROR(coordinator_.AuthenticateWorker(request->worker_id(), secret));
        return coordinator_.CheckArtifactUpload(request->worker_id(), request->job_id(),
                                                request->rank(), request->attempt());
      },
      [store, request] { return store->Upload(*request); });
}

void WorkerService::BeginShutdown() {
  if (shutting_down_.exchange(true)) return;
  boost::asio::post(loop_, [this] {
    // EndForShutdown only finishes (deletion comes later, posted by OnDone): the set is stable.
    for (WorkerSessionReactor* session : sessions_) session->EndForShutdown();
  });
}

}  // namespace mat::coordinator
