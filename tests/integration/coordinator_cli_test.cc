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
#include "tests/integration/harness.h"
#include "tests/integration/probes.h"

extern char** environ;

namespace mat {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

class CoordinatorCliTest : public testing_loopback::LoopbackTest {};
using testing_loopback::CommandResult;
using testing_loopback::ReadText;
using testing_loopback::kCoordinator;
using testing_loopback::kMatctl;
using testing_loopback::kTinyJob;

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
  EXPECT_EQ(j["waiting"],
            "needs 2 cpu workers, 0 are connected: start 2 more (mat-worker --device cpu)");
  EXPECT_EQ(j["client_request_id"], "req-42");
  EXPECT_EQ(j["spec"]["model"]["d_model"], 128);
  // The second job says which job a pass considers before it; list shows the gangs.
  CommandResult status2 = Matctl(address_, {"status", job2, "-o", "json"});
  ASSERT_EQ(status2.exit_code, 0) << status2.err;
  EXPECT_EQ(nlohmann::json::parse(status2.out, nullptr, false).value("waiting", ""),
            "needs 2 cpu workers, 0 are connected: start 2 more (mat-worker --device cpu); 1 job "
            "is ahead of it for cpu workers: " + job);
  EXPECT_THAT(list.out, HasSubstr("mat a=0.3  2 cpu    -     "));

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
  // It says why the job waits (no worker is connected), as `status` does.
  while (ReadText(watch_out).find("waiting:") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_THAT(ReadText(watch_out),
              HasSubstr(job + " waiting: needs 2 cpu workers, 0 are connected: start 2 more "
                              "(mat-worker --device cpu)\n"));
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
  std::ofstream(bad) << ReadText(kTinyJob) << "  layres: 3\n";  // inside `resources:`, the last section
  CommandResult rejected = Matctl(address_, {"submit", bad});
  EXPECT_EQ(rejected.exit_code, 1);
  EXPECT_THAT(rejected.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(rejected.err, HasSubstr("resources.layres"));

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
