// What the coordinator, the worker daemon and matctl agree on about a job's artifacts (the files
// rank 0 uploads when its part of a job ends; service.proto UploadArtifact, ListArtifacts,
// ReadArtifact): the rules for their names, the piece sizes, and their SHA-256 (OpenSSL).
//
// Thread-safety: free functions without shared state; Sha256 is a value type.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mat::api {

// A piece of an upload or a download, bytes: what a client sends or asks for.
inline constexpr int64_t kArtifactPieceBytes = 1 << 20;
// The largest piece either side accepts, bytes (under gRPC's 16 MiB message limit).
inline constexpr int64_t kMaxArtifactPieceBytes = 4 << 20;

// OK when `name` is a plain file name: 1 to 128 bytes of [A-Za-z0-9._-], not starting with '.'
// (so not "." or ".."), not ending in ".part" (the coordinator's partial files) and not starting
// with "MANIFEST.json" (the coordinator's manifest and its set-aside copies). Otherwise
// INVALID_ARGUMENT naming it: a name can never point outside the directory it is written to.
absl::Status CheckArtifactName(std::string_view name);

// The files rank 0 gives back, in upload order (worker/artifact_upload.h ArtifactNames): the
// only names UploadArtifact takes. The largest (the model) is last, so that a model over the
// coordinator's limit leaves the rest uploaded.
inline constexpr std::array<const char*, 6> kJobArtifactNames = {
    "job_spec.yaml", "summary.json",    "metrics.jsonl",
    "masks.jsonl",   "decisions.jsonl", "model.safetensors"};

// OK when `name` is one of kJobArtifactNames; otherwise INVALID_ARGUMENT naming it and the list.
absl::Status CheckJobArtifactName(std::string_view name);

// A streamed SHA-256 (also what a bearer token's client id is made from, coordinator/auth.h).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Add(std::string_view bytes);
  // The digest as 64 lowercase hex digits. Call once; nothing may be added after it.
  std::string Hex();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// SHA-256 of a file's bytes (64 lowercase hex) and its size; errors name the file.
struct FileDigest {
  int64_t bytes = 0;
  std::string sha256;
};
absl::StatusOr<FileDigest> DigestFile(const std::string& path);

// OK when `hex` is 64 lowercase hex digits; INVALID_ARGUMENT otherwise.
absl::Status CheckSha256Hex(std::string_view hex);

}  // namespace mat::api
