// Soak on loopback (issue 6): 20 small jobs submitted concurrently by 4 clients (4 matctl
// processes at a time) to a real mat-coordinator with 3 mat-workers, some cancelled at random
// moments (queued or running). Every job must end SUCCEEDED or CANCELLED, the store must be
// consistent (a finished job has its summary and equal checksums on every rank; a cancelled one
// its reason; no worker is left BUSY), and neither the coordinator nor the workers may grow in
// open file descriptors or memory from the first wave of jobs to the second.
#include <algorithm>
#include <map>
#include <random>

#include "nlohmann/json.hpp"
#include "tests/integration/harness.h"

namespace mat {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using testing_loopback::CommandResult;
using testing_loopback::kMatctl;
using testing_loopback::ReadText;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

const std::string kCorpus = std::string(MAT_SHARED_DIR) + "/data/wikitext-2";

std::string SmallJobYaml(int seed, int workers) {
  return "seed: " + std::to_string(seed) + "\n"
         "model: {kind: bert, layers: 1, d_model: 32, heads: 2, d_ff: 64, max_seq_len: 16}\n"
         "data: {kind: wikitext, dir: " + kCorpus + ", seq_len: 16}\n"
         "train: {steps: 20, batch_size: 4, lr: 1.0e-3, warmup_steps: 2, eval_every: 10,"
         " eval_batches: 1, checkpoint_every: 10, threads: 1}\n"
         "policy: {kind: mat, warmup_steps: 5, probe_every: 5, probe_samples: 2}\n"
         "resources: {workers: " + std::to_string(workers) + ", device: cpu}\n";
}

// Open file descriptors and resident memory of a process.
struct Usage {
  int fds = 0;
  int64_t rss_kib = 0;
};

Usage UsageOf(pid_t pid) {
  Usage u;
  std::error_code error;
  for (auto it = fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd", error);
       !error && it != fs::directory_iterator(); it.increment(error)) {
    ++u.fds;
  }
  std::istringstream status(ReadText("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) u.rss_kib = std::stoll(line.substr(6));
  }
  return u;
}

class SoakTest : public testing_loopback::LoopbackTest {
 protected:
  // Submits `jobs` (YAML files) from 4 concurrent clients, each submitting its share in turn;
  // the job ids in submission order per client.
  std::vector<std::string> SubmitConcurrently(const std::vector<std::string>& jobs,
                                              const std::string& wave) {
    std::vector<pid_t> clients;
    for (int c = 0; c < 4; ++c) {
      std::string script;
      for (size_t j = c; j < jobs.size(); j += 4) {
        script += "'" + kMatctl + "' --coordinator " + address_ + " submit '" + jobs[j] +
                  "' || exit 1; ";
      }
      const std::string out = root_ + "/client" + wave + std::to_string(c);
      clients.push_back(Spawn({"/bin/sh", "-c", script}, out + ".out", out + ".err"));
    }
    std::vector<std::string> ids;
    for (int c = 0; c < 4; ++c) {
      const std::string out = root_ + "/client" + wave + std::to_string(c);
      EXPECT_EQ(Wait(clients[c], 60s), 0) << ReadText(out + ".err");
      std::istringstream lines(ReadText(out + ".out"));
      for (std::string line; std::getline(lines, line);) {
        if (!line.empty()) ids.push_back(line);
      }
    }
    return ids;
  }

  // Cancels `count` of `ids` at random moments over about `spread`; the cancelled ids (a job
  // already finished cannot be cancelled: FAILED_PRECONDITION, exit code 1).
  std::vector<std::string> CancelSome(std::vector<std::string> ids, int count, std::mt19937& rng,
                                      std::chrono::milliseconds spread) {
    std::shuffle(ids.begin(), ids.end(), rng);
    std::uniform_int_distribution<int> pause(0, static_cast<int>(spread.count() / count));
    std::vector<std::string> cancelled;
    for (int i = 0; i < count && i < static_cast<int>(ids.size()); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(pause(rng)));
      CommandResult r = Matctl(address_, {"cancel", ids[i], "--reason", "soak cancel"});
      if (r.exit_code == 0) {
        cancelled.push_back(ids[i]);
      } else {
        EXPECT_THAT(r.err, HasSubstr("FAILED_PRECONDITION")) << r.err;
      }
    }
    return cancelled;
  }

  // Waits until every job of `ids` is terminal (at most `timeout`); their final statuses.
  std::map<std::string, json> WaitAllDone(const std::vector<std::string>& ids,
                                          std::chrono::milliseconds timeout) {
    std::map<std::string, json> done;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (done.size() < ids.size() && std::chrono::steady_clock::now() < deadline) {
      for (const std::string& id : ids) {
        if (done.count(id) != 0) continue;
        json s = Status(id);
        if (!s.is_object()) continue;
        const std::string state = s["state"];
        if (state == "SUCCEEDED" || state == "FAILED" || state == "CANCELLED") done[id] = s;
      }
      std::this_thread::sleep_for(200ms);
    }
    return done;
  }

  // Every job ended well and is stored consistently.
  void CheckJobs(const std::vector<std::string>& ids, const std::vector<std::string>& cancelled,
                 const std::map<std::string, json>& done) {
    ASSERT_EQ(done.size(), ids.size()) << "some jobs never finished";
    for (const auto& [id, s] : done) {
      const std::string state = s["state"];
      const bool was_cancelled =
          std::find(cancelled.begin(), cancelled.end(), id) != cancelled.end();
      if (was_cancelled) {
        EXPECT_EQ(state, "CANCELLED") << id;
        EXPECT_EQ(s["error_message"], "soak cancel") << id;
        continue;
      }
      ASSERT_EQ(state, "SUCCEEDED") << s.dump(2);
      ASSERT_TRUE(s["summary"].is_object()) << s.dump(2);
      EXPECT_EQ(s["summary"]["steps"], 20) << id;
      ASSERT_GE(s["ranks"].size(), 1u) << s.dump(2);
      const std::string checksum = s["ranks"][0]["param_checksum"];
      EXPECT_EQ(checksum.size(), 16u) << s.dump(2);
      for (const json& r : s["ranks"]) EXPECT_EQ(r["param_checksum"], checksum) << id;
    }
  }
};

TEST_F(SoakTest, TwentyJobsFourClientsThreeWorkersRandomCancels) {
  StartCoordinator();
  std::vector<pid_t> workers;
  for (const char* w : {"w1", "w2", "w3"}) workers.push_back(StartWorker(w));
  std::mt19937 rng(static_cast<std::mt19937::result_type>(testing_loopback::TestSeed()));
  std::vector<std::string> yaml;
  for (int j = 0; j < 20; ++j) {
    // Every fifth job needs two ranks (gang scheduling among the single-rank ones).
    yaml.push_back(WriteJob("job" + std::to_string(j) + ".yaml",
                            SmallJobYaml(100 + j, j % 5 == 4 ? 2 : 1)));
  }
  const auto start = std::chrono::steady_clock::now();
  // Wave 1: 8 jobs, 2 cancelled; then the processes' usage as a baseline.
  std::vector<std::string> wave1(yaml.begin(), yaml.begin() + 8);
  std::vector<std::string> ids1 = SubmitConcurrently(wave1, "a");
  ASSERT_EQ(ids1.size(), 8u);
  std::vector<std::string> cancelled1 = CancelSome(ids1, 2, rng, 2000ms);
  std::map<std::string, json> done1 = WaitAllDone(ids1, 300s);
  CheckJobs(ids1, cancelled1, done1);
  std::this_thread::sleep_for(500ms);
  const Usage coordinator1 = UsageOf(coordinator_pid_);
  std::vector<Usage> workers1;
  for (pid_t w : workers) workers1.push_back(UsageOf(w));

  // Wave 2: the other 12, 3 cancelled.
  std::vector<std::string> wave2(yaml.begin() + 8, yaml.end());
  std::vector<std::string> ids2 = SubmitConcurrently(wave2, "b");
  ASSERT_EQ(ids2.size(), 12u);
  std::vector<std::string> cancelled2 = CancelSome(ids2, 3, rng, 3000ms);
  std::map<std::string, json> done2 = WaitAllDone(ids2, 300s);
  CheckJobs(ids2, cancelled2, done2);
  std::this_thread::sleep_for(500ms);
  const Usage coordinator2 = UsageOf(coordinator_pid_);

  // Every job is listed once, none is left active, and every worker is idle.
  CommandResult list = Matctl(address_, {"list"});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  for (const auto* ids : {&ids1, &ids2}) {
    for (const std::string& id : *ids) EXPECT_THAT(list.out, HasSubstr(id));
  }
  for (const char* state : {"QUEUED", "RUNNING", "RESTARTING"}) {
    CommandResult active = Matctl(address_, {"list", "--state", state});
    EXPECT_EQ(active.out.find("job-"), std::string::npos) << state << ":\n" << active.out;
  }
  CommandResult idle = Matctl(address_, {"workers"});
  EXPECT_EQ(idle.out.find("BUSY"), std::string::npos) << idle.out;
  EXPECT_EQ(std::count(idle.out.begin(), idle.out.end(), '\n') >= 3, true) << idle.out;

  // No growth from the first wave to the second (12 more jobs).
  std::printf("soak: 20 jobs (%zu cancelled) in %.1f s; coordinator fds %d -> %d, RSS %lld -> "
              "%lld KiB\n",
              cancelled1.size() + cancelled2.size(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
              coordinator1.fds, coordinator2.fds, static_cast<long long>(coordinator1.rss_kib),
              static_cast<long long>(coordinator2.rss_kib));
  EXPECT_LE(coordinator2.fds, coordinator1.fds + 2) << "the coordinator leaks descriptors";
  EXPECT_LE(coordinator2.rss_kib, coordinator1.rss_kib + 16 * 1024) << "the coordinator grows";
  for (size_t i = 0; i < workers.size(); ++i) {
    const Usage now = UsageOf(workers[i]);
    std::printf("soak: worker %zu fds %d -> %d, RSS %lld -> %lld KiB\n", i + 1, workers1[i].fds,
                now.fds, static_cast<long long>(workers1[i].rss_kib),
                static_cast<long long>(now.rss_kib));
    EXPECT_LE(now.fds, workers1[i].fds + 4) << "worker " << i + 1 << " leaks descriptors";
    EXPECT_LE(now.rss_kib, workers1[i].rss_kib + 64 * 1024) << "worker " << i + 1 << " grows";
  }
}

}  // namespace
}  // namespace mat
