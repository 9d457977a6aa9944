// Tests of trainer/image_data: the IDX and CIFAR-10 loaders on generated files (plain and gzip,
// compared byte by byte with what was written), their errors on damaged or wrong files, the real
// Fashion-MNIST package files when installed, and the sharded, seeded, resumable ImageStream.
#include "trainer/data/image_data.h"

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mat::trainer {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

std::string BigEndian(uint32_t v) {
  return {char(v >> 24), char((v >> 16) & 0xff), char((v >> 8) & 0xff), char(v & 0xff)};
}

// IDX image file bytes: magic 0x803, n, rows, cols, then `pixels`.
std::string IdxImages(uint32_t n, uint32_t rows, uint32_t cols, const std::string& pixels) {
  return BigEndian(0x803) + BigEndian(n) + BigEndian(rows) + BigEndian(cols) + pixels;
}
std::string IdxLabels(const std::string& labels) {
  return BigEndian(0x801) + BigEndian(uint32_t(labels.size())) + labels;
}

std::string Pattern(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  uint32_t x = seed;
  for (auto& c : s) {
    x = x * 1664525u + 1013904223u;
    c = char(x >> 24);
  }
  return s;
}

std::string LabelBytes(size_t n, uint32_t seed) {
  std::string s = Pattern(n, seed);
  for (auto& c : s) c = char(static_cast<unsigned char>(c) % 10);
  return s;
}

class ImageDataFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = info->name();  // "Test/param" for parameterized tests
    std::replace(name.begin(), name.end(), '/', '_');
    dir_ = fs::temp_directory_path() /
           ("mat_image_data_" + std::to_string(getpid()) + "_" + name);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `bytes` to dir/name, gzip-compressed (with zlib's gzwrite) when `gz`.
  std::string Write(const std::string& name, const std::string& bytes, bool gz = false) {
    const std::string path = (dir_ / name).string();
    if (gz) {
      gzFile f = gzopen(path.c_str(), "wb9");
      EXPECT_NE(f, nullptr);
      EXPECT_EQ(gzwrite(f, bytes.data(), unsigned(bytes.size())), int(bytes.size()));
      EXPECT_EQ(gzclose(f), Z_OK);
    } else {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), std::streamsize(bytes.size()));
      EXPECT_TRUE(out.good()) << path;
    }
    return path;
  }

  std::string ReadRaw(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  fs::path dir_;
};

class IdxLoaderTest : public ImageDataFileTest, public ::testing::WithParamInterface<bool> {};

TEST_P(IdxLoaderTest, ReadsGeneratedFilesByteExactly) {
  const bool gz = GetParam();
  const std::string pixels = Pattern(7 * 5 * 4, 1), labels = LabelBytes(7, 2);
  const std::string ext = gz ? ".gz" : "";
  auto d = LoadIdx(Write("img-idx3-ubyte" + ext, IdxImages(7, 5, 4, pixels), gz),
                   Write("lab-idx1-ubyte" + ext, IdxLabels(labels), gz));
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_EQ(d->images.sizes(), torch::IntArrayRef({7, 1, 5, 4}));
  ASSERT_EQ(d->images.scalar_type(), torch::kUInt8);
  ASSERT_EQ(d->labels.scalar_type(), torch::kLong);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(d->images.data_ptr<uint8_t>()),
                        pixels.size()),
            pixels);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(d->labels[i].item<int64_t>(), labels[i]) << i;
  EXPECT_EQ(d->mean, std::vector<double>({0.0}));
  EXPECT_EQ(d->stddev, std::vector<double>({1.0}));
}

TEST_P(IdxLoaderTest, RejectsATruncatedImageFileNamingIt) {
  const bool gz = GetParam();
  const std::string ext = gz ? ".gz" : "";
  // Header promises 5 images of 4x3 = 60 bytes; only 50 follow.
  const std::string img =
      Write("train-images-idx3-ubyte" + ext, IdxImages(5, 4, 3, Pattern(50, 3)), gz);
  const std::string lab = Write("train-labels-idx1-ubyte" + ext, IdxLabels(LabelBytes(5, 4)), gz);
  auto d = LoadIdx(img, lab);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kDataLoss) << d.status();
  EXPECT_THAT(std::string(d.status().message()),
              HasSubstr(img + ": truncated: header says 5 images of 4x3 (60 bytes), file has 50 "
                              "bytes of data"));
  // The header itself cut short.
  const std::string stub = Write("stub" + ext, BigEndian(0x803) + BigEndian(5), gz);
  d = LoadIdx(stub, lab);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kDataLoss) << d.status();
  EXPECT_THAT(std::string(d.status().message()),
              HasSubstr(stub + ": truncated: 8 bytes, shorter than the 16-byte IDX header"));
  // Trailing bytes are damage too.
  const std::string longer = Write("long" + ext, IdxImages(1, 2, 2, Pattern(5, 3)), gz);
  d = LoadIdx(longer, Write("one" + ext, IdxLabels("\x01"), gz));
  ASSERT_EQ(d.status().code(), absl::StatusCode::kDataLoss) << d.status();
  EXPECT_THAT(std::string(d.status().message()), HasSubstr(longer + ": trailing data"));
}

TEST_P(IdxLoaderTest, RejectsBadMagicMismatchedCountsAndBadLabels) {
  const bool gz = GetParam();
  const std::string ext = gz ? ".gz" : "";
  const std::string img = Write("img" + ext, IdxImages(3, 2, 2, Pattern(12, 5)), gz);
  const std::string lab = Write("lab" + ext, IdxLabels(LabelBytes(3, 6)), gz);
  // Labels given as images and the other way round.
  auto d = LoadIdx(lab, img);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
  EXPECT_THAT(std::string(d.status().message()),
              HasSubstr(lab + ": not an IDX image file: magic number 0x00000801, expected "
                              "0x00000803"));
  d = LoadIdx(img, img);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
  EXPECT_THAT(std::string(d.status().message()),
              HasSubstr(img + ": not an IDX label file: magic number 0x00000803, expected "
                              "0x00000801"));
  const std::string four = Write("four" + ext, IdxLabels(LabelBytes(4, 6)), gz);
  d = LoadIdx(img, four);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
  EXPECT_THAT(std::string(d.status().message()),
              HasSubstr(img + " has 3 images but " + four + " has 4 labels"));
  const std::string bad = Write("bad" + ext, IdxLabels(std::string("\x01\x0a\x02", 3)), gz);
  d = LoadIdx(img, bad);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kDataLoss) << d.status();
  EXPECT_THAT(std::string(d.status().message()),
              HasSubstr(bad + ": label 1 has label 10, outside [0, 10)"));
}

INSTANTIATE_TEST_SUITE_P(PlainAndGzip, IdxLoaderTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "gzip" : "plain"; });

TEST_F(ImageDataFileTest, RejectsATruncatedOrCorruptGzipStream) {
  const std::string full = Write("full.gz", IdxImages(20, 8, 8, Pattern(20 * 64, 7)), true);
  const std::string bytes = ReadRaw(full);
  const std::string cut = Write("cut.gz", bytes.substr(0, bytes.size() / 2));
  auto r = ReadMaybeGzipped(cut);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(cut + ": truncated gzip stream"));
  std::string garbled = bytes;
  for (size_t i = 12; i < garbled.size() - 8; ++i) garbled[i] = char(garbled[i] ^ 0x5a);
  const std::string bad = Write("bad.gz", garbled);
  r = ReadMaybeGzipped(bad);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(bad + ": corrupt gzip stream"));
  r = ReadMaybeGzipped((dir_ / "absent").string());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ImageDataFileTest, ConcatenatedGzipMembersDecompressToTheConcatenation) {
  const std::string a = Write("a.gz", "hello ", true), b = Write("b.gz", "world", true);
  const std::string both = Write("both.gz", ReadRaw(a) + ReadRaw(b));
  auto r = ReadMaybeGzipped(both);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "hello world");
}

TEST_F(ImageDataFileTest, FashionMnistLayoutPrefersPlainFilesAndSetsStatistics) {
  const std::string px = Pattern(2 * 28 * 28, 9), lb = LabelBytes(2, 10);
  Write("t10k-images-idx3-ubyte.gz", IdxImages(2, 28, 28, px), true);
  Write("t10k-labels-idx1-ubyte.gz", IdxLabels(lb), true);
  auto d = LoadFashionMnist(dir_.string(), ImageSplit::kTest);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->size(), 2);
  EXPECT_EQ(d->mean, kFashionMnistMean);
  EXPECT_EQ(d->stddev, kFashionMnistStd);
  // A plain file beside the .gz wins.
  Write("t10k-labels-idx1-ubyte", IdxLabels(std::string("\x03\x04", 2)));
  d = LoadFashionMnist(dir_.string(), ImageSplit::kTest);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->labels[0].item<int64_t>(), 3);
  auto missing = LoadFashionMnist(dir_.string(), ImageSplit::kTrain);
  ASSERT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("train-images-idx3-ubyte"));
}

// CIFAR-10 records: 1 label byte + 3072 pixel bytes.
std::string CifarRecords(const std::string& labels, uint32_t seed) {
  std::string out;
  for (size_t i = 0; i < labels.size(); ++i) out += labels[i] + Pattern(3072, seed + uint32_t(i));
  return out;
}

TEST_F(ImageDataFileTest, CifarBatchesReadByteExactlyInFileOrder) {
  const std::string l1 = LabelBytes(3, 20), l2 = LabelBytes(2, 21);
  const std::string b1 = CifarRecords(l1, 100), b2 = CifarRecords(l2, 200);
  for (bool gz : {false, true}) {
    auto d = LoadCifar10Batches({Write("one.bin", b1, gz), Write("two.bin", b2, gz)});
    ASSERT_TRUE(d.ok()) << d.status();
    ASSERT_EQ(d->images.sizes(), torch::IntArrayRef({5, 3, 32, 32}));
    const std::string all = b1 + b2;
    const auto* px = d->images.data_ptr<uint8_t>();
    for (int i = 0; i < 5; ++i) {
      EXPECT_EQ(d->labels[i].item<int64_t>(), all[i * 3073]) << i;
      EXPECT_EQ(std::string(reinterpret_cast<const char*>(px) + i * 3072, 3072),
                all.substr(i * 3073 + 1, 3072))
          << "record " << i;
    }
    // Channel-major layout: record 0's green plane starts at byte 1 + 1024.
    EXPECT_EQ(d->images[0][1][0][0].item<uint8_t>(), static_cast<uint8_t>(b1[1 + 1024]));
    EXPECT_EQ(d->images[0][2][31][31].item<uint8_t>(), static_cast<uint8_t>(b1[3072]));
  }
}

TEST_F(ImageDataFileTest, CifarDirectoryLayoutAndErrors) {
  fs::create_directories(dir_ / "cifar-10-batches-bin");
  for (int i = 1; i <= 5; ++i) {
    Write("cifar-10-batches-bin/data_batch_" + std::to_string(i) + ".bin",
          CifarRecords(LabelBytes(2, 30 + i), 40 + i));
  }
  Write("cifar-10-batches-bin/test_batch.bin", CifarRecords(LabelBytes(3, 50), 60));
  auto train = LoadCifar10(dir_.string(), ImageSplit::kTrain);
  ASSERT_TRUE(train.ok()) << train.status();
  EXPECT_EQ(train->size(), 10);
  EXPECT_EQ(train->mean, kCifar10Mean);
  auto test = LoadCifar10((dir_ / "cifar-10-batches-bin").string(), ImageSplit::kTest);
  ASSERT_TRUE(test.ok()) << test.status();
  EXPECT_EQ(test->size(), 3);

  const std::string cut = Write("cut.bin", CifarRecords(LabelBytes(2, 1), 2).substr(0, 3073 + 100));
  auto d = LoadCifar10Batches({cut});
  ASSERT_EQ(d.status().code(), absl::StatusCode::kDataLoss) << d.status();
  EXPECT_THAT(std::string(d.status().message()),
              HasSubstr(cut + ": truncated: 3173 bytes is not a whole number of 3073-byte "
                              "records (1 records and 100 bytes)"));
  const std::string empty = Write("empty.bin", "");
  EXPECT_EQ(LoadCifar10Batches({empty}).status().code(), absl::StatusCode::kDataLoss);
  std::string bad_label = CifarRecords(std::string("\x01\x02\x0b", 3), 3);
  const std::string bad = Write("bad.bin", bad_label);
  d = LoadCifar10Batches({bad});
  ASSERT_EQ(d.status().code(), absl::StatusCode::kDataLoss) << d.status();
  EXPECT_THAT(std::string(d.status().message()),
              HasSubstr(bad + ": record 2 has label 11, outside [0, 10)"));
  d = LoadCifar10((dir_ / "nowhere").string(), ImageSplit::kTest);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kNotFound) << d.status();
  EXPECT_THAT(std::string(d.status().message()), HasSubstr("test_batch.bin"));
}

// The Debian package dataset-fashion-mnist (scripts/setup installs it).
TEST(FashionMnistPackageTest, LoadsSixtyAndTenThousandBalancedImages) {
  if (!fs::is_directory(kFashionMnistDir)) GTEST_SKIP() << kFashionMnistDir << " is absent";
  const std::vector<std::pair<ImageSplit, int64_t>> splits = {{ImageSplit::kTrain, 60000},
                                                               {ImageSplit::kTest, 10000}};
  for (const auto& [split, n] : splits) {
    auto d = LoadFashionMnist(kFashionMnistDir, split);
    ASSERT_TRUE(d.ok()) << d.status();
    ASSERT_EQ(d->images.sizes(), torch::IntArrayRef({n, 1, 28, 28}));
    torch::Tensor counts = torch::bincount(d->labels, {}, 10);
    EXPECT_TRUE(counts.eq(n / 10).all().item<bool>()) << counts;
    // The published training-set statistics match the data to three decimals.
    if (split == ImageSplit::kTrain) {
      torch::Tensor x = d->images.to(torch::kDouble) / 255.0;
      EXPECT_NEAR(x.mean().item<double>(), kFashionMnistMean[0], 1e-3);
      EXPECT_NEAR(x.std().item<double>(), kFashionMnistStd[0], 1e-3);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ImageStream on a small in-memory dataset whose pixel (0, 0, 0) holds the example index.

ImageDataset Indexed(int64_t n, int64_t channels = 1, int64_t size = 4) {
  ImageDataset d;
  d.images = torch::randint(0, 256, {n, channels, size, size}, torch::kLong).to(torch::kUInt8);
  for (int64_t i = 0; i < n; ++i) d.images[i][0][0][0] = i;
  d.labels = torch::arange(n, torch::kLong) % 10;
  d.mean.assign(channels, 0.0);
  d.stddev.assign(channels, 1.0);
  return d;
}

// The dataset indices of `batches` batches; checks labels, and pixels unless augmenting.
std::vector<int64_t> Take(ImageStream& s, int64_t batches, int64_t batch_size,
                          bool augmented = false) {
  std::vector<int64_t> out;
  for (int64_t b = 0; b < batches; ++b) {
    ImageBatch batch = s.Next(batch_size);
    EXPECT_EQ(batch.images.sizes()[0], batch_size);
    EXPECT_EQ(batch.images.scalar_type(), torch::kFloat);
    for (int64_t i = 0; i < batch_size; ++i) {
      const int64_t idx = s.last_indices()[i];
      out.push_back(idx);
      EXPECT_EQ(batch.labels[i].item<int64_t>(), idx % 10);
      if (!augmented) {
        EXPECT_FLOAT_EQ(batch.images[i][0][0][0].item<float>(), float(idx) / 255.0f);
      }
    }
  }
  return out;
}

TEST(ImageStreamTest, ShardsByRankAndVisitsEachExampleOncePerEpoch) {
  torch::manual_seed(1);
  ImageDataset d = Indexed(103);
  std::set<int64_t> seen_all;
  for (int rank = 0; rank < 3; ++rank) {
    ImageStream s(d, {}, rank, 3, 42);
    const int64_t mine = (103 - rank + 2) / 3;
    ASSERT_EQ(s.num_examples(), mine);
    std::vector<int64_t> epoch = Take(s, 1, mine);
    std::set<int64_t> unique(epoch.begin(), epoch.end());
    EXPECT_EQ(int64_t(unique.size()), mine);
    for (int64_t i : unique) {
      EXPECT_EQ(i % 3, rank);
      EXPECT_TRUE(seen_all.insert(i).second) << i << " on two ranks";
    }
    EXPECT_EQ(s.epoch(), 0);
    Take(s, 1, 1);
    EXPECT_EQ(s.epoch(), 1);
  }
  EXPECT_EQ(seen_all.size(), 103u);
}

TEST(ImageStreamTest, IsDeterministicPerSeedAndResumesFromSavedState) {
  torch::manual_seed(2);
  ImageDataset d = Indexed(50, 3, 6);
  ImageStreamOptions aug;
  aug.augment = true;
  aug.crop_padding = 2;
  ImageStream a(d, aug, 1, 2, 7), b(d, aug, 1, 2, 7), other(d, aug, 1, 2, 8);
  std::vector<int64_t> ia = Take(a, 3, 10, true);
  EXPECT_EQ(ia, Take(b, 3, 10, true));
  EXPECT_NE(ia, Take(other, 3, 10, true));
  const std::string state = a.SaveState();
  std::vector<ImageBatch> rest;
  for (int i = 0; i < 4; ++i) rest.push_back(a.Next(9));  // crosses into epoch 2
  ImageStream resumed(d, aug, 1, 2, 7);
  ASSERT_TRUE(resumed.LoadState(state).ok());
  for (int i = 0; i < 4; ++i) {
    ImageBatch r = resumed.Next(9);
    EXPECT_TRUE(r.images.equal(rest[i].images)) << "batch " << i;
    EXPECT_TRUE(r.labels.equal(rest[i].labels)) << "batch " << i;
  }
  EXPECT_EQ(resumed.epoch(), a.epoch());
  EXPECT_FALSE(resumed.LoadState("garbage").ok());
  EXPECT_EQ(resumed.LoadState("0 999 1").code(), absl::StatusCode::kDataLoss);
}

TEST(ImageStreamTest, AugmentationCropsFromThePaddedImageAndFlips) {
  torch::manual_seed(3);
  ImageDataset d = Indexed(20, 3, 5);
  ImageStreamOptions aug;
  aug.augment = true;
  aug.crop_padding = 1;
  ImageStream s(d, aug, 0, 1, 5);
  int flipped = 0, shifted = 0;
  for (int step = 0; step < 10; ++step) {
    ImageBatch batch = s.Next(8);
    for (int64_t i = 0; i < 8; ++i) {
      torch::Tensor got = (batch.images[i] * 255).round().to(torch::kLong);
      torch::Tensor padded =
          torch::constant_pad_nd(d.images[s.last_indices()[i]].to(torch::kLong), {1, 1, 1, 1}, 0);
      bool found = false;
      for (int64_t dy = 0; dy <= 2 && !found; ++dy) {
        for (int64_t dx = 0; dx <= 2 && !found; ++dx) {
          torch::Tensor crop = padded.narrow(1, dy, 5).narrow(2, dx, 5);
          if (crop.equal(got)) {
            found = true;
            shifted += (dy != 1 || dx != 1);
          } else if (crop.flip({2}).equal(got)) {
            found = true;
            ++flipped;
            shifted += (dy != 1 || dx != 1);
          }
        }
      }
      EXPECT_TRUE(found) << "example " << s.last_indices()[i] << " is no crop of its image";
    }
  }
  EXPECT_GT(flipped, 10);
  EXPECT_GT(shifted, 30);
  // No augmentation with zero padding and no flip: the plain images.
  ImageStreamOptions none;
  none.augment = true;
  none.crop_padding = 0;
  none.flip = false;
  ImageStream plain(d, {}, 0, 1, 5), noop(d, none, 0, 1, 5);
  EXPECT_TRUE(plain.Next(20).images.equal(noop.Next(20).images));
}

TEST(ImageDataTest, NormalisesPerChannelAndMakesEvalBatchesInOrder) {
  torch::Tensor u8 = torch::tensor({0, 255, 51, 102}, torch::kUInt8).view({1, 2, 1, 2});
  torch::Tensor x = NormalizeImages(u8, {0.5, 0.2}, {0.25, 0.4});
  EXPECT_NEAR(x[0][0][0][0].item<float>(), (0.0 - 0.5) / 0.25, 1e-6);
  EXPECT_NEAR(x[0][0][0][1].item<float>(), (1.0 - 0.5) / 0.25, 1e-6);
  EXPECT_NEAR(x[0][1][0][0].item<float>(), (0.2 - 0.2) / 0.4, 1e-6);
  EXPECT_NEAR(x[0][1][0][1].item<float>(), (0.4 - 0.2) / 0.4, 1e-6);

  torch::manual_seed(4);
  ImageDataset d = Indexed(23);
  std::vector<ImageBatch> all = MakeImageEvalBatches(d, 10, 0);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[2].labels.size(0), 3);
  EXPECT_EQ(all[1].labels[0].item<int64_t>(), 10 % 10);
  EXPECT_FLOAT_EQ(all[2].images[2][0][0][0].item<float>(), 22.0f / 255.0f);
  EXPECT_EQ(MakeImageEvalBatches(d, 10, 2).size(), 2u);
  ImageDataset tail = SliceImages(d, 20, 23);
  EXPECT_EQ(tail.size(), 3);
  EXPECT_EQ(tail.images[0][0][0][0].item<uint8_t>(), 20);
}

}  // namespace
}  // namespace mat::trainer
