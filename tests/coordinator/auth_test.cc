// Tests of coordinator/auth.h: the token-file format, the constant-time comparison and the status
// codes of the bearer and join-token checks (on plain metadata maps, as gRPC delivers them); and,
// through an in-process CoordinatorDaemon, that every JobService RPC (WatchJob too) and both
// WorkerService RPCs (Register, the Session stream) are refused without the right token while
// gRPC health and reflection stay open, and that a missing token file stops the start.
#include "coordinator/auth.h"

#include <grpcpp/grpcpp.h>

#include <unistd.h>

#include <cstdio>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "coordinator/daemon.h"
#include "mat/v1/service.grpc.pb.h"
#include "tests/integration/probes.h"
#include "tests/testing/log_capture.h"

namespace mat::coordinator {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

class AuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("mat_auth_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string WriteFile(const std::string& name, const std::string& text) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path) << text;
    return path;
  }

  // A daemon on a free loopback port, without HTTP, its state in the test's folder.
  CoordinatorDaemonConfig DaemonConfig() const {
    CoordinatorDaemonConfig config;
    config.listen_address = "127.0.0.1:0";
    config.metrics_listen_address = "";
    config.state_dir = (dir_ / "state").string();
    config.shutdown_grace_seconds = 1;
    return config;
  }

  // Metadata holding `key: value`; the strings live in the fixture.
  ClientMetadata Metadata(const std::string& key, const std::string& value) {
    key_ = key;
    value_ = value;
    ClientMetadata m;
    m.emplace(grpc::string_ref(key_), grpc::string_ref(value_));
    return m;
  }

  std::filesystem::path dir_;
  std::string key_, value_;
};

TEST_F(AuthTest, ConstantTimeEqualsComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secreT"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret2"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secre"));
  EXPECT_FALSE(ConstantTimeEquals("", "x"));
  EXPECT_FALSE(ConstantTimeEquals(std::string("a\0b", 3), std::string("a\0c", 3)));
}

TEST_F(AuthTest, ParseSkipsBlankLinesAndCommentsAndTrims) {
  absl::StatusOr<TokenSet> set =
      TokenSet::Parse("# clients\n\n  alpha  \n#beta\r\ngamma\r\n   \nalpha\n", "tokens.txt");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->size(), 2u);  // alpha twice counts once
  EXPECT_TRUE(set->Contains("alpha"));
  EXPECT_TRUE(set->Contains("gamma"));
  EXPECT_FALSE(set->Contains("beta"));
  EXPECT_FALSE(set->Contains("#beta"));
  EXPECT_FALSE(set->Contains(""));
  EXPECT_FALSE(set->Contains("alph"));
}

TEST_F(AuthTest, LoadFileErrorsNameTheFile) {
  const std::string missing = (dir_ / "missing.txt").string();
  absl::StatusOr<TokenSet> none = TokenSet::LoadFile(missing);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(), HasSubstr(missing));

  const std::string empty = WriteFile("empty.txt", "# only a comment\n\n");
  absl::StatusOr<TokenSet> nothing = TokenSet::LoadFile(empty);
  EXPECT_EQ(nothing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(nothing.status().message(), HasSubstr(empty));

  absl::StatusOr<TokenSet> good = TokenSet::LoadFile(WriteFile("good.txt", "t1\nt2\n"));
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_TRUE(good->Contains("t2"));
}

TEST_F(AuthTest, CheckBearerMetadataMapsMissingAndWrongTokens) {
  absl::StatusOr<TokenSet> set = TokenSet::Parse("right\n", "test");
  ASSERT_TRUE(set.ok());
  EXPECT_TRUE(CheckBearerMetadata({}, nullptr, "peer").ok());  // no token set: open

  absl::Status missing = CheckBearerMetadata({}, &*set, "ipv4:127.0.0.1:1");
  EXPECT_EQ(missing.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(missing.message(), "missing bearer token");
  EXPECT_EQ(CheckBearerMetadata(Metadata("authorization", "Basic right"), &*set, "p").code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckBearerMetadata(Metadata("authorization", "Bearer   "), &*set, "p").code(),
            absl::StatusCode::kUnauthenticated);

  absl::Status wrong = CheckBearerMetadata(Metadata("authorization", "Bearer wrong"), &*set, "p");
  EXPECT_EQ(wrong.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(wrong.message(), "unknown token");

  EXPECT_TRUE(CheckBearerMetadata(Metadata("authorization", "Bearer right"), &*set, "p").ok());
  EXPECT_TRUE(CheckBearerMetadata(Metadata("authorization", "bearer right"), &*set, "p").ok());
  // The join token is not a bearer token.
  EXPECT_EQ(CheckBearerMetadata(Metadata(kJoinTokenMetadataKey, "right"), &*set, "p").code(),
            absl::StatusCode::kUnauthenticated);
}

// Admin tokens: the union is the bearer set, BearerIn tells an admin's call, and a client's
// identity does not depend on how it spells the "Bearer " prefix (jobs.client compares it).
TEST_F(AuthTest, AdminTokensAreBearerTokensAndTheIdentityIgnoresThePrefixsSpelling) {
  absl::StatusOr<TokenSet> users = TokenSet::Parse("alice\n", "users");
  absl::StatusOr<TokenSet> admins = TokenSet::Parse("ops\n", "admins");
  ASSERT_TRUE(users.ok() && admins.ok());
  const TokenSet all = TokenSet::Union(*users, *admins);
  EXPECT_EQ(all.size(), 2u);
  EXPECT_EQ(TokenSet::Union(all, *admins).size(), 2u);  // a token in both counts once
  EXPECT_TRUE(CheckBearerMetadata(Metadata("authorization", "Bearer ops"), &all, "p").ok());
  EXPECT_TRUE(CheckBearerMetadata(Metadata("authorization", "Bearer alice"), &all, "p").ok());
  EXPECT_TRUE(BearerIn(Metadata("authorization", "Bearer ops"), &*admins));
  EXPECT_TRUE(BearerIn(Metadata("authorization", "bearer  ops "), &*admins));
  EXPECT_FALSE(BearerIn(Metadata("authorization", "Bearer alice"), &*admins));
  EXPECT_FALSE(BearerIn(Metadata("authorization", "Basic ops"), &*admins));
  EXPECT_FALSE(BearerIn(ClientMetadata(), &*admins));
  EXPECT_FALSE(BearerIn(Metadata("authorization", "Bearer ops"), nullptr));
  const std::string alice = ClientIdentity(Metadata("authorization", "Bearer alice"), &all, "p");
  EXPECT_EQ(ClientIdentity(Metadata("authorization", "bearer alice "), &all, "p"), alice);
  EXPECT_NE(ClientIdentity(Metadata("authorization", "Bearer ops"), &all, "p"), alice);
}

TEST_F(AuthTest, CheckJoinTokenMetadataMapsMissingAndWrongTokens) {
  absl::StatusOr<TokenSet> set = TokenSet::Parse("join-me\n", "test");
  ASSERT_TRUE(set.ok());
  EXPECT_TRUE(CheckJoinTokenMetadata({}, nullptr, "peer").ok());
  EXPECT_EQ(CheckJoinTokenMetadata({}, &*set, "p").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckJoinTokenMetadata(Metadata(kJoinTokenMetadataKey, "other"), &*set, "p").code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(CheckJoinTokenMetadata(Metadata(kJoinTokenMetadataKey, "join-me"), &*set, "p").ok());
  EXPECT_EQ(CheckJoinTokenMetadata(Metadata("authorization", "Bearer join-me"), &*set, "p").code(),
            absl::StatusCode::kUnauthenticated);
}

TEST_F(AuthTest, ServerCredentialsNeedCertAndKeyTogetherAndNameFiles) {
  EXPECT_TRUE(MakeServerCredentials("", "", "").ok());  // plaintext
  EXPECT_EQ(MakeServerCredentials("cert.pem", "", "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeServerCredentials("", "", "ca.pem").status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::string missing = (dir_ / "nope.pem").string();
  absl::Status status = MakeServerCredentials(missing, missing, "").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr(missing));
  const std::string not_pem = WriteFile("not.pem", "hello\n");
  status = MakeServerCredentials(not_pem, not_pem, "").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr(not_pem));
}

// A context with a deadline and, unless empty, `key: value` metadata.
std::unique_ptr<grpc::ClientContext> Context(const std::string& key, const std::string& value) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (!key.empty()) context->AddMetadata(key, value);
  return context;
}

TEST_F(AuthTest, DaemonRefusesEveryCallWithoutTheRightTokenButHealthStaysOpen) {
  CoordinatorDaemonConfig config = DaemonConfig();
  config.auth_token_file = WriteFile("tokens.txt", "client-1\n");
  config.join_token_file = WriteFile("join.txt", "join-1\n");
  auto daemon = CoordinatorDaemon::Start(config);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto channel =
      grpc::CreateChannel((*daemon)->grpc_address(), grpc::InsecureChannelCredentials());
  auto jobs = v1::JobService::NewStub(channel);
  auto workers = v1::WorkerService::NewStub(channel);

  v1::ListJobsReply list;
  EXPECT_EQ(jobs->ListJobs(Context("", "").get(), {}, &list).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(jobs->ListJobs(Context("authorization", "Bearer x").get(), {}, &list).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(jobs->ListJobs(Context("authorization", "Bearer client-1").get(), {}, &list).ok());
  v1::ListWorkersReply listed;
  EXPECT_EQ(jobs->ListWorkers(Context("", "").get(), {}, &listed).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  v1::DrainWorkerReply drained;  // an operator's call: the same tokens as every JobService call
  EXPECT_EQ(jobs->DrainWorker(Context("", "").get(), {}, &drained).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(
      jobs->DrainWorker(Context("authorization", "Bearer join-1").get(), {}, &drained).error_code(),
      grpc::StatusCode::PERMISSION_DENIED);
  v1::DeleteJobReply deleted;
  EXPECT_EQ(jobs->DeleteJob(Context("", "").get(), {}, &deleted).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  v1::UndrainWorkerReply undrained;
  EXPECT_EQ(jobs->UndrainWorker(Context("", "").get(), {}, &undrained).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(jobs->UndrainWorker(Context("authorization", "Bearer join-1").get(), {}, &undrained)
                .error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  v1::SubmitJobReply submitted;
  EXPECT_EQ(jobs->SubmitJob(Context("authorization", "Bearer join-1").get(), {}, &submitted)
                .error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  {
    v1::WatchJobRequest request;
    request.set_job_id("job-000001");
    auto context = Context("", "");
    auto reader = jobs->WatchJob(context.get(), request);
    v1::JobEvent event;
    EXPECT_FALSE(reader->Read(&event));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }

  v1::RegisterRequest register_request;
  register_request.mutable_capabilities()->set_device("cpu");
  register_request.mutable_capabilities()->set_host("127.0.0.1");
  register_request.mutable_capabilities()->set_rendezvous_port(29500);
  register_request.mutable_capabilities()->set_memory_bytes(int64_t{1} << 30);
  v1::RegisterReply registered;
  EXPECT_EQ(workers->Register(Context("", "").get(), register_request, &registered).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(workers->Register(Context(kJoinTokenMetadataKey, "client-1").get(), register_request,
                              &registered)
                .error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  for (const std::string& token : {std::string(), std::string("wrong")}) {
    auto context = Context(token.empty() ? "" : kJoinTokenMetadataKey, token);
    auto stream = workers->Session(context.get());
    v1::CoordinatorMessage message;
    EXPECT_FALSE(stream->Read(&message));
    EXPECT_EQ(stream->Finish().error_code(), token.empty()
                                                 ? grpc::StatusCode::UNAUTHENTICATED
                                                 : grpc::StatusCode::PERMISSION_DENIED);
  }
  auto admitted_context = Context(kJoinTokenMetadataKey, "join-1");
  admitted_context->AddMetadata(kWorkerSecretMetadataKey, std::string(64, 'a'));
  const grpc::Status admitted =
      workers->Register(admitted_context.get(), register_request, &registered);
  EXPECT_TRUE(admitted.ok()) << admitted.error_message();

  std::string error;
  EXPECT_EQ(probes::GrpcHealthCheck(channel, "", &error), 1) << error;
  (*daemon)->Shutdown();
}

TEST_F(AuthTest, DaemonDoesNotStartWithAMissingOrEmptyTokenFile) {
  CoordinatorDaemonConfig config = DaemonConfig();
  config.open_worker_service = true;  // not what this test is about
  config.auth_token_file = (dir_ / "missing.txt").string();
  auto daemon = CoordinatorDaemon::Start(config);
  ASSERT_FALSE(daemon.ok());
  EXPECT_THAT(daemon.status().message(), HasSubstr(config.auth_token_file));
  config.auth_token_file = "";
  config.join_token_file = WriteFile("empty.txt", "# nothing\n");
  daemon = CoordinatorDaemon::Start(config);
  ASSERT_FALSE(daemon.ok());
  EXPECT_THAT(daemon.status().message(), HasSubstr(config.join_token_file));
  // Admin tokens are bearer tokens with more rights: alone they would mean nothing.
  config.join_token_file = "";
  config.admin_token_file = WriteFile("admins.txt", "ops\n");
  daemon = CoordinatorDaemon::Start(config);
  ASSERT_FALSE(daemon.ok());
  EXPECT_EQ(daemon.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(daemon.status().message(), HasSubstr("--admin-token-file needs --auth-token-file"));
  config.auth_token_file = WriteFile("tokens.txt", "alice\n");
  config.admin_token_file = WriteFile("no-admins.txt", "# nobody\n");
  config.open_worker_service = true;
  daemon = CoordinatorDaemon::Start(config);
  ASSERT_FALSE(daemon.ok());
  EXPECT_THAT(daemon.status().message(), HasSubstr(config.admin_token_file));
}

// Bearer tokens guard JobService; a WorkerService that admits anyone would hand every job's spec
// to whoever registers as a worker. Refused unless the operator says it is meant.
TEST_F(AuthTest, DaemonRefusesBearerTokensWithAnOpenWorkerServiceUnlessAskedTo) {
  tests::LogCapture log;  // before the daemons: it outlives their threads
  CoordinatorDaemonConfig config = DaemonConfig();
  config.auth_token_file = WriteFile("tokens.txt", "alice\n");
  auto daemon = CoordinatorDaemon::Start(config);
  ASSERT_FALSE(daemon.ok());
  EXPECT_EQ(daemon.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(daemon.status().message(),
              HasSubstr("without --join-token-file WorkerService admits every client"));
  EXPECT_THAT(daemon.status().message(), HasSubstr("--open-worker-service"));

  // On purpose: it starts, says so, and workers need no join token. On every address and in
  // plaintext, it also says that the tokens can be read on the wire, and, without admins, who
  // may cancel and drain.
  config.open_worker_service = true;
  config.listen_address = "0.0.0.0:0";
  log.Take();
  daemon = CoordinatorDaemon::Start(config);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string open = log.Take();
  EXPECT_THAT(open, HasSubstr("WorkerService admits every worker (--open-worker-service)"));
  EXPECT_THAT(open, HasSubstr("tokens travel in plaintext to 0.0.0.0:0"));
  EXPECT_THAT(open,
              HasSubstr("no --admin-token-file: every client may read, cancel and delete any job"));
  auto channel =
      grpc::CreateChannel((*daemon)->grpc_address(), grpc::InsecureChannelCredentials());
  v1::RegisterRequest request;
  request.mutable_capabilities()->set_device("cpu");
  request.mutable_capabilities()->set_host("127.0.0.1");
  request.mutable_capabilities()->set_rendezvous_port(29500);
  v1::RegisterReply reply;
  grpc::Status registered = v1::WorkerService::NewStub(channel)->Register(
      Context(kWorkerSecretMetadataKey, std::string(64, 'a')).get(), request, &reply);
  EXPECT_TRUE(registered.ok()) << registered.error_message();
  (*daemon)->Shutdown();

  // A join token closes it (the flag then does nothing, and says so); loopback is this host.
  config.listen_address = "127.0.0.1:0";
  config.join_token_file = WriteFile("join.txt", "join-1\n");
  log.Take();
  daemon = CoordinatorDaemon::Start(config);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string closed = log.Take();
  EXPECT_THAT(closed, HasSubstr("workers must present a join token"));
  EXPECT_THAT(closed, Not(HasSubstr("plaintext to")));
  EXPECT_THAT(closed, Not(HasSubstr("admits every worker")));
  EXPECT_THAT(closed, HasSubstr("--open-worker-service has no effect"));
  (*daemon)->Shutdown();
}

}  // namespace
}  // namespace mat::coordinator
