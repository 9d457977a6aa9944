// The one-process training loop shared by mat-train, the benchmarks and mat-worker.
//
// The loop is family-agnostic: it drives a Task (task.h) that owns the model, its data, its
// forward passes, evaluation and summary fields. Two tasks exist: the masked LM (model.kind bert
// or switch, on a WikiText corpus; loss in nats per masked token; lm_task.h) and image
// classification (model.kind vgg, on Fashion-MNIST or CIFAR-10; cross-entropy per image and top-1
// accuracy; image_task.h). The typed building blocks below (for tests and benchmarks) take the
// family's batch: those that take an MlmBatch are for the masked LM, those that take an ImageBatch
// for VGG; TrainStep and Probe for the other family are FAILED_PRECONDITION (Evaluate returns
// zeros).
//
// Per step: at every policy interval the policy decides (MAT probes the modules' λ_max on the
// step's first probe_samples samples first); the step's mask is applied to the model (masked-off
// modules' weight gradients are not computed) and to the optimizer (their state is untouched).
// Every eval_every steps it evaluates on validation (and on test when validation improves).
//
// Outputs in out_dir: metrics.jsonl (one line per evaluation), decisions.jsonl (one line per
// policy decision), summary.json, checkpoint.pt (+ checkpoint.pt.prev).
// Not thread-safe. Owns the model, the optimizer, the policy and the data streams.
#pragma once

#include <array>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "policy/policy.h"
#include "nlohmann/json.hpp"
#include "spectral/estimator.h"
#include "config/train_config.h"
#include "trainer/image_task.h"
#include "trainer/lm_task.h"
#include "trainer/optim/optimizer.h"
#include "trainer/optim/sgd.h"
#include "trainer/task.h"

namespace mat::trainer {

struct ProbeResult {
  std::vector<spectral::ModuleSpectrum> modules;  // empty when the policy needs no spectra
  double flops = 0;
  double decoder_flops = 0;  // the part of `flops` in the decoder's forward and backward passes
  double seconds = 0;
};

// Where a rank of a service job stands, for TrainerHooks::OnProgress.
struct TrainerProgress {
  int64_t step = 0;            // steps completed
  double train_loss = 0;       // this step's loss, nats per masked token
  bool evaluated = false;      // an evaluation finished at `step` (val_loss, maybe test_loss)
  double val_loss = 0;
  bool has_test_loss = false;  // the test split was evaluated (validation improved)
  double test_loss = 0;
  double val_accuracy = 0;     // vgg: top-1 on validation / test (when evaluated)
  double test_accuracy = 0;
  double flops_total = 0;      // this rank's FLOPs so far
  int active_modules = 0;      // under this step's mask
  double wall_seconds = 0;     // training wall time so far (evaluation excluded)
};

// What mat-worker plugs into the training loop so that a rank of a data-parallel service job
// trains under the coordinator's masks. All calls come from the thread running Trainer::Run.
// Without hooks (mat-train) the Trainer's own Policy decides and nothing is reduced.
class TrainerHooks {
 public:
  virtual ~TrainerHooks() = default;
  // At every probe step (step % policy.probe_every == 0): `probe` holds this rank's λ (empty
  // modules when the policy needs no spectra). Returns the masks from `step` until the next probe
  // step; may block until the coordinator's mask for `step` arrives, and fails (ending Run with
  // the error) when it does not arrive in time.
  virtual absl::StatusOr<policy::MaskSchedule> Decide(int64_t step, const ProbeResult& probe) = 0;
  // After backward, before the optimizer step: average the gradients over the ranks. `active`
  // is this step's mask (masked-off modules have no gradient, identically on every rank);
  // `loss_finite` whether this rank's loss is. Returns the number of ranks whose loss at this
  // step is not finite (this one's included): when it is > 0 every rank's Run fails at this
  // step, before its optimizer step, instead of the others waiting for the failed rank.
  virtual absl::StatusOr<int> ReduceGradients(const std::vector<uint8_t>& active,
                                              bool loss_finite) = 0;
  // Replace each tensor by its mean over the ranks (the model's buffers: VGG's BatchNorm
  // running statistics, which each rank updates from its own share of the batch). The trainer
  // calls it on every rank before the buffers are read: before a probe, an evaluation step and a
  // checkpoint. Running statistics are exponential moving averages, linear in the batch
  // statistics, so averaging them then equals averaging them after every step. Default: a
  // single process, nothing to do.
  virtual absl::Status AverageBuffers(const std::vector<torch::Tensor>& buffers) {
    (void)buffers;
    return absl::OkStatus();
  }
  // After every step (and its evaluation, if any).
  virtual void OnProgress(const TrainerProgress& progress) = 0;
  // Before every step: a non-OK status (e.g. CANCELLED) ends Run with it, without a checkpoint.
  virtual absl::Status CheckContinue() = 0;
};

// The files of an earlier run (logs, summary, checkpoints, model) that exist in `dir`, in a
// fixed order; empty when there are none or `dir` does not exist. A fresh Run in `dir` (no
// resume) replaces exactly these; mat-train refuses to without --overwrite.
std::vector<std::string> EarlierRunOutputs(const std::string& dir);
// Whether `dir` holds a checkpoint a resumed Run would load (checkpoint.pt or its .prev).
bool HasCheckpoint(const std::string& dir);

struct TrainerOptions {
  std::string out_dir;       // created if missing
  bool progress_bar = false;  // a live line on a terminal instead of one log line per evaluation
  bool resume = false;        // continue from out_dir/checkpoint.pt (or its .prev) when present
  // Data parallelism (mat-worker): this rank reads every world_size-th block of the shuffled
  // training data and takes train.batch_size / world_size samples a step; only rank 0 evaluates.
  // REQUIRES: 0 <= rank < world_size; Create refuses a batch or probe that does not fit
  // (config::ValidateRankShare).
  int rank = 0;
  int world_size = 1;
  // Borrowed; must outlive Run. nullptr: mat-train (local policy, no reduction).
  TrainerHooks* hooks = nullptr;
};

class Trainer {
 public:
  // Loads the corpus, builds the model, optimizer, policy and streams. Errors name the bad key
  // or file.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const config::TrainConfig& config,
                                                         TrainerOptions options);
  // The same loop over a task the caller built (a third family, or a test's toy task) instead
  // of MakeTask's; `config` still sets the optimizer, the policy, the estimator and the loop.
  // The typed building blocks (MlmBatch, ImageBatch, model(), vgg(), ...) are then unavailable.
  // REQUIRES: task != nullptr.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const config::TrainConfig& config,
                                                         TrainerOptions options,
                                                         std::unique_ptr<Task> task);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Trains until train.steps, or until `stop_at_step` (exclusive) when >= 0, then checkpoints.
  // Returns summary.json's content (also written) when it reached train.steps; else the
  // progress so far. What LibTorch throws (here and in Create) comes back as a status
  // (torch_status.h: RESOURCE_EXHAUSTED when memory ran out), never as an exception.
  absl::StatusOr<nlohmann::json> Run(int64_t stop_at_step = -1);

  // Building blocks, public for tests and benchmarks.
  // One optimizer step on `batch` under `active`/`lr_scale`; returns the mean masked-LM loss
  // (MlmBatch) or the mean cross-entropy per image (ImageBatch).
  absl::StatusOr<double> TrainStep(const MlmBatch& batch, const std::vector<uint8_t>& active,
                                   const std::vector<double>& lr_scale, double lr);
  absl::StatusOr<double> TrainStep(const ImageBatch& batch, const std::vector<uint8_t>& active,
                                   const std::vector<double>& lr_scale, double lr);
  // λ_max etc. of every module on the first policy.probe_samples samples of `batch`, by
  // `estimator` (borrowed; nullptr: the configured policy.estimator). VGG probes with
  // BatchNorm in eval mode (running statistics), so that sample i's loss depends on sample i
  // only.
  absl::StatusOr<ProbeResult> Probe(const MlmBatch& batch,
                                    spectral::Estimator* estimator = nullptr);
  absl::StatusOr<ProbeResult> Probe(const ImageBatch& batch,
                                    spectral::Estimator* estimator = nullptr);
  // Mean cross-entropy per image and top-1 accuracy (no gradients, BatchNorm in eval mode);
  // zeros on a masked-LM trainer.
  EvalResult Evaluate(const std::vector<ImageBatch>& batches);

  absl::Status SaveCheckpoint(const std::string& path);
  absl::Status LoadCheckpoint(const std::string& path);

  // The task (its model, data and evaluation).
  Task& task() { return *task_; }
  bool is_vgg() const { return images_ != nullptr; }
  // The model as a torch module (BERT/Switch or VGG).
  torch::nn::Module& network() { return task_->network(); }
  // The parameters the optimizer updates, with their modules (what GradientSync reduces).
  std::vector<ParamEntry> ParamEntries();
  BertMlm& model() { return lm_->model(); }      // REQUIRES: !is_vgg()
  Vgg& vgg() { return images_->vgg(); }          // REQUIRES: is_vgg()
  MaskedAdamW& optimizer() { return *optimizer_; }  // REQUIRES: train.optimizer adamw
  MaskedSgd& sgd() { return *sgd_; }                // REQUIRES: train.optimizer sgd
  policy::Policy& policy() { return *policy_; }
  MlmStream& train_stream() { return lm_->stream(); }        // REQUIRES: !is_vgg()
  ImageStream& image_stream() { return images_->stream(); }  // REQUIRES: is_vgg()
  const spectral::ModulePartition& partition() const { return task_->partition(); }
  const config::TrainConfig& config() const { return config_; }
  int64_t step() const { return step_; }
  // The step the last Run resumed from (its checkpoint's), or -1 when it started afresh.
  int64_t resumed_from_step() const { return resumed_from_step_; }
  // Whether the last Run got past out_dir's earlier contents (loaded its checkpoint, or cleared
  // them for a fresh run). false after a Run that failed on them: a truncated or mismatched
  // checkpoint is bad input (mat-train exits 2), not a failure while training.
  bool prepared() const { return prepared_; }
  double LearningRate(int64_t step) const;
  // All parameters' and buffers' bytes hashed (FNV-1a): equal runs have equal checksums.
  std::string ParamChecksum();
  const torch::Device& device() const { return device_; }

 private:
  Trainer(const config::TrainConfig& config, TrainerOptions options);
  // Both Creates: checks the config and options, then Init (MakeTask when `task` is null).
  // Run without the exception guard.
  absl::StatusOr<nlohmann::json> RunUnguarded(int64_t stop_at_step);
  static absl::StatusOr<std::unique_ptr<Trainer>> CreateImpl(const config::TrainConfig& config,
                                                             TrainerOptions options,
                                                             std::unique_ptr<Task> task);
  absl::Status Init();
  absl::Status AppendLine(const std::string& file, const nlohmann::json& line);
  absl::Status TruncateLog(const std::string& file, int64_t max_step);
  // INVALID_ARGUMENT naming every setting that shapes training in which this run differs from
  // the one that wrote checkpoint `path` (its metadata `meta`; config::ResumeConflicts).
  absl::Status CheckResumedSettings(const std::string& path, const nlohmann::json& meta) const;
  // `steps_done` steps in `elapsed` seconds since this Run began (a resumed run's earlier steps
  // are not this process's).
  void ShowProgress(double loss, int active, int64_t steps_done, double elapsed);
  // hooks->AverageBuffers over the model's buffers, when there are hooks and buffers.
  absl::Status SyncBuffers();
  // The end of every training step (after the task's ForwardBackward): the hooks' gradient
  // reduction, then INTERNAL when the loss is not finite here or on another rank, else the
  // optimizer's step; returns loss_value.
  absl::StatusOr<double> FinishStep(double loss_value, const std::vector<uint8_t>& active,
                                    const std::vector<double>& lr_scale, double lr);
  // The end of every probe: runs `estimator` on the task's recorded probe (catching LibTorch
  // errors), clears the gradients, and adds up the probe's FLOPs and seconds since t0.
  absl::StatusOr<ProbeResult> FinishProbe(absl::StatusOr<RecordedProbe> recorded,
                                          spectral::Estimator* estimator,
                                          std::chrono::steady_clock::time_point t0);
  // Run's phases (trainer_run.cc): resume from out_dir's checkpoint or clear its logs; probe and
  // decide at a probe step (the policy, or the hooks' coordinator), logging the decision; the
  // mask of step_; the masked step with its FLOPs; rank 0's evaluation (metrics.jsonl, best,
  // progress) or another rank's train-loss line; the final checkpoint, model and summary.
  absl::Status PrepareRun();
  absl::Status ProbeAndDecide(const TaskBatch& batch);
  absl::StatusOr<policy::StepMask> StepMaskNow() const;
  absl::StatusOr<double> StepAndCount(const TaskBatch& batch, const policy::StepMask& mask);
  absl::Status EvaluateAndLog(const policy::StepMask& mask, int active_now,
                              TrainerProgress* progress);
  absl::Status LogTrainLoss();
  absl::StatusOr<nlohmann::json> FinishRun();
  nlohmann::json Summary(double wall_seconds) const;
  // summary.json's "step_flops": {full, full_without_decoder, modules_off,
  // modules_off_without_decoder}, FLOPs of one nominal step (Summary's comment), and "backward"
  // (policy.backward: what modules_off still computes).
  nlohmann::json NominalStepFlops() const;
  // This rank's samples per step: train.batch_size / world_size (Create checked that it splits
  // evenly: config::ValidateRankShare).
  int64_t RankBatchSize() const { return config_.train.batch_size / options_.world_size; }

  config::TrainConfig config_;
  int64_t resumed_from_step_ = -1;
  bool prepared_ = false;
  TrainerOptions options_;
  torch::Device device_{torch::kCPU};
  Precision precision_ = Precision::kFloat32;  // train.precision: the step's forward
  std::unique_ptr<Task> task_;
  MaskedLmTask* lm_ = nullptr;  // task_ when it is the masked LM, else null
  ImageTask* images_ = nullptr;  // task_ when it is VGG, else null
  std::unique_ptr<MaskedAdamW> optimizer_;  // train.optimizer adamw
  std::unique_ptr<MaskedSgd> sgd_;          // train.optimizer sgd
  std::unique_ptr<policy::Policy> policy_;
  std::unique_ptr<spectral::Estimator> estimator_;

  // Progress, all saved in checkpoints.
  int64_t step_ = 0;
  FlopCounts flops_;
  double flops_full_ = 0;        // what full training would have cost for the same steps
  double train_seconds_ = 0;     // steps + probes (evaluation excluded)
  double spectral_seconds_ = 0;
  double eval_seconds_ = 0;
  double best_val_loss_ = 0;
  int64_t best_step_ = -1;
  double test_loss_at_best_ = 0;
  double val_accuracy_at_best_ = 0;   // a task that classifies
  double test_accuracy_at_best_ = 0;
  // Masked LM: test loss at [MASK] at the best step (EvalResult::loss_at_mask); absent for other
  // tasks, and after resuming from a checkpoint that predates it until validation improves.
  std::optional<double> test_loss_at_mask_at_best_;
  double flops_to_best_ = 0;
  double seconds_to_best_ = 0;
  double loss_sum_ = 0;          // train loss since the last evaluation
  int64_t loss_count_ = 0;
  double active_sum_ = 0;        // Σ over steps of the active fraction
  // Rank 0's evaluations: {step, FLOPs so far, validation loss, training seconds so far} each
  // (summary.json's "eval_curve").
  std::vector<std::array<double, 4>> eval_curve_;
  // Service jobs (hooks set): the coordinator's masks since the latest probe step.
  policy::MaskSchedule schedule_;
  bool has_schedule_ = false;
};

}  // namespace mat::trainer
