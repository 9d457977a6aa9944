// Tests of mat::worker's checkpoint files: round trip, the integrity envelope (truncation and
// corruption are DATA_LOSS naming the file), `.prev` rotation and LoadNewestCheckpoint's
// fallback, and the archive check that runs before LibTorch parses a payload (hostile records
// that crash LibTorch 1.13's loader are DATA_LOSS instead).
#include "worker/checkpoint.h"

#include <unistd.h>

#include <filesystem>
#include <map>
#include <fstream>
#include <sstream>
#include <string>

#include <caffe2/serialize/inline_container.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "absl/strings/str_replace.h"

namespace mat::worker {
namespace {

namespace fs = std::filesystem;
using ::testing::AnyOf;
using ::testing::HasSubstr;

constexpr size_t kHeaderBytes = 24;  // magic (8) | payload length (8) | FNV-1a (8)

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
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "mat_checkpoint_test_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/checkpoint.pt";
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // A checkpoint holding tensor "w" = `w` and the integer "step" = `step`.
  absl::Status Write(const std::string& path, const torch::Tensor& w, int64_t step) {
    torch::serialize::OutputArchive ar;
    ar.write("w", w);
    ar.write("step", c10::IValue(step));
    return WriteCheckpoint(path, ar);
  }
  // Reads "w" and "step" back from a loaded archive.
  static void ReadBack(torch::serialize::InputArchive& ar, torch::Tensor* w, int64_t* step) {
    ar.read("w", *w);
    c10::IValue v;
    ar.read("step", v);
    *step = v.toInt();
  }

  std::string dir_, path_;
};

TEST_F(CheckpointTest, RoundTripsTensorsExactly) {
  torch::manual_seed(0);
  const torch::Tensor w = torch::randn({7, 5}, torch::kFloat64);
  ASSERT_TRUE(Write(path_, w, 42).ok());
  EXPECT_FALSE(fs::exists(path_ + ".prev")) << "no previous checkpoint to keep";
  const std::string data = ReadBytes(path_);
  ASSERT_GE(data.size(), kHeaderBytes);
  EXPECT_EQ(data.substr(0, 8), "MATCKPT1");

  torch::serialize::InputArchive ar;
  absl::Status st = ReadCheckpoint(path_, ar);
  ASSERT_TRUE(st.ok()) << st;
  torch::Tensor got;
  int64_t step = 0;
  ReadBack(ar, &got, &step);
  EXPECT_TRUE(torch::equal(got, w));
  EXPECT_EQ(got.dtype(), torch::kFloat64);
  EXPECT_EQ(step, 42);
}

TEST_F(CheckpointTest, HeaderStatesPayloadLength) {
  ASSERT_TRUE(Write(path_, torch::arange(10), 1).ok());
  const std::string data = ReadBytes(path_);
  ASSERT_GE(data.size(), kHeaderBytes);
  uint64_t len = 0;
  for (int i = 0; i < 8; ++i) len |= uint64_t(static_cast<unsigned char>(data[8 + i])) << (8 * i);
  EXPECT_EQ(len, data.size() - kHeaderBytes);
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
  torch::serialize::InputArchive ar;
  absl::Status st = ReadCheckpoint(path_, ar);
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
    torch::serialize::InputArchive ar;
    absl::Status st = ReadCheckpoint(path_, ar);
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
  torch::serialize::InputArchive ar;
  absl::Status st = ReadCheckpoint(path_, ar);
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
  torch::serialize::InputArchive ar;
  absl::Status st = ReadCheckpoint(path_, ar);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
}

TEST_F(CheckpointTest, WrongMagicIsDataLoss) {
  ASSERT_TRUE(Write(path_, torch::ones({4}), 1).ok());
  std::string data = ReadBytes(path_);
  data[0] = 'X';
  WriteBytes(path_, data);
  torch::serialize::InputArchive ar;
  absl::Status st = ReadCheckpoint(path_, ar);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr(path_));
}

TEST_F(CheckpointTest, MissingFileIsAnErrorNamingThePath) {
  torch::serialize::InputArchive ar;
  absl::Status st = ReadCheckpoint(path_, ar);
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
    torch::serialize::InputArchive ar;
    ASSERT_TRUE(ReadCheckpoint(path_, ar).ok());
    ReadBack(ar, &w, &step);
    EXPECT_EQ(step, 2);
    EXPECT_TRUE(torch::equal(w, torch::full({3}, 2.0)));
  }
  {
    torch::serialize::InputArchive ar;
    ASSERT_TRUE(ReadCheckpoint(path_ + ".prev", ar).ok());
    ReadBack(ar, &w, &step);
    EXPECT_EQ(step, 1);
    EXPECT_TRUE(torch::equal(w, torch::full({3}, 1.0)));
  }
  // A third write rotates again: .prev now holds the second.
  ASSERT_TRUE(Write(path_, torch::full({3}, 3.0), 3).ok());
  torch::serialize::InputArchive ar;
  ASSERT_TRUE(ReadCheckpoint(path_ + ".prev", ar).ok());
  ReadBack(ar, &w, &step);
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
  torch::serialize::OutputArchive ar;
  ar.write("w", torch::ones({2}));
  absl::Status st = WriteCheckpoint(dir_ + "/no/such/dir/checkpoint.pt", ar);
  EXPECT_FALSE(st.ok());
}

TEST_F(CheckpointTest, LoadNewestLoadsTheNewestWithoutWarning) {
  ASSERT_TRUE(Write(path_, torch::full({2}, 1.0), 1).ok());
  ASSERT_TRUE(Write(path_, torch::full({2}, 2.0), 2).ok());
  torch::serialize::InputArchive ar;
  std::string warning = "stale";
  auto used = LoadNewestCheckpoint(path_, ar, &warning);
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
  torch::serialize::InputArchive ar;
  std::string warning;
  auto used = LoadNewestCheckpoint(path_, ar, &warning);
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
  torch::serialize::InputArchive ar;
  std::string warning;
  auto used = LoadNewestCheckpoint(path_, ar, &warning);
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
  torch::serialize::InputArchive ar;
  std::string warning;
  auto used = LoadNewestCheckpoint(path_, ar, &warning);
  ASSERT_FALSE(used.ok());
  EXPECT_EQ(used.status().code(), absl::StatusCode::kDataLoss) << used.status();
  EXPECT_THAT(used.status().message(), HasSubstr("truncated"));
  EXPECT_THAT(used.status().message(), HasSubstr("corrupt"));
  EXPECT_THAT(used.status().message(), HasSubstr(path_ + ".prev"));
}

TEST_F(CheckpointTest, LoadNewestFailsWhenNeitherExists) {
  torch::serialize::InputArchive ar;
  std::string warning;
  auto used = LoadNewestCheckpoint(path_, ar, &warning);
  ASSERT_FALSE(used.ok());
  EXPECT_THAT(used.status().message(), HasSubstr(path_));
}

// The archive inside a checkpoint file, record by record (names without the "archive/" folder).
std::map<std::string, std::string> Records(const std::string& file) {
  const std::string payload = ReadBytes(file).substr(kHeaderBytes);
  std::istringstream in(payload);
  caffe2::serialize::PyTorchStreamReader reader(&in);
  std::map<std::string, std::string> records;
  for (const std::string& name : reader.getAllRecords()) {
    auto [data, size] = reader.getRecord(name);
    records[name] = std::string(static_cast<const char*>(data.get()), size);
  }
  return records;
}

// Writes `records` as a checkpoint file (a new zip, wrapped in a valid envelope).
void WriteRecords(const std::string& file, const std::map<std::string, std::string>& records) {
  std::string zip;
  {
    caffe2::serialize::PyTorchStreamWriter writer([&zip](const void* p, size_t n) {
      zip.append(static_cast<const char*>(p), n);
      return n;
    });
    for (const auto& [name, data] : records) {
      if (name != "version") writer.writeRecord(name, data.data(), data.size());
    }
    writer.writeEndOfFile();
  }
  WriteBytes(file, MakeEnvelope(zip));
}

// Re-wraps `payload` (a zip, edited in place) in a valid envelope.
void WritePayload(const std::string& file, const std::string& payload) {
  WriteBytes(file, MakeEnvelope(payload));
}

// The byte offset of `name`'s entry in the zip's central directory.
size_t DirectoryEntry(const std::string& zip, const std::string& name) {
  size_t at = 0;
  while ((at = zip.find("PK\x01\x02", at)) != std::string::npos) {
    if (zip.compare(at + 46, name.size(), name) == 0) return at;
    ++at;
  }
  ADD_FAILURE() << "no directory entry " << name;
  return 0;
}

void PutLe32(std::string& s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) s[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

absl::Status ReadStatus(const std::string& file) {
  torch::serialize::InputArchive ar;
  return ReadCheckpoint(file, ar);
}

TEST_F(CheckpointTest, TheUneditedRecordsRewrittenStillLoad) {
  ASSERT_TRUE(Write(path_, torch::arange(6.0), 5).ok());
  WriteRecords(path_, Records(path_));
  torch::serialize::InputArchive ar;
  absl::Status st = ReadCheckpoint(path_, ar);
  ASSERT_TRUE(st.ok()) << st;
  torch::Tensor w;
  int64_t step = 0;
  ReadBack(ar, &w, &step);
  EXPECT_TRUE(torch::equal(w, torch::arange(6.0)));
  EXPECT_EQ(step, 5);
}

// LibTorch 1.13's class parser dereferences null on a broken annotation (the fuzzer's SEGV).
TEST_F(CheckpointTest, AMutatedAnnotationIsDataLossNamingTheLine) {
  ASSERT_TRUE(Write(path_, torch::ones({3}), 1).ok());
  auto records = Records(path_);
  std::string& code = records["code/__torch__.py"];
  ASSERT_THAT(code, HasSubstr("w : Tensor\n"));
  code = absl::StrReplaceAll(code, {{"w : Tensor\n", "w : Tensor[\n"}});
  WriteRecords(path_, records);
  absl::Status st = ReadStatus(path_);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr(path_));
  EXPECT_THAT(st.message(), HasSubstr("code/__torch__.py line 4"));
}

// One BINPUT id of 2^31 - 1 made LibTorch 1.13's unpickler resize its memo to 18 GB.
TEST_F(CheckpointTest, AHugeMemoIdIsDataLoss) {
  ASSERT_TRUE(Write(path_, torch::ones({3}), 1).ok());
  auto records = Records(path_);
  std::string& pkl = records["data.pkl"];
  const size_t at = pkl.find(std::string("q\x00", 2));
  ASSERT_NE(at, std::string::npos);
  pkl.replace(at, 2, std::string("r\xff\xff\xff\x7f", 5));
  WriteRecords(path_, records);
  absl::Status st = ReadStatus(path_);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr("data.pkl"));
  EXPECT_THAT(st.message(), HasSubstr("memo id 2147483647"));
}

// LibTorch 1.13 does not check that a storage record holds the bytes its tensor needs.
TEST_F(CheckpointTest, AShortStorageRecordIsDataLoss) {
  ASSERT_TRUE(Write(path_, torch::ones({16}), 1).ok());
  auto records = Records(path_);
  ASSERT_EQ(records["data/0"].size(), 16 * sizeof(float));
  records["data/0"].resize(10);
  WriteRecords(path_, records);
  absl::Status st = ReadStatus(path_);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr("data/0"));
  EXPECT_THAT(st.message(), HasSubstr("10 bytes"));
}

TEST_F(CheckpointTest, ARecordTheWriterNeverMakesIsDataLoss) {
  ASSERT_TRUE(Write(path_, torch::ones({3}), 1).ok());
  auto records = Records(path_);
  records["code/__torch__/other.py"] = "class Other(Module):\n  pass\n";
  WriteRecords(path_, records);
  absl::Status st = ReadStatus(path_);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(st.message(), HasSubstr("code/__torch__/other.py"));
}

// LibTorch allocates the size a directory entry states before it reads the record.
TEST_F(CheckpointTest, ADirectoryEntryClaimingGigabytesIsDataLoss) {
  ASSERT_TRUE(Write(path_, torch::ones({3}), 1).ok());
  const std::string good = ReadBytes(path_).substr(kHeaderBytes);
  {
    // The deflated class source claiming 4 GB.
    std::string zip = good;
    PutLe32(zip, DirectoryEntry(zip, "archive/code/__torch__.py") + 24, 0xfffffff0u);
    WritePayload(path_, zip);
    absl::Status st = ReadStatus(path_);
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_THAT(st.message(), HasSubstr("archive/code/__torch__.py"));
  }
  {
    // A tensor record marked deflated, so miniz would not compare its two sizes.
    std::string zip = good;
    const size_t entry = DirectoryEntry(zip, "archive/data/0");
    zip[entry + 10] = 8;
    PutLe32(zip, entry + 24, 0xfffffff0u);
    WritePayload(path_, zip);
    absl::Status st = ReadStatus(path_);
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_THAT(st.message(), HasSubstr("archive/data/0 is compressed"));
  }
  {
    // A stored record saying it holds more than the archive.
    std::string zip = good;
    const size_t entry = DirectoryEntry(zip, "archive/data/0");
    PutLe32(zip, entry + 20, 0x7ffffff0u);
    PutLe32(zip, entry + 24, 0x7ffffff0u);
    WritePayload(path_, zip);
    absl::Status st = ReadStatus(path_);
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_THAT(st.message(), HasSubstr("past the end of the archive"));
  }
}

// What mat::worker::Trainer writes: dotted parameter and buffer names, a string, a byte tensor
// (the generator state), a 0-dim integer tensor, doubles and bools.
TEST_F(CheckpointTest, AnArchiveShapedLikeTheTrainersRoundTrips) {
  torch::manual_seed(3);
  const torch::Tensor weight = torch::randn({4, 3});
  const torch::Tensor mean = torch::randn({3}).to(torch::kFloat64);
  const torch::Tensor state = at::detail::getDefaultCPUGenerator().get_state();
  const torch::Tensor count = torch::tensor(int64_t{17});
  const torch::Tensor view = torch::randn({6, 5}).slice(1, 1, 4);  // offset and strides
  {
    torch::serialize::OutputArchive out;
    out.write("model.encoder.0.weight", weight);
    out.write("buffer.bn.running_mean", mean, /*is_buffer=*/true);
    out.write("adam.step", count);
    out.write("view", view);
    out.write("meta", c10::IValue(std::string(R"({"step": 3, "name": "a \"quoted\" run"})")));
    out.write("lr", c10::IValue(0.25));
    out.write("warm", c10::IValue(true));
    out.write("rng.torch", state);
    ASSERT_TRUE(WriteCheckpoint(path_, out).ok());
  }
  torch::serialize::InputArchive in;
  absl::Status st = ReadCheckpoint(path_, in);
  ASSERT_TRUE(st.ok()) << st;
  // InputArchive::read into a defined tensor copies into it; read each into a fresh one.
  const auto read = [&in](const std::string& key, bool is_buffer = false) {
    torch::Tensor t;
    in.read(key, t, is_buffer);
    return t;
  };
  EXPECT_TRUE(torch::equal(read("model.encoder.0.weight"), weight));
  EXPECT_TRUE(torch::equal(read("buffer.bn.running_mean", true), mean));
  EXPECT_EQ(read("adam.step").item<int64_t>(), 17);
  EXPECT_TRUE(torch::equal(read("view"), view));
  EXPECT_TRUE(torch::equal(read("rng.torch"), state));
  c10::IValue v;
  in.read("meta", v);
  EXPECT_EQ(v.toStringRef(), R"({"step": 3, "name": "a \"quoted\" run"})");
  in.read("lr", v);
  EXPECT_EQ(v.toDouble(), 0.25);
  in.read("warm", v);
  EXPECT_TRUE(v.toBool());
}

}  // namespace
}  // namespace mat::worker
