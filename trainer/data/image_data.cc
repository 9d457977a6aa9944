#include "trainer/data/image_data.h"

#include <zlib.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "common/file_util.h"
#include "common/status.h"
#include "trainer/data/mlm_data.h"

namespace mat::trainer {
namespace {

constexpr uint32_t kIdxImagesMagic = 0x00000803;  // unsigned byte, 3 dimensions
constexpr uint32_t kIdxLabelsMagic = 0x00000801;  // unsigned byte, 1 dimension
constexpr int64_t kCifarPixels = 3 * 32 * 32;
constexpr int64_t kCifarRecord = 1 + kCifarPixels;
constexpr int64_t kNumClasses = 10;

uint32_t BigEndian32(const std::string& s, size_t at) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + at;
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

std::string Hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

absl::StatusOr<std::string> Gunzip(const std::string& in, const std::string& path) {
  z_stream strm;
  std::memset(&strm, 0, sizeof(strm));
  if (inflateInit2(&strm, 16 + MAX_WBITS) != Z_OK) {
    return absl::InternalError("cannot initialise the gzip decoder for " + path);
  }
  std::string out;
  std::vector<unsigned char> buf(1 << 20);
  strm.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  strm.avail_in = static_cast<uInt>(in.size());
  int ret = Z_OK;
  while (true) {
    strm.next_out = buf.data();
    strm.avail_out = static_cast<uInt>(buf.size());
    ret = inflate(&strm, Z_NO_FLUSH);
    out.append(reinterpret_cast<const char*>(buf.data()), buf.size() - strm.avail_out);
    if (ret == Z_STREAM_END) {
      // Another member follows (concatenated gzip files decompress to the concatenation).
      if (strm.avail_in > 0 && inflateReset(&strm) == Z_OK) continue;
      break;
    }
    if (ret == Z_BUF_ERROR && strm.avail_in == 0) break;  // input ended inside the stream
    if (ret != Z_OK) break;
  }
  const std::string zmsg = strm.msg != nullptr ? strm.msg : "zlib code " + std::to_string(ret);
  inflateEnd(&strm);
  if (ret != Z_STREAM_END) {
    const std::string why =
        ret == Z_BUF_ERROR ? "truncated gzip stream" : "corrupt gzip stream (" + zmsg + ")";
    return absl::DataLossError(path + ": " + why + " after " + std::to_string(out.size()) +
                               " decompressed bytes");
  }
  return out;
}

// Reads an IDX file of `dims` dimensions with `magic`; returns the sizes and the payload.
absl::Status ParseIdx(const std::string& bytes, const std::string& path, uint32_t magic,
                      const char* kind, std::vector<int64_t>* sizes, std::string* payload) {
  const size_t dims = magic & 0xff;
  const size_t header = 4 + 4 * dims;
  if (bytes.size() < 4) {
    return absl::DataLossError(path + ": truncated: " + std::to_string(bytes.size()) +
                               " bytes, shorter than the 4-byte IDX magic number");
  }
  const uint32_t got = BigEndian32(bytes, 0);
  if (got != magic) {
    return absl::InvalidArgumentError(path + ": not an IDX " + kind + " file: magic number " +
                                      Hex32(got) + ", expected " + Hex32(magic));
  }
  if (bytes.size() < header) {
    return absl::DataLossError(path + ": truncated: " + std::to_string(bytes.size()) +
                               " bytes, shorter than the " + std::to_string(header) +
                               "-byte IDX header");
  }
  int64_t expected = 1;
  sizes->clear();
  for (size_t d = 0; d < dims; ++d) {
    sizes->push_back(BigEndian32(bytes, 4 + 4 * d));
    expected *= sizes->back();
  }
  const int64_t have = static_cast<int64_t>(bytes.size() - header);
  if (have != expected) {
    std::string what = dims == 3 ? std::to_string((*sizes)[0]) + " images of " +
                                       std::to_string((*sizes)[1]) + "x" +
                                       std::to_string((*sizes)[2])
                                 : std::to_string((*sizes)[0]) + " labels";
    return absl::DataLossError(path + ": " + (have < expected ? "truncated" : "trailing data") +
                               ": header says " + what + " (" + std::to_string(expected) +
                               " bytes), file has " + std::to_string(have) + " bytes of data");
  }
  payload->assign(bytes, header, std::string::npos);
  return absl::OkStatus();
}

// labels: raw bytes; DATA_LOSS names the first one out of range.
absl::StatusOr<torch::Tensor> LabelsTensor(const unsigned char* p, int64_t n, int64_t stride,
                                           const std::string& path, const char* unit) {
  torch::Tensor labels = torch::empty({n}, torch::kLong);
  auto* out = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = p[i * stride];
    if (v >= kNumClasses) {
      return absl::DataLossError(path + ": " + unit + " " + std::to_string(i) + " has label " +
                                 std::to_string(v) + ", outside [0, " +
                                 std::to_string(kNumClasses) + ")");
    }
    out[i] = v;
  }
  return labels;
}

std::string PickFile(const std::filesystem::path& plain) {
  if (std::filesystem::exists(plain)) return plain.string();
  std::filesystem::path gz = plain.string() + ".gz";
  if (std::filesystem::exists(gz)) return gz.string();
  return plain.string() + "[.gz]";  // ReadMaybeGzipped reports NOT_FOUND with this name
}

}  // namespace

absl::StatusOr<std::string> ReadMaybeGzipped(const std::string& path) {
  if (!std::filesystem::exists(path)) return absl::NotFoundError(path + ": no such file");
  MAT_ASSIGN_OR_RETURN(std::string raw, common::ReadFile(path));
  if (raw.size() >= 2 && static_cast<unsigned char>(raw[0]) == 0x1f &&
      static_cast<unsigned char>(raw[1]) == 0x8b) {
    return Gunzip(raw, path);
  }
  return raw;
}

absl::StatusOr<ImageDataset> LoadIdx(const std::string& images_path,
                                     const std::string& labels_path) {
  std::vector<int64_t> isz, lsz;
  std::string pixels, labels;
  {
    MAT_ASSIGN_OR_RETURN(std::string bytes, ReadMaybeGzipped(images_path));
    MAT_RETURN_IF_ERROR(ParseIdx(bytes, images_path, kIdxImagesMagic, "image", &isz, &pixels));
  }
  {
    MAT_ASSIGN_OR_RETURN(std::string bytes, ReadMaybeGzipped(labels_path));
    MAT_RETURN_IF_ERROR(ParseIdx(bytes, labels_path, kIdxLabelsMagic, "label", &lsz, &labels));
  }
  if (isz[0] != lsz[0]) {
    return absl::InvalidArgumentError(images_path + " has " + std::to_string(isz[0]) +
                                      " images but " + labels_path + " has " +
                                      std::to_string(lsz[0]) + " labels");
  }
  if (isz[0] == 0 || isz[1] == 0 || isz[2] == 0) {
    return absl::InvalidArgumentError(images_path + ": no images (header says " +
                                      std::to_string(isz[0]) + " of " + std::to_string(isz[1]) +
                                      "x" + std::to_string(isz[2]) + ")");
  }
  ImageDataset d;
  d.images = torch::empty({isz[0], 1, isz[1], isz[2]}, torch::kUInt8);
  std::memcpy(d.images.data_ptr<uint8_t>(), pixels.data(), pixels.size());
  MAT_ASSIGN_OR_RETURN(d.labels,
                       LabelsTensor(reinterpret_cast<const unsigned char*>(labels.data()),
                                    lsz[0], 1, labels_path, "label"));
  d.mean = {0.0};
  d.stddev = {1.0};
  return d;
}

absl::StatusOr<ImageDataset> LoadFashionMnist(const std::string& dir, ImageSplit split) {
  const std::string prefix = split == ImageSplit::kTrain ? "train" : "t10k";
  const std::filesystem::path base(dir);
  MAT_ASSIGN_OR_RETURN(ImageDataset d,
                       LoadIdx(PickFile(base / (prefix + "-images-idx3-ubyte")),
                               PickFile(base / (prefix + "-labels-idx1-ubyte"))));
  d.mean = kFashionMnistMean;
  d.stddev = kFashionMnistStd;
  return d;
}

absl::StatusOr<ImageDataset> LoadCifar10Batches(const std::vector<std::string>& files) {
  if (files.empty()) return absl::InvalidArgumentError("no CIFAR-10 batch files given");
  std::vector<std::string> contents;
  int64_t total = 0;
  for (const std::string& path : files) {
    MAT_ASSIGN_OR_RETURN(std::string bytes, ReadMaybeGzipped(path));
    const int64_t n = static_cast<int64_t>(bytes.size());
    if (n == 0 || n % kCifarRecord != 0) {
      return absl::DataLossError(
          path + ": truncated: " + std::to_string(n) + " bytes is not a whole number of " +
          std::to_string(kCifarRecord) + "-byte records (" + std::to_string(n / kCifarRecord) +
          " records and " + std::to_string(n % kCifarRecord) + " bytes)");
    }
    total += n / kCifarRecord;
    contents.push_back(std::move(bytes));
  }
  ImageDataset d;
  d.images = torch::empty({total, 3, 32, 32}, torch::kUInt8);
  d.labels = torch::empty({total}, torch::kLong);
  uint8_t* img = d.images.data_ptr<uint8_t>();
  int64_t at = 0;
  for (size_t f = 0; f < files.size(); ++f) {
    const auto* p = reinterpret_cast<const unsigned char*>(contents[f].data());
    const int64_t n = static_cast<int64_t>(contents[f].size()) / kCifarRecord;
    MAT_ASSIGN_OR_RETURN(torch::Tensor labels,
                         LabelsTensor(p, n, kCifarRecord, files[f], "record"));
    d.labels.narrow(0, at, n).copy_(labels);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(img + (at + i) * kCifarPixels, p + i * kCifarRecord + 1, kCifarPixels);
    }
    at += n;
  }
  d.mean = {0.0, 0.0, 0.0};
  d.stddev = {1.0, 1.0, 1.0};
  return d;
}

absl::StatusOr<ImageDataset> LoadCifar10(const std::string& dir, ImageSplit split) {
  namespace fs = std::filesystem;
  fs::path base(dir);
  if (fs::is_directory(base / "cifar-10-batches-bin")) base /= "cifar-10-batches-bin";
  std::vector<std::string> files;
  if (split == ImageSplit::kTrain) {
    for (int i = 1; i <= 5; ++i) {
      files.push_back((base / ("data_batch_" + std::to_string(i) + ".bin")).string());
    }
  } else {
    files.push_back((base / "test_batch.bin").string());
  }
  MAT_ASSIGN_OR_RETURN(ImageDataset d, LoadCifar10Batches(files));
  d.mean = kCifar10Mean;
  d.stddev = kCifar10Std;
  return d;
}

ImageDataset SliceImages(const ImageDataset& d, int64_t begin, int64_t end) {
  MAT_CHECK(0 <= begin && begin <= end && end <= d.size())
      << "slice [" << begin << ", " << end << ") of " << d.size() << " examples";
  ImageDataset s = d;
  s.images = d.images.narrow(0, begin, end - begin);
  s.labels = d.labels.narrow(0, begin, end - begin);
  return s;
}

torch::Tensor NormalizeImages(const torch::Tensor& u8, const std::vector<double>& mean,
                              const std::vector<double>& stddev) {
  const int64_t c = u8.size(1);
  MAT_CHECK(static_cast<int64_t>(mean.size()) == c && static_cast<int64_t>(stddev.size()) == c)
      << "normalisation has " << mean.size() << "/" << stddev.size() << " values for " << c
      << " channels";
  std::vector<float> scale(c), shift(c);
  for (int64_t i = 0; i < c; ++i) {
    scale[i] = static_cast<float>(1.0 / (255.0 * stddev[i]));
    shift[i] = static_cast<float>(-mean[i] / stddev[i]);
  }
  torch::Tensor s = torch::tensor(scale).view({1, c, 1, 1});
  torch::Tensor b = torch::tensor(shift).view({1, c, 1, 1});
  return torch::addcmul(b, u8.to(torch::kFloat), s);
}

ImageStream::ImageStream(const ImageDataset& data, ImageStreamOptions opt, int rank, int world,
                         uint64_t seed)
    : data_(data), opt_(opt), seed_(seed), aug_rng_(seed * 0x9E3779B97F4A7C15ULL + 2) {
  MAT_CHECK(world > 0 && rank >= 0 && rank < world) << "rank " << rank << " of " << world;
  for (int64_t i = rank; i < data.size(); i += world) examples_.push_back(i);
  Reshuffle();
}

void ImageStream::Reshuffle() {
  perm_.resize(examples_.size());
  for (size_t i = 0; i < perm_.size(); ++i) perm_[i] = static_cast<int64_t>(i);
  std::mt19937_64 g(seed_ ^ (0xD1B54A32D192ED03ULL * uint64_t(epoch_ + 1)));
  for (size_t i = perm_.size(); i > 1; --i) std::swap(perm_[i - 1], perm_[UniformInt(g, i)]);
}

ImageBatch ImageStream::Next(int64_t batch_size) {
  MAT_CHECK(!examples_.empty()) << "ImageStream has no examples for this rank";
  MAT_CHECK(batch_size > 0) << "batch_size " << batch_size;
  last_indices_.clear();
  for (int64_t r = 0; r < batch_size; ++r) {
    if (cursor_ >= static_cast<int64_t>(perm_.size())) {
      ++epoch_;
      cursor_ = 0;
      Reshuffle();
    }
    last_indices_.push_back(examples_[perm_[cursor_++]]);
  }
  torch::Tensor idx = torch::tensor(last_indices_, torch::kLong);
  torch::Tensor u8 = data_.images.index_select(0, idx);  // [B, C, H, W]
  if (opt_.augment) {
    const int64_t p = opt_.crop_padding, H = u8.size(2), W = u8.size(3);
    torch::Tensor padded = torch::constant_pad_nd(u8, {p, p, p, p}, 0);
    torch::Tensor out = torch::empty_like(u8);
    for (int64_t b = 0; b < batch_size; ++b) {
      const int64_t dy = static_cast<int64_t>(UniformInt(aug_rng_, uint64_t(2 * p + 1)));
      const int64_t dx = static_cast<int64_t>(UniformInt(aug_rng_, uint64_t(2 * p + 1)));
      const bool flip = opt_.flip && UniformInt(aug_rng_, 2) == 1;
      torch::Tensor crop = padded[b].narrow(1, dy, H).narrow(2, dx, W);
      out[b].copy_(flip ? crop.flip({2}) : crop);
    }
    u8 = out;
  }
  return {NormalizeImages(u8, data_.mean, data_.stddev), data_.labels.index_select(0, idx)};
}

std::string ImageStream::SaveState() const {
  std::ostringstream ss;
  ss << epoch_ << ' ' << cursor_ << ' ' << aug_rng_;
  return ss.str();
}

absl::Status ImageStream::LoadState(const std::string& state) {
  std::istringstream ss(state);
  int64_t epoch, cursor;
  std::mt19937_64 rng;
  if (!(ss >> epoch >> cursor >> rng) || epoch < 0 || cursor < 0 ||
      cursor > static_cast<int64_t>(examples_.size())) {
    return absl::DataLossError("image data cursor in checkpoint is malformed");
  }
  epoch_ = epoch;
  cursor_ = cursor;
  aug_rng_ = rng;
  Reshuffle();
  return absl::OkStatus();
}

std::vector<ImageBatch> MakeImageEvalBatches(const ImageDataset& data, int64_t batch_size,
                                             int64_t max_batches) {
  MAT_CHECK(batch_size > 0) << "batch_size " << batch_size;
  int64_t n = data.size();
  if (max_batches > 0) n = std::min(n, max_batches * batch_size);
  std::vector<ImageBatch> out;
  for (int64_t begin = 0; begin < n; begin += batch_size) {
    const int64_t len = std::min(batch_size, n - begin);
    out.push_back({NormalizeImages(data.images.narrow(0, begin, len), data.mean, data.stddev),
                   data.labels.narrow(0, begin, len).clone()});
  }
  return out;
}

}  // namespace mat::trainer
