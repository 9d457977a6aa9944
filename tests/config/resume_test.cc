// Tests of mat::config::ResumeConflicts: which settings a resumed run may change.
#include "config/resume.h"

#include <map>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mat::config {
namespace {

using ::testing::ElementsAre;

std::map<std::string, std::string> Saved(const TrainConfig& c) {
  std::map<std::string, std::string> m;
  for (const auto& [key, value] : ListConfig(c)) m[key] = value;
  return m;
}

TrainConfig With(std::vector<std::string> assignments) {
  TrainConfig c;
  for (const std::string& a : assignments) EXPECT_TRUE(ApplyOverride(c, a).ok()) << a;
  return c;
}

TEST(ResumeConflictsTest, TheSameSettingsContinue) {
  const TrainConfig c = With({"data.mask_prob=0.2", "policy.alpha=0.3"});
  EXPECT_TRUE(ResumeConflicts(Saved(c), c).empty());
}

TEST(ResumeConflictsTest, SettingsThatShapeTrainingAreNamedWithBothValues) {
  const TrainConfig saved = With({"train.batch_size=16"});
  const TrainConfig now = With({"train.batch_size=32", "data.mask_prob=0.2", "policy.alpha=0.4",
                                "seed=3"});
  EXPECT_THAT(ResumeConflicts(Saved(saved), now),
              ElementsAre("seed: 1 -> 3", "data.mask_prob: 0.15 -> 0.2",
                          "train.batch_size: 16 -> 32", "policy.alpha: 0.3 -> 0.4"));
}

TEST(ResumeConflictsTest, LengthPlacesAndCadenceMayChange) {
  const TrainConfig saved;
  const TrainConfig now =
      With({"train.steps=99999", "data.dir=/elsewhere", "model.init_from=/a/model.safetensors",
            "policy.rand_schedule=/moved/decisions.jsonl",
            "train.eval_every=7", "train.checkpoint_every=3", "train.threads=1",
            "train.device=cuda", "train.deterministic=true"});
  EXPECT_TRUE(ResumeConflicts(Saved(saved), now).empty());
}

TEST(ResumeConflictsTest, EverySettingThatMayChangeIsAKey) {
  std::set<std::string> keys;
  for (const auto& [key, value] : ListConfig(TrainConfig{})) keys.insert(key);
  for (const std::string& key : SettingsThatMayChangeOnResume()) EXPECT_EQ(keys.count(key), 1u) << key;
}

TEST(ResumeConflictsTest, AKeyTheCheckpointPredatesIsNotCompared) {
  std::map<std::string, std::string> saved = Saved(TrainConfig{});
  saved.erase("policy.backward");
  EXPECT_TRUE(ResumeConflicts(saved, With({"policy.backward=detach"})).empty());
}

}  // namespace
}  // namespace mat::config
