#include "client/format.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "api/job_state.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"

namespace mat::client {
namespace {

using google::protobuf::FieldDescriptor;
using nlohmann::json;

// Shortest text that reads back as the same double.
std::string FormatDouble(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, end);
}

json DoubleToJson(double v) {
  if (std::isfinite(v)) return v;
  return FormatDouble(v);  // JSON has no NaN or infinities
}

json MessageToJson(const google::protobuf::Message& message) {
  json out = json::object();
  const google::protobuf::Reflection* r = message.GetReflection();
  std::vector<const FieldDescriptor*> fields;
  r->ListFields(message, &fields);
  for (const FieldDescriptor* f : fields) {
    if (f->is_repeated()) continue;  // JobSpec has none
    const std::string& name = f->name();
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_MESSAGE: out[name] = MessageToJson(r->GetMessage(message, f)); break;
      case FieldDescriptor::CPPTYPE_INT32: out[name] = r->GetInt32(message, f); break;
      case FieldDescriptor::CPPTYPE_INT64: out[name] = r->GetInt64(message, f); break;
      case FieldDescriptor::CPPTYPE_UINT32: out[name] = r->GetUInt32(message, f); break;
      case FieldDescriptor::CPPTYPE_UINT64: out[name] = r->GetUInt64(message, f); break;
      case FieldDescriptor::CPPTYPE_DOUBLE: out[name] = DoubleToJson(r->GetDouble(message, f)); break;
      case FieldDescriptor::CPPTYPE_FLOAT: out[name] = DoubleToJson(r->GetFloat(message, f)); break;
      case FieldDescriptor::CPPTYPE_BOOL: out[name] = r->GetBool(message, f); break;
      case FieldDescriptor::CPPTYPE_STRING: out[name] = r->GetString(message, f); break;
      case FieldDescriptor::CPPTYPE_ENUM: out[name] = r->GetEnum(message, f)->name(); break;
    }
  }
  return out;
}

std::string StateName(v1::JobState state) { return api::JobStateName(state); }

// `v` with `digits` significant digits ("%.4g": 6.123, 6.05, 10.52).
std::string FormatSignificant(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*g", digits, v);
  return buf;
}

// A rate: three significant digits below 100, whole numbers above ("3.2", "0.0456", "250").
std::string FormatRate(double v) {
  if (v >= 100) return absl::StrCat(static_cast<int64_t>(std::llround(v)));
  return FormatSignificant(v, 3);
}

// Rows of cells as columns aligned by two spaces; every line ends with a newline.
std::string FormatTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(width[c] - row[c].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

json OptionalDoubleToJson(bool has, double v) { return has ? DoubleToJson(v) : json(nullptr); }

// Whether the job has reported a training loss: the field is 0 until the first Progress (the
// job's step alone does not say: it also follows other reports, and a restarted coordinator's
// job has one before any Progress). A loss of exactly 0 reads as unreported unless the job has
// a validation loss.
bool TrainLossReported(const v1::Job& job) {
  return job.train_loss() != 0 || job.has_val_loss();
}

}  // namespace

std::string FormatUnixTime(int64_t unix_seconds) {
  if (unix_seconds == 0) return "-";
  const std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string FormatLogLine(const v1::LogLine& line) {
  const int64_t ms = line.time_unix_ms();
  const int64_t seconds = ms >= 0 ? ms / 1000 : (ms - 999) / 1000;
  std::string time = FormatUnixTime(seconds);
  if (time.size() > 1 && time.back() == 'Z') {
    time.pop_back();
    time += absl::StrFormat(".%03dZ", static_cast<int>(ms - seconds * 1000));
  }
  return absl::StrCat(time, " [rank ", line.rank(), "] ", line.level(), ": ", line.text());
}

std::string FormatDuration(double seconds) {
  if (!(seconds > 0)) return "0s";  // also NaN
  if (seconds >= 9999.5 * 86400) return ">9999d";  // also infinity
  if (seconds < 59.5) return absl::StrCat(std::llround(seconds), "s");
  const int64_t minutes = std::llround(seconds / 60);
  if (minutes < 60) return absl::StrCat(minutes, "m");
  if (minutes < 24 * 60) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(minutes / 60),
                  static_cast<long long>(minutes % 60));
    return buf;
  }
  const int64_t hours = std::llround(seconds / 3600);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lldd%02lldh", static_cast<long long>(hours / 24),
                static_cast<long long>(hours % 24));
  return buf;
}

std::string DescribeModel(const v1::JobSpec& spec) {
  const v1::ModelSpec& m = spec.model();
  if (m.kind() == "vgg") {
    // "vgg11 w0.25 g4 fashion-mnist": arch, width, filter groups per conv layer ("h512" when
    // the classifier has a hidden layer), the image set ("+aug" with augmentation).
    std::string out = absl::StrCat(m.arch(), " w", FormatDouble(m.width()), " g",
                                   m.filter_groups());
    if (m.classifier_hidden() > 0) absl::StrAppend(&out, " h", m.classifier_hidden());
    absl::StrAppend(&out, " ", spec.data().kind());
    if (spec.data().augment()) absl::StrAppend(&out, "+aug");
    return out;
  }
  std::string out = absl::StrCat(m.kind(), " L", m.layers(), " d", m.d_model(), " H", m.heads());
  if (m.ffn_groups() > 0) absl::StrAppend(&out, " ffn", m.ffn_groups());
  return out;
}

std::string DescribePolicy(const v1::JobSpec& spec) {
  const v1::PolicySpec& p = spec.policy();
  const std::string& kind = p.kind();
  if (kind == "mat") {
    std::string out = absl::StrCat("mat a=", FormatDouble(p.alpha()));
    if (p.beta() > 0) absl::StrAppend(&out, " b=", FormatDouble(p.beta()));
    return out;
  }
  const bool replays = kind == "rand" || kind == "frozen-random" || kind == "inverse";
  if (replays && !p.rand_schedule_job().empty()) {
    return absl::StrCat(kind, " (replays ", p.rand_schedule_job(), ")");
  }
  if (kind == "rand") return absl::StrCat("rand f=", FormatDouble(p.rand_fraction()));
  if (kind == "multirate") return absl::StrCat("multirate k=", p.multirate_k());
  return kind;
}

namespace {

// The optimizer and the lr schedule: "adamw lr=0.0005 linear", "sgd lr=0.1 m=0.9 nesterov
// step x0.1/1000" (decay_factor per decay_every steps).
std::string DescribeTraining(const v1::JobSpec& spec) {
  const v1::TrainSpec& t = spec.train();
  std::string out = absl::StrCat(t.optimizer(), " lr=", FormatSignificant(t.lr(), 4));
  if (t.optimizer() == "sgd") {
    absl::StrAppend(&out, " m=", FormatDouble(t.momentum()));
    if (t.nesterov()) absl::StrAppend(&out, " nesterov");
  }
  absl::StrAppend(&out, " ", t.schedule());
  if (t.schedule() == "step") {
    absl::StrAppend(&out, " x", FormatDouble(t.decay_factor()), "/", t.decay_every());
  }
  return out;
}

}  // namespace

std::string FormatBytes(int64_t bytes) {
  if (bytes < 1000) return absl::StrCat(bytes, " B");
  const char* units[] = {"kB", "MB", "GB", "TB"};
  double v = double(bytes);
  int u = -1;
  while (v >= 1000 && u < 3) {
    v /= 1000;
    ++u;
  }
  return absl::StrCat(FormatSignificant(v, 3), " ", units[u]);
}

std::string FormatJobTable(const std::vector<v1::Job>& jobs) {
  std::vector<std::vector<std::string>> rows = {
      {"ID", "STATE", "MODEL", "POLICY", "WORKERS", "STEP", "CREATED", "ARTIFACTS"}};
  for (const v1::Job& job : jobs) {
    const v1::ResourceSpec& r = job.spec().resources();
    rows.push_back({job.job_id(), StateName(job.state()), DescribeModel(job.spec()),
                    DescribePolicy(job.spec()),
                    r.workers() > 0 ? absl::StrCat(r.workers(), " ", r.device()) : "-",
                    job.step() > 0 ? absl::StrCat(job.step(), "/", job.spec().train().steps()) : "-",
                    FormatUnixTime(job.create_time_unix_seconds()),
                    job.artifact_bytes() > 0 ? FormatBytes(job.artifact_bytes()) : "-"});
  }
  return FormatTable(rows);
}

json JobSpecToJson(const v1::JobSpec& spec) { return MessageToJson(spec); }

json JobToJson(const v1::GetJobReply& reply) {
  const v1::Job& job = reply.job();
  json out;
  out["job_id"] = job.job_id();
  out["client_request_id"] = job.client_request_id();
  out["state"] = StateName(job.state());
  out["error_message"] = job.error_message();
  out["waiting"] = reply.waiting();
  out["step"] = job.step();
  out["total_steps"] = job.spec().train().steps();
  out["train_loss"] = OptionalDoubleToJson(TrainLossReported(job), job.train_loss());
  out["val_loss"] = OptionalDoubleToJson(job.has_val_loss(), job.val_loss());
  out["test_loss"] = OptionalDoubleToJson(job.has_test_loss(), job.test_loss());
  out["active_modules"] = job.active_modules();
  out["total_modules"] = job.total_modules();
  out["mask_version"] = job.mask_version();
  out["flops_total"] = DoubleToJson(job.flops_total());
  out["wall_seconds"] = DoubleToJson(job.wall_seconds());
  out["attempt"] = job.attempt();
  out["artifact_bytes"] = job.artifact_bytes();
  out["created_unix_seconds"] = job.create_time_unix_seconds();
  out["created"] = FormatUnixTime(job.create_time_unix_seconds());
  out["updated_unix_seconds"] = job.update_time_unix_seconds();
  out["updated"] = FormatUnixTime(job.update_time_unix_seconds());
  out["spec"] = JobSpecToJson(job.spec());
  out["summary"] = nullptr;
  if (!job.summary_json().empty()) {
    json summary = json::parse(job.summary_json(), nullptr, /*allow_exceptions=*/false);
    out["summary"] = summary.is_discarded() ? json(job.summary_json()) : summary;
  }
  out["ranks"] = json::array();
  for (const v1::RankStatus& rank : reply.ranks()) {
    out["ranks"].push_back({{"rank", rank.rank()},
                            {"worker_id", rank.worker_id()},
                            {"step", rank.step()},
                            {"mask_version", rank.mask_version()},
                            {"param_checksum", rank.param_checksum()}});
  }
  return out;
}

std::string FormatJobText(const v1::GetJobReply& reply) {
  const v1::Job& job = reply.job();
  std::ostringstream out;
  out << "job:         " << job.job_id() << "\n"
      << "state:       " << StateName(job.state()) << "\n";
  if (!job.error_message().empty()) out << "message:     " << job.error_message() << "\n";
  if (!reply.waiting().empty()) out << "waiting:     " << reply.waiting() << "\n";
  out << "step:        " << job.step() << " / " << job.spec().train().steps() << "\n";
  out << "loss:        train "
      << (TrainLossReported(job) ? FormatSignificant(job.train_loss(), 4) : "-")
      << "  val " << (job.has_val_loss() ? FormatSignificant(job.val_loss(), 4) : "-")
      << "  test " << (job.has_test_loss() ? FormatSignificant(job.test_loss(), 4) : "-")
      << "\n";
  out << "modules:     ";
  if (job.total_modules() > 0) {
    out << job.active_modules() << "/" << job.total_modules() << " active";
  } else {
    out << "-";
  }
  out << "  mask " << (job.mask_version() > 0 ? absl::StrCat("v", job.mask_version()) : "-")
      << "\n"
      << "compute:     " << FormatSignificant(job.flops_total(), 3) << " FLOPs  "
      << FormatDuration(job.wall_seconds()) << " wall  attempt " << job.attempt() << "\n"
      << "model:       " << DescribeModel(job.spec()) << "\n"
      << "train:       " << DescribeTraining(job.spec()) << "\n"
      << "policy:      " << DescribePolicy(job.spec()) << "\n"
      << "workers:     " << job.spec().resources().workers() << " x "
      << job.spec().resources().device() << "\n"
      << "created:     " << FormatUnixTime(job.create_time_unix_seconds()) << "\n"
      << "updated:     " << FormatUnixTime(job.update_time_unix_seconds()) << "\n";
  if (!job.client_request_id().empty()) out << "request id:  " << job.client_request_id() << "\n";
  if (job.artifact_bytes() > 0) {
    out << "artifacts:   " << FormatBytes(job.artifact_bytes()) << " (matctl download "
        << job.job_id() << " --out DIR)\n";
  }
  for (const v1::RankStatus& rank : reply.ranks()) {
    out << "rank " << rank.rank() << ":      worker " << rank.worker_id() << " step "
        << rank.step() << " mask v" << rank.mask_version();
    if (!rank.param_checksum().empty()) out << " checksum " << rank.param_checksum();
    out << "\n";
  }
  if (!job.summary_json().empty()) out << "summary:     " << job.summary_json() << "\n";
  return out.str();
}

std::string WorkerStateName(v1::WorkerState state) {
  switch (state) {
    case v1::WORKER_STATE_IDLE: return "IDLE";
    case v1::WORKER_STATE_BUSY: return "BUSY";
    case v1::WORKER_STATE_DISCONNECTED: return "DISCONNECTED";
    case v1::WORKER_STATE_DRAINING: return "DRAINING";
    default: return "UNSPECIFIED";
  }
}

std::string FormatWorkerTable(const std::vector<v1::WorkerInfo>& workers,
                              int64_t now_unix_seconds) {
  std::vector<std::vector<std::string>> rows = {
      {"WORKER", "STATE", "DEVICE", "HOST", "JOB", "RANK", "LAST-SEEN"}};
  for (const v1::WorkerInfo& w : workers) {
    const bool busy = (w.state() == v1::WORKER_STATE_BUSY ||
                       w.state() == v1::WORKER_STATE_DRAINING) &&
                      !w.job_id().empty();
    const std::string last_seen =
        w.last_seen_unix_seconds() == 0
            ? "-"
            : FormatDuration(static_cast<double>(now_unix_seconds - w.last_seen_unix_seconds())) +
                  " ago";
    std::string state = WorkerStateName(w.state());
    // A drain waiting for the worker to come back.
    if (w.state() == v1::WORKER_STATE_DISCONNECTED && !w.drain_reason().empty()) {
      state += "(drained)";
    }
    rows.push_back({w.worker_id(), state,
                    w.capabilities().device().empty() ? "-" : w.capabilities().device(),
                    w.capabilities().host().empty() ? "-" : w.capabilities().host(),
                    busy ? w.job_id() : "-",
                    busy ? absl::StrCat(w.rank()) : "-", last_seen});
  }
  return FormatTable(rows);
}

std::string FormatJobEvent(const v1::JobEvent& event) {
  std::string out = absl::StrCat(FormatUnixTime(event.time_unix_seconds()), " ", event.job_id(),
                                 " step ", event.step(), " ");
  switch (event.event_case()) {
    case v1::JobEvent::kState:
      absl::StrAppend(&out, "state ", StateName(event.state().state()));
      if (!event.state().error_message().empty()) {
        absl::StrAppend(&out, " (", event.state().error_message(), ")");
      }
      break;
    case v1::JobEvent::kProgress: {
      const v1::JobProgress& p = event.progress();
      // A log line, not data (status -o json has the exact values): 5 significant digits.
      absl::StrAppend(&out, "loss ", FormatSignificant(p.train_loss(), 5), " active ",
                      p.active_modules(), "/", p.total_modules(), " flops ",
                      FormatSignificant(p.flops_total(), 4), " ",
                      FormatSignificant(p.steps_per_second(), 3), " steps/s");
      break;
    }
    case v1::JobEvent::kEvaluation:
      absl::StrAppend(&out, "eval val_loss ", FormatSignificant(event.evaluation().val_loss(), 5),
                      " test_loss ", FormatSignificant(event.evaluation().test_loss(), 5));
      break;
    case v1::JobEvent::kMask:
      absl::StrAppend(&out, "mask v", event.mask().mask_version(), " from step ",
                      event.mask().effective_step(), ": ", event.mask().active_modules(),
                      " active");
      break;
    case v1::JobEvent::EVENT_NOT_SET:
      absl::StrAppend(&out, "(unknown event)");
      break;
  }
  return out;
}

WatchState WatchStateFromJob(const v1::GetJobReply& reply) {
  const v1::Job& job = reply.job();
  WatchState s;
  s.state = job.state();
  s.step = job.step();
  s.total_steps = job.spec().train().steps();
  if (TrainLossReported(job)) s.train_loss = job.train_loss();
  if (job.has_val_loss()) s.val_loss = job.val_loss();
  s.active_modules = job.active_modules();
  s.total_modules = job.total_modules();
  s.mask_version = job.mask_version();
  if (job.wall_seconds() > 0 && job.step() > 0) {
    s.steps_per_second = static_cast<double>(job.step()) / job.wall_seconds();
  }
  return s;
}

bool ApplyJobEvent(const v1::JobEvent& event, WatchState* state) {
  state->step = std::max(state->step, event.step());
  switch (event.event_case()) {
    case v1::JobEvent::kState:
      state->state = event.state().state();
      return true;
    case v1::JobEvent::kProgress: {
      const v1::JobProgress& p = event.progress();
      state->step = event.step();  // a restarted job may go back to its checkpoint's step
      state->train_loss = p.train_loss();
      state->active_modules = p.active_modules();
      if (p.total_modules() > 0) state->total_modules = p.total_modules();
      state->steps_per_second = p.steps_per_second();
      return false;
    }
    case v1::JobEvent::kEvaluation:
      state->val_loss = event.evaluation().val_loss();
      return true;
    case v1::JobEvent::kMask:
      state->mask_version = std::max(state->mask_version, event.mask().mask_version());
      state->active_modules = event.mask().active_modules();
      return false;
    case v1::JobEvent::EVENT_NOT_SET:
      return false;
  }
  return false;
}

std::string FormatProgressBar(const WatchState& state, int width) {
  const bool known_total = state.total_steps > 0;
  const double fraction =
      known_total ? std::clamp(static_cast<double>(state.step) /
                                   static_cast<double>(state.total_steps), 0.0, 1.0)
                  : 0.0;
  // The parts after the bar, in display order, each with its rank in the order parts are left
  // out when the line is too long (lowest first; kKeep never).
  constexpr int kKeep = 100;
  struct Part {
    std::string text;
    int keep;
  };
  std::vector<Part> parts;
  std::string step = absl::StrCat(" step ", state.step);
  if (known_total) {
    absl::StrAppend(&step, "/", state.total_steps, " ",
                    static_cast<int>(std::floor(fraction * 100)), "%");
  }
  parts.push_back({step, kKeep});
  if (state.train_loss) {
    parts.push_back({absl::StrCat(" loss ", FormatSignificant(*state.train_loss, 4)), 6});
  }
  if (state.val_loss) {
    parts.push_back({absl::StrCat(" val ", FormatSignificant(*state.val_loss, 4)), 4});
  }
  if (state.total_modules > 0) {
    parts.push_back(
        {absl::StrCat(" active ", state.active_modules, "/", state.total_modules), 3});
  }
  if (state.mask_version > 0) parts.push_back({absl::StrCat(" mask v", state.mask_version), 1});
  const bool running = state.state == v1::JOB_STATE_RUNNING;
  if (running && state.steps_per_second > 0 && std::isfinite(state.steps_per_second)) {
    parts.push_back({absl::StrCat(" ", FormatRate(state.steps_per_second), " step/s"), 2});
    if (known_total && state.step < state.total_steps) {
      parts.push_back({absl::StrCat(" ETA ", FormatDuration(static_cast<double>(
                                                                state.total_steps - state.step) /
                                                            state.steps_per_second)),
                       5});
    }
  }
  if (!running && state.state != v1::JOB_STATE_UNSPECIFIED) {
    parts.push_back({absl::StrCat(" ", StateName(state.state)), kKeep});
  }

  constexpr int kMinCells = 10;
  constexpr int kMaxCells = 30;
  const int limit = std::max(width - 1, 40);  // the last column would wrap on some terminals
  auto rest_size = [&] {
    int n = 0;
    for (const Part& p : parts) n += static_cast<int>(p.text.size());
    return n;
  };
  while (2 + kMinCells + rest_size() > limit) {
    auto lowest = std::min_element(parts.begin(), parts.end(),
                                   [](const Part& a, const Part& b) { return a.keep < b.keep; });
    if (lowest == parts.end() || lowest->keep == kKeep) break;
    parts.erase(lowest);
  }
  const int cells = std::clamp(limit - 2 - rest_size(), kMinCells, kMaxCells);
  const int filled = static_cast<int>(std::floor(fraction * cells));
  std::string line = "[" + std::string(filled, '#') + std::string(cells - filled, '.') + "]";
  for (const Part& p : parts) line += p.text;
  if (static_cast<int>(line.size()) > limit) line.resize(limit);
  return line;
}

std::string SpectraToCsv(const v1::GetSpectraReply& spectra) {
  size_t columns = static_cast<size_t>(spectra.modules_size());
  for (const v1::SpectraPoint& p : spectra.points()) {
    columns = std::max(columns, static_cast<size_t>(p.lambda_max_size()));
  }
  std::string out = "step";
  for (size_t i = 0; i < columns; ++i) {
    out += ",";
    out += i < static_cast<size_t>(spectra.modules_size()) ? spectra.modules(i).name()
                                                           : absl::StrCat("m", i);
  }
  out += "\n";
  for (const v1::SpectraPoint& p : spectra.points()) {
    out += std::to_string(p.step());
    for (size_t i = 0; i < columns; ++i) {
      out += ",";
      if (i < static_cast<size_t>(p.lambda_max_size())) out += FormatDouble(p.lambda_max(i));
    }
    out += "\n";
  }
  return out;
}

json SpectraToJson(const std::string& job_id, const v1::GetSpectraReply& spectra) {
  json out;
  out["job_id"] = job_id;
  out["modules"] = json::array();
  for (const v1::ModuleDescriptor& m : spectra.modules()) {
    out["modules"].push_back(
        {{"name", m.name()}, {"group", m.group()}, {"layer", m.layer()}, {"index", m.index()}});
  }
  out["points"] = json::array();
  for (const v1::SpectraPoint& p : spectra.points()) {
    json lambda = json::array();
    for (double v : p.lambda_max()) lambda.push_back(DoubleToJson(v));
    out["points"].push_back({{"step", p.step()}, {"lambda_max", lambda}});
  }
  return out;
}

}  // namespace mat::client
