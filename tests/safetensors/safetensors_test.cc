// safetensors/: byte layout as the format states it, round trips of every dtype, and every way a
// truncated or hostile file is refused with a message naming what is wrong.
#include "safetensors/safetensors.h"

#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mat::safetensors {
namespace {

using ::testing::HasSubstr;

std::string Le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A file from a header text and a buffer, as a hostile writer would make it.
std::string Raw(const std::string& header, const std::string& buffer) {
  return Le64(header.size()) + header + buffer;
}

std::string Floats(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), v.begin(), s.size());
  return s;
}

TEST(SafetensorsTest, LayoutIsTheFormats) {
  File f;
  f.metadata["format"] = "pt";
  f.tensors["b"] = Tensor{DType::kF32, {2}, Floats({1.5f, -2.f})};
  f.tensors["a"] = Tensor{DType::kU8, {1, 3}, std::string("\x01\x02\x03", 3)};
  auto bytes = Serialize(f);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"U8","shape":[1,3],"data_offsets":[0,3]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[3,11]}})";
  const std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  EXPECT_EQ(*bytes, Le64(padded.size()) + padded + "\x01\x02\x03" + Floats({1.5f, -2.f}));
  EXPECT_EQ((bytes->size() - 11) % 8, 0u) << "the buffer starts 8-byte aligned";
}

TEST(SafetensorsTest, EveryDTypeRoundTripsThroughAFile) {
  File f;
  f.metadata["step"] = "1200";
  f.metadata["quote\"and\nnewline"] = "λ";
  const DType all[] = {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kI64,
                       DType::kI32, DType::kI16, DType::kI8,  DType::kU8,   DType::kBool};
  int i = 0;
  for (DType d : all) {
    const std::vector<int64_t> shape = {2, 3};
    std::string data(6 * DTypeSize(d), '\0');
    for (size_t b = 0; b < data.size(); ++b) data[b] = static_cast<char>(b * 7 + i);
    f.tensors["t." + std::string(DTypeName(d))] = Tensor{d, shape, data};
    EXPECT_EQ(*ParseDType(DTypeName(d)), d);
    ++i;
  }
  f.tensors["scalar"] = Tensor{DType::kF32, {}, Floats({3.f})};
  f.tensors["empty"] = Tensor{DType::kF32, {0, 4}, ""};
  char tmpl[] = "/tmp/mat_safetensors_XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string path = std::string(tmpl) + "/model.safetensors";
  ASSERT_TRUE(WriteFile(path, f).ok());
  auto back = ReadFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->metadata, f.metadata);
  ASSERT_EQ(back->tensors.size(), f.tensors.size());
  for (const auto& [name, t] : f.tensors) {
    const Tensor& u = back->tensors.at(name);
    EXPECT_EQ(u.dtype, t.dtype) << name;
    EXPECT_EQ(u.shape, t.shape) << name;
    EXPECT_EQ(u.data, t.data) << name;
  }
  std::filesystem::remove_all(tmpl);
  EXPECT_EQ(ReadFile(path).status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, EveryTruncationIsRefusedNamingTheFile) {
  File f;
  f.tensors["w"] = Tensor{DType::kF32, {3}, Floats({1.f, 2.f, 3.f})};
  f.tensors["v"] = Tensor{DType::kI64, {1}, std::string(8, '\x05')};
  const std::string bytes = *Serialize(f);
  ASSERT_TRUE(Parse(bytes, "m.safetensors").ok());
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto r = Parse(std::string_view(bytes).substr(0, n), "m.safetensors");
    ASSERT_FALSE(r.ok()) << "accepted the first " << n << " of " << bytes.size() << " bytes";
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(r.status().message(), HasSubstr("m.safetensors: not a valid safetensors file"));
  }
  EXPECT_THAT(Parse(bytes.substr(0, 5), "m").status().message(), HasSubstr("only 5 bytes"));
  EXPECT_THAT(Parse(bytes.substr(0, bytes.size() - 1), "m").status().message(),
              HasSubstr("outside the"));
}

TEST(SafetensorsTest, HostileHeadersAreRefusedNamingWhatIsWrong) {
  const std::string f8 = Floats({1.f, 2.f});
  struct Case {
    std::string bytes, message;
  } cases[] = {
      {Le64(1ull << 40) + "{}", "over 100 MB"},
      {Le64(64) + "{}", "runs past the end"},
      {Raw("[1,2]", ""), "not a JSON object"},
      {Raw("{\"a\":", ""), "not a JSON object"},
      {Raw(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", f8), "tensor 'w': no dtype"},
      {Raw(R"({"w":{"dtype":"F128","shape":[2],"data_offsets":[0,8]}})", f8), "'F128'"},
      {Raw(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f8), "non-negative"},
      {Raw(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", f8), "data_offsets"},
      {Raw(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", f8),
       "tensor 'w': 8 bytes for F32 [3]"},
      {Raw(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", f8), "outside"},
      {Raw(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
           R"("v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", f8), "overlapping"},
      {Raw(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f8), "hole"},
      {Raw(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", f8), "4 bytes after"},
      {Raw(R"({"__metadata__":{"k":1}})", ""), "__metadata__ 'k' is not a string"},
      {Raw(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", f8),
       "tensor 'w'"},
  };
  for (const Case& c : cases) {
    auto r = Parse(c.bytes, "x.safetensors");
    ASSERT_FALSE(r.ok()) << c.message;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << c.message;
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
  }
}

TEST(SafetensorsTest, SerializeRefusesDataThatDoesNotFitItsShape) {
  File f;
  f.tensors["w"] = Tensor{DType::kF32, {3}, Floats({1.f, 2.f})};
  auto r = Serialize(f);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(),
              HasSubstr("tensor 'w': 8 bytes of data for F32 [3] (12 bytes)"));
  File g;
  g.tensors["__metadata__"] = Tensor{DType::kU8, {0}, ""};
  EXPECT_THAT(Serialize(g).status().message(), HasSubstr("reserved"));
  EXPECT_THAT(ParseDType("f32").status().message(), HasSubstr("unknown safetensors dtype 'f32'"));
}

}  // namespace
}  // namespace mat::safetensors
