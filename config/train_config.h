// The configuration of one training run (mat-train's YAML, later the JobSpec): every tunable is
// defined here once, typed, defaulted and commented. Files and --set only fill it.
//
//   seed: 1
//   model:  {kind, layers, d_model, heads, d_ff, ffn_groups, max_seq_len, dropout, pre_ln,
//            experts, capacity_factor, aux_loss_weight, moe_every,
//            arch, width, filter_groups, classifier_hidden, init_from}
//   data:   {kind, dir, seq_len, mask_prob, valid_size, augment, train_fraction, vocab_size}
//   train:  {steps, batch_size, optimizer, lr, min_lr_ratio, warmup_steps, schedule,
//            decay_every, decay_factor, weight_decay, beta1, beta2, eps, momentum, nesterov,
//            eval_every, eval_batches, checkpoint_every, threads, device, precision,
//            deterministic}
//   policy: {kind, alpha, beta, gamma, patience, warmup_steps, probe_every, probe_samples,
//            estimator, lanczos_iterations, probe_projections, probe_positions,
//            min_active_fraction,
//            rand_fraction, rand_schedule, multirate_k, multirate_fast_fraction, delta1,
//            backward}
//
// An unknown key or a value of the wrong type is INVALID_ARGUMENT naming the key.
// Library mat_config: no LibTorch and no gRPC, so the coordinator validates job specs with the same
// code (api/job_spec.h ValidateJobSpec, JobSpecDefaults).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "policy/policy.h"

namespace mat::config {

struct ModelSection {
  // bert | switch (BERT with Switch FFNs: trainer/models/switch_ffn.h) | vgg (trainer/models/vgg.h; needs
  // data.kind fashion-mnist or cifar10)
  std::string kind = "bert";
  int64_t layers = 4;
  int64_t d_model = 256;
  int64_t heads = 8;
  int64_t d_ff = 1024;
  int64_t ffn_groups = 0;      // FFN slices per layer as modules (0: FFN always trained)
  int64_t max_seq_len = 128;   // position embeddings
  double dropout = 0.1;
  bool pre_ln = false;
  // switch only (ignored by bert):
  int64_t experts = 8;             // experts per Switch layer, each a module of group "experts"
  double capacity_factor = 1.25;   // expert capacity = ceil(capacity_factor · tokens / experts)
  double aux_loss_weight = 0.01;   // α of the load-balancing loss added to the training loss
  int64_t moe_every = 1;           // Switch FFN in layers 0, moe_every, 2·moe_every, ...
  // vgg only (bert and switch ignore these; vgg ignores the keys above):
  std::string arch = "vgg11";      // vgg11 (configuration A) | vgg16 (configuration D)
  double width = 0.25;             // channel multiplier (0.25: 16 … 128 channels)
  int64_t filter_groups = 4;       // modules of group "filters" per conv layer
  int64_t classifier_hidden = 0;   // 0: one linear classifier
  // Every kind: a safetensors file (e.g. a run's OUT/model.safetensors, or a job's downloaded
  // model) whose tensors replace the fresh initialisation before step 0; names and shapes must
  // be the model's (trainer/models/model_io.h), else INVALID_ARGUMENT naming the tensor. A resumed run
  // takes its checkpoint instead. Relative paths are from the working directory. Empty: none.
  std::string init_from;
};

struct DataSection {
  // wikitext: any corpus in the WikiText layout (bert, switch); fashion-mnist: the IDX files
  // (plain or .gz) of Fashion-MNIST; cifar10: CIFAR-10's binary batches (vgg).
  std::string kind = "wikitext";
  // Relative paths are from the working directory. The default is WikiText-2's; image kinds
  // name theirs (fashion-mnist: /usr/share/datasets/fashion-mnist of the Debian package
  // dataset-fashion-mnist; cifar10: the folder of data_batch_1.bin … test_batch.bin).
  std::string dir = "../shared/data/wikitext-2";
  int64_t seq_len = 128;                         // wikitext: tokens per sample
  double mask_prob = 0.15;                       // wikitext
  // Images: validation is the LAST valid_size examples of the training files (the test files
  // are only evaluated at a new best validation loss, never used to choose anything); training
  // uses the rest.
  int64_t valid_size = 5000;
  bool augment = false;  // images: random crop (4-pixel zero padding) and horizontal flip
  // Trains on the first train_fraction of the training split only, in (0, 1]: wikitext, the
  // first ⌈fraction · tokens⌉ tokens of train (the vocabulary is still the whole train split's);
  // images, the first ⌈fraction · images⌉ of the training images left before the validation
  // slice. Validation and test are unchanged. A smaller set reaches the regime where a model
  // overfits in fewer steps (the benchmarks' CPU presets).
  double train_fraction = 1.0;
  // wikitext: the vocabulary's size cap, 0 = every word of train. With V > 0 the V − 1 most
  // frequent training words are kept and the rest become "<unk>" (trainer/data/corpus.h); the tied
  // decoder's cost scales with V.
  int64_t vocab_size = 0;
};

struct TrainSection {
  int64_t steps = 2000;
  int64_t batch_size = 32;
  std::string optimizer = "adamw";  // adamw (trainer/optim/optimizer.h) | sgd (momentum, trainer/optim/sgd.h)
  double lr = 5e-4;              // peak learning rate
  double min_lr_ratio = 0.0;     // final lr = lr * min_lr_ratio
  int64_t warmup_steps = 100;    // linear lr warm-up
  // After warm-up: linear | cosine (both to lr·min_lr_ratio at train.steps) | constant |
  // step (lr · decay_factor^k after k·decay_every steps past the warm-up).
  std::string schedule = "linear";
  int64_t decay_every = 1000;    // step schedule only
  double decay_factor = 0.1;     // step schedule only
  double weight_decay = 0.01;    // adamw: decoupled; sgd: L2 added to the gradient
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double momentum = 0.9;         // sgd only
  bool nesterov = false;         // sgd only
  int64_t eval_every = 200;      // steps between evaluations
  int64_t eval_batches = 50;     // validation/test batches per evaluation (0: whole split)
  int64_t checkpoint_every = 0;  // steps between checkpoints (0: only at the end)
  int64_t threads = 0;           // intra-op threads (0: all cores)
  std::string device = "cpu";    // cpu | cuda | cuda:N
  std::string precision = "fp32";  // fp32 | bf16: autocast of the step's forward (trainer/models/autocast.h)
  // Deterministic kernels only (torch's deterministic algorithms, cuBLAS's fixed workspace): on
  // CUDA two runs of one config then give equal losses and parameters. CPU steps are
  // deterministic either way.
  bool deterministic = false;
};

struct PolicySection {
  // full | mat | rand | multirate | frozen-random | inverse (policy/policy_config.h)
  std::string kind = "mat";
  double alpha = 0.3;
  double beta = 0.0;
  double gamma = 0.5;
  int64_t patience = 3;
  int64_t warmup_steps = 200;    // steps before the policy may switch modules off
  int64_t probe_every = 20;      // steps between probes / decisions
  int64_t probe_samples = 16;    // n, the probe batch (<= train.batch_size)
  // gram | exact (loss kernel) | output (the paper's mNTK: output kernel at each masked
  // position, k projections of the vocabulary) | lanczos | exact-output (output kernels;
  // spectral/estimator.h). exact and exact-output: tiny models only.
  std::string estimator = "gram";
  int64_t lanczos_iterations = 8;  // lanczos: Krylov steps K (>= 1; capped at n * k)
  // output, lanczos, exact-output: k random projections of the logits per output (>= 1)
  int64_t probe_projections = 1;
  // output, lanczos, exact-output: P, masked positions per probe sample whose projected logits
  // are outputs (the first P in batch order; >= 1). d = probe_samples · P · k.
  int64_t probe_positions = 1;
  double min_active_fraction = 0.25;
  double rand_fraction = 0.5;
  // rand only: a MAT run's decisions.jsonl whose per-group active counts rand replays (the
  // paper's "-Rand" baseline at equal active counts); empty: rand_fraction.
  std::string rand_schedule;
  int64_t multirate_k = 4;
  double multirate_fast_fraction = 0.5;
  // Which Δ the temporal policy (beta > 0) divides by: warmup (the first Δ after warm-up) |
  // first-probe (the first Δ of training, paper eq. 6–7).
  std::string delta1 = "warmup";
  // What a masked-off module's backward skips (bert, switch heads; trainer/models/bert.h): weights (its
  // weight gradients and update only; it still passes activation gradients) | detach (it is a
  // constant in the backward: its share of the input gradient is skipped too). vgg: weights only.
  std::string backward = "weights";
};

struct TrainConfig {
  uint64_t seed = 1;
  ModelSection model;
  DataSection data;
  TrainSection train;
  PolicySection policy;
};

// Parses YAML text onto defaults. `origin` names the source in messages.
absl::StatusOr<TrainConfig> ParseTrainConfig(const std::string& yaml, const std::string& origin);
absl::StatusOr<TrainConfig> LoadTrainConfig(const std::string& path);
// Applies "a.b=value" (value is parsed as YAML scalar; a ' #' that YAML would read as a comment
// is INVALID_ARGUMENT asking to quote the value).
absl::Status ApplyOverride(TrainConfig& config, const std::string& assignment);
// Range checks across fields; INVALID_ARGUMENT naming the key.
absl::Status ValidateTrainConfig(const TrainConfig& config);
// Data parallelism over `world_size` ranks: each rank takes train.batch_size / world_size
// samples a step and probes its own share. INVALID_ARGUMENT naming the key when the batch does
// not split evenly or policy.probe_samples is more than a rank's share. REQUIRES: world_size >= 1.
absl::Status ValidateRankShare(const TrainConfig& config, int64_t world_size);
// The policy library's config for this run.
policy::PolicyConfig ToPolicyConfig(const TrainConfig& config);

// The per-group active counts (and group sizes, and the mask by module name) of every decision in
// a decisions.jsonl (one JSON object per line with "step" and "modules": [{"group", "active",
// "name"}, ...]; each line read by
// policy::ScheduleEntryFromDecisionJson, as the coordinator reads its stored decisions), for
// Policy::SetReplayedSchedule.
// NOT_FOUND names a missing file; INVALID_ARGUMENT names the file and line of a malformed one.
absl::StatusOr<std::vector<policy::Policy::ScheduleEntry>> LoadActiveCountSchedule(
    const std::string& decisions_jsonl);
// Every key with its current value, as "key: value" lines (documentation and logs).
std::vector<std::pair<std::string, std::string>> ListConfig(const TrainConfig& config);
// The same as YAML text ("key: value\n" per key, a string quoted where YAML would read it
// otherwise: empty, holding ' #', ...) that ParseTrainConfig reads back to an equal config
// (`mat-train --print-config`).
std::string FormatConfigYaml(const TrainConfig& config);

}  // namespace mat::config
