// GangScheduler (gang_scheduler.h): gang placement over the store's queue.
#include "coordinator/gang_scheduler.h"

#include <utility>

#include "spdlog/spdlog.h"

namespace mat::coordinator {

bool DeviceMatches(const std::string& job_device, const std::string& worker_device) {
  if (job_device == "cpu") return worker_device == "cpu";
  if (job_device == "cuda") return IsCudaDevice(worker_device);
  return false;
}

std::optional<std::vector<std::string>> PlaceGang(int world, const std::string& job_device,
                                                  const std::vector<IdleWorker>& idle) {
  if (world < 1) return std::nullopt;
  std::vector<std::string> picked;
  for (const IdleWorker& w : idle) {
    if (static_cast<int>(picked.size()) == world) break;
    if (DeviceMatches(job_device, w.device)) picked.push_back(w.id);
  }
  if (static_cast<int>(picked.size()) < world) return std::nullopt;
  return picked;
}

GangScheduler::GangScheduler(JobStore& store, IdleFn idle, StartFn start)
    : store_(store), idle_(std::move(idle)), start_(std::move(start)) {}

void GangScheduler::Run() {
  if (running_) {
    again_ = true;
    return;
  }
  running_ = true;
  do {
    again_ = false;
    Pass();
  } while (again_);
  running_ = false;
}

void GangScheduler::Pass() {
  std::vector<IdleWorker> idle = idle_();
  for (v1::JobState state : {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_QUEUED}) {
    std::string token;
    while (!idle.empty()) {
      absl::StatusOr<JobPage> page = store_.ListJobs(kMaxPageSize, token, {state});
      if (!page.ok()) {
        spdlog::error("scheduler: cannot list the {} jobs: {}", JobStateName(state),
                      page.status().ToString());
        return;
      }
      for (const JobRecord& job : page->jobs) {
        if (idle.empty()) return;
        std::optional<std::vector<std::string>> picked =
            PlaceGang(job.spec.resources().workers(), job.spec.resources().device(), idle);
        // Not enough workers for this one: later jobs may still fit (no head-of-line blocking).
        if (!picked.has_value()) continue;
        if (absl::Status st = start_(job, *picked); !st.ok()) {
          spdlog::error("scheduler: job {} could not start: {}", job.id, st.ToString());
          return;  // a store error: try again at the next Run()
        }
        idle = idle_();  // the picked workers, unless the job failed to start or already ended
      }
      token = page->next_page_token;
      if (token.empty()) break;
    }
  }
}

}  // namespace mat::coordinator
