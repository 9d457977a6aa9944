#include "trainer/checkpoint/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <utility>

#include "common/file_util.h"
#include "common/fnv1a.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "safetensors/safetensors.h"
#include "trainer/models/model_io.h"

namespace mat::trainer {
namespace {

constexpr char kOldMagic[8] = {'M', 'A', 'T', 'C', 'K', 'P', 'T', '1'};
constexpr char kFormatKey[] = "mat.format";
constexpr char kFormat[] = "checkpoint-2";
constexpr char kMetaKey[] = "mat.meta";
constexpr char kChecksumKey[] = "mat.fnv1a";

// The checksum of `file`'s tensors (name, dtype, shape, bytes, in name order) and `meta`.
std::string Checksum(const safetensors::File& file, const std::string& meta) {
  common::Fnv1a64 f;
  for (const auto& [name, t] : file.tensors) {
    f.Add(name);
    f.Add(std::string(1, '\0'));
    f.Add(std::string(safetensors::DTypeName(t.dtype)));
    for (const int64_t d : t.shape) f.Add("," + std::to_string(d));
    f.Add(std::string(1, '\0'));
    f.Add(t.data);
  }
  f.Add(meta);
  return f.Hex();
}

}  // namespace

absl::Status WriteCheckpoint(const std::string& path, const Checkpoint& checkpoint) {
  safetensors::File file;
  for (const auto& [name, tensor] : checkpoint.tensors) {
    absl::StatusOr<safetensors::Tensor> t = ToSafetensor(tensor);
    if (!t.ok()) {
      return absl::InvalidArgumentError("checkpoint tensor '" + name +
                                        "': " + std::string(t.status().message()));
    }
    file.tensors.emplace(name, *std::move(t));
  }
  file.metadata[kFormatKey] = kFormat;
  file.metadata[kMetaKey] = checkpoint.meta;
  file.metadata[kChecksumKey] = Checksum(file, checkpoint.meta);
  MAT_ASSIGN_OR_RETURN(const std::string data, safetensors::Serialize(file));
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    // The current file becomes `.prev` through a second name (a hard link, or a copy where the
    // file system has none), so `path` exists at every moment: a crash anywhere in here leaves
    // a loadable `path`, and the rename below replaces it atomically.
    const std::string keep = path + ".prev.tmp";
    std::filesystem::remove(keep, ec);
    std::filesystem::create_hard_link(path, keep, ec);
    if (ec) {
      ec.clear();
      std::filesystem::copy_file(path, keep, std::filesystem::copy_options::overwrite_existing, ec);
    }
    if (!ec) std::filesystem::rename(keep, path + ".prev", ec);
    if (ec) return absl::InternalError("cannot keep previous checkpoint " + path + ": " + ec.message());
  }
  return common::WriteFileAtomic(path, data);
}

absl::StatusOr<Checkpoint> ReadCheckpoint(const std::string& path) {
  MAT_ASSIGN_OR_RETURN(std::string data, common::ReadFile(path));
  if (data.size() >= sizeof(kOldMagic) &&
      std::memcmp(data.data(), kOldMagic, sizeof(kOldMagic)) == 0) {
    return absl::DataLossError("checkpoint " + path +
                               " is in the LibTorch-archive format of earlier versions "
                               "(MATCKPT1), which this version does not read; start the run "
                               "afresh, or resume it with the version that wrote it");
  }
  absl::StatusOr<safetensors::File> file = safetensors::Parse(data, "");
  if (!file.ok()) {
    return absl::DataLossError("checkpoint " + path + " is truncated or corrupt" +
                               std::string(file.status().message()));
  }
  data.clear();
  data.shrink_to_fit();
  const auto meta = file->metadata.find(kMetaKey);
  const auto checksum = file->metadata.find(kChecksumKey);
  if (meta == file->metadata.end() || checksum == file->metadata.end()) {
    return absl::DataLossError("checkpoint " + path + " is corrupt or not a MAT checkpoint: no \"" +
                               (meta == file->metadata.end() ? kMetaKey : kChecksumKey) +
                               "\" metadata");
  }
  if (Checksum(*file, meta->second) != checksum->second) {
    return absl::DataLossError("checkpoint " + path + " is corrupt: checksum mismatch");
  }
  Checkpoint out;
  out.meta = meta->second;
  // Each tensor's bytes are freed once copied, so a large checkpoint is held about once.
  for (auto& [name, tensor] : file->tensors) {
    out.tensors.emplace(name, FromSafetensor(tensor));
    std::string().swap(tensor.data);
  }
  return out;
}

absl::StatusOr<std::string> LoadNewestCheckpoint(const std::string& path, Checkpoint* checkpoint,
                                                 std::string* warning) {
  absl::StatusOr<Checkpoint> newest = ReadCheckpoint(path);
  if (newest.ok()) {
    if (warning) warning->clear();
    *checkpoint = *std::move(newest);
    return path;
  }
  const std::string prev = path + ".prev";
  absl::StatusOr<Checkpoint> older = ReadCheckpoint(prev);
  if (older.ok()) {
    if (warning) *warning = std::string(newest.status().message());
    *checkpoint = *std::move(older);
    return prev;
  }
  return absl::DataLossError(std::string(newest.status().message()) + "; previous: " +
                             std::string(older.status().message()));
}

absl::StatusOr<int64_t> ReadCheckpointStep(const std::string& path) {
  MAT_ASSIGN_OR_RETURN(const Checkpoint checkpoint, ReadCheckpoint(path));
  try {
    const nlohmann::json json = nlohmann::json::parse(checkpoint.meta);
    return json.at("step").get<int64_t>();
  } catch (const std::exception& e) {
    return absl::DataLossError("checkpoint " + path + " has malformed metadata: " + e.what());
  }
}

}  // namespace mat::trainer
