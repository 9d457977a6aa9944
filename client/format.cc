#include "client/format.h"

#include <charconv>
#include <cmath>
#include <ctime>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "coordinator/job_store.h"
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

std::string StateName(v1::JobState state) { return coordinator::JobStateName(state); }

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

std::string DescribeModel(const v1::JobSpec& spec) {
  const v1::ModelSpec& m = spec.model();
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
  if (kind == "rand") return absl::StrCat("rand f=", FormatDouble(p.rand_fraction()));
  if (kind == "multirate") return absl::StrCat("multirate k=", p.multirate_k());
  return kind;
}

std::string FormatJobTable(const std::vector<v1::Job>& jobs) {
  std::vector<std::vector<std::string>> rows = {{"ID", "STATE", "MODEL", "POLICY", "CREATED"}};
  for (const v1::Job& job : jobs) {
    rows.push_back({job.job_id(), StateName(job.state()), DescribeModel(job.spec()),
                    DescribePolicy(job.spec()), FormatUnixTime(job.create_time_unix_seconds())});
  }
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

json JobSpecToJson(const v1::JobSpec& spec) { return MessageToJson(spec); }

json JobToJson(const v1::GetJobReply& reply) {
  const v1::Job& job = reply.job();
  json out;
  out["job_id"] = job.job_id();
  out["client_request_id"] = job.client_request_id();
  out["state"] = StateName(job.state());
  out["step"] = job.step();
  out["error_message"] = job.error_message();
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
  out << "step:        " << job.step() << " / " << job.spec().train().steps() << "\n"
      << "model:       " << DescribeModel(job.spec()) << "\n"
      << "policy:      " << DescribePolicy(job.spec()) << "\n"
      << "workers:     " << job.spec().resources().workers() << " x "
      << job.spec().resources().device() << "\n"
      << "created:     " << FormatUnixTime(job.create_time_unix_seconds()) << "\n"
      << "updated:     " << FormatUnixTime(job.update_time_unix_seconds()) << "\n";
  if (!job.client_request_id().empty()) out << "request id:  " << job.client_request_id() << "\n";
  for (const v1::RankStatus& rank : reply.ranks()) {
    out << "rank " << rank.rank() << ":      worker " << rank.worker_id() << " step "
        << rank.step() << " mask v" << rank.mask_version();
    if (!rank.param_checksum().empty()) out << " checksum " << rank.param_checksum();
    out << "\n";
  }
  if (!job.summary_json().empty()) out << "summary:     " << job.summary_json() << "\n";
  return out.str();
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
      absl::StrAppend(&out, "loss ", FormatDouble(p.train_loss()), " active ", p.active_modules(),
                      "/", p.total_modules(), " flops ", FormatDouble(p.flops_total()), " ",
                      FormatDouble(p.steps_per_second()), " steps/s");
      break;
    }
    case v1::JobEvent::kEvaluation:
      absl::StrAppend(&out, "eval val_loss ", FormatDouble(event.evaluation().val_loss()),
                      " test_loss ", FormatDouble(event.evaluation().test_loss()));
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
