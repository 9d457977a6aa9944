// Trainer::Run and its phases (trainer.h): probe -> decide -> masked step -> evaluate ->
// checkpoint, the same for every task (task.h): nothing here knows the model family. The rest of
// the Trainer is trainer.cc.
#include <chrono>
#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/status.h"
#include "common/stopwatch.h"
#include "spdlog/spdlog.h"
#include "trainer/models/model_io.h"
#include "trainer/torch_status.h"
#include "trainer/trainer.h"

namespace mat::trainer {
namespace {

using Clock = common::SteadyClock;
using common::SecondsSince;

// Everything a run writes into its out_dir.
constexpr const char* kRunOutputs[] = {"metrics.jsonl",  "decisions.jsonl",    "masks.jsonl",
                                       "summary.json",   "checkpoint.pt",      "checkpoint.pt.prev",
                                       "model.safetensors"};

}  // namespace

std::vector<std::string> EarlierRunOutputs(const std::string& dir) {
  std::vector<std::string> found;
  if (dir.empty()) return found;
  for (const char* f : kRunOutputs) {
    std::error_code error;
    if (std::filesystem::exists(dir + "/" + f, error)) found.push_back(f);
  }
  return found;
}

bool HasCheckpoint(const std::string& dir) {
  std::error_code error;
  const std::string ckpt = dir + "/checkpoint.pt";
  return !dir.empty() &&
         (std::filesystem::exists(ckpt, error) || std::filesystem::exists(ckpt + ".prev", error));
}

absl::Status Trainer::PrepareRun() {
  prepared_ = false;
  const std::string ckpt = options_.out_dir + "/checkpoint.pt";
  // Only a run that owns its folder alone (mat-train holds its LOCK): a service rank's folder
  // may be on storage other hosts write, whose processes kill(2) cannot see.
  if (!options_.out_dir.empty() && options_.hooks == nullptr) {
    if (const std::vector<std::string> temps = common::RemoveAbandonedTemps(
            options_.out_dir, std::vector<std::string>(std::begin(kRunOutputs), std::end(kRunOutputs)));
        !temps.empty()) {
      spdlog::warn("{}: removed what an interrupted write left: {}", options_.out_dir,
                   absl::StrJoin(temps, ", "));
    }
  }
  if (options_.resume && HasCheckpoint(options_.out_dir)) {
    MAT_RETURN_IF_ERROR(LoadCheckpoint(ckpt));
    if (step_ > config_.train.steps) {
      return absl::InvalidArgumentError(
          absl::StrCat("the checkpoint in ", options_.out_dir, " is at step ", step_,
                       ", past train.steps ", config_.train.steps,
                       ": raise train.steps to continue it, or start afresh without --resume"));
    }
    resumed_from_step_ = step_;
    MAT_RETURN_IF_ERROR(TruncateLog("metrics.jsonl", step_));
    MAT_RETURN_IF_ERROR(TruncateLog("decisions.jsonl", step_ - 1));
    MAT_RETURN_IF_ERROR(TruncateLog("masks.jsonl", step_ - 1));
    // A summary of an earlier end (a run continued with a larger train.steps) would stand for
    // this run until it ends, and for good if it dies: tools read summary.json as "finished".
    std::error_code error;
    if (step_ < config_.train.steps &&
        std::filesystem::remove(options_.out_dir + "/summary.json", error)) {
      spdlog::info("{}/summary.json of the run's earlier end removed: rewritten when it ends",
                   options_.out_dir);
    }
    spdlog::info("resumed at step {} from the checkpoint in {}", step_, options_.out_dir);
  } else if (!options_.out_dir.empty()) {
    if (options_.resume) {
      spdlog::info("--resume: no checkpoint in {}; starting afresh", options_.out_dir);
    }
    // A fresh run replaces an earlier run's outputs in the same folder, its checkpoints too: a
    // checkpoint left behind became this run's checkpoint.pt.prev at its first save, and a
    // later --resume could fall back to it and continue the other run.
    std::vector<std::string> replaced;
    for (const char* f : kRunOutputs) {
      std::error_code error;
      if (std::filesystem::remove(options_.out_dir + "/" + f, error)) replaced.push_back(f);
    }
    if (!replaced.empty()) {
      spdlog::warn("{} held an earlier run's {}: replaced by this fresh run (mat-train --resume would have continued it)",
                   options_.out_dir, absl::StrJoin(replaced, ", "));
    }
  }
  prepared_ = true;
  return absl::OkStatus();
}

absl::Status Trainer::ProbeAndDecide(const TaskBatch& batch) {
  TrainerHooks* hooks = options_.hooks;
  std::vector<double> lambda;
  ProbeResult probe;
  if (policy_->NeedsSpectra()) {
    // The probe reads the buffers (VGG's BatchNorm statistics): the ranks' mean first. A model
    // without buffers (BERT, Switch) has nothing to average.
    MAT_RETURN_IF_ERROR(SyncBuffers());
    const auto t0 = Clock::now();
    MAT_ASSIGN_OR_RETURN(
        probe, FinishProbe(task_->RecordProbe(batch, config_.policy.probe_samples, *estimator_),
                           estimator_.get(), t0));
    for (const auto& s : probe.modules) lambda.push_back(s.lambda_max);
    flops_.spectral += probe.flops;
    flops_.decoder += probe.decoder_flops;
    spectral_seconds_ += probe.seconds;
  }
  nlohmann::json line;
  if (hooks != nullptr) {
    // The coordinator decides (from every rank's λ); this rank logs what it was told.
    MAT_ASSIGN_OR_RETURN(schedule_, hooks->Decide(step_, probe));
    if (schedule_.every_step.size() != size_t(partition().size())) {
      return absl::InvalidArgumentError(
          "mask for step " + std::to_string(step_) + " has " +
          std::to_string(schedule_.every_step.size()) + " modules, the model " +
          std::to_string(partition().size()));
    }
    has_schedule_ = true;
    line = {{"step", step_}, {"every_step", schedule_.every_step}, {"slow", schedule_.slow},
            {"slow_every", schedule_.slow_every}, {"lambda_max", lambda}};
  } else {
    MAT_ASSIGN_OR_RETURN(policy::Decision d, policy_->Observe(step_, lambda));
    line = d.ToJson(policy_->modules(), policy_->config());
  }
  if (!probe.modules.empty()) {
    std::vector<double> tr, er;
    for (const auto& s : probe.modules) {
      tr.push_back(s.trace);
      er.push_back(s.effective_rank);
    }
    line["trace"] = tr;
    line["effective_rank"] = er;
    line["probe_seconds"] = probe.seconds;
  }
  return AppendLine(hooks != nullptr ? "masks.jsonl" : "decisions.jsonl", line);
}

absl::StatusOr<policy::StepMask> Trainer::StepMaskNow() const {
  if (options_.hooks == nullptr) return policy_->MaskAt(step_);
  if (!has_schedule_) {
    return absl::FailedPreconditionError("no mask for step " + std::to_string(step_) +
                                         " (resumed between probe steps without one)");
  }
  return policy::MaskFromSchedule(schedule_, step_);
}

absl::StatusOr<double> Trainer::StepAndCount(const TaskBatch& batch,
                                             const policy::StepMask& mask) {
  MAT_ASSIGN_OR_RETURN(const double forward_loss, task_->ForwardBackward(batch, mask.active));
  MAT_ASSIGN_OR_RETURN(const double loss,
                       FinishStep(forward_loss, mask.active, mask.lr_scale, LearningRate(step_)));
  double full = 0;
  flops_ += task_->StepFlops(batch, mask.active, &full);
  flops_full_ += full;
  return loss;
}

absl::Status Trainer::LogTrainLoss() {
  // Only rank 0 evaluates (every rank holds the same parameters).
  nlohmann::json line = {{"step", step_},
                         {"train_loss", loss_sum_ / double(std::max<int64_t>(loss_count_, 1))},
                         {"wall_seconds", train_seconds_}};
  MAT_RETURN_IF_ERROR(AppendLine("metrics.jsonl", line));
  loss_sum_ = 0;
  loss_count_ = 0;
  return absl::OkStatus();
}

absl::Status Trainer::EvaluateAndLog(const policy::StepMask& mask, int active_now,
                                     TrainerProgress* progress) {
  auto e0 = Clock::now();
  const EvalResult val_eval = task_->Evaluate(EvalSplit::kValid);
  const double val = val_eval.loss;
  bool best = best_step_ < 0 || val < best_val_loss_;
  if (best) {
    best_val_loss_ = val;
    best_step_ = step_;
    const EvalResult test = task_->Evaluate(EvalSplit::kTest);
    test_loss_at_best_ = test.loss;
    val_accuracy_at_best_ = val_eval.accuracy;
    test_accuracy_at_best_ = test.accuracy;
    test_loss_at_mask_at_best_ = test.loss_at_mask;
    flops_to_best_ = flops_.total();
    seconds_to_best_ = train_seconds_;
  }
  eval_seconds_ += SecondsSince(e0);
  eval_curve_.push_back({double(step_), flops_.total(), val, train_seconds_});
  std::map<std::string, int> active_by_group;
  for (int m = 0; m < partition().size(); ++m)
    active_by_group[partition().modules[m].group] += mask.active[m];
  nlohmann::json line = {
      {"step", step_},
      {"train_loss", loss_sum_ / double(std::max<int64_t>(loss_count_, 1))},
      {"val_loss", val},
      {"lr", LearningRate(step_ - 1)},
      {"flops", {{"forward", flops_.forward}, {"activation_grad", flops_.activation_grad},
                 {"weight_grad", flops_.weight_grad}, {"spectral", flops_.spectral},
                 {"total", flops_.total()}, {"total_without_decoder", flops_.total_without_decoder()}}},
      {"active_modules", active_by_group},
      {"wall_seconds", train_seconds_},
  };
  if (best) line["test_loss"] = test_loss_at_best_;
  if (task_->classifies()) {
    line["val_accuracy"] = val_eval.accuracy;
    if (best) line["test_accuracy"] = test_accuracy_at_best_;
  }
  if (val_eval.loss_at_mask) {
    // The loss at the positions whose input is [MASK] only: what is left once copying a shown
    // token is no help (unigram_eval_*_loss_at_mask in summary.json are its baselines).
    line["val_loss_at_mask"] = *val_eval.loss_at_mask;
    if (best && test_loss_at_mask_at_best_) line["test_loss_at_mask"] = *test_loss_at_mask_at_best_;
  }
  task_->AddEvalFields(&line);
  MAT_RETURN_IF_ERROR(AppendLine("metrics.jsonl", line));
  progress->evaluated = true;
  progress->val_loss = val;
  progress->has_test_loss = best;
  progress->test_loss = test_loss_at_best_;
  progress->val_accuracy = val_eval.accuracy;
  progress->test_accuracy = test_accuracy_at_best_;
  if (options_.progress_bar) std::fprintf(stderr, "\n");
  spdlog::info("step {}/{} train_loss {:.4f} val_loss {:.4f} active {}/{} flops {:.3e} {:.1f}s",
               step_, config_.train.steps, line["train_loss"].get<double>(), val, active_now,
               partition().size(), flops_.total(), train_seconds_);
  loss_sum_ = 0;
  loss_count_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<nlohmann::json> Trainer::FinishRun() {
  const auto& c = config_;
  if (!options_.out_dir.empty()) MAT_RETURN_IF_ERROR(SaveCheckpoint(options_.out_dir + "/checkpoint.pt"));
  nlohmann::json summary = Summary(train_seconds_);
  summary["param_checksum"] = ParamChecksum();  // equal runs, equal checksums
  if (step_ >= c.train.steps && !options_.out_dir.empty()) {
    if (options_.rank == 0) {  // the trained model, for its user (trainer/models/model_io.h)
      MAT_RETURN_IF_ERROR(SaveModelSafetensors(
          network(), options_.out_dir + "/model.safetensors",
          {{"format", "pt"}, {"mat.model", c.model.kind}, {"mat.step", std::to_string(step_)},
           {"mat.seed", std::to_string(c.seed)}}));
    }
    MAT_RETURN_IF_ERROR(common::WriteFileAtomic(options_.out_dir + "/summary.json", summary.dump(2) + "\n"));
  }
  return summary;
}

absl::StatusOr<nlohmann::json> Trainer::Run(int64_t stop_at_step) {
  return StatusFromTorch([&] { return absl::StrCat("training at step ", step_); },
                         [&] { return RunUnguarded(stop_at_step); });
}

absl::StatusOr<nlohmann::json> Trainer::RunUnguarded(int64_t stop_at_step) {
  const auto& c = config_;
  MAT_RETURN_IF_ERROR(PrepareRun());
  const int64_t end = stop_at_step >= 0 ? std::min(stop_at_step, c.train.steps) : c.train.steps;
  const int64_t B = RankBatchSize();
  const double seconds_before = train_seconds_;
  const int64_t step_before = step_;
  TrainerHooks* hooks = options_.hooks;
  while (step_ < end) {
    if (hooks != nullptr) MAT_RETURN_IF_ERROR(hooks->CheckContinue());
    auto t0 = Clock::now();
    const std::unique_ptr<TaskBatch> batch = task_->NextBatch(B);
    if (step_ % c.policy.probe_every == 0) MAT_RETURN_IF_ERROR(ProbeAndDecide(*batch));
    MAT_ASSIGN_OR_RETURN(const policy::StepMask mask, StepMaskNow());
    MAT_ASSIGN_OR_RETURN(const double loss, StepAndCount(*batch, mask));
    int active_now = 0;
    for (uint8_t a : mask.active) active_now += a;
    active_sum_ += partition().size() ? double(active_now) / partition().size() : 1.0;
    loss_sum_ += loss;
    ++loss_count_;
    ++step_;
    train_seconds_ += SecondsSince(t0);
    if (options_.progress_bar) {
      ShowProgress(loss, active_now, step_ - step_before, train_seconds_ - seconds_before);
    }

    const bool checkpoint_now = c.train.checkpoint_every > 0 &&
                                step_ % c.train.checkpoint_every == 0 && step_ < end &&
                                !options_.out_dir.empty();
    const bool evaluate_now = step_ % c.train.eval_every == 0 || step_ == c.train.steps;
    if (evaluate_now || checkpoint_now || step_ == end) {
      MAT_RETURN_IF_ERROR(SyncBuffers());  // every rank, before rank 0 evaluates or any saves
    }
    TrainerProgress progress;
    progress.step = step_;
    progress.train_loss = loss;
    progress.active_modules = active_now;
    if (evaluate_now) {
      MAT_RETURN_IF_ERROR(options_.rank > 0 ? LogTrainLoss()
                                            : EvaluateAndLog(mask, active_now, &progress));
    }
    if (hooks != nullptr) {
      progress.flops_total = flops_.total();
      progress.wall_seconds = train_seconds_;
      hooks->OnProgress(progress);
    }
    if (checkpoint_now) MAT_RETURN_IF_ERROR(SaveCheckpoint(options_.out_dir + "/checkpoint.pt"));
  }
  if (hooks == nullptr && step_ == c.train.steps && loss_count_ > 0) {
    // Resumed at its end with steps not yet evaluated (train.steps lowered to a checkpoint's
    // step): evaluated here, as the step that reached train.steps would have been. The mask is
    // the last trained step's. (A service job's train.steps cannot change on a restart.)
    const policy::StepMask mask = policy_->MaskAt(step_ - 1);
    int active_now = 0;
    for (uint8_t a : mask.active) active_now += a;
    TrainerProgress progress;
    progress.step = step_;
    MAT_RETURN_IF_ERROR(options_.rank > 0 ? LogTrainLoss()
                                          : EvaluateAndLog(mask, active_now, &progress));
  }
  return FinishRun();
}

}  // namespace mat::trainer
