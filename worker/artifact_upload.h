// Rank 0's upload of a job's artifacts to the coordinator (service.proto UploadArtifact): the
// files of the rank's directory a user wants back, each sent in pieces with its SHA-256, resumed
// where the coordinator's bytes end after a broken call or a coordinator restart.
//
//   ArtifactNames      which files, in upload order: those of api::kJobArtifactNames
//                      (job_spec.yaml, summary.json, metrics.jsonl, masks.jsonl, decisions.jsonl,
//                      then model.safetensors) that the rank's directory holds.
//   ModelFromCheckpoint a job that ended without its final model (failed or cancelled after a
//                      checkpoint): the model tensors ("model.*", "buffer.*") of the newest
//                      checkpoint the checkpoint reader accepts (trainer/checkpoint/checkpoint.h
//                      LoadNewestCheckpoint: checksum, `.prev` fallback) as model.safetensors,
//                      with the checkpoint's step in its metadata.
//   UploadArtifactFile one file: asks how far the coordinator got (an empty piece), then sends
//                      pieces from there until the reply says complete. UNAVAILABLE and
//                      DEADLINE_EXCEEDED are retried every retry_interval until the deadline;
//                      DATA_LOSS (the coordinator's SHA-256 differed) restarts the file, twice at
//                      most; every other error ends the file's upload (RESOURCE_EXHAUSTED: over
//                      the coordinator's --max-artifact-bytes).
//
// Thread-safety: free functions; `call` is used from the calling thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "mat/v1/service.pb.h"

namespace mat::worker {

// One UploadArtifact call (the agent's stub with its join token and a per-call deadline).
using UploadArtifactCall =
    std::function<grpc::Status(const v1::UploadArtifactRequest&, v1::UploadArtifactReply*)>;

struct ArtifactUploadOptions {
  int64_t piece_bytes = 1 << 20;                  // bytes per piece, 1 .. 4 MiB
  std::chrono::milliseconds retry_interval{500};  // between retries of a failed call
  std::chrono::milliseconds deadline{600000};     // for all of a job's files together
};

// The artifact files present in `dir`, in upload order (see above).
std::vector<std::string> ArtifactNames(const std::string& dir);

// Writes `model_path` from the newest valid checkpoint `checkpoint_path` (or its .prev), with
// the metadata mat-train's model has: "format", "mat.step" (from the checkpoint) and `metadata`
// (the caller's "mat.model" and "mat.seed"), plus "mat.source": "checkpoint".
// NOT_FOUND when neither file exists; DATA_LOSS when neither is a valid checkpoint.
absl::Status ModelFromCheckpoint(const std::string& checkpoint_path, const std::string& model_path,
                                 const std::map<std::string, std::string>& metadata = {});

// Uploads `path` as artifact `name`; `identity` carries worker_id, job_id, rank and attempt.
// `stopped` is polled between calls (true: CANCELLED). Errors name the file.
absl::Status UploadArtifactFile(const UploadArtifactCall& call,
                                const v1::UploadArtifactRequest& identity,
                                const std::string& name, const std::string& path,
                                const ArtifactUploadOptions& options,
                                std::chrono::steady_clock::time_point deadline,
                                const std::function<bool()>& stopped);

}  // namespace mat::worker
