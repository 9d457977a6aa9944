#include "worker/rank_runner.h"


#include <algorithm>
#include <chrono>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/path_util.h"
#include "common/status.h"
#include "api/job_spec.h"
#include "spdlog/spdlog.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/grad_sync.h"
#include "config/train_config.h"

namespace mat::worker {
namespace {

std::vector<uint8_t> Unpack(const std::string& bits, int n) {
  std::vector<uint8_t> out(n, 0);
  for (int i = 0; i < n; ++i) out[i] = (uint8_t(bits[i / 8]) >> (i % 8)) & 1;
  return out;
}

}  // namespace

absl::StatusOr<policy::MaskSchedule> ScheduleFromMaskUpdate(const v1::MaskUpdate& mask,
                                                            int expected_modules) {
  const int n = mask.num_modules();
  if (n != expected_modules) {
    return absl::InvalidArgumentError(absl::StrCat("mask version ", mask.mask_version(), " has ",
                                                   n, " modules, the model ", expected_modules));
  }
  const size_t bytes = size_t((n + 7) / 8);
  if (mask.bits().size() != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("mask version ", mask.mask_version(), ": bits has ",
                                                   mask.bits().size(), " bytes, expected ", bytes));
  }
  policy::MaskSchedule out;
  out.every_step = Unpack(mask.bits(), n);
  out.slow.assign(n, 0);
  out.slow_every = mask.slow_every_steps();
  if (out.slow_every < 0) {
    return absl::InvalidArgumentError(absl::StrCat("mask version ", mask.mask_version(),
                                                   ": slow_every_steps is negative"));
  }
  if (out.slow_every > 0) {
    if (mask.slow_bits().size() != bytes) {
      return absl::InvalidArgumentError(absl::StrCat("mask version ", mask.mask_version(),
                                                     ": slow_bits has ", mask.slow_bits().size(),
                                                     " bytes, expected ", bytes));
    }
    out.slow = Unpack(mask.slow_bits(), n);
  }
  return out;
}

RankRunner::RankRunner(v1::Assign assign, RankRunnerOptions options, SessionSend send)
    : assign_(std::move(assign)), options_(std::move(options)), send_(std::move(send)),
      max_staleness_(options_.max_mask_staleness_steps) {}

RankRunner::~RankRunner() {
  AbandonUploads();
  Cancel("worker shutting down");
  Join();
}

std::string RankRunner::OutDir() const {
  const std::string& root =
      options_.checkpoint_dir.empty() ? options_.work_dir : options_.checkpoint_dir;
  return absl::StrCat(root, "/jobs/", assign_.job_id(), "/rank", assign_.rank());
}

bool RankRunner::Send(const v1::WorkerMessage& m) { return send_(m); }

void RankRunner::SetConnected(bool connected) {
  std::lock_guard<std::mutex> lock(mu_);
  connected_ = connected;
  cv_.notify_all();
}

void RankRunner::OnReconnect() {
  std::vector<v1::WorkerMessage> resend;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_) return;
    for (const auto* m : {&module_list_, &waiting_report_}) {
      if (m->has_value()) resend.push_back(**m);
    }
    // Before RankDone: a finished rank's log is complete when the coordinator hears it ended.
    resend.insert(resend.end(), undelivered_logs_.begin(), undelivered_logs_.end());
    undelivered_logs_.clear();
    if (undelivered_done_.has_value()) resend.push_back(*undelivered_done_);
    undelivered_done_.reset();
  }
  for (const v1::WorkerMessage& m : resend) {
    if (send_(m)) {
      if (m.has_done()) {
        std::lock_guard<std::mutex> lock(mu_);
        delivered_done_ = m;
      }
      continue;
    }
    // Lost again: the next session tries again.
    std::lock_guard<std::mutex> lock(mu_);
    if (m.has_done()) undelivered_done_ = m;
    if (m.has_logs()) undelivered_logs_.push_back(m);
  }
  if (!resend.empty()) {
    spdlog::info("{} rank {}: resent {} message(s) to the coordinator", job_id(), rank(),
                 resend.size());
  }
}

void RankRunner::Start() {
  MAT_CHECK(!thread_.joinable()) << "RankRunner::Start called twice";
  thread_ = std::thread([this] { Main(); });
}

void RankRunner::Join() {
  if (thread_.joinable()) thread_.join();
}

void RankRunner::OnMask(const v1::MaskUpdate& mask) {
  std::lock_guard<std::mutex> lock(mu_);
  if (mask.mask_version() <= newest_version_) return;  // an older version: ignored
  newest_version_ = mask.mask_version();
  masks_[mask.effective_step()] = mask;
  cv_.notify_all();
}

void RankRunner::LimitUploads(std::chrono::milliseconds within) {
  const int64_t until =
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          (std::chrono::steady_clock::now() + within).time_since_epoch())
          .count();
  int64_t current = uploads_until_ns_.load();
  while (until < current && !uploads_until_ns_.compare_exchange_weak(current, until)) {
  }
}

void RankRunner::OnReject(const v1::Reject& reject) {
  if (reject.code() != static_cast<int>(absl::StatusCode::kUnavailable)) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (!delivered_done_.has_value() || done_refused_) return;
  done_refused_ = true;
  spdlog::warn("{} rank {}: the coordinator could not take this rank's RankDone for now ({}); "
               "sending it again with the next heartbeat",
               job_id(), rank(), reject.message());
}

std::optional<v1::WorkerMessage> RankRunner::TakeRefusedDone() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!done_refused_) return std::nullopt;
  done_refused_ = false;
  return delivered_done_;
}

void RankRunner::Cancel(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (cancelled_) return;
  cancelled_ = true;
  cancel_reason_ = reason;
  cv_.notify_all();
}

v1::WorkerMessage RankRunner::Message() const {
  v1::WorkerMessage m;
  m.set_worker_id(options_.worker_id);
  return m;
}

void RankRunner::SendLogs() {
  if (options_.logs == nullptr) return;
  while (true) {
    std::vector<v1::LogLine> lines = options_.logs->Take(1000);
    if (lines.empty()) return;
    v1::WorkerMessage m = Message();
    v1::LogBatch* batch = m.mutable_logs();
    batch->set_job_id(job_id());
    batch->set_rank(rank());
    batch->set_attempt(assign_.attempt());
    for (v1::LogLine& line : lines) *batch->add_lines() = std::move(line);
    if (!send_(m)) {
      // No session: kept for OnReconnect (a failed rank's last lines are the ones that matter).
      std::lock_guard<std::mutex> lock(mu_);
      undelivered_logs_.push_back(std::move(m));
      if (undelivered_logs_.size() > kMaxUndeliveredLogBatches) undelivered_logs_.pop_front();
    }
  }
}

void RankRunner::Main() {
  if (options_.logs != nullptr) options_.logs->Arm();
  std::string summary, checksum;
  int64_t step = 0;
  absl::Status status = Train(&summary, &checksum, &step);
  bool cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled = cancelled_;
  }
  // Its peers, waiting in a collective for this rank, fail now rather than after the upload.
  if (cancelled) sync_.reset();
  const bool uploads = assign_.rank() == 0 && options_.upload_artifact;
  if (uploads && !collective_failed_) UploadArtifacts(status.ok());
  if (cancelled) {
    spdlog::info("{} rank {}: stopped ({})", job_id(), rank(), cancel_reason_);
    // Its last lines (the upload's among them) still reach `matctl logs`; the coordinator
    // keeps them from the rank's holder after the job ended.
    SendLogs();
    if (options_.logs != nullptr) options_.logs->Disarm();
  } else {
    v1::WorkerMessage m = Message();
    v1::RankDone* done = m.mutable_done();
    done->set_job_id(job_id());
    done->set_rank(rank());
    done->set_attempt(assign_.attempt());
    done->set_ok(status.ok());
    done->set_retryable(!status.ok() && collective_failed_);
    done->set_step(step);
    if (status.ok()) {
      done->set_summary_json(summary);
      done->set_param_checksum(checksum);
      spdlog::info("{} rank {}: finished {} steps, param checksum {}", job_id(), rank(), step,
                   checksum);
    } else {
      done->set_error_message(status.ToString());
      spdlog::error("{} rank {}: failed: {}", job_id(), rank(), status.ToString());
    }
    SendLogs();  // before RankDone: a finished job's log is complete
    if (options_.logs != nullptr) options_.logs->Disarm();
    const bool delivered = send_(m);
    std::lock_guard<std::mutex> lock(mu_);
    if (delivered) {
      delivered_done_ = m;
    } else {
      spdlog::warn("{} rank {}: RankDone not delivered (no session); resent on reconnect",
                   job_id(), rank());
      undelivered_done_ = m;
    }
  }
  // A lost peer ended this attempt: the job restarts, or is cancelled before it does, and then
  // this is all the user gets back. Uploaded after RankDone, so the restart does not wait for
  // it; the next attempt's Assign abandons it (AbandonUploads), and that attempt's rank 0
  // replaces the files when it ends.
  if (uploads && collective_failed_) UploadArtifacts(false);
  sync_.reset();
  if (options_.metrics != nullptr) options_.metrics->busy.Set({}, 0);
  done_.store(true);
}

void RankRunner::UploadArtifacts(bool ok) {
  const std::string dir = OutDir();
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return;  // failed before it made its directory
  // The spec as accepted, defaults filled in: what `matctl submit` takes again.
  common::WriteFileAtomic(dir + "/job_spec.yaml",
                          api::JobSpecToYaml(api::WithJobSpecDefaults(assign_.spec())))
      .IgnoreError();
  if (!ok) {  // the model as of the newest checkpoint, if there is one
    const v1::JobSpec spec = api::WithJobSpecDefaults(assign_.spec());
    const absl::Status s = ModelFromCheckpoint(
        dir + "/checkpoint.pt", dir + "/model.safetensors",
        {{"mat.model", spec.model().kind()}, {"mat.seed", std::to_string(spec.seed())}});
    if (s.code() == absl::StatusCode::kNotFound) {
      // Said in the job's log: `matctl download` would otherwise just lack the model.
      spdlog::warn("{}: no checkpoint yet, so no model.safetensors to give back "
                   "(train.checkpoint_every is {})",
                   job_id(), assign_.spec().train().checkpoint_every());
    } else if (!s.ok()) {
      spdlog::warn("{}: no model from the checkpoint: {}", job_id(), s.ToString());
    }
  }
  const auto deadline = std::chrono::steady_clock::now() + options_.artifact_upload.deadline;
  v1::UploadArtifactRequest identity;
  identity.set_worker_id(options_.worker_id);
  identity.set_job_id(job_id());
  identity.set_rank(rank());
  identity.set_attempt(assign_.attempt());
  int uploaded = 0;
  for (const std::string& name : ArtifactNames(dir)) {
    const absl::Status s = UploadArtifactFile(
        options_.upload_artifact, identity, name, dir + "/" + name, options_.artifact_upload,
        deadline, [this] {
          const auto now = std::chrono::steady_clock::now().time_since_epoch();
          return uploads_abandoned_.load() ||
                 std::chrono::duration_cast<std::chrono::nanoseconds>(now).count() >
                     uploads_until_ns_.load();
        });
    if (s.ok()) {
      ++uploaded;
      continue;
    }
    spdlog::warn("{}: artifact {} not uploaded: {}", job_id(), name, s.ToString());
    // These concern one file; anything else (the job, this worker, the coordinator) every file.
    const absl::StatusCode c = s.code();
    if (c != absl::StatusCode::kResourceExhausted && c != absl::StatusCode::kDataLoss &&
        c != absl::StatusCode::kInvalidArgument) {
      break;
    }
  }
  spdlog::info("{}: {} artifacts uploaded to the coordinator", job_id(), uploaded);
}

absl::Status RankRunner::CheckDataRoots(const config::TrainConfig& config) const {
  if (options_.data_roots.empty()) return absl::OkStatus();
  // Defence in depth behind the coordinator's --data-root: this process reads the files.
  const std::vector<std::pair<std::string, std::string>> paths = {
      {"data.dir", config.data.dir}, {"model.init_from", config.model.init_from}};
  for (const auto& [key, path] : paths) {
    if (path.empty()) continue;
    std::error_code error;
    const std::filesystem::path full = std::filesystem::absolute(path, error);
    if (absl::Status s = common::CheckUnderRoots(error ? path : full.string(),
                                                 options_.data_roots);
        !s.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat(key, ": ", s.message(), " (mat-worker --data-root)"));
    }
  }
  return absl::OkStatus();
}

void RankRunner::SendModuleList(const trainer::Trainer& job_trainer) {
  v1::WorkerMessage m = Message();
  v1::ModuleList* list = m.mutable_modules();
  list->set_job_id(job_id());
  list->set_attempt(assign_.attempt());
  for (const auto& module : job_trainer.partition().modules) {
    v1::ModuleDescriptor* d = list->add_modules();
    d->set_name(module.name);
    d->set_group(module.group);
    d->set_layer(module.layer);
    d->set_index(module.index);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    module_list_ = m;  // resent on reconnect
  }
  if (!send_(m)) spdlog::warn("{} rank 0: no coordinator session; ModuleList sent on reconnect",
                              job_id());
}

absl::Status RankRunner::FormProcessGroup(trainer::Trainer& job_trainer) {
  const std::string& address = assign_.rendezvous_address();
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError("rendezvous_address '" + address + "' is not HOST:PORT");
  }
  trainer::RendezvousOptions r;
  r.master_host = address.substr(0, colon);
  r.master_port = std::atoi(address.c_str() + colon + 1);
  r.local_host = options_.local_host;
  r.rank = assign_.rank();
  r.world_size = assign_.world_size();
  // NCCL when every rank has a GPU of its own, Gloo on CPUs or ranks sharing a GPU.
  r.backend = "auto";
  r.device = job_trainer.device();
  r.prefix = absl::StrCat(job_id(), "/attempt-", assign_.attempt());
  r.timeout = options_.rendezvous_timeout;
  r.cancelled = [this] {
    std::lock_guard<std::mutex> lock(mu_);
    return cancelled_;
  };
  spdlog::info("{} rank {}: forming the process group of {} ranks at {}", job_id(), rank(),
               r.world_size, address);
  absl::StatusOr<c10::intrusive_ptr<trainer::CollectiveGroup>> group =
      trainer::ConnectProcessGroup(r);
  if (!group.ok()) {
    collective_failed_ = group.status().code() != absl::StatusCode::kCancelled &&
                         group.status().code() != absl::StatusCode::kInvalidArgument;
    return group.status();
  }
  spdlog::info("{} rank {}: process group of {} ranks over {}", job_id(), rank(), r.world_size,
               (*group)->getBackendName());
  sync_ = std::make_unique<trainer::GradientSync>(
      *group, job_trainer.ParamEntries());
  // Decide's collectives must be the same on every rank: one staleness bound for the job.
  absl::StatusOr<int64_t> bound = sync_->AgreeMin(options_.max_mask_staleness_steps);
  if (!bound.ok()) {
    collective_failed_ = true;
    return bound.status();
  }
  max_staleness_ = *bound;
  return absl::OkStatus();
}

absl::Status RankRunner::Train(std::string* summary_json, std::string* checksum, int64_t* step) {
  const v1::JobSpec spec = api::WithJobSpecDefaults(assign_.spec());
  MAT_ASSIGN_OR_RETURN(config::TrainConfig config,
                       config::ParseTrainConfig(api::JobSpecToTrainerYaml(spec),
                                                "job " + job_id()));
  MAT_RETURN_IF_ERROR(CheckDataRoots(config));
  config.train.device = options_.device;
  if (options_.threads > 0) config.train.threads = options_.threads;
  total_steps_ = config.train.steps;
  probe_every_ = config.policy.probe_every;
  trainer::TrainerOptions trainer_options;
  trainer_options.out_dir = OutDir();
  trainer_options.resume = assign_.resume();
  trainer_options.rank = assign_.rank();
  trainer_options.world_size = assign_.world_size();
  trainer_options.hooks = this;
  MAT_ASSIGN_OR_RETURN(std::unique_ptr<trainer::Trainer> trainer,
                       trainer::Trainer::Create(config, trainer_options));

  // Before the rendezvous: no rank can report λ (after the rendezvous) before the coordinator
  // knows the modules.
  if (assign_.rank() == 0) SendModuleList(*trainer);
  if (assign_.world_size() > 1) MAT_RETURN_IF_ERROR(FormProcessGroup(*trainer));
  if (assign_.resume()) MAT_RETURN_IF_ERROR(AgreeOnCheckpoint());

  absl::StatusOr<nlohmann::json> summary = trainer->Run();
  *step = trainer->step();
  if (!summary.ok()) return summary.status();
  if (sync_ != nullptr) {
    const auto& s = sync_->stats();
    spdlog::info("{} rank {}: all-reduced {} bytes in {} buckets over {} steps; skipped {} bytes "
                 "of masked-off modules",
                 job_id(), rank(), s.bytes_reduced, s.buckets, s.steps, s.bytes_skipped);
    // This attempt's: a restarted job's ranks count from its resume step (allreduce_steps).
    (*summary)["allreduce_bytes"] = s.bytes_reduced;
    (*summary)["allreduce_bytes_skipped"] = s.bytes_skipped;
    (*summary)["allreduce_steps"] = s.steps;
    // The file `matctl download` gives back says what `matctl status` does.
    if (assign_.rank() == 0) {
      MAT_RETURN_IF_ERROR(
          common::WriteFileAtomic(OutDir() + "/summary.json", summary->dump(2) + "\n"));
    }
  }
  if (assign_.rank() == 0) *summary_json = summary->dump(2);
  *checksum = trainer->ParamChecksum();
  return absl::OkStatus();
}

absl::Status RankRunner::AgreeOnCheckpoint() {
  namespace fs = std::filesystem;
  const std::string path = OutDir() + "/checkpoint.pt";
  const std::string prev = path + ".prev";
  // A file that is missing or unreadable counts as absent (-1).
  auto step_of = [&](const std::string& file) -> int64_t {
    std::error_code error;
    if (!fs::exists(file, error)) return -1;
    absl::StatusOr<int64_t> step = trainer::ReadCheckpointStep(file);
    if (!step.ok()) {
      spdlog::warn("{} rank {}: {}", job_id(), rank(), step.status().ToString());
      return -1;
    }
    return *step;
  };
  const int64_t newest = step_of(path), older = step_of(prev);
  const int64_t mine = std::max(newest, older);
  int64_t agreed = mine;
  if (sync_ != nullptr) {
    absl::StatusOr<int64_t> min = sync_->AgreeMin(mine);
    if (!min.ok()) {
      collective_failed_ = true;
      return min.status();
    }
    agreed = *min;
  }
  const std::string suffix = absl::StrCat("attempt", assign_.attempt());
  auto move_aside = [&](const std::string& file, const std::string& why) -> absl::Status {
    std::error_code error;
    if (!fs::exists(file, error)) return absl::OkStatus();
    fs::rename(file, absl::StrCat(file, ".", why, "-", suffix), error);
    if (error) {
      return absl::UnavailableError(
          absl::StrCat("cannot move ", file, " aside: ", error.message()));
    }
    return absl::OkStatus();
  };
  if (agreed < 0) {
    spdlog::warn("{} rank {}: no checkpoint that every rank holds (this rank's newest: {}); "
                 "starting from step 0", job_id(), rank(), mine);
    MAT_RETURN_IF_ERROR(move_aside(path, "unused"));
    return move_aside(prev, "unused");
  }
  if (newest == agreed) {
    spdlog::info("{} rank {}: resuming from {} (step {})", job_id(), rank(), path, agreed);
    return absl::OkStatus();
  }
  if (older == agreed) {
    spdlog::warn("{} rank {}: resuming from {} (step {}): the newest checkpoint ({}) is not one "
                 "every rank holds",
                 job_id(), rank(), prev, agreed,
                 newest < 0 ? std::string("missing or unreadable") : absl::StrCat("step ", newest));
    return move_aside(path, "skipped");
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "rank ", rank(), " has no checkpoint at step ", agreed,
      ", the newest step every rank holds (it has ", newest, " and ", older, " in ", OutDir(),
      ")"));
}

absl::StatusOr<policy::MaskSchedule> RankRunner::Decide(int64_t step,
                                                        const trainer::ProbeResult& probe) {
  v1::WorkerMessage m = Message();
  v1::SpectraReport* report = m.mutable_spectra();
  report->set_job_id(job_id());
  report->set_rank(rank());
  report->set_attempt(assign_.attempt());
  report->set_step(step);
  for (const auto& s : probe.modules) {
    report->add_lambda_max(s.lambda_max);
    report->add_trace(s.trace);
    report->add_effective_rank(s.effective_rank);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    waiting_report_ = m;  // resent on reconnect until its mask arrives
  }
  if (!send_(m)) {
    spdlog::warn("{} rank {}: no coordinator session at probe step {}; waiting for it (at most "
                 "{} s)", job_id(), rank(), step, options_.mask_timeout.count() / 1000.0);
  }
  const metrics::LabelValues labels = {job_id(), std::to_string(rank())};
  if (options_.metrics != nullptr && !probe.modules.empty()) {
    options_.metrics->spectral_duration_seconds.Observe(labels, probe.seconds);
  }
  step_overhead_seconds_ += probe.seconds;
  const auto wait_start = std::chrono::steady_clock::now();

  v1::MaskUpdate mask;
  MAT_ASSIGN_OR_RETURN(const bool fresh, WaitForMask(step, &mask));
  if (!fresh) {
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
    step_overhead_seconds_ += waited;
    stale_steps_ += probe_every_;
    spdlog::warn("{} rank {}: no coordinator at probe step {}: training on under the previous "
                 "mask ({} steps without a fresh one, at most {})",
                 job_id(), rank(), step, stale_steps_, max_staleness_);
    return last_schedule_;
  }
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
  step_overhead_seconds_ += waited;
  if (options_.metrics != nullptr) options_.metrics->mask_wait_seconds.Observe(labels, waited);
  v1::WorkerMessage ack = Message();
  ack.mutable_mask_ack()->set_job_id(job_id());
  ack.mutable_mask_ack()->set_rank(rank());
  ack.mutable_mask_ack()->set_attempt(assign_.attempt());
  ack.mutable_mask_ack()->set_mask_version(mask.mask_version());
  send_(ack);
  // The module count is checked again by the Trainer against its model.
  MAT_ASSIGN_OR_RETURN(policy::MaskSchedule schedule,
                       ScheduleFromMaskUpdate(mask, mask.num_modules()));
  last_schedule_ = schedule;
  has_last_schedule_ = true;
  stale_steps_ = 0;
  return schedule;
}

absl::StatusOr<bool> RankRunner::WaitForMask(int64_t step, v1::MaskUpdate* mask) {
  const auto deadline = std::chrono::steady_clock::now() + options_.mask_timeout;
  auto timeout_error = [&] {
    return absl::DeadlineExceededError(absl::StrCat(
        "no mask for step ", step, " from the coordinator within ",
        options_.mask_timeout.count() / 1000.0, " s; stopping rather than diverge"));
  };
  auto take = [&] {  // REQUIRES: mu_ held, masks_ has `step`
    *mask = masks_[step];
    masks_.erase(masks_.begin(), masks_.upper_bound(step));  // keep only future ones
    waiting_report_.reset();
  };
  const bool may_go_stale = max_staleness_ > 0 && has_last_schedule_;
  if (!may_go_stale) {
    std::unique_lock<std::mutex> lock(mu_);
    const bool ready = cv_.wait_until(lock, deadline, [&] {
      return cancelled_ || masks_.count(step) > 0;
    });
    if (cancelled_) return absl::CancelledError(cancel_reason_);
    if (!ready) return timeout_error();
    take();
    return true;
  }
  // Every rank decides the same: 2 = has the mask, 1 = would go on stale, 0 = waits,
  // -1 = cancelled or out of time; the minimum over the ranks wins.
  const bool within_bound = stale_steps_ + probe_every_ <= max_staleness_;
  while (true) {
    int64_t flag;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(100), [&] {
        return cancelled_ || masks_.count(step) > 0 || (!connected_ && within_bound);
      });
      if (cancelled_ || std::chrono::steady_clock::now() > deadline) {
        flag = -1;
      } else if (masks_.count(step) > 0) {
        flag = 2;
      } else {
        flag = !connected_ && within_bound ? 1 : 0;
      }
    }
    int64_t agreed = flag;
    if (sync_ != nullptr) {
      absl::StatusOr<int64_t> min = sync_->AgreeMin(flag);
      if (!min.ok()) {
        collective_failed_ = true;
        return min.status();
      }
      agreed = *min;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (agreed == -1) {
      if (cancelled_) return absl::CancelledError(cancel_reason_);
      return timeout_error();
    }
    if (agreed == 2) {
      take();
      return true;
    }
    if (agreed == 1) {
      // The report of this step is dropped: the coordinator decides at a later probe step.
      waiting_report_.reset();
      return false;
    }
  }
}

absl::StatusOr<int> RankRunner::ReduceGradients(const std::vector<uint8_t>& active,
                                                bool loss_finite) {
  if (sync_ == nullptr) return loss_finite ? 0 : 1;
  absl::StatusOr<int> not_finite = sync_->AllReduce(active, loss_finite);
  if (!not_finite.ok() && not_finite.status().code() == absl::StatusCode::kInternal) {
    collective_failed_ = true;
  }
  if (options_.metrics != nullptr) {
    const metrics::LabelValues labels = {job_id(), std::to_string(rank())};
    const trainer::GradSyncStats& s = sync_->stats();
    options_.metrics->allreduce_bytes_total.Inc(
        labels, static_cast<double>(s.bytes_reduced - reported_bytes_reduced_));
    options_.metrics->allreduce_skipped_bytes_total.Inc(
        labels, static_cast<double>(s.bytes_skipped - reported_bytes_skipped_));
    reported_bytes_reduced_ = s.bytes_reduced;
    reported_bytes_skipped_ = s.bytes_skipped;
  }
  return not_finite;
}

absl::Status RankRunner::AverageBuffers(const std::vector<torch::Tensor>& buffers) {
  if (sync_ == nullptr) return absl::OkStatus();
  absl::Status status = sync_->AverageTensors(buffers);
  if (!status.ok() && status.code() == absl::StatusCode::kInternal) collective_failed_ = true;
  return status;
}

void RankRunner::OnProgress(const trainer::TrainerProgress& p) {
  if (options_.metrics != nullptr) {
    const metrics::LabelValues labels = {job_id(), std::to_string(rank())};
    // wall_seconds counts steps, probes and mask waits (not evaluation); the step alone is what
    // remains of its growth. The first call after a resume has no previous value.
    if (last_wall_seconds_ > 0 || p.step == 1) {
      options_.metrics->step_duration_seconds.Observe(
          labels, std::max(0.0, p.wall_seconds - last_wall_seconds_ - step_overhead_seconds_));
    }
    options_.metrics->step.Set(labels, static_cast<double>(p.step));
    options_.metrics->last_step_timestamp_seconds.Set(
        labels, std::chrono::duration<double>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count());
  }
  last_wall_seconds_ = p.wall_seconds;
  step_overhead_seconds_ = 0;
  const auto now = std::chrono::steady_clock::now();
  if (!p.evaluated && p.step != total_steps_ && now - last_progress_ < options_.progress_interval) {
    return;
  }
  last_progress_ = now;
  v1::WorkerMessage m = Message();
  v1::Progress* progress = m.mutable_progress();
  progress->set_job_id(job_id());
  progress->set_rank(rank());
  progress->set_attempt(assign_.attempt());
  progress->set_step(p.step);
  progress->set_train_loss(p.train_loss);
  if (p.evaluated) {
    progress->set_val_loss(p.val_loss);
    if (p.has_test_loss) progress->set_test_loss(p.test_loss);
  }
  progress->set_flops_total(p.flops_total);
  progress->set_active_modules(p.active_modules);
  progress->set_wall_seconds(p.wall_seconds);
  send_(m);
  SendLogs();
}

absl::Status RankRunner::CheckContinue() {
  std::lock_guard<std::mutex> lock(mu_);
  if (cancelled_) return absl::CancelledError(cancel_reason_);
  return absl::OkStatus();
}

}  // namespace mat::worker
