// Integration test of the admission limits (issue 6, "Security") with the real mat-coordinator
// on loopback and `matctl submit`:
//   - with --data-root, a spec whose data.dir escapes the root (`..`, a symlink to outside, an
//     absolute path elsewhere) is refused INVALID_ARGUMENT with a message naming data.dir and the
//     root; one inside is accepted;
//   - with --max-jobs-per-client 2, the third queued job from the same client (no auth: the peer
//     host) is refused RESOURCE_EXHAUSTED naming the count and the limit; cancelling one frees
//     a slot;
//   - mat-worker refuses to start, naming the flag or file, on a --work-dir another worker
//     holds, a --checkpoint-dir it cannot write, a --device cuda:N this machine lacks, --threads
//     above 1024 or a saved worker.id the coordinator refuses, and stops when another worker is
//     connected with its id.
// Most cases start no worker, or one that exits at once; the duplicate-id case waits 15 s.
// ctest TIMEOUT 120.
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/integration/harness.h"

namespace mat {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;
using testing_loopback::CommandResult;
using testing_loopback::kCoordinator;
using testing_loopback::ReadText;

class LimitsTest : public testing_loopback::LoopbackTest {
 protected:
  void StartCoordinatorWith(const std::vector<std::string>& extra) {
    coordinator_log_ = root_ + "/coordinator";
    std::vector<std::string> args = {kCoordinator, "--listen", "127.0.0.1:0", "--metrics-listen",
                                     "", "--state-dir", state_dir_, "--log-level", "info"};
    args.insert(args.end(), extra.begin(), extra.end());
    coordinator_pid_ = Spawn(args, coordinator_log_ + ".out", coordinator_log_ + ".err");
    ASSERT_GT(coordinator_pid_, 0);
    address_ = WaitForLine(state_dir_ + "/coordinator.addr", 15s);
    ASSERT_FALSE(address_.empty()) << "no address file; stderr:\n"
                                   << ReadText(coordinator_log_ + ".err");
  }

  // A small job spec reading `data_dir`, written to root_/<name>.yaml.
  std::string JobFile(const std::string& name, const std::string& data_dir) {
    const std::string path = root_ + "/" + name + ".yaml";
    std::ofstream(path) << "model: {layers: 1, d_model: 32, heads: 2, d_ff: 64}\n"
                        << "data: {dir: '" << data_dir << "'}\n"
                        << "train: {steps: 10, batch_size: 4}\n"
                        << "policy: {probe_samples: 2}\n";
    return path;
  }

  CommandResult Submit(const std::string& file) { return Matctl(address_, {"submit", file}); }
};

// One mat-worker per --work-dir (its LOCK file): a second one on the same folder used to share
// the first's worker id and loop forever on "already has an open session". It now exits 1
// naming the folder; once the first is gone (even SIGKILLed) the folder is free again.
TEST_F(LimitsTest, OneWorkerPerWorkDir) {
  StartCoordinatorWith({});
  const pid_t first = StartWorker("w0");
  ASSERT_GT(first, 0);
  ASSERT_FALSE(WaitForLine(root_ + "/w0/worker.id", 15s).empty()) << ReadText(root_ + "/w0.err");
  const std::vector<std::string> same = {testing_loopback::kWorker, "--coordinator", address_,
                                         "--work-dir", root_ + "/w0", "--threads", "1"};
  const pid_t second = Spawn(same, root_ + "/second.out", root_ + "/second.err");
  ASSERT_GT(second, 0);
  EXPECT_EQ(Wait(second, 15s), 1) << ReadText(root_ + "/second.err");
  EXPECT_THAT(ReadText(root_ + "/second.err"),
              HasSubstr("--work-dir '" + root_ + "/w0' is in use by another mat-worker"));
  ::kill(first, SIGKILL);
  Wait(first, 10s);
  const pid_t third = Spawn(same, root_ + "/third.out", root_ + "/third.err");
  ASSERT_GT(third, 0);
  EXPECT_EQ(Wait(third, 2s), -1) << "exited: " << ReadText(root_ + "/third.err");
}

// A --checkpoint-dir it cannot write: the worker registered IDLE and failed every job it got, at
// its first checkpoint ("cannot create directory ...: Read-only file system"). It now exits 1 at
// start naming the flag and the folder. (/proc: not writable even by root, who runs CI.)
TEST_F(LimitsTest, AWorkerWhoseCheckpointDirCannotBeWrittenDoesNotStart) {
  const pid_t worker = Spawn({testing_loopback::kWorker, "--coordinator", "127.0.0.1:1",
                              "--work-dir", root_ + "/wc", "--checkpoint-dir", "/proc",
                              "--threads", "1"},
                             root_ + "/wc.out", root_ + "/wc.err");
  ASSERT_GT(worker, 0);
  EXPECT_EQ(Wait(worker, 15s), 1) << ReadText(root_ + "/wc.err");
  EXPECT_THAT(ReadText(root_ + "/wc.err"), HasSubstr("--checkpoint-dir: cannot write in '/proc'"));
}

// --device cuda:N on a machine without that GPU: the worker registered IDLE and failed every
// CUDA job in the queue ("train.device: cuda:0 requested but no CUDA device is available"). It
// now exits 1 at start naming the flag. (cuda:99: no machine here has 100 GPUs.)
TEST_F(LimitsTest, AWorkerWhoseGpuIsNotThereDoesNotStart) {
  const pid_t worker =
      Spawn({testing_loopback::kWorker, "--coordinator", "127.0.0.1:1", "--work-dir",
             root_ + "/wg", "--device", "cuda:99", "--threads", "1"},
            root_ + "/wg.out", root_ + "/wg.err");
  ASSERT_GT(worker, 0);
  EXPECT_EQ(Wait(worker, 15s), 1) << ReadText(root_ + "/wg.err");
  EXPECT_THAT(ReadText(root_ + "/wg.err"),
              ::testing::ContainsRegex("--device cuda:99: this machine has [0-9]+ CUDA devices? "
                                       "LibTorch can use"));
}

// --threads above the trainer's bound: every job it got failed ("train.threads must be in
// [0, 1024]"), blaming the job. It now exits 2 at start naming the flag.
TEST_F(LimitsTest, AWorkerWithTooManyThreadsDoesNotStart) {
  const pid_t worker = Spawn({testing_loopback::kWorker, "--coordinator", "127.0.0.1:1",
                              "--work-dir", root_ + "/wt", "--threads", "100000"},
                             root_ + "/wt.out", root_ + "/wt.err");
  ASSERT_GT(worker, 0);
  EXPECT_EQ(Wait(worker, 15s), 2) << ReadText(root_ + "/wt.err");
  EXPECT_THAT(ReadText(root_ + "/wt.err"), HasSubstr("--threads 100000 is not in 0..1024"));
}

// A worker.id the coordinator refuses (copied, edited): the worker logged the refusal and exited
// 0, as after SIGTERM. It now exits 78 (the systemd unit does not restart it) naming the file.
TEST_F(LimitsTest, AWorkerWhoseSavedIdIsRefusedExitsNamingTheFile) {
  StartCoordinatorWith({});
  fs::create_directories(root_ + "/wb");
  { std::ofstream(root_ + "/wb/worker.id") << "../../etc/passwd\n"; }
  const pid_t worker = Spawn({testing_loopback::kWorker, "--coordinator", address_,
                              "--work-dir", root_ + "/wb", "--threads", "1"},
                             root_ + "/wb.out", root_ + "/wb.err");
  ASSERT_GT(worker, 0);
  EXPECT_EQ(Wait(worker, 15s), 78) << ReadText(root_ + "/wb.err");
  EXPECT_THAT(ReadText(root_ + "/wb.err"),
              HasSubstr("(worker id '../../etc/passwd' from " + root_ +
                        "/wb/worker.id: remove that file to get a new id)"));
}

// A work dir copied with its worker.id and worker.secret (a cloned VM image): the second worker
// registered as the first and retried "already has an open session" every second, for good.
// After 15 s of that it now exits 78 naming the file; the first worker is untouched. (A copy
// without worker.secret is refused at once: tests/integration/auth_test.cc.)
TEST_F(LimitsTest, AWorkerWhoseIdIsConnectedElsewhereExitsNamingTheFile) {
  StartCoordinatorWith({});
  const pid_t first = StartWorker("w0");
  ASSERT_GT(first, 0);
  const std::string id = WaitForLine(root_ + "/w0/worker.id", 15s);
  ASSERT_FALSE(id.empty()) << ReadText(root_ + "/w0.err");
  fs::create_directories(root_ + "/copy");
  fs::copy_file(root_ + "/w0/worker.id", root_ + "/copy/worker.id");
  fs::copy_file(root_ + "/w0/worker.secret", root_ + "/copy/worker.secret");
  const pid_t copy = Spawn({testing_loopback::kWorker, "--coordinator", address_, "--work-dir",
                            root_ + "/copy", "--threads", "1"},
                           root_ + "/copy.out", root_ + "/copy.err");
  ASSERT_GT(copy, 0);
  EXPECT_EQ(Wait(copy, 40s), 78) << ReadText(root_ + "/copy.err");
  EXPECT_THAT(ReadText(root_ + "/copy.err"),
              HasSubstr("another mat-worker has been connected as " + id + " for 15 s: a copied "
                        "work dir? Remove " + root_ + "/copy/worker.id"));
  EXPECT_EQ(Wait(first, 1s), -1) << "the first worker stopped: " << ReadText(root_ + "/w0.err");
}

TEST_F(LimitsTest, DataRootAndJobsPerClient) {
  const std::string data = root_ + "/data";
  fs::create_directories(data + "/wikitext-2");
  fs::create_directories(root_ + "/private");
  fs::create_directory_symlink(root_ + "/private", data + "/escape");
  StartCoordinatorWith({"--data-root", data, "--max-jobs-per-client", "2"});
  EXPECT_THAT(ReadText(coordinator_log_ + ".err") + ReadText(coordinator_log_ + ".out"),
              HasSubstr("jobs may read data under: " + data));

  // Outside the root: refused, naming data.dir and the root; nothing is stored.
  for (const std::string& dir :
       {data + "/../private", data + "/escape", std::string("/etc"), std::string("wikitext-2")}) {
    CommandResult r = Submit(JobFile("outside", dir));
    EXPECT_EQ(r.exit_code, 1) << dir << "\n" << r.out << r.err;
    EXPECT_THAT(r.err, HasSubstr("INVALID_ARGUMENT")) << dir;
    EXPECT_THAT(r.err, HasSubstr("data.dir: '" + dir + "'")) << dir;
    EXPECT_THAT(r.err, HasSubstr(data)) << dir;
  }
  CommandResult list = Matctl(address_, {"list"});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  EXPECT_THAT(list.out, ::testing::Not(HasSubstr("job-")));

  // Inside: accepted (twice: the per-client limit).
  CommandResult first = Submit(JobFile("inside", data + "/wikitext-2"));
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_THAT(first.out, HasSubstr("job-000001"));
  CommandResult second = Submit(JobFile("inside", data + "/./wikitext-2/"));
  ASSERT_EQ(second.exit_code, 0) << second.err;

  // The third active job of this client (the loopback host) is refused.
  CommandResult third = Submit(JobFile("inside", data + "/wikitext-2"));
  EXPECT_EQ(third.exit_code, 1) << third.out;
  EXPECT_THAT(third.err, HasSubstr("RESOURCE_EXHAUSTED"));
  EXPECT_THAT(third.err, HasSubstr("has 2 active jobs"));
  EXPECT_THAT(third.err, HasSubstr("the limit is 2 (--max-jobs-per-client)"));

  // Cancelling one frees its slot.
  CommandResult cancel = Matctl(address_, {"cancel", "job-000001"});
  ASSERT_EQ(cancel.exit_code, 0) << cancel.err;
  CommandResult fourth = Submit(JobFile("inside", data + "/wikitext-2"));
  EXPECT_EQ(fourth.exit_code, 0) << fourth.err;

  ::kill(coordinator_pid_, SIGTERM);
  EXPECT_EQ(Wait(coordinator_pid_, 20s), 0);
}

}  // namespace
}  // namespace mat
