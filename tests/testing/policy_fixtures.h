// Fixtures of the coordinator's policy-facing tests (tests/coordinator/): a 10-module job and
// λ reports that make the MAT thresholds switch modules on and off.
#pragma once

#include <string>
#include <vector>

#include "policy/policy.h"

namespace mat::tests {

// 2 layers × 5 heads: 10 modules, so masks take two bytes.
inline std::vector<policy::ModuleInfo> Modules() {
  std::vector<policy::ModuleInfo> out;
  for (int layer = 0; layer < 2; ++layer) {
    for (int head = 0; head < 5; ++head) {
      out.push_back({"heads", layer, head,
                     "layer" + std::to_string(layer) + ".head" + std::to_string(head)});
    }
  }
  return out;
}

// λ of `rank` at probe number `k`: distinct, spread values, so the MAT thresholds switch modules
// on and off.
inline std::vector<double> Lambda(int rank, int k) {
  std::vector<double> out;
  for (int i = 0; i < 10; ++i) {
    out.push_back(0.1 * (i + 1) * (1 + 0.37 * rank) + 0.013 * k * ((i * 7 + k) % 5) +
                  (i == k % 10 ? 2.5 : 0.0));
  }
  return out;
}

}  // namespace mat::tests
