// Two ranks of one data-parallel run: two Trainers in two threads of this process, their
// gradients averaged by a GradientSync over a real ProcessGroupGloo on loopback (the hooks
// mat-worker plugs in, here without a coordinator: every module is active at every step).
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/trainer/loopback_ranks.h"
#include "tests/trainer/toy_run.h"

namespace mat::trainer {
namespace {

using ::testing::HasSubstr;

// Full masks from the start; the gradients averaged over the ranks by `sync` (set once the
// group is formed).
class GlooHooks : public TrainerHooks {
 public:
  std::unique_ptr<GradientSync> sync;
  int modules = 0;

  absl::StatusOr<policy::MaskSchedule> Decide(int64_t, const ProbeResult&) override {
    policy::MaskSchedule s;
    s.every_step.assign(modules, 1);
    return s;
  }
  absl::StatusOr<int> ReduceGradients(const std::vector<uint8_t>& active,
                                      bool loss_finite) override {
    return sync->AllReduce(active, loss_finite);
  }
  void OnProgress(const TrainerProgress&) override {}
  absl::Status CheckContinue() override { return absl::OkStatus(); }
};

// A loss that is not finite on one rank only (its copy of the model holds a NaN) fails the step
// on both ranks at once, naming it, instead of the other rank waiting for the failed one in the
// next collective until the timeout (and then failing as a collective error, which the
// coordinator retries).
TEST(DataParallelTest, ALossThatIsNotFiniteOnOneRankFailsEveryRankAtThatStep) {
  if (!testing::Has("gloo")) {
    GTEST_SKIP() << "this build has no Gloo (the CUDA check's NCCL-only build)";
  }
  const std::string data = testing::WriteToyCorpus("data_parallel");
  config::TrainConfig c = testing::TinyTrainConfig(data, "full");
  const int port = testing::FreePort();
  ASSERT_NE(port, 0);
  absl::Status ends[2];
  auto rank = [&](int r) {
    GlooHooks hooks;
    TrainerOptions o;
    o.rank = r;
    o.world_size = 2;
    o.hooks = &hooks;
    auto t = Trainer::Create(c, o);
    ASSERT_TRUE(t.ok()) << t.status();
    hooks.modules = (*t)->partition().size();
    auto group = ConnectProcessGroup(testing::Loopback(port, r, 2, "gloo", "data-parallel/attempt-0"));
    ASSERT_TRUE(group.ok()) << group.status();
    hooks.sync = std::make_unique<GradientSync>(*group, (*t)->ParamEntries());
    if (r == 1) {
      torch::NoGradGuard no_grad;
      (*t)->network().parameters().front().fill_(
          std::numeric_limits<float>::quiet_NaN());
    }
    ends[r] = (*t)->Run().status();
  };
  std::thread second(rank, 1);
  rank(0);
  second.join();
  EXPECT_EQ(ends[0].code(), absl::StatusCode::kInternal) << ends[0];
  EXPECT_THAT(std::string(ends[0].message()),
              HasSubstr("training loss is not finite at step 0 on 1 of 2 ranks (not this one)"));
  EXPECT_EQ(ends[1].code(), absl::StatusCode::kInternal) << ends[1];
  EXPECT_THAT(std::string(ends[1].message()),
              HasSubstr("training loss is not finite at step 0 on 1 of 2 ranks (this one included)"));
}

}  // namespace
}  // namespace mat::trainer
