// Module partitions: which parameters make up each switchable module of a model.
//
// A model declares its modules as data. A module owns row ranges of leaf parameter tensors: the
// rows [begin, end) of a leaf's leading axis (a view, sharing storage with the model). A layer
// stores each projection as one leaf and its modules as row ranges of it (trainer/models/bert.h:
// the heads of a layer are row blocks of its QKV weight); a module may also own a whole leaf
// (the range [0, size(0))), as the leaf layout of VGG's filter groups and Switch's experts does.
// The ranges of different modules never overlap.
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

namespace mat::spectral {

// Rows [begin, end) of `param`'s leading axis. A 0-dim tensor is one row.
struct ParamSlice {
  ParamSlice() = default;
  // The whole tensor.
  ParamSlice(torch::Tensor p);  // NOLINT(google-explicit-constructor): a leaf is its own slice
  ParamSlice(torch::Tensor p, int64_t b, int64_t e) : param(std::move(p)), begin(b), end(e) {}
  // Row `index` of a leaf that stacks one tensor per module along its leading axis (Switch's
  // experts: w1 [E, d_ff, d_model], b1 [E, d_ff]): the module's own tensor is param[index], so
  // per-tensor rules (weight decay on matrices only) look at that shape, not the stack's.
  static ParamSlice Stacked(torch::Tensor p, int64_t index) {
    ParamSlice s(std::move(p), index, index + 1);
    s.stacked = true;
    return s;
  }

  torch::Tensor param;  // the leaf (shared storage with the model)
  int64_t begin = 0;
  int64_t end = 0;
  bool stacked = false;  // see Stacked

  bool whole() const;
  // The module's part of the leaf: param.narrow(0, begin, end - begin) (param itself if whole).
  torch::Tensor value() const;
  // The same rows of param.grad(); undefined when the leaf has no gradient.
  torch::Tensor grad() const;
  int64_t numel() const;
};

struct ModuleSpec {
  std::string group;                // "heads" | "ffn" | "experts" | "filters"
  int layer = 0;                    // layer index within the model
  int index = 0;                    // index within (layer, group)
  std::string name;                 // unique, e.g. "layer0.head3"
  std::vector<ParamSlice> params;   // its rows of the model's leaves

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
