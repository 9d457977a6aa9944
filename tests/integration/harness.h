// The loopback test fixture: starts the real binaries (MAT_BIN_DIR) as child processes with
// their output in files under a temporary root, waits for them with deadlines, runs matctl as a
// user would, and kills whatever still runs in TearDown (then removes the root).
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nlohmann/json.hpp"

extern char** environ;

namespace mat {
namespace testing_loopback {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

inline const std::string kCoordinator = std::string(MAT_BIN_DIR) + "/mat-coordinator";
inline const std::string kMatctl = std::string(MAT_BIN_DIR) + "/matctl";
inline const std::string kWorker = std::string(MAT_BIN_DIR) + "/mat-worker";
inline const std::string kTinyJob = std::string(MAT_SOURCE_DIR) + "/examples/bert-wikitext2-tiny.yaml";

// The seed of a test's random draws (kill times, cancels): MAT_TEST_SEED when set, to replay a
// failure, else drawn; printed either way.
inline uint64_t TestSeed() {
  uint64_t seed = std::random_device{}();
  if (const char* env = std::getenv("MAT_TEST_SEED"); env != nullptr) {
    seed = std::strtoull(env, nullptr, 10);
  }
  std::printf("random seed %llu (MAT_TEST_SEED=%llu replays it)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  return seed;
}

inline std::string ReadText(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One JSON value per non-empty line of `path` (metrics.jsonl, masks.jsonl, ...).
inline std::vector<nlohmann::json> ReadJsonLines(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::istringstream in(ReadText(path));
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  }
  return out;
}

struct CommandResult {
  int exit_code = -1;  // -1: did not exit in time (killed)
  std::string out;
  std::string err;
};

class LoopbackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "mat_loopback_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    state_dir_ = root_ + "/state";
    ASSERT_TRUE(fs::exists(kCoordinator)) << kCoordinator;
    ASSERT_TRUE(fs::exists(kMatctl)) << kMatctl;
  }

  void TearDown() override {
    for (pid_t pid : children_) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  // Starts `argv` with stdout and stderr redirected to files; remembers the child for TearDown.
  pid_t Spawn(const std::vector<std::string>& args, const std::string& out_path,
              const std::string& err_path) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    EXPECT_EQ(rc, 0) << "cannot start " << args[0];
    if (rc != 0) return -1;
    children_.insert(pid);
    return pid;
  }

  // Waits up to `timeout` for `pid`; its exit code, or -1 (after SIGKILL) when it did not exit.
  int Wait(pid_t pid, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    while (true) {
      const pid_t done = ::waitpid(pid, &status, WNOHANG);
      if (done == pid) break;
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        children_.erase(pid);
        return -1;
      }
      std::this_thread::sleep_for(20ms);
    }
    children_.erase(pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  // Runs matctl against `address` and waits (at most `timeout`) for it.
  CommandResult Matctl(const std::string& address, std::vector<std::string> args,
                       std::chrono::milliseconds timeout = 15s) {
    args.insert(args.begin(), {kMatctl, "--coordinator", address});
    const std::string out = root_ + "/matctl.out";
    const std::string err = root_ + "/matctl.err";
    CommandResult r;
    const pid_t pid = Spawn(args, out, err);
    if (pid < 0) return r;
    r.exit_code = Wait(pid, timeout);
    r.out = ReadText(out);
    r.err = ReadText(err);
    return r;
  }

  // Writes `text` to root_/name; the path.
  std::string WriteJob(const std::string& name, const std::string& text) {
    const std::string path = root_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }

  // `matctl status JOB -o json` against address_, parsed; null when matctl failed (e.g. the
  // coordinator is down).
  nlohmann::json Status(const std::string& job) {
    CommandResult r = Matctl(address_, {"status", job, "-o", "json"});
    if (r.exit_code != 0) return nullptr;
    return nlohmann::json::parse(r.out, nullptr, false);
  }

  // Polls Status every 100 ms until `pred` holds on an object (or `timeout`); the last status.
  nlohmann::json WaitFor(const std::string& job,
                         const std::function<bool(const nlohmann::json&)>& pred,
                         std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    nlohmann::json s;
    while (std::chrono::steady_clock::now() < deadline) {
      s = Status(job);
      if (s.is_object() && pred(s)) return s;
      std::this_thread::sleep_for(100ms);
    }
    return s;
  }

  // Polls until `path` exists and is a complete line; its text without the newline, or "".
  std::string WaitForLine(const std::string& path, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      const std::string text = ReadText(path);
      if (!text.empty() && text.back() == '\n') return text.substr(0, text.size() - 1);
      std::this_thread::sleep_for(20ms);
    }
    return "";
  }

  // Starts mat-coordinator (gRPC on `listen`, by default a free port; metrics on a free port,
  // with `extra` flags) and waits for its address files.
  void StartCoordinator(const std::vector<std::string>& extra = {},
                        const std::string& listen = "127.0.0.1:0") {
    fs::remove(state_dir_ + "/coordinator.addr");
    fs::remove(state_dir_ + "/coordinator.metrics.addr");
    coordinator_log_ = root_ + "/coordinator." + std::to_string(++starts_);
    std::vector<std::string> args = {kCoordinator, "--listen", listen, "--metrics-listen",
                                     "127.0.0.1:0", "--state-dir", state_dir_, "--log-level",
                                     "info"};
    args.insert(args.end(), extra.begin(), extra.end());
    coordinator_pid_ = Spawn(args, coordinator_log_ + ".out", coordinator_log_ + ".err");
    ASSERT_GT(coordinator_pid_, 0);
    address_ = WaitForLine(state_dir_ + "/coordinator.addr", 15s);
    ASSERT_FALSE(address_.empty()) << "no address file; stderr:\n"
                                   << ReadText(coordinator_log_ + ".err");
    metrics_address_ = WaitForLine(state_dir_ + "/coordinator.metrics.addr", 5s);
    ASSERT_FALSE(metrics_address_.empty());
    EXPECT_THAT(address_, ::testing::StartsWith("127.0.0.1:"));
    EXPECT_NE(address_, "127.0.0.1:0");
    // stdout says the same (written right after the files).
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (ReadText(coordinator_log_ + ".out").find("listening on " + address_ + "\n") ==
               std::string::npos &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(20ms);
    }
    EXPECT_THAT(ReadText(coordinator_log_ + ".out"), HasSubstr("listening on " + address_ + "\n"));
  }

  // Starts mat-worker `name` (work dir root_/name, logs root_/name.out|.err) against the
  // coordinator at address_, with one intra-op thread and `extra` flags.
  pid_t StartWorker(const std::string& name, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {kWorker, "--coordinator", address_, "--work-dir",
                                     root_ + "/" + name, "--threads", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    return Spawn(args, root_ + "/" + name + ".out", root_ + "/" + name + ".err");
  }

  std::string root_;
  std::string state_dir_;
  std::set<pid_t> children_;
  int starts_ = 0;
  pid_t coordinator_pid_ = -1;
  std::string coordinator_log_;
  std::string address_;
  std::string metrics_address_;
};

}  // namespace testing_loopback
}  // namespace mat
