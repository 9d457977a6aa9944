#include "safetensors/safetensors.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "nlohmann/json.hpp"

namespace mat::safetensors {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DTypeInfo {
  DType dtype;
  const char* name;
  int64_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kF64, "F64", 8}, {DType::kF32, "F32", 4}, {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2}, {DType::kI8, "I8", 1}, {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1}};

const DTypeInfo& Info(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d;
  }
  return kDTypes[1];
}

// product(shape) * size, or -1 on a negative dimension or an overflow past 2^62.
int64_t ByteSize(const std::vector<int64_t>& shape, int64_t size) {
  int64_t n = size;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > (int64_t{1} << 62) / d) return -1;
    n *= d;
  }
  return n;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
}

}  // namespace

std::string_view DTypeName(DType dtype) { return Info(dtype).name; }

int64_t DTypeSize(DType dtype) { return Info(dtype).size; }

absl::StatusOr<DType> ParseDType(std::string_view name) {
  for (const auto& d : kDTypes) {
    if (name == d.name) return d.dtype;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown safetensors dtype '", std::string(name), "'"));
}

absl::StatusOr<std::string> Serialize(const File& file) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!file.metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : file.metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  int64_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    if (name.empty() || name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat("tensor name '", name, "' is reserved"));
    }
    const int64_t bytes = ByteSize(t.shape, DTypeSize(t.dtype));
    if (bytes < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "': bad shape ", ShapeText(t.shape)));
    }
    if (bytes != static_cast<int64_t>(t.data.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "': ", t.data.size(), " bytes of data for ",
          std::string(DTypeName(t.dtype)), " ",
          ShapeText(t.shape), " (", bytes, " bytes)"));
    }
    header[name] = {{"dtype", std::string(DTypeName(t.dtype))},
                    {"shape", t.shape},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += text;
  out.reserve(out.size() + static_cast<size_t>(offset));
  for (const auto& [name, t] : file.tensors) out += t.data;
  return out;
}

absl::StatusOr<File> Parse(std::string_view bytes, std::string_view what) {
  auto bad = [&](const std::string& msg) {
    return absl::DataLossError(
        absl::StrCat(std::string(what), ": not a valid safetensors file: ", msg));
  };
  if (bytes.size() < 8) return bad(absl::StrCat("only ", bytes.size(), " bytes"));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  if (n > kMaxHeaderBytes) return bad(absl::StrCat("header length ", n, " is over 100 MB"));
  if (n > bytes.size() - 8) {
    return bad(absl::StrCat("header length ", n, " runs past the end (", bytes.size(),
                            " bytes; truncated?)"));
  }
  nlohmann::json header = nlohmann::json::parse(bytes.substr(8, n), nullptr, false);
  if (!header.is_object()) return bad("the header is not a JSON object");
  const std::string_view buffer = bytes.substr(8 + n);
  File file;
  struct Span {
    int64_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return bad("__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) return bad(absl::StrCat("__metadata__ '", k, "' is not a string"));
        file.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    // A copy: a lambda may not capture a structured binding before C++20 (clang refuses).
    const std::string tensor_name = name;
    auto bad_tensor = [&](const std::string& msg) {
      return bad(absl::StrCat("tensor '", tensor_name, "': ", msg));
    };
    if (!entry.is_object() || !entry.contains("dtype") || !entry["dtype"].is_string()) {
      return bad_tensor("no dtype");
    }
    auto dtype = ParseDType(entry["dtype"].get<std::string>());
    if (!dtype.ok()) return bad_tensor(std::string(dtype.status().message()));
    Tensor t;
    t.dtype = *dtype;
    if (!entry.contains("shape") || !entry["shape"].is_array()) return bad_tensor("no shape");
    for (const auto& d : entry["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return bad_tensor("shape is not a list of non-negative integers");
      }
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = entry.contains("data_offsets") ? entry["data_offsets"] : nlohmann::json();
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      return bad_tensor("data_offsets is not two non-negative integers");
    }
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > buffer.size()) {
      return bad_tensor(absl::StrCat("data_offsets [", begin, ", ", end, "] outside the ",
                                     buffer.size(), "-byte buffer (truncated?)"));
    }
    const int64_t want = ByteSize(t.shape, DTypeSize(t.dtype));
    if (want < 0 || static_cast<uint64_t>(want) != end - begin) {
      return bad_tensor(absl::StrCat(end - begin, " bytes for ",
                                     std::string(DTypeName(t.dtype)), " ",
                                     ShapeText(t.shape)));
    }
    t.data.assign(buffer.substr(begin, end - begin));
    spans.push_back({static_cast<int64_t>(begin), static_cast<int64_t>(end), name});
    file.tensors.emplace(name, std::move(t));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  int64_t at = 0;
  for (const Span& s : spans) {
    if (s.begin != at) {
      return bad(absl::StrCat("tensor '", s.name, "' starts at byte ", s.begin, " of the buffer, ",
                              s.begin < at ? "overlapping" : "leaving a hole after",
                              " the tensor before it (which ends at ", at, ")"));
    }
    at = s.end;
  }
  if (at != static_cast<int64_t>(buffer.size())) {
    return bad(absl::StrCat("the buffer has ", buffer.size() - at, " bytes after the last tensor"));
  }
  return file;
}

absl::Status WriteFile(const std::string& path, const File& file) {
  auto bytes = Serialize(file);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(), absl::StrCat(path, ": ", bytes.status().message()));
  }
  return common::WriteFileAtomic(path, *bytes);
}

absl::StatusOr<File> ReadFile(const std::string& path) {
  auto bytes = common::ReadFile(path);
  if (!bytes.ok()) return bytes.status();
  return Parse(*bytes, path);
}

}  // namespace mat::safetensors
