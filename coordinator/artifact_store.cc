#include "coordinator/artifact_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/artifacts.h"
#include "common/file_util.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace fs = std::filesystem;
namespace {

constexpr const char* kManifest = "MANIFEST.json";
constexpr const char* kOrphaned = "orphaned";  // folders of jobs the state does not know

int64_t FileSize(const std::string& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  return ec ? -1 : static_cast<int64_t>(size);
}

std::string Size(int64_t bytes) { return absl::StrCat(bytes, " bytes"); }

// fsync of a complete upload's bytes; INTERNAL naming the file and the errno's text.
absl::Status SyncFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  const bool synced = ::fsync(fd) == 0;
  const int error = errno;
  ::close(fd);
  if (!synced) return absl::InternalError(absl::StrCat(path, ": fsync: ", std::strerror(error)));
  return absl::OkStatus();
}

}  // namespace

ArtifactStore::ArtifactStore(std::string dir, int64_t max_bytes_per_job)
    : dir_(std::move(dir)), max_bytes_per_job_(max_bytes_per_job) {}

ArtifactStore::~ArtifactStore() {
  io_.join();
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

absl::StatusOr<std::unique_ptr<ArtifactStore>> ArtifactStore::Open(
    std::string dir, int64_t max_bytes_per_job,
    const std::function<KnownJob(const std::string& job_id)>& known_job) {
  if (max_bytes_per_job < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-artifact-bytes must be >= 0, got ", max_bytes_per_job));
  }
  MAT_RETURN_IF_ERROR(common::MakeDirs(dir));
  // Otherwise every job's uploads fail, and `matctl download` says only "no artifacts".
  MAT_RETURN_IF_ERROR(common::CheckWritableDir(dir));
  std::unique_ptr<ArtifactStore> store(new ArtifactStore(std::move(dir), max_bytes_per_job));
  // Two coordinators on one artifact folder would serve each other's files under their own ids.
  MAT_ASSIGN_OR_RETURN(store->lock_fd_, common::LockDirectory(store->dir_, "coordinator"));
  MAT_RETURN_IF_ERROR(store->Load(known_job));
  return store;
}

absl::Status ArtifactStore::Load(
    const std::function<KnownJob(const std::string& job_id)>& known_job) {
  std::error_code ec;
  // Listed first: a folder may be moved aside below.
  std::vector<fs::directory_entry> entries;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir_, ec)) entries.push_back(entry);
  for (const fs::directory_entry& entry : entries) {
    const std::string job_id = entry.path().filename().string();
    if (!entry.is_directory() || !api::CheckArtifactName(job_id).ok() || job_id == kOrphaned) {
      continue;
    }
    const KnownJob known = known_job ? known_job(job_id) : KnownJob::kKnown;
    if (known == KnownJob::kDeleted) {
      std::error_code remove_error;
      fs::remove_all(entry.path(), remove_error);
      if (remove_error) {
        return absl::InternalError(absl::StrCat(entry.path().string(), ": the files of a deleted "
                                                "job; cannot remove them: ",
                                                remove_error.message()));
      }
      spdlog::info("artifacts: removed {}, the files of deleted job {}", entry.path().string(),
                   job_id);
      continue;
    }
    if (known == KnownJob::kUnknown) {
      const std::string aside =
          absl::StrCat(dir_, "/", kOrphaned, "/", job_id, ".", int64_t(std::time(nullptr)));
      std::error_code move_error;
      fs::create_directories(dir_ + "/" + kOrphaned, move_error);
      if (!move_error) fs::rename(entry.path(), aside, move_error);
      if (move_error) {
        return absl::InternalError(absl::StrCat(entry.path().string(), ": a job this state does "
                                                "not know; cannot set it aside: ",
                                                move_error.message()));
      }
      spdlog::warn("artifacts: {} belongs to a job this coordinator's state does not know (a "
                   "replaced database?); moved to {}",
                   entry.path().string(), aside);
      continue;
    }
    const std::string manifest_path = JobDir(job_id) + "/" + kManifest;
    absl::StatusOr<std::string> text = common::ReadFile(manifest_path);
    if (!text.ok()) continue;  // a job directory whose first upload never started
    const nlohmann::json m = nlohmann::json::parse(*text, nullptr, false);
    if (!m.is_object()) {
      // One job's damaged manifest used to keep the whole coordinator from starting.
      fs::rename(manifest_path, manifest_path + ".corrupt", ec);
      spdlog::error("artifacts of {}: {} is not a JSON object; set aside as {}.corrupt, the job "
                    "lists no artifacts until its rank 0 uploads again",
                    job_id, manifest_path, kManifest);
      ec.clear();
      continue;
    }
    Job job;
    auto read_info = [](const nlohmann::json& v, FileInfo* info) {
      if (!v.is_object() || !v.value("bytes", nlohmann::json()).is_number_integer() ||
          !v.value("sha256", nlohmann::json()).is_string()) {
        return false;
      }
      info->bytes = v["bytes"].get<int64_t>();
      info->sha256 = v["sha256"].get<std::string>();
      return info->bytes >= 0 && api::CheckSha256Hex(info->sha256).ok();
    };
    bool changed = false;
    // value() returns a copy: keep it alive while iterating.
    const nlohmann::json artifacts = m.value("artifacts", nlohmann::json::object());
    const nlohmann::json uploads = m.value("uploads", nlohmann::json::object());
    const nlohmann::json refused = m.value("refused", nlohmann::json::array());
    for (const auto& [name, v] : artifacts.items()) {
      FileInfo info;
      const int64_t on_disk = FileSize(JobDir(job_id) + "/" + name);
      if (!api::CheckArtifactName(name).ok() || !read_info(v, &info) || on_disk != info.bytes) {
        spdlog::warn("artifacts of {}: dropping {} (its file is missing or has another size)",
                     job_id, name);
        changed = true;
        continue;
      }
      job.artifacts[name] = info;
    }
    for (const auto& [name, v] : uploads.items()) {
      Partial up;
      if (!api::CheckArtifactName(name).ok() || !read_info(v, &up.expected)) continue;
      up.committed = std::max<int64_t>(0, FileSize(JobDir(job_id) + "/" + name + ".part"));
      if (up.committed > up.expected.bytes) {  // cannot be a prefix of the expected file
        fs::remove(JobDir(job_id) + "/" + name + ".part", ec);
        changed = true;
        continue;
      }
      job.uploads[name] = up;
    }
    for (const auto& r : refused) {
      if (r.is_string()) job.refused.push_back(r.get<std::string>());
    }
    if (changed) MAT_RETURN_IF_ERROR(SaveManifest(job_id, job));
    PublishBytes(job_id, job);
    jobs_[job_id] = std::move(job);
  }
  if (ec) return absl::InternalError(absl::StrCat(dir_, ": cannot list: ", ec.message()));
  return absl::OkStatus();
}

absl::Status ArtifactStore::SaveManifest(const std::string& job_id, const Job& job) const {
  MAT_RETURN_IF_ERROR(common::MakeDirs(JobDir(job_id)));
  nlohmann::json m = {{"artifacts", nlohmann::json::object()},
                      {"uploads", nlohmann::json::object()},
                      {"refused", job.refused}};
  for (const auto& [name, info] : job.artifacts) {
    m["artifacts"][name] = {{"bytes", info.bytes}, {"sha256", info.sha256}};
  }
  for (const auto& [name, up] : job.uploads) {
    m["uploads"][name] = {{"bytes", up.expected.bytes}, {"sha256", up.expected.sha256}};
  }
  return common::WriteFileAtomic(JobDir(job_id) + "/" + kManifest, m.dump(2) + "\n");
}

absl::Status ArtifactStore::StartUpload(const std::string& job_id, Job& job,
                                        const std::string& name, const FileInfo& expected) {
  int64_t used = 0;
  for (const auto& [n, info] : job.artifacts) used += n == name ? 0 : info.bytes;
  for (const auto& [n, up] : job.uploads) used += n == name ? 0 : up.expected.bytes;
  if (max_bytes_per_job_ > 0 && used + expected.bytes > max_bytes_per_job_) {
    const std::string why = absl::StrCat(
        name, " (", Size(expected.bytes), ") does not fit: the job's artifacts would take ",
        Size(used + expected.bytes), ", over the coordinator's --max-artifact-bytes ",
        max_bytes_per_job_);
    if (std::find(job.refused.begin(), job.refused.end(), why) == job.refused.end()) {
      job.refused.push_back(why);
      MAT_RETURN_IF_ERROR(SaveManifest(job_id, job));
    }
    return absl::ResourceExhaustedError(absl::StrCat("artifact ", why));
  }
  MAT_RETURN_IF_ERROR(common::MakeDirs(JobDir(job_id)));
  const std::string part = JobDir(job_id) + "/" + name + ".part";
  if (!std::ofstream(part, std::ios::binary | std::ios::trunc)) {
    return absl::InternalError(absl::StrCat(part, ": cannot create"));
  }
  job.uploads[name] = Partial{expected, 0};
  return SaveManifest(job_id, job);
}

absl::Status ArtifactStore::CompleteUpload(const std::string& job_id, Job& job,
                                           const std::string& name) {
  const std::string part = JobDir(job_id) + "/" + name + ".part";
  const FileInfo expected = job.uploads[name].expected;
  absl::StatusOr<api::FileDigest> digest = api::DigestFile(part);
  std::error_code ec;
  if (!digest.ok() || digest->sha256 != expected.sha256 || digest->bytes != expected.bytes) {
    fs::remove(part, ec);
    job.uploads.erase(name);
    MAT_RETURN_IF_ERROR(SaveManifest(job_id, job));
    return absl::DataLossError(absl::StrCat(
        "artifact ", name, " of ", job_id, ": the bytes received have SHA-256 ",
        digest.ok() ? digest->sha256 : std::string(digest.status().message()), ", not ",
        expected.sha256, "; dropped, upload it again"));
  }
  // On disk before the manifest says it is complete: after a power loss a complete artifact
  // whose bytes never left the page cache would be dropped, and rank 0 may not upload it again.
  MAT_RETURN_IF_ERROR(SyncFile(part));
  fs::rename(part, JobDir(job_id) + "/" + name, ec);
  if (ec) return absl::InternalError(absl::StrCat(part, ": cannot rename: ", ec.message()));
  job.uploads.erase(name);
  job.artifacts[name] = expected;
  PublishBytes(job_id, job);
  MAT_RETURN_IF_ERROR(SaveManifest(job_id, job));
  spdlog::info("artifact {} of {} complete ({} bytes, sha256 {})", name, job_id, expected.bytes,
               expected.sha256);
  return absl::OkStatus();
}

absl::StatusOr<v1::UploadArtifactReply> ArtifactStore::Upload(
    const v1::UploadArtifactRequest& r) {
  MAT_RETURN_IF_ERROR(api::CheckArtifactName(r.name()));
  if (!api::CheckArtifactName(r.job_id()).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("job id '", r.job_id(), "' is not valid"));
  }
  MAT_RETURN_IF_ERROR(api::CheckSha256Hex(r.sha256()));
  const std::string what = absl::StrCat("artifact ", r.name(), " of ", r.job_id());
  if (r.total_bytes() < 0 || r.offset() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": total_bytes and offset must be >= 0"));
  }
  if (int64_t(r.data().size()) > api::kMaxArtifactPieceBytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": a piece of ", r.data().size(),
                                                   " bytes; at most ",
                                                   api::kMaxArtifactPieceBytes));
  }
  std::lock_guard<std::mutex> lock(mu_);
  Job& job = jobs_[r.job_id()];
  const FileInfo expected{r.total_bytes(), r.sha256()};
  v1::UploadArtifactReply reply;
  auto up = job.uploads.find(r.name());
  if (up != job.uploads.end() && (up->second.expected.bytes != expected.bytes ||
                                  up->second.expected.sha256 != expected.sha256)) {
    std::error_code ec;  // another file under the same name: start over
    fs::remove(JobDir(r.job_id()) + "/" + r.name() + ".part", ec);
    job.uploads.erase(up);
    up = job.uploads.end();
  }
  if (up == job.uploads.end()) {
    auto done = job.artifacts.find(r.name());
    if (done != job.artifacts.end() && done->second.bytes == expected.bytes &&
        done->second.sha256 == expected.sha256) {
      reply.set_committed_bytes(expected.bytes);  // already here: nothing to send
      reply.set_complete(true);
      return reply;
    }
    MAT_RETURN_IF_ERROR(StartUpload(r.job_id(), job, r.name(), expected));
    up = job.uploads.find(r.name());
  }
  Partial& u = up->second;
  if (r.offset() == u.committed && !r.data().empty()) {
    if (u.committed + int64_t(r.data().size()) > expected.bytes) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": a piece ends at byte ",
                                                     u.committed + r.data().size(),
                                                     ", past total_bytes ", expected.bytes));
    }
    const std::string part = JobDir(r.job_id()) + "/" + r.name() + ".part";
    std::ofstream out(part, std::ios::binary | std::ios::app);
    out.write(r.data().data(), std::streamsize(r.data().size()));
    out.close();
    if (!out) {
      u.committed = std::max<int64_t>(0, FileSize(part));
      return absl::InternalError(absl::StrCat(part, ": write failed"));
    }
    u.committed += int64_t(r.data().size());
  }
  if (u.committed == expected.bytes) {
    MAT_RETURN_IF_ERROR(CompleteUpload(r.job_id(), job, r.name()));
    reply.set_committed_bytes(expected.bytes);
    reply.set_complete(true);
    return reply;
  }
  reply.set_committed_bytes(u.committed);
  return reply;
}

absl::StatusOr<v1::ListArtifactsReply> ArtifactStore::List(const std::string& job_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  v1::ListArtifactsReply reply;
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return reply;
  for (const auto& [name, info] : it->second.artifacts) {
    v1::Artifact* a = reply.add_artifacts();
    a->set_name(name);
    a->set_bytes(info.bytes);
    a->set_sha256(info.sha256);
    reply.set_total_bytes(reply.total_bytes() + info.bytes);
  }
  for (const std::string& r : it->second.refused) reply.add_refused(r);
  return reply;
}

absl::StatusOr<v1::ReadArtifactReply> ArtifactStore::Read(
    const v1::ReadArtifactRequest& r) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto job = jobs_.find(r.job_id());
  const FileInfo* info = nullptr;
  if (job != jobs_.end()) {
    auto a = job->second.artifacts.find(r.name());
    if (a != job->second.artifacts.end()) info = &a->second;
  }
  if (info == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("job ", r.job_id(), " has no artifact '", r.name(), "'"));
  }
  if (r.offset() < 0 || r.offset() > info->bytes) {
    return absl::OutOfRangeError(absl::StrCat("offset ", r.offset(), " is past the end of ",
                                              r.name(), " (", Size(info->bytes), ")"));
  }
  int64_t want = r.max_bytes() <= 0 ? api::kArtifactPieceBytes : r.max_bytes();
  want = std::min({want, api::kMaxArtifactPieceBytes, info->bytes - r.offset()});
  v1::ReadArtifactReply reply;
  reply.set_total_bytes(info->bytes);
  reply.set_sha256(info->sha256);
  std::string data(size_t(want), '\0');
  const std::string path = JobDir(r.job_id()) + "/" + r.name();
  std::ifstream in(path, std::ios::binary);
  in.seekg(r.offset());
  in.read(data.data(), want);
  if (!in || in.gcount() != want) {
    return absl::DataLossError(absl::StrCat(path, ": cannot read ", want, " bytes at ", r.offset(),
                                            " (changed on disk?)"));
  }
  reply.set_data(std::move(data));
  return reply;
}

void ArtifactStore::PublishBytes(const std::string& job_id, const Job& job) {
  int64_t total = 0;
  for (const auto& [name, info] : job.artifacts) total += info.bytes;
  std::lock_guard<std::mutex> lock(bytes_mu_);
  job_bytes_[job_id] = total;
}

absl::StatusOr<int64_t> ArtifactStore::RemoveJob(const std::string& job_id) {
  MAT_RETURN_IF_ERROR(api::CheckArtifactName(job_id));  // a job id is one path component
  if (job_id == kOrphaned || job_id == common::kLockFileName) {
    return absl::InvalidArgumentError(absl::StrCat("'", job_id, "' is not a job of the store"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  jobs_.erase(job_id);
  {
    std::lock_guard<std::mutex> bytes_lock(bytes_mu_);
    job_bytes_.erase(job_id);
  }
  std::error_code ec;
  int64_t bytes = 0;
  for (fs::recursive_directory_iterator it(JobDir(job_id), ec), end; !ec && it != end;
       it.increment(ec)) {
    std::error_code size_error;
    if (it->is_regular_file(size_error)) {
      const std::uintmax_t size = it->file_size(size_error);
      if (!size_error) bytes += static_cast<int64_t>(size);
    }
  }
  ec.clear();
  fs::remove_all(JobDir(job_id), ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot remove ", JobDir(job_id), ": ", ec.message()));
  }
  return bytes;
}

int64_t ArtifactStore::JobBytes(const std::string& job_id) const {
  std::lock_guard<std::mutex> lock(bytes_mu_);
  auto it = job_bytes_.find(job_id);
  return it == job_bytes_.end() ? 0 : it->second;
}

}  // namespace mat::coordinator
