#include "client/job_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <chrono>
#include <iterator>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "api/grpc_status.h"

namespace mat::client {
namespace {

std::chrono::system_clock::time_point DeadlineAfter(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

}  // namespace

absl::Status RetryWhileUnavailable(const std::string& address, std::ostream& err,
                                   std::chrono::milliseconds reconnect_for,
                                   const std::function<int64_t()>& answers,
                                   const std::function<absl::Status()>& attempt) {
  std::optional<std::chrono::steady_clock::time_point> lost;
  int64_t answers_at_loss = 0;
  while (true) {
    absl::Status status = attempt();
    if (status.code() != absl::StatusCode::kUnavailable || answers() == 0) return status;
    const auto now = std::chrono::steady_clock::now();
    if (lost.has_value() && answers() != answers_at_loss) lost.reset();  // back, then lost again
    if (!lost.has_value()) {
      lost = now;
      answers_at_loss = answers();
      err << "matctl: lost the coordinator at " << address << " (" << status.message()
          << "); trying again for "
          << std::chrono::duration_cast<std::chrono::seconds>(reconnect_for).count() << " s"
          << std::endl;
    } else if (now - *lost > reconnect_for) {
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeJobClientCredentials(
    const JobClientSecurity& security) {
  return api::MakeChannelCredentials(
      api::TlsFiles{security.tls_ca_file, security.tls_cert_file, security.tls_key_file});
}

absl::StatusOr<std::unique_ptr<JobClient>> JobClient::Create(const std::string& address,
                                                             double timeout_seconds,
                                                             const JobClientSecurity& security) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      MakeJobClientCredentials(security);
  if (!credentials.ok()) return credentials.status();
  std::string token;
  if (!security.token_file.empty()) {
    absl::StatusOr<std::string> read = api::ReadFirstToken(security.token_file);
    if (!read.ok()) {
      return absl::Status(read.status().code(),
                          absl::StrCat("--token-file: ", read.status().message()));
    }
    token = std::move(*read);
  }
  auto client = std::make_unique<JobClient>(grpc::CreateChannel(address, *credentials), address,
                                            timeout_seconds, std::move(token));
  client->tls_ = api::TlsFiles{security.tls_ca_file, security.tls_cert_file,
                               security.tls_key_file};
  return client;
}

JobClient::JobClient(const std::string& address, double timeout_seconds)
    : JobClient(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()), address,
                timeout_seconds) {}

JobClient::JobClient(std::shared_ptr<grpc::Channel> channel, const std::string& address,
                     double timeout_seconds, std::string bearer_token)
    : channel_(std::move(channel)),
      stub_(v1::JobService::NewStub(channel_)),
      address_(address),
      timeout_seconds_(timeout_seconds),
      bearer_token_(std::move(bearer_token)) {}

std::unique_ptr<grpc::ClientContext> JobClient::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (!bearer_token_.empty()) context->AddMetadata("authorization", "Bearer " + bearer_token_);
  return context;
}

std::unique_ptr<grpc::ClientContext> JobClient::UnaryContext() const {
  auto context = NewContext();
  context->set_deadline(DeadlineAfter(timeout_seconds_));
  return context;
}

absl::Status JobClient::Convert(const grpc::Status& status) const {
  if (status.ok()) return absl::OkStatus();
  const grpc_connectivity_state state = channel_->GetState(/*try_to_connect=*/false);
  // Not connected: the call never reached the coordinator (an UNAVAILABLE from a connected
  // coordinator, e.g. its disk, keeps its own message).
  if ((status.error_code() == grpc::StatusCode::UNAVAILABLE ||
       status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) &&
      state != GRPC_CHANNEL_READY) {
    if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      return absl::UnavailableError(absl::StrCat("cannot reach the coordinator at ", address_,
                                                 " within ", timeout_seconds_, " s"));
    }
    return absl::UnavailableError(absl::StrCat("cannot reach the coordinator at ", address_,
                                               ": ", status.error_message(),
                                               api::TlsMismatchHint(tls_, status.error_message())));
  }
  return api::FromGrpcStatus(status);
}

absl::StatusOr<v1::SubmitJobReply> JobClient::SubmitJob(const std::string& client_request_id,
                                                        const v1::JobSpec& spec) {
  v1::SubmitJobRequest request;
  request.set_client_request_id(client_request_id);
  *request.mutable_spec() = spec;
  v1::SubmitJobReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->SubmitJob(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply;
}

absl::StatusOr<v1::GetJobReply> JobClient::GetJob(const std::string& job_id) {
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  v1::GetJobReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->GetJob(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply;
}

absl::StatusOr<std::vector<v1::Job>> JobClient::ListAllJobs(
    const std::vector<v1::JobState>& states) {
  std::vector<v1::Job> jobs;
  v1::ListJobsRequest request;
  for (v1::JobState s : states) request.add_states(s);
  do {
    v1::ListJobsReply reply;
    auto context = UnaryContext();
    absl::Status status = Convert(stub_->ListJobs(context.get(), request, &reply));
    if (!status.ok()) return status;
    for (v1::Job& job : *reply.mutable_jobs()) jobs.push_back(std::move(job));
    request.set_page_token(reply.next_page_token());
  } while (!request.page_token().empty());
  return jobs;
}

absl::StatusOr<v1::CancelJobReply> JobClient::CancelJob(const std::string& job_id,
                                                        const std::string& reason) {
  v1::CancelJobRequest request;
  request.set_job_id(job_id);
  request.set_reason(reason);
  v1::CancelJobReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->CancelJob(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply;
}

absl::StatusOr<v1::WorkerInfo> JobClient::DrainWorker(const std::string& worker_id,
                                                      const std::string& reason, bool now) {
  v1::DrainWorkerRequest request;
  request.set_worker_id(worker_id);
  request.set_reason(reason);
  request.set_now(now);
  v1::DrainWorkerReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->DrainWorker(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply.worker();
}

absl::StatusOr<int64_t> JobClient::DeleteJob(const std::string& job_id) {
  v1::DeleteJobRequest request;
  request.set_job_id(job_id);
  v1::DeleteJobReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->DeleteJob(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply.artifact_bytes_freed();
}

absl::StatusOr<v1::WorkerInfo> JobClient::UndrainWorker(const std::string& worker_id) {
  v1::UndrainWorkerRequest request;
  request.set_worker_id(worker_id);
  v1::UndrainWorkerReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->UndrainWorker(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply.worker();
}

absl::StatusOr<v1::GetJobLogsReply> JobClient::GetJobLogs(const std::string& job_id, int rank,
                                                          int64_t after_seq) {
  v1::GetJobLogsRequest request;
  request.set_job_id(job_id);
  if (rank >= 0) request.set_rank(rank);
  request.set_after_seq(after_seq);
  v1::GetJobLogsReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->GetJobLogs(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply;
}

absl::StatusOr<v1::ListArtifactsReply> JobClient::ListArtifacts(const std::string& job_id) {
  v1::ListArtifactsRequest request;
  request.set_job_id(job_id);
  v1::ListArtifactsReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->ListArtifacts(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply;
}

absl::StatusOr<v1::ReadArtifactReply> JobClient::ReadArtifact(const std::string& job_id,
                                                              const std::string& name,
                                                              int64_t offset) {
  v1::ReadArtifactRequest request;
  request.set_job_id(job_id);
  request.set_name(name);
  request.set_offset(offset);
  v1::ReadArtifactReply reply;
  auto context = UnaryContext();
  absl::Status status = Convert(stub_->ReadArtifact(context.get(), request, &reply));
  if (!status.ok()) return status;
  return reply;
}

absl::StatusOr<v1::GetSpectraReply> JobClient::GetAllSpectra(const std::string& job_id) {
  v1::GetSpectraReply all;
  v1::GetSpectraRequest request;
  request.set_job_id(job_id);
  bool first = true;
  do {
    v1::GetSpectraReply reply;
    auto context = UnaryContext();
    absl::Status status = Convert(stub_->GetSpectra(context.get(), request, &reply));
    if (!status.ok()) return status;
    if (first) *all.mutable_modules() = reply.modules();
    first = false;
    for (v1::SpectraPoint& p : *reply.mutable_points()) *all.add_points() = std::move(p);
    request.set_page_token(reply.next_page_token());
  } while (!request.page_token().empty());
  return all;
}

absl::StatusOr<std::vector<v1::WorkerInfo>> JobClient::ListWorkers() {
  v1::ListWorkersReply reply;
  auto context = UnaryContext();
  const grpc::Status grpc_status =
      stub_->ListWorkers(context.get(), v1::ListWorkersRequest(), &reply);
  if (grpc_status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
    return absl::UnimplementedError(
        absl::StrCat("the coordinator at ", address_, " does not serve ListWorkers",
                     grpc_status.error_message().empty() ? "" : " (",
                     grpc_status.error_message(),
                     grpc_status.error_message().empty() ? "" : ")"));
  }
  absl::Status status = Convert(grpc_status);
  if (!status.ok()) return status;
  return std::vector<v1::WorkerInfo>(std::make_move_iterator(reply.mutable_workers()->begin()),
                                     std::make_move_iterator(reply.mutable_workers()->end()));
}

absl::Status JobClient::WatchJob(const std::string& job_id,
                                 const std::function<void(const v1::JobEvent&)>& on_event) {
  if (!channel_->WaitForConnected(DeadlineAfter(timeout_seconds_))) {
    return absl::UnavailableError(absl::StrCat("cannot reach the coordinator at ", address_,
                                               " within ", timeout_seconds_, " s"));
  }
  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  // No deadline: the stream lasts as long as the job.
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  std::unique_ptr<grpc::ClientReader<v1::JobEvent>> reader =
      stub_->WatchJob(context.get(), request);
  v1::JobEvent event;
  while (reader->Read(&event)) on_event(event);
  const grpc::Status status = reader->Finish();
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return absl::UnavailableError(absl::StrCat("lost the coordinator at ", address_, " (",
                                               status.error_message(), ")"));
  }
  return api::FromGrpcStatus(status);
}

}  // namespace mat::client
