// Tests of coordinator/coordinator.h with a real JobStore in a temporary directory and no
// network: submission (defaults, validation naming the field, unknown fields, idempotency),
// reads, paging, cancellation rules, spectra paging, and the watch subscriptions (first event,
// ordering, the terminal event ending them, unsubscribing from inside a listener).
#include "coordinator/coordinator.h"

#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/job_spec.h"
#include "google/protobuf/unknown_field_set.h"
#include "google/protobuf/util/message_differencer.h"
#include "tests/coordinator/coordinator_fixture.h"
#include "tests/testing/temp_dir.h"

namespace mat::coordinator {
namespace {

namespace fs = std::filesystem;
using google::protobuf::util::MessageDifferencer;
using ::testing::HasSubstr;

// A spec that passes ValidateJobSpec, with a few keys set.
v1::JobSpec SmallSpec(int64_t layers = 2) {
  v1::JobSpec spec;
  spec.mutable_model()->set_layers(layers);
  spec.mutable_train()->set_steps(10);
  return spec;
}

// One recorded listener call.
struct Received {
  v1::JobEvent event;
  bool last = false;
};

class CoordinatorTest : public CoordinatorFixture {
 protected:
  CoordinatorTest() : CoordinatorFixture("mat_coordinator") {}

  CoordinatorOptions Options() override {
    CoordinatorOptions options;
    options.now_unix_seconds = [this] { return now_ + 1000; };  // distinguishable from the store
    return options;
  }

  std::string Submit(const std::string& request_id, const v1::JobSpec& spec) {
    auto reply = coordinator_->SubmitJob(request_id, spec);
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? reply->job_id() : "";
  }

  v1::JobState StateOf(const std::string& job_id) {
    auto reply = coordinator_->GetJob(job_id);
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? reply->job().state() : v1::JOB_STATE_UNSPECIFIED;
  }

  // Subscribes and records every call into `out`.
  WatchId Watch(const std::string& job_id, std::vector<Received>* out) {
    auto id = coordinator_->WatchJob(
        job_id, [out](const v1::JobEvent& e, bool last) { out->push_back({e, last}); });
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }

};

TEST_F(CoordinatorTest, SubmitJobStoresQueuedJobWithDefaultsFilled) {
  auto reply = coordinator_->SubmitJob("req-1", SmallSpec());
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_TRUE(reply->created());
  EXPECT_EQ(reply->job_id(), "job-000001");

  auto job = coordinator_->GetJob(reply->job_id());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job->job().client_request_id(), "req-1");
  EXPECT_EQ(job->job().create_time_unix_seconds(), now_);
  EXPECT_TRUE(job->ranks().empty());
  // Set keys are kept, unset ones take their defaults.
  EXPECT_EQ(job->job().spec().model().layers(), 2);
  EXPECT_EQ(job->job().spec().train().steps(), 10);
  EXPECT_TRUE(job->job().spec().policy().has_alpha());
  EXPECT_TRUE(MessageDifferencer::Equals(job->job().spec(), api::WithJobSpecDefaults(SmallSpec())));
}

// --job-retention-days: finished jobs past the retention are deleted, in submission order; the others,
// and one a queued job replays, stay. Without a retention nothing is.
class CoordinatorRetentionTest : public CoordinatorTest {
 protected:
  CoordinatorOptions Options() override {
    CoordinatorOptions options = CoordinatorTest::Options();
    options.job_retention_seconds = retention_;
    return options;
  }
  int64_t retention_ = 3600;
};

TEST_F(CoordinatorRetentionTest, FinishedJobsPastTheRetentionAreDeleted) {
  const std::string old_job = Submit("", SmallSpec());
  const std::string replayed = Submit("", SmallSpec());
  const std::string running = Submit("", SmallSpec());
  JobStore& store = coordinator_->store();
  ASSERT_TRUE(coordinator_->CancelJob(old_job, "").ok());
  ASSERT_TRUE(store.UpdateJobState(replayed, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store.UpdateJobState(replayed, v1::JOB_STATE_SUCCEEDED).ok());
  // A queued job that replays `replayed` (stored as the facade would, past its checks).
  v1::JobSpec rand = SmallSpec();
  rand.mutable_policy()->set_kind("rand");
  rand.mutable_policy()->set_rand_schedule_job(replayed);
  ASSERT_TRUE(store.CreateJob("", rand).ok());
  EXPECT_TRUE(coordinator_->DeleteExpiredJobs().empty()) << "nothing is an hour old yet";
  now_ += 3601;
  const std::string young = Submit("", SmallSpec());
  ASSERT_TRUE(coordinator_->CancelJob(young, "").ok());
  EXPECT_EQ(coordinator_->DeleteExpiredJobs(), (std::vector<std::string>{old_job}));
  EXPECT_EQ(coordinator_->GetJob(old_job).status().code(), absl::StatusCode::kNotFound);
  for (const std::string& kept : {replayed, running, young}) {
    EXPECT_TRUE(coordinator_->GetJob(kept).ok()) << kept;
  }
  EXPECT_TRUE(coordinator_->DeleteExpiredJobs().empty());

  retention_ = 0;
  Open();
  now_ += 100000;
  EXPECT_TRUE(coordinator_->DeleteExpiredJobs().empty()) << "no retention, no delete";
}

// Rounds of `limit`: a full round says there is more and the next goes on after it, past jobs
// that must wait for a replay (they used to be listed again every round, and nothing behind
// them was ever deleted); a short round starts from the first again.
TEST_F(CoordinatorRetentionTest, RoundsGoPastJobsThatMustWait) {
  JobStore& store = coordinator_->store();
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    ids.push_back(Submit("", SmallSpec()));
    ASSERT_TRUE(store.UpdateJobState(ids.back(), v1::JOB_STATE_RUNNING).ok());
    ASSERT_TRUE(store.UpdateJobState(ids.back(), v1::JOB_STATE_SUCCEEDED).ok());
  }
  // The first two are replayed by queued jobs.
  for (int i = 0; i < 2; ++i) {
    v1::JobSpec rand = SmallSpec();
    rand.mutable_policy()->set_kind("rand");
    rand.mutable_policy()->set_rand_schedule_job(ids[i]);
    ASSERT_TRUE(store.CreateJob("", rand).ok());
  }
  now_ += 3601;
  bool more = false;
  EXPECT_TRUE(coordinator_->DeleteExpiredJobs(2, &more).empty()) << "both must wait";
  EXPECT_TRUE(more);
  EXPECT_EQ(coordinator_->DeleteExpiredJobs(2, &more),
            (std::vector<std::string>{ids[2], ids[3]}));
  EXPECT_TRUE(more);
  EXPECT_EQ(coordinator_->DeleteExpiredJobs(2, &more), (std::vector<std::string>{ids[4]}));
  EXPECT_FALSE(more);
  EXPECT_TRUE(coordinator_->DeleteExpiredJobs(2, &more).empty()) << "from the first: both wait";
  EXPECT_TRUE(more);
}

TEST_F(CoordinatorTest, SubmitJobIsIdempotentByClientRequestId) {
  const std::string first = Submit("req-1", SmallSpec());
  auto again = coordinator_->SubmitJob("req-1", SmallSpec());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->job_id(), first);
  EXPECT_FALSE(again->created());

  // Writing a default out explicitly is the same spec once defaults are filled.
  v1::JobSpec explicit_default = SmallSpec();
  explicit_default.mutable_policy()->set_alpha(api::JobSpecDefaults().policy().alpha());
  auto same = coordinator_->SubmitJob("req-1", explicit_default);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->job_id(), first);

  // No request id: always a new job.
  const std::string second = Submit("", SmallSpec());
  const std::string third = Submit("", SmallSpec());
  EXPECT_NE(second, first);
  EXPECT_NE(third, second);

  // The same request id for another spec is refused and stores nothing.
  auto other = coordinator_->SubmitJob("req-1", SmallSpec(3));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kAlreadyExists) << other.status();
  auto all = coordinator_->ListJobs({});
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->jobs_size(), 3);
}

TEST_F(CoordinatorTest, SubmitJobRejectsInvalidSpecNamingTheField) {
  v1::JobSpec spec = SmallSpec();
  spec.mutable_policy()->set_alpha(1.5);
  auto reply = coordinator_->SubmitJob("bad", spec);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reply.status().message(), HasSubstr("policy.alpha"));

  spec = SmallSpec();
  spec.mutable_resources()->set_workers(0);
  reply = coordinator_->SubmitJob("bad", spec);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reply.status().message(), HasSubstr("resources.workers"));

  auto all = coordinator_->ListJobs({});
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->jobs_size(), 0) << "a rejected spec must not be stored";
}

// policy.rand_schedule_job must name a MAT job of this store that SUCCEEDED with at least one
// decision; every refusal names the key, the job and why, and stores nothing.
TEST_F(CoordinatorTest, SubmitJobChecksTheMatJobARandJobReplays) {
  v1::JobSpec rand = SmallSpec();
  rand.mutable_policy()->set_kind("rand");
  auto replaying = [&](const std::string& job_id) {
    rand.mutable_policy()->set_rand_schedule_job(job_id);
    return coordinator_->SubmitJob("", rand);
  };
  auto expect_refused = [](const absl::StatusOr<v1::SubmitJobReply>& reply, absl::StatusCode code,
                           const std::vector<std::string>& texts) {
    ASSERT_FALSE(reply.ok()) << "accepted as " << reply->job_id();
    EXPECT_EQ(reply.status().code(), code) << reply.status();
    EXPECT_THAT(std::string(reply.status().message()), HasSubstr("policy.rand_schedule_job"));
    for (const std::string& text : texts) {
      EXPECT_THAT(std::string(reply.status().message()), HasSubstr(text));
    }
  };
  JobStore& store = coordinator_->store();

  expect_refused(replaying("job-000042"), absl::StatusCode::kInvalidArgument,
                 {"no job 'job-000042'"});
  const std::string mat = Submit("", SmallSpec());  // QUEUED: no workers here
  expect_refused(replaying(mat), absl::StatusCode::kFailedPrecondition,
                 {"job " + mat + " is QUEUED, not SUCCEEDED"});
  ASSERT_TRUE(store.UpdateJobState(mat, v1::JOB_STATE_RUNNING).ok());
  expect_refused(replaying(mat), absl::StatusCode::kFailedPrecondition,
                 {"job " + mat + " is RUNNING, not SUCCEEDED"});
  v1::JobSpec full_spec = SmallSpec();
  full_spec.mutable_policy()->set_kind("full");
  const std::string full = Submit("", full_spec);
  ASSERT_TRUE(store.UpdateJobState(full, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(store.UpdateJobState(full, v1::JOB_STATE_SUCCEEDED).ok());
  expect_refused(replaying(full), absl::StatusCode::kInvalidArgument,
                 {"job " + full + " ran policy.kind full, not mat"});
  ASSERT_TRUE(store.UpdateJobState(mat, v1::JOB_STATE_SUCCEEDED).ok());
  expect_refused(replaying(mat), absl::StatusCode::kInvalidArgument,
                 {"job " + mat + " has no stored decision"});
  // Only kind rand may replay (ValidateJobSpec), whatever the job it names.
  v1::JobSpec mat_replaying = SmallSpec();
  mat_replaying.mutable_policy()->set_rand_schedule_job(mat);
  auto wrong_kind = coordinator_->SubmitJob("", mat_replaying);
  EXPECT_EQ(wrong_kind.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong_kind.status().message()), HasSubstr("policy.rand_schedule_job"));

  auto listed = coordinator_->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->jobs_size(), 2) << "a refused job was stored";

  // A finished MAT job with its decisions: accepted, the key kept in the stored spec.
  ASSERT_TRUE(store
                  .AppendDecision(mat, 0,
                                  R"({"step":0,"modules":[{"group":"heads","active":true},)"
                                  R"({"group":"heads","active":false}]})")
                  .ok());
  // A decision at step 10 cannot be replayed by a job that decides every 4 steps (it would match
  // it at step 12 only), and the refused job is not stored; by one that decides every 5 it can.
  ASSERT_TRUE(store
                  .AppendDecision(mat, 10,
                                  R"({"step":10,"modules":[{"group":"heads","active":true},)"
                                  R"({"group":"heads","active":true}]})")
                  .ok());
  rand.mutable_policy()->set_probe_every(4);
  expect_refused(replaying(mat), absl::StatusCode::kInvalidArgument,
                 {"job " + mat + ": the replayed run decided at step 10",
                  "policy.probe_every (4)"});
  listed = coordinator_->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->jobs_size(), 2) << "the refused replay was stored";
  rand.mutable_policy()->set_probe_every(5);
  auto accepted = replaying(mat);
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  auto job = coordinator_->GetJob(accepted->job_id());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->job().spec().policy().rand_schedule_job(), mat);
  EXPECT_EQ(job->job().spec().policy().kind(), "rand");

  // Once the replay finished and the MAT job is deleted, a resubmit of the replay (its request
  // id) is still answered with its job; a new replay of the deleted job names the delete.
  auto keyed = coordinator_->SubmitJob("nightly-rand", rand);
  ASSERT_TRUE(keyed.ok()) << keyed.status();
  ASSERT_TRUE(coordinator_->CancelJob(keyed->job_id(), "").ok());
  ASSERT_TRUE(coordinator_->CancelJob(accepted->job_id(), "").ok());
  ASSERT_TRUE(coordinator_->DeleteJob(mat).ok());
  auto again = coordinator_->SubmitJob("nightly-rand", rand);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->job_id(), keyed->job_id());
  EXPECT_FALSE(again->created());
  expect_refused(coordinator_->SubmitJob("", rand), absl::StatusCode::kInvalidArgument,
                 {"job '" + mat + "' was deleted"});
}

TEST_F(CoordinatorTest, SubmitJobRejectsFieldsUnknownToThisSchema) {
  // What a newer client's spec looks like to this server: a field number it does not know.
  v1::JobSpec spec = SmallSpec();
  spec.mutable_model()->GetReflection()->MutableUnknownFields(spec.mutable_model())
      ->AddVarint(42, 7);
  auto reply = coordinator_->SubmitJob("", spec);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reply.status().message(), HasSubstr("spec.model"));
  EXPECT_THAT(reply.status().message(), HasSubstr("42"));

  v1::JobSpec top = SmallSpec();
  top.GetReflection()->MutableUnknownFields(&top)->AddVarint(99, 1);
  reply = coordinator_->SubmitJob("", top);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reply.status().message(), HasSubstr("spec: unknown field number 99"));
}

TEST_F(CoordinatorTest, GetJobOfUnknownIdIsNotFoundNamingIt) {
  auto reply = coordinator_->GetJob("job-424242");
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(reply.status().message(), HasSubstr("job-424242"));
}

TEST_F(CoordinatorTest, EmptyJobIdIsInvalidArgumentEverywhere) {
  Submit("", SmallSpec());
  EXPECT_EQ(coordinator_->GetJob("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(coordinator_->CancelJob("", "").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(coordinator_->GetSpectra({}).status().code(), absl::StatusCode::kInvalidArgument);
  auto watch = coordinator_->WatchJob("", [](const v1::JobEvent&, bool) {});
  EXPECT_EQ(watch.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(watch.status().message(), HasSubstr("job_id"));
}

TEST_F(CoordinatorTest, ListJobsPagesInSubmissionOrderAndFiltersByState) {
  const std::string a = Submit("", SmallSpec());
  const std::string b = Submit("", SmallSpec());
  const std::string c = Submit("", SmallSpec());
  ASSERT_TRUE(coordinator_->CancelJob(b, "").ok());

  v1::ListJobsRequest request;
  request.set_page_size(2);
  auto first = coordinator_->ListJobs(request);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->jobs_size(), 2);
  EXPECT_EQ(first->jobs(0).job_id(), a);
  EXPECT_EQ(first->jobs(1).job_id(), b);
  ASSERT_FALSE(first->next_page_token().empty());
  request.set_page_token(first->next_page_token());
  auto second = coordinator_->ListJobs(request);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(second->jobs_size(), 1);
  EXPECT_EQ(second->jobs(0).job_id(), c);
  EXPECT_TRUE(second->next_page_token().empty());

  v1::ListJobsRequest cancelled;
  cancelled.add_states(v1::JOB_STATE_CANCELLED);
  auto only = coordinator_->ListJobs(cancelled);
  ASSERT_TRUE(only.ok());
  ASSERT_EQ(only->jobs_size(), 1);
  EXPECT_EQ(only->jobs(0).job_id(), b);

  v1::ListJobsRequest bad;
  bad.set_page_size(-1);
  EXPECT_EQ(coordinator_->ListJobs(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CoordinatorTest, CancelJobMovesActiveJobsToCancelledAndRefusesFinishedOnes) {
  const std::string queued = Submit("", SmallSpec());
  auto reply = coordinator_->CancelJob(queued, "no longer needed");
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->state(), v1::JOB_STATE_CANCELLED);
  auto job = coordinator_->GetJob(queued);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->job().state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(job->job().error_message(), "no longer needed");

  // Cancelling again: FAILED_PRECONDITION naming the state; the stored reason is unchanged.
  auto again = coordinator_->CancelJob(queued, "twice");
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(again.status().message(), HasSubstr("CANCELLED"));
  EXPECT_EQ(coordinator_->GetJob(queued)->job().error_message(), "no longer needed");

  const std::string running = Submit("", SmallSpec());
  ASSERT_TRUE(coordinator_->UpdateJobState(running, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(coordinator_->CancelJob(running, "").ok());
  EXPECT_EQ(StateOf(running), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(coordinator_->GetJob(running)->job().error_message(), "cancelled by request");

  const std::string done = Submit("", SmallSpec());
  ASSERT_TRUE(coordinator_->UpdateJobState(done, v1::JOB_STATE_RUNNING).ok());
  ASSERT_TRUE(coordinator_->UpdateJobState(done, v1::JOB_STATE_SUCCEEDED).ok());
  auto finished = coordinator_->CancelJob(done, "");
  EXPECT_EQ(finished.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(finished.status().message(), HasSubstr("SUCCEEDED"));
  EXPECT_EQ(StateOf(done), v1::JOB_STATE_SUCCEEDED);

  auto unknown = coordinator_->CancelJob("job-999999", "");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(unknown.status().message(), HasSubstr("job-999999"));
}

TEST_F(CoordinatorTest, WatchJobDeliversCurrentStateThenEveryEventUntilTerminal) {
  const std::string id = Submit("", SmallSpec());
  std::vector<Received> got;
  Watch(id, &got);
  ASSERT_EQ(got.size(), 1u) << "the current state comes before WatchJob returns";
  EXPECT_EQ(got[0].event.job_id(), id);
  EXPECT_EQ(got[0].event.state().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(got[0].event.time_unix_seconds(), now_ + 1000);
  EXPECT_FALSE(got[0].last);
  EXPECT_EQ(coordinator_->WatcherCount(id), 1);

  ASSERT_TRUE(coordinator_->UpdateJobState(id, v1::JOB_STATE_RUNNING).ok());
  v1::JobEvent progress;
  progress.set_job_id(id);
  progress.set_step(40);
  progress.mutable_progress()->set_train_loss(5.5);
  coordinator_->PublishJobEvent(progress);
  ASSERT_TRUE(coordinator_->CancelJob(id, "stop").ok());

  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[1].event.state().state(), v1::JOB_STATE_RUNNING);
  EXPECT_FALSE(got[1].last);
  EXPECT_EQ(got[2].event.progress().train_loss(), 5.5);
  EXPECT_EQ(got[2].event.step(), 40);
  EXPECT_EQ(got[2].event.time_unix_seconds(), now_ + 1000) << "time filled in when 0";
  EXPECT_FALSE(got[2].last);
  EXPECT_EQ(got[3].event.state().state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(got[3].event.state().error_message(), "stop");
  EXPECT_TRUE(got[3].last);
  EXPECT_EQ(coordinator_->WatcherCount(id), 0) << "the terminal event ends the subscription";

  // Nothing is delivered after the last event.
  coordinator_->PublishJobEvent(progress);
  EXPECT_EQ(got.size(), 4u);
}

TEST_F(CoordinatorTest, WatchJobOfFinishedJobSendsOneLastEventAndKeepsNoSubscription) {
  const std::string id = Submit("", SmallSpec());
  ASSERT_TRUE(coordinator_->CancelJob(id, "early").ok());
  std::vector<Received> got;
  const WatchId watch = Watch(id, &got);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].event.state().state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(got[0].event.state().error_message(), "early");
  EXPECT_TRUE(got[0].last);
  EXPECT_EQ(coordinator_->WatcherCount(id), 0);
  coordinator_->UnwatchJob(watch);  // a no-op
}

TEST_F(CoordinatorTest, WatchJobOfUnknownJobIsNotFoundAndNeverCallsTheListener) {
  bool called = false;
  auto id = coordinator_->WatchJob("job-777", [&](const v1::JobEvent&, bool) { called = true; });
  EXPECT_EQ(id.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(id.status().message(), HasSubstr("job-777"));
  EXPECT_FALSE(called);
}

TEST_F(CoordinatorTest, EventsReachOnlyTheWatchersOfTheirJobAndStopAfterUnwatch) {
  const std::string a = Submit("", SmallSpec());
  const std::string b = Submit("", SmallSpec());
  std::vector<Received> on_a, on_a2, on_b;
  const WatchId wa = Watch(a, &on_a);
  Watch(a, &on_a2);
  Watch(b, &on_b);
  EXPECT_EQ(coordinator_->WatcherCount(a), 2);

  ASSERT_TRUE(coordinator_->UpdateJobState(a, v1::JOB_STATE_RUNNING).ok());
  EXPECT_EQ(on_a.size(), 2u);
  EXPECT_EQ(on_a2.size(), 2u);
  EXPECT_EQ(on_b.size(), 1u) << "b's watcher got a's event";

  coordinator_->UnwatchJob(wa);
  coordinator_->UnwatchJob(wa);       // idempotent
  coordinator_->UnwatchJob(123456);   // unknown: no-op
  EXPECT_EQ(coordinator_->WatcherCount(a), 1);
  ASSERT_TRUE(coordinator_->UpdateJobState(a, v1::JOB_STATE_FAILED, "boom").ok());
  EXPECT_EQ(on_a.size(), 2u) << "delivered after UnwatchJob";
  ASSERT_EQ(on_a2.size(), 3u);
  EXPECT_EQ(on_a2[2].event.state().error_message(), "boom");
  EXPECT_TRUE(on_a2[2].last);
  EXPECT_EQ(on_b.size(), 1u);
}

TEST_F(CoordinatorTest, ListenerMayUnwatchOthersAndItselfWhileAnEventIsDelivered) {
  const std::string id = Submit("", SmallSpec());
  std::vector<Received> second_got;
  WatchId second = 0;
  WatchId first = 0;
  int first_calls = 0;
  auto first_id = coordinator_->WatchJob(id, [&](const v1::JobEvent&, bool) {
    ++first_calls;
    if (first_calls == 2) {  // on the first published event: drop the other one, then itself
      coordinator_->UnwatchJob(second);
      coordinator_->UnwatchJob(first);
    }
  });
  ASSERT_TRUE(first_id.ok());
  first = *first_id;
  second = Watch(id, &second_got);

  ASSERT_TRUE(coordinator_->UpdateJobState(id, v1::JOB_STATE_RUNNING).ok());
  EXPECT_EQ(first_calls, 2);
  EXPECT_EQ(second_got.size(), 1u) << "an unwatched listener was still called";
  EXPECT_EQ(coordinator_->WatcherCount(id), 0);
  ASSERT_TRUE(coordinator_->CancelJob(id, "").ok());
  EXPECT_EQ(first_calls, 2);
}

TEST_F(CoordinatorTest, IllegalStateChangeFailsAndPublishesNothing) {
  const std::string id = Submit("", SmallSpec());
  std::vector<Received> got;
  Watch(id, &got);
  absl::Status s = coordinator_->UpdateJobState(id, v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_EQ(got.size(), 1u);
  EXPECT_EQ(StateOf(id), v1::JOB_STATE_QUEUED);
}

TEST_F(CoordinatorTest, GetSpectraPagesTheStoredHistory) {
  const std::string id = Submit("", SmallSpec());
  for (int64_t step : {0, 20, 40}) {
    ASSERT_TRUE(coordinator_->store()
                    .AppendLambdas(id, step, {1.0 + step, 2.0 + step, 0.5})
                    .ok());
  }
  v1::GetSpectraRequest request;
  request.set_job_id(id);
  request.set_page_size(2);
  auto first = coordinator_->GetSpectra(request);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->points_size(), 2);
  EXPECT_EQ(first->points(0).step(), 0);
  EXPECT_EQ(first->points(1).step(), 20);
  EXPECT_THAT(first->points(1).lambda_max(), ::testing::ElementsAre(21.0, 22.0, 0.5));
  ASSERT_FALSE(first->next_page_token().empty());
  request.set_page_token(first->next_page_token());
  auto second = coordinator_->GetSpectra(request);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(second->points_size(), 1);
  EXPECT_EQ(second->points(0).step(), 40);
  EXPECT_TRUE(second->next_page_token().empty());

  v1::GetSpectraRequest unknown;
  unknown.set_job_id("job-000404");
  EXPECT_EQ(coordinator_->GetSpectra(unknown).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, ReopenedStateListsTheSameJobs) {
  const std::string a = Submit("r", SmallSpec());
  const std::string b = Submit("", SmallSpec(3));
  ASSERT_TRUE(coordinator_->CancelJob(b, "x").ok());
  Open();
  auto all = coordinator_->ListJobs({});
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->jobs_size(), 2);
  EXPECT_EQ(all->jobs(0).job_id(), a);
  EXPECT_EQ(all->jobs(0).state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(all->jobs(1).job_id(), b);
  EXPECT_EQ(all->jobs(1).state(), v1::JOB_STATE_CANCELLED);
  // Idempotency survives the restart.
  auto again = coordinator_->SubmitJob("r", SmallSpec());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->job_id(), a);
  EXPECT_FALSE(again->created());
}

// A queued job whose stored spec no longer parses made every listing fail (matctl list, the
// scheduler, this recovery), and could never run. After a restart it is listed, FAILED, its
// message naming the damage; the intact job stays queued.
TEST_F(CoordinatorTest, AJobWithADamagedStoredSpecIsListedAndFailedAtStart) {
  const std::string intact = Submit("", SmallSpec());
  const std::string damaged = Submit("", SmallSpec(3));
  coordinator_.reset();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open_v2(JobStore::DatabasePath(dir_ + "/state").c_str(), &db,
                            SQLITE_OPEN_READWRITE, nullptr),
            SQLITE_OK);
  const std::string sql = "UPDATE jobs SET spec = x'ffffffff0f' WHERE id = '" + damaged + "'";
  EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  Open();
  auto all = coordinator_->ListJobs({});
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->jobs_size(), 2);
  EXPECT_EQ(all->jobs(0).job_id(), intact);
  EXPECT_EQ(all->jobs(0).state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(all->jobs(0).error_message(), "");
  EXPECT_EQ(all->jobs(1).job_id(), damaged);
  EXPECT_EQ(all->jobs(1).state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(all->jobs(1).error_message(),
              HasSubstr("job " + damaged + " is damaged in the state database: the stored spec "
                        "does not parse; the coordinator cannot run it"));
  auto one = coordinator_->GetJob(damaged);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(one->job().state(), v1::JOB_STATE_FAILED);
}

}  // namespace
}  // namespace mat::coordinator
