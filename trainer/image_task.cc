// ImageTask (image_task.h): VGG on Fashion-MNIST or CIFAR-10.
#include "trainer/image_task.h"

#include <algorithm>
#include <utility>

#include "common/status.h"

namespace mat::trainer {
namespace {

struct ImageTaskBatch : TaskBatch {
  ImageBatch batch;
};

const ImageBatch& Images(const TaskBatch& batch) {
  return static_cast<const ImageTaskBatch&>(batch).batch;
}

}  // namespace

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

absl::StatusOr<std::unique_ptr<ImageTask>> ImageTask::Create(const TaskContext& context) {
  std::unique_ptr<ImageTask> task(new ImageTask(context));
  MAT_RETURN_IF_ERROR(task->Init());
  return task;
}

absl::Status ImageTask::Init() {
  const config::TrainConfig& c = context_.config;
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
  vgg_->to(context_.device);
  vgg_->train();
  partition_ = vgg_->Partition();
  ImageStreamOptions so;
  so.augment = c.data.augment;
  stream_ = std::make_unique<ImageStream>(train_images_, so, context_.rank, context_.world_size,
                                          c.seed);
  if (stream_->num_examples() == 0) {
    return absl::InvalidArgumentError("data.dir: no training images for rank " +
                                      std::to_string(context_.rank));
  }
  valid_batches_ = MakeImageEvalBatches(valid_images_, c.train.batch_size, c.train.eval_batches);
  test_batches_ = MakeImageEvalBatches(test_images_, c.train.batch_size, c.train.eval_batches);
  if (test_batches_.empty()) return absl::InvalidArgumentError("data.dir: the test split is empty");
  return absl::OkStatus();
}

std::unique_ptr<TaskBatch> ImageTask::NextBatch(int64_t samples) {
  auto batch = std::make_unique<ImageTaskBatch>();
  batch->batch = stream_->Next(samples);
  return batch;
}

absl::StatusOr<double> ImageTask::ForwardBackward(const TaskBatch& batch,
                                                  const std::vector<uint8_t>& active) {
  return ForwardBackward(Images(batch), active);
}

absl::StatusOr<double> ImageTask::ForwardBackward(const ImageBatch& batch,
                                                  const std::vector<uint8_t>& active) {
  const torch::Device& device = context_.device;
  double loss_value = 0;
  try {
    vgg_->SetMask(active);
    torch::Tensor loss;
    {
      AutocastGuard autocast(device, context_.precision);
      torch::Tensor logits = vgg_->forward(batch.images.to(device));
      loss = torch::nn::functional::cross_entropy(logits.to(torch::kFloat32),
                                                  batch.labels.to(device));
    }
    loss.backward();
    loss_value = loss.item<double>();
  } catch (const c10::Error& e) {
    return absl::InternalError(std::string("training step failed: ") + e.what_without_backtrace());
  }
  return loss_value;
}

FlopCounts ImageTask::StepFlops(const TaskBatch& batch, const std::vector<uint8_t>& active,
                                double* full_total) {
  // A full step's FLOPs depend on the batch size only.
  const int64_t B = Images(batch).images.size(0);
  *full_total = VggStepFlops(vgg_->config(), B, {}).total();
  return VggStepFlops(vgg_->config(), B, active);
}

FlopCounts ImageTask::NominalStepFlops(int64_t samples, const std::vector<uint8_t>& active) const {
  return VggStepFlops(vgg_->config(), samples, active);
}

absl::StatusOr<RecordedProbe> ImageTask::RecordProbe(const TaskBatch& batch, int64_t n,
                                                     const spectral::Estimator& estimator) {
  return RecordProbe(Images(batch), n, estimator);
}

absl::StatusOr<RecordedProbe> ImageTask::RecordProbe(const ImageBatch& batch, int64_t n,
                                                     const spectral::Estimator& estimator) {
  const torch::Device& device = context_.device;
  if (batch.labels.size(0) < n) {
    return absl::InvalidArgumentError("probe batch has " + std::to_string(batch.labels.size(0)) +
                                      " images, policy.probe_samples is " + std::to_string(n));
  }
  spectral::SiteRecorder recorder;
  RecordedProbe out;
  try {
    // Eval mode: BatchNorm normalises with its running statistics, so ℓ_i depends on image i
    // only (in training mode every image's loss depends on the whole batch's statistics).
    vgg_->eval();
    vgg_->SetMask(std::vector<uint8_t>(partition_.size(), 1));
    vgg_->SetRecorder(&recorder);
    torch::Tensor logits = vgg_->forward(batch.images.slice(0, 0, n).to(device));
    vgg_->SetRecorder(nullptr);
    vgg_->train();
    out.probe.losses = torch::nn::functional::cross_entropy(
        logits, batch.labels.slice(0, 0, n).to(device),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    recorder.TakeInto(&out.probe);
    if (estimator.NeedsOutputs()) {
      torch::Tensor rows = torch::arange(n, torch::TensorOptions().dtype(torch::kLong).device(device));
      out.probe.outputs = ProjectOutputs(logits, rows, 1, n, estimator.OutputPositions(),
                                         estimator.OutputProjections(), context_.config.seed);
    }
  } catch (const c10::Error& e) {
    vgg_->SetRecorder(nullptr);
    vgg_->train();
    return absl::InternalError(std::string("probe forward failed: ") + e.what_without_backtrace());
  }
  const VggConfig& vc = vgg_->config();
  out.forward_flops = VggForwardFlops(vc, n).forward;
  out.backward_pass_flops = VggStepFlops(vc, n, {}).activation_grad;
  return out;
}

EvalResult ImageTask::Evaluate(EvalSplit split) {
  return Evaluate(split == EvalSplit::kValid ? valid_batches_ : test_batches_);
}

EvalResult ImageTask::Evaluate(const std::vector<ImageBatch>& batches) {
  const torch::Device& device = context_.device;
  EvalResult r;
  torch::NoGradGuard guard;
  vgg_->eval();
  vgg_->SetMask(std::vector<uint8_t>(partition_.size(), 1));
  double sum = 0;
  int64_t count = 0, correct = 0;
  for (const ImageBatch& b : batches) {
    torch::Tensor logits = vgg_->forward(b.images.to(device)).to(torch::kFloat32);
    torch::Tensor labels = b.labels.to(device);
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

void ImageTask::AddSummaryFields(nlohmann::json* summary) const {
  (*summary)["model"] = context_.config.model.arch;
}

void ImageTask::SaveState(nlohmann::json* meta) const { (*meta)["data"] = stream_->SaveState(); }

absl::Status ImageTask::LoadState(const nlohmann::json& meta) {
  return stream_->LoadState(meta.at("data").get<std::string>());
}

}  // namespace mat::trainer
