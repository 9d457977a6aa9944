// Tests of the mask engine (coordinator/mask_engine.h) alone, on a real JobStore in a temporary
// directory: the report checks, the rank averaging (sum in rank order / W) checked against a
// local Policy fed the same means, mask versions, the decision stored before it is returned, the
// decision metrics, a continued engine restoring its policy from the store and repeating the last
// mask to a rank that missed it, and a store failure flagged as fatal for the job.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "api/job_spec.h"
#include "config/train_config.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_store.h"
#include "coordinator/mask_engine.h"
#include "policy/policy.h"
#include "tests/testing/policy_fixtures.h"
#include "tests/testing/temp_dir.h"

namespace mat::coordinator {
namespace {

using tests::Lambda;
using tests::Modules;

using ::testing::HasSubstr;

// 2 layers x 5 heads, warm-up off, a probe every 10 steps: the policy decides from step 0.
v1::JobSpec Spec() {
  v1::JobSpec spec;
  spec.mutable_model()->set_layers(2);
  spec.mutable_train()->set_steps(100);
  spec.mutable_resources()->set_workers(2);
  spec.mutable_policy()->set_kind("mat");
  spec.mutable_policy()->set_warmup_steps(0);
  spec.mutable_policy()->set_probe_every(10);
  return spec;
}

policy::PolicyConfig PolicyConfigOf(const v1::JobSpec& spec) {
  auto config =
      config::ParseTrainConfig(api::JobSpecToTrainerYaml(api::WithJobSpecDefaults(spec)), "t");
  EXPECT_TRUE(config.ok()) << config.status();
  return config::ToPolicyConfig(*config);
}



v1::SpectraReport Report(int64_t step, int values) {
  v1::SpectraReport r;
  r.set_step(step);
  for (int i = 0; i < values; ++i) r.add_lambda_max(1.0 + i);
  return r;
}

class MaskEngineTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_mask_engine"};

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok());
    auto store = JobStore::Open(tmp_.path() + "/state");
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    auto created = store_->CreateJob("", api::WithJobSpecDefaults(Spec()));
    ASSERT_TRUE(created.ok()) << created.status();
    job_ = created->job_id;
    ASSERT_TRUE(store_->UpdateJobState(job_, v1::JOB_STATE_RUNNING).ok());
  }

  std::unique_ptr<MaskEngine> Engine(CoordinatorMetrics* metrics = nullptr,
                                     const std::string& job = "") {
    auto engine = std::make_unique<MaskEngine>(job.empty() ? job_ : job, PolicyConfigOf(Spec()),
                                               2, metrics);
    auto policy = engine->NewPolicy(Modules());
    EXPECT_TRUE(policy.ok()) << policy.status();
    engine->Adopt(Modules(), std::move(*policy));
    return engine;
  }

  // Both ranks report probe k (step 10 k), rank 1 first; returns the decision.
  MaskDecision Probe(MaskEngine& engine, int k) {
    auto first = engine.Add("t", 1, 10 * k, Lambda(1, k));
    EXPECT_TRUE(first.ok()) << first.status();
    EXPECT_FALSE(first->has_value()) << "rank 0 has not reported";
    auto complete = engine.Add("t", 0, 10 * k, Lambda(0, k));
    EXPECT_TRUE(complete.ok()) << complete.status();
    EXPECT_TRUE(complete->has_value());
    bool store_failed = true;
    auto decided = engine.Decide(*store_, 10 * k, **complete, &store_failed);
    EXPECT_TRUE(decided.ok()) << decided.status();
    EXPECT_FALSE(store_failed);
    return *decided;
  }

  std::unique_ptr<JobStore> store_;
  std::string job_;
};

TEST_F(MaskEngineTest, DecidesOnTheRankMeanLikeALocalPolicyAndStoresFirst) {
  CoordinatorMetrics metrics;
  auto engine = Engine(&metrics);
  auto local = policy::Policy::Create(PolicyConfigOf(Spec()), Modules());
  ASSERT_TRUE(local.ok());
  for (int k = 0; k < 4; ++k) {
    const MaskDecision d = Probe(*engine, k);
    std::vector<double> mean(10);
    for (int i = 0; i < 10; ++i) mean[i] = (Lambda(0, k)[i] + Lambda(1, k)[i]) / 2;
    ASSERT_TRUE((*local)->Observe(10 * k, mean).ok());
    const policy::MaskSchedule schedule = (*local)->Schedule();
    EXPECT_EQ(d.mean, mean);
    EXPECT_EQ(d.message.mask().bits(), PackModuleBits(schedule.every_step)) << "probe " << k;
    EXPECT_EQ(d.message.mask().mask_version(), k + 1);
    EXPECT_EQ(d.message.mask().effective_step(), 10 * k);
    EXPECT_EQ(d.message.mask().num_modules(), 10);
    EXPECT_EQ(engine->mask_version(), k + 1);
    EXPECT_EQ(engine->last_decided_step(), 10 * k);
    // Stored before it was returned.
    EXPECT_EQ(store_->GetJob(job_)->mask_version, k + 1);
    engine->SetDecisionMetrics(d);
    EXPECT_EQ(metrics.module_lambda_max.Value({job_, "heads", "0", "layer0.head3"}), mean[3]);
    EXPECT_EQ(metrics.job_active_modules.Value({job_}), d.active_modules);
  }
  auto decisions = store_->GetDecisions(job_, 0, "");
  ASSERT_TRUE(decisions.ok());
  EXPECT_EQ(decisions->decisions.size(), 4u);
}

TEST_F(MaskEngineTest, ChecksTheReportAgainstTheJob) {
  auto engine = Engine();
  EXPECT_TRUE(engine->CheckReport("r", Report(20, 10)).ok());
  EXPECT_THAT(engine->CheckReport("r", Report(15, 10)).message(),
              HasSubstr("r: step must be >= 0 and a multiple of policy.probe_every (10)"));
  EXPECT_THAT(engine->CheckReport("r", Report(-10, 10)).message(), HasSubstr("step must be"));
  EXPECT_THAT(engine->CheckReport("r", Report(0, 9)).message(),
              HasSubstr("lambda_max has 9 values, the job has 10 modules"));
  v1::SpectraReport traced = Report(0, 10);
  traced.add_trace(1.0);
  EXPECT_THAT(engine->CheckReport("r", traced).message(),
              HasSubstr("trace has 1 values, want none or one per module (10)"));
}

TEST_F(MaskEngineTest, RefusesAStaleStepAndASecondReportOfARank) {
  auto engine = Engine();
  Probe(*engine, 0);
  auto stale = engine->Add("r", 0, 0, Lambda(0, 0));
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(stale.status().message(), HasSubstr("stale, step 0 was already decided"));
  ASSERT_TRUE(engine->Add("r", 1, 10, Lambda(1, 1)).ok());
  auto twice = engine->Add("r", 1, 10, Lambda(1, 1));
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(twice.status().message(), HasSubstr("rank 1 already reported this step"));
  // The refusal recorded nothing: rank 0 still completes the step.
  auto complete = engine->Add("r", 0, 10, Lambda(0, 1));
  ASSERT_TRUE(complete.ok());
  EXPECT_TRUE(complete->has_value());
}

TEST_F(MaskEngineTest, AContinuedEngineRestoresThePolicyAndRepeatsTheLastMask) {
  auto first = Engine();
  Probe(*first, 0);
  const MaskDecision second_decision = Probe(*first, 1);

  // The job restarts: a new engine continues from the store's mask version.
  auto engine = Engine();
  engine->Continue(2);
  ASSERT_TRUE(engine->RestoreIfNeeded(*store_, 10).ok());
  EXPECT_EQ(engine->last_decided_step(), 10);
  EXPECT_EQ(engine->mask_version(), 2);
  const v1::CoordinatorMessage* again = engine->Repeat(10, /*acked_version=*/1);
  ASSERT_NE(again, nullptr) << "a rank that did not acknowledge step 10's mask gets it again";
  EXPECT_EQ(again->mask().bits(), second_decision.message.mask().bits());
  EXPECT_EQ(again->mask().mask_version(), 2);
  EXPECT_EQ(engine->Repeat(10, 2), nullptr) << "already acknowledged";
  EXPECT_EQ(engine->Repeat(0, 0), nullptr) << "only the last decided step";
  EXPECT_EQ(engine->Add("r", 0, 10, Lambda(0, 1)).status().code(), absl::StatusCode::kAborted);
  // It continues exactly where the first engine would have.
  const MaskDecision next = Probe(*engine, 2);
  const MaskDecision expected = Probe(*first, 2);
  EXPECT_EQ(next.message.mask().bits(), expected.message.mask().bits());
  EXPECT_EQ(next.message.mask().mask_version(), 3);
}

TEST_F(MaskEngineTest, RestoresOnlyOnceAndNotWithoutContinue) {
  auto first = Engine();
  Probe(*first, 0);
  auto fresh = Engine();
  ASSERT_TRUE(fresh->RestoreIfNeeded(*store_, 0).ok());
  EXPECT_EQ(fresh->last_decided_step(), -1) << "a new job's engine restores nothing";
  fresh->Continue(1);
  ASSERT_TRUE(fresh->RestoreIfNeeded(*store_, 0).ok());
  EXPECT_EQ(fresh->last_decided_step(), 0);
}

TEST_F(MaskEngineTest, AStoreFailureIsFlaggedWithTheStep) {
  auto engine = Engine(nullptr, "job-999999");  // not in the store
  ASSERT_TRUE(engine->Add("r", 0, 0, Lambda(0, 0)).ok());
  auto complete = engine->Add("r", 1, 0, Lambda(1, 0));
  ASSERT_TRUE(complete.ok() && complete->has_value());
  bool store_failed = false;
  auto decided = engine->Decide(*store_, 0, **complete, &store_failed);
  EXPECT_TRUE(store_failed);
  EXPECT_EQ(decided.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(decided.status().message(), HasSubstr("cannot store the decision of step 0: "));
}

TEST_F(MaskEngineTest, NewPolicyNamesTheJob) {
  MaskEngine engine(job_, PolicyConfigOf(Spec()), 1, nullptr);
  EXPECT_FALSE(engine.has_policy());
  std::vector<policy::ModuleInfo> twice = Modules();
  twice[1].name = twice[0].name;
  auto refused = engine.NewPolicy(twice);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("ModuleList of job " + job_ + ": policy module name layer0.head0 repeats"));
  EXPECT_FALSE(engine.has_policy()) << "NewPolicy adopts nothing";
}

TEST(PackModuleBitsTest, LeastSignificantBitFirst) {
  EXPECT_EQ(PackModuleBits({}), "");
  EXPECT_EQ(PackModuleBits({1, 0, 0, 0, 0, 0, 0, 0, 1}), std::string("\x01\x01", 2));
  EXPECT_EQ(PackModuleBits({0, 1, 1}), std::string("\x06", 1));
}

}  // namespace
}  // namespace mat::coordinator
