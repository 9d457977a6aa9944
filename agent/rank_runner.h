// RankRunner: one rank of one service job inside mat-worker (DESIGN §2, the session protocol of
// proto/mat/v1/service.proto). It turns the Assign's spec into mat-train's config, forms the job's
// c10d process group (world_size > 1), and runs worker/trainer.h's Trainer on its own thread with
// itself as the TrainerHooks:
//
//   Decide          sends this rank's SpectraReport for the probe step, then waits (at most
//                   mask_timeout) for the coordinator's MaskUpdate with effective_step == step,
//                   acknowledges it (MaskAck) and returns its schedule. No mask in time: the rank
//                   fails with DEADLINE_EXCEEDED naming the step, rather than diverge.
//   ReduceGradients GradientSync::AllReduce over the job's process group (Gloo on CPU, NCCL on
//                   CUDA; nothing when alone).
//   OnProgress      Progress at every evaluation, else at most every progress_interval.
//   CheckContinue   CANCELLED once Cancel() was called.
//
// Rank 0 declares the modules (ModuleList) once the model is built. At the end every rank sends
// RankDone: ok with its param_checksum (rank 0 adds summary.json's text), or the error. A
// cancelled rank sends nothing (the coordinator already ended the job).
//
// Files: <work_dir>/jobs/<job_id>/rank<r>/ holds what mat-train writes (metrics.jsonl,
// checkpoint.pt, summary.json) plus masks.jsonl: one line per probe step with the mask applied.
//
// Metrics (agent/worker_metrics.h, when options.metrics is set): the step, its time stamp and
// duration (OnProgress), the probe's duration and the mask wait (Decide), all-reduced and skipped
// bytes (ReduceGradients), all labelled {job, rank}; mat_worker_busy goes to 0 when the rank ends.
//
// Thread-safety: OnMask, Cancel, done and Join may be called from any thread; the rest is private
// to the runner's thread. `send` must be thread-safe. Not copyable.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "agent/worker_metrics.h"
#include "mat/v1/service.pb.h"
#include "worker/trainer.h"

namespace mat::worker {
class GradientSync;
}

namespace mat::agent {

// Sends one message on the worker's session; false when the session is gone (the message is lost).
using SessionSend = std::function<bool(const v1::WorkerMessage&)>;

struct RankRunnerOptions {
  std::string worker_id;
  std::string work_dir;           // the worker's --work-dir
  std::string device = "cpu";     // the worker's device: overrides the spec's train.device
  std::string local_host = "127.0.0.1";  // this worker's address for the Gloo transport
  int threads = 0;                // > 0: overrides train.threads
  std::chrono::milliseconds mask_timeout{120000};
  std::chrono::milliseconds rendezvous_timeout{120000};
  std::chrono::milliseconds progress_interval{1000};
  // The worker's --data-root directories (absolute). When set, the rank checks the spec's
  // data.dir (relative paths resolved against the working directory, as the trainer opens them)
  // with common::CheckUnderRoots before opening anything, and fails FAILED_PRECONDITION naming
  // the path (RankDone's error) when it is outside. Empty: any data.dir.
  std::vector<std::string> data_roots;
  // Where the rank's metrics go; borrowed, must outlive the runner; nullptr = none.
  WorkerMetrics* metrics = nullptr;
};

class RankRunner : public worker::TrainerHooks {
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
  bool done() const { return done_.load(); }
  void Join();

  const std::string& job_id() const { return assign_.job_id(); }
  int rank() const { return assign_.rank(); }
  // The directory this rank writes to.
  std::string OutDir() const;

  // ----- worker::TrainerHooks (the runner's thread) -----
  absl::StatusOr<policy::MaskSchedule> Decide(int64_t step,
                                              const worker::ProbeResult& probe) override;
  absl::Status ReduceGradients(const std::vector<uint8_t>& active) override;
  void OnProgress(const worker::TrainerProgress& progress) override;
  absl::Status CheckContinue() override;

 private:
  void Main();
  // Runs the job; the summary JSON text for rank 0 ("" otherwise) and the checksum.
  absl::Status Train(std::string* summary_json, std::string* checksum, int64_t* step);
  v1::WorkerMessage Message() const;

  const v1::Assign assign_;
  const RankRunnerOptions options_;
  const SessionSend send_;
  std::thread thread_;
  std::atomic<bool> done_{false};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, v1::MaskUpdate> masks_;  // by effective_step; guarded by mu_
  int64_t newest_version_ = 0;               // guarded by mu_
  bool cancelled_ = false;                   // guarded by mu_
  std::string cancel_reason_;                // guarded by mu_

  // The runner's thread only.
  std::unique_ptr<worker::GradientSync> sync_;
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

}  // namespace mat::agent
