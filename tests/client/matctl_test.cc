// Tests of client/matctl.h: every matctl command against an in-process coordinator daemon on
// loopback (port 0), through RunMatctl with captured output: results, exit codes, the messages
// of errors (code name + message), client-side spec checks, and unreachable coordinators (a
// closed port, and one that accepts TCP but never speaks HTTP/2, which only the deadline ends).
#include "client/matctl.h"

#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "coordinator/daemon.h"
#include "nlohmann/json.hpp"

namespace mat::client {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

const std::string kTinyJob = std::string(MAT_SOURCE_DIR) + "/examples/bert-wikitext2-tiny.yaml";

struct Result {
  int code = -1;
  std::string out;
  std::string err;
};

// A TCP socket bound to a free loopback port; listening (never accepting) when `listen` is set.
class LoopbackSocket {
 public:
  explicit LoopbackSocket(bool listen) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    socklen_t len = sizeof(addr);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    if (listen) ::listen(fd_, 16);
  }
  ~LoopbackSocket() { Close(); }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  int fd_ = -1;
  int port_ = 0;
};

class MatctlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "mat_matctl_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    coordinator::CoordinatorDaemonConfig config;
    config.listen_address = "127.0.0.1:0";
    config.metrics_listen_address = "";
    config.state_dir = root_ + "/state";
    config.shutdown_grace_seconds = 1;
    auto daemon = coordinator::CoordinatorDaemon::Start(config);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = std::move(*daemon);
  }

  void TearDown() override {
    daemon_.reset();
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  // matctl --coordinator <daemon> ARGS...
  Result Run(std::vector<std::string> args, const std::string& address = "") {
    args.insert(args.begin(), {"matctl", "--coordinator",
                               address.empty() ? daemon_->grpc_address() : address});
    std::vector<const char*> argv;
    for (const std::string& a : args) argv.push_back(a.c_str());
    std::ostringstream out, err;
    Result r;
    r.code = RunMatctl(static_cast<int>(argv.size()), argv.data(), out, err);
    r.out = out.str();
    r.err = err.str();
    return r;
  }

  std::string WriteFile(const std::string& name, const std::string& text) {
    const std::string path = root_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }

  // Runs `fn` on the coordinator loop and waits for it.
  absl::Status OnLoop(std::function<absl::Status(coordinator::Coordinator&)> fn) {
    std::promise<absl::Status> done;
    daemon_->Post([&](coordinator::Coordinator& c) { done.set_value(fn(c)); });
    return done.get_future().get();
  }

  // Waits until `job_id` has a watcher (a watch command has subscribed).
  bool WaitForWatcher(const std::string& job_id) {
    for (int i = 0; i < 500; ++i) {
      std::promise<int> n;
      daemon_->Post([&](coordinator::Coordinator& c) { n.set_value(c.WatcherCount(job_id)); });
      if (n.get_future().get() > 0) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  std::string root_;
  std::unique_ptr<coordinator::CoordinatorDaemon> daemon_;
};

TEST_F(MatctlTest, SubmitPrintsTheJobIdAndIsIdempotentWithARequestId) {
  Result first = Run({"submit", kTinyJob, "--request-id", "abc"});
  ASSERT_EQ(first.code, 0) << first.err;
  EXPECT_EQ(first.out, "job-000001\n");
  Result again = Run({"submit", kTinyJob, "--request-id", "abc"});
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_EQ(again.out, "job-000001\n");
  EXPECT_THAT(again.err, HasSubstr("already submitted"));
  Result other = Run({"submit", kTinyJob});
  ASSERT_EQ(other.code, 0) << other.err;
  EXPECT_EQ(other.out, "job-000002\n");
}

TEST_F(MatctlTest, SubmitChecksTheSpecBeforeSendingIt) {
  Result unknown = Run({"submit", WriteFile("bad.yaml", "model:\n  layres: 3\n")});
  EXPECT_EQ(unknown.code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(unknown.err, HasSubstr("model.layres"));
  Result range = Run({"submit", WriteFile("alpha.yaml", "policy:\n  alpha: 1.5\n")});
  EXPECT_EQ(range.code, 1);
  EXPECT_THAT(range.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(range.err, HasSubstr("policy.alpha"));
  EXPECT_THAT(range.err, HasSubstr("alpha.yaml"));
  Result missing = Run({"submit", root_ + "/missing.yaml"});
  EXPECT_EQ(missing.code, 1);
  EXPECT_THAT(missing.err, HasSubstr("NOT_FOUND"));
  // Nothing reached the coordinator.
  Result list = Run({"list"});
  ASSERT_EQ(list.code, 0);
  EXPECT_EQ(list.out, "ID  STATE  MODEL  POLICY  CREATED\n");
}

TEST_F(MatctlTest, ListStatusAndCancelShowAndChangeJobs) {
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  Result list = Run({"list"});
  ASSERT_EQ(list.code, 0) << list.err;
  EXPECT_THAT(list.out, HasSubstr("job-000001  QUEUED  bert L2 d128 H4  mat a=0.3"));
  EXPECT_THAT(list.out, HasSubstr("job-000002  QUEUED"));

  Result json_status = Run({"status", "job-000001", "-o", "json"});
  ASSERT_EQ(json_status.code, 0) << json_status.err;
  const auto j = nlohmann::json::parse(json_status.out);
  EXPECT_EQ(j["state"], "QUEUED");
  EXPECT_EQ(j["spec"]["train"]["steps"], 1000);
  Result text = Run({"status", "job-000001"});
  EXPECT_THAT(text.out, HasSubstr("state:       QUEUED"));

  Result cancel = Run({"cancel", "job-000001", "--reason", "enough"});
  ASSERT_EQ(cancel.code, 0) << cancel.err;
  EXPECT_EQ(cancel.out, "job-000001 CANCELLED\n");
  Result twice = Run({"cancel", "job-000001"});
  EXPECT_EQ(twice.code, 1);
  EXPECT_THAT(twice.err, HasSubstr("matctl: FAILED_PRECONDITION: "));
  Result filtered = Run({"list", "--state", "cancelled"});
  ASSERT_EQ(filtered.code, 0) << filtered.err;
  EXPECT_THAT(filtered.out, HasSubstr("job-000001  CANCELLED"));
  EXPECT_THAT(filtered.out, ::testing::Not(HasSubstr("job-000002")));
  EXPECT_EQ(Run({"list", "--state", "sleeping"}).code, 1);
}

TEST_F(MatctlTest, UnknownJobsAreNotFoundNamingTheId) {
  for (const char* command : {"status", "cancel", "watch", "spectra"}) {
    Result r = Run({command, "job-000404"});
    EXPECT_EQ(r.code, 1) << command;
    EXPECT_THAT(r.err, HasSubstr("matctl: NOT_FOUND: ")) << command;
    EXPECT_THAT(r.err, HasSubstr("job-000404")) << command;
  }
}

TEST_F(MatctlTest, WatchPrintsEventsUntilTheJobFinishes) {
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  auto watch = std::async(std::launch::async, [&] { return Run({"watch", "job-000001"}); });
  ASSERT_TRUE(WaitForWatcher("job-000001"));
  ASSERT_TRUE(OnLoop([](coordinator::Coordinator& c) {
                return c.UpdateJobState("job-000001", v1::JOB_STATE_RUNNING);
              }).ok());
  ASSERT_TRUE(OnLoop([](coordinator::Coordinator& c) {
                return c.UpdateJobState("job-000001", v1::JOB_STATE_SUCCEEDED);
              }).ok());
  ASSERT_EQ(watch.wait_for(10s), std::future_status::ready);
  Result r = watch.get();
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("job-000001 step 0 state QUEUED\n"));
  EXPECT_THAT(r.out, HasSubstr("state RUNNING\n"));
  EXPECT_THAT(r.out, HasSubstr("state SUCCEEDED\n"));
}

TEST_F(MatctlTest, SubmitWaitExitsNonZeroUnlessTheJobSucceeds) {
  auto submit = std::async(std::launch::async,
                           [&] { return Run({"submit", kTinyJob, "--wait"}); });
  ASSERT_TRUE(WaitForWatcher("job-000001"));
  ASSERT_TRUE(Run({"cancel", "job-000001"}).code == 0);
  ASSERT_EQ(submit.wait_for(10s), std::future_status::ready);
  Result r = submit.get();
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("job-000001\n"));
  EXPECT_THAT(r.out, HasSubstr("state CANCELLED"));
}

TEST_F(MatctlTest, SpectraPrintsCsvAndJson) {
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  ASSERT_TRUE(OnLoop([](coordinator::Coordinator& c) {
                absl::Status s = c.store().AppendLambdas("job-000001", 20, {0.5, 1.5});
                if (s.ok()) s = c.store().AppendLambdas("job-000001", 40, {0.25, 2});
                return s;
              }).ok());
  Result csv = Run({"spectra", "job-000001"});
  ASSERT_EQ(csv.code, 0) << csv.err;
  EXPECT_EQ(csv.out, "step,m0,m1\n20,0.5,1.5\n40,0.25,2\n");
  Result json = Run({"spectra", "job-000001", "-o", "json"});
  ASSERT_EQ(json.code, 0) << json.err;
  const auto j = nlohmann::json::parse(json.out);
  ASSERT_EQ(j["points"].size(), 2u);
  EXPECT_EQ(j["points"][1]["lambda_max"][0], 0.25);
}

TEST_F(MatctlTest, UnreachableCoordinatorIsUnavailableWithinTheTimeout) {
  LoopbackSocket closed(/*listen=*/false);  // bound, not listening: connection refused
  auto start = std::chrono::steady_clock::now();
  Result refused = Run({"--timeout", "2", "list"}, closed.address());
  EXPECT_EQ(refused.code, 1);
  EXPECT_THAT(refused.err, HasSubstr("matctl: UNAVAILABLE: "));
  EXPECT_THAT(refused.err, HasSubstr(closed.address()));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 4s);

  LoopbackSocket silent(/*listen=*/true);  // accepts TCP, never answers: only the deadline ends it
  start = std::chrono::steady_clock::now();
  Result mute = Run({"--timeout", "1", "status", "job-000001"}, silent.address());
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(mute.code, 1);
  EXPECT_THAT(mute.err, HasSubstr("matctl: UNAVAILABLE: "));
  EXPECT_THAT(mute.err, HasSubstr("within 1 s"));
  EXPECT_GE(took, 900ms);
  EXPECT_LT(took, 4s);

  start = std::chrono::steady_clock::now();
  Result watch = Run({"--timeout", "1", "watch", "job-000001"}, silent.address());
  EXPECT_EQ(watch.code, 1);
  EXPECT_THAT(watch.err, HasSubstr("matctl: UNAVAILABLE: "));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 4s);
}

TEST_F(MatctlTest, UsageErrorsExitTwo) {
  EXPECT_EQ(Run({}).code, 2);
  EXPECT_EQ(Run({"frobnicate"}).code, 2);
  EXPECT_EQ(Run({"status"}).code, 2);
  EXPECT_EQ(Run({"status", "job-000001", "-o", "yaml"}).code, 2);
  EXPECT_EQ(Run({"--timeout", "0", "list"}).code, 2);
  EXPECT_EQ(Run({"--help"}).code, 0);
}

}  // namespace
}  // namespace mat::client
