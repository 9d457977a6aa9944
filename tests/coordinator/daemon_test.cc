// Tests of coordinator/daemon.h, the whole daemon in-process on loopback with ports chosen by the
// kernel: address files, HTTP /healthz and /readyz (raw socket), the gRPC health service and
// server reflection, one daemon per state dir, a port in use, graceful shutdown with open watch
// and session streams, a restart on the same state dir, and WorkerService with the heartbeat
// timer.
#include "coordinator/daemon.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/client_unary_call.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
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

#include "coordinator/auth.h"
#include "mat/v1/service.grpc.pb.h"
#include "tests/integration/probes.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/worker_secret.h"

namespace mat::coordinator {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class CoordinatorDaemonTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_daemon"};  // outlives the members below

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok()) << "cannot create a temporary directory";
    root_ = tmp_.path();
    config_.listen_address = "127.0.0.1:0";
    config_.metrics_listen_address = "127.0.0.1:0";
    config_.state_dir = root_ + "/state";
    config_.shutdown_grace_seconds = 1;
  }


  std::unique_ptr<CoordinatorDaemon> StartOk(const CoordinatorDaemonConfig& config) {
    auto daemon = CoordinatorDaemon::Start(config);
    EXPECT_TRUE(daemon.ok()) << daemon.status();
    return daemon.ok() ? std::move(*daemon) : nullptr;
  }

  std::unique_ptr<v1::JobService::Stub> Stub(const std::string& address) {
    return v1::JobService::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  }

  std::string Submit(v1::JobService::Stub& stub) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 5s);
    v1::SubmitJobRequest request;
    request.mutable_spec()->mutable_train()->set_steps(5);
    v1::SubmitJobReply reply;
    grpc::Status s = stub.SubmitJob(&context, request, &reply);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return reply.job_id();
  }

  std::string root_;
  CoordinatorDaemonConfig config_;
};

TEST_F(CoordinatorDaemonTest, ServesGrpcHealthReflectionAndHttpOnEphemeralPorts) {
  auto daemon = StartOk(config_);
  ASSERT_NE(daemon, nullptr);
  EXPECT_TRUE(daemon->ready());
  EXPECT_THAT(daemon->grpc_address(), ::testing::StartsWith("127.0.0.1:"));
  EXPECT_NE(daemon->grpc_address(), "127.0.0.1:0");
  EXPECT_NE(daemon->metrics_address(), "127.0.0.1:0");
  EXPECT_EQ(ReadText(CoordinatorDaemon::AddressFilePath(config_.state_dir)),
            daemon->grpc_address() + "\n");
  EXPECT_EQ(ReadText(CoordinatorDaemon::MetricsAddressFilePath(config_.state_dir)),
            daemon->metrics_address() + "\n");

  auto healthz = probes::HttpGet(daemon->metrics_address(), "/healthz");
  EXPECT_EQ(healthz.status, 200) << healthz.raw;
  EXPECT_EQ(healthz.body, "ok\n");
  auto readyz = probes::HttpGet(daemon->metrics_address(), "/readyz");
  EXPECT_EQ(readyz.status, 200) << readyz.raw;
  EXPECT_EQ(probes::HttpGet(daemon->metrics_address(), "/nope").status, 404);
  EXPECT_EQ(probes::HttpGet(daemon->metrics_address(), "/healthz", "POST").status, 405);
  auto head = probes::HttpGet(daemon->metrics_address(), "/healthz", "HEAD");
  EXPECT_EQ(head.status, 200);
  EXPECT_EQ(head.body, "");
  // /metrics: the Prometheus text of coordinator_metrics.h, every family listed.
  auto metrics = probes::HttpGet(daemon->metrics_address(), "/metrics");
  EXPECT_EQ(metrics.status, 200) << metrics.raw;
  EXPECT_THAT(metrics.raw, HasSubstr("Content-Type: text/plain; version=0.0.4\r\n"));
  for (const std::string& name : MetricNames()) {
    EXPECT_THAT(metrics.body, HasSubstr("# TYPE " + name + " ")) << name;
  }
  EXPECT_THAT(metrics.body, HasSubstr("mat_coordinator_jobs{state=\"queued\"} 0\n"));

  auto channel = grpc::CreateChannel(daemon->grpc_address(), grpc::InsecureChannelCredentials());
  std::string error;
  EXPECT_EQ(probes::GrpcHealthCheck(channel, "", &error), 1) << "not SERVING: " << error;
  const std::string services = probes::GrpcReflectionListServices(channel, &error);
  EXPECT_THAT(services, HasSubstr("mat.v1.JobService")) << error;
  EXPECT_THAT(services, HasSubstr("mat.v1.WorkerService")) << error;
  EXPECT_THAT(services, HasSubstr("grpc.health.v1.Health")) << error;

  auto stub = Stub(daemon->grpc_address());
  EXPECT_EQ(Submit(*stub), "job-000001");

  // mat_coordinator_grpc_requests_total labels the methods served by name and any path a caller
  // makes up as "unknown": with the caller's path as the label, 300 calls to made-up methods
  // made 300 series (any client, before authentication).
  for (int i = 0; i < 3; ++i) {
    grpc::internal::RpcMethod made_up(("/evil.Svc/M" + std::to_string(i)).c_str(),
                                      grpc::internal::RpcMethod::NORMAL_RPC);
    grpc::ClientContext context;
    v1::GetJobRequest request;
    v1::GetJobReply reply;
    const grpc::Status status =
        grpc::internal::BlockingUnaryCall<v1::GetJobRequest, v1::GetJobReply,
                                          grpc::protobuf::MessageLite,
                                          grpc::protobuf::MessageLite>(
            channel.get(), made_up, &context, request, &reply);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  }
  const std::string counted = probes::HttpGet(daemon->metrics_address(), "/metrics").body;
  // (Labels in the text come sorted by name: code, then method.)
  for (const std::string series :
       {"{code=\"UNIMPLEMENTED\",method=\"unknown\"} 3\n",
        "{code=\"OK\",method=\"mat.v1.JobService/SubmitJob\"} 1\n",
        "{code=\"OK\",method=\"grpc.health.v1.Health/Check\"} 1\n",
        "{code=\"OK\",method=\"grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo\"} "
        "1\n"}) {
    EXPECT_NE(counted.find("mat_coordinator_grpc_requests_total" + series), std::string::npos)
        << series;
  }
  EXPECT_EQ(counted.find("evil"), std::string::npos) << "a made-up method became a label";
}

TEST_F(CoordinatorDaemonTest, SecondDaemonOnTheSameStateDirIsRefusedAndLeavesTheFirstAlone) {
  auto first = StartOk(config_);
  ASSERT_NE(first, nullptr);
  auto second = CoordinatorDaemon::Start(config_);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  EXPECT_EQ(ReadText(CoordinatorDaemon::AddressFilePath(config_.state_dir)),
            first->grpc_address() + "\n");
  auto stub = Stub(first->grpc_address());
  EXPECT_FALSE(Submit(*stub).empty());
}

TEST_F(CoordinatorDaemonTest, PortsInUseAndBadAddressesAreErrors) {
  auto first = StartOk(config_);
  ASSERT_NE(first, nullptr);

  CoordinatorDaemonConfig same_grpc = config_;
  same_grpc.state_dir = root_ + "/other";
  same_grpc.listen_address = first->grpc_address();
  auto busy = CoordinatorDaemon::Start(same_grpc);
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kUnavailable) << busy.status();

  CoordinatorDaemonConfig same_http = config_;
  same_http.state_dir = root_ + "/other";
  same_http.metrics_listen_address = first->metrics_address();
  busy = CoordinatorDaemon::Start(same_http);
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kUnavailable) << busy.status();
  EXPECT_FALSE(fs::exists(CoordinatorDaemon::AddressFilePath(same_http.state_dir)));

  CoordinatorDaemonConfig bad = config_;
  bad.state_dir = root_ + "/other";
  bad.listen_address = "127.0.0.1";
  busy = CoordinatorDaemon::Start(bad);
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kInvalidArgument) << busy.status();
  EXPECT_THAT(busy.status().message(), HasSubstr("127.0.0.1"));

  // After those failures the other state dir is free again.
  CoordinatorDaemonConfig other = config_;
  other.state_dir = root_ + "/other";
  EXPECT_NE(StartOk(other), nullptr);
}

TEST_F(CoordinatorDaemonTest, ShutdownEndsOpenWatchesRemovesAddressFilesAndRestartKeepsJobs) {
  auto daemon = StartOk(config_);
  ASSERT_NE(daemon, nullptr);
  auto stub = Stub(daemon->grpc_address());
  const std::string id = Submit(*stub);

  grpc::ClientContext watch_context;
  v1::WatchJobRequest request;
  request.set_job_id(id);
  auto reader = stub->WatchJob(&watch_context, request);
  v1::JobEvent event;
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_QUEUED);

  const auto start = std::chrono::steady_clock::now();
  daemon->Shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
  EXPECT_FALSE(daemon->ready());
  EXPECT_FALSE(reader->Read(&event));
  EXPECT_FALSE(reader->Finish().ok());
  EXPECT_FALSE(fs::exists(CoordinatorDaemon::AddressFilePath(config_.state_dir)));
  EXPECT_FALSE(fs::exists(CoordinatorDaemon::MetricsAddressFilePath(config_.state_dir)));
  daemon->Shutdown();  // idempotent

  auto again = StartOk(config_);
  ASSERT_NE(again, nullptr);
  auto stub2 = Stub(again->grpc_address());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 5s);
  v1::ListJobsReply jobs;
  ASSERT_TRUE(stub2->ListJobs(&context, v1::ListJobsRequest(), &jobs).ok());
  ASSERT_EQ(jobs.jobs_size(), 1);
  EXPECT_EQ(jobs.jobs(0).job_id(), id);
  EXPECT_EQ(jobs.jobs(0).state(), v1::JOB_STATE_QUEUED);
}

TEST_F(CoordinatorDaemonTest, ServesWorkerServiceAndItsHeartbeatTimerDropsSilentWorkers) {
  config_.heartbeat_interval_ms = 50;
  auto daemon = StartOk(config_);
  ASSERT_NE(daemon, nullptr);
  auto channel = grpc::CreateChannel(daemon->grpc_address(), grpc::InsecureChannelCredentials());
  auto workers = v1::WorkerService::NewStub(channel);
  auto jobs = v1::JobService::NewStub(channel);

  grpc::ClientContext register_context;
  register_context.set_deadline(std::chrono::system_clock::now() + 5s);
  register_context.AddMetadata(kWorkerSecretMetadataKey, tests::TestWorkerSecret(1));
  v1::RegisterRequest request;
  request.mutable_capabilities()->set_device("cpu");
  request.mutable_capabilities()->set_host("127.0.0.1");
  request.mutable_capabilities()->set_rendezvous_port(29500);
  v1::RegisterReply reply;
  grpc::Status s = workers->Register(&register_context, request, &reply);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(reply.worker_id(), "worker-000001");
  EXPECT_EQ(reply.heartbeat_interval_ms(), 50);

  // One heartbeat, then silence: the daemon's own timer finds the worker lost (3 intervals).
  grpc::ClientContext session_context;
  session_context.set_deadline(std::chrono::system_clock::now() + 10s);
  session_context.AddMetadata(kWorkerSecretMetadataKey, tests::TestWorkerSecret(1));
  auto session = workers->Session(&session_context);
  v1::WorkerMessage heartbeat;
  heartbeat.set_worker_id(reply.worker_id());
  heartbeat.mutable_heartbeat();
  ASSERT_TRUE(session->Write(heartbeat));
  v1::CoordinatorMessage message;
  EXPECT_FALSE(session->Read(&message));
  s = session->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  grpc::ClientContext list_context;
  list_context.set_deadline(std::chrono::system_clock::now() + 5s);
  v1::ListWorkersReply list;
  ASSERT_TRUE(jobs->ListWorkers(&list_context, v1::ListWorkersRequest(), &list).ok());
  ASSERT_EQ(list.workers_size(), 1);
  EXPECT_EQ(list.workers(0).state(), v1::WORKER_STATE_DISCONNECTED);
}

TEST_F(CoordinatorDaemonTest, ShutdownEndsOpenSessionsAtOnce) {
  config_.shutdown_grace_seconds = 5;
  auto daemon = StartOk(config_);
  ASSERT_NE(daemon, nullptr);
  auto channel = grpc::CreateChannel(daemon->grpc_address(), grpc::InsecureChannelCredentials());
  auto workers = v1::WorkerService::NewStub(channel);
  auto jobs = v1::JobService::NewStub(channel);
  grpc::ClientContext register_context;
  register_context.AddMetadata(kWorkerSecretMetadataKey, tests::TestWorkerSecret(1));
  v1::RegisterRequest request;
  request.mutable_capabilities()->set_device("cpu");
  request.mutable_capabilities()->set_host("127.0.0.1");
  request.mutable_capabilities()->set_rendezvous_port(29500);
  v1::RegisterReply reply;
  ASSERT_TRUE(workers->Register(&register_context, request, &reply).ok());

  grpc::ClientContext session_context;
  session_context.AddMetadata(kWorkerSecretMetadataKey, tests::TestWorkerSecret(1));
  auto session = workers->Session(&session_context);
  v1::WorkerMessage heartbeat;
  heartbeat.set_worker_id(reply.worker_id());
  heartbeat.mutable_heartbeat();
  ASSERT_TRUE(session->Write(heartbeat));
  // Wait until the session is open (the worker is IDLE).
  bool open = false;
  for (auto until = std::chrono::steady_clock::now() + 5s;
       !open && std::chrono::steady_clock::now() < until;
       std::this_thread::sleep_for(10ms)) {
    grpc::ClientContext list_context;
    v1::ListWorkersReply list;
    ASSERT_TRUE(jobs->ListWorkers(&list_context, v1::ListWorkersRequest(), &list).ok());
    open = list.workers_size() == 1 && list.workers(0).state() == v1::WORKER_STATE_IDLE;
  }
  ASSERT_TRUE(open) << "the session never opened";

  const auto start = std::chrono::steady_clock::now();
  daemon->Shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s)
      << "shutdown waited for the grace period with an open Session";
  v1::CoordinatorMessage message;
  EXPECT_FALSE(session->Read(&message));
  EXPECT_EQ(session->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(CoordinatorDaemonTest, AHealthTimeoutBelowOneMillisecondIsRefused) {
  config_.health_timeout_ms = 0;
  auto daemon = CoordinatorDaemon::Start(config_);
  EXPECT_EQ(daemon.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(daemon.status().message(), HasSubstr("health timeout"));
}

TEST_F(CoordinatorDaemonTest, AHeartbeatIntervalBelowOneMillisecondIsRefused) {
  config_.heartbeat_interval_ms = 0;
  auto daemon = CoordinatorDaemon::Start(config_);
  EXPECT_EQ(daemon.status().code(), absl::StatusCode::kInvalidArgument) << daemon.status();
  EXPECT_THAT(daemon.status().message(), HasSubstr("heartbeat"));
}

TEST_F(CoordinatorDaemonTest, AJobRetentionThatIsNoNumberOfDaysInRangeIsRefused) {
  for (const double days : {-1.0, std::nan(""), 40000.0}) {
    config_.job_retention_days = days;
    auto daemon = CoordinatorDaemon::Start(config_);
    EXPECT_EQ(daemon.status().code(), absl::StatusCode::kInvalidArgument) << days;
    EXPECT_THAT(daemon.status().message(), HasSubstr("--job-retention-days")) << days;
  }
}

// An --artifact-dir it cannot write: the daemon served, every job's uploads failed and
// `matctl download` said only "no artifacts". It now does not start, naming the flag.
// (/proc: not writable even by root, who runs CI.)
TEST_F(CoordinatorDaemonTest, AnArtifactDirItCannotWriteIsRefused) {
  config_.artifact_dir = "/proc";
  auto daemon = CoordinatorDaemon::Start(config_);
  ASSERT_FALSE(daemon.ok());
  EXPECT_THAT(daemon.status().message(), HasSubstr("--artifact-dir: cannot write in '/proc'"))
      << daemon.status();
}

// Two coordinators (two state dirs) on one --artifact-dir served each other's files under their
// own job ids; the second is refused. The state dir itself is refused as --artifact-dir.
TEST_F(CoordinatorDaemonTest, AnArtifactDirIsOneCoordinatorsAndNotItsStateDir) {
  config_.artifact_dir = root_ + "/shared-artifacts";
  std::unique_ptr<CoordinatorDaemon> first = StartOk(config_);
  CoordinatorDaemonConfig second = config_;
  second.state_dir = root_ + "/state2";
  auto refused = CoordinatorDaemon::Start(second);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(),
              HasSubstr("'" + root_ + "/shared-artifacts' is in use by another coordinator"));
  second.artifact_dir = second.state_dir;
  refused = CoordinatorDaemon::Start(second);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("--artifact-dir must not be the --state-dir"));
}

TEST_F(CoordinatorDaemonTest, HealthzFailsWhileTheLoopHangsAndRecoversAfter) {
  config_.health_timeout_ms = 300;
  auto daemon = StartOk(config_);
  ASSERT_NE(daemon, nullptr);
  ASSERT_EQ(probes::HttpGet(daemon->metrics_address(), "/healthz").status, 200);
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  daemon->Post([released](Coordinator&) { released.wait(); });  // the loop hangs here
  for (const char* target : {"/healthz", "/readyz"}) {
    auto r = probes::HttpGet(daemon->metrics_address(), target);
    EXPECT_EQ(r.status, 503) << target << ": " << r.raw;
    EXPECT_EQ(r.body, "coordinator loop did not answer within 300 ms\n") << target;
  }
  release.set_value();
  auto healthz = probes::HttpGet(daemon->metrics_address(), "/healthz");
  EXPECT_EQ(healthz.status, 200) << healthz.raw;
  auto readyz = probes::HttpGet(daemon->metrics_address(), "/readyz");
  EXPECT_EQ(readyz.status, 200) << readyz.raw;
  EXPECT_EQ(readyz.body, "ready\n");
}

TEST_F(CoordinatorDaemonTest, HealthzFailsNamingTheDatabaseWhenItsFileIsGone) {
  auto daemon = StartOk(config_);
  ASSERT_NE(daemon, nullptr);
  const std::string db = config_.state_dir + "/coordinator.db";
  ASSERT_TRUE(fs::exists(db));
  // The open connection still answers from its page cache: only a fresh one sees the loss.
  fs::rename(db, db + ".moved");
  auto r = probes::HttpGet(daemon->metrics_address(), "/healthz");
  EXPECT_EQ(r.status, 503) << r.raw;
  EXPECT_THAT(r.body, HasSubstr(db)) << "names the file";
  EXPECT_EQ(probes::HttpGet(daemon->metrics_address(), "/readyz").status, 503);
  fs::rename(db + ".moved", db);
  EXPECT_EQ(probes::HttpGet(daemon->metrics_address(), "/healthz").status, 200);
}

// A systemd notify socket: a unix datagram socket that NOTIFY_SOCKET points at while it lives.
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& path) : path_(path) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path.c_str());
    bound_ = fd_ >= 0 && ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    timeval tv{0, 20 * 1000};  // reads wait at most 20 ms
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  }
  ~NotifySocket() {
    ::unsetenv("NOTIFY_SOCKET");
    ::unsetenv("WATCHDOG_USEC");
    ::unsetenv("WATCHDOG_PID");
    if (fd_ >= 0) ::close(fd_);
    ::unlink(path_.c_str());
  }
  bool bound() const { return bound_; }
  // The datagrams received within `window`, in order.
  std::vector<std::string> Receive(std::chrono::milliseconds window) {
    std::vector<std::string> out;
    const auto end = std::chrono::steady_clock::now() + window;
    char buf[4096];
    while (std::chrono::steady_clock::now() < end) {
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n > 0) out.emplace_back(buf, static_cast<size_t>(n));
    }
    return out;
  }

 private:
  std::string path_;
  int fd_ = -1;
  bool bound_ = false;
};

int Count(const std::vector<std::string>& messages, const std::string& what) {
  int n = 0;
  for (const auto& m : messages) n += m.find(what) != std::string::npos;
  return n;
}

TEST_F(CoordinatorDaemonTest, NotifiesSystemdAndFeedsItsWatchdogFromTheLoop) {
  NotifySocket notify(root_ + "/notify.sock");
  ASSERT_TRUE(notify.bound());
  ::setenv("WATCHDOG_USEC", "100000", 1);  // WatchdogSec=100ms: a ping every 50 ms
  ::setenv("WATCHDOG_PID", std::to_string(::getpid()).c_str(), 1);
  auto daemon = StartOk(config_);
  ASSERT_NE(daemon, nullptr);
  auto first = notify.Receive(300ms);
  ASSERT_GE(first.size(), 1u);
  EXPECT_THAT(first[0], HasSubstr("READY=1"));
  EXPECT_THAT(first[0], HasSubstr("STATUS=serving gRPC on " + daemon->grpc_address()));
  EXPECT_GE(Count(first, "WATCHDOG=1"), 3) << "pings every 50 ms";

  // A hung loop stops the pings (systemd would kill and restart the daemon); they resume after.
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::promise<void> hung;
  daemon->Post([released, &hung](Coordinator&) {
    hung.set_value();
    released.wait();
  });
  hung.get_future().wait();
  notify.Receive(60ms);  // a ping already in flight
  EXPECT_EQ(Count(notify.Receive(400ms), "WATCHDOG=1"), 0) << "pinged while the loop hung";
  release.set_value();
  EXPECT_GE(Count(notify.Receive(300ms), "WATCHDOG=1"), 2);

  daemon->Shutdown();
  EXPECT_GE(Count(notify.Receive(100ms), "STOPPING=1"), 1);
}

TEST_F(CoordinatorDaemonTest, PostRunsOnTheLoopAndItsEventsReachWatchers) {
  auto daemon = StartOk(config_);
  ASSERT_NE(daemon, nullptr);
  auto stub = Stub(daemon->grpc_address());
  const std::string id = Submit(*stub);

  grpc::ClientContext watch_context;
  v1::WatchJobRequest request;
  request.set_job_id(id);
  auto reader = stub->WatchJob(&watch_context, request);
  v1::JobEvent event;
  ASSERT_TRUE(reader->Read(&event));

  std::promise<absl::Status> done;
  daemon->Post([&](Coordinator& c) {
    absl::Status s = c.UpdateJobState(id, v1::JOB_STATE_RUNNING);
    if (s.ok()) s = c.UpdateJobState(id, v1::JOB_STATE_SUCCEEDED);
    done.set_value(s);
  });
  ASSERT_TRUE(done.get_future().get().ok());
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.state().state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_FALSE(reader->Read(&event));
  EXPECT_TRUE(reader->Finish().ok());
}

}  // namespace
}  // namespace mat::coordinator
