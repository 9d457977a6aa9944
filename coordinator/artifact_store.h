// ArtifactStore: the jobs' artifacts on the coordinator's disk, the files rank 0 uploads when its
// part of a job ends (service.proto UploadArtifact; matctl download reads them back through
// ListArtifacts and ReadArtifact). One manager for one concern: it knows files, not jobs; the
// Coordinator checks who may upload (Coordinator::CheckArtifactUpload) before a call gets here.
//
// Layout under `dir` (the daemon's --artifact-dir, default <state-dir>/artifacts):
//   <job_id>/<name>          a complete artifact: every byte arrived and its SHA-256 matched
//   <job_id>/<name>.part     an upload in progress: the bytes received so far, in order
//   <job_id>/MANIFEST.json   {"artifacts": {name: {"bytes", "sha256"}},
//                             "uploads": {name: {"bytes", "sha256"}}  (the expected file),
//                             "refused": ["why", ...]}, rewritten atomically when an upload
//                            starts, completes or is refused
// Everything survives a restart: Open reads every manifest, drops an artifact whose file is gone
// or has another size (logged), and takes an upload's progress from its .part file's size, so an
// interrupted upload resumes where the bytes on disk end. A manifest that is not a JSON object is
// set aside as MANIFEST.json.corrupt (logged); that job lists no artifacts.
//
// Limit: a job's artifacts (complete ones plus the expected sizes of its uploads in progress) take
// at most `max_bytes_per_job`; an upload that would pass it is refused RESOURCE_EXHAUSTED with a
// message naming the file, its size and the limit, which List reports as `refused`.
//
// Thread-safety: every method may be called from any thread (one mutex; file I/O happens under it,
// so callers run them on `executor()`, the store's own I/O thread, never on the coordinator loop
// or a gRPC thread), except JobBytes, which has its own lock and does no I/O. Not copyable.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <boost/asio/thread_pool.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "mat/v1/service.pb.h"

namespace mat::coordinator {

// What the coordinator's state says of a job whose folder the store finds at Open.
enum class KnownJob {
  kKnown,    // a job of the state: its files are loaded
  kUnknown,  // none (a replaced database): its folder is set aside
  kDeleted,  // deleted (DeleteJob) before its files went: its folder is removed
};

class ArtifactStore {
 public:
  // Creates `dir` (with parents), checks that it can write there (CheckWritableDir's error),
  // locks it (its LOCK file, held until the store is destroyed:
  // FAILED_PRECONDITION "'DIR' is in use by another coordinator" while another holds
  // it) and reads what it holds. `max_bytes_per_job` 0 = no limit. With `known_job`, the folder
  // of a job it answers kUnknown for (a state database that was replaced) is moved to
  // DIR/orphaned/JOB.UNIXSECONDS (logged), so that a new job with that id never serves or
  // mixes with its files, and the folder of one it answers kDeleted for (the coordinator stopped
  // between the job's delete and its files') is removed (logged), both after the lock is taken.
  static absl::StatusOr<std::unique_ptr<ArtifactStore>> Open(
      std::string dir, int64_t max_bytes_per_job,
      const std::function<KnownJob(const std::string& job_id)>& known_job = nullptr);
  ~ArtifactStore();  // waits for the I/O thread's queued work
  ArtifactStore(const ArtifactStore&) = delete;
  ArtifactStore& operator=(const ArtifactStore&) = delete;

  // One piece of an upload (see service.proto UploadArtifact): INVALID_ARGUMENT for a bad name,
  // job id, checksum or size, or a piece past total_bytes; RESOURCE_EXHAUSTED over the limit;
  // DATA_LOSS when the complete file's SHA-256 differs (the partial file is dropped); INTERNAL
  // for a failed write.
  absl::StatusOr<v1::UploadArtifactReply> Upload(const v1::UploadArtifactRequest& request);
  // The job's complete artifacts by name, the refusals, the total. A job with none: empty.
  absl::StatusOr<v1::ListArtifactsReply> List(const std::string& job_id) const;
  // A piece of a complete artifact: NOT_FOUND naming it when there is none, OUT_OF_RANGE for an
  // offset past its end.
  absl::StatusOr<v1::ReadArtifactReply> Read(const v1::ReadArtifactRequest& request) const;
  // Removes everything the store holds of the job (its folder, uploads in progress included)
  // and returns the size of the files removed, bytes (0: it held nothing). INVALID_ARGUMENT for a
  // job id that is not one path component; INTERNAL naming the folder when it cannot be removed.
  absl::StatusOr<int64_t> RemoveJob(const std::string& job_id);
  // The job's complete artifacts' bytes (0 for none). No I/O and never waits for it (its own
  // lock): the coordinator loop calls it for ListJobs and GetJob.
  int64_t JobBytes(const std::string& job_id) const;

  boost::asio::thread_pool& executor() { return io_; }
  const std::string& dir() const { return dir_; }

 private:
  struct FileInfo {
    int64_t bytes = 0;
    std::string sha256;
  };
  struct Partial {
    FileInfo expected;
    int64_t committed = 0;  // bytes in the .part file
  };
  struct Job {
    std::map<std::string, FileInfo> artifacts;
    std::map<std::string, Partial> uploads;
    std::vector<std::string> refused;
  };

  ArtifactStore(std::string dir, int64_t max_bytes_per_job);
  absl::Status Load(const std::function<KnownJob(const std::string& job_id)>& known_job);
  std::string JobDir(const std::string& job_id) const { return dir_ + "/" + job_id; }
  // Writes the job's MANIFEST.json (atomically). REQUIRES: mu_ held.
  absl::Status SaveManifest(const std::string& job_id, const Job& job) const;
  // Starts an upload of `name` (the limit check, an empty .part). REQUIRES: mu_ held.
  absl::Status StartUpload(const std::string& job_id, Job& job, const std::string& name,
                           const FileInfo& expected);
  // Publishes the job's complete bytes for JobBytes. REQUIRES: mu_ held.
  void PublishBytes(const std::string& job_id, const Job& job);
  // The .part is whole: checks its SHA-256 and renames it into place. REQUIRES: mu_ held.
  absl::Status CompleteUpload(const std::string& job_id, Job& job, const std::string& name);

  const std::string dir_;
  const int64_t max_bytes_per_job_;
  int lock_fd_ = -1;  // holds DIR/LOCK
  mutable std::mutex mu_;
  std::map<std::string, Job> jobs_;  // guarded by mu_
  mutable std::mutex bytes_mu_;      // after mu_ when both are held
  std::map<std::string, int64_t> job_bytes_;  // guarded by bytes_mu_
  boost::asio::thread_pool io_{1};
};

}  // namespace mat::coordinator
