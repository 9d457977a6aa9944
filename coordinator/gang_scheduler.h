// GangScheduler: the coordinator's gang scheduler (one of the managers behind the Coordinator
// facade, coordinator.h). A job starts when W = spec.resources.workers idle workers of its device
// kind have open sessions ("cpu" jobs on device "cpu" workers, "cuda" jobs on "cuda:N" workers),
// taking the idle workers in id order (rank 0 = the first): all ranks or none.
//
// One pass: RESTARTING jobs first (they hold work already done), then QUEUED jobs, each in
// submission order. A RESTARTING job that cannot start yet keeps the idle workers of its kind
// that it needs (a reservation: a lost rank's peers stop one by one, and each used to go to a
// newer job) as long as enough workers of its kind are in service (connected, not draining) to
// run it once they are idle; otherwise it reserves nothing. A QUEUED job that cannot start does
// not block later ones: a smaller or other-device job behind it may start at once (backfilling,
// no reservation). The price: a large job can wait as long as smaller jobs keep enough workers
// busy; the oldest such job still goes first whenever enough workers are idle at one pass (a
// finished job frees all its workers at once).
//
// The scheduler reads the jobs from the JobStore and the idle workers through a callback (the
// SessionManager's), and starts a job through another (the facade's, which assigns the ranks and
// sends the Assigns). It holds no job or worker state of its own.
//
// Thread-safety: not thread-safe; the coordinator loop only. Re-entrant: a Run() from inside a
// start callback (a listener, a job ending inside it) makes the running Run() do another pass.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "coordinator/job_store.h"
#include "coordinator/session_manager.h"
#include "mat/v1/service.pb.h"

namespace mat::coordinator {

// True when a worker training on `worker_device` ("cpu" | "cuda:N") can run a rank of a job of
// kind `job_device` ("cpu" | "cuda", JobSpec.resources.device).
bool DeviceMatches(const std::string& job_device, const std::string& worker_device);

// The first `world` workers of `idle` (in its order) whose device matches `job_device`; nullopt
// when there are fewer, or world < 1.
std::optional<std::vector<std::string>> PlaceGang(int world, const std::string& job_device,
                                                  const std::vector<IdleWorker>& idle);

// Why a job of `world` ranks on `job_device` ("cpu" | "cuda") has not started, from the workers
// ListWorkers reports, for `matctl status` ("waiting:"). Matching workers only (DeviceMatches):
//   "needs 2 cpu workers, 1 is connected: start 1 more (mat-worker --device cpu)"
//   "needs 2 idle cpu workers, 1 of the 3 connected is idle; the others run job-000001"
//   "needs 2 idle cpu workers, 1 of the 2 connected is idle; 1 is still stopping a cancelled
//    rank of job-000015 (one blocked in a collective ... --rendezvous-timeout-ms)"
// A worker that is neither IDLE nor BUSY (DISCONNECTED, DRAINING) does not count as connected.
//   ... "; 2 jobs are ahead of it for cpu workers: job-000003, job-000004" when `ahead` (JobsAhead)
//   is not empty (at most 5 ids, then "and N more").
std::string DescribeWait(int world, const std::string& job_device,
                         const std::vector<v1::WorkerInfo>& workers,
                         const std::vector<std::string>& ahead = {});

class GangScheduler {
 public:
  // The idle workers now, in scheduling order; also the workers in service (idle, busy or
  // stopping a rank; not draining).
  using IdleFn = std::function<std::vector<IdleWorker>()>;
  // Starts `job` on `workers` (rank order). A non-OK status (a store error) ends the pass; the
  // next Run() tries again.
  using StartFn = std::function<absl::Status(const JobRecord& job,
                                             const std::vector<std::string>& workers)>;

  // `store` is borrowed and must outlive the scheduler.
  GangScheduler(JobStore& store, IdleFn idle, IdleFn in_service, StartFn start);
  GangScheduler(const GangScheduler&) = delete;
  GangScheduler& operator=(const GangScheduler&) = delete;

  // Starts every RESTARTING, then QUEUED, job that can start now. A store error listing the jobs
  // is logged and ends the pass.
  void Run();

  // The jobs a pass considers before `job_id` (a QUEUED or RESTARTING job of `state`) that want
  // workers of the same kind (`device`): every RESTARTING job submitted earlier and, for a QUEUED
  // job, every RESTARTING job and the QUEUED ones submitted earlier. In pass order. (Backfilling
  // may still start the job before them when they need more workers than it does.)
  absl::StatusOr<std::vector<std::string>> JobsAhead(const std::string& job_id,
                                                     v1::JobState state,
                                                     const std::string& device);

 private:
  void Pass();

  JobStore& store_;
  IdleFn idle_;
  IdleFn in_service_;
  StartFn start_;
  // True while Run() runs; a nested call only sets again_, and the running call makes another
  // pass.
  bool running_ = false;
  bool again_ = false;
};

}  // namespace mat::coordinator
