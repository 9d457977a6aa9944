// JobManager (job_manager.h): admission, reads, state changes and watchers, job metrics.
//
// Sections: helpers · admission · reads · replayed schedules · watching · metrics.
#include "coordinator/job_manager.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/run_summary.h"
#include "common/status.h"
#include "coordinator/mask_engine.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "google/protobuf/unknown_field_set.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace {

// INVALID_ARGUMENT naming the first field of `message` (or of a message inside it) that this
// binary's schema does not know: a newer client's field would otherwise be dropped silently.
absl::Status CheckNoUnknownFields(const google::protobuf::Message& message,
                                  const std::string& path) {
  const google::protobuf::Reflection* reflection = message.GetReflection();
  const google::protobuf::UnknownFieldSet& unknown = reflection->GetUnknownFields(message);
  if (unknown.field_count() > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": unknown field number ", unknown.field(0).number(),
        " (not in this coordinator's mat.v1 schema)"));
  }
  std::vector<const google::protobuf::FieldDescriptor*> fields;
  reflection->ListFields(message, &fields);
  for (const google::protobuf::FieldDescriptor* field : fields) {
    if (field->cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE ||
        field->is_repeated()) {
      continue;  // JobSpec has no repeated messages
    }
    MAT_RETURN_IF_ERROR(CheckNoUnknownFields(reflection->GetMessage(message, field),
                                             absl::StrCat(path, ".", field->name())));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckJobId(const std::string& job_id) {
  if (job_id.empty()) return absl::InvalidArgumentError("job_id is empty");
  return absl::OkStatus();
}

v1::Job JobRecordToProto(const JobRecord& record) {
  v1::Job job;
  job.set_job_id(record.id);
  job.set_client_request_id(record.client_request_id);
  *job.mutable_spec() = record.spec;
  job.set_state(record.state);
  job.set_create_time_unix_seconds(record.created_unix_seconds);
  job.set_update_time_unix_seconds(record.updated_unix_seconds);
  // A damaged row's damage leads its message (matctl list and status print it).
  job.set_error_message(record.damage.empty()        ? record.error_message
                        : record.error_message.empty() ? record.damage
                                                       : record.damage + "; " + record.error_message);
  job.set_step(record.step);
  job.set_summary_json(record.summary_json);
  job.set_train_loss(record.train_loss);
  if (record.val_loss) job.set_val_loss(*record.val_loss);
  if (record.test_loss) job.set_test_loss(*record.test_loss);
  job.set_active_modules(record.active_modules);
  job.set_total_modules(record.total_modules);
  job.set_mask_version(record.mask_version);
  job.set_flops_total(record.flops_total);
  job.set_wall_seconds(record.wall_seconds);
  job.set_attempt(record.attempt);
  return job;
}

JobManager::JobManager(JobStore& store, const Clock& clock, CoordinatorMetrics* metrics,
                       JobManagerOptions options)
    : store_(store), clock_(clock), metrics_(metrics), options_(std::move(options)) {
  if (metrics_ == nullptr) return;
  // The job counts start from the store (the facade's recovery then moves running jobs on).
  std::string token;
  do {
    absl::StatusOr<JobPage> page = store_.ListJobs(kMaxPageSize, token, {});
    if (!page.ok()) {
      spdlog::error("metrics: cannot count the stored jobs: {}", page.status().ToString());
      break;
    }
    for (const JobRecord& job : page->jobs) {
      if (IsTerminalJobState(job.state)) {
        ++terminal_job_counts_[job.state];
        RestoreFinishedSeries(job);
      } else {
        live_job_states_[job.id] = job.state;
      }
    }
    token = page->next_page_token;
  } while (!token.empty());
  // Deleted jobs are left out of ListJobs, but still jobs the state dir had.
  if (absl::StatusOr<std::map<v1::JobState, int64_t>> deleted = store_.CountDeletedJobs();
      deleted.ok()) {
    for (const auto& [state, count] : *deleted) terminal_job_counts_[state] += count;
  } else {
    spdlog::error("metrics: cannot count the deleted jobs: {}", deleted.status().ToString());
  }
  UpdateJobGauges();
}

void JobManager::RestoreFinishedSeries(const JobRecord& job) {
  const int64_t age_seconds = std::max<int64_t>(0, clock_.Now() - job.updated_unix_seconds);
  if (age_seconds >= options_.metrics_retention_seconds) return;
  // Expires when it would have without the restart.
  finished_job_ms_[job.id] = clock_.NowMs() - age_seconds * 1000;
  if (job.step > 0) metrics_->job_step.Set({job.id}, static_cast<double>(job.step));
  if (job.step > 0) metrics_->job_loss.Set({job.id, "train"}, job.train_loss);
  if (job.val_loss.has_value()) metrics_->job_loss.Set({job.id, "val"}, *job.val_loss);
  if (job.test_loss.has_value()) metrics_->job_loss.Set({job.id, "test"}, *job.test_loss);
  if (job.flops_total > 0) metrics_->job_flops_total.SetIfGreater({job.id}, job.flops_total);
  if (job.total_modules > 0) {
    metrics_->job_active_modules.Set({job.id}, static_cast<double>(job.active_modules));
  }
  RecordSummaryMetrics(job.id, job.summary_json);
  RestoreDecisionSeries(job.id);
}

void JobManager::RestoreDecisionSeries(const std::string& job_id) {
  absl::StatusOr<std::optional<StoredDecision>> last =
      store_.LatestDecisionAtOrBefore(job_id, std::numeric_limits<int64_t>::max());
  if (!last.ok() || !last->has_value()) return;
  const nlohmann::json decision =
      nlohmann::json::parse((*last)->decision_json, nullptr, /*allow_exceptions=*/false);
  if (!decision.is_object() || !decision.contains("modules") || !decision["modules"].is_array()) {
    spdlog::warn("{}: its last decision is not readable: its module series are not restored",
                 job_id);
    return;
  }
  // Decision::ToJson's fields; λ only when every module has a number (as MaskEngine sets it).
  std::vector<policy::ModuleInfo> modules;
  std::vector<double> lambda;
  std::vector<uint8_t> active;
  for (const nlohmann::json& m : decision["modules"]) {
    if (!m.is_object()) continue;
    modules.push_back({m.value("group", ""), m.value("layer", 0), m.value("index", 0),
                       m.value("name", "")});
    if (m.contains("lambda") && m["lambda"].is_number()) lambda.push_back(m["lambda"].get<double>());
    active.push_back(m.value("active", false) ? 1 : 0);
  }
  if (lambda.size() != modules.size()) lambda.clear();
  // The every-step bits sent for it, where kept (schema v4 on): what MaskEngine showed.
  v1::MaskUpdate mask;
  if (!(*last)->mask_update.empty() && mask.ParseFromString((*last)->mask_update)) {
    active = UnpackModuleBits(mask.bits(), modules.size());
  }
  std::map<std::string, double> threshold;
  const nlohmann::json thresholds = decision.value("threshold", nlohmann::json::object());
  for (const auto& [group, value] : thresholds.items()) {
    if (value.is_number()) threshold[group] = value.get<double>();
  }
  SetModuleSeries(*metrics_, job_id, modules, lambda, active, threshold);
}

// ----- admission -----

absl::StatusOr<v1::SubmitJobReply> JobManager::Submit(const std::string& client_request_id,
                                                          const v1::JobSpec& spec,
                                                          const std::string& client) {
  MAT_RETURN_IF_ERROR(CheckNoUnknownFields(spec, "spec"));
  MAT_RETURN_IF_ERROR(api::ValidateJobSpec(spec));
  if (absl::Status limits = api::CheckJobSpecLimits(spec, options_.spec_limits); !limits.ok()) {
    spdlog::warn("refused a job from '{}': {}", client, std::string(limits.message()));
    return limits;
  }
  if (const std::string& replayed = spec.policy().rand_schedule_job(); !replayed.empty()) {
    // A resubmit of an accepted job is answered by CreateJob, even once the job it replayed is
    // gone (deleted).
    std::optional<JobRecord> accepted;
    if (!client_request_id.empty()) {
      MAT_ASSIGN_OR_RETURN(accepted, store_.FindRequest(client, client_request_id));
    }
    if (!accepted.has_value()) {
      MAT_ASSIGN_OR_RETURN(std::vector<policy::Policy::ScheduleEntry> schedule,
                           ReplayedSchedule(replayed));
      // Checked here, not first when the job's worker declares its modules (ApplyRandSchedule).
      const int64_t probe_every = api::WithJobSpecDefaults(spec).policy().probe_every();
      if (absl::Status steps = policy::CheckReplayedScheduleSteps(schedule, probe_every);
          !steps.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("policy.rand_schedule_job: job ", replayed, ": ", steps.message()));
      }
    }
  }
  absl::StatusOr<CreateJobResult> created = store_.CreateJob(
      client_request_id, api::WithJobSpecDefaults(spec), client, options_.max_jobs_per_client);
  if (!created.ok() && created.status().code() == absl::StatusCode::kResourceExhausted) {
    spdlog::warn("refused a job: {}", std::string(created.status().message()));
  }
  MAT_ASSIGN_OR_RETURN(CreateJobResult result, std::move(created));
  if (result.created) {
    spdlog::info("job {}: submitted (request id '{}')", result.job_id, client_request_id);
    NoteJobState(result.job_id, v1::JOB_STATE_QUEUED);
  }
  v1::SubmitJobReply reply;
  reply.set_job_id(result.job_id);
  reply.set_created(result.created);
  return reply;
}

absl::Status JobManager::CheckCancellable(const std::string& job_id) {
  MAT_RETURN_IF_ERROR(CheckJobId(job_id));
  MAT_ASSIGN_OR_RETURN(JobRecord record, store_.GetJob(job_id));
  if (IsTerminalJobState(record.state)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " is already ", JobStateName(record.state), ": nothing to cancel"));
  }
  return absl::OkStatus();
}

absl::Status JobManager::Delete(const std::string& job_id) {
  MAT_RETURN_IF_ERROR(CheckJobId(job_id));
  MAT_RETURN_IF_ERROR(store_.DeleteJob(job_id));
  finished_job_ms_.erase(job_id);
  if (metrics_ != nullptr) metrics_->registry.RemoveSeriesWithLabel("mat_job", job_id);
  return absl::OkStatus();
}

// ----- reads -----

absl::StatusOr<v1::GetJobReply> JobManager::Get(const std::string& job_id) {
  MAT_RETURN_IF_ERROR(CheckJobId(job_id));
  MAT_ASSIGN_OR_RETURN(JobRecord record, store_.GetJob(job_id));
  v1::GetJobReply reply;
  *reply.mutable_job() = JobRecordToProto(record);
  MAT_ASSIGN_OR_RETURN(std::vector<AssignmentRecord> assignments,
                       store_.ListAssignments(job_id));
  // A start that failed half way may leave rows of a job that is still queued.
  if (record.state == v1::JOB_STATE_QUEUED) assignments.clear();
  for (const AssignmentRecord& a : assignments) {
    v1::RankStatus* rank = reply.add_ranks();
    rank->set_rank(a.rank);
    rank->set_worker_id(a.worker_id);
    rank->set_step(a.step);
    rank->set_mask_version(a.mask_version);
    rank->set_param_checksum(a.param_checksum);
  }
  return reply;
}

absl::StatusOr<v1::ListJobsReply> JobManager::List(const v1::ListJobsRequest& request,
                                                   const std::optional<std::string>& client) {
  std::vector<v1::JobState> states;
  for (int s : request.states()) states.push_back(static_cast<v1::JobState>(s));
  MAT_ASSIGN_OR_RETURN(JobPage page, store_.ListJobs(request.page_size(), request.page_token(),
                                                     states, client));
  v1::ListJobsReply reply;
  for (const JobRecord& record : page.jobs) *reply.add_jobs() = JobRecordToProto(record);
  reply.set_next_page_token(page.next_page_token);
  return reply;
}

absl::StatusOr<v1::GetJobLogsReply> JobManager::GetLogs(
    const v1::GetJobLogsRequest& request) {
  MAT_RETURN_IF_ERROR(CheckJobId(request.job_id()));
  if (request.has_rank() && request.rank() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("rank must be >= 0, got ", request.rank()));
  }
  if (request.after_seq() < 0 || request.max_lines() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("after_seq and max_lines must be >= 0, got ",
                                                   request.after_seq(), " and ",
                                                   request.max_lines()));
  }
  const int limit = request.max_lines() == 0 ? 1000 : std::min(request.max_lines(), 10000);
  // The state first, then the lines (Coordinator::GetJobLogs adds whether more may come).
  MAT_ASSIGN_OR_RETURN(JobRecord job, store_.GetJob(request.job_id()));
  const int world = job.spec.resources().workers();
  if (request.has_rank() && request.rank() >= world) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", request.rank(), " is not a rank of job ", request.job_id(), ": it has ",
        world == 1 ? std::string("rank 0 only") : absl::StrCat("ranks 0 to ", world - 1)));
  }
  std::optional<int> rank;
  if (request.has_rank()) rank = request.rank();
  MAT_ASSIGN_OR_RETURN(JobLogPage page,
                       store_.GetJobLogs(request.job_id(), rank, request.after_seq(), limit));
  v1::GetJobLogsReply reply;
  reply.set_state(job.state);
  reply.set_dropped(page.dropped);
  reply.set_last_seq(request.after_seq());
  for (const LogLineRecord& l : page.lines) {
    v1::LogLine* out = reply.add_lines();
    out->set_seq(l.seq);
    out->set_rank(l.rank);
    out->set_time_unix_ms(l.time_unix_ms);
    out->set_level(l.level);
    out->set_text(l.text);
    reply.set_last_seq(l.seq);
  }
  return reply;
}

absl::StatusOr<v1::GetSpectraReply> JobManager::GetSpectra(
    const v1::GetSpectraRequest& request) {
  MAT_RETURN_IF_ERROR(CheckJobId(request.job_id()));
  MAT_ASSIGN_OR_RETURN(LambdaPage page, store_.GetLambdas(request.job_id(), request.page_size(),
                                                           request.page_token()));
  MAT_ASSIGN_OR_RETURN(std::vector<ModuleRecord> modules, store_.GetModules(request.job_id()));
  v1::GetSpectraReply reply;
  for (const ModuleRecord& m : modules) {
    v1::ModuleDescriptor* out = reply.add_modules();
    out->set_name(m.name);
    out->set_group(m.group);
    out->set_layer(m.layer);
    out->set_index(m.index);
  }
  for (const LambdaPoint& point : page.points) {
    v1::SpectraPoint* out = reply.add_points();
    out->set_step(point.step);
    out->mutable_lambda_max()->Add(point.lambda.begin(), point.lambda.end());
  }
  reply.set_next_page_token(page.next_page_token);
  return reply;
}

// ----- replayed schedules -----

absl::StatusOr<std::vector<policy::Policy::ScheduleEntry>> JobManager::ReplayedSchedule(
    const std::string& replayed_job_id) {
  const std::string key = "policy.rand_schedule_job";
  absl::StatusOr<JobRecord> job = store_.GetJob(replayed_job_id);
  if (absl::IsNotFound(job.status())) {
    if (store_.IsDeletedJob(replayed_job_id).value_or(false)) {
      return absl::InvalidArgumentError(absl::StrCat(key, ": ", job.status().message()));
    }
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": no job '", replayed_job_id, "' on this coordinator"));
  }
  MAT_RETURN_IF_ERROR(job.status());
  const v1::JobSpec replayed = api::WithJobSpecDefaults(job->spec);
  if (replayed.policy().kind() != "mat") {
    return absl::InvalidArgumentError(absl::StrCat(
        key, ": job ", replayed_job_id, " ran policy.kind ", replayed.policy().kind(),
        ", not mat: only a MAT job's active counts can be replayed"));
  }
  if (job->state != v1::JOB_STATE_SUCCEEDED) {
    return absl::FailedPreconditionError(absl::StrCat(
        key, ": job ", replayed_job_id, " is ", JobStateName(job->state),
        ", not SUCCEEDED: only a finished MAT job's active counts can be replayed"));
  }
  std::vector<policy::Policy::ScheduleEntry> schedule;
  std::string token;
  do {
    MAT_ASSIGN_OR_RETURN(DecisionPage page,
                         store_.GetDecisions(replayed_job_id, kMaxPageSize, token));
    for (const DecisionRecord& d : page.decisions) {
      absl::StatusOr<policy::Policy::ScheduleEntry> entry = policy::ScheduleEntryFromDecisionJson(
          nlohmann::json::parse(d.json, nullptr, /*allow_exceptions=*/false));
      if (!entry.ok()) {
        return absl::DataLossError(absl::StrCat(key, ": the stored decision of job ",
                                                replayed_job_id, " at step ", d.step, ": ",
                                                entry.status().message()));
      }
      schedule.push_back(std::move(*entry));
    }
    token = page.next_page_token;
  } while (!token.empty());
  if (schedule.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": job ", replayed_job_id, " has no stored decision to replay"));
  }
  return schedule;
}

absl::Status JobManager::ApplyRandSchedule(const std::string& job_id, const v1::JobSpec& spec,
                                            policy::Policy& policy) {
  const std::string& replayed = spec.policy().rand_schedule_job();
  if (replayed.empty()) return absl::OkStatus();
  absl::StatusOr<std::vector<policy::Policy::ScheduleEntry>> schedule = ReplayedSchedule(replayed);
  absl::Status st = schedule.ok() ? policy.SetReplayedSchedule(std::move(*schedule))
                                  : schedule.status();
  if (!st.ok()) {
    return absl::Status(st.code(), absl::StrCat("job ", job_id, " cannot replay the decisions "
                                                "of job ", replayed, ": ", st.message()));
  }
  spdlog::info("job {}: {} replays the decisions of MAT job {}", job_id, spec.policy().kind(),
               replayed);
  return absl::OkStatus();
}

// ----- watching -----

v1::JobEvent JobManager::StateEvent(const JobRecord& job) const {
  v1::JobEvent event;
  event.set_job_id(job.id);
  event.set_time_unix_seconds(clock_.Now());
  event.set_step(job.step);  // rank 0's latest reported step (0 before its first)
  event.mutable_state()->set_state(job.state);
  event.mutable_state()->set_error_message(job.error_message);
  return event;
}

absl::StatusOr<WatchId> JobManager::Watch(const std::string& job_id,
                                              JobEventListener listener) {
  MAT_CHECK(listener) << "Watch needs a listener";
  MAT_RETURN_IF_ERROR(CheckJobId(job_id));
  MAT_ASSIGN_OR_RETURN(JobRecord job, store_.GetJob(job_id));
  const WatchId id = next_watch_id_++;
  const v1::JobEvent current = StateEvent(job);
  if (IsTerminalJobState(job.state)) {
    listener(current, /*last=*/true);
    return id;
  }
  // Subscribe first, so that an event caused by the listener itself is not lost.
  watches_by_job_[job_id].emplace(id, listener);
  job_of_watch_.emplace(id, job_id);
  listener(current, /*last=*/false);
  return id;
}

void JobManager::Unwatch(WatchId id) {
  auto it = job_of_watch_.find(id);
  if (it == job_of_watch_.end()) return;
  auto job = watches_by_job_.find(it->second);
  MAT_CHECK(job != watches_by_job_.end()) << "watch " << id << " has no job entry";
  job->second.erase(id);
  if (job->second.empty()) watches_by_job_.erase(job);
  job_of_watch_.erase(it);
}

int JobManager::WatcherCount(const std::string& job_id) const {
  auto it = watches_by_job_.find(job_id);
  return it == watches_by_job_.end() ? 0 : static_cast<int>(it->second.size());
}

void JobManager::Publish(const v1::JobEvent& event, bool last) {
  auto job = watches_by_job_.find(event.job_id());
  if (job == watches_by_job_.end()) return;
  // A listener may subscribe or unsubscribe: iterate over a snapshot of the ids and look each up
  // again before calling it.
  std::vector<WatchId> ids;
  for (const auto& [id, listener] : job->second) ids.push_back(id);
  if (last) {
    // Remove every subscription first: the last event ends them all.
    std::map<WatchId, JobEventListener> ending = std::move(job->second);
    watches_by_job_.erase(job);
    for (WatchId id : ids) job_of_watch_.erase(id);
    for (auto& [id, listener] : ending) listener(event, /*last=*/true);
    return;
  }
  for (WatchId id : ids) {
    auto j = watches_by_job_.find(event.job_id());
    if (j == watches_by_job_.end()) return;
    auto w = j->second.find(id);
    if (w == j->second.end()) continue;
    JobEventListener listener = w->second;  // a copy: the listener may unwatch itself
    listener(event, /*last=*/false);
  }
}

absl::Status JobManager::UpdateState(const std::string& job_id, v1::JobState state,
                                         const std::string& error_message) {
  MAT_RETURN_IF_ERROR(store_.UpdateJobState(job_id, state, error_message));
  NoteJobState(job_id, state);
  spdlog::info("job {}: {}{}{}", job_id, JobStateName(state), error_message.empty() ? "" : ": ",
               error_message);
  // The stored job (its latest step) with the state just written.
  absl::StatusOr<JobRecord> stored = store_.GetJob(job_id);
  JobRecord changed = stored.ok() ? *std::move(stored) : JobRecord{};
  changed.id = job_id;
  changed.state = state;
  changed.error_message = error_message;
  Publish(StateEvent(changed), IsTerminalJobState(state));
  return absl::OkStatus();
}

void JobManager::PublishEvent(v1::JobEvent event) {
  MAT_CHECK(!event.job_id().empty()) << "PublishEvent needs a job id";
  MAT_CHECK(!event.has_state()) << "state changes go through UpdateState";
  if (event.time_unix_seconds() == 0) event.set_time_unix_seconds(clock_.Now());
  Publish(event, /*last=*/false);
}

// ----- metrics -----

void JobManager::NoteJobState(const std::string& job_id, v1::JobState state) {
  if (metrics_ == nullptr) return;
  if (IsTerminalJobState(state)) {
    // A job moves into a terminal state once (the store refuses any later transition).
    live_job_states_.erase(job_id);
    ++terminal_job_counts_[state];
    finished_job_ms_[job_id] = clock_.NowMs();
  } else {
    live_job_states_[job_id] = state;
  }
  UpdateJobGauges();
}

void JobManager::UpdateJobGauges() {
  if (metrics_ == nullptr) return;
  std::map<v1::JobState, int64_t> counts = terminal_job_counts_;
  for (const auto& [id, state] : live_job_states_) ++counts[state];
  for (v1::JobState state :
       {v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED,
        v1::JOB_STATE_FAILED, v1::JOB_STATE_CANCELLED, v1::JOB_STATE_RESTARTING}) {
    std::string name = JobStateName(state);
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    metrics_->jobs.Set({name}, static_cast<double>(counts[state]));
  }
}

void JobManager::RecordSummaryMetrics(const std::string& job_id,
                                       const std::string& summary_json) {
  if (metrics_ == nullptr || summary_json.empty()) return;
  const nlohmann::json summary = nlohmann::json::parse(summary_json, nullptr, false);
  if (!summary.is_object()) return;
  // The summary's FLOPs are rank 0's share (api::SummaryRanks): the job's are that times its
  // ranks, as mat_job_flops_total (the sum of the ranks' reports) is.
  const absl::StatusOr<int64_t> world_size = api::SummaryRanks(summary);
  if (!world_size.ok()) {
    spdlog::warn("{}: its summary.json's FLOPs are not counted in the metrics: {}", job_id,
                 std::string(world_size.status().message()));
    return;
  }
  const double ranks = static_cast<double>(*world_size);
  auto number = [ranks](const nlohmann::json& v) {
    return v.is_number() ? v.get<double>() * ranks : std::numeric_limits<double>::quiet_NaN();
  };
  if (summary.contains("flops_by_phase") && summary["flops_by_phase"].is_object()) {
    for (const auto& [phase, value] : summary["flops_by_phase"].items()) {
      const double v = number(value);
      if (std::isfinite(v) && v >= 0) {
        metrics_->job_flops_by_phase_total.SetIfGreater({job_id, phase}, v);
      }
    }
  }
  if (summary.contains("flops_saved")) {
    const double saved = number(summary["flops_saved"]);
    if (std::isfinite(saved) && saved >= 0) {
      metrics_->job_flops_saved_total.SetIfGreater({job_id}, saved);
    }
  }
}

void JobManager::ExpireFinishedSeries() {
  if (metrics_ == nullptr) return;
  const int64_t now_ms = clock_.NowMs();
  const int64_t retention_ms = options_.metrics_retention_seconds * 1000;
  for (auto it = finished_job_ms_.begin(); it != finished_job_ms_.end();) {
    if (now_ms - it->second >= retention_ms) {
      metrics_->registry.RemoveSeriesWithLabel("mat_job", it->first);
      it = finished_job_ms_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace mat::coordinator
