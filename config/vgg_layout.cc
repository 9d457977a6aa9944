#include "config/vgg_layout.h"

#include <algorithm>
#include <cmath>

namespace mat::config {

const std::vector<int64_t>& VggLayout(const std::string& arch) {
  static const std::vector<int64_t> kA = {64,  kVggPool, 128, kVggPool, 256, 256,      kVggPool,
                                          512, 512,      kVggPool, 512, 512, kVggPool};
  static const std::vector<int64_t> kD = {64,  64,  kVggPool, 128, 128, kVggPool, 256,
                                          256, 256, kVggPool, 512, 512, 512, kVggPool,
                                          512, 512, 512, kVggPool};
  return arch == "vgg16" ? kD : kA;
}

double VggScaledChannels(int64_t channels, double width) {
  return std::max(1.0, std::round(static_cast<double>(channels) * width));
}

}  // namespace mat::config
