// Verifies a LibTorch archive (what torch::serialize::OutputArchive writes: a zip of a TorchScript
// module holding named tensors and scalars) before LibTorch parses it, so that a corrupt or
// hostile checkpoint is a Status and never reaches LibTorch 1.13's loader paths that crash on bad
// input: its TorchScript class parser (SEGV on a mutated annotation or class constant), its
// unpickler (an 18 GB memo allocation from one BINPUT id, strings longer than the record) and its
// tensor rebuild (no check that a tensor's sizes and strides stay inside its storage, nor that
// the storage record holds the bytes the pickle claims). All three were found by
// fuzz/checkpoint_fuzzer.cc.
//
// What passes is exactly the subset the writer emits (no LibTorch here; the zip's directory is
// checked first (CheckZipDirectory: LibTorch allocates whatever size a directory entry states),
// then its records are read by the caller with LibTorch's own PyTorchStreamReader, so both see
// the same records):
//   code/__torch__.py   one class `Module(Module)`: `__parameters__` / `__buffers__` lists and
//                       one annotation per attribute, of type Tensor, int, float, bool or str;
//   data.pkl            pickle protocol 2, only the opcodes LibTorch's pickler writes, memo ids
//                       in order, every length inside the record, nesting depth <= 64; the value
//                       is that Module with exactly its annotated attributes, each of its type;
//                       a tensor is `_rebuild_tensor_v2(storage, offset, sizes, strides, ...)`
//                       whose elements all lie inside a storage whose record `data/<key>` holds
//                       at least numel * itemsize bytes;
//   constants.pkl       a tuple of such tensors (records `constants/<key>`);
//   code/__torch__.py.debug_pkl   the source-range table, every index inside it.
// Any other `.pkl` or `code/` record is refused; other records (`version`, PyTorch 2's
// `byteorder`, `.data/...`) are left to LibTorch.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mat::worker {

// The archive as its zip reader sees it. Record names are relative to the archive's top folder
// ("data.pkl", "data/0", "code/__torch__.py").
struct ArchiveRecords {
  std::vector<std::string> names;
  // A record's bytes (only the small ones are read: pickles, code, version).
  std::function<absl::StatusOr<std::string>(const std::string& name)> read;
  // A record's size in bytes (tensor data records), without reading it.
  std::function<absl::StatusOr<uint64_t>(const std::string& name)> size;
};

// OK when the archive is in the subset above; DATA_LOSS naming the record, the line or byte
// offset, and what is wrong, otherwise.
absl::Status CheckArchiveRecords(const ArchiveRecords& archive);

// One attribute of the archive's Module class.
struct ArchiveAttribute {
  std::string name;
  std::string type;  // "Tensor", "int", "float", "bool" or "str"
  bool parameter = false;
  bool buffer = false;
};

// Reads `zip`'s directory the way miniz (LibTorch's zip library) reads it, zip64 included, and
// returns each record's size by its name inside the archive's folder ("data/0" for
// "archive/data/0"). DATA_LOSS unless every entry is in one top folder, is stored uncompressed or,
// for `code/` records, deflated to at most 64 MiB (as the writer stores them), lies inside the
// archive, and no two share a name. LibTorch allocates a record's stated size before it reads it,
// so this runs before any record is read.
absl::StatusOr<std::map<std::string, uint64_t>> CheckZipDirectory(absl::string_view zip);

// Parses `code/__torch__.py` (the grammar in the header comment); DATA_LOSS naming the line.
absl::StatusOr<std::vector<ArchiveAttribute>> ParseArchiveClassSource(absl::string_view source);

}  // namespace mat::worker
