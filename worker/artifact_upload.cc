#include "worker/artifact_upload.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "api/artifacts.h"
#include "api/grpc_status.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "safetensors/safetensors.h"
#include "spdlog/spdlog.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/models/model_io.h"

namespace mat::worker {
namespace fs = std::filesystem;

std::vector<std::string> ArtifactNames(const std::string& dir) {
  std::vector<std::string> names;
  for (const char* name : api::kJobArtifactNames) {
    std::error_code ec;
    if (fs::is_regular_file(absl::StrCat(dir, "/", name), ec)) names.emplace_back(name);
  }
  return names;
}

absl::Status ModelFromCheckpoint(const std::string& checkpoint_path, const std::string& model_path,
                                 const std::map<std::string, std::string>& metadata) {
  std::error_code ec;
  if (!fs::exists(checkpoint_path, ec) && !fs::exists(checkpoint_path + ".prev", ec)) {
    return absl::NotFoundError(checkpoint_path + ": no checkpoint");
  }
  // The checkpoint reader's checks (checksum included) and its fallback to `.prev`.
  trainer::Checkpoint checkpoint;
  std::string warning;
  MAT_RETURN_IF_ERROR(
      trainer::LoadNewestCheckpoint(checkpoint_path, &checkpoint, &warning).status());
  if (!warning.empty()) spdlog::warn("model from the previous checkpoint: {}", warning);
  safetensors::File model;
  for (const auto& [name, tensor] : checkpoint.tensors) {
    for (const std::string prefix : {"model.", "buffer."}) {
      if (name.rfind(prefix, 0) != 0) continue;
      MAT_ASSIGN_OR_RETURN(model.tensors[name.substr(prefix.size())],
                           trainer::ToSafetensor(tensor));
    }
  }
  if (model.tensors.empty()) {
    return absl::DataLossError(absl::StrCat(checkpoint_path, ": holds no model tensors"));
  }
  for (const auto& [key, value] : metadata) model.metadata[key] = value;
  model.metadata["format"] = "pt";
  model.metadata["mat.source"] = "checkpoint";
  const nlohmann::json meta = nlohmann::json::parse(checkpoint.meta, nullptr, false);
  if (meta.is_object() && meta.contains("step")) {
    model.metadata["mat.step"] = meta["step"].dump();
  }
  return safetensors::WriteFile(model_path, model);
}

absl::Status UploadArtifactFile(const UploadArtifactCall& call,
                                const v1::UploadArtifactRequest& identity,
                                const std::string& name, const std::string& path,
                                const ArtifactUploadOptions& options,
                                std::chrono::steady_clock::time_point deadline,
                                const std::function<bool()>& stopped) {
  absl::StatusOr<api::FileDigest> digest = api::DigestFile(path);
  if (!digest.ok()) return digest.status();
  std::ifstream in(path, std::ios::binary);
  const int64_t piece = std::clamp<int64_t>(options.piece_bytes, 1, api::kMaxArtifactPieceBytes);
  v1::UploadArtifactRequest request = identity;
  request.set_name(name);
  request.set_total_bytes(digest->bytes);
  request.set_sha256(digest->sha256);
  request.set_offset(0);  // no data: how far did the coordinator get?
  int restarts = 0;
  bool said_resume = false;
  while (true) {
    if (stopped()) return absl::CancelledError(absl::StrCat("upload of ", name, " stopped"));
    v1::UploadArtifactReply reply;
    const absl::Status status = api::FromGrpcStatus(call(request, &reply));
    if (!status.ok()) {
      const bool again = status.code() == absl::StatusCode::kUnavailable ||
                         status.code() == absl::StatusCode::kDeadlineExceeded ||
                         (status.code() == absl::StatusCode::kDataLoss && ++restarts <= 2);
      if (!again || std::chrono::steady_clock::now() + options.retry_interval > deadline) {
        return absl::Status(status.code(),
                            absl::StrCat("upload of ", name, ": ", status.message()));
      }
      std::this_thread::sleep_for(options.retry_interval);
      request.set_offset(0);  // ask again where to go on
      request.clear_data();
      continue;
    }
    if (reply.complete()) return absl::OkStatus();
    const int64_t at = reply.committed_bytes();
    if (at < 0 || at >= digest->bytes) {  // complete would have been said at the end
      return absl::InternalError(absl::StrCat("upload of ", name, ": the coordinator holds ", at,
                                              " bytes of a ", digest->bytes, "-byte file"));
    }
    if (at > 0 && request.data().empty() && !said_resume) {
      said_resume = true;
      spdlog::info("resuming the upload of {} at byte {} of {}", name, at, digest->bytes);
    }
    std::string data(size_t(std::min(piece, digest->bytes - at)), '\0');
    in.clear();
    in.seekg(at);
    in.read(data.data(), std::streamsize(data.size()));
    if (in.gcount() != std::streamsize(data.size())) {
      return absl::DataLossError(absl::StrCat(path, ": changed while it was uploaded"));
    }
    request.set_offset(at);
    request.set_data(std::move(data));
  }
}

}  // namespace mat::worker
