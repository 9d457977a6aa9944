#include "config/resume.h"

#include "absl/strings/str_cat.h"

namespace mat::config {

const std::set<std::string>& SettingsThatMayChangeOnResume() {
  static const std::set<std::string> kMayChange = {
      "train.steps",      "data.dir",               "model.init_from", "policy.rand_schedule",
      "train.eval_every", "train.checkpoint_every", "train.threads",   "train.device",
      "train.deterministic"};
  return kMayChange;
}

std::vector<std::string> ResumeConflicts(const std::map<std::string, std::string>& saved,
                                         const TrainConfig& now) {
  const std::set<std::string>& may_change = SettingsThatMayChangeOnResume();
  std::vector<std::string> out;
  for (const auto& [key, value] : ListConfig(now)) {
    const auto it = saved.find(key);
    if (it == saved.end() || it->second == value || may_change.count(key) > 0) continue;
    out.push_back(absl::StrCat(key, ": ", it->second, " -> ", value));
  }
  return out;
}

}  // namespace mat::config
