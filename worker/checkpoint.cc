#include "worker/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <utility>

#include "common/file_util.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "safetensors/safetensors.h"
#include "worker/model_io.h"

namespace mat::worker {
namespace {

constexpr char kMagic[8] = {'M', 'A', 'T', 'C', 'K', 'P', 'T', '2'};
constexpr char kOldMagic[8] = {'M', 'A', 'T', 'C', 'K', 'P', 'T', '1'};
constexpr size_t kHeader = 24;
constexpr char kMetaKey[] = "mat.meta";

uint64_t Fnv1a(const char* p, size_t n) {
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<unsigned char>(p[i]);
    h *= 1099511628211ULL;
  }
  return h;
}

void PutU64(std::string& s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

}  // namespace

std::string MakeEnvelope(absl::string_view payload) {
  std::string data(kMagic, sizeof(kMagic));
  PutU64(data, payload.size());
  PutU64(data, Fnv1a(payload.data(), payload.size()));
  data.append(payload.data(), payload.size());
  return data;
}

absl::StatusOr<std::string> ParseEnvelope(absl::string_view data, const std::string& name) {
  if (data.size() >= sizeof(kOldMagic) &&
      std::memcmp(data.data(), kOldMagic, sizeof(kOldMagic)) == 0) {
    return absl::DataLossError("checkpoint " + name +
                               " is in the LibTorch-archive format of earlier versions "
                               "(MATCKPT1), which this version does not read; start the run "
                               "afresh, or resume it with the version that wrote it");
  }
  if (data.size() < kHeader || std::memcmp(data.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::DataLossError("checkpoint " + name + " is not a MAT checkpoint or is truncated (" +
                               std::to_string(data.size()) + " bytes)");
  }
  const uint64_t len = GetU64(data.data() + 8);
  if (data.size() - kHeader != len) {
    return absl::DataLossError("checkpoint " + name + " is truncated: header says " +
                               std::to_string(len) + " payload bytes, file has " +
                               std::to_string(data.size() - kHeader));
  }
  if (Fnv1a(data.data() + kHeader, len) != GetU64(data.data() + 16)) {
    return absl::DataLossError("checkpoint " + name + " is corrupt: checksum mismatch");
  }
  return std::string(data.substr(kHeader));
}

absl::Status WriteCheckpoint(const std::string& path, const Checkpoint& checkpoint) {
  safetensors::File file;
  file.metadata[kMetaKey] = checkpoint.meta;
  for (const auto& [name, tensor] : checkpoint.tensors) {
    absl::StatusOr<safetensors::Tensor> t = ToSafetensor(tensor);
    if (!t.ok()) return absl::InvalidArgumentError("checkpoint tensor '" + name + "': " + std::string(t.status().message()));
    file.tensors.emplace(name, *std::move(t));
  }
  MAT_ASSIGN_OR_RETURN(const std::string payload, safetensors::Serialize(file));
  const std::string data = MakeEnvelope(payload);
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
  MAT_ASSIGN_OR_RETURN(std::string payload, ParseEnvelope(data, path));
  data.clear();
  data.shrink_to_fit();
  absl::StatusOr<safetensors::File> file = safetensors::Parse(payload, "checkpoint " + path);
  if (!file.ok()) return absl::DataLossError(std::string(file.status().message()));
  Checkpoint out;
  const auto meta = file->metadata.find(kMetaKey);
  if (meta == file->metadata.end()) {
    return absl::DataLossError("checkpoint " + path + " has no \"" + kMetaKey + "\" metadata");
  }
  out.meta = meta->second;
  for (const auto& [name, tensor] : file->tensors) out.tensors.emplace(name, FromSafetensor(tensor));
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

}  // namespace mat::worker
