// What a resumed run may change (mat-train --resume, a worker restarting a job's rank): the
// settings a checkpoint was written under, against the settings of the run that loads it.
// Library mat_config: no LibTorch and no gRPC.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "config/train_config.h"

namespace mat::config {

// The settings in which `now` differs from the run whose checkpoint it resumes (`saved` maps
// ListConfig keys to their values then), each as "key: SAVED -> NOW", in ListConfig's order;
// empty when the run may continue. May differ: train.steps (a run continued past its end, its
// learning-rate schedule stretched to the new end) and what does not shape training: where the
// data, the initial weights and a replayed schedule are read from (data.dir, model.init_from,
// policy.rand_schedule: paths, not what the files hold), how often to evaluate
// and checkpoint, threads, device and deterministic kernels. Every other key, from the model and
// data to the optimizer and the policy, must match. A key `saved` lacks (one added to the
// configuration after the checkpoint was written) is not compared.
std::vector<std::string> ResumeConflicts(const std::map<std::string, std::string>& saved,
                                         const TrainConfig& now);
// The ListConfig keys that may differ, as above.
const std::set<std::string>& SettingsThatMayChangeOnResume();

}  // namespace mat::config
