// MaskedLmTask: the masked-language-model task (model.kind bert | switch) behind Trainer::Run
// (task.h). It owns the WikiText corpus (vocabulary capped at data.vocab_size, training split cut
// to data.train_fraction), the BERT or Switch model, this rank's MLM stream, the fixed validation
// and test batches, the unigram baselines, and the Switch load-balancing loss averaged between
// evaluations. Losses are nats per masked token.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "trainer/data/corpus.h"
#include "trainer/data/mlm_data.h"
#include "trainer/models/bert.h"
#include "trainer/task.h"

namespace mat::trainer {

// The model section as a BertConfig over a vocabulary of `vocab_size` ids (specials included).
BertConfig MakeBertConfig(const config::TrainConfig& config, int64_t vocab_size);

class MaskedLmTask : public Task {
 public:
  // Loads the corpus and builds the model and streams. INVALID_ARGUMENT / NOT_FOUND naming
  // data.dir, data.train_fraction or data.seq_len when the splits are too short.
  static absl::StatusOr<std::unique_ptr<MaskedLmTask>> Create(const TaskContext& context);

  torch::nn::Module& network() override { return *model_; }
  const spectral::ModulePartition& partition() const override { return partition_; }
  std::unique_ptr<TaskBatch> NextBatch(int64_t samples) override;
  absl::StatusOr<double> ForwardBackward(const TaskBatch& batch,
                                         const std::vector<uint8_t>& active) override;
  FlopCounts StepFlops(const TaskBatch& batch, const std::vector<uint8_t>& active,
                       double* full_total) override;
  FlopCounts NominalStepFlops(int64_t samples, const std::vector<uint8_t>& active) const override;
  absl::StatusOr<RecordedProbe> RecordProbe(const TaskBatch& batch, int64_t n,
                                            const spectral::Estimator& estimator) override;
  EvalResult Evaluate(EvalSplit split) override;
  bool classifies() const override { return false; }
  void AddEvalFields(nlohmann::json* line) override;
  void AddSummaryFields(nlohmann::json* summary) const override;
  int64_t train_size() const override { return train_size_; }
  std::string train_size_unit() const override { return "tokens"; }
  void SaveState(nlohmann::json* meta) const override;
  absl::Status LoadState(const nlohmann::json& meta) override;
  // Checkpoints and model files of the per-module leaf layout (UpgradeLeafLayout).
  int UpgradeTensors(std::map<std::string, torch::Tensor>* tensors) const override {
    return UpgradeLeafLayout(model_->config(), tensors);
  }

  // The typed building blocks (Trainer's MlmBatch overloads, tests and benchmarks).
  absl::StatusOr<double> ForwardBackward(const MlmBatch& batch,
                                         const std::vector<uint8_t>& active);
  absl::StatusOr<RecordedProbe> RecordProbe(const MlmBatch& batch, int64_t n,
                                            const spectral::Estimator& estimator);
  // Mean masked-LM loss over `batches` (no gradients, dropout off, every module active), and
  // the mean over the positions whose input is [MASK] only (EvalResult::loss_at_mask).
  EvalResult Evaluate(const std::vector<MlmBatch>& batches);
  // The fixed evaluation batches Evaluate(split) averages over.
  const std::vector<MlmBatch>& eval_batches(EvalSplit split) const {
    return split == EvalSplit::kValid ? valid_batches_ : test_batches_;
  }
  BertMlm& model() { return model_; }
  MlmStream& stream() { return *stream_; }

 private:
  explicit MaskedLmTask(const TaskContext& context) : context_(context) {}
  absl::Status Init();

  TaskContext context_;
  Corpus corpus_;
  MlmOptions mlm_;
  BertMlm model_{nullptr};
  spectral::ModulePartition partition_;
  std::unique_ptr<MlmStream> stream_;
  std::vector<MlmBatch> valid_batches_, test_batches_;
  double unigram_test_loss_ = 0, unigram_test_loss_prefix_ = 0;  // nats/token
  double unigram_eval_val_loss_ = 0, unigram_eval_test_loss_ = 0;  // on the evaluation batches
  double unigram_eval_val_loss_at_mask_ = 0;   // ... at the positions whose input is [MASK]
  double unigram_eval_test_loss_at_mask_ = 0;
  int64_t train_size_ = 0;  // training tokens after data.train_fraction
  double aux_sum_ = 0;      // switch: load-balancing loss since the last evaluation
  int64_t aux_count_ = 0;
};

}  // namespace mat::trainer
