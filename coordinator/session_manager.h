// SessionManager: the coordinator's worker and session manager (one of the managers behind the
// Coordinator facade, coordinator.h). It owns every registered worker (the store's rows, kept in
// step with it), the open Session of each connected worker with its channel, the time of its last
// message and the rank it runs, and the worker metrics (mat_coordinator_workers, heartbeat ages).
// It decides nothing about jobs: the facade tells it which rank a worker runs (SetJob) and asks it
// which workers are idle (Idle), silent (Silent) or drained (TakeDrained).
//
//   Register     validates and stores a worker (INVALID_ARGUMENT naming the field) with the
//                SHA-256 of its secret; Authenticate checks a call's secret (the worker
//                credentials of proto/mat/v1/service.proto).
//   List         every stored worker with its live state (ListWorkers).
//   Open, Touch, Drop   a session's life: opened once per worker, every message a sign of life,
//                dropped when it ends (the caller then restarts the rank it ran).
//   Send, SendCancel    to a worker's open session (no-op without one).
//
// Thread-safety: not thread-safe; the coordinator loop only. Not copyable.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/clock.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_store.h"
#include "mat/v1/service.pb.h"

namespace mat::coordinator {

// Where the Coordinator sends one worker's messages: the adapter's Session stream (which queues
// them and writes one at a time) or a fake in unit tests (tests/testing/fake_worker_channel.h).
// Thread-safety: called on the coordinator loop only; an implementation may hand off to gRPC.
class WorkerChannel {
 public:
  virtual ~WorkerChannel() = default;
  // Queues `message` for the worker; never blocks.
  virtual void Send(const v1::CoordinatorMessage& message) = 0;
  // Ends the session with `status` once the queued messages are written. The Coordinator has
  // already forgotten the channel when it calls this (no CloseSession follows for it).
  virtual void Close(const absl::Status& status) = 0;
};

// True for "cuda:N" with N one or more decimal digits.
bool IsCudaDevice(const std::string& device);

// A registered worker with an open session that runs no rank.
struct IdleWorker {
  std::string id;
  std::string device;  // "cpu" | "cuda:N"
};

class SessionManager {
 public:
  // `store`, `clock` and `metrics` (nullptr = no metrics) are borrowed and must outlive the
  // manager. heartbeat_interval_ms: RegisterReply's; Silent() is 3 intervals. REQUIRES: > 0.
  SessionManager(JobStore& store, const Clock& clock, CoordinatorMetrics* metrics,
                 int64_t heartbeat_interval_ms);
  SessionManager(const SessionManager&) = delete;
  SessionManager& operator=(const SessionManager&) = delete;

  // Loads the workers the store knows; the store's error, saying so, when it cannot list them.
  absl::Status Load();

  // Stores the worker: a new id "worker-000001"... for an empty request.worker_id, else that id
  // (also one this store has never seen). INVALID_ARGUMENT naming the field for an empty device,
  // a device other than "cpu"/"cuda:N", a negative memory_bytes, an empty host, a
  // rendezvous_port outside 1..65535 or a worker_id that is not 1..128 of [A-Za-z0-9._-].
  // Re-registering a worker without an open session updates its capabilities;
  // FAILED_PRECONDITION ("... already has an open session ...") while it has one (its host and
  // rendezvous port would change under a connected worker).
  // `secret` is the call's "x-mat-worker-secret": INVALID_ARGUMENT unless it is 64 lowercase hex
  // digits. An id whose stored row has a secret needs the same one (checked before the session:
  // PERMISSION_DENIED naming the worker); a new id, or a stored one without a secret (rows
  // before schema v7: the first Register with the id claims it), stores its SHA-256. Registering
  // again with the same secret is always safe (a lost reply, a coordinator crash).
  absl::StatusOr<v1::RegisterReply> Register(const v1::RegisterRequest& request,
                                             std::string_view secret);
  // OK when `secret` is the worker's (their SHA-256 digests are compared: the time taken tells
  // nothing about the secret). INVALID_ARGUMENT for an empty id, NOT_FOUND for an unknown
  // worker (as Open); PERMISSION_DENIED naming it when the secret is missing or another, or the
  // worker has none yet (it registers again first).
  absl::Status Authenticate(const std::string& worker_id, std::string_view secret) const;
  // Every worker the store knows, with its live state (IDLE/BUSY/DRAINING while its session is
  // open, else DISCONNECTED) and a live last_seen for an open session.
  absl::StatusOr<v1::ListWorkersReply> List() const;
  // The worker's stored record, or null for an unknown id.
  const WorkerRecord* Find(const std::string& worker_id) const;

  // Opens `worker_id`'s session (IDLE). INVALID_ARGUMENT for an empty id, NOT_FOUND for an
  // unregistered one, FAILED_PRECONDITION when it already has one. REQUIRES: channel not null.
  absl::Status Open(const std::string& worker_id, std::shared_ptr<WorkerChannel> channel);
  // A message arrived: the session's sign of life (last_seen written at most every
  // kLastSeenPersistMs). False when the worker has no open session.
  bool Touch(const std::string& worker_id);
  bool HasSession(const std::string& worker_id) const;
  // What Drop returns: the ended session's channel and the rank it ran (job_id "" = none).
  struct Dropped {
    std::shared_ptr<WorkerChannel> channel;
    std::string job_id;
    int rank = -1;
  };
  // Forgets the session (its heartbeat-age series too) and stores last_seen; nullopt when the
  // worker has none.
  std::optional<Dropped> Drop(const std::string& worker_id);

  // Marks the worker BUSY with `rank` of `job_id`, or IDLE for job_id "" (persists last_seen).
  // A new job clears a stopping mark. No-op without a session.
  void SetJob(const std::string& worker_id, const std::string& job_id, int rank);
  // Stopping: the coordinator cancelled `rank` of `job_id` here and the worker has not yet said
  // that the rank stopped. Such a worker is not Idle (a rank stuck in a collective until its
  // timeout would hold the new one's rendezvous, and a worker that is gone but not yet noticed
  // would take a restart's rank), and List shows it BUSY with that job and rank. Cleared by
  // ClearStopping (a heartbeat without the job, the rank's RankDone), SetJob of a new job, or
  // the end of the session. No-op without a session.
  void SetStopping(const std::string& worker_id, const std::string& job_id, int rank);
  // Clears the mark when it is for `job_id`; true when it cleared one.
  bool ClearStopping(const std::string& worker_id, const std::string& job_id);
  // The job the worker is stopping a rank of ("" when none or without a session).
  std::string StoppingJobOf(const std::string& worker_id) const;
  // True when the worker's open session runs `rank` of `job_id`.
  bool Runs(const std::string& worker_id, const std::string& job_id, int rank) const;
  // The job whose rank the worker's session runs ("" when idle or without a session).
  std::string JobOf(const std::string& worker_id) const;
  // True when an open session runs a rank of `job_id` or is stopping one (the worker has not yet
  // said that the rank stopped): that rank may still send log lines.
  bool Holds(const std::string& job_id) const;

  // Draining (DrainWorker): the worker takes no new rank (Idle leaves it out) and List shows it
  // DRAINING with `reason` (DISCONNECTED with `reason` while it has no session); a second call
  // keeps the first reason. Stored (JobStore::SetWorkerDrain), so it survives a lost session and
  // a coordinator restart, and a worker without a session may be drained: a session that opens
  // for a drained worker is draining. It ends when the session of a worker TakeDrained returned
  // (told to stop) ends, or with Undrain. NOT_FOUND for an unknown worker; a store error leaves
  // the worker in service.
  absl::Status SetDraining(const std::string& worker_id, const std::string& reason);
  // Ends a drain before the worker was told to stop: it is in service again (stored).
  // NOT_FOUND for an unknown worker; FAILED_PRECONDITION for one that is not drained or that
  // TakeDrained returned while its session is still open (it is leaving); a store error leaves
  // it drained.
  absl::Status Undrain(const std::string& worker_id);
  // Draining workers that run and stop no rank and were not returned before: (id, reason), in id
  // order. The caller tells each to stop (Drain).
  std::vector<std::pair<std::string, std::string>> TakeDrained();

  // Queues `message` on the worker's open session; no-op without one.
  void Send(const std::string& worker_id, const v1::CoordinatorMessage& message);
  void SendCancel(const std::string& worker_id, const std::string& job_id,
                  const std::string& reason);

  // Open sessions with no message for more than 3 heartbeat intervals: (worker id, silence in
  // ms), in id order.
  std::vector<std::pair<std::string, int64_t>> Silent() const;
  // Idle registered workers with an open session, no rank stopping and not draining, in id
  // order (the scheduling order).
  std::vector<IdleWorker> Idle() const;
  // Registered workers with an open session that are not draining (idle, busy or stopping a
  // rank), in id order: the workers a job may yet run on without new ones.
  std::vector<IdleWorker> InService() const;
  int OpenCount() const { return static_cast<int>(sessions_.size()); }

  // Sets mat_coordinator_worker_heartbeat_age_seconds of every open session.
  void RefreshHeartbeatAges();

  // The store's last_seen of a worker with an open session is refreshed at most this often
  // (plus on open, close and state changes), milliseconds.
  static constexpr int64_t kLastSeenPersistMs = 5000;

 private:
  struct Session {
    std::shared_ptr<WorkerChannel> channel;
    int64_t last_message_ms = 0;    // clock NowMs() of the latest message
    int64_t last_persisted_ms = 0;  // when last_seen was last written to the store
    std::string job_id;             // BUSY: the job it runs a rank of; "" = IDLE
    int rank = -1;                  // BUSY: that rank
    std::string stopping_job;       // SetStopping: the cancelled rank's job ("" = none)
    int stopping_rank = -1;         // and that rank
    bool draining = false;          // SetDraining
    std::string drain_reason;
    bool drain_taken = false;       // returned by TakeDrained
  };
  // Writes last_seen to the store when `force` or kLastSeenPersistMs passed since the last write.
  void PersistLastSeen(const std::string& worker_id, Session& session, bool force);
  // Logs the first failure to store a last_seen (not each heartbeat's: a full disk refuses
  // them all, every second) and the first success after failures.
  void NoteLastSeenStored(const std::string& worker_id, const absl::Status& stored);
  // mat_coordinator_workers from workers_ and sessions_.
  void UpdateGauges();

  JobStore& store_;
  const Clock& clock_;
  CoordinatorMetrics* metrics_;
  int64_t heartbeat_interval_ms_;
  // Every registered worker, by id.
  std::map<std::string, WorkerRecord> workers_;
  // Open sessions by worker id (id order = scheduling order).
  std::map<std::string, Session> sessions_;
  bool last_seen_failing_ = false;  // the latest last_seen write failed (NoteLastSeenStored)
};

}  // namespace mat::coordinator
