// Image classification data: Fashion-MNIST IDX files and CIFAR-10 binary batches, held in memory,
// and a seeded, rank-sharded batch stream over them (DESIGN §6).
//
// Formats:
//   IDX (LeCun's MNIST layout, big-endian): images "idx3-ubyte" = magic 0x00000803, count N,
//     rows R, cols C, then N·R·C pixel bytes; labels "idx1-ubyte" = magic 0x00000801, count N,
//     then N label bytes. Files may be plain or gzip-compressed (detected by the gzip magic
//     1f 8b, not by the name).
//   CIFAR-10 binary: records of 1 label byte + 3072 pixel bytes (1024 red, 1024 green, 1024
//     blue, each 32x32 row-major); data_batch_1..5.bin (train), test_batch.bin (test).
// Errors name the file and what is wrong: NOT_FOUND for a missing file; DATA_LOSS for damaged
// data (truncated or corrupt gzip stream, fewer or more bytes than the header promises, a label
// outside [0, 10)); INVALID_ARGUMENT for a file of the wrong kind (bad magic number, image and
// label files that disagree on the count). Nothing is returned after an error.
//
// Whole datasets are loaded into memory (Fashion-MNIST train: 47 MB); only batches stream.
// Pixels stay uint8 (CIFAR-10 train: 150 MB; as float32 it would be 600 MB) and are normalised
// per batch: x = (pixel / 255 − mean[c]) / stddev[c], float32.
// Not thread-safe; datasets are immutable after loading and may be shared read-only.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mat::trainer {

struct ImageDataset {
  torch::Tensor images;         // [N, C, H, W] uint8, CPU, contiguous
  torch::Tensor labels;         // [N] int64, CPU, values in [0, num_classes)
  int64_t num_classes = 10;
  // Per-channel normalisation on the [0, 1] scale (size C). The generic loaders (LoadIdx,
  // LoadCifar10Batches) set mean 0, stddev 1 (x = pixel / 255); LoadFashionMnist and
  // LoadCifar10 set the published statistics of the respective training set.
  std::vector<double> mean, stddev;

  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
  int64_t channels() const { return images.size(1); }
  int64_t height() const { return images.size(2); }
  int64_t width() const { return images.size(3); }
};

enum class ImageSplit { kTrain, kTest };

// Training-set statistics (on the [0, 1] scale).
inline const std::vector<double> kFashionMnistMean = {0.2860};
inline const std::vector<double> kFashionMnistStd = {0.3530};
inline const std::vector<double> kCifar10Mean = {0.4914, 0.4822, 0.4465};
inline const std::vector<double> kCifar10Std = {0.2470, 0.2435, 0.2616};

// One IDX image file and its label file: images [N, 1, R, C] uint8, labels [N] in [0, 10).
absl::StatusOr<ImageDataset> LoadIdx(const std::string& images_path,
                                     const std::string& labels_path);

// DIR/{train,t10k}-images-idx3-ubyte and DIR/{train,t10k}-labels-idx1-ubyte, each plain or with
// ".gz" (the plain file wins when both exist). The Debian package dataset-fashion-mnist installs
// the .gz files in /usr/share/datasets/fashion-mnist: 60,000 train and 10,000 test images.
absl::StatusOr<ImageDataset> LoadFashionMnist(const std::string& dir, ImageSplit split);

// The records of `files` (each plain or gzip), concatenated in order: images [N, 3, 32, 32]
// uint8, labels [N].
absl::StatusOr<ImageDataset> LoadCifar10Batches(const std::vector<std::string>& files);

// DIR/data_batch_{1..5}.bin (train) or DIR/test_batch.bin (test); DIR may also be the folder
// that holds "cifar-10-batches-bin/" (the archive's layout).
absl::StatusOr<ImageDataset> LoadCifar10(const std::string& dir, ImageSplit split);

// Examples [begin, end) of `d`, sharing its storage (e.g. a validation hold-out taken from the
// end of the training set). REQUIRES: 0 <= begin <= end <= d.size().
ImageDataset SliceImages(const ImageDataset& d, int64_t begin, int64_t end);

// Reads a whole file, gunzipping it when it starts with the gzip magic (multi-member streams
// included). NOT_FOUND / DATA_LOSS name `path`.
absl::StatusOr<std::string> ReadMaybeGzipped(const std::string& path);

struct ImageBatch {
  torch::Tensor images;  // [B, C, H, W] float32, normalised
  torch::Tensor labels;  // [B] int64
};

// uint8 [B, C, H, W] → float32 (x / 255 − mean[c]) / stddev[c].
torch::Tensor NormalizeImages(const torch::Tensor& u8, const std::vector<double>& mean,
                              const std::vector<double>& stddev);

struct ImageStreamOptions {
  // Training augmentation, drawn per example from the stream's own generator: a random crop of
  // the original size from the image zero-padded by `crop_padding` pixels on each side (padding
  // with pixel value 0, as torchvision's RandomCrop), then a horizontal flip with probability
  // 1/2 when `flip`. Off by default; the usual CIFAR-10 recipe turns it on (padding 4, flip).
  bool augment = false;
  int64_t crop_padding = 4;
  bool flip = true;
};

// Shuffled training batches. Example i belongs to rank i % world (every world-th example, the
// image analogue of MlmStream's blocks). Each epoch visits this rank's examples in a permutation
// drawn from (seed, epoch); a batch that reaches the end of an epoch continues into the next.
// The cursor and the augmentation generator are in SaveState, so a resumed stream continues
// with exactly the batches the uninterrupted one would have produced. All draws use
// std::mt19937_64 with mlm_data.h's integer mapping, so batches are identical across standard
// libraries. Not thread-safe.
class ImageStream {
 public:
  // data: borrowed, must outlive the stream. REQUIRES: 0 <= rank < world; before Next:
  // num_examples() > 0.
  ImageStream(const ImageDataset& data, ImageStreamOptions opt, int rank, int world,
              uint64_t seed);

  ImageBatch Next(int64_t batch_size);
  int64_t num_examples() const { return static_cast<int64_t>(examples_.size()); }
  int64_t epoch() const { return epoch_; }
  // Indices into the dataset of the examples the last Next returned, in batch order.
  const std::vector<int64_t>& last_indices() const { return last_indices_; }

  std::string SaveState() const;  // epoch, cursor, augmentation generator
  absl::Status LoadState(const std::string& state);

 private:
  void Reshuffle();

  const ImageDataset& data_;
  ImageStreamOptions opt_;
  uint64_t seed_;
  std::vector<int64_t> examples_;  // this rank's example indices
  std::vector<int64_t> perm_;
  std::vector<int64_t> last_indices_;
  int64_t epoch_ = 0;
  int64_t cursor_ = 0;
  std::mt19937_64 aug_rng_;
};

// Fixed evaluation batches in dataset order, normalised, not augmented: examples
// [0, min(N, max_batches·batch_size)) (all when max_batches <= 0); the last batch may be short.
std::vector<ImageBatch> MakeImageEvalBatches(const ImageDataset& data, int64_t batch_size,
                                             int64_t max_batches);

}  // namespace mat::trainer
