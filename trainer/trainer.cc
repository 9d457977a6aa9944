#include "trainer/trainer.h"
#include <ATen/CPUGeneratorImpl.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "common/file_util.h"
#include "common/fnv1a.h"
#include "common/status.h"
#include "spdlog/spdlog.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/models/model_io.h"

namespace mat::trainer {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Mean CE per sample of the rows [0, n): losses [n]. logits [M, V], labels [M], positions [M].
torch::Tensor PerSampleLoss(const torch::Tensor& logits, const torch::Tensor& labels,
                            const torch::Tensor& positions, int64_t seq, int64_t n) {
  torch::Tensor ce = torch::nn::functional::cross_entropy(
      logits, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
  torch::Tensor sample = torch::div(positions, seq, "floor");
  torch::Tensor sums = torch::zeros({n}, ce.options()).index_add(0, sample, ce);
  torch::Tensor counts = torch::zeros({n}, ce.options()).index_add(0, sample, torch::ones_like(ce));
  return sums / counts;
}

// The output-kernel estimators' outputs [n, P·k]: column p·k + j of row i is the logits at
// sample i's p-th masked position (in batch order; sample = position / seq, each sample's
// positions contiguous) times column j of a fixed Gaussian R [V, k] / sqrt(V) (drawn on the CPU
// from a generator seeded by the run's seed, the same at every probe), and 0 where sample i has
// fewer than P masked positions. k = 0: the logits themselves (k = V, no projection).
// logits [m, V], positions [m].
torch::Tensor ProjectOutputs(const torch::Tensor& logits, const torch::Tensor& positions,
                             int64_t seq, int64_t n, int64_t positions_per_sample, int64_t k,
                             uint64_t seed) {
  const int64_t vocab = logits.size(1);
  const int64_t P = positions_per_sample;
  torch::Tensor proj = logits;  // [m, k]
  if (k > 0) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 0x9E3779B97F4A7C15ULL + 0x70726f6aULL);
    torch::Tensor r = torch::randn({vocab, k}, gen, torch::TensorOptions().dtype(torch::kFloat64)) /
                      std::sqrt(double(vocab));
    proj = torch::mm(logits, r.to(logits.options()));
  } else {
    k = vocab;
  }
  torch::Tensor pos = positions.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  std::vector<int64_t> keep, slot;  // rows of proj kept, and their row in [n·P, k]
  int64_t sample = -1, rank = 0;
  for (int64_t i = 0; i < pos.numel(); ++i) {
    const int64_t s = p[i] / seq;
    rank = s == sample ? rank + 1 : 0;
    sample = s;
    if (rank < P && s < n) {
      keep.push_back(i);
      slot.push_back(s * P + rank);
    }
  }
  auto index = [&](const std::vector<int64_t>& v) {
    return torch::tensor(v, torch::kLong).to(logits.device());
  };
  torch::Tensor out = torch::zeros({n * P, k}, proj.options());
  if (!keep.empty()) out = out.index_add(0, index(slot), proj.index_select(0, index(keep)));
  return out.reshape({n, P * k});
}

// How many of n training examples (tokens or images) data.train_fraction keeps: ⌈fraction · n⌉.
int64_t TrainPrefix(double fraction, int64_t n) {
  return std::min(n, static_cast<int64_t>(std::ceil(fraction * static_cast<double>(n))));
}

}  // namespace

BertConfig MakeBertConfig(const config::TrainConfig& c, int64_t vocab_size) {
  BertConfig b;
  b.vocab_size = vocab_size;
  b.max_seq_len = c.model.max_seq_len;
  b.layers = c.model.layers;
  b.d_model = c.model.d_model;
  b.heads = c.model.heads;
  b.d_ff = c.model.d_ff;
  b.ffn_groups = c.model.ffn_groups;
  b.dropout = c.model.dropout;
  b.pre_ln = c.model.pre_ln;
  b.detach_masked = c.policy.backward == "detach";
  if (c.model.kind == "switch") {
    b.experts = c.model.experts;
    b.moe_every = c.model.moe_every;
    b.capacity_factor = c.model.capacity_factor;
    b.aux_loss_weight = c.model.aux_loss_weight;
  }
  return b;
}

VggConfig MakeVggConfig(const config::TrainConfig& c, int64_t channels, int64_t image_size) {
  VggConfig v;
  v.arch = c.model.arch;
  v.width = c.model.width;
  v.in_channels = channels;
  v.image_size = image_size;
  v.num_classes = 10;
  v.filter_groups = c.model.filter_groups;
  v.classifier_hidden = c.model.classifier_hidden;
  return v;
}

Trainer::Trainer(const config::TrainConfig& config, TrainerOptions options)
    : config_(config), options_(std::move(options)) {}

Trainer::~Trainer() = default;

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const config::TrainConfig& config,
                                                         TrainerOptions options) {
  MAT_RETURN_IF_ERROR(config::ValidateTrainConfig(config));
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError("rank " + std::to_string(options.rank) +
                                      " is not in [0, world_size " +
                                      std::to_string(options.world_size) + ")");
  }
  if (config.train.batch_size % options.world_size != 0) {
    return absl::InvalidArgumentError("train.batch_size " + std::to_string(config.train.batch_size) +
                                      " is not a multiple of the " +
                                      std::to_string(options.world_size) + " ranks");
  }
  std::unique_ptr<Trainer> t(new Trainer(config, std::move(options)));
  MAT_RETURN_IF_ERROR(t->Init());
  return t;
}

absl::Status Trainer::Init() {
  const auto& c = config_;
  torch::set_num_threads(c.train.threads > 0 ? int(c.train.threads)
                                             : int(std::max(1u, std::thread::hardware_concurrency())));
  torch::manual_seed(c.seed);
  // Process-wide switches, set either way so that one run's choice does not leak into the next
  // in the same process. cuBLAS reads its workspace setting when its handle is made, so before
  // any CUDA work. An operator without a deterministic kernel warns once (TORCH_WARN) and runs.
  if (c.train.deterministic) ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  at::globalContext().setDeterministicAlgorithms(c.train.deterministic, /*warn_only=*/true);
  at::globalContext().setDeterministicCuDNN(c.train.deterministic);
  if (c.train.device != "cpu") {
    if (!torch::cuda::is_available()) {
      return absl::FailedPreconditionError("train.device: " + c.train.device +
                                           " requested but no CUDA device is available");
    }
    try {
      device_ = torch::Device(c.train.device);
    } catch (const c10::Error& e) {
      return absl::InvalidArgumentError("train.device: " + std::string(e.what_without_backtrace()));
    }
  }
  MAT_ASSIGN_OR_RETURN(precision_, ParsePrecision(c.train.precision));
  MAT_RETURN_IF_ERROR(c.model.kind == "vgg" ? InitImages() : InitText());
  if (!c.model.init_from.empty()) {
    // Before the optimizer sees the parameters; a resumed run then overwrites them from its
    // checkpoint. Every rank reads the same file, so the ranks start equal.
    if (absl::Status s = LoadModelSafetensors(network(), c.model.init_from); !s.ok()) {
      return absl::Status(s.code(), "model.init_from: " + std::string(s.message()));
    }
    spdlog::info("model initialised from {}", c.model.init_from);
  }
  // Every rank initialises the same model (same seed); dropout and augmentation then differ
  // per rank. Rank 0 keeps mat-train's random stream exactly.
  if (options_.rank > 0) torch::manual_seed(c.seed + 7919ULL * uint64_t(options_.rank));

  if (c.train.optimizer == "sgd") {
    SgdOptions so;
    so.momentum = c.train.momentum;
    so.nesterov = c.train.nesterov;
    so.weight_decay = c.train.weight_decay;
    sgd_ = std::make_unique<MaskedSgd>(ParamEntries(), so);
  } else {
    AdamWOptions ao;
    ao.beta1 = c.train.beta1;
    ao.beta2 = c.train.beta2;
    ao.eps = c.train.eps;
    ao.weight_decay = c.train.weight_decay;
    optimizer_ = std::make_unique<MaskedAdamW>(ParamEntries(), ao);
  }

  std::vector<policy::ModuleInfo> infos;
  for (const auto& m : partition_.modules) infos.push_back({m.group, m.layer, m.index, m.name});
  MAT_ASSIGN_OR_RETURN(policy_, policy::Policy::Create(config::ToPolicyConfig(c), std::move(infos)));
  if (!c.policy.rand_schedule.empty()) {
    MAT_ASSIGN_OR_RETURN(auto schedule, config::LoadActiveCountSchedule(c.policy.rand_schedule));
    MAT_RETURN_IF_ERROR(policy_->SetRandSchedule(std::move(schedule)));
  }
  spectral::EstimatorOptions eo;
  eo.lanczos_iterations = static_cast<int>(c.policy.lanczos_iterations);
  eo.projections = static_cast<int>(c.policy.probe_projections);
  eo.positions = static_cast<int>(c.policy.probe_positions);
  eo.seed = c.seed + 0x6c616e637a6f73ULL;
  MAT_ASSIGN_OR_RETURN(estimator_, spectral::MakeEstimator(c.policy.estimator, eo));
  if (!options_.out_dir.empty()) MAT_RETURN_IF_ERROR(common::MakeDirs(options_.out_dir));
  return absl::OkStatus();
}

absl::Status Trainer::InitText() {
  const auto& c = config_;
  MAT_ASSIGN_OR_RETURN(corpus_, LoadCorpus(c.data.dir));
  if (c.data.vocab_size > 0) CapVocabulary(corpus_, c.data.vocab_size);
  const int64_t real = corpus_.vocab.size();
  // The context-free baselines (bench/repro's regime check): fitted on the whole training
  // split, and on the prefix this run trains on.
  unigram_test_loss_ = UnigramCrossEntropy(corpus_.train, corpus_.test, real);
  mlm_.seq_len = c.data.seq_len;
  mlm_.mask_prob = c.data.mask_prob;
  mlm_.mask_id = real;  // [MASK] is the last id
  mlm_.num_real_tokens = real;

  train_size_ = TrainPrefix(c.data.train_fraction, static_cast<int64_t>(corpus_.train.size()));
  corpus_.train.resize(static_cast<size_t>(train_size_));
  unigram_test_loss_prefix_ = UnigramCrossEntropy(corpus_.train, corpus_.test, real);

  model_ = BertMlm(MakeBertConfig(c, real + 1));
  model_->to(device_);
  model_->train();
  partition_ = model_->Partition();
  train_stream_ = std::make_unique<MlmStream>(corpus_.train, mlm_, options_.rank,
                                              options_.world_size, c.seed);
  if (train_stream_->num_blocks() == 0) {
    return absl::InvalidArgumentError(
        c.data.train_fraction < 1
            ? "data.train_fraction " + std::to_string(c.data.train_fraction) + " leaves " +
                  std::to_string(train_size_) + " training tokens, fewer than data.seq_len"
            : std::string("data.dir: train split has fewer than data.seq_len tokens"));
  }
  valid_batches_ = MakeEvalBatches(corpus_.valid, mlm_, c.train.batch_size, c.train.eval_batches, 1234);
  test_batches_ = MakeEvalBatches(corpus_.test, mlm_, c.train.batch_size, c.train.eval_batches, 4321);
  if (valid_batches_.empty() || test_batches_.empty()) {
    return absl::InvalidArgumentError("data.dir: valid or test split has fewer than data.seq_len tokens");
  }
  return absl::OkStatus();
}

absl::Status Trainer::InitImages() {
  const auto& c = config_;
  const bool fashion = c.data.kind == "fashion-mnist";
  absl::StatusOr<ImageDataset> train = fashion ? LoadFashionMnist(c.data.dir, ImageSplit::kTrain)
                                               : LoadCifar10(c.data.dir, ImageSplit::kTrain);
  if (!train.ok()) return absl::Status(train.status().code(), "data.dir: " + std::string(train.status().message()));
  absl::StatusOr<ImageDataset> test = fashion ? LoadFashionMnist(c.data.dir, ImageSplit::kTest)
                                              : LoadCifar10(c.data.dir, ImageSplit::kTest);
  if (!test.ok()) return absl::Status(test.status().code(), "data.dir: " + std::string(test.status().message()));
  const int64_t n = train->size();
  if (c.data.valid_size >= n) {
    return absl::InvalidArgumentError("data.valid_size " + std::to_string(c.data.valid_size) +
                                      " leaves no training images (the training files hold " +
                                      std::to_string(n) + ")");
  }
  train_size_ = TrainPrefix(c.data.train_fraction, n - c.data.valid_size);
  train_images_ = SliceImages(*train, 0, train_size_);
  valid_images_ = SliceImages(*train, n - c.data.valid_size, n);
  test_images_ = std::move(*test);
  if (test_images_.channels() != train_images_.channels() ||
      test_images_.height() != train_images_.height()) {
    return absl::InvalidArgumentError("data.dir: the test images' shape differs from the training images'");
  }
  VggConfig vc = MakeVggConfig(c, train_images_.channels(), train_images_.height());
  if (absl::Status s = ValidateVggConfig(vc); !s.ok()) {
    return absl::InvalidArgumentError("model: " + std::string(s.message()));
  }
  vgg_ = Vgg(vc);
  vgg_->to(device_);
  vgg_->train();
  partition_ = vgg_->Partition();
  ImageStreamOptions so;
  so.augment = c.data.augment;
  image_stream_ = std::make_unique<ImageStream>(train_images_, so, options_.rank,
                                                options_.world_size, c.seed);
  if (image_stream_->num_examples() == 0) {
    return absl::InvalidArgumentError("data.dir: no training images for rank " +
                                      std::to_string(options_.rank));
  }
  valid_image_batches_ = MakeImageEvalBatches(valid_images_, c.train.batch_size, c.train.eval_batches);
  test_image_batches_ = MakeImageEvalBatches(test_images_, c.train.batch_size, c.train.eval_batches);
  if (test_image_batches_.empty()) return absl::InvalidArgumentError("data.dir: the test split is empty");
  return absl::OkStatus();
}

torch::nn::Module& Trainer::network() {
  if (is_vgg()) return *vgg_;
  return *model_;
}

std::vector<ParamEntry> Trainer::ParamEntries() { return BuildParamEntries(network(), partition_); }

absl::Status Trainer::SyncBuffers() {
  if (options_.hooks == nullptr || options_.world_size < 2) return absl::OkStatus();
  std::vector<torch::Tensor> buffers;
  for (const auto& kv : network().named_buffers()) buffers.push_back(kv.value());
  if (buffers.empty()) return absl::OkStatus();
  return options_.hooks->AverageBuffers(buffers);
}

absl::StatusOr<double> Trainer::FinishStep(double loss_value, const std::vector<uint8_t>& active,
                                          const std::vector<double>& lr_scale, double lr) {
  if (!std::isfinite(loss_value)) {
    return absl::InternalError("training loss is not finite at step " + std::to_string(step_));
  }
  if (options_.hooks != nullptr) MAT_RETURN_IF_ERROR(options_.hooks->ReduceGradients(active));
  MAT_RETURN_IF_ERROR(sgd_ != nullptr ? sgd_->Step(lr, active, lr_scale)
                                      : optimizer_->Step(lr, active, lr_scale));
  return loss_value;
}

double Trainer::LearningRate(int64_t step) const {
  const auto& t = config_.train;
  if (step < t.warmup_steps) return t.lr * double(step + 1) / double(t.warmup_steps);
  if (t.schedule == "constant") return t.lr;
  if (t.schedule == "step") {
    return t.lr * std::pow(t.decay_factor, double((step - t.warmup_steps) / t.decay_every));
  }
  double span = double(std::max<int64_t>(1, t.steps - t.warmup_steps));
  double p = std::min(1.0, double(step - t.warmup_steps) / span);
  double lo = t.lr * t.min_lr_ratio;
  if (t.schedule == "cosine") return lo + (t.lr - lo) * 0.5 * (1 + std::cos(M_PI * p));
  return t.lr + (lo - t.lr) * p;
}

absl::StatusOr<double> Trainer::TrainStep(const MlmBatch& batch, const std::vector<uint8_t>& active,
                                          const std::vector<double>& lr_scale, double lr) {
  if (is_vgg()) return absl::FailedPreconditionError("TrainStep(MlmBatch) on a vgg model");
  double loss_value = 0, aux_value = 0;
  try {
    model_->SetMask(active);
    torch::Tensor loss;
    {
      AutocastGuard autocast(device_, precision_);  // bf16: forward and loss; backward outside
      torch::Tensor logits =
          model_->forward(batch.input_ids.to(device_), batch.positions.to(device_));
      loss = torch::nn::functional::cross_entropy(logits, batch.labels.to(device_));
    }
    // switch: the load-balancing loss joins the gradient; the returned loss stays masked-LM.
    torch::Tensor aux = model_->aux_loss();
    (aux.defined() ? loss + aux.to(loss.scalar_type()) : loss).backward();
    loss_value = loss.item<double>();
    if (aux.defined()) aux_value = aux.item<double>();
  } catch (const c10::Error& e) {
    return absl::InternalError(std::string("training step failed: ") + e.what_without_backtrace());
  }
  if (!std::isfinite(aux_value)) loss_value = aux_value;  // reported as a non-finite loss
  return FinishStep(loss_value, active, lr_scale, lr);
}

absl::StatusOr<double> Trainer::TrainStep(const ImageBatch& batch, const std::vector<uint8_t>& active,
                                          const std::vector<double>& lr_scale, double lr) {
  if (!is_vgg()) return absl::FailedPreconditionError("TrainStep(ImageBatch) on a masked LM");
  double loss_value = 0;
  try {
    vgg_->SetMask(active);
    torch::Tensor loss;
    {
      AutocastGuard autocast(device_, precision_);
      torch::Tensor logits = vgg_->forward(batch.images.to(device_));
      loss = torch::nn::functional::cross_entropy(logits.to(torch::kFloat32),
                                                  batch.labels.to(device_));
    }
    loss.backward();
    loss_value = loss.item<double>();
  } catch (const c10::Error& e) {
    return absl::InternalError(std::string("training step failed: ") + e.what_without_backtrace());
  }
  return FinishStep(loss_value, active, lr_scale, lr);
}

absl::StatusOr<spectral::EstimateResult> Trainer::RunEstimator(spectral::Estimator* estimator,
                                                               spectral::ProbeBatch probe) {
  absl::StatusOr<spectral::EstimateResult> est = [&]() -> absl::StatusOr<spectral::EstimateResult> {
    try {
      return estimator->Estimate(partition_, std::move(probe));
    } catch (const c10::Error& e) {
      return absl::InternalError(std::string("spectral estimate failed: ") + e.what_without_backtrace());
    }
  }();
  for (auto& p : network().parameters()) p.mutable_grad().reset();
  return est;
}

absl::StatusOr<ProbeResult> Trainer::Probe(const MlmBatch& batch, spectral::Estimator* estimator) {
  if (is_vgg()) return absl::FailedPreconditionError("Probe(MlmBatch) on a vgg model");
  if (estimator == nullptr) estimator = estimator_.get();
  const int64_t n = config_.policy.probe_samples, T = config_.data.seq_len;
  auto t0 = Clock::now();
  spectral::SiteRecorder recorder;
  spectral::ProbeBatch probe;
  std::vector<int64_t> probe_routed;  // switch: the probe forward's tokens per expert
  torch::Tensor keep = batch.positions < n * T;
  torch::Tensor positions = batch.positions.masked_select(keep).to(device_);
  torch::Tensor labels = batch.labels.masked_select(keep).to(device_);
  try {
    model_->eval();
    model_->SetMask(std::vector<uint8_t>(partition_.size(), 1));
    model_->SetRecorder(&recorder);
    torch::Tensor logits = model_->forward(batch.input_ids.slice(0, 0, n).to(device_), positions);
    probe_routed = model_->RoutedTokens();
    model_->SetRecorder(nullptr);
    model_->train();
    probe.losses = PerSampleLoss(logits, labels, positions, T, n);
    probe.sites = recorder.Take();
    if (estimator->NeedsOutputs()) {
      probe.outputs = ProjectOutputs(logits, positions, T, n, estimator->OutputPositions(),
                                     estimator->OutputProjections(), config_.seed);
    }
  } catch (const c10::Error& e) {
    model_->SetRecorder(nullptr);
    model_->train();
    return absl::InternalError(std::string("probe forward failed: ") + e.what_without_backtrace());
  }
  absl::StatusOr<spectral::EstimateResult> est = RunEstimator(estimator, std::move(probe));
  if (!est.ok()) return est.status();
  ProbeResult r;
  r.modules = std::move(est->modules);
  const int64_t m = positions.size(0);
  const BertConfig& bc = model_->config();
  r.flops = BertForwardFlops(bc, n, T, m, probe_routed).forward +
            double(est->backward_passes) * BertStepFlops(bc, n, T, m, {}, probe_routed).activation_grad +
            est->flops;
  r.seconds = Since(t0);
  return r;
}

absl::StatusOr<ProbeResult> Trainer::Probe(const ImageBatch& batch, spectral::Estimator* estimator) {
  if (!is_vgg()) return absl::FailedPreconditionError("Probe(ImageBatch) on a masked LM");
  if (estimator == nullptr) estimator = estimator_.get();
  const int64_t n = config_.policy.probe_samples;
  if (batch.labels.size(0) < n) {
    return absl::InvalidArgumentError("probe batch has " + std::to_string(batch.labels.size(0)) +
                                      " images, policy.probe_samples is " + std::to_string(n));
  }
  auto t0 = Clock::now();
  spectral::SiteRecorder recorder;
  spectral::ProbeBatch probe;
  try {
    // Eval mode: BatchNorm normalises with its running statistics, so ℓ_i depends on image i
    // only (in training mode every image's loss depends on the whole batch's statistics).
    vgg_->eval();
    vgg_->SetMask(std::vector<uint8_t>(partition_.size(), 1));
    vgg_->SetRecorder(&recorder);
    torch::Tensor logits = vgg_->forward(batch.images.slice(0, 0, n).to(device_));
    vgg_->SetRecorder(nullptr);
    vgg_->train();
    probe.losses = torch::nn::functional::cross_entropy(
        logits, batch.labels.slice(0, 0, n).to(device_),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    recorder.TakeInto(&probe);
    if (estimator->NeedsOutputs()) {
      torch::Tensor rows = torch::arange(n, torch::TensorOptions().dtype(torch::kLong).device(device_));
      probe.outputs = ProjectOutputs(logits, rows, 1, n, estimator->OutputPositions(),
                                     estimator->OutputProjections(), config_.seed);
    }
  } catch (const c10::Error& e) {
    vgg_->SetRecorder(nullptr);
    vgg_->train();
    return absl::InternalError(std::string("probe forward failed: ") + e.what_without_backtrace());
  }
  absl::StatusOr<spectral::EstimateResult> est = RunEstimator(estimator, std::move(probe));
  if (!est.ok()) return est.status();
  ProbeResult r;
  r.modules = std::move(est->modules);
  const VggConfig& vc = vgg_->config();
  r.flops = VggForwardFlops(vc, n).forward +
            double(est->backward_passes) * VggStepFlops(vc, n, {}).activation_grad + est->flops;
  r.seconds = Since(t0);
  return r;
}

EvalResult Trainer::Evaluate(const std::vector<ImageBatch>& batches) {
  EvalResult r;
  if (!is_vgg()) return r;
  torch::NoGradGuard guard;
  vgg_->eval();
  vgg_->SetMask(std::vector<uint8_t>(partition_.size(), 1));
  double sum = 0;
  int64_t count = 0, correct = 0;
  for (const ImageBatch& b : batches) {
    torch::Tensor logits = vgg_->forward(b.images.to(device_)).to(torch::kFloat32);
    torch::Tensor labels = b.labels.to(device_);
    sum += torch::nn::functional::cross_entropy(
               logits, labels,
               torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
               .item<double>();
    correct += CountTop1Correct(logits, labels);
    count += b.labels.size(0);
  }
  vgg_->train();
  r.loss = sum / double(std::max<int64_t>(count, 1));
  r.accuracy = double(correct) / double(std::max<int64_t>(count, 1));
  return r;
}

double Trainer::Evaluate(const std::vector<MlmBatch>& batches) {
  if (is_vgg()) return 0;
  torch::NoGradGuard guard;
  model_->eval();
  model_->SetMask(std::vector<uint8_t>(partition_.size(), 1));
  double sum = 0;
  int64_t count = 0;
  for (const MlmBatch& b : batches) {
    torch::Tensor logits = model_->forward(b.input_ids.to(device_), b.positions.to(device_));
    torch::Tensor ce = torch::nn::functional::cross_entropy(
        logits, b.labels.to(device_),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    sum += ce.item<double>();
    count += b.labels.size(0);
  }
  model_->train();
  return sum / double(std::max<int64_t>(count, 1));
}

absl::Status Trainer::AppendLine(const std::string& file, const nlohmann::json& line) {
  if (options_.out_dir.empty()) return absl::OkStatus();
  std::ofstream out(options_.out_dir + "/" + file, std::ios::app);
  out << line.dump() << "\n";
  if (!out) return absl::InternalError("cannot append to " + options_.out_dir + "/" + file);
  return absl::OkStatus();
}

absl::Status Trainer::TruncateLog(const std::string& file, int64_t max_step) {
  const std::string path = options_.out_dir + "/" + file;
  auto text = common::ReadFile(path);
  if (!text.ok()) return absl::OkStatus();  // nothing logged yet
  std::istringstream in(*text);
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step")) continue;  // a torn last line
    if (j["step"].get<int64_t>() <= max_step) kept += line + "\n";
  }
  return common::WriteFileAtomic(path, kept);
}

void Trainer::ShowProgress(double loss, int active, double elapsed) {
  const int64_t total = config_.train.steps;
  const int width = 30;
  int filled = int(width * double(step_) / double(total));
  double rate = elapsed > 0 ? double(step_) / elapsed : 0;
  double eta = rate > 0 ? double(total - step_) / rate : 0;
  std::fprintf(stderr, "\r[%s%s] %lld/%lld %.2f step/s loss %.3f active %d/%d ETA %.0fs ",
               std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
               (long long)step_, (long long)total, rate, loss, active, partition_.size(), eta);
  std::fflush(stderr);
}

nlohmann::json Trainer::NominalStepFlops() const {
  const int64_t B = config_.train.batch_size / options_.world_size;
  const std::vector<uint8_t> off(partition_.size(), 0);
  FlopCounts full, none;
  if (is_vgg()) {
    full = VggStepFlops(vgg_->config(), B, {});
    none = VggStepFlops(vgg_->config(), B, off);
  } else {
    const int64_t T = config_.data.seq_len;
    const auto M = int64_t(std::llround(config_.data.mask_prob * double(B * T)));
    full = BertStepFlops(model_->config(), B, T, M, {});
    none = BertStepFlops(model_->config(), B, T, M, off);
  }
  return {{"full", full.total()}, {"full_without_decoder", full.total_without_decoder()},
          {"modules_off", none.total()},
          {"modules_off_without_decoder", none.total_without_decoder()}};
}

nlohmann::json Trainer::Summary(double wall_seconds) const {
  nlohmann::json s = {
      {"mode", config_.policy.kind},
      {"world_size", options_.world_size},
      {"seed", config_.seed},
      {"steps", step_},
      {"modules", partition_.size()},
      // What data.train_fraction left to train on: tokens (wikitext) or images.
      {"train_size", train_size_},
      {"train_size_unit", is_vgg() ? "images" : "tokens"},
      {"best_val_loss", best_val_loss_},
      {"best_step", best_step_},
      {"test_loss_at_best", test_loss_at_best_},
      // The table's test metric: top-1 accuracy for images (higher is better), else the test
      // loss (lower is better), both at the best validation step.
      {"test_metric_name", is_vgg() ? "accuracy" : "loss"},
      {"test_metric", is_vgg() ? test_accuracy_at_best_ : test_loss_at_best_},
      {"flops_total", flops_.total()},
      {"flops_total_without_decoder", flops_.total_without_decoder()},
      {"flops_by_phase", {{"forward", flops_.forward}, {"activation_grad", flops_.activation_grad},
                          {"weight_grad", flops_.weight_grad}, {"spectral", flops_.spectral}}},
      {"flops_to_best", flops_to_best_},
      {"flops_saved", flops_full_ - (flops_.total() - flops_.spectral)},
      // One nominal step (this rank's batch; wikitext: mask_prob of its tokens predicted,
      // experts evenly loaded) with every module active and with none: "modules_off" is the
      // floor masking can reach (BERT/Switch: activation gradients still run down to the
      // embeddings; VGG: they stop below the earliest active filter group).
      {"step_flops", NominalStepFlops()},
      {"mean_active_fraction", step_ > 0 ? active_sum_ / double(step_) : 1.0},
      {"spectral_seconds", spectral_seconds_},
      {"wall_seconds", wall_seconds},
      {"wall_seconds_to_best", seconds_to_best_},
      {"eval_seconds", eval_seconds_},
      {"device", config_.train.device},
      {"precision", PrecisionName(precision_)},
      // Achieved FLOP/s of training (steps and probes; each step ends with the loss read back,
      // so on CUDA the time includes the device's work, not only the launches).
      {"flops_per_second", wall_seconds > 0 ? flops_.total() / wall_seconds : 0.0},
  };
  {
    // Validation loss against FLOPs (matctl compare reads it at equal budgets): every
    // evaluation, or at most kMaxPoints of them evenly spaced, the last always kept.
    constexpr size_t kMaxPoints = 1000;
    const size_t n = eval_curve_.size();
    nlohmann::json steps = nlohmann::json::array(), flops = nlohmann::json::array(),
                   vals = nlohmann::json::array(), secs = nlohmann::json::array();
    const size_t stride = (n + kMaxPoints - 1) / kMaxPoints;
    for (size_t i = 0; i < n; ++i) {
      if (stride > 1 && i % stride != 0 && i + 1 != n) continue;
      steps.push_back(int64_t(eval_curve_[i][0]));
      flops.push_back(eval_curve_[i][1]);
      vals.push_back(eval_curve_[i][2]);
      secs.push_back(eval_curve_[i][3]);
    }
    s["eval_curve"] = {{"step", steps}, {"flops", flops}, {"val_loss", vals}, {"wall_seconds", secs}};
  }
  if (!is_vgg()) {
    // A unigram model's test loss (nats/token, add-one smoothing): fitted on all of the training
    // split, and on the part this run trains on (data.train_fraction).
    s["vocab_size"] = corpus_.vocab.size();
    s["unigram_test_loss"] = unigram_test_loss_;
    s["unigram_test_loss_train_prefix"] = unigram_test_loss_prefix_;
  }
  if (is_vgg()) {
    s["model"] = config_.model.arch;
    s["val_accuracy_at_best"] = val_accuracy_at_best_;
    s["test_accuracy_at_best"] = test_accuracy_at_best_;
  }
  return s;
}

std::string Trainer::ParamChecksum() {
  common::Fnv1a64 hash;
  std::vector<torch::Tensor> tensors;
  for (const auto& kv : network().named_parameters()) tensors.push_back(kv.value());
  for (const auto& kv : network().named_buffers()) tensors.push_back(kv.value());  // BN statistics
  for (const torch::Tensor& tensor : tensors) {
    const torch::Tensor t = tensor.detach().contiguous().cpu();
    hash.Add(t.data_ptr(), size_t(t.nbytes()));
  }
  return hash.Hex();
}

absl::Status Trainer::SaveCheckpoint(const std::string& path) {
  Checkpoint ckpt;
  for (const auto& kv : network().named_parameters()) ckpt.tensors["model." + kv.key()] = kv.value().detach();
  // Buffers (VGG's BatchNorm running statistics; BERT has none).
  for (const auto& kv : network().named_buffers()) ckpt.tensors["buffer." + kv.key()] = kv.value().detach();
  if (sgd_ != nullptr) {
    sgd_->Save(&ckpt.tensors);
  } else {
    optimizer_->Save(&ckpt.tensors);
  }
  nlohmann::json meta = {
      {"step", step_},
      {"policy", policy_->SaveState()},
      {"data", is_vgg() ? image_stream_->SaveState() : train_stream_->SaveState()},
      {"flops", {flops_.forward, flops_.activation_grad, flops_.weight_grad, flops_.spectral, flops_.decoder}},
      {"flops_full", flops_full_},
      {"train_seconds", train_seconds_},
      {"spectral_seconds", spectral_seconds_},
      {"eval_seconds", eval_seconds_},
      {"best", {best_val_loss_, double(best_step_), test_loss_at_best_, flops_to_best_, seconds_to_best_}},
      {"best_accuracy", {val_accuracy_at_best_, test_accuracy_at_best_}},
      {"loss_acc", {loss_sum_, double(loss_count_)}},
      {"aux_acc", {aux_sum_, double(aux_count_)}},
      {"active_sum", active_sum_},
      {"eval_curve", eval_curve_},
      {"schedule", {{"has", has_schedule_}, {"every_step", schedule_.every_step},
                    {"slow", schedule_.slow}, {"slow_every", schedule_.slow_every}}},
  };
  ckpt.meta = meta.dump();
  ckpt.tensors["rng.torch"] = at::detail::getDefaultCPUGenerator().get_state();
  return WriteCheckpoint(path, ckpt);
}

absl::Status Trainer::LoadCheckpoint(const std::string& path) {
  Checkpoint ckpt;
  std::string warning;
  MAT_ASSIGN_OR_RETURN(std::string used, LoadNewestCheckpoint(path, &ckpt, &warning));
  if (!warning.empty()) spdlog::warn("{}; resuming from {}", warning, used);
  auto tensor = [&](const std::string& name) -> absl::StatusOr<torch::Tensor> {
    const auto it = ckpt.tensors.find(name);
    if (it == ckpt.tensors.end()) {
      return absl::DataLossError("checkpoint " + used + " lacks tensor " + name);
    }
    return it->second;
  };
  try {
    torch::NoGradGuard guard;
    for (auto& kv : network().named_parameters()) {
      MAT_ASSIGN_OR_RETURN(const torch::Tensor t, tensor("model." + kv.key()));
      if (!t.sizes().equals(kv.value().sizes())) {
        return absl::InvalidArgumentError("checkpoint " + used + ": parameter " + kv.key() +
                                          " has the wrong shape (different model config?)");
      }
      kv.value().copy_(t);
    }
    for (auto& kv : network().named_buffers()) {
      MAT_ASSIGN_OR_RETURN(const torch::Tensor t, tensor("buffer." + kv.key()));
      if (!t.sizes().equals(kv.value().sizes())) {
        return absl::InvalidArgumentError("checkpoint " + used + ": buffer " + kv.key() +
                                          " has the wrong shape (different model config?)");
      }
      kv.value().copy_(t);
    }
    MAT_RETURN_IF_ERROR(sgd_ != nullptr ? sgd_->Load(ckpt.tensors) : optimizer_->Load(ckpt.tensors));
    nlohmann::json meta = nlohmann::json::parse(ckpt.meta);
    step_ = meta["step"];
    MAT_RETURN_IF_ERROR(policy_->LoadState(meta["policy"].get<std::string>()));
    MAT_RETURN_IF_ERROR(is_vgg() ? image_stream_->LoadState(meta["data"].get<std::string>())
                                 : train_stream_->LoadState(meta["data"].get<std::string>()));
    auto f = meta["flops"];
    flops_.forward = f[0];
    flops_.activation_grad = f[1];
    flops_.weight_grad = f[2];
    flops_.spectral = f[3];
    flops_.decoder = f[4];
    flops_full_ = meta["flops_full"];
    train_seconds_ = meta["train_seconds"];
    spectral_seconds_ = meta["spectral_seconds"];
    eval_seconds_ = meta["eval_seconds"];
    auto b = meta["best"];
    best_val_loss_ = b[0];
    best_step_ = int64_t(b[1].get<double>());
    test_loss_at_best_ = b[2];
    flops_to_best_ = b[3];
    seconds_to_best_ = b[4];
    if (meta.contains("best_accuracy")) {
      val_accuracy_at_best_ = meta["best_accuracy"][0];
      test_accuracy_at_best_ = meta["best_accuracy"][1];
    }
    loss_sum_ = meta["loss_acc"][0];
    loss_count_ = int64_t(meta["loss_acc"][1].get<double>());
    if (meta.contains("aux_acc")) {  // switch; absent in checkpoints written before it was saved
      aux_sum_ = meta["aux_acc"][0];
      aux_count_ = int64_t(meta["aux_acc"][1].get<double>());
    }
    active_sum_ = meta["active_sum"];
    eval_curve_.clear();
    if (meta.contains("eval_curve")) {  // absent in checkpoints written before it was saved
      eval_curve_ = meta["eval_curve"].get<std::vector<std::array<double, 4>>>();
    }
    if (meta.contains("schedule")) {
      const auto& sch = meta["schedule"];
      has_schedule_ = sch["has"];
      schedule_.every_step = sch["every_step"].get<std::vector<uint8_t>>();
      schedule_.slow = sch["slow"].get<std::vector<uint8_t>>();
      schedule_.slow_every = sch["slow_every"];
    }
    MAT_ASSIGN_OR_RETURN(const torch::Tensor rng, tensor("rng.torch"));
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(rng);
  } catch (const c10::Error& e) {
    return absl::DataLossError("checkpoint " + used + " is incomplete: " + e.what_without_backtrace());
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError("checkpoint " + used + " has malformed metadata: " + e.what());
  }
  return absl::OkStatus();
}

}  // namespace mat::trainer
