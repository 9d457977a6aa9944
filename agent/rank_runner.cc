#include "agent/rank_runner.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "common/path_util.h"
#include "common/status.h"
#include "coordinator/job_spec.h"
#include "spdlog/spdlog.h"
#include "worker/grad_sync.h"
#include "worker/train_config.h"

namespace mat::agent {
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
    : assign_(std::move(assign)), options_(std::move(options)), send_(std::move(send)) {}

RankRunner::~RankRunner() {
  Cancel("worker shutting down");
  Join();
}

std::string RankRunner::OutDir() const {
  return absl::StrCat(options_.work_dir, "/jobs/", assign_.job_id(), "/rank", assign_.rank());
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

void RankRunner::Main() {
  std::string summary, checksum;
  int64_t step = 0;
  absl::Status status = Train(&summary, &checksum, &step);
  bool cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled = cancelled_;
  }
  if (cancelled) {
    spdlog::info("{} rank {}: stopped ({})", job_id(), rank(), cancel_reason_);
  } else {
    v1::WorkerMessage m = Message();
    v1::RankDone* done = m.mutable_done();
    done->set_job_id(job_id());
    done->set_rank(rank());
    done->set_ok(status.ok());
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
    if (!send_(m)) spdlog::warn("{} rank {}: RankDone not delivered (no session)", job_id(), rank());
  }
  sync_.reset();
  if (options_.metrics != nullptr) options_.metrics->busy.Set({}, 0);
  done_.store(true);
}

absl::Status RankRunner::Train(std::string* summary_json, std::string* checksum, int64_t* step) {
  const v1::JobSpec spec = coordinator::WithJobSpecDefaults(assign_.spec());
  MAT_ASSIGN_OR_RETURN(worker::TrainConfig config,
                       worker::ParseTrainConfig(coordinator::JobSpecToTrainerYaml(spec),
                                                "job " + job_id()));
  if (!options_.data_roots.empty()) {
    // Defence in depth behind the coordinator's --data-root: this process reads the files.
    std::error_code error;
    const std::filesystem::path dir = std::filesystem::absolute(config.data.dir, error);
    if (absl::Status s = common::CheckUnderRoots(error ? config.data.dir : dir.string(),
                                                 options_.data_roots);
        !s.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("data.dir: ", s.message(), " (mat-worker --data-root)"));
    }
  }
  config.train.device = options_.device;
  if (options_.threads > 0) config.train.threads = options_.threads;
  total_steps_ = config.train.steps;
  worker::TrainerOptions trainer_options;
  trainer_options.out_dir = OutDir();
  trainer_options.resume = assign_.resume();
  trainer_options.rank = assign_.rank();
  trainer_options.world_size = assign_.world_size();
  trainer_options.hooks = this;
  MAT_ASSIGN_OR_RETURN(std::unique_ptr<worker::Trainer> trainer,
                       worker::Trainer::Create(config, trainer_options));

  // Before the rendezvous: no rank can report λ (after the rendezvous) before the coordinator
  // knows the modules.
  if (assign_.rank() == 0) {
    v1::WorkerMessage m = Message();
    v1::ModuleList* list = m.mutable_modules();
    list->set_job_id(job_id());
    for (const auto& module : trainer->partition().modules) {
      v1::ModuleDescriptor* d = list->add_modules();
      d->set_name(module.name);
      d->set_group(module.group);
      d->set_layer(module.layer);
      d->set_index(module.index);
    }
    if (!send_(m)) return absl::UnavailableError("lost the coordinator session");
  }

  if (assign_.world_size() > 1) {
    const std::string& address = assign_.rendezvous_address();
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError("rendezvous_address '" + address + "' is not HOST:PORT");
    }
    worker::RendezvousOptions r;
    r.master_host = address.substr(0, colon);
    r.master_port = std::atoi(address.c_str() + colon + 1);
    r.local_host = options_.local_host;
    r.rank = assign_.rank();
    r.world_size = assign_.world_size();
    r.backend = trainer->device().is_cuda() ? "nccl" : "gloo";  // gradients live on the device
    r.prefix = absl::StrCat(job_id(), "/attempt-", assign_.attempt());
    r.timeout = options_.rendezvous_timeout;
    r.cancelled = [this] {
      std::lock_guard<std::mutex> lock(mu_);
      return cancelled_;
    };
    spdlog::info("{} rank {}: forming the process group of {} ranks at {}", job_id(), rank(),
                 r.world_size, address);
    MAT_ASSIGN_OR_RETURN(auto group, worker::ConnectProcessGroup(r));
    sync_ = std::make_unique<worker::GradientSync>(
        group, worker::BuildParamEntries(*trainer->model(), trainer->partition()));
  }

  absl::StatusOr<nlohmann::json> summary = trainer->Run();
  *step = trainer->step();
  if (!summary.ok()) return summary.status();
  if (sync_ != nullptr) {
    const auto& s = sync_->stats();
    spdlog::info("{} rank {}: all-reduced {} bytes in {} buckets over {} steps; skipped {} bytes "
                 "of masked-off modules",
                 job_id(), rank(), s.bytes_reduced, s.buckets, s.steps, s.bytes_skipped);
    (*summary)["allreduce_bytes"] = s.bytes_reduced;
    (*summary)["allreduce_bytes_skipped"] = s.bytes_skipped;
  }
  if (assign_.rank() == 0) *summary_json = summary->dump(2);
  *checksum = trainer->ParamChecksum();
  return absl::OkStatus();
}

absl::StatusOr<policy::MaskSchedule> RankRunner::Decide(int64_t step,
                                                        const worker::ProbeResult& probe) {
  v1::WorkerMessage m = Message();
  v1::SpectraReport* report = m.mutable_spectra();
  report->set_job_id(job_id());
  report->set_rank(rank());
  report->set_step(step);
  for (const auto& s : probe.modules) {
    report->add_lambda_max(s.lambda_max);
    report->add_trace(s.trace);
    report->add_effective_rank(s.effective_rank);
  }
  if (!send_(m)) return absl::UnavailableError("lost the coordinator session");
  const metrics::LabelValues labels = {job_id(), std::to_string(rank())};
  if (options_.metrics != nullptr && !probe.modules.empty()) {
    options_.metrics->spectral_duration_seconds.Observe(labels, probe.seconds);
  }
  step_overhead_seconds_ += probe.seconds;
  const auto wait_start = std::chrono::steady_clock::now();

  v1::MaskUpdate mask;
  {
    std::unique_lock<std::mutex> lock(mu_);
    const bool ready = cv_.wait_for(lock, options_.mask_timeout, [&] {
      return cancelled_ || masks_.count(step) > 0;
    });
    if (cancelled_) return absl::CancelledError(cancel_reason_);
    if (!ready) {
      return absl::DeadlineExceededError(absl::StrCat(
          "no mask for step ", step, " from the coordinator within ",
          options_.mask_timeout.count() / 1000.0, " s; stopping rather than diverge"));
    }
    mask = masks_[step];
    masks_.erase(masks_.begin(), masks_.upper_bound(step));  // keep only future ones
  }
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
  step_overhead_seconds_ += waited;
  if (options_.metrics != nullptr) options_.metrics->mask_wait_seconds.Observe(labels, waited);
  v1::WorkerMessage ack = Message();
  ack.mutable_mask_ack()->set_job_id(job_id());
  ack.mutable_mask_ack()->set_rank(rank());
  ack.mutable_mask_ack()->set_mask_version(mask.mask_version());
  send_(ack);
  // The module count is checked again by the Trainer against its model.
  return ScheduleFromMaskUpdate(mask, mask.num_modules());
}

absl::Status RankRunner::ReduceGradients(const std::vector<uint8_t>& active) {
  if (sync_ == nullptr) return absl::OkStatus();
  absl::Status status = sync_->AllReduce(active);
  if (options_.metrics != nullptr) {
    const metrics::LabelValues labels = {job_id(), std::to_string(rank())};
    const worker::GradSyncStats& s = sync_->stats();
    options_.metrics->allreduce_bytes_total.Inc(
        labels, static_cast<double>(s.bytes_reduced - reported_bytes_reduced_));
    options_.metrics->allreduce_skipped_bytes_total.Inc(
        labels, static_cast<double>(s.bytes_skipped - reported_bytes_skipped_));
    reported_bytes_reduced_ = s.bytes_reduced;
    reported_bytes_skipped_ = s.bytes_skipped;
  }
  return status;
}

void RankRunner::OnProgress(const worker::TrainerProgress& p) {
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
}

absl::Status RankRunner::CheckContinue() {
  std::lock_guard<std::mutex> lock(mu_);
  if (cancelled_) return absl::CancelledError(cancel_reason_);
  return absl::OkStatus();
}

}  // namespace mat::agent
