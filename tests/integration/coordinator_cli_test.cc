// Integration test of the real binaries on loopback: MAT_BIN_DIR/mat-coordinator started with
// `--listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0` and a temporary state dir, driven with
// MAT_BIN_DIR/matctl as a user would, plus the gRPC API called directly (the server-side spec
// check), the standard gRPC health check and HTTP /healthz. Then the coordinator is SIGKILLed,
// matctl must say UNAVAILABLE, and a coordinator restarted on the same state dir lists the same
// jobs and stops gracefully on SIGTERM.
//
// Every child is waited for with a deadline and killed in TearDown if still running; the whole
// test is bounded (ctest TIMEOUT 60).
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "google/protobuf/unknown_field_set.h"
#include "mat/v1/service.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/integration/probes.h"

extern char** environ;

namespace mat {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

const std::string kCoordinator = std::string(MAT_BIN_DIR) + "/mat-coordinator";
const std::string kMatctl = std::string(MAT_BIN_DIR) + "/matctl";
const std::string kTinyJob = std::string(MAT_SOURCE_DIR) + "/examples/bert-wikitext2-tiny.yaml";

std::string ReadText(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct CommandResult {
  int exit_code = -1;  // -1: did not exit in time (killed)
  std::string out;
  std::string err;
};

class CoordinatorCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "mat_coordinator_cli_XXXXXX").string();
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

  // Runs matctl against `address` and waits (at most 15 s) for it.
  CommandResult Matctl(const std::string& address, std::vector<std::string> args) {
    args.insert(args.begin(), {kMatctl, "--coordinator", address});
    const std::string out = root_ + "/matctl.out";
    const std::string err = root_ + "/matctl.err";
    CommandResult r;
    const pid_t pid = Spawn(args, out, err);
    if (pid < 0) return r;
    r.exit_code = Wait(pid, 15s);
    r.out = ReadText(out);
    r.err = ReadText(err);
    return r;
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

  // Starts mat-coordinator on free ports and waits for its address files.
  void StartCoordinator() {
    fs::remove(state_dir_ + "/coordinator.addr");
    fs::remove(state_dir_ + "/coordinator.metrics.addr");
    coordinator_log_ = root_ + "/coordinator." + std::to_string(++starts_);
    coordinator_pid_ = Spawn({kCoordinator, "--listen", "127.0.0.1:0", "--metrics-listen",
                              "127.0.0.1:0", "--state-dir", state_dir_, "--log-level", "info"},
                             coordinator_log_ + ".out", coordinator_log_ + ".err");
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

  std::string root_;
  std::string state_dir_;
  std::set<pid_t> children_;
  int starts_ = 0;
  pid_t coordinator_pid_ = -1;
  std::string coordinator_log_;
  std::string address_;
  std::string metrics_address_;
};

TEST_F(CoordinatorCliTest, SubmitListStatusWatchCancelHealthAndRestartOnLoopback) {
  const auto test_start = std::chrono::steady_clock::now();
  ASSERT_NO_FATAL_FAILURE(StartCoordinator());

  // submit: the same request id twice gives the same job, none gives a new one.
  CommandResult first = Matctl(address_, {"submit", kTinyJob, "--request-id", "req-42"});
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const std::string job = first.out.substr(0, first.out.find('\n'));
  EXPECT_THAT(job, ::testing::MatchesRegex("job-[0-9]+"));
  CommandResult again = Matctl(address_, {"submit", kTinyJob, "--request-id", "req-42"});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(again.out, job + "\n");
  CommandResult other = Matctl(address_, {"submit", kTinyJob});
  ASSERT_EQ(other.exit_code, 0) << other.err;
  const std::string job2 = other.out.substr(0, other.out.find('\n'));
  EXPECT_NE(job2, job);

  // list shows both.
  CommandResult list = Matctl(address_, {"list"});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  EXPECT_THAT(list.out, ::testing::StartsWith("ID "));
  EXPECT_THAT(list.out, HasSubstr(job + "  QUEUED  bert L2 d128 H4  mat a=0.3"));
  EXPECT_THAT(list.out, HasSubstr(job2 + "  QUEUED"));

  // status -o json parses and says QUEUED.
  CommandResult status = Matctl(address_, {"status", job, "-o", "json"});
  ASSERT_EQ(status.exit_code, 0) << status.err;
  const nlohmann::json j = nlohmann::json::parse(status.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << status.out;
  EXPECT_EQ(j["job_id"], job);
  EXPECT_EQ(j["state"], "QUEUED");
  EXPECT_EQ(j["client_request_id"], "req-42");
  EXPECT_EQ(j["spec"]["model"]["d_model"], 128);

  // watch in the background, then cancel: watch prints CANCELLED and exits 0.
  const std::string watch_out = root_ + "/watch.out";
  const pid_t watch =
      Spawn({kMatctl, "--coordinator", address_, "watch", job}, watch_out, root_ + "/watch.err");
  ASSERT_GT(watch, 0);
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (ReadText(watch_out).find("state QUEUED") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_THAT(ReadText(watch_out), HasSubstr("state QUEUED")) << ReadText(root_ + "/watch.err");
  CommandResult cancel = Matctl(address_, {"cancel", job, "--reason", "integration test"});
  ASSERT_EQ(cancel.exit_code, 0) << cancel.err;
  EXPECT_EQ(cancel.out, job + " CANCELLED\n");
  EXPECT_EQ(Wait(watch, 10s), 0) << ReadText(root_ + "/watch.err");
  EXPECT_THAT(ReadText(watch_out), HasSubstr("state CANCELLED (integration test)"));

  // Cancelling again is FAILED_PRECONDITION; an unknown job is NOT_FOUND naming it.
  CommandResult twice = Matctl(address_, {"cancel", job});
  EXPECT_EQ(twice.exit_code, 1);
  EXPECT_THAT(twice.err, HasSubstr("FAILED_PRECONDITION"));
  CommandResult unknown = Matctl(address_, {"status", "job-999999"});
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(unknown.err, HasSubstr("job-999999"));

  // A spec with an unknown key: matctl refuses it, naming the key.
  const std::string bad = root_ + "/bad.yaml";
  std::ofstream(bad) << ReadText(kTinyJob) << "  layres: 3\n";  // inside `policy:`, the last section
  CommandResult rejected = Matctl(address_, {"submit", bad});
  EXPECT_EQ(rejected.exit_code, 1);
  EXPECT_THAT(rejected.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(rejected.err, HasSubstr("policy.layres"));

  // The coordinator checks too: the gRPC API called directly with bad specs.
  auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
  auto stub = v1::JobService::NewStub(channel);
  {
    v1::SubmitJobRequest request;
    request.mutable_spec()->mutable_model()->GetReflection()
        ->MutableUnknownFields(request.mutable_spec()->mutable_model())
        ->AddVarint(1234, 3);  // a key this schema does not have
    v1::SubmitJobReply reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 5s);
    grpc::Status s = stub->SubmitJob(&context, request, &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("spec.model: unknown field number 1234"));
  }
  {
    v1::SubmitJobRequest request;
    request.mutable_spec()->mutable_policy()->set_alpha(1.5);
    v1::SubmitJobReply reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 5s);
    grpc::Status s = stub->SubmitJob(&context, request, &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("policy.alpha"));
  }

  // grpc.health.v1 says SERVING; /healthz and /readyz answer 200.
  std::string error;
  EXPECT_EQ(probes::GrpcHealthCheck(channel, "", &error), 1) << error;
  const probes::HttpResult healthz = probes::HttpGet(metrics_address_, "/healthz");
  EXPECT_EQ(healthz.status, 200) << healthz.raw;
  EXPECT_EQ(healthz.body, "ok\n");
  EXPECT_EQ(probes::HttpGet(metrics_address_, "/readyz").status, 200);

  // SIGKILL: matctl now says UNAVAILABLE, promptly.
  ASSERT_EQ(::kill(coordinator_pid_, SIGKILL), 0);
  EXPECT_EQ(Wait(coordinator_pid_, 10s), 128 + SIGKILL);
  const std::string dead_address = address_;
  const auto down_start = std::chrono::steady_clock::now();
  CommandResult down = Matctl(dead_address, {"--timeout", "3", "list"});
  EXPECT_EQ(down.exit_code, 1);
  EXPECT_THAT(down.err, HasSubstr("UNAVAILABLE"));
  EXPECT_THAT(down.err, HasSubstr(dead_address));
  EXPECT_LT(std::chrono::steady_clock::now() - down_start, 5s);

  // Restarted on the same state dir (a new port): the same jobs, in the same states.
  ASSERT_NO_FATAL_FAILURE(StartCoordinator());
  CommandResult relist = Matctl(address_, {"list"});
  ASSERT_EQ(relist.exit_code, 0) << relist.err;
  EXPECT_THAT(relist.out, HasSubstr(job + "  CANCELLED"));
  EXPECT_THAT(relist.out, HasSubstr(job2 + "  QUEUED"));
  CommandResult resubmit = Matctl(address_, {"submit", kTinyJob, "--request-id", "req-42"});
  EXPECT_EQ(resubmit.out, job + "\n") << "idempotency must survive a restart";

  // SIGTERM: a graceful stop, exit 0, address files removed.
  ASSERT_EQ(::kill(coordinator_pid_, SIGTERM), 0);
  EXPECT_EQ(Wait(coordinator_pid_, 15s), 0) << ReadText(coordinator_log_ + ".err");
  EXPECT_FALSE(fs::exists(state_dir_ + "/coordinator.addr"));

  EXPECT_LT(std::chrono::steady_clock::now() - test_start, 60s);
}

}  // namespace
}  // namespace mat
