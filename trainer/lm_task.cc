// MaskedLmTask (lm_task.h): BERT and Switch masked-LM training on WikiText.
#include "trainer/lm_task.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "common/status.h"

namespace mat::trainer {
namespace {

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

struct MlmTaskBatch : TaskBatch {
  MlmBatch batch;
};

const MlmBatch& Mlm(const TaskBatch& batch) { return static_cast<const MlmTaskBatch&>(batch).batch; }

// Which of a batch's predicted positions show [MASK] in the input: [M] bool. The others (BERT's
// 10 % random and 10 % unchanged) show a token, the right one for the unchanged, which a model
// can learn to copy.
torch::Tensor MaskTokenPositions(const MlmBatch& b, int64_t mask_id) {
  return b.input_ids.reshape({-1}).index_select(0, b.positions) == mask_id;
}

// The labels of every batch, in order: the tokens an evaluation's loss averages over (only
// those at [MASK] inputs when `mask_id` >= 0).
std::vector<int32_t> EvalLabels(const std::vector<MlmBatch>& batches, int64_t mask_id = -1) {
  std::vector<int32_t> labels;
  for (const MlmBatch& b : batches) {
    torch::Tensor l = b.labels;
    if (mask_id >= 0) l = l.masked_select(MaskTokenPositions(b, mask_id));
    l = l.to(torch::kInt32).contiguous();
    labels.insert(labels.end(), l.data_ptr<int32_t>(), l.data_ptr<int32_t>() + l.numel());
  }
  return labels;
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

absl::StatusOr<std::unique_ptr<MaskedLmTask>> MaskedLmTask::Create(const TaskContext& context) {
  std::unique_ptr<MaskedLmTask> task(new MaskedLmTask(context));
  MAT_RETURN_IF_ERROR(task->Init());
  return task;
}

absl::Status MaskedLmTask::Init() {
  const config::TrainConfig& c = context_.config;
  MAT_ASSIGN_OR_RETURN(corpus_, LoadCorpus(c.data.dir));
  if (c.data.vocab_size > 0) CapVocabulary(corpus_, c.data.vocab_size);
  const int64_t real = corpus_.vocab.size();
  mlm_.seq_len = c.data.seq_len;
  mlm_.mask_prob = c.data.mask_prob;
  mlm_.mask_id = real;  // [MASK] is the last id
  mlm_.num_real_tokens = real;
  valid_batches_ = MakeEvalBatches(corpus_.valid, mlm_, c.train.batch_size, c.train.eval_batches, 1234);
  test_batches_ = MakeEvalBatches(corpus_.test, mlm_, c.train.batch_size, c.train.eval_batches, 4321);
  if (valid_batches_.empty() || test_batches_.empty()) {
    return absl::InvalidArgumentError("data.dir: valid or test split has fewer than data.seq_len tokens");
  }
  // The context-free baselines (bench/verdict's regime check), fitted on the whole training
  // split: on every test token, and on the tokens val_loss and test_loss are measured on (the
  // masked positions of the fixed evaluation batches), which a model's loss is paired with.
  const UnigramModel unigram(corpus_.train, real);
  unigram_test_loss_ = unigram.CrossEntropy(corpus_.test);
  unigram_eval_val_loss_ = unigram.CrossEntropy(EvalLabels(valid_batches_));
  unigram_eval_test_loss_ = unigram.CrossEntropy(EvalLabels(test_batches_));
  unigram_eval_val_loss_at_mask_ = unigram.CrossEntropy(EvalLabels(valid_batches_, mlm_.mask_id));
  unigram_eval_test_loss_at_mask_ = unigram.CrossEntropy(EvalLabels(test_batches_, mlm_.mask_id));

  const auto whole = static_cast<int64_t>(corpus_.train.size());
  train_size_ = TrainPrefix(c.data.train_fraction, whole);
  corpus_.train.resize(static_cast<size_t>(train_size_));
  unigram_test_loss_prefix_ = train_size_ == whole
                                  ? unigram_test_loss_  // the same fit
                                  : UnigramModel(corpus_.train, real).CrossEntropy(corpus_.test);

  model_ = BertMlm(MakeBertConfig(c, real + 1));
  model_->to(context_.device);
  model_->train();
  partition_ = model_->Partition();
  stream_ = std::make_unique<MlmStream>(corpus_.train, mlm_, context_.rank, context_.world_size,
                                        c.seed);
  if (stream_->num_blocks() == 0) {
    return absl::InvalidArgumentError(
        c.data.train_fraction < 1
            ? "data.train_fraction " + std::to_string(c.data.train_fraction) + " leaves " +
                  std::to_string(train_size_) + " training tokens, fewer than data.seq_len"
            : std::string("data.dir: train split has fewer than data.seq_len tokens"));
  }
  return absl::OkStatus();
}

std::unique_ptr<TaskBatch> MaskedLmTask::NextBatch(int64_t samples) {
  auto batch = std::make_unique<MlmTaskBatch>();
  batch->batch = stream_->Next(samples);
  return batch;
}

absl::StatusOr<double> MaskedLmTask::ForwardBackward(const TaskBatch& batch,
                                                     const std::vector<uint8_t>& active) {
  return ForwardBackward(Mlm(batch), active);
}

absl::StatusOr<double> MaskedLmTask::ForwardBackward(const MlmBatch& batch,
                                                     const std::vector<uint8_t>& active) {
  const torch::Device& device = context_.device;
  double loss_value = 0, aux_value = 0;
  try {
    model_->SetMask(active);
    torch::Tensor loss;
    {
      AutocastGuard autocast(device, context_.precision);  // bf16: forward and loss only
      torch::Tensor logits = model_->forward(batch.input_ids.to(device), batch.positions.to(device));
      loss = torch::nn::functional::cross_entropy(logits, batch.labels.to(device));
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
  return loss_value;
}

FlopCounts MaskedLmTask::StepFlops(const TaskBatch& batch, const std::vector<uint8_t>& active,
                                   double* full_total) {
  const BertConfig bc = model_->config();
  const int64_t B = Mlm(batch).input_ids.size(0);
  const int64_t T = context_.config.data.seq_len;
  const int64_t M = Mlm(batch).positions.size(0);
  const std::vector<int64_t> routed = model_->RoutedTokens();  // switch: tokens per expert
  *full_total = BertStepFlops(bc, B, T, M, {}, routed).total();
  if (torch::Tensor aux = model_->aux_loss(); aux.defined()) {
    aux_sum_ += aux.item<double>();
    ++aux_count_;
  }
  return BertStepFlops(bc, B, T, M, active, routed);
}

FlopCounts MaskedLmTask::NominalStepFlops(int64_t samples,
                                          const std::vector<uint8_t>& active) const {
  const int64_t T = context_.config.data.seq_len;
  const auto M = int64_t(std::llround(context_.config.data.mask_prob * double(samples * T)));
  return BertStepFlops(model_->config(), samples, T, M, active);
}

absl::StatusOr<RecordedProbe> MaskedLmTask::RecordProbe(const TaskBatch& batch, int64_t n,
                                                        const spectral::Estimator& estimator) {
  return RecordProbe(Mlm(batch), n, estimator);
}

absl::StatusOr<RecordedProbe> MaskedLmTask::RecordProbe(const MlmBatch& batch, int64_t n,
                                                        const spectral::Estimator& estimator) {
  const torch::Device& device = context_.device;
  if (batch.input_ids.size(0) < n) {
    return absl::InvalidArgumentError("probe batch has " + std::to_string(batch.input_ids.size(0)) +
                                      " sequences, policy.probe_samples is " + std::to_string(n));
  }
  const int64_t T = context_.config.data.seq_len;
  spectral::SiteRecorder recorder;
  RecordedProbe out;
  std::vector<int64_t> probe_routed;  // switch: the probe forward's tokens per expert
  torch::Tensor keep = batch.positions < n * T;
  torch::Tensor positions = batch.positions.masked_select(keep).to(device);
  torch::Tensor labels = batch.labels.masked_select(keep).to(device);
  try {
    model_->eval();
    model_->SetMask(std::vector<uint8_t>(partition_.size(), 1));
    model_->SetRecorder(&recorder);
    torch::Tensor logits = model_->forward(batch.input_ids.slice(0, 0, n).to(device), positions);
    probe_routed = model_->RoutedTokens();
    model_->SetRecorder(nullptr);
    model_->train();
    out.probe.losses = PerSampleLoss(logits, labels, positions, T, n);
    out.probe.sites = recorder.Take();
    if (estimator.NeedsOutputs()) {
      out.probe.outputs = ProjectOutputs(logits, positions, T, n, estimator.OutputPositions(),
                                         estimator.OutputProjections(), context_.config.seed);
    }
  } catch (const c10::Error& e) {
    model_->SetRecorder(nullptr);
    model_->train();
    return absl::InternalError(std::string("probe forward failed: ") + e.what_without_backtrace());
  }
  const int64_t m = positions.size(0);
  const BertConfig& bc = model_->config();
  const FlopCounts forward = BertForwardFlops(bc, n, T, m, probe_routed);
  out.forward_flops = forward.forward;
  out.forward_decoder_flops = forward.decoder;
  out.backward_pass_flops = BertStepFlops(bc, n, T, m, {}, probe_routed).activation_grad;
  out.backward_pass_decoder_flops = BertDecoderPassFlops(bc, m);  // the loss gradient's pass
  return out;
}

EvalResult MaskedLmTask::Evaluate(EvalSplit split) {
  return Evaluate(eval_batches(split));
}

EvalResult MaskedLmTask::Evaluate(const std::vector<MlmBatch>& batches) {
  const torch::Device& device = context_.device;
  torch::NoGradGuard guard;
  model_->eval();
  model_->SetMask(std::vector<uint8_t>(partition_.size(), 1));
  // Sums stay on the device (one host copy per evaluation, not per batch); each batch's sum is
  // added in float64.
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64).device(device);
  torch::Tensor sum = torch::zeros({}, f64), sum_mask = torch::zeros({}, f64);
  int64_t count = 0, count_mask = 0;
  for (const MlmBatch& b : batches) {
    torch::Tensor logits = model_->forward(b.input_ids.to(device), b.positions.to(device));
    torch::Tensor ce = torch::nn::functional::cross_entropy(
        logits, b.labels.to(device),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    sum += ce.sum().to(torch::kFloat64);
    count += b.labels.size(0);
    const torch::Tensor shown = MaskTokenPositions(b, mlm_.mask_id);  // host
    sum_mask += (ce * shown.to(device, ce.scalar_type())).sum().to(torch::kFloat64);
    count_mask += shown.sum().item<int64_t>();
  }
  model_->train();
  EvalResult out;
  out.loss = sum.item<double>() / double(std::max<int64_t>(count, 1));
  // No position showing [MASK] (a tiny split or mask_prob): no figure, not 0.
  out.loss_at_mask = count_mask > 0 ? sum_mask.item<double>() / double(count_mask)
                                    : std::numeric_limits<double>::quiet_NaN();
  return out;
}

void MaskedLmTask::AddEvalFields(nlohmann::json* line) {
  if (aux_count_ > 0) (*line)["train_aux_loss"] = aux_sum_ / double(aux_count_);
  aux_sum_ = 0;
  aux_count_ = 0;
}

void MaskedLmTask::AddSummaryFields(nlohmann::json* summary) const {
  // A unigram model's loss (nats/token, add-one smoothing), fitted on all of the training split
  // (on every test token; on the part this run trains on, data.train_fraction; on the tokens of
  // the evaluation batches, the same as val_loss and test_loss).
  (*summary)["vocab_size"] = corpus_.vocab.size();
  (*summary)["unigram_test_loss"] = unigram_test_loss_;
  (*summary)["unigram_test_loss_train_prefix"] = unigram_test_loss_prefix_;
  (*summary)["unigram_eval_val_loss"] = unigram_eval_val_loss_;
  (*summary)["unigram_eval_test_loss"] = unigram_eval_test_loss_;
  (*summary)["unigram_eval_val_loss_at_mask"] = unigram_eval_val_loss_at_mask_;
  (*summary)["unigram_eval_test_loss_at_mask"] = unigram_eval_test_loss_at_mask_;
}

void MaskedLmTask::SaveState(nlohmann::json* meta) const {
  (*meta)["data"] = stream_->SaveState();
  (*meta)["aux_acc"] = {aux_sum_, double(aux_count_)};
}

absl::Status MaskedLmTask::LoadState(const nlohmann::json& meta) {
  MAT_RETURN_IF_ERROR(stream_->LoadState(meta.at("data").get<std::string>()));
  if (meta.contains("aux_acc")) {  // switch; absent in checkpoints written before it was saved
    aux_sum_ = meta["aux_acc"].at(0);
    aux_count_ = int64_t(meta["aux_acc"].at(1).get<double>());
  }
  return absl::OkStatus();
}

}  // namespace mat::trainer
