// The safetensors format (https://github.com/huggingface/safetensors), torch-free: what model
// artifacts and `model.init_from` files are written and read as, so that any safetensors loader
// (Python's `safetensors.torch.load_file`, Rust, JS) opens them.
//
// Layout: 8 bytes, little-endian u64 N; N bytes of JSON header (UTF-8, padded with spaces to a
// multiple of 8); then the data buffer. The header maps each tensor name to
//   {"dtype": "F32", "shape": [2, 3], "data_offsets": [BEGIN, END]}
// (byte offsets into the buffer, END - BEGIN = product(shape) * dtype size, little-endian,
// C order), and an optional "__metadata__" to an object of string values. Tensors lie in the
// buffer in name order, back to back: no holes, no overlaps (what Parse checks).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mat::safetensors {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

// "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL".
std::string_view DTypeName(DType dtype);
// INVALID_ARGUMENT naming `name` for anything else.
absl::StatusOr<DType> ParseDType(std::string_view name);
// Bytes per element.
int64_t DTypeSize(DType dtype);

struct Tensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // [] is a scalar
  std::string data;            // product(shape) * DTypeSize(dtype) bytes, little-endian, C order
};

struct File {
  std::map<std::string, std::string> metadata;  // "__metadata__"
  std::map<std::string, Tensor> tensors;        // by name
};

// The file's bytes. INVALID_ARGUMENT naming the tensor when a name is empty or "__metadata__",
// a dimension is negative, or its data's size does not match its dtype and shape.
absl::StatusOr<std::string> Serialize(const File& file);

// Parses a file's bytes; `what` (a path) starts every error message. DATA_LOSS naming what is
// wrong for: fewer than 8 bytes, a header length past the end or over 100 MB, a header that is
// not a JSON object, an entry without a known dtype / a shape of non-negative integers / two
// data offsets, offsets past the buffer or whose length does not match dtype and shape, tensors
// that overlap or leave holes in the buffer, or a buffer longer than its tensors; a non-string
// metadata value.
absl::StatusOr<File> Parse(std::string_view bytes, std::string_view what);

// Serialize, then written atomically (common::WriteFileAtomic).
absl::Status WriteFile(const std::string& path, const File& file);
// Reads and parses `path`; NOT_FOUND / errors of common::ReadFile, or Parse's.
absl::StatusOr<File> ReadFile(const std::string& path);

}  // namespace mat::safetensors
