// WorkerService over gRPC's callback API: a thin adapter over Coordinator's worker half (DESIGN
// §7, STYLE 3; the session protocol is in proto/mat/v1/service.proto).
//
//   Register   unary: posted to the loop, Coordinator::RegisterWorker (with the call's worker
//              secret), finished there with ToGrpcStatus of the result.
//   Session    one bidirectional stream per worker, one reactor per stream. Reads one message at
//              a time: the first goes to Coordinator::OpenSession together with the stream's
//              WorkerChannel, every later one to Coordinator::HandleWorkerMessage (whose Reject
//              the Coordinator sends itself, through the channel); the next read starts once the
//              loop has handled the previous message, so a worker's messages are handled in
//              order. What the Coordinator sends through the channel is queued and written one
//              message at a time, in order.
//
// How a Session ends (every stream is finished exactly once):
//   - AuthenticateWorker or OpenSession fails: the stream ends with that status (NOT_FOUND for
//     an unregistered worker, PERMISSION_DENIED for a secret that is not its, FAILED_PRECONDITION
//     when the worker already has an open session).
//   - The Coordinator closes the channel (heartbeat loss: UNAVAILABLE): the queued messages are
//     written, then the stream ends with the Coordinator's status. No CloseSession follows.
//   - The worker half-closes: CloseSession(worker_id) on the loop, the queued messages are
//     written, then the stream ends OK.
//   - The worker cancels, the connection breaks or a write fails: CloseSession(worker_id), the
//     queue is dropped, the stream ends CANCELLED (the client no longer listens).
//   - More than `max_queued_session_messages` messages wait for a worker that does not read: the
//     worker is handled as lost (CloseSession), the stream ends RESOURCE_EXHAUSTED.
//   - BeginShutdown (the daemon stops): every open stream ends UNAVAILABLE ("coordinator shutting
//     down") after its queued messages, and streams opened later end so at once. These ends do
//     NOT call CloseSession: the coordinator going away is not the workers' failure, so it does
//     not fail their jobs in the store.
//
// Lifetime: `loop` and `coordinator` must outlive the service, and the loop must keep running
// until the grpc::Server serving this service has shut down (Server::Shutdown returns), because
// every stream finishes on the loop; the service must outlive that server and the loop's last
// run (each stream's reactor deletes itself on the loop after gRPC's OnDone). A channel the
// Coordinator still holds after its stream ended stays valid and drops what it is given.
//
// Authentication: with `join_tokens`, every call first checks the call's join token
// (CheckJoinToken, coordinator/auth.h) on the gRPC thread; a refused call finishes at once with
// UNAUTHENTICATED or PERMISSION_DENIED, never reaching the loop or the Coordinator. Then, on the
// loop, the worker's own secret ("x-mat-worker-secret", auth.h WorkerSecret): Register passes it
// to RegisterWorker; a Session's first message and an UploadArtifact are checked with
// AuthenticateWorker (the worker they name) before OpenSession / CheckArtifactUpload, and a
// refused Session ends with that status (PERMISSION_DENIED naming the worker).
//
// Thread-safety: gRPC calls the handlers and reactor callbacks on its threads; they only post to
// the loop, where every Coordinator call and all per-stream state live. A handler never blocks.
// BeginShutdown is safe from any thread.
#pragma once

#include <atomic>
#include <set>

#include <boost/asio/io_context.hpp>

#include "coordinator/coordinator.h"
#include "mat/v1/service.grpc.pb.h"

namespace mat::coordinator {

class WorkerSessionReactor;  // one Session stream (worker_service.cc)
class TokenSet;
class ArtifactStore;

struct WorkerServiceOptions {
  // Messages queued for one worker (its stream not reading them) before the worker is handled as
  // lost, count.
  int max_queued_session_messages = 4096;
  // Join tokens a worker must send on every call (coordinator/auth.h), borrowed: must
  // outlive the service. nullptr: every worker is admitted.
  const TokenSet* join_tokens = nullptr;
  // Where UploadArtifact's bytes go (coordinator/artifact_store.h), borrowed: must outlive the
  // service. nullptr: UploadArtifact is UNIMPLEMENTED.
  ArtifactStore* artifacts = nullptr;
};

class WorkerService final : public v1::WorkerService::CallbackService {
 public:
  // Borrows both (see Lifetime above).
  WorkerService(boost::asio::io_context& loop, Coordinator& coordinator,
                WorkerServiceOptions options = {});
  WorkerService(const WorkerService&) = delete;
  WorkerService& operator=(const WorkerService&) = delete;
  // REQUIRES: the server is shut down and the loop has run everything it posted (no stream left).
  ~WorkerService();

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* context,
                                     const v1::RegisterRequest* request,
                                     v1::RegisterReply* reply) override;
  grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>* Session(
      grpc::CallbackServerContext* context) override;
  // After the join token: Coordinator::AuthenticateWorker and CheckArtifactUpload on the loop,
  // then ArtifactStore::Upload on the store's I/O thread.
  grpc::ServerUnaryReactor* UploadArtifact(grpc::CallbackServerContext* context,
                                           const v1::UploadArtifactRequest* request,
                                           v1::UploadArtifactReply* reply) override;

  // Ends every Session stream UNAVAILABLE without CloseSession (see above); later streams end so
  // at once. Call before Server::Shutdown so that shutdown does not wait for open streams.
  // Returns at once (the streams end on the loop). Idempotent.
  void BeginShutdown();

  // Session streams not yet gone (for tests and metrics). Call on the loop.
  int SessionCount() const { return static_cast<int>(sessions_.size()); }

 private:
  friend class WorkerSessionReactor;

  boost::asio::io_context& loop_;
  Coordinator& coordinator_;
  const WorkerServiceOptions options_;
  std::atomic<bool> shutting_down_{false};
  // ----- loop only -----
  std::set<WorkerSessionReactor*> sessions_;  // every reactor between its start and its deletion
};

}  // namespace mat::coordinator
