// RankRunner: one rank of one service job inside mat-worker (DESIGN §2, the session protocol of
// proto/mat/v1/service.proto). It turns the Assign's spec into mat-train's config, forms the job's
// c10d process group (world_size > 1), and runs trainer/trainer.h's Trainer on its own thread with
// itself as the TrainerHooks:
//
//   Decide          sends this rank's SpectraReport for the probe step, then waits (at most
//                   mask_timeout) for the coordinator's MaskUpdate with effective_step == step,
//                   acknowledges it (MaskAck) and returns its schedule. No mask in time: the rank
//                   fails with DEADLINE_EXCEEDED naming the step, rather than diverge.
//   ReduceGradients GradientSync::AllReduce over the job's process group (Gloo on CPU, NCCL on
//                   CUDA; nothing when alone).
//   AverageBuffers  GradientSync::AverageTensors (VGG's BatchNorm running statistics), so every
//                   rank probes, evaluates and checkpoints the same statistics.
//   OnProgress      Progress at every evaluation, else at most every progress_interval.
//   CheckContinue   CANCELLED once Cancel() was called.
//
// Artifacts: when its part ends (trained, failed or cancelled), rank 0 writes job_spec.yaml (the
// Assign's spec as YAML), makes model.safetensors from its newest checkpoint when the run did not
// finish, and uploads its artifacts (worker/artifact_upload.h) before its RankDone, so that a
// SUCCEEDED job's artifacts are on the coordinator. When the job's process group failed (a peer
// was lost: the job restarts) it uploads after its RankDone instead, so that a job cancelled
// before its next attempt still gives back the model of its newest checkpoint; a new Assign
// abandons that upload. A file that cannot be uploaded is logged (a warning, in the job's log)
// and does not change how the rank ends. AbandonUploads stops an upload (a new Assign);
// LimitUploads bounds it (a stopping worker: its cancelled rank 0 still gives back the model of
// its newest checkpoint, which the coordinator takes while the job restarts or after it ended).
// A cancelled rank leaves its process group before it uploads, so its peers' collectives fail
// at once instead of waiting for the upload.
//
// Rank 0 declares the modules (ModuleList) once the model is built. At the end every rank sends
// RankDone: ok with its param_checksum (rank 0 adds summary.json's text), or the error (with
// `retryable` when the job's process group failed: a peer was lost). A cancelled rank sends
// nothing (the coordinator already ended the job). Every job message carries the Assign's attempt.
//
// The coordinator may go away and come back (its session breaks): the rank keeps training; at a
// probe step it waits for its mask (mask_timeout), and OnReconnect (the agent's new session)
// resends what the coordinator may have lost: rank 0's ModuleList, the SpectraReport still
// waiting for its mask, the log lines taken while there was no session (the newest
// kMaxUndeliveredLogBatches batches), and a RankDone that was not delivered, in that order.
//
// Resume (Assign.resume, a restarted job): after the process group forms, the ranks agree on the
// newest checkpoint step every rank holds (each rank's newest readable one of checkpoint.pt and
// checkpoint.pt.prev; the minimum over the ranks). A rank whose checkpoint.pt is newer than that
// (or unreadable) moves it aside as checkpoint.pt.skipped-attempt<N>, so the trainer loads the
// agreed one; when some rank holds none, every rank moves its files aside
// (checkpoint.pt[.prev].unused-attempt<N>) and the job starts from step 0.
//
// Files: <checkpoint_dir>/jobs/<job_id>/rank<r>/ (checkpoint_dir: storage every worker shares, or
// the worker's work dir) holds what mat-train writes (metrics.jsonl, checkpoint.pt,
// summary.json) plus masks.jsonl: one line per probe step with the mask applied.
//
// Metrics (worker/worker_metrics.h, when options.metrics is set): the step, its time stamp and
// duration (OnProgress), the probe's duration and the mask wait (Decide), all-reduced and skipped
// bytes (ReduceGradients), all labelled {job, rank}; mat_worker_busy goes to 0 when the rank ends.
//
// Thread-safety: OnMask, Cancel, done and Join may be called from any thread; the rest is private
// to the runner's thread. `send` must be thread-safe. Not copyable.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "worker/artifact_upload.h"
#include "worker/log_forwarder.h"
#include "worker/worker_metrics.h"
#include "mat/v1/service.pb.h"
#include "trainer/trainer.h"

namespace mat::trainer {
class GradientSync;
}

namespace mat::worker {

// Sends one message on the worker's session; false when the session is gone (the message is lost).
using SessionSend = std::function<bool(const v1::WorkerMessage&)>;

struct RankRunnerOptions {
  std::string worker_id;
  std::string work_dir;           // the worker's --work-dir
  // Where the ranks' directories live (the worker's --checkpoint-dir); "" = work_dir. A job
  // restarted on other workers resumes from its checkpoints only when this is shared storage.
  std::string checkpoint_dir;
  std::string device = "cpu";     // the worker's device: overrides the spec's train.device
  std::string local_host = "127.0.0.1";  // this worker's address for the Gloo transport
  int threads = 0;                // > 0: overrides train.threads
  std::chrono::milliseconds mask_timeout{120000};
  // While the coordinator session is down, a rank at a probe step without its mask may go on
  // under the previous mask, as long as its steps trained without a fresh mask stay <= this
  // (then it waits, up to mask_timeout). The ranks agree at every probe step (one tiny
  // all-reduce, only when this is > 0): all go on stale, or all wait. The ranks of a job use
  // the smallest of their workers' values (agreed when the process group forms). 0 = always
  // wait (the result then equals a fault-free run's). Steps.
  int64_t max_mask_staleness_steps = 0;
  std::chrono::milliseconds rendezvous_timeout{120000};
  std::chrono::milliseconds progress_interval{1000};
  // The worker's --data-root directories (absolute). When set, the rank checks the spec's
  // data.dir (relative paths resolved against the working directory, as the trainer opens them)
  // with common::CheckUnderRoots before opening anything, and fails FAILED_PRECONDITION naming
  // the path (RankDone's error) when it is outside. Empty: any data.dir.
  std::vector<std::string> data_roots;
  // Where the rank's metrics go; borrowed, must outlive the runner; nullptr = none.
  WorkerMetrics* metrics = nullptr;
  // The process's log lines while this rank runs, forwarded to the coordinator (LogBatch) with
  // each Progress and before RankDone; borrowed, must outlive the runner; nullptr = none.
  LogForwarder* logs = nullptr;
  // Rank 0's artifact upload when its part ends (worker/artifact_upload.h); empty = no upload.
  UploadArtifactCall upload_artifact;
  ArtifactUploadOptions artifact_upload;
};

class RankRunner : public trainer::TrainerHooks {
 public:
  RankRunner(v1::Assign assign, RankRunnerOptions options, SessionSend send);
  ~RankRunner() override;  // Cancel + Join
  RankRunner(const RankRunner&) = delete;
  RankRunner& operator=(const RankRunner&) = delete;

  // Starts the rank's thread. Call once.
  void Start();
  // A MaskUpdate of this job (a lower version than one already received is ignored).
  void OnMask(const v1::MaskUpdate& mask);
  // Stops the rank at its next step or wait; no RankDone is sent.
  void Cancel(const std::string& reason);
  // Stops an artifact upload in progress (at its next piece); the rank then ends as it would.
  void AbandonUploads() { uploads_abandoned_.store(true); }
  // Lets an artifact upload (in progress or to come) run for at most `within` from now, then
  // stops it as AbandonUploads does (a stopping worker); the earliest limit holds.
  void LimitUploads(std::chrono::milliseconds within);
  // A new coordinator session is open: resends rank 0's ModuleList, the SpectraReport waiting
  // for its mask, undelivered log batches and an undelivered RankDone (whichever exist).
  void OnReconnect();
  // Whether the worker has a coordinator session (max_mask_staleness_steps); true at start.
  void SetConnected(bool connected);
  // A Reject of this job. After this rank's RankDone, one with UNAVAILABLE (the coordinator's
  // store refused it for now: a full disk) marks the RankDone to be sent again: TakeRefusedDone
  // returns it once (the agent sends it with its next heartbeat), until the coordinator takes it
  // or refuses it otherwise (a RankDone it already has is refused FAILED_PRECONDITION).
  void OnReject(const v1::Reject& reject);
  std::optional<v1::WorkerMessage> TakeRefusedDone();
  bool done() const { return done_.load(); }
  // Whether Cancel was called.
  bool cancelled() const {
    std::lock_guard<std::mutex> lock(mu_);
    return cancelled_;
  }
  void Join();

  const std::string& job_id() const { return assign_.job_id(); }
  int rank() const { return assign_.rank(); }
  // The directory this rank writes to.
  std::string OutDir() const;

  // ----- trainer::TrainerHooks (the runner's thread) -----
  absl::StatusOr<policy::MaskSchedule> Decide(int64_t step,
                                              const trainer::ProbeResult& probe) override;
  absl::StatusOr<int> ReduceGradients(const std::vector<uint8_t>& active, bool loss_finite) override;
  absl::Status AverageBuffers(const std::vector<torch::Tensor>& buffers) override;
  void OnProgress(const trainer::TrainerProgress& progress) override;
  absl::Status CheckContinue() override;

 private:
  void Main();
  // Resume: agree with the other ranks on the checkpoint to continue from (see above).
  absl::Status AgreeOnCheckpoint();
  // Decide's wait for the mask of `step` into `*mask`; false = go on under last_schedule_.
  absl::StatusOr<bool> WaitForMask(int64_t step, v1::MaskUpdate* mask);
  // Sends `m`; when there is no session, keeps nothing (callers keep what must be resent).
  bool Send(const v1::WorkerMessage& m);
  // Sends the lines options_.logs kept since the last call, in batches of at most 1000 (batches
  // that find no session wait for OnReconnect, the newest kMaxUndeliveredLogBatches of them).
  void SendLogs();
  // Train's steps: the spec's paths under options_.data_roots (FAILED_PRECONDITION naming the
  // key); rank 0's ModuleList (kept for a resend); the job's c10d process group and the agreed
  // staleness bound (collective_failed_ set when the group failed).
  absl::Status CheckDataRoots(const config::TrainConfig& config) const;
  void SendModuleList(const trainer::Trainer& job_trainer);
  absl::Status FormProcessGroup(trainer::Trainer& job_trainer);
  // Runs the job; the summary JSON text for rank 0 ("" otherwise) and the checksum.
  absl::Status Train(std::string* summary_json, std::string* checksum, int64_t* step);
  v1::WorkerMessage Message() const;
  // Rank 0's artifacts (see above); `ok`: the run trained every step.
  void UploadArtifacts(bool ok);

  const v1::Assign assign_;
  const RankRunnerOptions options_;
  const SessionSend send_;
  std::thread thread_;
  std::atomic<bool> done_{false};
  std::atomic<bool> uploads_abandoned_{false};
  // LimitUploads: steady_clock nanoseconds since its epoch after which uploads stop.
  std::atomic<int64_t> uploads_until_ns_{std::numeric_limits<int64_t>::max()};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, v1::MaskUpdate> masks_;  // by effective_step; guarded by mu_
  int64_t newest_version_ = 0;               // guarded by mu_
  bool cancelled_ = false;                   // guarded by mu_
  std::string cancel_reason_;                // guarded by mu_
  // What OnReconnect resends; guarded by mu_.
  std::optional<v1::WorkerMessage> module_list_;     // rank 0, once the model is built
  std::optional<v1::WorkerMessage> waiting_report_;  // a SpectraReport without its mask yet
  std::optional<v1::WorkerMessage> undelivered_done_;
  std::optional<v1::WorkerMessage> delivered_done_;  // the RankDone the coordinator got
  bool done_refused_ = false;                          // OnReject: send delivered_done_ again
  static constexpr size_t kMaxUndeliveredLogBatches = 10;
  std::deque<v1::WorkerMessage> undelivered_logs_;  // LogBatches sent without a session
  // The job's process group failed (RankDone.retryable); the runner's thread only.
  bool collective_failed_ = false;
  bool connected_ = true;  // guarded by mu_
  // Staleness (the runner's thread): the schedule of the last mask received, whether there is
  // one, the steps trained since without a fresh mask, the probe interval.
  policy::MaskSchedule last_schedule_;
  bool has_last_schedule_ = false;
  int64_t stale_steps_ = 0;
  int64_t probe_every_ = 1;
  int64_t max_staleness_ = 0;  // options_.max_mask_staleness_steps, min over the ranks

  // The runner's thread only.
  std::unique_ptr<trainer::GradientSync> sync_;
  std::chrono::steady_clock::time_point last_progress_{};
  int64_t total_steps_ = 0;
  // Metrics bookkeeping (the runner's thread).
  double last_wall_seconds_ = 0;     // TrainerProgress.wall_seconds at the previous step
  double step_overhead_seconds_ = 0; // probe + mask wait since then (not the step itself)
  int64_t reported_bytes_reduced_ = 0, reported_bytes_skipped_ = 0;
};

// The MaskUpdate's bits as a MaskSchedule. INVALID_ARGUMENT when the bit strings do not have
// ceil(num_modules / 8) bytes, or num_modules differs from `expected_modules`.
absl::StatusOr<policy::MaskSchedule> ScheduleFromMaskUpdate(const v1::MaskUpdate& mask,
                                                            int expected_modules);

}  // namespace mat::worker
