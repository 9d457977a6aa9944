// GangScheduler (gang_scheduler.h): gang placement over the store's queue.
#include "coordinator/gang_scheduler.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

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
                         const std::vector<v1::WorkerInfo>& workers,
                         const std::vector<std::string>& ahead) {
  std::string queue;
  if (!ahead.empty()) {
    constexpr size_t kNamed = 5;
    const std::vector<std::string> named(ahead.begin(),
                                         ahead.begin() + std::min(ahead.size(), kNamed));
    queue = absl::StrCat("; ", ahead.size(), ahead.size() == 1 ? " job is" : " jobs are",
                         " ahead of it for ", job_device, " workers: ", absl::StrJoin(named, ", "));
    if (ahead.size() > kNamed) absl::StrAppend(&queue, " and ", ahead.size() - kNamed, " more");
  }
  int connected = 0;
  int idle = 0;
  int stopping = 0;
  std::set<std::string> busy_with;    // the jobs the matching busy workers run
  std::set<std::string> stopping_of;  // the jobs whose cancelled ranks are still stopping
  for (const v1::WorkerInfo& w : workers) {
    if (!DeviceMatches(job_device, w.capabilities().device())) continue;
    if (w.state() == v1::WORKER_STATE_IDLE) {
      ++connected;
      ++idle;
    } else if (w.state() == v1::WORKER_STATE_BUSY && w.stopping()) {
      ++connected;
      ++stopping;
      stopping_of.insert(w.job_id());
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
                        job_device == "cuda" ? "cuda:N" : job_device, ")", queue);
  }
  std::string text = absl::StrCat("needs ", world, " idle ", job_device, workers_word, ", ", idle,
                                  " of the ", connected, " connected ",
                                  idle == 1 ? "is" : "are", " idle");
  if (!busy_with.empty()) {
    absl::StrAppend(&text, "; ", stopping == 0 ? "the others" : "others", " run ",
                    absl::StrJoin(busy_with, ", "));
  }
  if (stopping > 0) {
    // A rank blocked in a collective with a lost peer only stops at the collective's timeout.
    absl::StrAppend(&text, "; ", stopping, stopping == 1 ? " is" : " are",
                    " still stopping a cancelled rank of ", absl::StrJoin(stopping_of, ", "),
                    " (one blocked in a collective with a lost peer stops at the worker's "
                    "--rendezvous-timeout-ms)");
  }
  return text + queue;
}

GangScheduler::GangScheduler(JobStore& store, IdleFn idle, IdleFn in_service, StartFn start)
    : store_(store),
      idle_(std::move(idle)),
      in_service_(std::move(in_service)),
      start_(std::move(start)) {}

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

absl::StatusOr<std::vector<std::string>> GangScheduler::JobsAhead(const std::string& job_id,
                                                                  v1::JobState state,
                                                                  const std::string& device) {
  std::vector<std::string> ahead;
  for (v1::JobState s : {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_QUEUED}) {
    if (state == v1::JOB_STATE_RESTARTING && s == v1::JOB_STATE_QUEUED) break;
    std::string token;
    do {
      MAT_ASSIGN_OR_RETURN(JobPage page, store_.ListJobs(kMaxPageSize, token, {s}));
      for (const JobRecord& job : page.jobs) {
        if (job.id == job_id) return ahead;  // its own place in the pass: the rest come after
        if (job.spec.resources().device() == device) ahead.push_back(job.id);
      }
      token = page.next_page_token;
    } while (!token.empty());
  }
  return ahead;
}

void GangScheduler::Pass() {
  std::set<std::string> reserved;  // idle workers kept for a RESTARTING job
  auto available = [&] {
    std::vector<IdleWorker> idle = idle_();
    idle.erase(std::remove_if(idle.begin(), idle.end(),
                              [&](const IdleWorker& w) { return reserved.count(w.id) != 0; }),
               idle.end());
    return idle;
  };
  // Keeps `world` idle workers of `device` (or fewer: those there are) for a RESTARTING job
  // when enough workers of its kind are in service to run it once they are idle.
  auto reserve = [&](int world, const std::string& device, const std::vector<IdleWorker>& idle) {
    int in_service = 0;
    for (const IdleWorker& w : in_service_()) in_service += DeviceMatches(device, w.device) ? 1 : 0;
    if (in_service < world) return;
    int kept = 0;
    for (const IdleWorker& w : idle) {
      if (kept == world) break;
      if (DeviceMatches(device, w.device) && reserved.insert(w.id).second) ++kept;
    }
  };
  std::vector<IdleWorker> idle = available();
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
        const int world = job.spec.resources().workers();
        const std::string& device = job.spec.resources().device();
        std::optional<std::vector<std::string>> picked = PlaceGang(world, device, idle);
        if (!picked.has_value()) {
          // Not enough workers for this one: later jobs may still fit (no head-of-line
          // blocking), but not on the workers a restarting job keeps.
          if (state == v1::JOB_STATE_RESTARTING) {
            reserve(world, device, idle);
            idle = available();
          }
          continue;
        }
        if (absl::Status st = start_(job, *picked); !st.ok()) {
          spdlog::error("scheduler: job {} could not start: {}", job.id, st.ToString());
          return;  // a store error: try again at the next Run()
        }
        idle = available();  // less the picked workers, unless the job failed or already ended
      }
      token = page->next_page_token;
      if (token.empty()) break;
    }
  }
}

}  // namespace mat::coordinator
