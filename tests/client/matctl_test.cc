// Tests of client/matctl.h: every matctl command against an in-process coordinator daemon on
// loopback (port 0), through RunMatctl with captured output: results, exit codes, the messages
// of errors (code name + message), client-side spec checks, `watch`'s progress bar (forced, and
// by default on a terminal), `plot`'s SVG file, `workers`, and unreachable coordinators (a
// closed port, and one that accepts TCP but never speaks HTTP/2, which only the deadline ends),
// and `download` against a hostile coordinator (a name outside the directory, a bad SHA-256).
#include "client/matctl.h"

#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/file_util.h"
#include "common/status.h"
#include "coordinator/daemon.h"
#include "mat/v1/service.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace mat::client {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;
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

  // matctl --coordinator <daemon> ARGS..., with `out` described by `terminal`.
  Result Run(std::vector<std::string> args, const std::string& address = "",
             const OutputTerminal& terminal = {}) {
    args.insert(args.begin(), {"matctl", "--coordinator",
                               address.empty() ? daemon_->grpc_address() : address});
    std::vector<const char*> argv;
    for (const std::string& a : args) argv.push_back(a.c_str());
    std::ostringstream out, err;
    Result r;
    r.code = RunMatctl(static_cast<int>(argv.size()), argv.data(), out, err, terminal);
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

  // Publishes a non-state event of job-000001 at `step` on the loop.
  void Publish(int64_t step, const std::function<void(v1::JobEvent&)>& fill) {
    v1::JobEvent event;
    event.set_job_id("job-000001");
    event.set_step(step);
    fill(event);
    ASSERT_TRUE(OnLoop([&](coordinator::Coordinator& c) {
                  c.PublishJobEvent(event);
                  return absl::OkStatus();
                }).ok());
  }

  // Watches job-000001 (`args` after "watch job-000001") while it runs: RUNNING, a progress
  // event, a mask, an evaluation, more progress, SUCCEEDED. Returns the watch's result.
  Result WatchARun(const std::vector<std::string>& args, const OutputTerminal& terminal) {
    std::vector<std::string> command = {"watch", "job-000001"};
    command.insert(command.end(), args.begin(), args.end());
    auto watch = std::async(std::launch::async, [&] { return Run(command, "", terminal); });
    EXPECT_TRUE(WaitForWatcher("job-000001"));
    EXPECT_TRUE(OnLoop([](coordinator::Coordinator& c) {
                  return c.UpdateJobState("job-000001", v1::JOB_STATE_RUNNING);
                }).ok());
    Publish(100, [](v1::JobEvent& e) {
      e.mutable_progress()->set_train_loss(6.5);
      e.mutable_progress()->set_active_modules(8);
      e.mutable_progress()->set_total_modules(8);
      e.mutable_progress()->set_steps_per_second(4);
    });
    Publish(100, [](v1::JobEvent& e) {
      e.mutable_mask()->set_mask_version(2);
      e.mutable_mask()->set_effective_step(100);
      e.mutable_mask()->set_active_modules(6);
    });
    Publish(200, [](v1::JobEvent& e) { e.mutable_evaluation()->set_val_loss(6.25); });
    Publish(250, [](v1::JobEvent& e) {
      e.mutable_progress()->set_train_loss(6.125);
      e.mutable_progress()->set_active_modules(6);
      e.mutable_progress()->set_total_modules(8);
      e.mutable_progress()->set_steps_per_second(5);
    });
    EXPECT_TRUE(OnLoop([](coordinator::Coordinator& c) {
                  return c.UpdateJobState("job-000001", v1::JOB_STATE_SUCCEEDED);
                }).ok());
    EXPECT_EQ(watch.wait_for(10s), std::future_status::ready);
    return watch.get();
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
  EXPECT_EQ(list.out, "ID  STATE  MODEL  POLICY  WORKERS  STEP  CREATED  ARTIFACTS\n");
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
  // Progress, losses, mask, compute and ranks: present before anything was reported.
  EXPECT_EQ(j["job_id"], "job-000001");
  EXPECT_EQ(j["error_message"], "");
  EXPECT_EQ(j["step"], 0);
  EXPECT_EQ(j["total_steps"], 1000);
  EXPECT_TRUE(j["train_loss"].is_null()) << "no loss reported yet";
  EXPECT_TRUE(j["val_loss"].is_null());
  EXPECT_TRUE(j["test_loss"].is_null());
  for (const char* key : {"active_modules", "total_modules", "mask_version", "flops_total",
                          "wall_seconds", "attempt"}) {
    EXPECT_EQ(j[key], 0) << key;
  }
  EXPECT_TRUE(j["summary"].is_null());
  EXPECT_EQ(j["ranks"], nlohmann::json::array());
  Result text = Run({"status", "job-000001"});
  EXPECT_THAT(text.out, HasSubstr("state:       QUEUED"));
  EXPECT_THAT(text.out, HasSubstr("step:        0 / 1000\n"));
  EXPECT_THAT(text.out, HasSubstr("loss:        train -  val -  test -\n"));

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
  EXPECT_EQ(Run({"list", "--state", "sleeping"}).code, 2);  // a usage error

  // compare: a job still queued has no summary yet; a cancelled one never will.
  Result queued = Run({"compare", "job-000002"});
  EXPECT_EQ(queued.code, 1);
  EXPECT_THAT(queued.err, HasSubstr("job-000002 has no summary yet (state QUEUED)"));
  Result ended = Run({"compare", "job-000001"});
  EXPECT_EQ(ended.code, 1);
  EXPECT_THAT(ended.err, HasSubstr("job-000001 has no summary: it ended CANCELLED"));
  EXPECT_THAT(ended.err, HasSubstr("compare needs jobs that succeeded"));
  ASSERT_TRUE(OnLoop([](coordinator::Coordinator& c) {  // SUCCEEDED with no summary sent
                MAT_RETURN_IF_ERROR(c.UpdateJobState("job-000002", v1::JOB_STATE_RUNNING));
                return c.UpdateJobState("job-000002", v1::JOB_STATE_SUCCEEDED);
              }).ok());
  Result bare = Run({"compare", "job-000002"});
  EXPECT_EQ(bare.code, 1);
  EXPECT_THAT(bare.err, HasSubstr("job-000002 succeeded, but the coordinator holds no summary"));
}

TEST_F(MatctlTest, UnknownJobsAreNotFoundNamingTheId) {
  const std::string svg = root_ + "/unknown.svg";
  for (const std::vector<std::string>& command :
       std::vector<std::vector<std::string>>{{"status", "job-000404"},
                                             {"cancel", "job-000404"},
                                             {"watch", "job-000404"},
                                             {"watch", "job-000404", "--progress"},
                                             {"spectra", "job-000404"},
                                             {"plot", "job-000404", "--out", svg}}) {
    Result r = Run(command);
    EXPECT_EQ(r.code, 1) << command[0];
    EXPECT_THAT(r.err, HasSubstr("matctl: NOT_FOUND: ")) << command[0];
    EXPECT_THAT(r.err, HasSubstr("job-000404")) << command[0];
  }
  EXPECT_FALSE(fs::exists(svg));
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

TEST_F(MatctlTest, WatchProgressRedrawsOneBarWithStateChangesAndEvaluationsOnTheirOwnLines) {
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  Result r = WatchARun({"--progress"}, OutputTerminal{});  // forced, though not a terminal
  EXPECT_EQ(r.code, 0) << r.err;
  // Lines of their own: the first state, RUNNING, the evaluation, SUCCEEDED.
  EXPECT_THAT(r.out, ::testing::StartsWith("\r"));
  EXPECT_THAT(r.out, HasSubstr(" job-000001 step 0 state QUEUED\033[K\n"));
  EXPECT_THAT(r.out, HasSubstr(" job-000001 step 0 state RUNNING\033[K\n"));
  EXPECT_THAT(r.out, HasSubstr(" job-000001 step 200 eval val_loss 6.25 test_loss 0\033[K\n"));
  EXPECT_THAT(r.out, HasSubstr("state SUCCEEDED\033[K\n"));
  // The bar, redrawn in place after every event (total steps from the job's spec).
  EXPECT_THAT(r.out, HasSubstr("\r[..............................] step 0/1000 0% QUEUED\033[K"));
  EXPECT_THAT(r.out, HasSubstr("\r[##.....................] step 100/1000 10% loss 6.5 "
                               "active 8/8 4 step/s ETA 4m\033[K"));
  EXPECT_THAT(r.out, HasSubstr("] step 100/1000 10% loss 6.5 active 6/8 mask v2 4 step/s ETA 4m"
                               "\033[K"));
  // 80 columns (the default width): the mask version is left out to fit.
  EXPECT_THAT(r.out, HasSubstr("] step 250/1000 25% loss 6.125 val 6.25 active 6/8 5 step/s "
                               "ETA 3m\033[K"));
  // The last bar stays, ending the output with a newline.
  EXPECT_THAT(r.out, ::testing::EndsWith("val 6.25 active 6/8 mask v2 SUCCEEDED\033[K\n"));
  // Progress and mask events have no line of their own.
  EXPECT_THAT(r.out, Not(HasSubstr(" loss 6.5 active 8/8 flops")));
  EXPECT_THAT(r.out, Not(HasSubstr(" mask v2 from step")));
}

TEST_F(MatctlTest, WatchDrawsTheBarOnATerminalUnlessToldNotTo) {
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  const OutputTerminal terminal{/*is_terminal=*/true, /*columns=*/120};
  Result bar = WatchARun({}, terminal);
  EXPECT_EQ(bar.code, 0) << bar.err;
  EXPECT_THAT(bar.out, HasSubstr("\r[")) << "a terminal gets the bar by default";
  EXPECT_THAT(bar.out, HasSubstr("] step 250/1000 25% loss 6.125 val 6.25 active 6/8 mask v2 5 "
                                 "step/s ETA 3m\033[K"))
      << "120 columns fit everything";

  // Not a terminal: one line per event (the bar only with --progress).
  auto lines = std::async(std::launch::async, [&] { return Run({"watch", "job-000002"}); });
  ASSERT_TRUE(WaitForWatcher("job-000002"));
  ASSERT_EQ(Run({"cancel", "job-000002"}).code, 0);
  ASSERT_EQ(lines.wait_for(10s), std::future_status::ready);
  Result plain = lines.get();
  EXPECT_EQ(plain.code, 0) << plain.err;
  EXPECT_THAT(plain.out, Not(HasSubstr("\r")));
  EXPECT_THAT(plain.out, Not(HasSubstr("\033")));
  EXPECT_THAT(plain.out, HasSubstr("job-000002 step 0 state QUEUED\n"));
  EXPECT_THAT(plain.out, HasSubstr("state CANCELLED (cancelled by request)\n"));
}

TEST_F(MatctlTest, WatchNoProgressPrintsOneLinePerEventEvenOnATerminal) {
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  Result r = WatchARun({"--no-progress"}, OutputTerminal{true, 120});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, Not(HasSubstr("\r")));
  EXPECT_THAT(r.out, HasSubstr("job-000001 step 100 loss 6.5 active 8/8 flops 0 4 steps/s\n"));
  EXPECT_THAT(r.out, HasSubstr("job-000001 step 100 mask v2 from step 100: 6 active\n"));
  EXPECT_THAT(r.out, HasSubstr("job-000001 step 200 eval val_loss 6.25 test_loss 0\n"));
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

TEST_F(MatctlTest, PlotWritesAnSvgHeatmapOfTheLambdaHistory) {
  ASSERT_EQ(Run({"submit", kTinyJob}).code, 0);
  const std::string svg = root_ + "/job-000001.svg";
  // No λ yet: FAILED_PRECONDITION naming the job, and no file.
  Result early = Run({"plot", "job-000001", "--out", svg});
  EXPECT_EQ(early.code, 1);
  EXPECT_THAT(early.err, HasSubstr("matctl: FAILED_PRECONDITION: job-000001 has no λ reports yet"));
  EXPECT_FALSE(fs::exists(svg));

  ASSERT_TRUE(OnLoop([](coordinator::Coordinator& c) {
                absl::Status s = c.store().AppendLambdas("job-000001", 0, {0.5, 1.5, 3});
                if (s.ok()) s = c.store().AppendLambdas("job-000001", 20, {0.25, 2, 8});
                return s;
              }).ok());
  Result r = Run({"plot", "job-000001", "--out", svg});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, svg + "\n");
  absl::StatusOr<std::string> text = common::ReadFile(svg);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_THAT(*text, ::testing::StartsWith("<?xml"));
  EXPECT_THAT(*text, HasSubstr("<title>job-000001: λ_max per module and probe step (bert L2 "
                               "d128 H4, mat a=0.3)</title>"));
  EXPECT_THAT(*text, HasSubstr("α = 0.3")) << "the job's policy.alpha";
  EXPECT_THAT(*text, ::testing::EndsWith("</svg>\n"));

  // Replaced as a whole on the next run; an unwritable path is an error and no file.
  ASSERT_EQ(Run({"plot", "job-000001", "--out", svg}).code, 0);
  Result bad = Run({"plot", "job-000001", "--out", root_ + "/no/such/dir/x.svg"});
  EXPECT_EQ(bad.code, 1);
  EXPECT_THAT(bad.err, HasSubstr("matctl: "));
  EXPECT_THAT(bad.err, HasSubstr("x.svg"));
  EXPECT_FALSE(fs::exists(root_ + "/no/such/dir/x.svg"));
}

// Needs the coordinator's ListWorkers (JobService); against a coordinator that does not serve
// it yet this fails with "matctl: UNIMPLEMENTED: the coordinator at … does not serve
// ListWorkers".
TEST_F(MatctlTest, WorkersListsEveryKnownWorker) {
  Result none = Run({"workers"});
  ASSERT_EQ(none.code, 0) << none.err;
  EXPECT_EQ(none.out, "WORKER  STATE  DEVICE  HOST  JOB  RANK  LAST-SEEN\n");

  ASSERT_TRUE(OnLoop([](coordinator::Coordinator& c) {
                coordinator::WorkerRecord a;
                a.id = "worker-a";
                a.host = "host-a";
                a.device = "cpu";
                absl::Status s = c.store().UpsertWorker(a);
                coordinator::WorkerRecord b;
                b.id = "worker-b";
                b.host = "gpu-host";
                b.device = "cuda:0";
                if (s.ok()) s = c.store().UpsertWorker(b);
                return s;
              }).ok());
  Result r = Run({"workers"});
  ASSERT_EQ(r.code, 0) << r.err;
  // Known to the store but no session open: DISCONNECTED, no job, seen just now.
  EXPECT_THAT(r.out, ::testing::StartsWith("WORKER    STATE         DEVICE  HOST      JOB  RANK  "
                                           "LAST-SEEN\n"));
  EXPECT_THAT(r.out, ::testing::MatchesRegex(
                         "(.|\n)*worker-a  DISCONNECTED  cpu     host-a    -    -     [0-9]+s "
                         "ago\n(.|\n)*"));
  EXPECT_THAT(r.out, ::testing::MatchesRegex(
                         "(.|\n)*worker-b  DISCONNECTED  cuda:0  gpu-host  -    -     [0-9]+s "
                         "ago\n(.|\n)*"));
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

// compare reads run directories (mat-train --out) as well as jobs; a summary written before
// summaries carried eval_curve gets it from the run's metrics.jsonl.
TEST_F(MatctlTest, CompareReadsRunDirectoriesAndOldRunsMetrics) {
  fs::create_directories(root_ + "/full");
  fs::create_directories(root_ + "/mat");
  WriteFile("full/summary.json",
            R"({"mode": "full", "seed": 1, "steps": 20, "flops_total": 100, "best_val_loss": 5.0,
                "best_step": 20, "test_metric_name": "loss", "test_metric": 5.1,
                "flops_to_best": 100, "wall_seconds": 9, "wall_seconds_to_best": 8,
                "mean_active_fraction": 1,
                "eval_curve": {"step": [10, 20], "flops": [50, 100], "val_loss": [6.0, 5.0],
                               "wall_seconds": [4, 8]}})");
  WriteFile("mat/summary.json",
            R"({"mode": "mat", "seed": 1, "steps": 20, "flops_total": 70, "best_val_loss": 4.9,
                "best_step": 20, "test_metric_name": "loss", "test_metric": 5.0,
                "wall_seconds": 7, "mean_active_fraction": 0.5})");
  WriteFile("mat/metrics.jsonl",
            "{\"step\": 10, \"val_loss\": 5.8, \"flops\": {\"total\": 35}, \"wall_seconds\": 3}\n"
            "{\"step\": 20, \"val_loss\": 4.9, \"flops\": {\"total\": 70}, \"wall_seconds\": 6}\n");
  Result r = Run({"compare", root_ + "/mat", root_ + "/full", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["baseline"], root_ + "/full");
  EXPECT_EQ(j["runs"][0]["val_loss_at_budget"],
            nlohmann::json({nullptr, 5.8, 4.9, 4.9}));  // at 25, 50, 75, 100 of 100 FLOPs
  EXPECT_EQ(j["runs"][0]["flops_to_baseline_best"], 70.0);
  EXPECT_EQ(j["runs"][0]["wall_seconds_to_baseline_best"], 6.0);
  EXPECT_DOUBLE_EQ(j["runs"][0]["flops_ratio"].get<double>(), 0.7);
  Result text = Run({"compare", root_ + "/mat", root_ + "/full", "--baseline", root_ + "/mat"});
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_THAT(text.out, HasSubstr("baseline: " + root_ + "/mat (mat"));
  // A run that is neither a directory nor a known job; a --baseline that is not compared.
  Result missing = Run({"compare", root_ + "/full", "job-000077"});
  EXPECT_EQ(missing.code, 1);
  EXPECT_THAT(missing.err, HasSubstr("job-000077"));
  Result bad = Run({"compare", root_ + "/full", "--baseline", "elsewhere"});
  EXPECT_EQ(bad.code, 1);
  EXPECT_THAT(bad.err, HasSubstr("--baseline elsewhere"));
  // A mistyped directory was asked of the coordinator as a job id ("cannot reach the
  // coordinator", or "job 'nosuch' not found").
  Result typo = Run({"compare", root_ + "/full", root_ + "/nosuch"});
  EXPECT_EQ(typo.code, 1);
  EXPECT_THAT(typo.err, HasSubstr("'" + root_ + "/nosuch' is neither a run directory"));
  // A summary.json itself is a run; --baseline matches a run however its path is spelled.
  Result file = Run({"compare", root_ + "/mat/summary.json", root_ + "/full/", "--baseline",
                     root_ + "/./full", "-o", "json"});
  ASSERT_EQ(file.code, 0) << file.err;
  const nlohmann::json f = nlohmann::json::parse(file.out);
  EXPECT_EQ(f["baseline"], root_ + "/full/");
  EXPECT_EQ(f["runs"][0]["val_loss_at_budget"], j["runs"][0]["val_loss_at_budget"]);
}

TEST_F(MatctlTest, UsageErrorsExitTwo) {
  EXPECT_EQ(Run({}).code, 2);
  Result unknown = Run({"frobnicate"});
  EXPECT_EQ(unknown.code, 2);
  EXPECT_THAT(unknown.err, HasSubstr("matctl: unknown command 'frobnicate' (one of submit, list"));
  EXPECT_EQ(Run({"--timeout", "3", "lisst"}).code, 2);
  EXPECT_EQ(Run({"--timeout=3", "list", "--state", "queued"}).code, 0) << "a command after options";
  EXPECT_EQ(Run({"status"}).code, 2);
  EXPECT_EQ(Run({"status", "job-000001", "-o", "yaml"}).code, 2);
  EXPECT_EQ(Run({"--timeout", "0", "list"}).code, 2);
  // NaN and a deadline past what a clock holds used to read as "cannot reach the coordinator".
  for (const char* bad : {"nan", "1e300", "x"}) {
    Result r = Run({"--timeout", bad, "list"});
    EXPECT_EQ(r.code, 2) << bad;
    EXPECT_THAT(r.err, HasSubstr("--timeout must be a number of seconds")) << bad << ": " << r.err;
  }
  EXPECT_EQ(Run({"watch", "job-000001", "--progress", "--no-progress"}).code, 2);
  EXPECT_EQ(Run({"submit", kTinyJob, "--progress"}).code, 2) << "--progress needs --wait";
  EXPECT_EQ(Run({"plot", "job-000001"}).code, 2) << "--out is required";
  EXPECT_EQ(Run({"workers", "extra"}).code, 2);
  EXPECT_EQ(Run({"compare"}).code, 2) << "a run is required";
  EXPECT_EQ(Run({"compare", "a", "-o", "yaml"}).code, 2);
  // Bad flag values exited 1, as if the command had failed.
  Result state = Run({"list", "--state", "bogus"});
  EXPECT_EQ(state.code, 2) << state.err;
  EXPECT_THAT(state.err, HasSubstr("--state: unknown job state 'bogus'"));
  Result cert = Run({"--tls-cert", "c.pem", "list"});
  EXPECT_EQ(cert.code, 2) << cert.err;
  EXPECT_THAT(cert.err, HasSubstr("--tls-cert requires"));
  EXPECT_EQ(Run({"--tls-cert", "c.pem", "--tls-key", "k.pem", "list"}).code, 2) << "no --tls-ca";
  Result rank = Run({"logs", "job-000001", "--rank", "abc"});
  EXPECT_EQ(rank.code, 2);
  EXPECT_THAT(rank.err, ::testing::Not(HasSubstr("1797693134862315708")));
  // A coordinator address that is not HOST:PORT (gRPC took 99999 as another port).
  for (const char* bad : {"127.0.0.1:99999", "127.0.0.1", ":50051", "127.0.0.1:0"}) {
    Result r = Run({"list"}, bad);
    EXPECT_EQ(r.code, 2) << bad << ": " << r.err;
    EXPECT_THAT(r.err, HasSubstr("--coordinator")) << bad;
  }
  Result help = Run({"--help"});
  EXPECT_EQ(help.code, 0);
  for (const char* command : {"submit", "list", "status", "cancel", "watch", "spectra", "plot",
                              "workers", "compare"}) {
    EXPECT_THAT(help.out, HasSubstr(command));
  }
  Result plot_help = Run({"plot", "--help"});
  EXPECT_EQ(plot_help.code, 0);
  EXPECT_THAT(plot_help.out, HasSubstr("approximate"));
  EXPECT_THAT(Run({"watch", "--help"}).out, HasSubstr("--no-progress"));
}

// A coordinator that lies about its artifacts: a name that climbs out of the download
// directory, and bytes that do not match the SHA-256 it announces.
class HostileArtifacts final : public v1::JobService::Service {
 public:
  grpc::Status ListArtifacts(grpc::ServerContext*, const v1::ListArtifactsRequest*,
                             v1::ListArtifactsReply* reply) override {
    v1::Artifact* a = reply->add_artifacts();
    a->set_name(name_);
    a->set_bytes(4);
    a->set_sha256(sha256_);
    reply->set_total_bytes(4);
    return grpc::Status::OK;
  }
  grpc::Status ReadArtifact(grpc::ServerContext*, const v1::ReadArtifactRequest* request,
                            v1::ReadArtifactReply* reply) override {
    reply->set_data(std::string("abcd").substr(size_t(request->offset())));
    reply->set_total_bytes(4);
    reply->set_sha256(read_sha256_.empty() ? sha256_ : read_sha256_);
    return grpc::Status::OK;
  }
  grpc::Status GetJob(grpc::ServerContext*, const v1::GetJobRequest* request,
                      v1::GetJobReply* reply) override {
    reply->mutable_job()->set_job_id(request->job_id());
    reply->mutable_job()->set_state(state_);
    return grpc::Status::OK;
  }
  std::string name_;
  std::string sha256_ = std::string(64, '0');  // not the SHA-256 of "abcd"
  std::string read_sha256_;  // ReadArtifact's, when not sha256_: the file changed after the list
  v1::JobState state_ = v1::JOB_STATE_SUCCEEDED;
};

// `service` on a loopback port; its address in `address`; null when it could not start.
std::unique_ptr<grpc::Server> Serve(v1::JobService::Service& service, std::string* address) {
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (port == 0) return nullptr;
  *address = "127.0.0.1:" + std::to_string(port);
  return server;
}

TEST_F(MatctlTest, DownloadRefusesAPathOutsideItsDirectoryAndABadChecksum) {
  HostileArtifacts service;
  std::string address;
  std::unique_ptr<grpc::Server> server = Serve(service, &address);
  ASSERT_NE(server, nullptr);
  const std::string out = root_ + "/dl";

  service.name_ = "../escaped.txt";
  Result escape = Run({"download", "job-000001", "--out", out}, address);
  EXPECT_EQ(escape.code, 1);
  EXPECT_THAT(escape.err, HasSubstr("artifact name '../escaped.txt'"));
  EXPECT_FALSE(fs::exists(root_ + "/escaped.txt"));

  service.name_ = "model.safetensors";
  Result tampered = Run({"download", "job-000001", "--out", out}, address);
  EXPECT_EQ(tampered.code, 1);
  EXPECT_THAT(tampered.err, HasSubstr("DATA_LOSS: model.safetensors: SHA-256"));
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(out + "/.model.safetensors.download")) << "the bad bytes are removed";

  // Honest bytes now, but a stale partial file from an earlier try: the resumed download does
  // not match, and it starts again at once (it failed, asking to download again).
  service.sha256_ = "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589";
  std::ofstream(out + "/.model.safetensors.download") << "xy";
  Result stale = Run({"download", "job-000001", "--out", out}, address);
  EXPECT_EQ(stale.code, 0) << stale.err;
  std::ifstream got(out + "/model.safetensors");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(got), {}), "abcd");
  EXPECT_THAT(stale.err, ::testing::Not(HasSubstr("no model.safetensors")));

  // The file changed on the coordinator after it was listed (a new upload): the download stops
  // at its first piece, names it, and keeps nothing of it.
  service.sha256_ = std::string(64, 'e');
  service.read_sha256_ = std::string(64, 'f');
  Result changed = Run({"download", "job-000001", "--out", out, "--force"}, address);
  EXPECT_EQ(changed.code, 1);
  EXPECT_THAT(changed.err, HasSubstr("ABORTED: model.safetensors of job-000001 changed on the "
                                     "coordinator during the download"));
  EXPECT_FALSE(fs::exists(out + "/.model.safetensors.download"));
  std::ifstream kept(out + "/model.safetensors");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(kept), {}), "abcd")
      << "the earlier download is kept";
  server->Shutdown();
}

// Only a SUCCEEDED job's files are all of them: a cancelled or failed job's rank 0 uploads after
// the state changed (a download right after a cancel may lack the model), and a running job's
// files may be an earlier attempt's. The download says so (and still writes what there is).
TEST_F(MatctlTest, DownloadSaysWhenTheFilesMayNotBeAllOfThem) {
  HostileArtifacts service;
  service.name_ = "summary.json";
  service.sha256_ = "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589";
  std::string address;
  std::unique_ptr<grpc::Server> server = Serve(service, &address);
  ASSERT_NE(server, nullptr);

  service.state_ = v1::JOB_STATE_CANCELLED;
  Result cancelled = Run({"download", "job-000001", "--out", root_ + "/cancelled"}, address);
  EXPECT_EQ(cancelled.code, 0) << cancelled.err;
  EXPECT_TRUE(fs::exists(root_ + "/cancelled/summary.json"));
  EXPECT_THAT(cancelled.err, HasSubstr("no model.safetensors from job-000001 (CANCELLED) yet"));
  EXPECT_THAT(cancelled.err, HasSubstr("matctl logs job-000001"));

  service.state_ = v1::JOB_STATE_RUNNING;
  Result running = Run({"download", "job-000001", "--out", root_ + "/running"}, address);
  EXPECT_EQ(running.code, 0) << running.err;
  EXPECT_THAT(running.err, HasSubstr("job-000001 is RUNNING: these files may be an earlier "
                                     "attempt's, or not yet final"));

  service.state_ = v1::JOB_STATE_SUCCEEDED;
  Result succeeded = Run({"download", "job-000001", "--out", root_ + "/succeeded"}, address);
  EXPECT_EQ(succeeded.code, 0) << succeeded.err;
  EXPECT_EQ(succeeded.err, "");
  server->Shutdown();
}

// A cancelled job whose rank sends its last line after the job ended: its coordinator says
// log_complete = false for `held_` polls, then serves the line and says true. `complete_unset_`:
// a coordinator without the field.
class TrailingLogs final : public v1::JobService::Service {
 public:
  grpc::Status GetJobLogs(grpc::ServerContext*, const v1::GetJobLogsRequest* request,
                          v1::GetJobLogsReply* reply) override {
    const int call = ++calls_;
    reply->set_state(v1::JOB_STATE_CANCELLED);
    reply->set_last_seq(request->after_seq());
    const bool arrived = call > held_;
    if (arrived && request->after_seq() == 0) {
      v1::LogLine* line = reply->add_lines();
      line->set_seq(1);
      line->set_rank(1);
      line->set_level("info");
      line->set_text("stopped (cancelled at step 40)");
      reply->set_last_seq(1);
    }
    if (!complete_unset_) reply->set_log_complete(arrived);
    return grpc::Status::OK;
  }
  std::atomic<int> calls_{0};
  int held_ = 2;
  bool complete_unset_ = false;
};

// `logs -f` ended at the job's terminal state and missed a cancelled rank's last lines, sent
// after it: it follows until the coordinator says no more will come.
TEST_F(MatctlTest, LogsFollowWaitsForTheLinesOfRanksStillStopping) {
  TrailingLogs service;
  std::string address;
  std::unique_ptr<grpc::Server> server = Serve(service, &address);
  ASSERT_NE(server, nullptr);
  Result followed = Run({"logs", "job-000001", "-f"}, address);
  EXPECT_EQ(followed.code, 0) << followed.err;
  EXPECT_THAT(followed.out, HasSubstr("stopped (cancelled at step 40)"));
  EXPECT_EQ(service.calls_.load(), 4) << "two held, the line, then the complete empty page";

  // A coordinator without the field: the terminal state ends the follow, as before.
  service.calls_ = 0;
  service.complete_unset_ = true;
  Result old = Run({"logs", "job-000001", "-f"}, address);
  EXPECT_EQ(old.code, 0) << old.err;
  EXPECT_EQ(old.out, "");
  EXPECT_EQ(service.calls_.load(), 1);
  server->Shutdown();
}

}  // namespace
}  // namespace mat::client
