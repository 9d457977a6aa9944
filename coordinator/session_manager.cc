// SessionManager (session_manager.h): registered workers, open sessions, heartbeats.
#include "coordinator/session_manager.h"

#include <algorithm>
#include <cctype>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "api/artifacts.h"
#include "common/status.h"
#include "spdlog/spdlog.h"

namespace mat::coordinator {
namespace {

// Longest worker id a worker may bring along, characters.
constexpr size_t kMaxWorkerIdLength = 128;

absl::Status ValidateRegisterRequest(const v1::RegisterRequest& request) {
  const v1::WorkerCapabilities& caps = request.capabilities();
  if (caps.device().empty()) return absl::InvalidArgumentError("capabilities.device is empty");
  if (caps.device() != "cpu" && !IsCudaDevice(caps.device())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "capabilities.device must be \"cpu\" or \"cuda:N\", got '", caps.device(), "'"));
  }
  if (caps.memory_bytes() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capabilities.memory_bytes must be >= 0, got ", caps.memory_bytes()));
  }
  if (caps.host().empty()) return absl::InvalidArgumentError("capabilities.host is empty");
  if (caps.rendezvous_port() < 1 || caps.rendezvous_port() > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "capabilities.rendezvous_port must be in 1..65535, got ", caps.rendezvous_port()));
  }
  const std::string& id = request.worker_id();
  const bool plain = std::all_of(id.begin(), id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_' || c == '.';
  });
  if (!plain || id.size() > kMaxWorkerIdLength) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker_id '", id, "' must be at most ", kMaxWorkerIdLength,
                     " letters, digits, '-', '_' or '.'"));
  }
  return absl::OkStatus();
}

// What the store keeps of a secret.
std::string SecretHash(std::string_view secret) {
  api::Sha256 digest;
  digest.Add(secret);
  return digest.Hex();
}

// PERMISSION_DENIED for a call in `worker_id`'s name whose secret is not `stored_hash`'s.
absl::Status CheckSecret(const std::string& worker_id, const std::string& stored_hash,
                         std::string_view secret) {
  if (stored_hash.empty()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "worker ", worker_id, " has no worker secret yet: it registers again to get one"));
  }
  if (secret.empty()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "worker ", worker_id, " has a worker secret and this call carries none"));
  }
  if (SecretHash(secret) != stored_hash) {
    return absl::PermissionDeniedError(absl::StrCat(
        "the worker secret of this call is not worker ", worker_id,
        "'s (mat-worker keeps it in WORK_DIR/worker.secret beside worker.id; a worker that lost "
        "it registers as a new worker once its worker.id is removed too)"));
  }
  return absl::OkStatus();
}

}  // namespace

bool IsCudaDevice(const std::string& device) {
  if (!absl::StartsWith(device, "cuda:") || device.size() == 5) return false;
  return std::all_of(device.begin() + 5, device.end(),
                     [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; });
}

SessionManager::SessionManager(JobStore& store, const Clock& clock, CoordinatorMetrics* metrics,
                               int64_t heartbeat_interval_ms)
    : store_(store), clock_(clock), metrics_(metrics),
      heartbeat_interval_ms_(heartbeat_interval_ms) {
  MAT_CHECK(heartbeat_interval_ms_ > 0)
      << "heartbeat_interval_ms must be > 0, got " << heartbeat_interval_ms_;
}

absl::Status SessionManager::Load() {
  absl::StatusOr<std::vector<WorkerRecord>> workers = store_.ListWorkers();
  if (!workers.ok()) {
    return absl::Status(workers.status().code(),
                        absl::StrCat("cannot read the workers from the state store: ",
                                     workers.status().message()));
  }
  for (WorkerRecord& w : *workers) {
    std::string id = w.id;
    workers_.emplace(std::move(id), std::move(w));
  }
  UpdateGauges();
  return absl::OkStatus();
}

// ----- registration -----

absl::StatusOr<v1::RegisterReply> SessionManager::Register(const v1::RegisterRequest& request,
                                                           std::string_view secret) {
  MAT_RETURN_IF_ERROR(ValidateRegisterRequest(request));
  if (secret.empty()) {
    return absl::InvalidArgumentError(
        "the call carries no worker secret (x-mat-worker-secret metadata, 64 lowercase hex "
        "digits: mat-worker makes one in WORK_DIR/worker.secret; an older mat-worker sends none: "
        "upgrade it)");
  }
  if (!api::CheckSha256Hex(secret).ok()) {
    return absl::InvalidArgumentError(
        "the call's worker secret (x-mat-worker-secret metadata) is not 64 lowercase hex digits");
  }
  if (!request.worker_id().empty()) {
    // The store's row, not workers_: a failed Load leaves workers_ empty, and a stored secret
    // must never be replaced by a caller's.
    absl::StatusOr<WorkerRecord> stored = store_.GetWorker(request.worker_id());
    if (!stored.ok() && !absl::IsNotFound(stored.status())) return stored.status();
    if (stored.ok() && !stored->secret_sha256.empty()) {
      // Before the open-session check: a caller without the secret learns nothing more.
      MAT_RETURN_IF_ERROR(CheckSecret(request.worker_id(), stored->secret_sha256, secret));
    }
  }
  const v1::WorkerCapabilities& caps = request.capabilities();
  WorkerRecord record;
  record.id = request.worker_id();
  record.host = caps.host();
  record.device = caps.device();
  record.memory_bytes = caps.memory_bytes();
  record.rendezvous_port = caps.rendezvous_port();
  record.secret_sha256 = SecretHash(secret);
  if (!record.id.empty() && sessions_.count(record.id) != 0) {
    // Registering again would replace the host and rendezvous port the next job's ranks meet at
    // while the worker is connected. Its own restart waits for the old session to be dropped
    // (at most 3 heartbeat intervals); a second mat-worker with its id and secret (a work dir
    // copied whole) waits for ever (mat-worker gives up after a while, naming worker.id).
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", record.id, " already has an open session: it cannot register again until "
        "that session ends"));
  }
  if (record.id.empty()) {
    MAT_ASSIGN_OR_RETURN(record.id, store_.CreateWorker(record));
  } else {
    MAT_RETURN_IF_ERROR(store_.UpsertWorker(record));
  }
  absl::StatusOr<WorkerRecord> stored = store_.GetWorker(record.id);
  workers_[record.id] = stored.ok() ? *stored : record;
  UpdateGauges();
  spdlog::info("worker {}: registered ({} on {}, rendezvous port {})", record.id, record.device,
               record.host, record.rendezvous_port);
  v1::RegisterReply reply;
  reply.set_worker_id(record.id);
  reply.set_heartbeat_interval_ms(heartbeat_interval_ms_);
  return reply;
}

absl::Status SessionManager::Authenticate(const std::string& worker_id,
                                          std::string_view secret) const {
  if (worker_id.empty()) return absl::InvalidArgumentError("worker_id is empty");
  const auto known = workers_.find(worker_id);
  if (known == workers_.end()) {
    return absl::NotFoundError(
        absl::StrCat("worker '", worker_id, "' is not registered (call Register first)"));
  }
  return CheckSecret(worker_id, known->second.secret_sha256, secret);
}

namespace {
// A session that runs no rank and stops none (SessionManager::Session is private: deduced).
template <typename Session>
bool IsIdle(const Session& s) {
  return s.job_id.empty() && s.stopping_job.empty();
}
}  // namespace

absl::StatusOr<v1::ListWorkersReply> SessionManager::List() const {
  MAT_ASSIGN_OR_RETURN(std::vector<WorkerRecord> workers, store_.ListWorkers());
  const int64_t now_ms = clock_.NowMs();
  const int64_t now = clock_.Now();
  v1::ListWorkersReply reply;
  for (const WorkerRecord& w : workers) {
    v1::WorkerInfo* info = reply.add_workers();
    info->set_worker_id(w.id);
    info->mutable_capabilities()->set_device(w.device);
    info->mutable_capabilities()->set_memory_bytes(w.memory_bytes);
    info->mutable_capabilities()->set_host(w.host);
    info->mutable_capabilities()->set_rendezvous_port(w.rendezvous_port);
    info->set_registered_unix_seconds(w.registered_unix_seconds);
    auto session = sessions_.find(w.id);
    if (session == sessions_.end()) {
      info->set_state(v1::WORKER_STATE_DISCONNECTED);
      info->set_last_seen_unix_seconds(w.last_seen_unix_seconds);
      // A drain that waits for it (this manager's copy: the one OpenSession and Undrain use).
      if (auto known = workers_.find(w.id);
          known != workers_.end() && known->second.drain_reason.has_value()) {
        info->set_drain_reason(*known->second.drain_reason);
      }
      continue;
    }
    const Session& s = session->second;
    info->set_state(s.draining  ? v1::WORKER_STATE_DRAINING
                    : IsIdle(s) ? v1::WORKER_STATE_IDLE
                                : v1::WORKER_STATE_BUSY);
    if (s.draining) info->set_drain_reason(s.drain_reason);
    if (!s.job_id.empty()) {
      info->set_job_id(s.job_id);
      info->set_rank(s.rank);
    } else if (!IsIdle(s)) {  // stopping a cancelled rank
      info->set_job_id(s.stopping_job);
      if (s.stopping_rank >= 0) info->set_rank(s.stopping_rank);
      info->set_stopping(true);
    }
    // Live: the store's copy may be up to kLastSeenPersistMs old.
    info->set_last_seen_unix_seconds(
        std::max(w.last_seen_unix_seconds, now - (now_ms - s.last_message_ms) / 1000));
  }
  return reply;
}

const WorkerRecord* SessionManager::Find(const std::string& worker_id) const {
  auto it = workers_.find(worker_id);
  return it == workers_.end() ? nullptr : &it->second;
}

// ----- sessions -----

absl::Status SessionManager::Open(const std::string& id, std::shared_ptr<WorkerChannel> channel) {
  MAT_CHECK(channel != nullptr) << "Open needs a channel";
  if (id.empty()) return absl::InvalidArgumentError("worker_id is empty");
  if (workers_.count(id) == 0) {
    return absl::NotFoundError(
        absl::StrCat("worker '", id, "' is not registered (call Register first)"));
  }
  if (sessions_.count(id) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", id, " already has an open session"));
  }
  Session& session = sessions_[id];
  session.channel = std::move(channel);
  session.last_message_ms = clock_.NowMs();
  // A drain outlives the session and the coordinator: the worker is told to stop once idle.
  if (const std::optional<std::string>& drain = workers_[id].drain_reason; drain.has_value()) {
    session.draining = true;
    session.drain_reason = *drain;
  }
  PersistLastSeen(id, session, /*force=*/true);
  spdlog::info("worker {}: session opened", id);
  UpdateGauges();
  return absl::OkStatus();
}

bool SessionManager::Touch(const std::string& worker_id) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end()) return false;
  it->second.last_message_ms = clock_.NowMs();
  PersistLastSeen(worker_id, it->second, /*force=*/false);
  return true;
}

bool SessionManager::HasSession(const std::string& worker_id) const {
  return sessions_.count(worker_id) != 0;
}

std::optional<SessionManager::Dropped> SessionManager::Drop(const std::string& worker_id) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end()) return std::nullopt;
  Dropped dropped{std::move(it->second.channel), it->second.job_id, it->second.rank};
  // A drained worker that was told to stop has left: the drain is done. (One that lost its
  // session before, a crash, is still drained when it comes back.)
  if (it->second.drain_taken) {
    if (absl::Status st = store_.SetWorkerDrain(worker_id, std::nullopt); !st.ok()) {
      // Kept as stored: when it comes back it is told to stop again.
      spdlog::error("worker {}: cannot clear its drain: {}", worker_id, st.ToString());
    } else {
      workers_[worker_id].drain_reason.reset();
    }
  }
  sessions_.erase(it);
  if (metrics_ != nullptr) metrics_->worker_heartbeat_age_seconds.Remove({worker_id});
  UpdateGauges();
  NoteLastSeenStored(worker_id, store_.TouchWorker(worker_id));
  return dropped;
}

void SessionManager::SetJob(const std::string& worker_id, const std::string& job_id, int rank) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end()) return;
  it->second.job_id = job_id;
  it->second.rank = job_id.empty() ? -1 : rank;
  if (!job_id.empty()) {
    it->second.stopping_job.clear();
    it->second.stopping_rank = -1;
  }
  PersistLastSeen(worker_id, it->second, /*force=*/true);
  UpdateGauges();
}

void SessionManager::SetStopping(const std::string& worker_id, const std::string& job_id,
                                 int rank) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end() || job_id.empty()) return;
  it->second.stopping_job = job_id;
  it->second.stopping_rank = rank;
  UpdateGauges();
}

bool SessionManager::ClearStopping(const std::string& worker_id, const std::string& job_id) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end() || it->second.stopping_job.empty() ||
      it->second.stopping_job != job_id) {
    return false;
  }
  it->second.stopping_job.clear();
  it->second.stopping_rank = -1;
  UpdateGauges();
  return true;
}

std::string SessionManager::StoppingJobOf(const std::string& worker_id) const {
  auto it = sessions_.find(worker_id);
  return it == sessions_.end() ? std::string() : it->second.stopping_job;
}

bool SessionManager::Runs(const std::string& worker_id, const std::string& job_id,
                          int rank) const {
  auto it = sessions_.find(worker_id);
  return it != sessions_.end() && it->second.job_id == job_id && it->second.rank == rank;
}

std::string SessionManager::JobOf(const std::string& worker_id) const {
  auto it = sessions_.find(worker_id);
  return it == sessions_.end() ? std::string() : it->second.job_id;
}

bool SessionManager::Holds(const std::string& job_id) const {
  if (job_id.empty()) return false;
  for (const auto& [id, session] : sessions_) {
    if (session.job_id == job_id || session.stopping_job == job_id) return true;
  }
  return false;
}

absl::Status SessionManager::SetDraining(const std::string& worker_id, const std::string& reason) {
  if (workers_.count(worker_id) == 0) {
    return absl::NotFoundError(absl::StrCat("no worker '", worker_id, "' (matctl workers)"));
  }
  if (workers_[worker_id].drain_reason.has_value()) return absl::OkStatus();  // the first reason
  MAT_RETURN_IF_ERROR(store_.SetWorkerDrain(worker_id, reason));
  workers_[worker_id].drain_reason = reason;
  // Without a session it waits in the store: the session that opens next is draining.
  if (auto it = sessions_.find(worker_id); it != sessions_.end()) {
    it->second.draining = true;
    it->second.drain_reason = reason;
    UpdateGauges();
  }
  return absl::OkStatus();
}

absl::Status SessionManager::Undrain(const std::string& worker_id) {
  auto known = workers_.find(worker_id);
  if (known == workers_.end()) {
    return absl::NotFoundError(absl::StrCat("no worker '", worker_id, "' (matctl workers)"));
  }
  if (!known->second.drain_reason.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat("worker ", worker_id, " is not drained"));
  }
  auto it = sessions_.find(worker_id);
  if (it != sessions_.end() && it->second.drain_taken) {
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", worker_id, " was already told to stop and is leaving: start it again once it "
        "has left (DISCONNECTED), and it is in service"));
  }
  MAT_RETURN_IF_ERROR(store_.SetWorkerDrain(worker_id, std::nullopt));
  known->second.drain_reason.reset();
  if (it != sessions_.end()) {
    it->second.draining = false;
    it->second.drain_reason.clear();
    UpdateGauges();
  }
  return absl::OkStatus();
}

std::vector<std::pair<std::string, std::string>> SessionManager::TakeDrained() {
  std::vector<std::pair<std::string, std::string>> drained;
  for (auto& [id, session] : sessions_) {
    if (!session.draining || session.drain_taken || !IsIdle(session)) continue;
    session.drain_taken = true;
    drained.emplace_back(id, session.drain_reason);
  }
  return drained;
}

void SessionManager::Send(const std::string& worker_id, const v1::CoordinatorMessage& message) {
  auto it = sessions_.find(worker_id);
  if (it == sessions_.end()) return;
  // A copy: Send may not re-enter, but the map may change after it returns.
  std::shared_ptr<WorkerChannel> channel = it->second.channel;
  channel->Send(message);
}

void SessionManager::SendCancel(const std::string& worker_id, const std::string& job_id,
                                const std::string& reason) {
  v1::CoordinatorMessage message;
  message.mutable_cancel()->set_job_id(job_id);
  message.mutable_cancel()->set_reason(reason);
  Send(worker_id, message);
}

void SessionManager::PersistLastSeen(const std::string& worker_id, Session& session, bool force) {
  const int64_t now_ms = clock_.NowMs();
  if (!force && now_ms - session.last_persisted_ms < kLastSeenPersistMs) return;
  absl::Status st = store_.TouchWorker(worker_id);
  NoteLastSeenStored(worker_id, st);
  if (st.ok()) session.last_persisted_ms = now_ms;
}

void SessionManager::NoteLastSeenStored(const std::string& worker_id, const absl::Status& stored) {
  if (!stored.ok() && !last_seen_failing_) {
    spdlog::warn("worker {}: cannot store last_seen: {} (not logged again for any worker until "
                 "a last_seen is stored)",
                 worker_id, stored.ToString());
  } else if (stored.ok() && last_seen_failing_) {
    spdlog::info("worker {}: last_seen is stored again", worker_id);
  }
  last_seen_failing_ = !stored.ok();
}

// ----- heartbeats and idle workers -----

std::vector<std::pair<std::string, int64_t>> SessionManager::Silent() const {
  const int64_t now_ms = clock_.NowMs();
  const int64_t limit_ms = 3 * heartbeat_interval_ms_;
  std::vector<std::pair<std::string, int64_t>> silent;
  for (const auto& [id, session] : sessions_) {
    const int64_t silence = now_ms - session.last_message_ms;
    if (silence > limit_ms) silent.emplace_back(id, silence);
  }
  return silent;
}

std::vector<IdleWorker> SessionManager::Idle() const {
  std::vector<IdleWorker> idle;
  for (const auto& [id, session] : sessions_) {
    if (!IsIdle(session) || session.draining) continue;
    auto worker = workers_.find(id);
    if (worker != workers_.end()) idle.push_back(IdleWorker{id, worker->second.device});
  }
  return idle;
}

std::vector<IdleWorker> SessionManager::InService() const {
  std::vector<IdleWorker> in_service;
  for (const auto& [id, session] : sessions_) {
    if (session.draining) continue;
    auto worker = workers_.find(id);
    if (worker != workers_.end()) in_service.push_back(IdleWorker{id, worker->second.device});
  }
  return in_service;
}

// ----- metrics -----

void SessionManager::RefreshHeartbeatAges() {
  if (metrics_ == nullptr) return;
  const int64_t now_ms = clock_.NowMs();
  for (const auto& [id, session] : sessions_) {
    metrics_->worker_heartbeat_age_seconds.Set(
        {id}, static_cast<double>(now_ms - session.last_message_ms) / 1000.0);
  }
}

void SessionManager::UpdateGauges() {
  if (metrics_ == nullptr) return;
  int64_t idle = 0, busy = 0, disconnected = 0, draining = 0;
  for (const auto& [id, worker] : workers_) {
    auto session = sessions_.find(id);
    if (session == sessions_.end()) {
      ++disconnected;
    } else if (session->second.draining) {
      ++draining;
    } else if (IsIdle(session->second)) {
      ++idle;
    } else {
      ++busy;
    }
  }
  const metrics::Gauge& gauge = metrics_->workers;
  gauge.Set({"idle"}, static_cast<double>(idle));
  gauge.Set({"busy"}, static_cast<double>(busy));
  gauge.Set({"disconnected"}, static_cast<double>(disconnected));
  gauge.Set({"draining"}, static_cast<double>(draining));
}

}  // namespace mat::coordinator
