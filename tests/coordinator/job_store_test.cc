// Tests of coordinator/job_store.h against real SQLite files in a temporary directory: jobs,
// idempotent submission, persistence across reopen, state transitions, λ history (NaN rejection,
// paging), decisions, rank 0's progress, modules, workers and assignments with rank status, and
// the durability settings (WAL, FULL sync, schema version and the v1 -> v2 migration, the
// state-dir lock).
#include "coordinator/job_store.h"

#include <sqlite3.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "tests/testing/temp_dir.h"

namespace mat::coordinator {
namespace {

namespace fs = std::filesystem;
using google::protobuf::util::MessageDifferencer;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

v1::JobSpec Spec(int64_t layers) {
  v1::JobSpec spec;
  spec.mutable_model()->set_layers(layers);
  spec.mutable_resources()->set_workers(2);
  return spec;
}

std::string ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

class JobStoreTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_job_store"};  // outlives the members below

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok()) << "cannot create a temporary directory";
    root_ = tmp_.path();
    dir_ = root_ + "/state";  // not created yet: Open must create it
    Reopen();
  }

  void TearDown() override {
    store_.reset();
  }

  // Closes the store (if open) and opens a new one on the same directory.
  void Reopen() {
    store_.reset();
    JobStoreOptions options;
    options.now_unix_seconds = [this] { return now_; };
    auto store = JobStore::Open(dir_, options);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }

  std::string Create(const std::string& request_id, const v1::JobSpec& spec,
                     const std::string& client = "") {
    auto r = store_->CreateJob(request_id, spec, client);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->job_id : "";
  }

  // What undoes version 11 in a current file (the first step of making an older one).
  static constexpr const char* kUndoV11 = "DROP INDEX jobs_state_seq; ";
  // What undoes versions 11 and 10 in a current file.
  static constexpr const char* kUndoV10 =
      "DROP INDEX jobs_state_seq; ALTER TABLE assignments DROP COLUMN flops_total; ";
  // What undoes versions 11, 10, 9 and 8 in a current file.
  static constexpr const char* kUndoV8 =
      "DROP INDEX jobs_state_seq; ALTER TABLE assignments DROP COLUMN flops_total; "
      "ALTER TABLE jobs DROP COLUMN deleted_unix_seconds; "
      "DROP INDEX jobs_request_scope_key; UPDATE jobs SET client_request_id = request_key; "
      "ALTER TABLE jobs DROP COLUMN request_key; ALTER TABLE jobs DROP COLUMN request_scope; ";

  // Runs one or more statements on the database file through a separate connection.
  void RawExec(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open_v2(JobStore::DatabasePath(dir_).c_str(), &db,
                              SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr),
              SQLITE_OK);
    char* error = nullptr;
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error), SQLITE_OK)
        << (error != nullptr ? error : "");
    sqlite3_free(error);
    sqlite3_close(db);
  }

  // Runs SQL on the database file through a separate connection (as an operator's sqlite3 shell
  // would), returning `column` (0: the first) of the first row.
  std::string RawQuery(const std::string& sql, int column = 0) {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open_v2(JobStore::DatabasePath(dir_).c_str(), &db, SQLITE_OPEN_READWRITE,
                              nullptr),
              SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    std::string out;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK) {
      const int rc = sqlite3_step(stmt);
      if (rc == SQLITE_ROW && sqlite3_column_text(stmt, column) != nullptr) {
        out = reinterpret_cast<const char*>(sqlite3_column_text(stmt, column));
      }
      EXPECT_TRUE(rc == SQLITE_ROW || rc == SQLITE_DONE) << sqlite3_errmsg(db);
    } else {
      ADD_FAILURE() << sql << ": " << sqlite3_errmsg(db);
    }
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return out;
  }

  std::string root_, dir_;
  int64_t now_ = 1'700'000'000;
  std::unique_ptr<JobStore> store_;
};

// ----- jobs -----

TEST_F(JobStoreTest, CreatesGetsAndListsJobsInSubmissionOrder) {
  const std::string a = Create("req-a", Spec(1));
  now_ += 5;
  const std::string b = Create("req-b", Spec(2));
  const std::string c = Create("", Spec(3));
  EXPECT_NE(a, b);
  EXPECT_NE(b, c);

  auto job = store_->GetJob(b);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->id, b);
  EXPECT_EQ(job->client_request_id, "req-b");
  EXPECT_TRUE(MessageDifferencer::Equals(job->spec, Spec(2)));
  EXPECT_EQ(job->state, v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job->created_unix_seconds, 1'700'000'005);
  EXPECT_EQ(job->updated_unix_seconds, 1'700'000'005);
  EXPECT_EQ(job->error_message, "");

  auto page = store_->ListJobs(0, "");
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->jobs.size(), 3u);
  EXPECT_EQ(page->jobs[0].id, a);
  EXPECT_EQ(page->jobs[1].id, b);
  EXPECT_EQ(page->jobs[2].id, c);
  EXPECT_EQ(page->jobs[2].client_request_id, "");
  EXPECT_EQ(page->jobs[2].spec.model().layers(), 3);
  EXPECT_EQ(page->next_page_token, "");
}

TEST_F(JobStoreTest, UnknownJobIsNotFound) {
  EXPECT_EQ(store_->GetJob("job-999999").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->UpdateJobState("nope", v1::JOB_STATE_RUNNING).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->AppendLambdas("nope", 0, {1.0}).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetLambdas("nope", 0, "").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->AppendDecision("nope", 0, "{}").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->UpdateJobProgress("nope", {}).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->SetJobSummary("nope", "{}").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->PutModules("nope", {{"m", "heads", 0, 0}}).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetModules("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->RecordDecision("nope", {0, {}, "{}", 1, 0, "", ""}).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->UpdateRankStatus("nope", 0, 0, 0, 0, "").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->ListAssignments("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(JobStoreTest, SubmitIsIdempotentByClientRequestId) {
  auto first = store_->CreateJob("req-1", Spec(4));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->created);
  now_ += 60;
  auto again = store_->CreateJob("req-1", Spec(4));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->job_id, first->job_id);

  // The same request id with another spec is a client bug, not a retry.
  auto other = store_->CreateJob("req-1", Spec(5));
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), absl::StatusCode::kAlreadyExists) << other.status();
  EXPECT_THAT(other.status().message(), HasSubstr("req-1"));
  EXPECT_THAT(other.status().message(), HasSubstr(first->job_id));

  // Without a request id every call is a new job.
  const std::string x = Create("", Spec(4));
  const std::string y = Create("", Spec(4));
  EXPECT_NE(x, y);

  auto page = store_->ListJobs(0, "");
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_EQ(page->jobs.size(), 3u);  // req-1 once, plus x and y
  // The retry did not touch the stored job.
  auto job = store_->GetJob(first->job_id);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->created_unix_seconds, 1'700'000'000);
}

// A request id was unique across every client: bob's submit with alice's key got her job back
// (same spec) or ALREADY_EXISTS (another), and under roles he could not cancel it. Since v8 a
// bearer token's keys are its own; clients without a token (peer hosts) still share one scope,
// so a resubmit from another address finds its job. A v7 file's keys move to their scopes.
TEST_F(JobStoreTest, RequestIdsAreEachTokensOwnAndAVersion7FileMigrates) {
  const std::string alice = "token:0123456789abcdef", bob = "token:fedcba9876543210";
  const std::string old = Create("old-key", Spec(1), alice);
  const std::string old_peer = Create("peer-key", Spec(1), "peer:ipv4:10.0.0.1");
  store_.reset();
  RawExec(std::string(kUndoV8) + "UPDATE schema_version SET version = 7;");
  ASSERT_EQ(RawQuery("SELECT count(*) FROM jobs WHERE client_request_id IS NOT NULL"), "2");
  Reopen();
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  EXPECT_EQ(RawQuery("SELECT count(*) FROM jobs WHERE client_request_id IS NULL"), "2");
  EXPECT_EQ(store_->GetJob(old)->client_request_id, "old-key");
  auto retry = store_->CreateJob("old-key", Spec(1), alice);
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_FALSE(retry->created);
  EXPECT_EQ(retry->job_id, old);
  // A peer client's old key is found from another address too.
  auto moved = store_->CreateJob("peer-key", Spec(1), "peer:ipv4:10.0.0.2");
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_FALSE(moved->created);
  EXPECT_EQ(moved->job_id, old_peer);

  // bob's equal key, with alice's spec or another: his own new job, then idempotent for him.
  auto b1 = store_->CreateJob("old-key", Spec(1), bob);
  ASSERT_TRUE(b1.ok()) << b1.status();
  EXPECT_TRUE(b1->created);
  EXPECT_NE(b1->job_id, old);
  EXPECT_EQ(store_->GetJob(b1->job_id)->client, bob);
  EXPECT_EQ(store_->GetJob(b1->job_id)->client_request_id, "old-key");
  auto b2 = store_->CreateJob("old-key", Spec(1), bob);
  ASSERT_TRUE(b2.ok()) << b2.status();
  EXPECT_EQ(b2->job_id, b1->job_id);
  // A token's key is not a peer's, nor the reverse.
  auto peer = store_->CreateJob("old-key", Spec(1), "peer:ipv4:10.0.0.1");
  ASSERT_TRUE(peer.ok()) << peer.status();
  EXPECT_TRUE(peer->created);
  auto token = store_->CreateJob("peer-key", Spec(1), alice);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_TRUE(token->created);
  // Within one scope a key still names one job.
  EXPECT_EQ(store_->CreateJob("old-key", Spec(2), alice).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store_->CreateJob("old-key", Spec(2), bob).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store_->CreateJob("peer-key", Spec(2), "peer:ipv4:10.0.0.3").status().code(),
            absl::StatusCode::kAlreadyExists);
}

TEST_F(JobStoreTest, IdempotencySurvivesReopen) {
  const std::string id = Create("req-r", Spec(2));
  Reopen();
  auto again = store_->CreateJob("req-r", Spec(2));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->job_id, id);
}

TEST_F(JobStoreTest, ReopenSeesEverything) {
  const std::string a = Create("req-a", Spec(1));
  const std::string b = Create("req-b", Spec(2));
  now_ += 10;
  ASSERT_TRUE(store_->UpdateJobState(a, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store_->UpdateJobState(b, v1::JOB_STATE_FAILED, "no workers").ok());
  ASSERT_TRUE(store_->AppendLambdas(a, 20, {1.5, 2.5, 3.5}).ok());
  ASSERT_TRUE(store_->AppendDecision(a, 20, R"({"step": 20})").ok());
  ASSERT_TRUE(store_->UpsertWorker({"w1", "host1", "cpu", 1 << 30, 0, 0}).ok());
  ASSERT_TRUE(store_->PutAssignment(a, 0, "w1", 0).ok());

  Reopen();

  auto page = store_->ListJobs(0, "");
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->jobs.size(), 2u);
  EXPECT_EQ(page->jobs[0].id, a);
  EXPECT_EQ(page->jobs[0].state, v1::JOB_STATE_RUNNING);
  EXPECT_EQ(page->jobs[0].updated_unix_seconds, 1'700'000'010);
  EXPECT_TRUE(MessageDifferencer::Equals(page->jobs[0].spec, Spec(1)));
  EXPECT_EQ(page->jobs[1].state, v1::JOB_STATE_FAILED);
  EXPECT_EQ(page->jobs[1].error_message, "no workers");

  auto lambdas = store_->GetLambdas(a, 0, "");
  ASSERT_TRUE(lambdas.ok()) << lambdas.status();
  ASSERT_EQ(lambdas->points.size(), 1u);
  EXPECT_EQ(lambdas->points[0].step, 20);
  EXPECT_THAT(lambdas->points[0].lambda, ElementsAre(1.5, 2.5, 3.5));

  auto decisions = store_->GetDecisions(a, 0, "");
  ASSERT_TRUE(decisions.ok()) << decisions.status();
  ASSERT_EQ(decisions->decisions.size(), 1u);
  EXPECT_EQ(decisions->decisions[0].json, R"({"step": 20})");

  auto workers = store_->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->size(), 1u);
  EXPECT_EQ((*workers)[0].host, "host1");
  auto assignments = store_->ListAssignments(a);
  ASSERT_TRUE(assignments.ok()) << assignments.status();
  ASSERT_EQ(assignments->size(), 1u);
  EXPECT_EQ((*assignments)[0].worker_id, "w1");

  // Ids continue after the existing ones.
  const std::string c = Create("req-c", Spec(3));
  EXPECT_NE(c, a);
  EXPECT_NE(c, b);
}

TEST_F(JobStoreTest, ListJobsPagesAndFilters) {
  std::vector<std::string> ids;
  for (int i = 0; i < 7; ++i) ids.push_back(Create("req-" + std::to_string(i), Spec(i + 1)));
  ASSERT_TRUE(store_->UpdateJobState(ids[1], v1::JOB_STATE_CANCELLED).ok());
  ASSERT_TRUE(store_->UpdateJobState(ids[4], v1::JOB_STATE_RUNNING).ok());

  std::vector<std::string> listed;
  std::string token;
  int pages = 0;
  do {
    auto page = store_->ListJobs(3, token);
    ASSERT_TRUE(page.ok()) << page.status();
    EXPECT_LE(page->jobs.size(), 3u);
    for (const auto& j : page->jobs) listed.push_back(j.id);
    token = page->next_page_token;
    ASSERT_LT(++pages, 10) << "paging does not end";
  } while (!token.empty());
  EXPECT_EQ(listed, ids);
  EXPECT_EQ(pages, 3);  // 3 + 3 + 1, no empty trailing page

  auto queued = store_->ListJobs(0, "", {v1::JOB_STATE_QUEUED});
  ASSERT_TRUE(queued.ok()) << queued.status();
  EXPECT_EQ(queued->jobs.size(), 5u);
  auto some = store_->ListJobs(0, "", {v1::JOB_STATE_CANCELLED, v1::JOB_STATE_RUNNING});
  ASSERT_TRUE(some.ok()) << some.status();
  ASSERT_EQ(some->jobs.size(), 2u);
  EXPECT_EQ(some->jobs[0].id, ids[1]);
  EXPECT_EQ(some->jobs[1].id, ids[4]);

  // One client's jobs (the roles' ListJobs), paged as the rest.
  const std::string alices[] = {Create("", Spec(20), "token:a"), Create("", Spec(21), "token:a")};
  Create("", Spec(22), "token:b");
  auto first = store_->ListJobs(1, "", {}, std::string("token:a"));
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->jobs.size(), 1u);
  EXPECT_EQ(first->jobs[0].id, alices[0]);
  auto second = store_->ListJobs(1, first->next_page_token, {}, std::string("token:a"));
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(second->jobs.size(), 1u);
  EXPECT_EQ(second->jobs[0].id, alices[1]);
  EXPECT_EQ(second->next_page_token, "");
  auto none = store_->ListJobs(0, "", {v1::JOB_STATE_RUNNING}, std::string("token:a"));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->jobs.empty());
  auto keyless = store_->ListJobs(0, "", {}, std::string(""));  // jobs stored without a client
  ASSERT_TRUE(keyless.ok()) << keyless.status();
  EXPECT_EQ(keyless->jobs.size(), ids.size());

  EXPECT_EQ(store_->ListJobs(-1, "").status().code(), absl::StatusCode::kInvalidArgument);
  for (const std::string bad : {"abc", "-3", "007", " 3", "3x"}) {
    auto page = store_->ListJobs(0, bad);
    EXPECT_EQ(page.status().code(), absl::StatusCode::kInvalidArgument) << "token " << bad;
  }
}

// ----- state transitions -----

const std::vector<v1::JobState> kStates = {
    v1::JOB_STATE_QUEUED,    v1::JOB_STATE_RUNNING,   v1::JOB_STATE_SUCCEEDED,
    v1::JOB_STATE_FAILED,    v1::JOB_STATE_CANCELLED, v1::JOB_STATE_RESTARTING};

TEST(JobTransitionTest, TableMatchesTheLifecycle) {
  // Every (from, to) pair, listed explicitly: the legal ones are the lifecycle of DESIGN §8.
  const std::set<std::pair<v1::JobState, v1::JobState>> legal = {
      {v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING},
      {v1::JOB_STATE_QUEUED, v1::JOB_STATE_CANCELLED},
      {v1::JOB_STATE_QUEUED, v1::JOB_STATE_FAILED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_FAILED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_CANCELLED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING},
      {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_RUNNING},
      {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_FAILED},
      {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_CANCELLED}};
  std::vector<v1::JobState> all = kStates;
  all.push_back(v1::JOB_STATE_UNSPECIFIED);
  for (v1::JobState from : all) {
    for (v1::JobState to : all) {
      EXPECT_EQ(IsLegalJobTransition(from, to), legal.count({from, to}) == 1)
          << JobStateName(from) << " -> " << JobStateName(to);
    }
  }
}

// The shortest legal path from QUEUED to each state.
std::vector<v1::JobState> PathTo(v1::JobState s) {
  switch (s) {
    case v1::JOB_STATE_QUEUED:
      return {};
    case v1::JOB_STATE_RUNNING:
      return {v1::JOB_STATE_RUNNING};
    case v1::JOB_STATE_RESTARTING:
      return {v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING};
    default:
      return {v1::JOB_STATE_RUNNING, s};
  }
}

class JobStoreTransitionTest
    : public JobStoreTest,
      public ::testing::WithParamInterface<std::tuple<v1::JobState, v1::JobState>> {};

TEST_P(JobStoreTransitionTest, StoreAppliesOnlyLegalTransitions) {
  const auto [from, to] = GetParam();
  const std::string id = Create("", Spec(1));
  for (v1::JobState s : PathTo(from)) ASSERT_TRUE(store_->UpdateJobState(id, s).ok());
  now_ += 7;
  absl::Status st = store_->UpdateJobState(id, to, "why");
  auto job = store_->GetJob(id);
  ASSERT_TRUE(job.ok()) << job.status();
  if (IsLegalJobTransition(from, to)) {
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_EQ(job->state, to);
    EXPECT_EQ(job->error_message, "why");
    EXPECT_EQ(job->updated_unix_seconds, now_);
  } else {
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    EXPECT_THAT(st.message(), HasSubstr(JobStateName(from)));
    EXPECT_THAT(st.message(), HasSubstr(JobStateName(to)));
    EXPECT_EQ(job->state, from) << "a refused transition changed the state";
    EXPECT_EQ(job->error_message, "");
    EXPECT_LT(job->updated_unix_seconds, now_);
  }
}

INSTANTIATE_TEST_SUITE_P(AllPairs, JobStoreTransitionTest,
                         ::testing::Combine(::testing::ValuesIn(kStates),
                                            ::testing::ValuesIn(kStates)),
                         [](const auto& info) {
                           return JobStateName(std::get<0>(info.param)) + "_to_" +
                                  JobStateName(std::get<1>(info.param));
                         });

TEST_F(JobStoreTest, UnspecifiedStateIsInvalidArgument) {
  const std::string id = Create("", Spec(1));
  EXPECT_EQ(store_->UpdateJobState(id, v1::JOB_STATE_UNSPECIFIED).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->UpdateJobState(id, static_cast<v1::JobState>(42)).code(),
            absl::StatusCode::kInvalidArgument);
}

// ----- λ history -----

TEST_F(JobStoreTest, RejectsNonFiniteLambdasNamingTheModuleAndWritesNothing) {
  const std::string id = Create("", Spec(1));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    std::vector<double> lambda;
    std::string needle;
  };
  for (const Case& c : {Case{{1.0, nan, 2.0}, "module 1: lambda is nan"},
                        Case{{1.0, 2.0, 3.0, -inf}, "module 3: lambda is inf"},
                        Case{{inf}, "module 0: lambda is inf"}}) {
    absl::Status st = store_->AppendLambdas(id, 40, c.lambda);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_THAT(st.message(), HasSubstr(c.needle));
  }
  EXPECT_EQ(store_->AppendLambdas(id, 40, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->AppendLambdas(id, -20, {1.0}).code(), absl::StatusCode::kInvalidArgument);
  auto page = store_->GetLambdas(id, 0, "");
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_TRUE(page->points.empty()) << "a rejected report was stored";
  EXPECT_EQ(RawQuery("SELECT count(*) FROM lambda_history"), "0");
}

TEST_F(JobStoreTest, LambdasAreExactAndReappendingAStepReplacesIt) {
  const std::string id = Create("", Spec(1));
  const std::vector<double> exact = {0.1 + 0.2, 1e-300, 123456.789012345678, 0.0};
  ASSERT_TRUE(store_->AppendLambdas(id, 0, exact).ok());
  ASSERT_TRUE(store_->AppendLambdas(id, 20, {5.0, 6.0, 7.0, 8.0}).ok());
  // A restarted job replays step 20 (here with fewer modules reported, to see old rows go).
  ASSERT_TRUE(store_->AppendLambdas(id, 20, {9.0, 10.0}).ok());
  auto page = store_->GetLambdas(id, 0, "");
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->points.size(), 2u);
  EXPECT_EQ(page->points[0].lambda, exact);  // bit-exact doubles
  EXPECT_THAT(page->points[1].lambda, ElementsAre(9.0, 10.0));
}

TEST_F(JobStoreTest, LambdasPageBySteps) {
  const std::string a = Create("", Spec(1));
  const std::string b = Create("", Spec(2));
  for (int64_t k = 0; k < 25; ++k) {
    // Appended out of order: pages must still come back in step order.
    const int64_t step = ((k * 7) % 25) * 20;
    ASSERT_TRUE(store_->AppendLambdas(a, step, {double(step), double(step) + 0.5}).ok());
  }
  ASSERT_TRUE(store_->AppendLambdas(b, 0, {99.0}).ok());  // another job's history stays apart

  std::vector<int64_t> steps;
  std::vector<size_t> sizes;
  std::string token;
  do {
    auto page = store_->GetLambdas(a, 10, token);
    ASSERT_TRUE(page.ok()) << page.status();
    sizes.push_back(page->points.size());
    for (const auto& p : page->points) {
      steps.push_back(p.step);
      EXPECT_THAT(p.lambda, ElementsAre(double(p.step), double(p.step) + 0.5));
    }
    token = page->next_page_token;
    ASSERT_LT(sizes.size(), 10u) << "paging does not end";
  } while (!token.empty());
  EXPECT_THAT(sizes, ElementsAre(10u, 10u, 5u));
  ASSERT_EQ(steps.size(), 25u);
  for (size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i], int64_t(i) * 20);

  // page_size is clamped, not an error; a malformed token is.
  auto big = store_->GetLambdas(a, 1'000'000, "");
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(big->points.size(), 25u);
  EXPECT_EQ(store_->GetLambdas(a, 10, "x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetLambdas(a, -1, "").status().code(), absl::StatusCode::kInvalidArgument);
}

// ----- decisions -----

TEST_F(JobStoreTest, DecisionsAreJsonPagedAndReplaced) {
  const std::string id = Create("", Spec(1));
  EXPECT_EQ(store_->AppendDecision(id, 0, "{not json").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->AppendDecision(id, -1, "{}").code(), absl::StatusCode::kInvalidArgument);
  for (int64_t step = 0; step < 100; step += 20) {
    ASSERT_TRUE(store_->AppendDecision(id, step, "{\"step\": " + std::to_string(step) + "}").ok());
  }
  ASSERT_TRUE(store_->AppendDecision(id, 40, R"({"step": 40, "replayed": true})").ok());
  auto first = store_->GetDecisions(id, 3, "");
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->decisions.size(), 3u);
  EXPECT_EQ(first->decisions[2].json, R"({"step": 40, "replayed": true})");
  ASSERT_FALSE(first->next_page_token.empty());
  auto second = store_->GetDecisions(id, 3, first->next_page_token);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(second->decisions.size(), 2u);
  EXPECT_EQ(second->decisions[0].step, 60);
  EXPECT_EQ(second->decisions[1].step, 80);
  EXPECT_EQ(second->next_page_token, "");
}

// ----- logs -----

std::vector<LogLineRecord> Lines(const std::vector<std::string>& texts) {
  std::vector<LogLineRecord> out;
  for (const std::string& t : texts) out.push_back({99, 7, 1700000000123, "info", t});
  return out;
}

// A spec stored before a field existed (here: resources.max_train_seconds unset) is the same
// spec as one with that field's default: a resubmit after an upgrade returns the job.
TEST_F(JobStoreTest, AResubmitMatchesAJobStoredBeforeAFieldExisted) {
  v1::JobSpec old_spec = Spec(1);
  old_spec.mutable_resources()->clear_max_train_seconds();
  const std::string id = Create("before-upgrade", old_spec, "token:a");
  v1::JobSpec now_spec = Spec(1);
  now_spec.mutable_resources()->set_max_train_seconds(0);
  auto again = store_->CreateJob("before-upgrade", now_spec, "token:a");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->job_id, id);
  now_spec.mutable_resources()->set_max_train_seconds(60);
  EXPECT_EQ(store_->CreateJob("before-upgrade", now_spec, "token:a").status().code(),
            absl::StatusCode::kAlreadyExists);
}

// A finished job can be deleted: its row stays as a tombstone (its id is never given again,
// its request id is free), everything else of it goes, and every call naming it is NOT_FOUND.
TEST_F(JobStoreTest, DeleteJobRemovesAFinishedJobButNeverGivesItsIdAgain) {
  const std::string done = Create("nightly", Spec(1), "token:a");
  ASSERT_TRUE(store_->UpdateJobState(done, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store_->AppendLambdas(done, 10, {1.0, 2.0}).ok());
  ASSERT_TRUE(store_->AppendDecision(done, 10, R"({"step":10})").ok());
  ASSERT_TRUE(store_->AppendJobLogs(done, 0, Lines({"a0"}), 0).ok());
  ASSERT_TRUE(store_->UpsertWorker({"w1", "host1", "cpu", 1 << 30, 0, 0}).ok());
  ASSERT_TRUE(store_->PutAssignment(done, 0, "w1", 0).ok());
  ASSERT_TRUE(store_->PutModules(done, {{"m", "heads", 0, 0}}).ok());
  // A running job cannot be deleted, nor one a queued job still replays.
  auto running = store_->DeleteJob(done);
  EXPECT_EQ(running.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(running.message(), HasSubstr("is RUNNING: only a finished job"));
  EXPECT_THAT(running.message(), HasSubstr("matctl cancel " + done));
  ASSERT_TRUE(store_->UpdateJobState(done, v1::JOB_STATE_SUCCEEDED).ok());
  v1::JobSpec replaying = Spec(2);
  replaying.mutable_policy()->set_rand_schedule_job(done);
  const std::string replay = Create("", replaying);
  auto replayed = store_->DeleteJob(done);
  EXPECT_EQ(replayed.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(replayed.message(),
              HasSubstr("job " + replay + " replays the decisions of job " + done));
  ASSERT_TRUE(store_->UpdateJobState(replay, v1::JOB_STATE_CANCELLED).ok());

  ASSERT_TRUE(store_->DeleteJob(done).ok());
  auto gone = store_->GetJob(done);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(gone.status().message(), HasSubstr("job '" + done + "' was deleted"));
  EXPECT_EQ(store_->GetLambdas(done, 0, "").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetJobLogs(done, std::nullopt, 0, 100).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->AppendJobLogs(done, 0, Lines({"late"}), 0).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->DeleteJob(done).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*store_->IsDeletedJob(done), true);
  // The tombstone keeps the id and the state, not the spec (up to the spec limit a job).
  EXPECT_EQ(RawQuery("SELECT length(spec) FROM jobs WHERE id = '" + done + "'"), "0");
  EXPECT_EQ(*store_->IsDeletedJob(replay), false);
  EXPECT_EQ(store_->IsDeletedJob("job-000099").status().code(), absl::StatusCode::kNotFound);
  for (const char* table :
       {"lambda_history", "decisions", "job_logs", "assignments", "modules"}) {
    EXPECT_EQ(RawQuery(absl::StrCat("SELECT count(*) FROM ", table, " WHERE job_id = '",
                                        done, "'")),
              "0")
        << table;
  }
  auto listed = store_->ListJobs(0, "");
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->jobs.size(), 1u);
  EXPECT_EQ(listed->jobs[0].id, replay);
  // The request id makes a new job; deleting the newest job does not hand its id out again.
  ASSERT_TRUE(store_->DeleteJob(replay).ok());
  auto again = store_->CreateJob("nightly", Spec(1), "token:a");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->created);
  EXPECT_NE(again->job_id, done);
  EXPECT_NE(again->job_id, replay);
  EXPECT_EQ(again->job_id, "job-000003");
  auto counted = store_->CountDeletedJobs();
  ASSERT_TRUE(counted.ok()) << counted.status();
  EXPECT_EQ(*counted, (std::map<v1::JobState, int64_t>{{v1::JOB_STATE_SUCCEEDED, 1},
                                                       {v1::JOB_STATE_CANCELLED, 1}}));
}

// The jobs retention deletes: finished, not deleted, last changed more than the age ago.
TEST_F(JobStoreTest, ListFinishedBeforeFindsTheFinishedJobsPastTheAge) {
  const std::string old_done = Create("", Spec(1));
  const std::string old_running = Create("", Spec(1));
  const std::string old_deleted = Create("", Spec(1));
  ASSERT_TRUE(store_->UpdateJobState(old_done, v1::JOB_STATE_FAILED).ok());
  ASSERT_TRUE(store_->UpdateJobState(old_running, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store_->UpdateJobState(old_deleted, v1::JOB_STATE_CANCELLED).ok());
  ASSERT_TRUE(store_->DeleteJob(old_deleted).ok());
  now_ += 100;
  const std::string young = Create("", Spec(1));
  ASSERT_TRUE(store_->UpdateJobState(young, v1::JOB_STATE_CANCELLED).ok());
  now_ += 1;
  auto ids = [](const absl::StatusOr<std::vector<std::pair<int64_t, std::string>>>& listed) {
    EXPECT_TRUE(listed.ok()) << listed.status();
    std::vector<std::string> out;
    if (listed.ok()) {
      for (const auto& [seq, id] : *listed) out.push_back(id);
    }
    return out;
  };
  EXPECT_EQ(ids(store_->ListFinishedBefore(50, 10)), (std::vector<std::string>{old_done}));
  EXPECT_EQ(ids(store_->ListFinishedBefore(0, 10)), (std::vector<std::string>{old_done, young}));
  auto first = store_->ListFinishedBefore(0, 1);
  EXPECT_EQ(ids(first), (std::vector<std::string>{old_done}));
  EXPECT_EQ(ids(store_->ListFinishedBefore(0, 10, first->front().first)),
            (std::vector<std::string>{young}));
  EXPECT_TRUE(store_->ListFinishedBefore(200, 10)->empty());
}

TEST_F(JobStoreTest, LogsAreNumberedPerJobFilteredByRankBoundedAndSurviveReopen) {
  const std::string a = Create("", Spec(1)), b = Create("", Spec(2));
  ASSERT_TRUE(store_->AppendJobLogs(a, 0, Lines({"a0", "a1"}), 0).ok());
  ASSERT_TRUE(store_->AppendJobLogs(b, 0, Lines({"b0"}), 0).ok());
  ASSERT_TRUE(store_->AppendJobLogs(a, 1, Lines({"a2"}), 0).ok());
  auto all = store_->GetJobLogs(a, std::nullopt, 0, 100);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->lines.size(), 3u);
  EXPECT_EQ(all->dropped, 0);
  // Numbered per job from 1 (the records' own seq and rank are not used).
  EXPECT_EQ(all->lines[0].seq, 1);
  EXPECT_EQ(all->lines[2].seq, 3);
  EXPECT_EQ(all->lines[0].rank, 0);
  EXPECT_EQ(all->lines[2].rank, 1);
  EXPECT_EQ(all->lines[1].text, "a1");
  EXPECT_EQ(all->lines[1].level, "info");
  EXPECT_EQ(all->lines[1].time_unix_ms, 1700000000123);
  auto other = store_->GetJobLogs(b, std::nullopt, 0, 100);
  ASSERT_TRUE(other.ok());
  ASSERT_EQ(other->lines.size(), 1u);
  EXPECT_EQ(other->lines[0].seq, 1);
  auto rank1 = store_->GetJobLogs(a, 1, 0, 100);
  ASSERT_TRUE(rank1.ok());
  ASSERT_EQ(rank1->lines.size(), 1u);
  EXPECT_EQ(rank1->lines[0].text, "a2");
  auto after = store_->GetJobLogs(a, std::nullopt, 1, 1);
  ASSERT_TRUE(after.ok());
  ASSERT_EQ(after->lines.size(), 1u);
  EXPECT_EQ(after->lines[0].seq, 2);

  // A bound of 4 keeps the newest 4 and counts the rest as dropped.
  ASSERT_TRUE(store_->AppendJobLogs(a, 0, Lines({"a3", "a4", "a5"}), 4).ok());
  Reopen();
  auto bounded = store_->GetJobLogs(a, std::nullopt, 0, 100);
  ASSERT_TRUE(bounded.ok());
  ASSERT_EQ(bounded->lines.size(), 4u);
  EXPECT_EQ(bounded->lines.front().text, "a2");
  EXPECT_EQ(bounded->lines.back().seq, 6);
  EXPECT_EQ(bounded->dropped, 2);

  EXPECT_EQ(store_->AppendJobLogs("job-000099", 0, Lines({"x"}), 0).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetJobLogs("job-000099", std::nullopt, 0, 10).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->AppendJobLogs(a, -1, Lines({"x"}), 0).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetJobLogs(a, std::nullopt, 0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ----- progress, summary and modules -----

TEST_F(JobStoreTest, ProgressSummaryAndModulesAreStoredAndSurviveReopen) {
  const std::string id = Create("", Spec(1));
  auto fresh = store_->GetJob(id);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->step, 0);
  EXPECT_FALSE(fresh->val_loss.has_value());
  EXPECT_EQ(fresh->summary_json, "");

  JobProgressUpdate progress;
  progress.step = 200;
  progress.train_loss = 5.25;
  progress.val_loss = 5.5;
  progress.test_loss = 5.75;
  progress.flops_total = 1.5e15;
  progress.wall_seconds = 61.25;
  ASSERT_TRUE(store_->UpdateJobProgress(id, progress).ok());
  // A later progress without losses keeps the latest evaluation.
  progress.step = 220;
  progress.train_loss = 5.0;
  progress.val_loss.reset();
  progress.test_loss.reset();
  ASSERT_TRUE(store_->UpdateJobProgress(id, progress).ok());
  ASSERT_TRUE(store_->SetJobSummary(id, R"({"steps": 220})").ok());
  const std::vector<ModuleRecord> modules = {
      {"layer0.head0", "heads", 0, 0}, {"layer0.head1", "heads", 0, 1}, {"layer0.ffn0", "ffn", 0, 0}};
  ASSERT_TRUE(store_->PutModules(id, {{"old", "heads", 0, 0}}).ok());
  ASSERT_TRUE(store_->PutModules(id, modules).ok());  // replaces

  Reopen();

  auto job = store_->GetJob(id);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->step, 220);
  EXPECT_EQ(job->train_loss, 5.0);
  ASSERT_TRUE(job->val_loss.has_value());
  EXPECT_EQ(*job->val_loss, 5.5);
  ASSERT_TRUE(job->test_loss.has_value());
  EXPECT_EQ(*job->test_loss, 5.75);
  EXPECT_EQ(job->flops_total, 1.5e15);
  EXPECT_EQ(job->wall_seconds, 61.25);
  EXPECT_EQ(job->summary_json, R"({"steps": 220})");
  EXPECT_EQ(job->total_modules, 3);
  EXPECT_EQ(job->attempt, 0);
  auto listed = store_->ListJobs(0, "");
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->jobs[0].step, 220) << "ListJobs reads the same columns";
  auto stored = store_->GetModules(id);
  ASSERT_TRUE(stored.ok()) << stored.status();
  ASSERT_EQ(stored->size(), 3u);
  EXPECT_EQ((*stored)[1].name, "layer0.head1");
  EXPECT_EQ((*stored)[1].index, 1);
  EXPECT_EQ((*stored)[2].group, "ffn");
}

TEST_F(JobStoreTest, RefusesBadProgressAndModulesNamingTheFieldAndWritesNothing) {
  const std::string id = Create("", Spec(1));
  JobProgressUpdate bad;
  bad.step = -1;
  EXPECT_EQ(store_->UpdateJobProgress(id, bad).code(), absl::StatusCode::kInvalidArgument);
  bad.step = 1;
  bad.train_loss = std::numeric_limits<double>::quiet_NaN();
  absl::Status st = store_->UpdateJobProgress(id, bad);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("train_loss"));
  bad.train_loss = 1;
  bad.val_loss = std::numeric_limits<double>::infinity();
  EXPECT_THAT(store_->UpdateJobProgress(id, bad).message(), HasSubstr("val_loss"));
  bad.val_loss.reset();
  bad.flops_total = -1;
  EXPECT_THAT(store_->UpdateJobProgress(id, bad).message(), HasSubstr("flops_total"));

  EXPECT_EQ(store_->PutModules(id, {}).code(), absl::StatusCode::kInvalidArgument);
  st = store_->PutModules(id, {{"a", "heads", 0, 0}, {"", "heads", 0, 1}});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("module 1"));
  EXPECT_EQ(store_->PutModules(id, {{"a", "heads", -1, 0}}).code(),
            absl::StatusCode::kInvalidArgument);

  auto job = store_->GetJob(id);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->step, 0);
  EXPECT_EQ(job->total_modules, 0);
  auto modules = store_->GetModules(id);
  ASSERT_TRUE(modules.ok());
  EXPECT_TRUE(modules->empty());
}

TEST_F(JobStoreTest, RecordDecisionWritesLambdaDecisionAndMaskInOneTransaction) {
  const std::string id = Create("", Spec(1));
  ASSERT_TRUE(store_->RecordDecision(id, {20, {1.5, 2.5}, R"({"step": 20})", 1, 2, "", ""}).ok());
  ASSERT_TRUE(store_->RecordDecision(id, {40, {}, R"({"step": 40})", 2, 1, "", ""}).ok());  // no λ
  // Refused ones write nothing, not even the parts that were fine.
  EXPECT_EQ(store_->RecordDecision(id, {60, {1.0, 2.0}, "not json", 3, 1, "", ""}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->RecordDecision(id, {60, {std::nan(""), 2.0}, "{}", 3, 1, "", ""}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->RecordDecision(id, {60, {1.0, 2.0}, "{}", 0, 1, "", ""}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->RecordDecision(id, {-20, {1.0}, "{}", 3, 1, "", ""}).code(),
            absl::StatusCode::kInvalidArgument);

  auto lambdas = store_->GetLambdas(id, 0, "");
  ASSERT_TRUE(lambdas.ok()) << lambdas.status();
  ASSERT_EQ(lambdas->points.size(), 1u);
  EXPECT_EQ(lambdas->points[0].step, 20);
  EXPECT_THAT(lambdas->points[0].lambda, ElementsAre(1.5, 2.5));
  auto decisions = store_->GetDecisions(id, 0, "");
  ASSERT_TRUE(decisions.ok()) << decisions.status();
  ASSERT_EQ(decisions->decisions.size(), 2u);
  EXPECT_EQ(decisions->decisions[1].json, R"({"step": 40})");
  auto job = store_->GetJob(id);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->mask_version, 2);
  EXPECT_EQ(job->active_modules, 1);
}

// A restarted attempt resumed from a checkpoint before the failed attempt's last decisions:
// its decision at a step replaces that step's and drops the later ones (λ too), so the history
// is this attempt's and a later restore (LatestDecisionAtOrBefore) does not find the abandoned
// attempt's later decisions.
TEST_F(JobStoreTest, ADecisionDropsTheLaterDecisionsOfAnAbandonedAttempt) {
  const std::string id = Create("", Spec(1));
  for (int64_t step : {100, 200, 300, 400}) {
    const std::string json = absl::StrCat(R"({"attempt":0,"step":)", step, "}");
    ASSERT_TRUE(
        store_->RecordDecision(id, {step, {1.0, 2.0}, json, step / 100, 2, "state-0", ""}).ok());
  }
  ASSERT_TRUE(store_->RecordDecision(id, {200, {3.0, 4.0}, R"({"attempt":1,"step":200})", 5, 1,
                                          "state-1", ""})
                  .ok());
  auto decisions = store_->GetDecisions(id, 0, "");
  ASSERT_TRUE(decisions.ok()) << decisions.status();
  ASSERT_EQ(decisions->decisions.size(), 2u);
  EXPECT_EQ(decisions->decisions[0].json, R"({"attempt":0,"step":100})");
  EXPECT_EQ(decisions->decisions[1].json, R"({"attempt":1,"step":200})");
  auto lambdas = store_->GetLambdas(id, 0, "");
  ASSERT_TRUE(lambdas.ok()) << lambdas.status();
  ASSERT_EQ(lambdas->points.size(), 2u);
  EXPECT_THAT(lambdas->points[1].lambda, ElementsAre(3.0, 4.0));
  auto restored = store_->LatestDecisionAtOrBefore(id, 400);
  ASSERT_TRUE(restored.ok()) << restored.status();
  ASSERT_TRUE(restored->has_value());
  EXPECT_EQ((*restored)->step, 200);
  EXPECT_EQ((*restored)->policy_state, "state-1");
}

// ----- workers and assignments -----

TEST_F(JobStoreTest, WorkersUpsertKeepsRegistrationTime) {
  ASSERT_TRUE(store_->UpsertWorker({"w2", "h2", "cuda:0", 80LL << 30, 0, 0}).ok());
  ASSERT_TRUE(store_->UpsertWorker({"w1", "h1", "cpu", 1 << 30, 0, 0}).ok());
  now_ += 30;
  ASSERT_TRUE(store_->UpsertWorker({"w1", "h1b", "cpu", int64_t{2} << 30, 0, 0}).ok());
  EXPECT_EQ(store_->UpsertWorker({"", "h", "cpu", 0, 0, 0}).code(),
            absl::StatusCode::kInvalidArgument);
  auto workers = store_->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->size(), 2u);
  const WorkerRecord& w1 = (*workers)[0];
  EXPECT_EQ(w1.id, "w1");
  EXPECT_EQ(w1.host, "h1b");
  EXPECT_EQ(w1.memory_bytes, int64_t{2} << 30);
  EXPECT_EQ(w1.registered_unix_seconds, 1'700'000'000);
  EXPECT_EQ(w1.last_seen_unix_seconds, 1'700'000'030);
  EXPECT_EQ((*workers)[1].device, "cuda:0");
}

TEST_F(JobStoreTest, AssignmentsNeedAKnownJobAndWorker) {
  const std::string id = Create("", Spec(1));
  ASSERT_TRUE(store_->UpsertWorker({"w1", "h1", "cpu", 1, 0, 0}).ok());
  ASSERT_TRUE(store_->UpsertWorker({"w2", "h2", "cpu", 1, 0, 0}).ok());
  EXPECT_EQ(store_->PutAssignment(id, 0, "ghost", 0).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->PutAssignment("job-404", 0, "w1", 0).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->PutAssignment(id, -1, "w1", 0).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(store_->PutAssignment(id, 1, "w2", 0).ok());
  ASSERT_TRUE(store_->PutAssignment(id, 0, "w1", 0).ok());
  ASSERT_TRUE(store_->PutAssignment(id, 1, "w1", 1).ok());  // restart: rank 1 moves to w1
  auto list = store_->ListAssignments(id);
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].rank, 0);
  EXPECT_EQ((*list)[1].rank, 1);
  EXPECT_EQ((*list)[1].worker_id, "w1");
  EXPECT_EQ((*list)[1].attempt, 1);
}

TEST_F(JobStoreTest, CreateWorkerNumbersIdsAfterTheHighestStored) {
  WorkerRecord w{"ignored", "h1", "cpu", 1 << 20, 0, 0, 29500};
  auto first = store_->CreateWorker(w);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, "worker-000001");
  // A worker that brought its id along (resuming against a fresh state dir) is skipped over.
  ASSERT_TRUE(store_->UpsertWorker({"worker-000041", "h2", "cuda:0", 1, 0, 0, 29501}).ok());
  ASSERT_TRUE(store_->UpsertWorker({"worker-x", "h3", "cpu", 1, 0, 0, 29502}).ok());
  auto next = store_->CreateWorker(w);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(*next, "worker-000042");

  now_ += 7;
  ASSERT_TRUE(store_->TouchWorker("worker-000001").ok());
  EXPECT_EQ(store_->TouchWorker("ghost").code(), absl::StatusCode::kNotFound);
  Reopen();
  auto got = store_->GetWorker("worker-000001");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->host, "h1");
  EXPECT_EQ(got->rendezvous_port, 29500);
  EXPECT_EQ(got->registered_unix_seconds, 1'700'000'000);
  EXPECT_EQ(got->last_seen_unix_seconds, 1'700'000'007);
  EXPECT_EQ(store_->GetWorker("ghost").status().code(), absl::StatusCode::kNotFound);
  auto all = store_->ListWorkers();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 4u);
  EXPECT_EQ((*all)[1].rendezvous_port, 29501);
}

TEST_F(JobStoreTest, RankStatusIsStoredPerAssignmentAndResetByANewAssignment) {
  const std::string id = Create("", Spec(1));
  ASSERT_TRUE(store_->UpsertWorker({"w1", "h1", "cpu", 1, 0, 0, 1}).ok());
  ASSERT_TRUE(store_->UpsertWorker({"w2", "h2", "cpu", 1, 0, 0, 2}).ok());
  ASSERT_TRUE(store_->PutAssignment(id, 0, "w1", 0).ok());
  ASSERT_TRUE(store_->PutAssignment(id, 1, "w2", 0).ok());
  ASSERT_TRUE(store_->UpdateRankStatus(id, 0, 120, 6, 1.5e12, "").ok());
  ASSERT_TRUE(store_->UpdateRankStatus(id, 1, 200, 7, 2.5e12, "beef").ok());
  EXPECT_EQ(store_->UpdateRankStatus(id, 2, 0, 0, 0, "").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->UpdateRankStatus(id, 0, -1, 0, 0, "").code(),
            absl::StatusCode::kInvalidArgument);
  for (double bad : {-1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    absl::Status st = store_->UpdateRankStatus(id, 0, 130, 6, bad, "");
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(st.message(), HasSubstr("flops_total")) << bad;
  }
  Reopen();
  auto list = store_->ListAssignments(id);
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].step, 120);
  EXPECT_EQ((*list)[0].mask_version, 6);
  EXPECT_EQ((*list)[1].param_checksum, "beef");
  EXPECT_EQ((*list)[1].step, 200);
  EXPECT_EQ((*list)[0].flops_total, 1.5e12) << "a refused update changes nothing";
  EXPECT_EQ((*list)[1].flops_total, 2.5e12);
  // Rank 0 finishing stores its summary in the same transaction; a refused update stores neither.
  const std::string summary = R"({"best_val_loss": 3.5})";
  EXPECT_EQ(store_->UpdateRankStatus(id, 0, -1, 0, 0, "cafe", &summary).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetJob(id)->summary_json, "");
  ASSERT_TRUE(store_->UpdateRankStatus(id, 0, 300, 8, 3e12, "cafe", &summary).ok());
  Reopen();
  EXPECT_EQ(store_->GetJob(id)->summary_json, summary);
  EXPECT_EQ((*store_->ListAssignments(id))[0].param_checksum, "cafe");
  // A new assignment of the rank (a restart) starts from a clean status.
  ASSERT_TRUE(store_->PutAssignment(id, 1, "w1", 1).ok());
  list = store_->ListAssignments(id);
  ASSERT_TRUE(list.ok());
  EXPECT_EQ((*list)[1].step, 0);
  EXPECT_EQ((*list)[1].flops_total, 0);
  EXPECT_EQ((*list)[1].param_checksum, "");
}

// A version-9 file (no per-rank FLOPs) migrates: its ranks count 0 FLOPs until they report.
TEST_F(JobStoreTest, AVersion9FileMigratesWithNoFlopsPerRank) {
  const std::string id = Create("", Spec(1));
  ASSERT_TRUE(store_->UpsertWorker({"w1", "h1", "cpu", 1, 0, 0, 1}).ok());
  ASSERT_TRUE(store_->PutAssignment(id, 0, "w1", 0).ok());
  ASSERT_TRUE(store_->UpdateRankStatus(id, 0, 120, 6, 1.5e12, "").ok());
  store_.reset();
  RawExec(std::string(kUndoV10) + "UPDATE schema_version SET version = 9;");
  Reopen();
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  auto list = store_->ListAssignments(id);
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].step, 120);
  EXPECT_EQ((*list)[0].flops_total, 0);
  ASSERT_TRUE(store_->UpdateRankStatus(id, 0, 130, 6, 1.6e12, "").ok());
  EXPECT_EQ((*store_->ListAssignments(id))[0].flops_total, 1.6e12);
}

// A version-10 file migrates: the jobs of a state are found through an index, not by reading
// every job (the scheduler lists its queue on every change).
TEST_F(JobStoreTest, AVersion10FileMigratesWithAnIndexOfTheJobsStates) {
  const std::string done = Create("", Spec(1));
  ASSERT_TRUE(store_->UpdateJobState(done, v1::JOB_STATE_CANCELLED, "").ok());
  const std::string queued = Create("", Spec(1));
  store_.reset();
  RawExec(std::string(kUndoV11) + "UPDATE schema_version SET version = 10;");
  Reopen();
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  EXPECT_EQ(RawQuery("SELECT sql FROM sqlite_master WHERE name = 'jobs_state_seq'"),
            "CREATE INDEX jobs_state_seq ON jobs (state, seq)");
  // The plan of ListJobs' query (its WHERE and ORDER BY) for one state uses it.
  EXPECT_THAT(RawQuery("EXPLAIN QUERY PLAN SELECT seq FROM jobs WHERE seq >= 0 AND "
                       "deleted_unix_seconds IS NULL AND state IN ('QUEUED') ORDER BY seq LIMIT 11",
                       /*column=*/3),
              HasSubstr("USING INDEX jobs_state_seq"));
  auto page = store_->ListJobs(10, "", {v1::JOB_STATE_QUEUED});
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->jobs.size(), 1u);
  EXPECT_EQ(page->jobs[0].id, queued);
}

// ----- durability and the state directory -----

TEST_F(JobStoreTest, UsesWalAndFullSync) {
  auto mode = store_->Pragma("journal_mode");
  ASSERT_TRUE(mode.ok()) << mode.status();
  EXPECT_EQ(*mode, "wal");
  auto sync = store_->Pragma("synchronous");
  ASSERT_TRUE(sync.ok()) << sync.status();
  // Debian's SQLite already defaults to FULL in WAL mode; this guards builds whose default is
  // NORMAL (SQLITE_DEFAULT_WAL_SYNCHRONOUS=1), where an acknowledged write could be lost.
  EXPECT_EQ(*sync, "2") << "synchronous must be FULL (2)";
  auto fk = store_->Pragma("foreign_keys");
  ASSERT_TRUE(fk.ok()) << fk.status();
  EXPECT_EQ(*fk, "1");
  // WAL is a property of the file: a fresh connection sees it too, and the -wal file exists
  // after a write.
  Create("", Spec(1));
  EXPECT_EQ(RawQuery("PRAGMA journal_mode"), "wal");
  EXPECT_TRUE(fs::exists(JobStore::DatabasePath(dir_) + "-wal"));
  EXPECT_EQ(store_->Pragma("journal_mode; DROP TABLE jobs").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(JobStoreTest, RecordsTheSchemaVersion) {
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"),
            std::to_string(kJobStoreSchemaVersion));
  EXPECT_EQ(RawQuery("SELECT count(*) FROM schema_version"), "1");
  Reopen();  // reopening does not add rows
  EXPECT_EQ(RawQuery("SELECT count(*) FROM schema_version"), "1");
}

// The released version-1 schema, verbatim: what a coordinator of the first release wrote.
constexpr const char* kV1Schema = R"sql(
CREATE TABLE schema_version (
  version INTEGER NOT NULL
);
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  client_request_id TEXT UNIQUE,
  spec BLOB NOT NULL,
  state TEXT NOT NULL CHECK (state IN
    ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED', 'RESTARTING')),
  created_unix_seconds INTEGER NOT NULL,
  updated_unix_seconds INTEGER NOT NULL,
  error_message TEXT NOT NULL DEFAULT ''
);
CREATE TABLE workers (
  id TEXT PRIMARY KEY,
  host TEXT NOT NULL,
  device TEXT NOT NULL,
  memory_bytes INTEGER NOT NULL,
  registered_unix_seconds INTEGER NOT NULL,
  last_seen_unix_seconds INTEGER NOT NULL
);
CREATE TABLE assignments (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  rank INTEGER NOT NULL CHECK (rank >= 0),
  worker_id TEXT NOT NULL REFERENCES workers(id),
  attempt INTEGER NOT NULL CHECK (attempt >= 0),
  assigned_unix_seconds INTEGER NOT NULL,
  PRIMARY KEY (job_id, rank)
);
CREATE TABLE lambda_history (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  step INTEGER NOT NULL CHECK (step >= 0),
  module_index INTEGER NOT NULL CHECK (module_index >= 0),
  lambda REAL NOT NULL,
  PRIMARY KEY (job_id, step, module_index)
) WITHOUT ROWID;
CREATE TABLE decisions (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  step INTEGER NOT NULL CHECK (step >= 0),
  decision_json TEXT NOT NULL,
  PRIMARY KEY (job_id, step)
) WITHOUT ROWID;
INSERT INTO schema_version (version) VALUES (1);
)sql";

// A version-1 database with one running job (spec Spec(3)), one worker, an assignment, a λ row
// and a decision.
std::string V1Database() {
  std::string blob;
  EXPECT_TRUE(Spec(3).SerializeToString(&blob));
  std::string hex;
  for (unsigned char c : blob) hex += absl::StrFormat("%02X", c);
  return absl::StrCat(
      kV1Schema,
      "INSERT INTO jobs (seq, id, client_request_id, spec, state, created_unix_seconds, "
      "updated_unix_seconds, error_message) VALUES (1, 'job-000001', 'req-1', X'", hex,
      "', 'RUNNING', 10, 20, '');"
      "INSERT INTO workers VALUES ('worker-000001', 'h1', 'cpu', 1024, 5, 6);"
      "INSERT INTO assignments VALUES ('job-000001', 0, 'worker-000001', 0, 7);"
      "INSERT INTO lambda_history VALUES ('job-000001', 0, 0, 1.5);"
      "INSERT INTO decisions VALUES ('job-000001', 0, '{\"step\": 0}');");
}

TEST_F(JobStoreTest, MigratesAVersion1DatabaseInPlace) {
  store_.reset();
  fs::remove_all(dir_);
  fs::create_directories(dir_);
  RawExec(V1Database());
  ASSERT_EQ(RawQuery("SELECT version FROM schema_version"), "1");

  Reopen();

  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  EXPECT_EQ(RawQuery("SELECT count(*) FROM schema_version"), "1");
  // The old rows read with the new columns at their defaults.
  auto job = store_->GetJob("job-000001");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state, v1::JOB_STATE_RUNNING);
  EXPECT_EQ(job->client_request_id, "req-1");
  EXPECT_TRUE(MessageDifferencer::Equals(job->spec, Spec(3)));
  EXPECT_EQ(job->updated_unix_seconds, 20);
  EXPECT_EQ(job->step, 0);
  EXPECT_FALSE(job->val_loss.has_value());
  EXPECT_EQ(job->mask_version, 0);
  EXPECT_EQ(job->summary_json, "");
  auto workers = store_->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->size(), 1u);
  EXPECT_EQ((*workers)[0].rendezvous_port, 0);
  EXPECT_EQ((*workers)[0].registered_unix_seconds, 5);
  auto assignments = store_->ListAssignments("job-000001");
  ASSERT_TRUE(assignments.ok()) << assignments.status();
  ASSERT_EQ(assignments->size(), 1u);
  EXPECT_EQ((*assignments)[0].worker_id, "worker-000001");
  EXPECT_EQ((*assignments)[0].param_checksum, "");
  auto lambdas = store_->GetLambdas("job-000001", 0, "");
  ASSERT_TRUE(lambdas.ok());
  ASSERT_EQ(lambdas->points.size(), 1u);
  EXPECT_THAT(lambdas->points[0].lambda, ElementsAre(1.5));
  auto modules = store_->GetModules("job-000001");
  ASSERT_TRUE(modules.ok()) << modules.status();
  EXPECT_TRUE(modules->empty());

  // The new calls work on the migrated file, and everything survives another reopen.
  ASSERT_TRUE(store_->PutModules("job-000001", {{"layer0.head0", "heads", 0, 0}}).ok());
  ASSERT_TRUE(store_->UpdateJobProgress("job-000001", {40, 6.5, 6.75, std::nullopt, 1e9, 3}).ok());
  ASSERT_TRUE(store_->UpdateRankStatus("job-000001", 0, 40, 2, 1e9, "").ok());
  auto created = store_->CreateWorker({"", "h2", "cpu", 1, 0, 0, 29500});
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(*created, "worker-000002");
  Reopen();
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  job = store_->GetJob("job-000001");
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->step, 40);
  EXPECT_EQ(job->total_modules, 1);
  ASSERT_TRUE(job->val_loss.has_value());
  EXPECT_EQ(*job->val_loss, 6.75);
  EXPECT_EQ(store_->ListAssignments("job-000001")->at(0).mask_version, 2);
  // New jobs continue the numbering.
  EXPECT_EQ(Create("", Spec(1)), "job-000002");
}

TEST_F(JobStoreTest, MigratesAVersion2DatabaseAddingTheClientColumn) {
  Create("req-1", Spec(1));
  store_.reset();
  // What a version-2 coordinator left: no client column, no index.
  RawExec(std::string(kUndoV8) + "DROP INDEX jobs_client_state; ALTER TABLE jobs DROP COLUMN client; "
          "ALTER TABLE decisions DROP COLUMN policy_state; "
          "ALTER TABLE decisions DROP COLUMN mask_update; DROP TABLE job_logs; "
          "ALTER TABLE workers DROP COLUMN drain_reason; "
          "ALTER TABLE workers DROP COLUMN secret_sha256; "
          "UPDATE schema_version SET version = 2;");
  ASSERT_EQ(RawQuery("SELECT count(*) FROM pragma_table_info('jobs') WHERE name = 'client'"), "0");
  Reopen();
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  EXPECT_EQ(RawQuery("SELECT client FROM jobs WHERE id = 'job-000001'"), "");
  auto active = store_->CountActiveJobs("");
  ASSERT_TRUE(active.ok()) << active.status();
  EXPECT_EQ(*active, 1) << "an old job counts for the unnamed client";
  auto job = store_->GetJob("job-000001");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->client_request_id, "req-1");
}

TEST_F(JobStoreTest, MigratesAVersion3DatabaseAddingThePolicyState) {
  const std::string id = Create("", Spec(1));
  ASSERT_TRUE(store_->AppendDecision(id, 20, R"({"step":20})").ok());
  store_.reset();
  // What a version-3 coordinator left: decisions without the policy state and the mask.
  RawExec(std::string(kUndoV8) + "ALTER TABLE decisions DROP COLUMN policy_state; "
          "ALTER TABLE decisions DROP COLUMN mask_update; DROP TABLE job_logs; "
          "ALTER TABLE workers DROP COLUMN drain_reason; "
          "ALTER TABLE workers DROP COLUMN secret_sha256; "
          "UPDATE schema_version SET version = 3;");
  Reopen();
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  auto old = store_->LatestDecisionAtOrBefore(id, 100);
  ASSERT_TRUE(old.ok()) << old.status();
  ASSERT_TRUE(old->has_value());
  EXPECT_EQ((*old)->step, 20);
  EXPECT_EQ((*old)->policy_state, "") << "an old row has no state: a restart must say so";
  EXPECT_EQ((*old)->mask_update, "");
}

// A drain (matctl drain) lived in the coordinator's memory only: after a restart the drained
// worker came back in service. It is stored now (v6), untouched by re-registration, and a
// version-5 file migrates with every worker in service.
TEST_F(JobStoreTest, AWorkersDrainIsStoredUntilClearedAndAVersion5FileMigrates) {
  ASSERT_TRUE(store_->UpsertWorker({"w1", "h1", "cpu", 1, 0, 0, 29500}).ok());
  ASSERT_TRUE(store_->UpsertWorker({"w2", "h2", "cpu", 1, 0, 0, 29501}).ok());
  EXPECT_EQ(store_->GetWorker("w1")->drain_reason, std::nullopt);
  ASSERT_TRUE(store_->SetWorkerDrain("w1", "kernel update").ok());
  ASSERT_TRUE(store_->SetWorkerDrain("w2", "").ok());
  EXPECT_EQ(store_->SetWorkerDrain("w9", "x").code(), absl::StatusCode::kNotFound);
  // Registering again (new host or port) keeps it.
  ASSERT_TRUE(store_->UpsertWorker({"w1", "h1b", "cpu", 2, 0, 0, 29600}).ok());
  Reopen();
  auto workers = store_->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->size(), 2u);
  EXPECT_EQ((*workers)[0].host, "h1b");
  EXPECT_EQ((*workers)[0].drain_reason, std::optional<std::string>("kernel update"));
  EXPECT_EQ((*workers)[1].drain_reason, std::optional<std::string>(""));
  ASSERT_TRUE(store_->SetWorkerDrain("w1", std::nullopt).ok());
  EXPECT_EQ(store_->GetWorker("w1")->drain_reason, std::nullopt);

  store_.reset();
  RawExec(std::string(kUndoV8) + "ALTER TABLE workers DROP COLUMN drain_reason; "
          "ALTER TABLE workers DROP COLUMN secret_sha256; UPDATE schema_version SET version = 5;");
  Reopen();
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  workers = store_->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->size(), 2u);
  EXPECT_EQ((*workers)[1].drain_reason, std::nullopt);
  EXPECT_TRUE(store_->SetWorkerDrain("w2", "again").ok());
}

// A worker's secret (v7) is stored as given by UpsertWorker, replaced by the next one (the
// SessionManager decides when that may happen), and a version-6 file migrates with none.
TEST_F(JobStoreTest, AWorkersSecretHashIsStoredAndAVersion6FileMigrates) {
  WorkerRecord w{"w1", "h1", "cpu", 1, 0, 0, 29500};
  w.secret_sha256 = std::string(64, 'b');
  ASSERT_TRUE(store_->UpsertWorker(w).ok());
  auto created = store_->CreateWorker(w);
  ASSERT_TRUE(created.ok()) << created.status();
  Reopen();
  EXPECT_EQ(store_->GetWorker("w1")->secret_sha256, std::string(64, 'b'));
  EXPECT_EQ(store_->GetWorker(*created)->secret_sha256, std::string(64, 'b'));

  store_.reset();
  RawExec(std::string(kUndoV8) +
          "ALTER TABLE workers DROP COLUMN secret_sha256; UPDATE schema_version SET version = 6;");
  Reopen();
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "11");
  auto workers = store_->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  ASSERT_EQ(workers->size(), 2u);
  EXPECT_EQ((*workers)[0].secret_sha256, "");
  EXPECT_EQ((*workers)[0].host, "h1");
}

TEST_F(JobStoreTest, KeepsEachDecisionsPolicyStateAndMask) {
  const std::string id = Create("", Spec(1));
  auto none = store_->LatestDecisionAtOrBefore(id, 100);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
  const std::string mask_bytes("\x01\x00\xff", 3);  // bytes, NUL included
  for (int64_t step : {0, 20, 40}) {
    DecisionUpdate update;
    update.step = step;
    update.lambda = {1.0, 2.0};
    update.decision_json = absl::StrCat(R"({"step":)", step, "}");
    update.mask_version = step / 20 + 1;
    update.active_modules = 1;
    update.policy_state = absl::StrCat(R"({"after":)", step, "}");
    update.mask_update = mask_bytes + std::to_string(step);
    ASSERT_TRUE(store_->RecordDecision(id, update).ok());
  }
  Reopen();
  auto at = [&](int64_t step) {
    auto d = store_->LatestDecisionAtOrBefore(id, step);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? *d : std::nullopt;
  };
  EXPECT_EQ(at(39)->step, 20);
  EXPECT_EQ(at(39)->policy_state, R"({"after":20})");
  EXPECT_EQ(at(39)->mask_update, mask_bytes + "20");
  EXPECT_EQ(at(40)->step, 40);
  EXPECT_EQ(at(1000)->step, 40);
  EXPECT_EQ(at(0)->step, 0);
  // A restarted job decides a step again: the row is replaced.
  DecisionUpdate again;
  again.step = 20;
  again.decision_json = "{}";
  again.mask_version = 4;
  again.policy_state = "new";
  again.mask_update = "m";
  ASSERT_TRUE(store_->RecordDecision(id, again).ok());
  EXPECT_EQ(at(20)->policy_state, "new");
  EXPECT_EQ(store_->LatestDecisionAtOrBefore("job-999999", 1).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(JobStoreTest, ARestartCountsAnAttempt) {
  const std::string id = Create("", Spec(1));
  ASSERT_TRUE(store_->UpdateJobState(id, v1::JOB_STATE_RUNNING).ok());
  EXPECT_EQ(store_->GetJob(id)->attempt, 0);
  ASSERT_TRUE(store_->UpdateJobState(id, v1::JOB_STATE_RESTARTING, "worker lost").ok());
  EXPECT_EQ(store_->GetJob(id)->attempt, 1);
  EXPECT_EQ(store_->GetJob(id)->error_message, "worker lost");
  ASSERT_TRUE(store_->UpdateJobState(id, v1::JOB_STATE_RUNNING).ok());
  EXPECT_EQ(store_->GetJob(id)->attempt, 1) << "only RESTARTING counts";
  ASSERT_TRUE(store_->UpdateJobState(id, v1::JOB_STATE_RESTARTING).ok());
  ASSERT_TRUE(store_->UpdateJobState(id, v1::JOB_STATE_RUNNING).ok());
  Reopen();
  EXPECT_EQ(store_->GetJob(id)->attempt, 2);
  // A refused transition counts nothing.
  ASSERT_TRUE(store_->UpdateJobState(id, v1::JOB_STATE_SUCCEEDED).ok());
  EXPECT_FALSE(store_->UpdateJobState(id, v1::JOB_STATE_RESTARTING).ok());
  EXPECT_EQ(store_->GetJob(id)->attempt, 2);
}

TEST_F(JobStoreTest, LimitsActiveJobsPerClient) {
  auto a1 = store_->CreateJob("a-1", Spec(1), "alice", 2);
  auto a2 = store_->CreateJob("", Spec(2), "alice", 2);
  ASSERT_TRUE(a1.ok() && a2.ok());
  auto a3 = store_->CreateJob("", Spec(3), "alice", 2);
  ASSERT_EQ(a3.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(a3.status().message(), HasSubstr("client 'alice' has 2 active jobs"));
  EXPECT_THAT(a3.status().message(), HasSubstr("the limit is 2 (--max-jobs-per-client)"));
  // Another client, and no limit, are not affected.
  EXPECT_TRUE(store_->CreateJob("", Spec(3), "bob", 2).ok());
  EXPECT_TRUE(store_->CreateJob("", Spec(3), "alice", 0).ok());
  // The idempotent retry of an existing job is never refused.
  auto again = store_->CreateJob("a-1", Spec(1), "alice", 2);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created);
  // Finished jobs do not count.
  ASSERT_TRUE(store_->UpdateJobState(a1->job_id, v1::JOB_STATE_CANCELLED, "").ok());
  ASSERT_TRUE(store_->UpdateJobState(a2->job_id, v1::JOB_STATE_CANCELLED, "").ok());
  EXPECT_EQ(*store_->CountActiveJobs("alice"), 1);
  EXPECT_TRUE(store_->CreateJob("", Spec(4), "alice", 2).ok());
  // Each job reads back who submitted it (the admin-token check of CancelJob uses it).
  EXPECT_EQ(store_->GetJob(a1->job_id)->client, "alice");
  auto first = store_->ListJobs(1, "");  // a page of one: the paging column after the job's
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->jobs.size(), 1u);
  EXPECT_EQ(first->jobs[0].client, "alice");
  auto second = store_->ListJobs(1, first->next_page_token);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(second->jobs.size(), 1u);
  EXPECT_EQ(second->jobs[0].id, a2->job_id);
}

TEST_F(JobStoreTest, AFailedMigrationLeavesTheVersion1DatabaseAsItWas) {
  store_.reset();
  fs::remove_all(dir_);
  fs::create_directories(dir_);
  // A stray table with the new table's name makes the migration fail half way.
  RawExec(V1Database() + "CREATE TABLE modules (x INTEGER);");
  auto store = JobStore::Open(dir_);
  ASSERT_FALSE(store.ok()) << "opened a database whose migration failed";
  EXPECT_EQ(RawQuery("SELECT version FROM schema_version"), "1");
  EXPECT_EQ(RawQuery("SELECT count(*) FROM pragma_table_info('jobs') WHERE name = 'step'"), "0")
      << "the ALTER TABLEs before the failure were kept";
  EXPECT_EQ(RawQuery("SELECT count(*) FROM jobs"), "1");
}

TEST_F(JobStoreTest, RefusesADatabaseFromANewerSchema) {
  Create("", Spec(1));
  store_.reset();
  RawQuery("UPDATE schema_version SET version = 99");
  auto store = JobStore::Open(dir_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition) << store.status();
  EXPECT_THAT(store.status().message(), HasSubstr("99"));
}

TEST_F(JobStoreTest, OneStorePerStateDir) {
  auto second = JobStore::Open(dir_);
  ASSERT_FALSE(second.ok()) << "two stores opened the same state dir";
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  EXPECT_THAT(second.status().message(), HasSubstr(dir_));
  // Closing the first releases the directory.
  store_.reset();
  auto third = JobStore::Open(dir_);
  EXPECT_TRUE(third.ok()) << third.status();
}

// One job whose stored spec did not parse made ListJobs fail for every job, and with it matctl
// list, the scheduler and the coordinator's recovery. Such a row is now read as far as it goes
// and says what is damaged; the other jobs list as before.
TEST_F(JobStoreTest, ADamagedRowIsListedWithItsDamageAndTheOthersAsBefore) {
  const std::string a = Create("", Spec(1));
  const std::string b = Create("", Spec(2));
  const std::string c = Create("", Spec(3));
  RawExec("UPDATE jobs SET spec = x'ffffffff0f' WHERE id = '" + b + "'");
  auto page = store_->ListJobs(10, "");
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->jobs.size(), 3u);
  EXPECT_EQ(page->jobs[0].id, a);
  EXPECT_EQ(page->jobs[0].damage, "");
  EXPECT_EQ(page->jobs[0].spec.model().layers(), 1);
  EXPECT_EQ(page->jobs[1].id, b);
  EXPECT_EQ(page->jobs[1].damage,
            "job " + b + " is damaged in the state database: the stored spec does not parse");
  EXPECT_EQ(page->jobs[1].state, v1::JOB_STATE_QUEUED);
  EXPECT_EQ(page->jobs[1].spec.model().layers(), 0);
  EXPECT_EQ(page->jobs[2].id, c);
  EXPECT_EQ(page->jobs[2].damage, "");
  EXPECT_EQ(page->jobs[2].spec.model().layers(), 3);
  // The state filter still works, GetJob shows the damage too, and the job can be failed.
  auto queued = store_->ListJobs(10, "", {v1::JOB_STATE_QUEUED});
  ASSERT_TRUE(queued.ok()) << queued.status();
  EXPECT_EQ(queued->jobs.size(), 3u);
  auto damaged = store_->GetJob(b);
  ASSERT_TRUE(damaged.ok()) << damaged.status();
  EXPECT_THAT(damaged->damage, HasSubstr("does not parse"));
  EXPECT_TRUE(store_->UpdateJobState(b, v1::JOB_STATE_FAILED, "x").ok());
  EXPECT_EQ(store_->GetJob(b)->state, v1::JOB_STATE_FAILED);
}

// A damaged page (a torn write, a bad disk) surfaced only when a request first read it, maybe
// days after the coordinator said it was ready. Open now runs PRAGMA quick_check and refuses the
// file, naming it and the check's finding; the file is left as it was.
TEST_F(JobStoreTest, ADatabaseWithADamagedPageIsRefusedAtOpenNamingIt) {
  const std::string job = Create("", Spec(1));
  // Enough log lines for pages that opening the store never reads.
  for (int i = 0; i < 40; ++i) {
    std::vector<LogLineRecord> lines;
    for (int k = 0; k < 50; ++k) {
      lines.push_back(LogLineRecord{0, 0, 0, "info", std::string(200, char('a' + (k % 26)))});
    }
    ASSERT_TRUE(store_->AppendJobLogs(job, 0, lines, 0).ok());
  }
  store_.reset();  // checkpoints the WAL into the file
  const std::string db = JobStore::DatabasePath(dir_);
  const uintmax_t size = fs::file_size(db);
  ASSERT_GT(size, 16u * 4096) << "too few pages to damage one in the middle";
  {
    std::fstream f(db, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(size / 4096 / 2 * 4096));
    const std::string garbage(4096, '\x5a');
    f.write(garbage.data(), garbage.size());
  }
  const std::string damaged = ReadFileBytes(db);
  auto store = JobStore::Open(dir_);
  ASSERT_FALSE(store.ok()) << "a database with a damaged page opened";
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  EXPECT_THAT(store.status().message(), HasSubstr(db + ": the database is damaged"));
  EXPECT_THAT(store.status().message(), HasSubstr("quick_check"));
  EXPECT_THAT(store.status().message(), HasSubstr("restore it from a backup"));
  EXPECT_EQ(ReadFileBytes(db), damaged) << "the refused database was changed";
}

TEST_F(JobStoreTest, AFileThatIsNotADatabaseIsDataLoss) {
  store_.reset();
  const std::string other = root_ + "/garbage";
  fs::create_directories(other);
  {
    std::ofstream out(JobStore::DatabasePath(other), std::ios::binary);
    out << std::string(8192, 'x');
  }
  auto store = JobStore::Open(other);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss) << store.status();
  EXPECT_THAT(store.status().message(), HasSubstr(JobStore::DatabasePath(other) + ": sqlite: "));
}

// A database this user may read but not write: SQLite opens it read-only without a word, so the
// coordinator started, said it was ready, and failed every submit ("attempt to write a readonly
// database"). Run in a child process as a user without write access: nobody when the tests run
// as root (who writes any file), else this user with the file's write bits cleared.
TEST_F(JobStoreTest, ADatabaseThisUserCannotWriteIsRefusedAtOpenNamingIt) {
  store_.reset();
  const std::string db = JobStore::DatabasePath(dir_);
  ASSERT_TRUE(fs::exists(db));
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::geteuid() == 0) {
      // nobody may enter the test's folder and write the state dir, not the root-owned database.
      fs::permissions(root_, fs::perms::owner_all | fs::perms::group_exec | fs::perms::others_exec);
      fs::remove(dir_ + "/LOCK");
      if (::chown(dir_.c_str(), 65534, 65534) != 0 || ::setgid(65534) != 0 ||
          ::setuid(65534) != 0) {
        ::_exit(3);
      }
    } else {
      fs::permissions(db, fs::perms::owner_read | fs::perms::group_read | fs::perms::others_read);
    }
    auto store = JobStore::Open(dir_);
    const bool named = !store.ok() &&
                       store.status().code() == absl::StatusCode::kFailedPrecondition &&
                       absl::StrContains(store.status().message(), db) &&
                       absl::StrContains(store.status().message(), "cannot write its database");
    if (!named) std::fprintf(stderr, "Open: %s\n", store.status().ToString().c_str());
    ::_exit(named ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: opened, or refused without naming the file; 3: setuid";
}

TEST_F(JobStoreTest, AStateDirThatCannotBeCreatedIsUnavailable) {
  const std::string file = root_ + "/a-file";
  { std::ofstream out(file); }
  auto store = JobStore::Open(file + "/state");
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kUnavailable) << store.status();
  EXPECT_EQ(JobStore::Open("").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mat::coordinator
