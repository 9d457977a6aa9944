// ImageTask: the image-classification task (model.kind vgg) behind Trainer::Run (task.h). It owns
// the images (Fashion-MNIST or CIFAR-10; validation = the training files' last data.valid_size
// images, training cut to data.train_fraction of the rest), the VGG model, this rank's image
// stream and the fixed validation and test batches. Losses are cross-entropy per image; the
// accuracy is top-1.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "trainer/data/image_data.h"
#include "trainer/models/vgg.h"
#include "trainer/task.h"

namespace mat::trainer {

// The model section as a VggConfig for images of `channels` x `image_size`².
VggConfig MakeVggConfig(const config::TrainConfig& config, int64_t channels, int64_t image_size);

class ImageTask : public Task {
 public:
  // Loads the images and builds the model and stream. Errors name data.dir, data.valid_size or
  // the model key at fault.
  static absl::StatusOr<std::unique_ptr<ImageTask>> Create(const TaskContext& context);

  torch::nn::Module& network() override { return *vgg_; }
  const spectral::ModulePartition& partition() const override { return partition_; }
  std::unique_ptr<TaskBatch> NextBatch(int64_t samples) override;
  absl::StatusOr<double> ForwardBackward(const TaskBatch& batch,
                                         const std::vector<uint8_t>& active) override;
  FlopCounts StepFlops(const TaskBatch& batch, const std::vector<uint8_t>& active,
                       double* full_total) override;
  FlopCounts NominalStepFlops(int64_t samples, const std::vector<uint8_t>& active) const override;
  // VGG probes with BatchNorm in eval mode (running statistics), so that sample i's loss depends
  // on sample i only.
  absl::StatusOr<RecordedProbe> RecordProbe(const TaskBatch& batch, int64_t n,
                                            const spectral::Estimator& estimator) override;
  EvalResult Evaluate(EvalSplit split) override;
  bool classifies() const override { return true; }
  void AddEvalFields(nlohmann::json* line) override { (void)line; }
  void AddSummaryFields(nlohmann::json* summary) const override;
  int64_t train_size() const override { return train_size_; }
  std::string train_size_unit() const override { return "images"; }
  void SaveState(nlohmann::json* meta) const override;
  absl::Status LoadState(const nlohmann::json& meta) override;
  // Checkpoints and model files of the per-group leaf layout (UpgradeVggLeafLayout).
  int UpgradeTensors(std::map<std::string, torch::Tensor>* tensors) const override {
    return UpgradeVggLeafLayout(vgg_->config(), tensors);
  }

  // The typed building blocks (Trainer's ImageBatch overloads, tests and benchmarks).
  absl::StatusOr<double> ForwardBackward(const ImageBatch& batch,
                                         const std::vector<uint8_t>& active);
  absl::StatusOr<RecordedProbe> RecordProbe(const ImageBatch& batch, int64_t n,
                                            const spectral::Estimator& estimator);
  // Mean cross-entropy per image and top-1 accuracy (no gradients, BatchNorm in eval mode).
  EvalResult Evaluate(const std::vector<ImageBatch>& batches);
  Vgg& vgg() { return vgg_; }
  ImageStream& stream() { return *stream_; }

 private:
  explicit ImageTask(const TaskContext& context) : context_(context) {}
  absl::Status Init();

  TaskContext context_;
  Vgg vgg_{nullptr};
  spectral::ModulePartition partition_;
  ImageDataset train_images_, valid_images_, test_images_;
  std::unique_ptr<ImageStream> stream_;
  std::vector<ImageBatch> valid_batches_, test_batches_;
  int64_t train_size_ = 0;  // training images after data.train_fraction
};

}  // namespace mat::trainer
