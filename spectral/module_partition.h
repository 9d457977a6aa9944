// Module partitions: which parameter tensors make up each switchable module of a model.
//
// A model declares its modules as data. Every module owns whole leaf parameter tensors (the
// models in trainer/ store each head, FFN slice, expert or filter group as its own leaves), so a
// module's slice of a layer's weight is exactly its tensors.
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

namespace mat::spectral {

struct ModuleSpec {
  std::string group;                  // "heads" | "ffn" | "experts" | "filters"
  int layer = 0;                      // layer index within the model
  int index = 0;                      // index within (layer, group)
  std::string name;                   // unique, e.g. "layer0.head3"
  std::vector<torch::Tensor> params;  // leaf tensors (shared storage with the model)

  int64_t NumParams() const;
};

struct ModulePartition {
  std::vector<ModuleSpec> modules;

  int size() const { return static_cast<int>(modules.size()); }
  // Number of modules in `group`.
  int GroupSize(const std::string& group) const;
  int64_t NumParams() const;
};

}  // namespace mat::spectral
