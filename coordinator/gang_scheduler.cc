// GangScheduler (gang_scheduler.h): gang placement over the store's queue.
#include "coordinator/gang_scheduler.h"

#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

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

std::string DescribeWait(int world, const std::string& job_device,
                         const std::vector<v1::WorkerInfo>& workers) {
  int connected = 0;
  int idle = 0;
  std::set<std::string> busy_with;  // the jobs the matching busy workers run
  for (const v1::WorkerInfo& w : workers) {
    if (!DeviceMatches(job_device, w.capabilities().device())) continue;
    if (w.state() == v1::WORKER_STATE_IDLE) {
      ++connected;
      ++idle;
    } else if (w.state() == v1::WORKER_STATE_BUSY) {
      ++connected;
      busy_with.insert(w.job_id());
    }
  }
  const std::string workers_word = world == 1 ? " worker" : " workers";
  if (connected < world) {
    return absl::StrCat("needs ", world, " ", job_device, workers_word, ", ", connected,
                        connected == 1 ? " is" : " are", " connected: start ", world - connected,
                        " more (mat-worker --device ",
                        job_device == "cuda" ? "cuda:N" : job_device, ")");
  }
  std::string text = absl::StrCat("needs ", world, " idle ", job_device, workers_word, ", ", idle,
                                  " of the ", connected, " connected ",
                                  idle == 1 ? "is" : "are", " idle");
  if (!busy_with.empty()) {
    absl::StrAppend(&text, "; the others run ", absl::StrJoin(busy_with, ", "));
  }
  return text;
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
