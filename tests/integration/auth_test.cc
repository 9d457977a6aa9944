// Integration test of authentication (issue 6 §4) with the real binaries on loopback:
//   - bearer tokens: a mat-coordinator with --auth-token-file refuses matctl without a token
//     (UNAUTHENTICATED) and with a wrong one (PERMISSION_DENIED), serves it with the right one,
//     and logs each refusal without the token;
//   - the join token: with --join-token-file, a mat-worker without it or with another one exits
//     78 (refused for good: the systemd unit does not restart it) and never appears in `matctl
//     workers`; one with it registers, and its /readyz answers 200 while its session is open and
//     503 once the coordinator is gone;
//   - TLS: matctl with the test CA lists jobs, plaintext fails UNAVAILABLE; with mutual TLS
//     (--tls-ca on the coordinator) matctl without a client certificate fails, with one it works,
//     and a mat-worker with a client certificate registers;
//   - expired TLS material: with mutual TLS, a mat-worker whose client certificate is signed by the
//     right CA but expired never registers (it keeps retrying; the coordinator logs the failed
//     handshake), and matctl against a coordinator whose server certificate is expired fails
//     UNAVAILABLE naming the failed certificate verification.
//   - roles: with --admin-token-file a client reads, lists and cancels only its own jobs and
//     drains no worker, an admin token does all of it, and two tokens' equal --request-id are
//     two jobs;
//   - worker secrets: mat-worker makes its own in WORK_DIR/worker.secret (0600) and returns with
//     it; a process with the worker's id but another secret exits 78 (PERMISSION_DENIED), and
//     the secret is in no log and not in the coordinator's database;
// Certificates come from `openssl` (a throw-away CA valid for one day; the server certificate for
// IP:127.0.0.1; expired ones from `openssl ca` with 2020 dates); the test fails when openssl is
// missing (scripts/setup installs it).
//
// Every child is waited for with a deadline and killed in TearDown; ctest TIMEOUT 300.
#include <signal.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/integration/harness.h"
#include "tests/integration/probes.h"

namespace mat {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;
using testing_loopback::CommandResult;
using testing_loopback::kCoordinator;
using testing_loopback::ReadText;

class AuthTest : public testing_loopback::LoopbackTest {
 protected:
  std::string WriteFile(const std::string& name, const std::string& text) {
    const std::string path = root_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }

  // Starts mat-coordinator with `extra` flags on free ports and waits for its address file.
  void StartCoordinatorWith(const std::vector<std::string>& extra) {
    std::remove((state_dir_ + "/coordinator.addr").c_str());
    coordinator_log_ = root_ + "/coordinator." + std::to_string(++starts_);
    std::vector<std::string> args = {kCoordinator, "--listen", "127.0.0.1:0", "--metrics-listen",
                                     "", "--state-dir", state_dir_, "--log-level", "info"};
    args.insert(args.end(), extra.begin(), extra.end());
    coordinator_pid_ = Spawn(args, coordinator_log_ + ".out", coordinator_log_ + ".err");
    ASSERT_GT(coordinator_pid_, 0);
    address_ = WaitForLine(state_dir_ + "/coordinator.addr", 15s);
    ASSERT_FALSE(address_.empty()) << "no address file; stderr:\n"
                                   << ReadText(coordinator_log_ + ".err");
  }

  // Polls GET /readyz on the address in `addr_file` (written by the worker) for up to 60 s until
  // it answers `status`; the address, or "" when it never did.
  std::string WaitForHttpReady(const std::string& addr_file, int status) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (std::chrono::steady_clock::now() < deadline) {
      std::string address = ReadText(addr_file);
      while (!address.empty() && address.back() == '\n') address.pop_back();
      if (!address.empty() && probes::HttpGet(address, "/readyz").status == status) return address;
      std::this_thread::sleep_for(100ms);
    }
    return "";
  }

  void StopCoordinator() {
    ::kill(coordinator_pid_, SIGTERM);
    EXPECT_EQ(Wait(coordinator_pid_, 20s), 0);
  }

  // `matctl workers` (with `flags`) until a worker row shows, at most `timeout`; the last output.
  CommandResult WaitForWorker(const std::vector<std::string>& flags,
                              std::chrono::milliseconds timeout) {
    std::vector<std::string> args = flags;
    args.push_back("workers");
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    CommandResult r;
    do {
      r = Matctl(address_, args);
      if (r.exit_code == 0 && r.out.find(" cpu ") != std::string::npos) return r;
      std::this_thread::sleep_for(200ms);
    } while (std::chrono::steady_clock::now() < deadline);
    return r;
  }

  // A test CA, a server certificate for IP:127.0.0.1 and a client certificate, under root_/tls.
  // False (with the log) when openssl fails.
  bool MakeCertificates() {
    tls_ = root_ + "/tls";
    const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string script =
        "set -e; mkdir -p " + tls_ + "; cd " + tls_ + "; " +
        "openssl req -x509" + ec + " -keyout ca.key -out ca.pem -days 1 -subj /CN=mat-test-ca; " +
        "openssl req" + ec + " -keyout server.key -out server.csr -subj /CN=127.0.0.1; " +
        "printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext; " +
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
        "-extfile server.ext -out server.pem; " +
        "openssl req" + ec + " -keyout client.key -out client.csr -subj /CN=mat-test-client; " +
        "printf 'extendedKeyUsage=clientAuth\\n' > client.ext; " +
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
        "-extfile client.ext -out client.pem";
    const std::string command = "(" + script + ") > " + root_ + "/openssl.log 2>&1";
    return std::system(command.c_str()) == 0;
  }

  // After MakeCertificates: a client and a server certificate signed by the same CA but valid
  // only on 2020-01-01 (`openssl x509 -req` of OpenSSL 3.0 cannot set past dates; `openssl ca`
  // can), as expired-client.{pem,key} and expired-server.{pem,key}. False (with the log) on error.
  bool MakeExpiredCertificates() {
    const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string config =
        "[ca]\ndefault_ca = test_ca\n"
        "[test_ca]\ndatabase = ca-db/index.txt\nserial = ca-db/serial\n"
        "new_certs_dir = ca-db\ndefault_md = sha256\npolicy = any\nunique_subject = no\n"
        "[any]\ncommonName = supplied\n"
        "[server_ext]\nsubjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n"
        "[client_ext]\nextendedKeyUsage = clientAuth\n";
    std::ofstream(tls_ + "/ca.cnf") << config;
    const std::string sign =
        "openssl ca -batch -notext -config ca.cnf -cert ca.pem -keyfile ca.key "
        "-startdate 20200101000000Z -enddate 20200102000000Z ";
    const std::string script =
        "set -e; cd " + tls_ + "; mkdir -p ca-db; : > ca-db/index.txt; echo 01 > ca-db/serial; " +
        "openssl req" + ec + " -keyout expired-client.key -out expired-client.csr "
        "-subj /CN=mat-expired-client; " +
        sign + "-extensions client_ext -in expired-client.csr -out expired-client.pem; " +
        "openssl req" + ec + " -keyout expired-server.key -out expired-server.csr -subj /CN=127.0.0.1; " +
        sign + "-extensions server_ext -in expired-server.csr -out expired-server.pem; " +
        // The material really is expired (and otherwise valid: same CA).
        "! openssl verify -CAfile ca.pem expired-client.pem; "
        "openssl verify -no_check_time -CAfile ca.pem expired-client.pem expired-server.pem";
    const std::string command = "(" + script + ") >> " + root_ + "/openssl.log 2>&1";
    return std::system(command.c_str()) == 0;
  }

  std::string tls_;
};

TEST_F(AuthTest, TokensRefuseMatctlAndWorkersWithoutTheRightOne) {
  const std::string tokens = WriteFile("tokens.txt", "# matctl users\n\nclient-token-1\n");
  const std::string wrong = WriteFile("wrong.txt", "not-a-token\n");
  const std::string join = WriteFile("join.txt", "join-token-1\n");
  const std::string wrong_join = WriteFile("wrong-join.txt", "# other cluster\nother-join\n");
  ASSERT_NO_FATAL_FAILURE(StartCoordinatorWith(
      {"--auth-token-file", tokens, "--join-token-file", join}));

  CommandResult none = Matctl(address_, {"list"});
  EXPECT_EQ(none.exit_code, 1);
  EXPECT_THAT(none.err, HasSubstr("UNAUTHENTICATED: missing bearer token"));
  CommandResult bad = Matctl(address_, {"--token-file", wrong, "list"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.err, HasSubstr("PERMISSION_DENIED: unknown token"));
  CommandResult good = Matctl(address_, {"--token-file", tokens, "list"});
  EXPECT_EQ(good.exit_code, 0) << good.err;
  EXPECT_THAT(good.out, ::testing::StartsWith("ID "));
  CommandResult watch = Matctl(address_, {"--token-file", wrong, "watch", "job-000001"});
  EXPECT_EQ(watch.exit_code, 1);
  EXPECT_THAT(watch.err, HasSubstr("PERMISSION_DENIED: unknown token"));
  // Logs need the token too (the job need not exist: the token is checked first).
  CommandResult logs = Matctl(address_, {"logs", "job-000001"});
  EXPECT_EQ(logs.exit_code, 1);
  EXPECT_THAT(logs.err, HasSubstr("UNAUTHENTICATED: missing bearer token"));
  CommandResult logs_wrong = Matctl(address_, {"--token-file", wrong, "logs", "job-000001"});
  EXPECT_THAT(logs_wrong.err, HasSubstr("PERMISSION_DENIED: unknown token"));
  CommandResult logs_good = Matctl(address_, {"--token-file", tokens, "logs", "job-000001"});
  EXPECT_THAT(logs_good.err, HasSubstr("NOT_FOUND")) << "past the token check";
  // So does a download of artifacts.
  CommandResult download = Matctl(address_, {"download", "job-000001", "--out", root_ + "/dl"});
  EXPECT_EQ(download.exit_code, 1);
  EXPECT_THAT(download.err, HasSubstr("UNAUTHENTICATED: missing bearer token"));
  CommandResult download_good = Matctl(
      address_, {"--token-file", tokens, "download", "job-000001", "--out", root_ + "/dl"});
  EXPECT_THAT(download_good.err, HasSubstr("NOT_FOUND")) << "past the token check";
  EXPECT_FALSE(std::filesystem::exists(root_ + "/dl"));
  CommandResult missing_file = Matctl(address_, {"--token-file", root_ + "/nope.txt", "list"});
  EXPECT_EQ(missing_file.exit_code, 1);
  EXPECT_THAT(missing_file.err, HasSubstr(root_ + "/nope.txt"));

  // Workers without the join token, or with another one, are refused and stop.
  const pid_t no_token = StartWorker("worker-no-token");
  ASSERT_GT(no_token, 0);
  EXPECT_EQ(Wait(no_token, 60s), 78);
  EXPECT_THAT(ReadText(root_ + "/worker-no-token.err"), HasSubstr("UNAUTHENTICATED"));
  const pid_t other = StartWorker("worker-other", {"--join-token-file", wrong_join});
  ASSERT_GT(other, 0);
  EXPECT_EQ(Wait(other, 60s), 78);
  EXPECT_THAT(ReadText(root_ + "/worker-other.err"), HasSubstr("PERMISSION_DENIED"));
  CommandResult workers = Matctl(address_, {"--token-file", tokens, "workers"});
  ASSERT_EQ(workers.exit_code, 0) << workers.err;
  EXPECT_THAT(workers.out, Not(HasSubstr(" cpu ")));

  // With the join token the worker registers, and is ready while its session is open.
  ASSERT_GT(StartWorker("worker-ok", {"--join-token-file", join, "--metrics-listen", "127.0.0.1:0"}),
            0);
  CommandResult registered = WaitForWorker({"--token-file", tokens}, 60s);
  EXPECT_THAT(registered.out, HasSubstr(" cpu ")) << registered.err;
  const std::string worker_http = WaitForHttpReady(root_ + "/worker-ok/worker.metrics.addr", 200);
  EXPECT_FALSE(worker_http.empty()) << "worker /readyz never answered 200";

  // Refusals are logged with the peer, never with the token.
  const std::string log =
      ReadText(coordinator_log_ + ".err") + ReadText(coordinator_log_ + ".out");
  EXPECT_THAT(log, HasSubstr("refused a JobService call from ipv4:127.0.0.1:"));
  EXPECT_THAT(log, HasSubstr("refused a worker from ipv4:127.0.0.1:"));
  EXPECT_THAT(log, Not(HasSubstr("not-a-token")));
  EXPECT_THAT(log, Not(HasSubstr("other-join")));
  StopCoordinator();
  // The coordinator is gone: the worker keeps retrying, not ready.
  EXPECT_FALSE(WaitForHttpReady(root_ + "/worker-ok/worker.metrics.addr", 503).empty())
      << "worker /readyz still answers 200 without a coordinator";
  const probes::HttpResult gone = probes::HttpGet(worker_http, "/readyz");
  EXPECT_THAT(gone.body, HasSubstr("not connected to the coordinator at " + address_));
}

// Every worker has its own secret (service.proto, worker credentials): mat-worker makes it in
// WORK_DIR/worker.secret (mode 0600) before its first Register and comes back with it; a process
// that has the worker's id with another secret (a work dir that kept worker.id but lost
// worker.secret, or a forged one) is refused and exits 78, and the worker itself is not harmed.
TEST_F(AuthTest, AWorkerKeepsItsSecretAndNoProcessWithoutItTakesItsId) {
  ASSERT_NO_FATAL_FAILURE(StartCoordinatorWith({}));
  const pid_t first = StartWorker("w");
  ASSERT_GT(first, 0);
  const std::string id = WaitForLine(root_ + "/w/worker.id", 30s);
  ASSERT_FALSE(id.empty()) << ReadText(root_ + "/w.err");
  const std::string secret_file = root_ + "/w/worker.secret";
  const std::string secret = ReadText(secret_file);
  ASSERT_EQ(secret.size(), 65u) << "64 hex digits and a newline: '" << secret << "'";
  EXPECT_EQ(std::filesystem::status(secret_file).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  ASSERT_EQ(::kill(first, SIGTERM), 0);
  ASSERT_EQ(Wait(first, 30s), 0);
  const std::string first_log = ReadText(root_ + "/w.err") + ReadText(root_ + "/w.out");

  // With another secret, or a fresh one (worker.secret lost), the id is refused for good.
  for (const std::string& name : {std::string("thief-forged"), std::string("thief-lost")}) {
    std::filesystem::create_directories(root_ + "/" + name);
    std::ofstream(root_ + "/" + name + "/worker.id") << id << "\n";
    if (name == "thief-forged") {
      std::ofstream(root_ + "/" + name + "/worker.secret") << std::string(64, 'a') << "\n";
    }
    const pid_t thief = StartWorker(name);
    ASSERT_GT(thief, 0);
    EXPECT_EQ(Wait(thief, 60s), 78) << name;
    const std::string err = ReadText(root_ + "/" + name + ".err");
    EXPECT_THAT(err, HasSubstr("PERMISSION_DENIED")) << name;
    EXPECT_THAT(err, HasSubstr("the worker secret of this call is not worker " + id + "'s"))
        << name;
  }

  // A worker.secret that holds no secret stops mat-worker at start, naming the file.
  std::filesystem::create_directories(root_ + "/garbled");
  std::ofstream(root_ + "/garbled/worker.secret") << "not a secret\n";
  const pid_t garbled = StartWorker("garbled");
  ASSERT_GT(garbled, 0);
  EXPECT_EQ(Wait(garbled, 30s), 78);
  EXPECT_THAT(ReadText(root_ + "/garbled.err"),
              HasSubstr(root_ + "/garbled/worker.secret does not hold a worker secret"));

  // The worker itself comes back under its id with its secret (one worker, no second one).
  const pid_t again = StartWorker("w");
  ASSERT_GT(again, 0);
  CommandResult workers;
  for (auto until = std::chrono::steady_clock::now() + 60s;
       std::chrono::steady_clock::now() < until; std::this_thread::sleep_for(200ms)) {
    workers = Matctl(address_, {"workers"});
    if (workers.out.find("IDLE") != std::string::npos) break;
  }
  EXPECT_THAT(workers.out, HasSubstr("IDLE")) << workers.out << workers.err
                                              << ReadText(root_ + "/w.err");
  EXPECT_THAT(workers.out, HasSubstr(id));
  EXPECT_THAT(workers.out, Not(HasSubstr("worker-000002")));
  EXPECT_EQ(ReadText(secret_file), secret) << "the secret changed on a restart";

  // The secret is in no log, and not in the coordinator's database (its WAL included).
  const std::string bare = secret.substr(0, 64);
  EXPECT_THAT(first_log, Not(HasSubstr(bare)));
  EXPECT_THAT(ReadText(root_ + "/w.err") + ReadText(root_ + "/w.out"), Not(HasSubstr(bare)));
  EXPECT_THAT(ReadText(coordinator_log_ + ".err") + ReadText(coordinator_log_ + ".out"),
              Not(HasSubstr(bare)));
  const std::string db = state_dir_ + "/coordinator.db";
  EXPECT_THAT(ReadText(db) + ReadText(db + "-wal"), Not(HasSubstr(bare)));
}

// With --admin-token-file, a client reads and cancels only the jobs it submitted and drains or
// undrains no worker; an admin token does all of it, and is a bearer token for every other call
// too.
TEST_F(AuthTest, OnlyTheSubmitterOrAnAdminReadsOrCancelsAJobAndOnlyAnAdminDrains) {
  const std::string tokens = WriteFile("tokens.txt", "alice-token\nbob-token\n");
  const std::string admins = WriteFile("admins.txt", "# operators\nops-token\n");
  ASSERT_NO_FATAL_FAILURE(
      StartCoordinatorWith({"--auth-token-file", tokens, "--admin-token-file", admins,
                            "--open-worker-service"}));
  const std::string alice = WriteFile("alice.txt", "alice-token\n");
  const std::string bob = WriteFile("bob.txt", "bob-token\n");
  const std::string ops = WriteFile("ops.txt", "ops-token\n");
  const std::string spec = WriteFile(
      "job.yaml", "model: {layers: 1, d_model: 32, heads: 2, d_ff: 64}\n"
                  "data: {dir: '" + root_ + "'}\ntrain: {steps: 10, batch_size: 4}\n"
                  "policy: {probe_samples: 2}\n");
  std::vector<std::string> jobs;
  for (int i = 0; i < 2; ++i) {  // no worker: both stay QUEUED
    CommandResult submitted = Matctl(address_, {"--token-file", alice, "submit", spec});
    ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
    std::string id = submitted.out;
    while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
    jobs.push_back(id);
  }

  CommandResult bob_cancels = Matctl(address_, {"--token-file", bob, "cancel", jobs[0]});
  EXPECT_EQ(bob_cancels.exit_code, 1);
  EXPECT_THAT(bob_cancels.err, HasSubstr("PERMISSION_DENIED: job " + jobs[0] +
                                         " was submitted by another client"));
  // Reading is the submitter's too: bob neither sees alice's job nor lists it.
  CommandResult bob_reads = Matctl(address_, {"--token-file", bob, "status", jobs[0]});
  EXPECT_EQ(bob_reads.exit_code, 1);
  EXPECT_THAT(bob_reads.err, HasSubstr("PERMISSION_DENIED: job " + jobs[0] +
                                       " was submitted by another client"));
  EXPECT_THAT(bob_reads.err, HasSubstr("may read it"));
  CommandResult bob_lists = Matctl(address_, {"--token-file", bob, "list"});
  EXPECT_EQ(bob_lists.exit_code, 0) << bob_lists.err;
  EXPECT_THAT(bob_lists.out, Not(HasSubstr(jobs[0])));
  CommandResult alice_lists = Matctl(address_, {"--token-file", alice, "list"});
  EXPECT_THAT(alice_lists.out, HasSubstr(jobs[1]));
  CommandResult still = Matctl(address_, {"--token-file", alice, "status", jobs[0]});
  EXPECT_EQ(still.exit_code, 0) << still.err;
  EXPECT_THAT(still.out, HasSubstr("QUEUED")) << "the job is untouched";
  CommandResult unknown = Matctl(address_, {"--token-file", bob, "cancel", "job-000099"});
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("NOT_FOUND"));
  CommandResult alice_cancels = Matctl(address_, {"--token-file", alice, "cancel", jobs[0]});
  EXPECT_EQ(alice_cancels.exit_code, 0) << alice_cancels.err;
  CommandResult ops_cancels = Matctl(address_, {"--token-file", ops, "cancel", jobs[1]});
  EXPECT_EQ(ops_cancels.exit_code, 0) << ops_cancels.err;
  CommandResult cancelled = Matctl(address_, {"--token-file", ops, "status", jobs[1]});
  EXPECT_EQ(cancelled.exit_code, 0) << cancelled.err;
  EXPECT_THAT(cancelled.out, HasSubstr("CANCELLED"));

  CommandResult bob_drains = Matctl(address_, {"--token-file", bob, "drain", "worker-000001"});
  EXPECT_EQ(bob_drains.exit_code, 1);
  EXPECT_THAT(bob_drains.err, HasSubstr("PERMISSION_DENIED: draining a worker needs an admin"));
  CommandResult ops_drains = Matctl(address_, {"--token-file", ops, "drain", "worker-000001"});
  EXPECT_EQ(ops_drains.exit_code, 1);
  EXPECT_THAT(ops_drains.err, HasSubstr("NOT_FOUND")) << "past the admin check";
  CommandResult bob_undrains =
      Matctl(address_, {"--token-file", bob, "undrain", "worker-000001"});
  EXPECT_EQ(bob_undrains.exit_code, 1);
  EXPECT_THAT(bob_undrains.err,
              HasSubstr("PERMISSION_DENIED: undraining a worker needs an admin"));
  CommandResult ops_undrains =
      Matctl(address_, {"--token-file", ops, "undrain", "worker-000001"});
  EXPECT_EQ(ops_undrains.exit_code, 1);
  EXPECT_THAT(ops_undrains.err, HasSubstr("NOT_FOUND")) << "past the admin check";

  // A request id is its token's own: bob's equal id got alice's job, which he could not cancel.
  const auto submit = [&](const std::string& token_file) {
    CommandResult r =
        Matctl(address_, {"--token-file", token_file, "submit", spec, "--request-id", "nightly"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    while (!r.out.empty() && (r.out.back() == '\n' || r.out.back() == ' ')) r.out.pop_back();
    return r.out;
  };
  const std::string alices = submit(alice);
  const std::string bobs = submit(bob);
  EXPECT_NE(alices, bobs);
  EXPECT_EQ(submit(alice), alices) << "a retry is still idempotent";
  CommandResult bob_cancels_his = Matctl(address_, {"--token-file", bob, "cancel", bobs});
  EXPECT_EQ(bob_cancels_his.exit_code, 0) << bob_cancels_his.err;
}

TEST_F(AuthTest, TlsAndMutualTls) {
  ASSERT_EQ(std::system("command -v openssl > /dev/null 2>&1"), 0)
      << "openssl is not installed (scripts/setup installs it)";
  ASSERT_TRUE(MakeCertificates()) << ReadText(root_ + "/openssl.log");
  const std::string ca = tls_ + "/ca.pem";
  ASSERT_NO_FATAL_FAILURE(StartCoordinatorWith(
      {"--tls-cert", tls_ + "/server.pem", "--tls-key", tls_ + "/server.key"}));
  CommandResult secure = Matctl(address_, {"--tls-ca", ca, "list"});
  EXPECT_EQ(secure.exit_code, 0) << secure.err;
  EXPECT_THAT(secure.out, ::testing::StartsWith("ID "));
  CommandResult plain = Matctl(address_, {"--timeout", "3", "list"});
  EXPECT_EQ(plain.exit_code, 1);
  EXPECT_THAT(plain.err, HasSubstr("UNAVAILABLE"));
  // What the closed socket means (users saw only "Socket closed").
  EXPECT_THAT(plain.err, HasSubstr("if it serves TLS, give --tls-ca"));
  StopCoordinator();

  // A key that is not the certificate's was reported as "cannot listen" alone.
  const pid_t mismatched = Spawn({testing_loopback::kCoordinator, "--listen", "127.0.0.1:0",
                                  "--metrics-listen", "", "--state-dir", root_ + "/mismatch",
                                  "--tls-cert", tls_ + "/server.pem", "--tls-key",
                                  tls_ + "/client.key"},
                                 root_ + "/mismatch.out", root_ + "/mismatch.err");
  ASSERT_GT(mismatched, 0);
  EXPECT_EQ(Wait(mismatched, 30s), 1);
  EXPECT_THAT(ReadText(root_ + "/mismatch.err"),
              HasSubstr("or --tls-key not the key of --tls-cert?"));

  // Mutual TLS: client certificates are required.
  ASSERT_NO_FATAL_FAILURE(StartCoordinatorWith({"--tls-cert", tls_ + "/server.pem", "--tls-key",
                                                tls_ + "/server.key", "--tls-ca", ca}));
  CommandResult no_cert = Matctl(address_, {"--timeout", "3", "--tls-ca", ca, "list"});
  EXPECT_EQ(no_cert.exit_code, 1);
  EXPECT_THAT(no_cert.err, HasSubstr("UNAVAILABLE"));
  EXPECT_THAT(no_cert.err, HasSubstr("give --tls-cert and --tls-key"));
  const std::vector<std::string> client_tls = {"--tls-ca", ca, "--tls-cert",
                                               tls_ + "/client.pem", "--tls-key",
                                               tls_ + "/client.key"};
  std::vector<std::string> list_args = client_tls;
  list_args.push_back("list");
  CommandResult with_cert = Matctl(address_, list_args);
  EXPECT_EQ(with_cert.exit_code, 0) << with_cert.err;

  // A worker over mutual TLS registers.
  ASSERT_GT(StartWorker("worker-tls", client_tls), 0);
  CommandResult registered = WaitForWorker(client_tls, 60s);
  EXPECT_THAT(registered.out, HasSubstr(" cpu ")) << registered.err;
  StopCoordinator();
}

TEST_F(AuthTest, ExpiredCertificatesAreRefused) {
  ASSERT_EQ(std::system("command -v openssl > /dev/null 2>&1"), 0)
      << "openssl is not installed (scripts/setup installs it)";
  ASSERT_TRUE(MakeCertificates()) << ReadText(root_ + "/openssl.log");
  ASSERT_TRUE(MakeExpiredCertificates()) << ReadText(root_ + "/openssl.log");
  const std::string ca = tls_ + "/ca.pem";

  // (a) Mutual TLS with a valid server certificate: a worker presenting an expired client
  // certificate of the right CA fails the handshake and never registers.
  ASSERT_NO_FATAL_FAILURE(StartCoordinatorWith({"--tls-cert", tls_ + "/server.pem", "--tls-key",
                                                tls_ + "/server.key", "--tls-ca", ca}));
  const pid_t expired = StartWorker(
      "worker-expired", {"--tls-ca", ca, "--tls-cert", tls_ + "/expired-client.pem",
                         "--tls-key", tls_ + "/expired-client.key"});
  ASSERT_GT(expired, 0);
  const std::string worker_err = root_ + "/worker-expired.err";
  const auto deadline = std::chrono::steady_clock::now() + 15s;
  while (ReadText(worker_err).find("cannot register") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
  }
  const std::string worker_log = ReadText(worker_err) + ReadText(root_ + "/worker-expired.out");
  // With TLS 1.3 the client's side of a refused client certificate is only a closed socket
  // (gRPC: "UNAVAILABLE ... Socket closed"); the worker keeps retrying, never registered.
  EXPECT_THAT(worker_log, HasSubstr("cannot register with the coordinator"));
  EXPECT_THAT(worker_log, HasSubstr("it may refuse this client certificate"));
  EXPECT_THAT(worker_log, Not(HasSubstr("registered with")));
  const std::vector<std::string> client_tls = {"--tls-ca", ca, "--tls-cert",
                                               tls_ + "/client.pem", "--tls-key",
                                               tls_ + "/client.key"};
  std::vector<std::string> workers_args = client_tls;
  workers_args.push_back("workers");
  CommandResult workers = Matctl(address_, workers_args);
  ASSERT_EQ(workers.exit_code, 0) << workers.err;
  EXPECT_THAT(workers.out, Not(HasSubstr(" cpu ")));
  // matctl with the same expired certificate is refused as well.
  CommandResult expired_matctl =
      Matctl(address_, {"--timeout", "3", "--tls-ca", ca, "--tls-cert",
                        tls_ + "/expired-client.pem", "--tls-key",
                        tls_ + "/expired-client.key", "list"});
  EXPECT_EQ(expired_matctl.exit_code, 1);
  EXPECT_THAT(expired_matctl.err, HasSubstr("UNAVAILABLE"));
  // The coordinator logs the failed handshake (gRPC: "Handshake failed ... certificate verify
  // failed").
  const std::string coordinator_log =
      ReadText(coordinator_log_ + ".err") + ReadText(coordinator_log_ + ".out");
  EXPECT_THAT(coordinator_log, HasSubstr("Handshake failed"));
  EXPECT_THAT(coordinator_log, HasSubstr("certificate verify failed"));
  ::kill(expired, SIGTERM);
  EXPECT_NE(Wait(expired, 10s), -1);
  StopCoordinator();

  // (b) A coordinator serving an expired certificate: matctl (trusting the CA) refuses it.
  ASSERT_NO_FATAL_FAILURE(StartCoordinatorWith(
      {"--tls-cert", tls_ + "/expired-server.pem", "--tls-key", tls_ + "/expired-server.key"}));
  CommandResult stale = Matctl(address_, {"--timeout", "3", "--tls-ca", ca, "list"});
  EXPECT_EQ(stale.exit_code, 1);
  EXPECT_THAT(stale.err, HasSubstr("UNAVAILABLE"));
  EXPECT_THAT(stale.err, HasSubstr("certificate verify failed"));
  EXPECT_THAT(stale.out, Not(::testing::StartsWith("ID ")));
  StopCoordinator();
}

}  // namespace
}  // namespace mat
