#include "worker/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <filesystem>
#include <sstream>

#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>

#include "common/file_util.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "worker/archive_check.h"

namespace mat::worker {
namespace {

constexpr char kMagic[8] = {'M', 'A', 'T', 'C', 'K', 'P', 'T', '1'};
constexpr size_t kHeader = 24;

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

// The payload in memory, for LibTorch's zip reader (no copy).
class StringAdapter : public caffe2::serialize::ReadAdapterInterface {
 public:
  explicit StringAdapter(absl::string_view data) : data_(data) {}
  size_t size() const override { return data_.size(); }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= data_.size()) return 0;
    n = std::min<uint64_t>(n, data_.size() - pos);
    std::memcpy(buf, data_.data() + pos, n);
    return n;
  }

 private:
  absl::string_view data_;
};

// Verifies the archive in `payload` (worker/archive_check.h) through the zip reader LibTorch's
// loader uses, so that both see the same records.
absl::Status CheckPayload(absl::string_view payload) {
  MAT_ASSIGN_OR_RETURN(const auto sizes, CheckZipDirectory(payload));
  try {
    caffe2::serialize::PyTorchStreamReader reader(std::make_shared<StringAdapter>(payload));
    ArchiveRecords records;
    records.names = reader.getAllRecords();
    records.read = [&reader](const std::string& name) -> absl::StatusOr<std::string> {
      try {
        auto [data, size] = reader.getRecord(name);
        return std::string(static_cast<const char*>(data.get()), size);
      } catch (const c10::Error& e) {
        return absl::DataLossError("record " + name + " cannot be read: " + e.what_without_backtrace());
      }
    };
    records.size = [&sizes](const std::string& name) -> absl::StatusOr<uint64_t> {
      const auto it = sizes.find(name);
      if (it == sizes.end()) return absl::DataLossError("record " + name + " is not in the zip directory");
      return it->second;
    };
    return CheckArchiveRecords(records);
  } catch (const c10::Error& e) {
    return absl::DataLossError(std::string("not a LibTorch archive: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return absl::DataLossError(std::string("not a LibTorch archive: ") + e.what());
  }
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

absl::Status WriteCheckpoint(const std::string& path, torch::serialize::OutputArchive& archive) {
  std::ostringstream payload_stream;
  try {
    archive.save_to(payload_stream);
  } catch (const c10::Error& e) {
    return absl::InternalError("cannot serialise checkpoint: " + std::string(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError("cannot serialise checkpoint: " + std::string(e.what()));
  }
  const std::string data = MakeEnvelope(payload_stream.str());
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

absl::Status ReadCheckpoint(const std::string& path, torch::serialize::InputArchive& archive) {
  MAT_ASSIGN_OR_RETURN(std::string data, common::ReadFile(path));
  MAT_ASSIGN_OR_RETURN(std::string payload, ParseEnvelope(data, path));
  data.clear();
  data.shrink_to_fit();
  if (absl::Status st = CheckPayload(payload); !st.ok()) {
    return absl::DataLossError("checkpoint " + path + " is malformed: " +
                               std::string(st.message()));
  }
  try {
    archive.load_from(payload.data(), payload.size());
  } catch (const c10::Error& e) {
    return absl::DataLossError("checkpoint " + path + " cannot be read: " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return absl::DataLossError("checkpoint " + path + " cannot be read: " + e.what());
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> LoadNewestCheckpoint(const std::string& path,
                                                 torch::serialize::InputArchive& archive,
                                                 std::string* warning) {
  absl::Status newest = ReadCheckpoint(path, archive);
  if (newest.ok()) {
    if (warning) warning->clear();
    return path;
  }
  const std::string prev = path + ".prev";
  absl::Status older = ReadCheckpoint(prev, archive);
  if (older.ok()) {
    if (warning) *warning = std::string(newest.message());
    return prev;
  }
  return absl::DataLossError(std::string(newest.message()) + "; previous: " + std::string(older.message()));
}

absl::StatusOr<int64_t> ReadCheckpointStep(const std::string& path) {
  torch::serialize::InputArchive archive;
  MAT_RETURN_IF_ERROR(ReadCheckpoint(path, archive));
  try {
    c10::IValue meta;
    archive.read("meta", meta);
    const nlohmann::json json = nlohmann::json::parse(meta.toStringRef());
    return json.at("step").get<int64_t>();
  } catch (const c10::Error& e) {
    return absl::DataLossError("checkpoint " + path + " has no metadata: " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return absl::DataLossError("checkpoint " + path + " has malformed metadata: " + e.what());
  }
}

}  // namespace mat::worker
