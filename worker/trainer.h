// The one-process training loop shared by mat-train, the benchmarks and (later) mat-worker.
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

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "coordinator/policy/policy.h"
#include "nlohmann/json.hpp"
#include "spectral/estimator.h"
#include "worker/autocast.h"
#include "worker/bert.h"
#include "worker/corpus.h"
#include "worker/flops.h"
#include "worker/mlm_data.h"
#include "worker/optimizer.h"
#include "worker/train_config.h"

namespace mat::worker {

// The model section as a BertConfig over a vocabulary of `vocab_size` ids (specials included).
BertConfig MakeBertConfig(const TrainConfig& config, int64_t vocab_size);

struct ProbeResult {
  std::vector<spectral::ModuleSpectrum> modules;  // empty when the policy needs no spectra
  double flops = 0;
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
  // is this step's mask (masked-off modules have no gradient, identically on every rank).
  virtual absl::Status ReduceGradients(const std::vector<uint8_t>& active) = 0;
  // After every step (and its evaluation, if any).
  virtual void OnProgress(const TrainerProgress& progress) = 0;
  // Before every step: a non-OK status (e.g. CANCELLED) ends Run with it, without a checkpoint.
  virtual absl::Status CheckContinue() = 0;
};

struct TrainerOptions {
  std::string out_dir;       // created if missing
  bool progress_bar = false;  // a live line on a terminal instead of one log line per evaluation
  bool resume = false;        // continue from out_dir/checkpoint.pt (or its .prev) when present
  // Data parallelism (mat-worker): this rank reads every world_size-th block of the shuffled
  // training data and takes train.batch_size / world_size samples a step; only rank 0 evaluates.
  // REQUIRES: 0 <= rank < world_size, batch_size % world_size == 0.
  int rank = 0;
  int world_size = 1;
  // Borrowed; must outlive Run. nullptr: mat-train (local policy, no reduction).
  TrainerHooks* hooks = nullptr;
};

class Trainer {
 public:
  // Loads the corpus, builds the model, optimizer, policy and streams. Errors name the bad key
  // or file.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const TrainConfig& config,
                                                         TrainerOptions options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Trains until train.steps, or until `stop_at_step` (exclusive) when >= 0, then checkpoints.
  // Returns summary.json's content (also written) when it reached train.steps; else the
  // progress so far.
  absl::StatusOr<nlohmann::json> Run(int64_t stop_at_step = -1);

  // Building blocks, public for tests and benchmarks.
  // One optimizer step on `batch` under `active`/`lr_scale`; returns the mean masked-LM loss.
  absl::StatusOr<double> TrainStep(const MlmBatch& batch, const std::vector<uint8_t>& active,
                                   const std::vector<double>& lr_scale, double lr);
  // λ_max etc. of every module on the first policy.probe_samples samples of `batch`, by
  // `estimator` (borrowed; nullptr: the configured policy.estimator).
  absl::StatusOr<ProbeResult> Probe(const MlmBatch& batch,
                                    spectral::Estimator* estimator = nullptr);
  // Mean masked-LM loss over fixed batches (no gradients, dropout off).
  double Evaluate(const std::vector<MlmBatch>& batches);

  absl::Status SaveCheckpoint(const std::string& path);
  absl::Status LoadCheckpoint(const std::string& path);

  BertMlm& model() { return model_; }
  MaskedAdamW& optimizer() { return *optimizer_; }
  policy::Policy& policy() { return *policy_; }
  MlmStream& train_stream() { return *train_stream_; }
  const spectral::ModulePartition& partition() const { return partition_; }
  const TrainConfig& config() const { return config_; }
  int64_t step() const { return step_; }
  double LearningRate(int64_t step) const;
  // Sum of all parameters' bytes hashed (FNV-1a): equal runs have equal checksums.
  std::string ParamChecksum();
  const torch::Device& device() const { return device_; }

 private:
  Trainer(const TrainConfig& config, TrainerOptions options);
  absl::Status Init();
  absl::Status AppendLine(const std::string& file, const nlohmann::json& line);
  absl::Status TruncateLog(const std::string& file, int64_t max_step);
  void ShowProgress(double loss, int active, double elapsed);
  nlohmann::json Summary(double wall_seconds) const;

  TrainConfig config_;
  TrainerOptions options_;
  torch::Device device_{torch::kCPU};
  Precision precision_ = Precision::kFloat32;  // train.precision: the step's forward
  Corpus corpus_;
  MlmOptions mlm_;
  BertMlm model_{nullptr};
  spectral::ModulePartition partition_;
  std::unique_ptr<MaskedAdamW> optimizer_;
  std::unique_ptr<policy::Policy> policy_;
  std::unique_ptr<spectral::Estimator> estimator_;
  std::unique_ptr<MlmStream> train_stream_;
  std::vector<MlmBatch> valid_batches_, test_batches_;

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
  double flops_to_best_ = 0;
  double seconds_to_best_ = 0;
  double loss_sum_ = 0;          // train loss since the last evaluation
  int64_t loss_count_ = 0;
  double active_sum_ = 0;        // Σ over steps of the active fraction
  // Service jobs (hooks set): the coordinator's masks since the latest probe step.
  policy::MaskSchedule schedule_;
  bool has_schedule_ = false;
};

}  // namespace mat::worker
