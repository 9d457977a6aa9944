// VGG's layer table (Simonyan & Zisserman, configurations A and D), defined once: the trainer's
// model (trainer/models/vgg.h) builds from it, and the checks and estimates that run without LibTorch
// (ValidateTrainConfig, the coordinator's model-size limit) read it.
//
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mat::config {

// A 2x2 max-pool in VggLayout.
inline constexpr int64_t kVggPool = -1;

// The nominal conv channels in order, kVggPool for each max-pool: configuration D for "vgg16",
// A (vgg11) for anything else (ValidateTrainConfig admits only those two).
const std::vector<int64_t>& VggLayout(const std::string& arch);

// Channels of a layer of nominal width `channels` at model.width `width`:
// max(1, round(channels · width)), computed in double so that an absurd width cannot overflow.
double VggScaledChannels(int64_t channels, double width);

}  // namespace mat::config
