// One parameter split into module row segments (the view layout) next to the same rows as
// separate leaves (the leaf layout), for the masked optimizers' tests: both get the same
// gradients, and the split tensor's masked rows get NaN, which an update that read them would
// spread into its rows.
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "trainer/optim/optimizer.h"

namespace mat::trainer::testing {

struct SplitCase {
  // Rows of W [8, 8]: module 0 [0, 2), module 1 [2, 5), always trained [5, 6), module 2 [6, 8).
  std::vector<ParamSegment> segments = {{0, 2, 0}, {2, 5, 1}, {5, 6, -1}, {6, 8, 2}};
  torch::Tensor split;                 // W [8, 8]
  std::vector<torch::Tensor> leaves;   // one per segment, equal to its rows of W
  std::vector<ParamEntry> split_entries, leaf_entries;

  SplitCase() {
    torch::manual_seed(5);
    torch::Tensor init = torch::randn({8, 8});
    split = init.clone().requires_grad_(true);
    split_entries.push_back({"w", split, -1, true, segments});
    for (size_t s = 0; s < segments.size(); ++s) {
      const ParamSegment& seg = segments[s];
      leaves.push_back(init.narrow(0, seg.begin, seg.end - seg.begin).clone().requires_grad_(true));
      leaf_entries.push_back({"l" + std::to_string(s), leaves.back(), seg.module, true, {}});
    }
  }

  // Gradients for one step: the same rows for both layouts; the split tensor's masked rows NaN.
  void SetGradients(const std::vector<uint8_t>& active) {
    torch::Tensor g = torch::randn({8, 8});
    torch::Tensor split_grad = g.clone();
    for (size_t s = 0; s < segments.size(); ++s) {
      const ParamSegment& seg = segments[s];
      const bool on = seg.module < 0 || active[seg.module];
      torch::Tensor rows = g.narrow(0, seg.begin, seg.end - seg.begin);
      if (on) {
        leaves[s].mutable_grad() = rows.clone();
      } else {
        split_grad.narrow(0, seg.begin, seg.end - seg.begin).fill_(NAN);
      }
    }
    split.mutable_grad() = split_grad;
  }

  torch::Tensor Rows(const torch::Tensor& t, size_t s) const {
    return t.detach().narrow(0, segments[s].begin, segments[s].end - segments[s].begin);
  }
};

// Masks of the three modules over eight steps (every module off at least once, two at once).
inline std::vector<std::vector<uint8_t>> SplitCaseMasks() {
  return {{1, 1, 1}, {1, 0, 1}, {0, 0, 1}, {1, 1, 0}, {0, 1, 0}, {1, 1, 1}, {1, 0, 1}, {1, 1, 1}};
}

}  // namespace mat::trainer::testing
