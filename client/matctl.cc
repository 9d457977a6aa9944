#include "client/matctl.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/stubs/common.h"
#include "client/compare.h"
#include "client/format.h"
#include "client/job_client.h"
#include "client/plot.h"
#include "common/file_util.h"
#include "common/net_util.h"
#include "common/status.h"
#include "api/artifacts.h"
#include "api/grpc_status.h"
#include "api/job_spec.h"
#include "api/job_state.h"

namespace mat::client {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

// What the flags of all commands fill.
struct MatctlOptions {
  std::string coordinator = "127.0.0.1:50051";
  double timeout_seconds = kDefaultTimeoutSeconds;
  JobClientSecurity security;  // --token-file, --tls-ca, --tls-cert, --tls-key
  std::string job_file;
  std::string request_id;
  bool wait = false;
  std::vector<std::string> states;
  std::string job_id;
  std::string output;
  std::string reason;
  bool progress = false;     // --progress: draw the bar even when `out` is not a terminal
  bool no_progress = false;  // --no-progress: one line per event even on a terminal
  std::string plot_file;     // plot --out
  std::vector<std::string> runs;      // compare: job ids or run directories
  std::vector<std::string> job_ids;   // delete
  std::string baseline;               // compare --baseline
  std::vector<double> budgets = {0.25, 0.5, 0.75, 1.0};  // compare --budgets
  std::string svg_file;               // compare --svg
  int rank = -1;                      // logs --rank
  bool follow = false;                // logs --follow
  std::string out_dir;                // download --out
  bool force = false;                 // download --force
  std::string worker_id;              // drain, undrain
  bool now = false;                   // drain --now
};

// ANSI "erase to the end of the line", after a redrawn bar that may be shorter than the last.
constexpr const char* kEraseLineEnd = "\033[K";

int Fail(std::ostream& err, const absl::Status& status) {
  err << "matctl: " << api::StatusLine(status) << "\n";
  return kExitError;
}

// "QUEUED" or "queued" -> JOB_STATE_QUEUED; INVALID_ARGUMENT "unknown job state 'x' (one of
// QUEUED, ...)".
absl::StatusOr<v1::JobState> ParseState(const std::string& text) {
  const std::string upper = absl::AsciiStrToUpper(text);
  std::vector<std::string> names;
  for (int s = v1::JobState_MIN; s <= v1::JobState_MAX; ++s) {
    const auto state = static_cast<v1::JobState>(s);
    if (state == v1::JOB_STATE_UNSPECIFIED || !v1::JobState_IsValid(s)) continue;
    if (api::JobStateName(state) == upper) return state;
    names.push_back(api::JobStateName(state));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown job state '", text, "' (one of ",
                                                 absl::StrJoin(names, ", "), ")"));
}

// Prints events until the job finishes; the job's final state through `final_state`. With
// `progress`, one progress bar (FormatProgressBar) redrawn in place with '\r', and state changes
// and evaluations on lines of their own above it; otherwise one line per event.
// How long watch, submit --wait and logs --follow keep trying to reach a coordinator they lost
// (one restarting on its state dir keeps its jobs; its workers are back within a second).
constexpr auto kReconnectFor = std::chrono::seconds(120);

absl::Status Watch(JobClient& client, const std::string& job_id, bool progress, int columns,
                   std::ostream& out, std::ostream& err, v1::JobState* final_state) {
  // A QUEUED or RESTARTING job's "JOB waiting: why" line (GetJob's `waiting`, as `status`
  // shows it), else "". Events do not carry it.
  const auto waiting = [&](const v1::JobEvent& event) -> std::string {
    if (!event.has_state() || (event.state().state() != v1::JOB_STATE_QUEUED &&
                               event.state().state() != v1::JOB_STATE_RESTARTING)) {
      return "";
    }
    absl::StatusOr<v1::GetJobReply> job = client.GetJob(job_id);
    if (!job.ok() || job->waiting().empty()) return "";
    return absl::StrCat(job_id, " waiting: ", job->waiting());
  };
  int64_t events = 0;  // events received: the coordinator knows the job once there is one
  const auto watch_once = [&](const std::function<void(const v1::JobEvent&)>& on_event) {
    return RetryWhileUnavailable(client.address(), err, kReconnectFor, [&] { return events; }, [&] {
      return client.WatchJob(job_id, [&](const v1::JobEvent& event) {
        ++events;
        on_event(event);
      });
    });
  };
  if (!progress) {
    return watch_once([&](const v1::JobEvent& event) {
      out << FormatJobEvent(event) << std::endl;  // flushed: someone is watching
      if (const std::string why = waiting(event); !why.empty()) out << why << std::endl;
      if (event.has_state()) *final_state = event.state().state();
    });
  }
  absl::StatusOr<v1::GetJobReply> job = client.GetJob(job_id);  // the total steps
  if (!job.ok()) return job.status();
  WatchState state = WatchStateFromJob(*job);
  bool bar_shown = false;
  absl::Status status = watch_once([&](const v1::JobEvent& event) {
    if (event.has_state()) *final_state = event.state().state();
    if (ApplyJobEvent(event, &state)) {
      out << "\r" << FormatJobEvent(event) << kEraseLineEnd << "\n";
    }
    if (const std::string why = waiting(event); !why.empty()) {
      out << "\r" << why << kEraseLineEnd << "\n";
    }
    out << "\r" << FormatProgressBar(state, columns) << kEraseLineEnd << std::flush;
    bar_shown = true;
  });
  if (bar_shown) out << "\n" << std::flush;  // leave the last bar on screen
  return status;
}

// Whether `watch` draws the bar: the flags, else whether `out` is a terminal.
bool UseProgressBar(const MatctlOptions& o, const OutputTerminal& terminal) {
  if (o.progress) return true;
  if (o.no_progress) return false;
  return terminal.is_terminal;
}

int Submit(const MatctlOptions& o, const OutputTerminal& terminal, std::ostream& out,
           std::ostream& err) {
  absl::StatusOr<v1::JobSpec> spec = api::LoadJobSpecYaml(o.job_file);
  if (!spec.ok()) return Fail(err, spec.status());
  if (!google::protobuf::internal::IsStructurallyValidUTF8(o.request_id)) {
    return Fail(err, absl::InvalidArgumentError("--request-id: not valid UTF-8"));
  }
  if (absl::Status valid = api::ValidateJobSpec(*spec); !valid.ok()) {
    return Fail(err, absl::InvalidArgumentError(absl::StrCat(o.job_file, ": ", valid.message())));
  }
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  absl::StatusOr<v1::SubmitJobReply> reply = client.SubmitJob(o.request_id, *spec);
  if (!reply.ok()) return Fail(err, reply.status());
  out << reply->job_id() << std::endl;
  if (!reply->created()) {
    err << "matctl: request id '" << o.request_id << "' already submitted as "
        << reply->job_id() << "\n";
  }
  if (!o.wait) return kExitOk;
  v1::JobState final_state = v1::JOB_STATE_UNSPECIFIED;
  if (absl::Status s = Watch(client, reply->job_id(), UseProgressBar(o, terminal),
                             terminal.columns, out, err, &final_state);
      !s.ok()) {
    return Fail(err, s);
  }
  return final_state == v1::JOB_STATE_SUCCEEDED ? kExitOk : kExitError;
}

int List(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  std::vector<v1::JobState> states;
  for (const std::string& text : o.states) {
    absl::StatusOr<v1::JobState> state = ParseState(text);  // checked by the parser already
    if (!state.ok()) return Fail(err, state.status());
    states.push_back(*state);
  }
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  absl::StatusOr<std::vector<v1::Job>> jobs = client.ListAllJobs(states);
  if (!jobs.ok()) return Fail(err, jobs.status());
  out << FormatJobTable(*jobs);
  return kExitOk;
}

int Status(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
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
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  absl::StatusOr<v1::CancelJobReply> reply = client.CancelJob(o.job_id, o.reason);
  if (!reply.ok()) return Fail(err, reply.status());
  out << o.job_id << " " << api::JobStateName(reply->state()) << "\n";
  return kExitOk;
}

int Delete(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  // Each job on its own: one that is refused does not keep the others.
  int code = kExitOk;
  for (size_t i = 0; i < o.job_ids.size(); ++i) {
    const std::string& job_id = o.job_ids[i];
    absl::StatusOr<int64_t> freed = (*made)->DeleteJob(job_id);
    if (!freed.ok()) {
      code = Fail(err, freed.status());
      // The coordinator, not the job: the next ones would fail the same way, each after a wait.
      const absl::StatusCode c = freed.status().code();
      if (c == absl::StatusCode::kUnavailable || c == absl::StatusCode::kUnauthenticated ||
          c == absl::StatusCode::kDeadlineExceeded) {
        if (i + 1 < o.job_ids.size()) {
          err << "matctl: not tried: "
              << absl::StrJoin(o.job_ids.begin() + static_cast<std::ptrdiff_t>(i) + 1,
                               o.job_ids.end(), " ")
              << "\n";
        }
        return code;
      }
      continue;
    }
    out << job_id << " deleted (" << FormatBytes(*freed) << " of artifacts freed)\n" << std::flush;
  }
  return code;
}

int WatchCommand(const MatctlOptions& o, const OutputTerminal& terminal, std::ostream& out,
                 std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  v1::JobState final_state = v1::JOB_STATE_UNSPECIFIED;
  if (absl::Status s = Watch(client, o.job_id, UseProgressBar(o, terminal), terminal.columns,
                             out, err, &final_state);
      !s.ok()) {
    return Fail(err, s);
  }
  return kExitOk;
}

int Spectra(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  absl::StatusOr<v1::GetSpectraReply> reply = client.GetAllSpectra(o.job_id);
  if (!reply.ok()) return Fail(err, reply.status());
  if (o.output == "json") {
    out << SpectraToJson(o.job_id, *reply).dump(2) << "\n";
  } else {
    out << SpectraToCsv(*reply);
  }
  return kExitOk;
}

int Plot(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  absl::StatusOr<v1::GetJobReply> job = client.GetJob(o.job_id);
  if (!job.ok()) return Fail(err, job.status());
  absl::StatusOr<v1::GetSpectraReply> spectra = client.GetAllSpectra(o.job_id);
  if (!spectra.ok()) return Fail(err, spectra.status());
  const v1::JobSpec& spec = job->job().spec();
  if (spectra->points_size() == 0) {
    std::string why = o.job_id + " has no λ reports yet";
    if (spec.policy().kind() != "mat") {
      absl::StrAppend(&why, " (policy ", spec.policy().kind(), " needs no spectra)");
    }
    return Fail(err, absl::FailedPreconditionError(why));
  }
  // Only the mat policy thresholds λ; other policies get no mask overlay (alpha NaN).
  const double alpha = spec.policy().kind() == "mat" ? spec.policy().alpha() : std::nan("");
  const std::string title = absl::StrCat(o.job_id, ": λ_max per module and probe step (",
                                         DescribeModel(spec), ", ", DescribePolicy(spec), ")");
  absl::StatusOr<std::string> svg = RenderSpectraSvg(*spectra, alpha, title);
  if (!svg.ok()) {
    return Fail(err, absl::Status(svg.status().code(),
                                  absl::StrCat(o.job_id, ": ", svg.status().message())));
  }
  if (absl::Status s = common::WriteFileAtomic(o.plot_file, *svg); !s.ok()) return Fail(err, s);
  out << o.plot_file << "\n";
  return kExitOk;
}

int Workers(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  absl::StatusOr<std::vector<v1::WorkerInfo>> workers = client.ListWorkers();
  if (!workers.ok()) return Fail(err, workers.status());
  out << FormatWorkerTable(*workers, static_cast<int64_t>(std::time(nullptr)));
  return kExitOk;
}

int Drain(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  absl::StatusOr<v1::WorkerInfo> worker = client.DrainWorker(o.worker_id, o.reason, o.now);
  if (!worker.ok()) return Fail(err, worker.status());
  out << o.worker_id << " " << WorkerStateName(worker->state());
  if (worker->state() == v1::WORKER_STATE_DRAINING && !worker->job_id().empty()) {
    out << (o.now ? ": stopping its rank " : ": it stops when the job ends; rank ")
        << worker->rank() << " of " << worker->job_id();
  } else if (worker->state() == v1::WORKER_STATE_DRAINING) {
    out << ": runs no rank, told to stop";
  } else if (worker->state() == v1::WORKER_STATE_DISCONNECTED && !worker->drain_reason().empty()) {
    out << ": not connected; told to stop when it comes back";
  }
  out << "\n" << std::flush;
  // A worker that is not connected has nothing to leave: --wait returns at once.
  if (!o.wait || worker->state() == v1::WORKER_STATE_DISCONNECTED) return kExitOk;
  // Until it left: its session ended (DISCONNECTED).
  while (worker->state() != v1::WORKER_STATE_DISCONNECTED) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    absl::StatusOr<std::vector<v1::WorkerInfo>> workers = client.ListWorkers();
    if (!workers.ok()) return Fail(err, workers.status());
    for (const v1::WorkerInfo& w : *workers) {
      if (w.worker_id() == o.worker_id) *worker = w;
    }
  }
  // A worker that crashed before it was told to stop: the drain still waits for it.
  out << o.worker_id << " " << WorkerStateName(worker->state())
      << (worker->drain_reason().empty() ? "" : ": the drain waits for it to come back") << "\n";
  return kExitOk;
}

int Undrain(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  absl::StatusOr<v1::WorkerInfo> worker = (*made)->UndrainWorker(o.worker_id);
  if (!worker.ok()) return Fail(err, worker.status());
  out << o.worker_id << " " << WorkerStateName(worker->state()) << ": in service\n";
  return kExitOk;
}

// A summary's "eval_curve" rebuilt from a run's metrics.jsonl (its lines with a val_loss).
absl::StatusOr<nlohmann::json> EvalCurveFromMetrics(const std::string& path) {
  absl::StatusOr<std::string> text = common::ReadFile(path);
  if (!text.ok()) return text.status();
  nlohmann::json step = nlohmann::json::array(), flops = nlohmann::json::array(),
                 val = nlohmann::json::array(), wall = nlohmann::json::array();
  std::istringstream lines(*text);
  for (std::string line; std::getline(lines, line);) {
    nlohmann::json m = nlohmann::json::parse(line, nullptr, false);
    if (!m.is_object() || !m.contains("val_loss") || !m["val_loss"].is_number() ||
        !m.contains("flops") || !m["flops"].is_object()) {
      continue;
    }
    step.push_back(m.value("step", int64_t{0}));
    flops.push_back(m["flops"].value("total", 0.0));
    val.push_back(m["val_loss"].get<double>());
    wall.push_back(m.value("wall_seconds", 0.0));
  }
  if (step.empty()) return absl::NotFoundError(path + ": no evaluation lines");
  return nlohmann::json{{"step", step}, {"flops", flops}, {"val_loss", val}, {"wall_seconds", wall}};
}

// compare's runs: a directory holding summary.json (a mat-train --out, a downloaded job) is read
// from disk; anything else is a job id, whose summary the coordinator holds once it finished.
// A run named on the command line, as compare matches --baseline: "runs/a/", "./runs/a" and
// "runs/a" are one run.
std::string RunKey(const std::string& name) {
  std::string key = std::filesystem::path(name).lexically_normal().string();
  while (key.size() > 1 && key.back() == '/') key.pop_back();
  return key;
}

absl::StatusOr<std::vector<CompareRun>> LoadRuns(const MatctlOptions& o) {
  std::vector<CompareRun> runs;
  std::unique_ptr<JobClient> client;
  for (const std::string& name : o.runs) {
    std::error_code error;
    const bool directory = std::filesystem::is_directory(name, error);
    if (directory || std::filesystem::is_regular_file(name, error)) {
      // A run directory, or its summary.json itself.
      const std::string path =
          directory ? (std::filesystem::path(name) / "summary.json").string() : name;
      absl::StatusOr<std::string> text = common::ReadFile(path);
      if (!text.ok()) return text.status();
      nlohmann::json summary = nlohmann::json::parse(*text, nullptr, false);
      if (summary.is_discarded() || !summary.is_object()) {
        return absl::InvalidArgumentError(path + ": not a JSON object");
      }
      if (!summary.contains("eval_curve")) {
        // A run from before summaries carried their curve: its metrics.jsonl has the points.
        absl::StatusOr<nlohmann::json> curve = EvalCurveFromMetrics(
            (std::filesystem::path(path).parent_path() / "metrics.jsonl").string());
        if (curve.ok()) summary["eval_curve"] = std::move(*curve);
      }
      runs.push_back({name, std::move(summary)});
      continue;
    }
    if (!absl::StartsWith(name, "job-")) {
      return absl::NotFoundError(absl::StrCat("'", name,
                                              "' is neither a run directory (or its "
                                              "summary.json) nor a job id (job-NNNNNN)"));
    }
    if (client == nullptr) {
      absl::StatusOr<std::unique_ptr<JobClient>> made =
          JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
      if (!made.ok()) return made.status();
      client = std::move(*made);
    }
    absl::StatusOr<v1::GetJobReply> job = client->GetJob(name);
    if (!job.ok()) return job.status();
    if (job->job().summary_json().empty()) {
      const v1::Job& j = job->job();
      if (j.state() == v1::JOB_STATE_SUCCEEDED) {  // rank 0 reported none (or an old store)
        return absl::FailedPreconditionError(absl::StrCat(
            name, " succeeded, but the coordinator holds no summary of it (rank 0 sent none)"));
      }
      if (api::IsTerminalJobState(j.state())) {  // it never will have one
        return absl::FailedPreconditionError(absl::StrCat(
            name, " has no summary: it ended ", api::JobStateName(j.state()),
            j.error_message().empty() ? "" : absl::StrCat(" (", j.error_message(), ")"),
            " before writing one; compare needs jobs that succeeded"));
      }
      return absl::FailedPreconditionError(
          absl::StrCat(name, " has no summary yet (state ", api::JobStateName(j.state()),
                       "); compare needs finished jobs"));
    }
    nlohmann::json summary = nlohmann::json::parse(job->job().summary_json(), nullptr, false);
    if (summary.is_discarded() || !summary.is_object()) {
      return absl::DataLossError(name + ": the coordinator's summary is not a JSON object");
    }
    runs.push_back({name, std::move(summary)});
  }
  return runs;
}

// Whether `dir` holds `artifact` already: true when its file there has the artifact's SHA-256,
// false when there is none; FAILED_PRECONDITION naming the file when something else is there.
absl::StatusOr<bool> HasArtifact(const std::string& job_id, const v1::Artifact& artifact,
                                 const std::string& dir) {
  namespace fs = std::filesystem;
  MAT_RETURN_IF_ERROR(api::CheckArtifactName(artifact.name()));  // never outside `dir`
  const std::string dest = dir + "/" + artifact.name();
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(dest, ec))) return false;
  if (fs::is_regular_file(fs::symlink_status(dest, ec))) {
    absl::StatusOr<api::FileDigest> have = api::DigestFile(dest);
    if (have.ok() && have->sha256 == artifact.sha256()) return true;
  }
  return absl::FailedPreconditionError(
      absl::StrCat(dest, " exists and differs from ", job_id, "'s ", artifact.name(),
                   ": move it away, or pass --force to replace it"));
}

// Fetches `artifact` into `dir`, replacing what is there (the caller checked it: HasArtifact):
// through `.NAME.download` (a download cut short goes on from its end), checked against the
// SHA-256, then put in place by common::CommitFile (flushed, renamed, its folder flushed: a crash
// right after cannot leave an empty or partial file under the name). A resumed download whose
// bytes do not match (a stale or damaged partial file) starts again from scratch, once. A piece
// whose file is no longer the listed one (ReadArtifactReply's size and SHA-256) ends it: ABORTED.
absl::Status DownloadArtifact(JobClient& client, const std::string& job_id,
                              const v1::Artifact& artifact, const std::string& dir) {
  namespace fs = std::filesystem;
  MAT_RETURN_IF_ERROR(api::CheckArtifactName(artifact.name()));  // never outside `dir`
  const std::string dest = dir + "/" + artifact.name();
  const std::string part = dir + "/." + artifact.name() + ".download";
  std::error_code ec;
  if (fs::is_symlink(part, ec)) fs::remove(part, ec);
  int64_t offset = fs::is_regular_file(part, ec) ? int64_t(fs::file_size(part, ec)) : 0;
  if (ec || offset > artifact.bytes()) offset = 0;
  const int64_t resumed_from = offset;
  std::ofstream file(part, std::ios::binary | (offset > 0 ? std::ios::app : std::ios::trunc));
  if (!file) return absl::PermissionDeniedError(absl::StrCat(part, ": cannot write"));
  while (offset < artifact.bytes()) {
    MAT_ASSIGN_OR_RETURN(v1::ReadArtifactReply piece,
                         client.ReadArtifact(job_id, artifact.name(), offset));
    if (piece.sha256() != artifact.sha256() || piece.total_bytes() != artifact.bytes()) {
      // A later upload replaced the file (a restarted job's rank 0): these bytes mix two files.
      file.close();
      fs::remove(part, ec);
      return absl::AbortedError(absl::StrCat(
          artifact.name(), " of ", job_id, " changed on the coordinator during the download (",
          piece.total_bytes(), " bytes, SHA-256 ", piece.sha256(), "; listed with ",
          artifact.bytes(), " bytes, ", artifact.sha256(), "); removed. Download again"));
    }
    if (piece.data().empty()) {
      return absl::DataLossError(absl::StrCat(artifact.name(), ": the coordinator sent nothing at ",
                                              offset, " of ", artifact.bytes(), " bytes"));
    }
    file.write(piece.data().data(), std::streamsize(piece.data().size()));
    offset += int64_t(piece.data().size());
  }
  file.close();
  if (!file) return absl::InternalError(absl::StrCat(part, ": write failed"));
  MAT_ASSIGN_OR_RETURN(api::FileDigest got, api::DigestFile(part));
  if (got.sha256 != artifact.sha256() || got.bytes != artifact.bytes()) {
    fs::remove(part, ec);
    if (resumed_from > 0) return DownloadArtifact(client, job_id, artifact, dir);  // now fresh
    return absl::DataLossError(absl::StrCat(artifact.name(), ": SHA-256 ", got.sha256,
                                            " of the bytes received, the coordinator's is ",
                                            artifact.sha256(),
                                            "; removed. Download again: when it differs again, "
                                            "the coordinator's copy no longer matches the "
                                            "SHA-256 recorded at upload (a damaged file in its "
                                            "--artifact-dir)"));
  }
  return common::CommitFile(part, dest);
}

int Download(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  // The state first: a job seen SUCCEEDED has all its files listed (rank 0 uploads before it
  // says it finished); listed first, a job that succeeded in between could lack the last ones.
  absl::StatusOr<v1::GetJobReply> job = client.GetJob(o.job_id);
  if (!job.ok()) return Fail(err, job.status());
  const v1::JobState state = job->job().state();
  absl::StatusOr<v1::ListArtifactsReply> list = client.ListArtifacts(o.job_id);
  if (!list.ok()) return Fail(err, list.status());
  for (const std::string& why : list->refused()) {
    err << "matctl: the coordinator refused an artifact: " << why << "\n";
  }
  if (list->artifacts_size() == 0) {
    return Fail(err, absl::NotFoundError(absl::StrCat(
                         "job ", o.job_id, " has no artifacts (it is ", api::JobStateName(state),
                         "; rank 0 uploads them when its part of the job ends)")));
  }
  // Only a SUCCEEDED job's files are known to be all of them (its rank 0 uploads before it says
  // it finished). After a cancel, a failure or a lost peer rank 0 uploads what it has once it has
  // stopped, after the job's state changed; a job still running has an earlier attempt's files,
  // or its rank 0's while other ranks still run.
  const auto listed = [&](const std::string& name) {
    for (const v1::Artifact& a : list->artifacts()) {
      if (a.name() == name) return true;
    }
    for (const std::string& why : list->refused()) {
      if (absl::StartsWith(why, name + " ")) return true;
    }
    return false;
  };
  if (!api::IsTerminalJobState(state)) {
    err << "matctl: " << o.job_id << " is " << api::JobStateName(state)
        << ": these files may be an earlier attempt's, or not yet final; the job's own are "
           "final when it has SUCCEEDED\n";
  } else if (state != v1::JOB_STATE_SUCCEEDED && !listed("model.safetensors")) {
    err << "matctl: no model.safetensors from " << o.job_id << " (" << api::JobStateName(state)
        << ") yet: after a cancel or a failure rank 0 gives back what it has once it has "
           "stopped, the model only from a checkpoint; `matctl logs "
        << o.job_id << "` says when it is done (\"artifacts uploaded to the coordinator\") or "
                       "that there is none (\"no checkpoint yet\"): download again then\n";
  }
  if (absl::Status s = common::MakeDirs(o.out_dir); !s.ok()) return Fail(err, s);
  // Nothing is written while any file there would be replaced (without --force); each file is
  // digested once.
  std::vector<bool> there;
  for (const v1::Artifact& a : list->artifacts()) {
    absl::StatusOr<bool> has = HasArtifact(o.job_id, a, o.out_dir);
    if (!has.ok() && !(o.force && has.status().code() == absl::StatusCode::kFailedPrecondition)) {
      return Fail(err, has.status());
    }
    there.push_back(has.ok() && *has);
  }
  for (int i = 0; i < list->artifacts_size(); ++i) {
    const v1::Artifact& a = list->artifacts(i);
    if (absl::Status s = there[i] ? absl::OkStatus()
                                  : DownloadArtifact(client, o.job_id, a, o.out_dir);
        !s.ok()) {
      return Fail(err, s);
    }
    out << a.name() << "  " << FormatBytes(a.bytes()) << "  sha256 " << a.sha256() << "\n";
  }
  out << list->artifacts_size() << " files (" << FormatBytes(list->total_bytes()) << ") in "
      << o.out_dir << "\n";
  return kExitOk;
}

int Compare(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::vector<CompareRun>> runs = LoadRuns(o);
  if (!runs.ok()) return Fail(err, runs.status());
  int baseline = DefaultBaseline(*runs);
  if (!o.baseline.empty()) {
    baseline = -1;
    for (size_t i = 0; i < runs->size(); ++i) {
      if (RunKey((*runs)[i].name) == RunKey(o.baseline)) baseline = static_cast<int>(i);
    }
    if (baseline < 0) {
      return Fail(err, absl::InvalidArgumentError("--baseline " + o.baseline +
                                                  " is not one of the runs compared"));
    }
  }
  absl::StatusOr<CompareTable> table = CompareRuns(*runs, baseline, o.budgets);
  if (!table.ok()) return Fail(err, table.status());
  if (!o.svg_file.empty()) {
    absl::StatusOr<std::string> svg = RenderCompareSvg(
        *runs, *table, "validation loss against FLOPs (baseline " + table->baseline + ")");
    if (!svg.ok()) return Fail(err, svg.status());
    if (absl::Status s = common::WriteFileAtomic(o.svg_file, *svg); !s.ok()) return Fail(err, s);
  }
  if (o.output == "json") {
    out << CompareToJson(*table).dump(2) << "\n";
  } else {
    out << FormatCompareTable(*table);
  }
  return kExitOk;
}

// Prints the job's kept lines; with --follow, polls for new ones until the job has ended, no rank
// will send more (GetJobLogsReply.log_complete) and every line is printed.
int Logs(const MatctlOptions& o, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<JobClient>> made =
      JobClient::Create(o.coordinator, o.timeout_seconds, o.security);
  if (!made.ok()) return Fail(err, made.status());
  JobClient& client = **made;
  int64_t after = 0;
  bool first = true;
  while (true) {
    absl::StatusOr<v1::GetJobLogsReply> reply;
    // --follow rides out a coordinator restart, as watch does.
    absl::Status got = RetryWhileUnavailable(
        client.address(), err, kReconnectFor, [&] { return int64_t{o.follow && !first}; }, [&] {
          reply = client.GetJobLogs(o.job_id, o.rank, after);
          return reply.status();
        });
    if (!got.ok()) return Fail(err, got);
    if (first && reply->dropped() > 0) {
      err << "matctl: the coordinator dropped " << reply->dropped()
          << " older lines of " << o.job_id << " (mat-coordinator --max-log-lines)\n";
    }
    first = false;
    for (const v1::LogLine& line : reply->lines()) out << FormatLogLine(line) << "\n";
    out << std::flush;
    after = reply->last_seq();
    if (reply->lines_size() > 0) continue;  // maybe more pages
    // A cancelled rank sends its last lines after its job ended: its coordinator says when no
    // more will come (one without the field: the terminal state).
    const bool complete = reply->has_log_complete() ? reply->log_complete()
                                                    : api::IsTerminalJobState(reply->state());
    if (!o.follow || complete) return kExitOk;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

// --progress / --no-progress on a command that watches.
void AddProgressFlags(CLI::App* command, MatctlOptions& o) {
  CLI::Option* on = command->add_flag(
      "--progress", o.progress,
      "draw a progress bar redrawn in place (default: when stdout is a terminal)");
  CLI::Option* off =
      command->add_flag("--no-progress", o.no_progress, "one line per event, also on a terminal");
  on->excludes(off);
}

}  // namespace

OutputTerminal DetectStdoutTerminal() {
  OutputTerminal terminal;
  terminal.is_terminal = ::isatty(STDOUT_FILENO) == 1;
  winsize size{};
  if (terminal.is_terminal && ::ioctl(STDOUT_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) {
    terminal.columns = size.ws_col;
  }
  return terminal;
}

// A subcommand and what runs it (after a successful parse).
struct Command {
  CLI::App* app;
  std::function<int()> run;
};

// submit, list, status, cancel, delete, watch: a job's life.
std::vector<Command> AddJobCommands(CLI::App& app, MatctlOptions& o,
                                    const OutputTerminal& terminal, std::ostream& out,
                                    std::ostream& err) {
  CLI::App* submit = app.add_subcommand("submit", "submit a job YAML file; prints the job id");
  submit->add_option("job_file", o.job_file, "the job spec (YAML)")->required();
  submit->add_option("--request-id", o.request_id,
                     "idempotency key: resubmitting with the same id returns the same job");
  CLI::Option* wait = submit->add_flag("--wait", o.wait, "then watch the job until it finishes");
  AddProgressFlags(submit, o);
  submit->get_option("--progress")->needs(wait);
  submit->get_option("--no-progress")->needs(wait);

  CLI::App* list = app.add_subcommand("list", "list jobs");
  list->add_option("--state", o.states, "only jobs in this state (repeatable)")
      ->check(CLI::Validator(
          [](std::string& text) {
            absl::StatusOr<v1::JobState> state = ParseState(text);
            return state.ok() ? std::string() : std::string(state.status().message());
          },
          "STATE"));

  CLI::App* status =
      app.add_subcommand("status", "show one job (progress, losses, mask, ranks, summary)");
  status->add_option("job", o.job_id, "job id")->required();
  status->add_option("-o,--output", o.output, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->default_val("text");

  CLI::App* cancel = app.add_subcommand("cancel", "cancel a job");
  cancel->add_option("job", o.job_id, "job id")->required();
  cancel->add_option("--reason", o.reason, "stored as the job's message");

  CLI::App* del = app.add_subcommand(
      "delete", "delete finished jobs and what the coordinator keeps of them (model and "
                "other artifacts, logs, λ history); download what you need first");
  del->add_option("jobs", o.job_ids, "job ids")->required();

  CLI::App* watch =
      app.add_subcommand("watch", "follow a job until it finishes (a progress bar on a terminal)");
  watch->footer(
      "On a terminal (or with --progress): one line redrawn in place, e.g.\n"
      "  [###.......] step 120/1000 12% loss 6.123 val 6.05 active 40/48 mask v7 3.2 step/s "
      "ETA 4m\n"
      "with state changes and evaluations on lines of their own. Otherwise (or with "
      "--no-progress): one line per event.");
  watch->add_option("job", o.job_id, "job id")->required();
  AddProgressFlags(watch, o);

  return {{submit, [&] { return Submit(o, terminal, out, err); }},
          {list, [&] { return List(o, out, err); }},
          {status, [&] { return Status(o, out, err); }},
          {cancel, [&] { return Cancel(o, out, err); }},
          {del, [&] { return Delete(o, out, err); }},
          {watch, [&] { return WatchCommand(o, terminal, out, err); }}};
}

// spectra, plot, workers, drain, undrain, logs, download, compare: what a job left and the
// cluster.
std::vector<Command> AddResultCommands(CLI::App& app, MatctlOptions& o, std::ostream& out,
                                       std::ostream& err) {
  CLI::App* spectra = app.add_subcommand("spectra", "print a job's λ_max history");
  spectra->add_option("job", o.job_id, "job id")->required();
  spectra->add_option("-o,--output", o.output, "csv or json")
      ->check(CLI::IsMember({"csv", "json"}))
      ->default_val("csv");

  CLI::App* plot = app.add_subcommand(
      "plot", "write a job's λ_max history as an SVG heatmap with an approximate mask");
  plot->footer(
      "x: probe step, y: module (grouped), color: log10 λ_max (viridis). Hatched cells "
      "APPROXIMATE the mask, which the API does not expose: a module counts as off at a probe "
      "step when its λ is at or below min + (max - min)·alpha of its group's λ at that step, "
      "alpha = the job's policy.alpha (mat policy only). The real mask also depends on the EMA "
      "smoothing, warm-up, min_active_fraction and the temporal rule. Prints the file's path.");
  plot->add_option("job", o.job_id, "job id")->required();
  plot->add_option("--out", o.plot_file, "the SVG file to write (replaced atomically)")
      ->required();

  CLI::App* workers = app.add_subcommand(
      "workers", "list the coordinator's workers (state, device, host, job, rank, last seen)");

  CLI::App* drain = app.add_subcommand(
      "drain", "take a worker out of service: no new rank goes to it; once its job ends (or "
               "at once with --now) it is told to stop and exits");
  drain->footer(
      "With --now its job restarts from its checkpoints on other workers, as after a worker "
      "loss (this counts one of the job's restarts). The coordinator stores the drain: it holds "
      "across a coordinator restart and the worker's reconnects until the worker has been told to "
      "stop and left. A worker started again after that is in service. A disconnected worker "
      "may be drained too: it is told to stop when it comes back. `matctl undrain` ends a drain "
      "before the worker was told to stop.");
  drain->add_option("worker", o.worker_id, "worker id (matctl workers)")->required();
  drain->add_option("--reason", o.reason, "why (the worker's log, and its job's error with --now)");
  drain->add_flag("--now", o.now, "stop the worker's rank now instead of at its job's end");
  drain->add_flag("--wait", o.wait, "return once the worker has left (DISCONNECTED)");

  CLI::App* undrain = app.add_subcommand(
      "undrain", "end a worker's drain before it was told to stop: it takes ranks again");
  undrain->add_option("worker", o.worker_id, "worker id (matctl workers)")->required();

  CLI::App* logs = app.add_subcommand(
      "logs", "print a job's log lines as its ranks forwarded them (like kubectl logs)");
  logs->add_option("job", o.job_id, "job id")->required();
  logs->add_option("--rank", o.rank, "only this rank's lines")->check(CLI::Range(0, 1 << 20));
  logs->add_flag("-f,--follow", o.follow, "keep printing new lines until the job ends");

  CLI::App* download = app.add_subcommand(
      "download", "fetch a job's artifacts (model.safetensors, summary.json, metrics.jsonl, "
                  "masks.jsonl, job_spec.yaml) into a directory, each checked by SHA-256");
  download->footer(
      "Rank 0 uploads them to the coordinator when its part of the job ends (also after a "
      "failure or a cancel, with the model of its newest checkpoint). A download cut short goes "
      "on where it stopped; files already there with the right SHA-256 are kept. Open the model "
      "in Python: safetensors.torch.load_file(\"DIR/model.safetensors\").");
  download->add_option("job", o.job_id, "job id")->required();
  download->add_option("--out", o.out_dir, "the directory to write (created)")->required();
  download->add_flag("--force", o.force,
                     "replace files there that differ from the job's (refused otherwise)");

  CLI::App* compare = app.add_subcommand(
      "compare", "finished runs side by side: loss at equal FLOP budgets, test, cost to the "
                 "baseline's best");
  compare->footer(
      "RUN is a job id (the coordinator's summary, once the job finished) or a directory "
      "holding a summary.json (mat-train --out, a downloaded job). The baseline is --baseline, "
      "else the first run with policy full, else the first run. VAL@b is the validation loss "
      "at the last evaluation within b x the baseline's FLOPs.");
  compare->add_option("runs", o.runs, "job ids or run directories")->required();
  compare->add_option("--baseline", o.baseline, "the run the others are measured against");
  compare->add_option("--budgets", o.budgets, "FLOP budgets as fractions of the baseline's")
      ->delimiter(',')
      ->capture_default_str();
  compare->add_option("-o,--output", o.output, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->default_val("text");
  compare->add_option("--svg", o.svg_file, "also write validation loss against FLOPs as SVG");

  return {{spectra, [&] { return Spectra(o, out, err); }},
          {plot, [&] { return Plot(o, out, err); }},
          {workers, [&] { return Workers(o, out, err); }},
          {drain, [&] { return Drain(o, out, err); }},
          {undrain, [&] { return Undrain(o, out, err); }},
          {logs, [&] { return Logs(o, out, err); }},
          {download, [&] { return Download(o, out, err); }},
          {compare, [&] { return Compare(o, out, err); }}};
}

int RunMatctl(int argc, const char* const* argv, std::ostream& out, std::ostream& err,
              const OutputTerminal& terminal) {
  MatctlOptions o;
  CLI::App app{
      "matctl: submit, inspect, watch, plot and cancel MAT jobs, and list the workers of a "
      "mat-coordinator"};
  app.footer(
      "Exit codes: 0 success; 1 an error, printed as \"matctl: CODE: message\" (and submit "
      "--wait when the job did not succeed); 2 bad command-line usage.");
  app.require_subcommand(1);
  app.add_option("--coordinator", o.coordinator, "coordinator gRPC address HOST:PORT")
      ->capture_default_str();
  app.add_option("--timeout", o.timeout_seconds, "deadline of each call, seconds")
      // NaN passed CLI::PositiveNumber and a huge value overflowed the deadline: both then read
      // as "cannot reach the coordinator".
      ->check(CLI::Validator(
          [](std::string& text) -> std::string {
            double v = 0;
            if (!absl::SimpleAtod(text, &v) || !(v >= 0.001 && v <= 31536000.0)) {
              return "--timeout must be a number of seconds in [0.001, 31536000], got " + text;
            }
            return "";
          },
          "SECONDS", "timeout"))
      ->capture_default_str();
  app.add_option("--token-file", o.security.token_file,
                 "send the first token of this file as 'authorization: Bearer TOKEN' (for a "
                 "coordinator started with --auth-token-file)");
  app.add_option("--tls-ca", o.security.tls_ca_file,
                 "connect over TLS, verifying the coordinator's certificate against this CA (PEM)");
  CLI::Option* tls_cert = app.add_option(
      "--tls-cert", o.security.tls_cert_file,
      "client certificate (PEM) for a coordinator that requires mutual TLS; needs --tls-key and "
      "--tls-ca");
  CLI::Option* tls_key =
      app.add_option("--tls-key", o.security.tls_key_file, "the private key of --tls-cert (PEM)");
  // Usage errors (exit 2), not failures of the command.
  tls_cert->needs(tls_key);
  tls_key->needs(tls_cert);
  tls_cert->needs("--tls-ca");

  std::vector<Command> commands = AddJobCommands(app, o, terminal, out, err);
  for (Command& c : AddResultCommands(app, o, out, err)) commands.push_back(std::move(c));
  // CLI11 answers a mistyped command with "A subcommand is required": name it instead.
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (absl::StartsWith(arg, "-")) {
      CLI::Option* option = app.get_option_no_throw(arg.substr(0, arg.find('=')));
      if (option != nullptr && option->get_expected_min() > 0 && arg.find('=') == arg.npos) ++i;
      continue;
    }
    std::vector<std::string> names;
    for (const Command& c : commands) names.push_back(c.app->get_name());
    if (std::find(names.begin(), names.end(), arg) == names.end()) {
      err << "matctl: unknown command '" << arg << "' (one of " << absl::StrJoin(names, ", ")
          << "; matctl --help)\n";
      return kExitUsage;
    }
    break;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e, out, err);  // prints the help or the usage error
    return code == 0 ? kExitOk : kExitUsage;
  }
  // gRPC would take "127.0.0.1:99999" as some other port and "" as a failed secure channel.
  if (absl::Status st = common::ParseHostPort(o.coordinator, /*min_port=*/1).status(); !st.ok()) {
    err << "matctl: --coordinator: " << st.message() << "\n";
    return kExitUsage;
  }

  for (const Command& c : commands) {
    if (c.app->parsed()) return c.run();
  }
  return Fail(err, absl::InternalError("no command"));  // require_subcommand prevents this
}

}  // namespace mat::client
