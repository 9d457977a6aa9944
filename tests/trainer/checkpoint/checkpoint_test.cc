// Tests of mat::trainer's checkpoint files: round trip (the trainer's kinds of tensors and
// metadata), plain safetensors that a safetensors reader opens, integrity (truncation and
// corruption are DATA_LOSS naming the file; the checksum catches a well-formed change), the
// earlier format refused, `.prev` rotation and LoadNewestCheckpoint's fallback.
#include "trainer/checkpoint/checkpoint.h"

#include <unistd.h>

#include <filesystem>
#include <map>
#include <fstream>
#include <sstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "nlohmann/json.hpp"
#include "safetensors/safetensors.h"
#include "tests/testing/temp_dir.h"

namespace mat::trainer {
namespace {

namespace fs = std::filesystem;
using ::testing::AnyOf;
using ::testing::HasSubstr;

constexpr size_t kHeaderBytes = 8;  // safetensors: the JSON header's length (u64 LE)

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteBytes(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
  ASSERT_TRUE(out.good());
}

class CheckpointTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_checkpoint_test"};  // outlives the members below

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok()) << "cannot create a temporary directory";
    dir_ = tmp_.path();
    path_ = dir_ + "/checkpoint.pt";
  }

  // A checkpoint holding tensor "w" = `w` and the integer "step" = `step`.
  absl::Status Write(const std::string& path, const torch::Tensor& w, int64_t step) {
    Checkpoint c;
    c.tensors["w"] = w;
    c.meta = nlohmann::json({{"step", step}}).dump();
    return WriteCheckpoint(path, c);
  }
  // Reads "w" and "step" back from a loaded checkpoint.
  static void ReadBack(const Checkpoint& c, torch::Tensor* w, int64_t* step) {
    *w = c.tensors.at("w");
    *step = nlohmann::json::parse(c.meta).at("step").get<int64_t>();
  }

  std::string dir_, path_;
};

TEST_F(CheckpointTest, RoundTripsTensorsExactly) {
  torch::manual_seed(0);
  const torch::Tensor w = torch::randn({7, 5}, torch::kFloat64);
  ASSERT_TRUE(Write(path_, w, 42).ok());
  EXPECT_FALSE(fs::exists(path_ + ".prev")) << "no previous checkpoint to keep";
  absl::StatusOr<Checkpoint> ar = ReadCheckpoint(path_);
  ASSERT_TRUE(ar.ok()) << ar.status();
  torch::Tensor got;
  int64_t step = 0;
  ReadBack(*ar, &got, &step);
  EXPECT_TRUE(torch::equal(got, w));
  EXPECT_EQ(got.dtype(), torch::kFloat64);
  EXPECT_EQ(step, 42);
}

// The file is plain safetensors: a safetensors reader (here the project's own, which follows the
// format's specification) opens it and finds the tensors by name and the metadata.
TEST_F(CheckpointTest, ASafetensorsReaderOpensIt) {
  ASSERT_TRUE(Write(path_, torch::arange(10, torch::kFloat32), 1).ok());
  absl::StatusOr<safetensors::File> file = safetensors::ReadFile(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_TRUE(file->tensors.count("w"));
  EXPECT_EQ(file->tensors.at("w").dtype, safetensors::DType::kF32);
  EXPECT_EQ(file->tensors.at("w").shape, std::vector<int64_t>{10});
  EXPECT_EQ(file->metadata.at("mat.format"), "checkpoint-2");
  EXPECT_EQ(file->metadata.at("mat.meta"), R"({"step":1})");
  EXPECT_EQ(file->metadata.at("mat.fnv1a").size(), 16u);
}

// Cut the file to `keep(size)` bytes: DATA_LOSS naming the path and saying "truncated".
class TruncatedCheckpointTest : public CheckpointTest,
                                public ::testing::WithParamInterface<double> {};

TEST_P(TruncatedCheckpointTest, IsDataLossNamingThePath) {
  ASSERT_TRUE(Write(path_, torch::randn({64, 64}), 3).ok());
  const std::string full = ReadBytes(path_);
  // Param in [0,1): keep that fraction of the file; >= 1: drop that many bytes from the end.
  const double p = GetParam();
  const size_t keep = p < 1 ? size_t(p * double(full.size())) : full.size() - size_t(p);
  ASSERT_LT(keep, full.size());
  WriteBytes(path_, full.substr(0, keep));
  absl::Status st = ReadCheckpoint(path_).status();
  ASSERT_FALSE(st.ok()) << "kept " << keep << " of " << full.size() << " bytes";
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr(path_));
  EXPECT_THAT(st.message(), HasSubstr("truncated"));
}

// 0, 1 %, 5 %, half, 90 % of the file; and all but 1, 2 or 100 bytes.
INSTANTIATE_TEST_SUITE_P(CutPoints, TruncatedCheckpointTest,
                         ::testing::Values(0.0, 0.01, 0.05, 0.5, 0.9, 1.0, 2.0, 100.0));

TEST_F(CheckpointTest, ShortHeaderIsDataLoss) {
  ASSERT_TRUE(Write(path_, torch::ones({3}), 3).ok());
  const std::string full = ReadBytes(path_);
  for (size_t keep : {size_t(0), size_t(7), size_t(8), size_t(23)}) {
    WriteBytes(path_, full.substr(0, keep));
    absl::Status st = ReadCheckpoint(path_).status();
    ASSERT_FALSE(st.ok()) << keep;
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_THAT(st.message(), HasSubstr(path_));
  }
}

// Flip one byte of the payload at a fraction of its length: DATA_LOSS "corrupt".
class CorruptCheckpointTest : public CheckpointTest, public ::testing::WithParamInterface<double> {};

TEST_P(CorruptCheckpointTest, FlippedPayloadByteIsDataLossCorrupt) {
  ASSERT_TRUE(Write(path_, torch::randn({32, 32}), 9).ok());
  std::string data = ReadBytes(path_);
  const size_t payload = data.size() - kHeaderBytes;
  const size_t at = kHeaderBytes + std::min(payload - 1, size_t(GetParam() * double(payload)));
  data[at] = static_cast<char>(data[at] ^ 0x01);
  WriteBytes(path_, data);
  absl::Status st = ReadCheckpoint(path_).status();
  ASSERT_FALSE(st.ok()) << "flipped byte " << at;
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr("corrupt"));
  EXPECT_THAT(st.message(), HasSubstr(path_));
}

INSTANTIATE_TEST_SUITE_P(Offsets, CorruptCheckpointTest, ::testing::Values(0.0, 0.3, 0.77, 1.0));

TEST_F(CheckpointTest, FlippedChecksumByteIsDataLoss) {
  ASSERT_TRUE(Write(path_, torch::ones({4}), 1).ok());
  std::string data = ReadBytes(path_);
  data[16] = static_cast<char>(data[16] ^ 0x80);
  WriteBytes(path_, data);
  absl::Status st = ReadCheckpoint(path_).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
}

TEST_F(CheckpointTest, WrongMagicIsDataLoss) {
  ASSERT_TRUE(Write(path_, torch::ones({4}), 1).ok());
  std::string data = ReadBytes(path_);
  data[0] = 'X';
  WriteBytes(path_, data);
  absl::Status st = ReadCheckpoint(path_).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr(path_));
}

TEST_F(CheckpointTest, MissingFileIsAnErrorNamingThePath) {
  absl::Status st = ReadCheckpoint(path_).status();
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr(path_));
}

TEST_F(CheckpointTest, WritingAgainKeepsThePreviousAsPrev) {
  ASSERT_TRUE(Write(path_, torch::full({3}, 1.0), 1).ok());
  ASSERT_TRUE(Write(path_, torch::full({3}, 2.0), 2).ok());
  ASSERT_TRUE(fs::exists(path_ + ".prev"));
  torch::Tensor w;
  int64_t step = 0;
  {
    absl::StatusOr<Checkpoint> ar = ReadCheckpoint(path_);
    ASSERT_TRUE(ar.ok()) << ar.status();
    ReadBack(*ar, &w, &step);
    EXPECT_EQ(step, 2);
    EXPECT_TRUE(torch::equal(w, torch::full({3}, 2.0)));
  }
  {
    absl::StatusOr<Checkpoint> ar = ReadCheckpoint(path_ + ".prev");
    ASSERT_TRUE(ar.ok()) << ar.status();
    ReadBack(*ar, &w, &step);
    EXPECT_EQ(step, 1);
    EXPECT_TRUE(torch::equal(w, torch::full({3}, 1.0)));
  }
  // A third write rotates again: .prev now holds the second.
  ASSERT_TRUE(Write(path_, torch::full({3}, 3.0), 3).ok());
  absl::StatusOr<Checkpoint> ar = ReadCheckpoint(path_ + ".prev");
  ASSERT_TRUE(ar.ok()) << ar.status();
  ReadBack(*ar, &w, &step);
  EXPECT_EQ(step, 2);
  // No temporary files are left behind.
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) {
    ++files;
    EXPECT_THAT(e.path().filename().string(), AnyOf("checkpoint.pt", "checkpoint.pt.prev"));
  }
  EXPECT_EQ(files, 2);
}

TEST_F(CheckpointTest, WriteIntoAMissingDirectoryIsAnError) {
  Checkpoint c;
  c.tensors["w"] = torch::ones({2});
  absl::Status st = WriteCheckpoint(dir_ + "/no/such/dir/checkpoint.pt", c);
  EXPECT_FALSE(st.ok());
}

TEST_F(CheckpointTest, LoadNewestLoadsTheNewestWithoutWarning) {
  ASSERT_TRUE(Write(path_, torch::full({2}, 1.0), 1).ok());
  ASSERT_TRUE(Write(path_, torch::full({2}, 2.0), 2).ok());
  Checkpoint ar;
  std::string warning = "stale";
  auto used = LoadNewestCheckpoint(path_, &ar, &warning);
  ASSERT_TRUE(used.ok()) << used.status();
  EXPECT_EQ(*used, path_);
  EXPECT_EQ(warning, "");
  torch::Tensor w;
  int64_t step = 0;
  ReadBack(ar, &w, &step);
  EXPECT_EQ(step, 2);
}

TEST_F(CheckpointTest, LoadNewestFallsBackToPrevWhenNewestIsTruncated) {
  ASSERT_TRUE(Write(path_, torch::full({2}, 1.0), 1).ok());
  ASSERT_TRUE(Write(path_, torch::full({2}, 2.0), 2).ok());
  const std::string full = ReadBytes(path_);
  WriteBytes(path_, full.substr(0, full.size() / 2));
  Checkpoint ar;
  std::string warning;
  auto used = LoadNewestCheckpoint(path_, &ar, &warning);
  ASSERT_TRUE(used.ok()) << used.status();
  EXPECT_EQ(*used, path_ + ".prev");
  EXPECT_THAT(warning, HasSubstr(path_));
  EXPECT_THAT(warning, HasSubstr("truncated"));
  torch::Tensor w;
  int64_t step = 0;
  ReadBack(ar, &w, &step);
  EXPECT_EQ(step, 1);
  EXPECT_TRUE(torch::equal(w, torch::full({2}, 1.0)));
}

TEST_F(CheckpointTest, LoadNewestFallsBackToPrevWhenNewestIsMissing) {
  // A crash between keeping `.prev` and writing the new file leaves only `.prev`.
  ASSERT_TRUE(Write(path_, torch::full({2}, 1.0), 1).ok());
  fs::rename(path_, path_ + ".prev");
  Checkpoint ar;
  std::string warning;
  auto used = LoadNewestCheckpoint(path_, &ar, &warning);
  ASSERT_TRUE(used.ok()) << used.status();
  EXPECT_EQ(*used, path_ + ".prev");
  EXPECT_FALSE(warning.empty());
}

TEST_F(CheckpointTest, LoadNewestFailsWhenBothAreBad) {
  ASSERT_TRUE(Write(path_, torch::full({2}, 1.0), 1).ok());
  ASSERT_TRUE(Write(path_, torch::full({2}, 2.0), 2).ok());
  const std::string newest = ReadBytes(path_);
  WriteBytes(path_, newest.substr(0, newest.size() - 5));
  std::string prev = ReadBytes(path_ + ".prev");
  prev[prev.size() - 3] = static_cast<char>(prev[prev.size() - 3] ^ 0x10);
  WriteBytes(path_ + ".prev", prev);
  Checkpoint ar;
  std::string warning;
  auto used = LoadNewestCheckpoint(path_, &ar, &warning);
  ASSERT_FALSE(used.ok());
  EXPECT_EQ(used.status().code(), absl::StatusCode::kDataLoss) << used.status();
  EXPECT_THAT(used.status().message(), HasSubstr("truncated"));
  EXPECT_THAT(used.status().message(), HasSubstr("corrupt"));
  EXPECT_THAT(used.status().message(), HasSubstr(path_ + ".prev"));
}

TEST_F(CheckpointTest, LoadNewestFailsWhenNeitherExists) {
  Checkpoint ar;
  std::string warning;
  auto used = LoadNewestCheckpoint(path_, &ar, &warning);
  ASSERT_FALSE(used.ok());
  EXPECT_THAT(used.status().message(), HasSubstr(path_));
}

// What mat::trainer::Trainer writes: dotted parameter and buffer names, a byte tensor (the
// generator state), a 0-dim integer tensor, float64, bf16 and bool tensors, a non-contiguous
// view, and metadata JSON with quotes in it.
TEST_F(CheckpointTest, ContentsShapedLikeTheTrainersRoundTrip) {
  torch::manual_seed(3);
  Checkpoint out;
  out.tensors["model.encoder.0.weight"] = torch::randn({4, 3});
  out.tensors["buffer.bn.running_mean"] = torch::randn({3}).to(torch::kFloat64);
  out.tensors["rng.torch"] = at::detail::getDefaultCPUGenerator().get_state();
  out.tensors["opt.step.w"] = torch::tensor(int64_t{17});
  out.tensors["view"] = torch::randn({6, 5}).slice(1, 1, 4);  // offset and strides
  out.tensors["half"] = torch::randn({5}).to(torch::kBFloat16);
  out.tensors["mask"] = torch::tensor({true, false, true});
  out.tensors["empty"] = torch::zeros({0, 3});
  out.meta = R"({"step": 3, "name": "a \"quoted\" run"})";
  ASSERT_TRUE(WriteCheckpoint(path_, out).ok());
  absl::StatusOr<Checkpoint> in = ReadCheckpoint(path_);
  ASSERT_TRUE(in.ok()) << in.status();
  EXPECT_EQ(in->meta, out.meta);
  ASSERT_EQ(in->tensors.size(), out.tensors.size());
  for (const auto& [name, t] : out.tensors) {
    ASSERT_TRUE(in->tensors.count(name)) << name;
    const torch::Tensor& got = in->tensors.at(name);
    EXPECT_EQ(got.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(got.sizes().equals(t.sizes())) << name;
    EXPECT_TRUE(torch::equal(got, t)) << name;
  }
  EXPECT_EQ(in->tensors.at("opt.step.w").item<int64_t>(), 17);
}

// A checkpoint of the earlier format (a LibTorch archive behind a "MATCKPT1" header: magic,
// length, checksum) is refused with a message that says so, not parsed.
TEST_F(CheckpointTest, TheEarlierArchiveFormatIsDataLossSayingSo) {
  WriteBytes(path_, std::string("MATCKPT1") + std::string(16, '\0') + "PK\x03\x04 an old archive");
  absl::Status st = ReadCheckpoint(path_).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr(path_));
  EXPECT_THAT(st.message(), HasSubstr("MATCKPT1"));
  EXPECT_THAT(st.message(), HasSubstr("earlier versions"));
}

// Files that are not safetensors, or not a MAT checkpoint: DATA_LOSS naming the path and what is
// wrong.
TEST_F(CheckpointTest, AMalformedFileIsDataLoss) {
  for (const std::string& payload :
       {std::string("short"), std::string("\x10\0\0\0\0\0\0\0{\"w\": 1}     "),
        std::string("\xff\xff\xff\xff\0\0\0\0{}")}) {
    WriteBytes(path_, payload);
    absl::Status st = ReadCheckpoint(path_).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_THAT(st.message(), HasSubstr(path_));
  }
  // Well-formed, but without the trainer's metadata.
  safetensors::File bare;
  auto bytes = safetensors::Serialize(bare);
  ASSERT_TRUE(bytes.ok());
  WriteBytes(path_, *bytes);
  absl::Status st = ReadCheckpoint(path_).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr("mat.meta"));
  // A tensor changed after the checksum was taken (a writer other than ours, or a bit flip that
  // keeps the file well-formed): the checksum says so.
  Checkpoint c;
  c.tensors["w"] = torch::ones({4});
  c.meta = "{}";
  ASSERT_TRUE(WriteCheckpoint(path_, c).ok());
  auto file = safetensors::ReadFile(path_);
  ASSERT_TRUE(file.ok());
  file->tensors.at("w").data[0] ^= 0x01;
  ASSERT_TRUE(safetensors::WriteFile(path_, *file).ok());
  st = ReadCheckpoint(path_).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr("checksum mismatch"));
}

TEST_F(CheckpointTest, ATensorSafetensorsCannotHoldIsInvalidArgumentNamingIt) {
  Checkpoint c;
  c.tensors["z"] = torch::zeros({2}, torch::kComplexFloat);
  c.meta = "{}";
  absl::Status st = WriteCheckpoint(path_, c);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("'z'"));
  EXPECT_FALSE(fs::exists(path_));
}

}  // namespace
}  // namespace mat::trainer
