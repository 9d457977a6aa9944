#include "client/matctl.h"

#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "client/format.h"
#include "client/job_client.h"
#include "coordinator/grpc_status.h"
#include "coordinator/job_spec.h"
#include "coordinator/job_store.h"

namespace mat::client {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

// What the flags of all commands fill.
struct MatctlOptions {
  std::string coordinator = "127.0.0.1:50051";
  double timeout_seconds = kDefaultTimeoutSeconds;
  std::string job_file;
  std::string request_id;
  bool wait = false;
  std::vector<std::string> states;
  std::string job_id;
  std::string output;
  std::string reason;
};

int Fail(std::ostream& err, const absl::Status& status) {
  err << "matctl: " << coordinator::StatusLine(status) << "\n";
  return kExitError;
}

// "QUEUED" or "queued" -> JOB_STATE_QUEUED.
absl::StatusOr<v1::JobState> ParseState(const std::string& text) {
  const std::string upper = absl::AsciiStrToUpper(text);
  for (int s = v1::JobState_MIN; s <= v1::JobState_MAX; ++s) {
    const auto state = static_cast<v1::JobState>(s);
    if (state != v1::JOB_STATE_UNSPECIFIED && v1::JobState_IsValid(s) &&
        coordinator::JobStateName(state) == upper) {
      return state;
    }
  }
  return absl::InvalidArgumentError("--state: unknown job state '" + text + "'");
}

// Prints events until the job finishes; the job's final state through `final_state`.
absl::Status Watch(JobClient& client, const std::string& job_id, std::ostream& out,
                   v1::JobState* final_state) {
  return client.WatchJob(job_id, [&](const v1::JobEvent& event) {
    out << FormatJobEvent(event) << std::endl;  // flushed: someone is watching
    if (event.has_state()) *final_state = event.state().state();
  });
}

int Submit(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<v1::JobSpec> spec = coordinator::LoadJobSpecYaml(o.job_file);
  if (!spec.ok()) return Fail(err, spec.status());
  if (absl::Status valid = coordinator::ValidateJobSpec(*spec); !valid.ok()) {
    return Fail(err, absl::InvalidArgumentError(absl::StrCat(o.job_file, ": ", valid.message())));
  }
  JobClient client(o.coordinator, o.timeout_seconds);
  absl::StatusOr<v1::SubmitJobReply> reply = client.SubmitJob(o.request_id, *spec);
  if (!reply.ok()) return Fail(err, reply.status());
  out << reply->job_id() << std::endl;
  if (!reply->created()) {
    err << "matctl: request id '" << o.request_id << "' already submitted as "
        << reply->job_id() << "\n";
  }
  if (!o.wait) return kExitOk;
  v1::JobState final_state = v1::JOB_STATE_UNSPECIFIED;
  if (absl::Status s = Watch(client, reply->job_id(), out, &final_state); !s.ok()) {
    return Fail(err, s);
  }
  return final_state == v1::JOB_STATE_SUCCEEDED ? kExitOk : kExitError;
}

int List(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  std::vector<v1::JobState> states;
  for (const std::string& text : o.states) {
    absl::StatusOr<v1::JobState> state = ParseState(text);
    if (!state.ok()) return Fail(err, state.status());
    states.push_back(*state);
  }
  JobClient client(o.coordinator, o.timeout_seconds);
  absl::StatusOr<std::vector<v1::Job>> jobs = client.ListAllJobs(states);
  if (!jobs.ok()) return Fail(err, jobs.status());
  out << FormatJobTable(*jobs);
  return kExitOk;
}

int Status(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  JobClient client(o.coordinator, o.timeout_seconds);
  absl::StatusOr<v1::GetJobReply> reply = client.GetJob(o.job_id);
  if (!reply.ok()) return Fail(err, reply.status());
  if (o.output == "json") {
    out << JobToJson(*reply).dump(2) << "\n";
  } else {
    out << FormatJobText(*reply);
  }
  return kExitOk;
}

int Cancel(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  JobClient client(o.coordinator, o.timeout_seconds);
  absl::StatusOr<v1::CancelJobReply> reply = client.CancelJob(o.job_id, o.reason);
  if (!reply.ok()) return Fail(err, reply.status());
  out << o.job_id << " " << coordinator::JobStateName(reply->state()) << "\n";
  return kExitOk;
}

int WatchCommand(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  JobClient client(o.coordinator, o.timeout_seconds);
  v1::JobState final_state = v1::JOB_STATE_UNSPECIFIED;
  if (absl::Status s = Watch(client, o.job_id, out, &final_state); !s.ok()) return Fail(err, s);
  return kExitOk;
}

int Spectra(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  JobClient client(o.coordinator, o.timeout_seconds);
  absl::StatusOr<v1::GetSpectraReply> reply = client.GetAllSpectra(o.job_id);
  if (!reply.ok()) return Fail(err, reply.status());
  if (o.output == "json") {
    out << SpectraToJson(o.job_id, *reply).dump(2) << "\n";
  } else {
    out << SpectraToCsv(*reply);
  }
  return kExitOk;
}

}  // namespace

int RunMatctl(int argc, const char* const* argv, std::ostream& out, std::ostream& err) {
  MatctlOptions o;
  CLI::App app{"matctl: submit, inspect, watch and cancel MAT jobs on a mat-coordinator"};
  app.require_subcommand(1);
  app.add_option("--coordinator", o.coordinator, "coordinator gRPC address HOST:PORT")
      ->capture_default_str();
  app.add_option("--timeout", o.timeout_seconds, "deadline of each call, seconds")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  CLI::App* submit = app.add_subcommand("submit", "submit a job YAML file; prints the job id");
  submit->add_option("job_file", o.job_file, "the job spec (YAML)")->required();
  submit->add_option("--request-id", o.request_id,
                     "idempotency key: resubmitting with the same id returns the same job");
  submit->add_flag("--wait", o.wait, "then watch the job until it finishes");

  CLI::App* list = app.add_subcommand("list", "list jobs");
  list->add_option("--state", o.states, "only jobs in this state (repeatable)");

  CLI::App* status = app.add_subcommand("status", "show one job");
  status->add_option("job", o.job_id, "job id")->required();
  status->add_option("-o,--output", o.output, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->default_val("text");

  CLI::App* cancel = app.add_subcommand("cancel", "cancel a job");
  cancel->add_option("job", o.job_id, "job id")->required();
  cancel->add_option("--reason", o.reason, "stored as the job's message");

  CLI::App* watch = app.add_subcommand("watch", "print a job's events until it finishes");
  watch->add_option("job", o.job_id, "job id")->required();

  CLI::App* spectra = app.add_subcommand("spectra", "print a job's λ_max history");
  spectra->add_option("job", o.job_id, "job id")->required();
  spectra->add_option("-o,--output", o.output, "csv or json")
      ->check(CLI::IsMember({"csv", "json"}))
      ->default_val("csv");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e, out, err);  // prints the help or the usage error
    return code == 0 ? kExitOk : kExitUsage;
  }

  if (submit->parsed()) return Submit(o, out, err);
  if (list->parsed()) return List(o, out, err);
  if (status->parsed()) return Status(o, out, err);
  if (cancel->parsed()) return Cancel(o, out, err);
  if (watch->parsed()) return WatchCommand(o, out, err);
  if (spectra->parsed()) return Spectra(o, out, err);
  return Fail(err, absl::InternalError("no command"));  // require_subcommand prevents this
}

}  // namespace mat::client
