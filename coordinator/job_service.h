// JobService over gRPC's callback API: a thin adapter over Coordinator (DESIGN §7, STYLE 3).
//
// Every handler runs on a gRPC thread and never blocks it: it posts the work to the coordinator
// loop (`loop`, the io_context whose one thread owns the Coordinator), which calls the
// Coordinator and finishes the RPC there with ToGrpcStatus of the result (RunOnLoop,
// coordinator/run_on_loop.h), or, for the artifacts' file work (ListArtifacts, ReadArtifact,
// DeleteJob), on the ArtifactStore's I/O thread after the loop's check (CheckOnLoopThenRun).
// Every RPC is finished exactly once. ListWorkers is
// Coordinator::ListWorkers (the workers of WorkerService, coordinator/worker_service.h).
//
// WatchJob is a server-streaming reactor fed from the loop: the job's current state first, then
// every event, and the stream ends with OK after the event of a terminal state. It ends with
// CANCELLED when the client goes away or the server shuts down, and with the Coordinator's error
// (NOT_FOUND) for an unknown job. Its subscription is removed on the loop in every case.
//
// A watcher that reads slower than events arrive gets at most `max_queued_watch_events` queued;
// beyond that, progress and mask events are dropped (each is superseded by the next), and
// evaluations only beyond 4 times as many queued events; state changes never are. So a slow
// client costs bounded memory and still sees how the job ends and, unless it stalls for
// thousands of evaluations, every evaluation.
//
// Lifetime: `loop` and `coordinator` must outlive the service, and the loop must keep running
// until the grpc::Server serving this service has shut down (Server::Shutdown returns), because
// every outstanding RPC finishes on the loop. The service itself must outlive that server.
//
// Authentication: with `bearer_tokens`, every handler first checks the call's bearer token
// (CheckBearer, coordinator/auth.h) on the gRPC thread and, when it is refused, finishes the RPC
// at once with UNAUTHENTICATED or PERMISSION_DENIED without posting to the loop. SubmitJob
// passes the caller's ClientIdentity (a SHA-256 prefix of its token, or its peer host without
// auth) to Coordinator::SubmitJob, which stores it and applies the per-client job limit.
//
// Roles: with `admin_tokens`, a job is its submitter's. A caller whose token is not an admin's
// (Caller::restricted) may read (GetJob, WatchJob, GetSpectra, GetJobLogs, ListArtifacts,
// ReadArtifact), cancel, delete and replay (SubmitJob with policy.rand_schedule_job) only the
// jobs it submitted, the same ClientIdentity: another client's job (or one stored before clients
// were, with "") is PERMISSION_DENIED, checked on the loop before the Coordinator acts (an
// unknown job stays NOT_FOUND). ListJobs lists only its own jobs. DrainWorker and UndrainWorker
// need an admin token (checked on the gRPC thread). Admin tokens do all of it on every job.
// Without roles every admitted caller does all of it. ListWorkers shows every caller which job
// each busy worker runs.
//
// Artifacts (ListArtifacts, ReadArtifact): the files are read on the ArtifactStore's own I/O
// thread, which finishes the RPC (ListArtifacts first checks on the loop that the job exists);
// GetJob and ListJobs fill each job's artifact_bytes from the store's in-memory index.
//
// Thread-safety: the handlers are called by gRPC on any thread; all Coordinator access happens on
// the loop.
#pragma once

#include <string>

#include <boost/asio/io_context.hpp>

#include "coordinator/coordinator.h"
#include "mat/v1/service.grpc.pb.h"

namespace mat::coordinator {

class TokenSet;
class ArtifactStore;

struct JobServiceOptions {
  // Events queued per WatchJob stream before progress and mask events are dropped (evaluations
  // beyond 4 times as many; state changes never), count.
  int max_queued_watch_events = 1024;
  // Bearer tokens every call must carry (coordinator/auth.h), borrowed: must outlive the
  // service. nullptr: every caller is admitted.
  const TokenSet* bearer_tokens = nullptr;
  // Admin tokens (--admin-token-file; also in bearer_tokens), borrowed like it. With them, a
  // caller may read, list, cancel, delete and replay only the jobs it submitted (the same
  // ClientIdentity) and may not drain or undrain workers, unless its token is one of these.
  // nullptr: every admitted caller may do all of it.
  const TokenSet* admin_tokens = nullptr;
  // The jobs' artifacts (coordinator/artifact_store.h), borrowed: must outlive the service.
  // nullptr: ListArtifacts and ReadArtifact are UNIMPLEMENTED, Job.artifact_bytes stays 0.
  ArtifactStore* artifacts = nullptr;
};

class JobService final : public v1::JobService::CallbackService {
 public:
  // Borrows both (see Lifetime above).
  JobService(boost::asio::io_context& loop, Coordinator& coordinator,
             JobServiceOptions options = {});
  JobService(const JobService&) = delete;
  JobService& operator=(const JobService&) = delete;

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const v1::SubmitJobRequest* request,
                                      v1::SubmitJobReply* reply) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const v1::GetJobRequest* request,
                                   v1::GetJobReply* reply) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const v1::ListJobsRequest* request,
                                     v1::ListJobsReply* reply) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const v1::CancelJobRequest* request,
                                      v1::CancelJobReply* reply) override;
  // The store's delete on the loop (after the owner check), then the artifacts' on the store's
  // I/O thread, which finishes the call.
  grpc::ServerUnaryReactor* DeleteJob(grpc::CallbackServerContext* context,
                                      const v1::DeleteJobRequest* request,
                                      v1::DeleteJobReply* reply) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(grpc::CallbackServerContext* context,
                                                   const v1::WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* GetSpectra(grpc::CallbackServerContext* context,
                                       const v1::GetSpectraRequest* request,
                                       v1::GetSpectraReply* reply) override;
  grpc::ServerUnaryReactor* ListWorkers(grpc::CallbackServerContext* context,
                                        const v1::ListWorkersRequest* request,
                                        v1::ListWorkersReply* reply) override;
  grpc::ServerUnaryReactor* DrainWorker(grpc::CallbackServerContext* context,
                                        const v1::DrainWorkerRequest* request,
                                        v1::DrainWorkerReply* reply) override;
  grpc::ServerUnaryReactor* UndrainWorker(grpc::CallbackServerContext* context,
                                          const v1::UndrainWorkerRequest* request,
                                          v1::UndrainWorkerReply* reply) override;
  grpc::ServerUnaryReactor* GetJobLogs(grpc::CallbackServerContext* context,
                                       const v1::GetJobLogsRequest* request,
                                       v1::GetJobLogsReply* reply) override;
  // ListArtifacts checks on the loop that the job exists (and, for a restricted caller, is its
  // own, as ReadArtifact does then); both read on the store's I/O thread.
  grpc::ServerUnaryReactor* ListArtifacts(grpc::CallbackServerContext* context,
                                          const v1::ListArtifactsRequest* request,
                                          v1::ListArtifactsReply* reply) override;
  grpc::ServerUnaryReactor* ReadArtifact(grpc::CallbackServerContext* context,
                                         const v1::ReadArtifactRequest* request,
                                         v1::ReadArtifactReply* reply) override;

 private:
  // The bearer token, then whether this coordinator keeps artifacts (UNIMPLEMENTED otherwise).
  absl::Status CheckArtifactCall(const grpc::CallbackServerContext& context) const;

  // The bearer token, then (with roles) an admin token: PERMISSION_DENIED "<action> needs an
  // admin token ...".
  absl::Status CheckAdmin(const grpc::CallbackServerContext& context, const char* action) const;
  // A caller as the roles see it. REQUIRES: the call passed CheckBearer.
  struct Caller {
    bool restricted = false;  // roles are on and its token is no admin's: its own jobs only
    std::string client;       // its ClientIdentity
  };
  Caller CallerOf(const grpc::CallbackServerContext& context) const;
  // On the loop. OK for an unrestricted caller and for an empty `job_id` (the Coordinator names
  // that); else NOT_FOUND for an unknown job and PERMISSION_DENIED for another client's, naming
  // the job and who may `action` ("read", "cancel") it.
  absl::Status CheckOwner(const Caller& caller, const std::string& job_id,
                          const char* action);

  boost::asio::io_context& loop_;
  Coordinator& coordinator_;
  const JobServiceOptions options_;
};

}  // namespace mat::coordinator
