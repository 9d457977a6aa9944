// JobClient: JobService calls with deadlines and absl::Status results (through
// api/grpc_status.h), for matctl and tests. One channel to the coordinator: plaintext, or
// TLS with JobClientSecurity's CA (and client certificate for mutual TLS); with a bearer token,
// every call carries "authorization: Bearer <token>" (coordinator/auth.h).
//
// Every unary call has a deadline of `timeout_seconds`. A coordinator that cannot be reached is
// UNAVAILABLE naming the address, also when the deadline passes while connecting (rather than
// DEADLINE_EXCEEDED); a call that reached the coordinator and ran out of time stays
// DEADLINE_EXCEEDED. WatchJob has no overall deadline (a job may run for hours), but waits at most
// `timeout_seconds` to connect.
//
// Thread-safety: the calls may be made from several threads at once (gRPC stubs are).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include <grpcpp/channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "api/credentials.h"
#include "mat/v1/service.grpc.pb.h"

namespace mat::client {

inline constexpr double kDefaultTimeoutSeconds = 5;

// How matctl authenticates to the coordinator. Empty fields: not used.
struct JobClientSecurity {
  std::string token_file;     // the first token of this file (token-file format of auth.h)
  std::string tls_ca_file;    // set: TLS, verifying the coordinator against this CA (PEM)
  std::string tls_cert_file;  // with tls_key_file: the client certificate (mutual TLS)
  std::string tls_key_file;
};

// Channel credentials for `security`: insecure without tls_ca_file; INVALID_ARGUMENT when only
// one of cert/key is set or they are set without a CA; errors name the flag and the file.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeJobClientCredentials(
    const JobClientSecurity& security);


// Runs `attempt` again while it fails UNAVAILABLE after the coordinator answered (`answers()`,
// a count of what the attempts received, e.g. watch events, is > 0), for at most `reconnect_for`
// from the loss, telling `err` once per loss ("matctl: lost the coordinator at ADDRESS (why);
// trying again for N s"). A loss after the attempts received something new since the last one is
// a new loss, with its own `reconnect_for` (a watch rides out any number of coordinator
// restarts, each within the window). Returns the last attempt's status (OK, another error, or
// UNAVAILABLE once the window has passed); with answers() == 0 the first failure as it is.
absl::Status RetryWhileUnavailable(const std::string& address, std::ostream& err,
                                   std::chrono::milliseconds reconnect_for,
                                   const std::function<int64_t()>& answers,
                                   const std::function<absl::Status()>& attempt);

class JobClient {
 public:
  // A client of the coordinator at `address` ("HOST:PORT"). Does not connect yet.
  JobClient(const std::string& address, double timeout_seconds = kDefaultTimeoutSeconds);
  // Over an existing channel (in-process tests); `address` only names it in messages.
  JobClient(std::shared_ptr<grpc::Channel> channel, const std::string& address,
            double timeout_seconds = kDefaultTimeoutSeconds, std::string bearer_token = "");
  // A client with `security` (credentials and token read now; errors name the file).
  static absl::StatusOr<std::unique_ptr<JobClient>> Create(const std::string& address,
                                                           double timeout_seconds,
                                                           const JobClientSecurity& security);
  JobClient(const JobClient&) = delete;
  JobClient& operator=(const JobClient&) = delete;

  absl::StatusOr<v1::SubmitJobReply> SubmitJob(const std::string& client_request_id,
                                               const v1::JobSpec& spec);
  absl::StatusOr<v1::GetJobReply> GetJob(const std::string& job_id);
  // Every job (following next_page_token), only `states` when not empty.
  absl::StatusOr<std::vector<v1::Job>> ListAllJobs(const std::vector<v1::JobState>& states = {});
  absl::StatusOr<v1::CancelJobReply> CancelJob(const std::string& job_id,
                                               const std::string& reason);
  // One page of a job's log lines after `after_seq` (GetJobLogs); `rank` < 0 = every rank.
  absl::StatusOr<v1::GetJobLogsReply> GetJobLogs(const std::string& job_id, int rank,
                                                 int64_t after_seq);
  // The job's artifacts on the coordinator (ListArtifacts).
  absl::StatusOr<v1::ListArtifactsReply> ListArtifacts(const std::string& job_id);
  // One piece of one artifact from `offset` (ReadArtifact; the server's piece size).
  absl::StatusOr<v1::ReadArtifactReply> ReadArtifact(const std::string& job_id,
                                                     const std::string& name, int64_t offset);
  // The whole λ history (every page, points concatenated; modules from the first page).
  absl::StatusOr<v1::GetSpectraReply> GetAllSpectra(const std::string& job_id);
  // Every worker the coordinator knows, by id. UNIMPLEMENTED naming the address when the
  // coordinator predates ListWorkers.
  absl::StatusOr<std::vector<v1::WorkerInfo>> ListWorkers();
  // DrainWorker: the worker's state after the call.
  absl::StatusOr<v1::WorkerInfo> DrainWorker(const std::string& worker_id,
                                             const std::string& reason, bool now);
  // DeleteJob: the artifact bytes freed.
  absl::StatusOr<int64_t> DeleteJob(const std::string& job_id);
  // UndrainWorker: the worker's state after the call.
  absl::StatusOr<v1::WorkerInfo> UndrainWorker(const std::string& worker_id);

  // Streams the job's events into `on_event` (called on this thread) until the coordinator ends
  // the stream: OK after the job's terminal state; the stream's error otherwise (NOT_FOUND for
  // an unknown job; UNAVAILABLE when the coordinator went away).
  absl::Status WatchJob(const std::string& job_id,
                        const std::function<void(const v1::JobEvent&)>& on_event);

  const std::string& address() const { return address_; }

 private:
  // A context with the bearer token, if any.
  std::unique_ptr<grpc::ClientContext> NewContext() const;
  // A context with the unary deadline (and the token).
  std::unique_ptr<grpc::ClientContext> UnaryContext() const;
  // The call's status in absl terms, with the address named for connection failures.
  absl::Status Convert(const grpc::Status& status) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::JobService::Stub> stub_;
  std::string address_;
  double timeout_seconds_;
  std::string bearer_token_;  // "" = no authorization metadata
  api::TlsFiles tls_;         // what Create was given (for TlsMismatchHint)
};

}  // namespace mat::client
