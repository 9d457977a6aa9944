// Task: one model family's side of training, behind which Trainer::Run is family-agnostic
// (trainer.h). A task owns its model, its data streams and fixed evaluation batches, the forward
// pass and loss of a training step and of a probe, its FLOP formulas, its evaluation, its data
// state in checkpoints and its own summary fields. The Trainer owns the rest: the optimizer, the
// policy, the spectral estimator, the hooks, the loop, progress and checkpoints.
//
//   MaskedLmTask (lm_task.h)     model.kind bert | switch on a WikiText corpus; loss in nats per
//                                masked token.
//   ImageTask    (image_task.h)  model.kind vgg on Fashion-MNIST or CIFAR-10; cross-entropy per
//                                image and top-1 accuracy.
//
// MakeTask picks one by model.kind. A batch a task returns (TaskBatch) goes back only to that
// task. Not thread-safe; called from the thread that runs the Trainer.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "config/train_config.h"
#include "nlohmann/json.hpp"
#include "spectral/estimator.h"
#include "spectral/module_partition.h"
#include "trainer/models/autocast.h"
#include "trainer/models/flops.h"

namespace mat::trainer {

// An evaluation: mean loss (nats per masked token, or per image) and, for a task that
// classifies, top-1 accuracy in [0, 1] (else 0).
struct EvalResult {
  double loss = 0;
  double accuracy = 0;
  // Masked LM: the mean loss over the predicted positions whose input is [MASK] only (what is
  // left once copying a shown token is no help); NaN when the batches have no such position.
  // Absent for a task without [MASK] positions.
  std::optional<double> loss_at_mask;
};

// What every task is built from.
struct TaskContext {
  config::TrainConfig config;  // validated
  torch::Device device{torch::kCPU};
  Precision precision = Precision::kFloat32;  // train.precision: the step's forward
  int rank = 0;                               // data parallelism: this rank's share of the data
  int world_size = 1;
};

// One training batch of some task; only the task that made it reads it.
class TaskBatch {
 public:
  virtual ~TaskBatch() = default;
};

// A recorded probe forward (TakeProbe) and what it cost.
struct RecordedProbe {
  spectral::ProbeBatch probe;
  double forward_flops = 0;          // the probe's forward pass
  double backward_pass_flops = 0;    // one backward pass of the probe batch (activation grads)
  // The decoder's part of each (FlopCounts::decoder; 0 for a model without one).
  double forward_decoder_flops = 0;
  double backward_pass_decoder_flops = 0;
};

// Which fixed evaluation batches.
enum class EvalSplit { kValid, kTest };

class Task {
 public:
  virtual ~Task() = default;

  // The model as a torch module, and its modules (what MAT masks).
  virtual torch::nn::Module& network() = 0;
  virtual const spectral::ModulePartition& partition() const = 0;

  // The next `samples` training samples of this rank (sequences or images).
  virtual std::unique_ptr<TaskBatch> NextBatch(int64_t samples) = 0;
  // Forward and loss under `active` (masked-off modules' weight gradients are not computed) and
  // the context's precision, then backward. Returns the loss (nats per masked token, or per
  // image); a non-finite value when the loss (or an auxiliary loss) is not finite. INTERNAL when
  // LibTorch throws.
  virtual absl::StatusOr<double> ForwardBackward(const TaskBatch& batch,
                                                 const std::vector<uint8_t>& active) = 0;
  // The FLOPs of the step just taken on `batch` under `active`, and of the same step with every
  // module active (what full training would have cost). Called once after each ForwardBackward.
  virtual FlopCounts StepFlops(const TaskBatch& batch, const std::vector<uint8_t>& active,
                               double* full_total) = 0;
  // One nominal step of `samples` samples under `active` (summary.json's step_flops).
  virtual FlopCounts NominalStepFlops(int64_t samples, const std::vector<uint8_t>& active) const = 0;

  // A probe forward over the first `n` samples of `batch` with every module active, the linear
  // sites recorded and per-sample losses [n] (the estimator's outputs too when it needs them).
  // The model is back in training mode afterwards. INVALID_ARGUMENT when the batch has fewer
  // than n samples; INTERNAL when LibTorch throws.
  virtual absl::StatusOr<RecordedProbe> RecordProbe(const TaskBatch& batch, int64_t n,
                                                    const spectral::Estimator& estimator) = 0;

  // Mean loss (and accuracy, and for a masked LM the loss at [MASK]) over the fixed batches of
  // `split`, with no gradients and every module active.
  virtual EvalResult Evaluate(EvalSplit split) = 0;
  // True when Evaluate's accuracy means something (the table's test metric is then accuracy).
  virtual bool classifies() const = 0;
  // Fields this task adds to an evaluation's metrics.jsonl line (and resets what it averaged
  // since the previous one).
  virtual void AddEvalFields(nlohmann::json* line) = 0;
  // Fields this task adds to summary.json.
  virtual void AddSummaryFields(nlohmann::json* summary) const = 0;

  // Training examples after data.train_fraction, and their unit ("tokens" | "images").
  virtual int64_t train_size() const = 0;
  virtual std::string train_size_unit() const = 0;

  // The task's state in a checkpoint's metadata ("data": the stream's position, and what it
  // averages between evaluations), and back. LoadState: DATA_LOSS-worthy errors as statuses;
  // json exceptions propagate to the caller.
  virtual void SaveState(nlohmann::json* meta) const = 0;
  virtual absl::Status LoadState(const nlohmann::json& meta) = 0;

  // Rewrites tensors saved with an earlier storage layout of this task's model (a checkpoint's
  // or a model file's keys) into the current one, in place, before they are loaded. Returns how
  // many groups it rewrote (0: none, and the default).
  virtual int UpgradeTensors(std::map<std::string, torch::Tensor>* tensors) const { return 0; }
};

// The task of config.model.kind (bert | switch: MaskedLmTask; vgg: ImageTask): loads its data
// and builds its model on the context's device. Errors name the bad key or file.
absl::StatusOr<std::unique_ptr<Task>> MakeTask(const TaskContext& context);

// How many of n training examples data.train_fraction keeps: ⌈fraction · n⌉.
int64_t TrainPrefix(double fraction, int64_t n);

// The output-kernel estimators' outputs [n, P·k]: column p·k + j of row i is the logits at
// sample i's p-th predicted position (in batch order; sample = position / seq, each sample's
// positions contiguous) times column j of a fixed Gaussian R [V, k] / sqrt(V) (drawn on the CPU
// from a generator seeded by `seed`, the same at every probe), and 0 where sample i has fewer
// than P positions. k = 0: the logits themselves (k = V, no projection).
// logits [m, V], positions [m].
torch::Tensor ProjectOutputs(const torch::Tensor& logits, const torch::Tensor& positions,
                             int64_t seq, int64_t n, int64_t positions_per_sample, int64_t k,
                             uint64_t seed);

}  // namespace mat::trainer
