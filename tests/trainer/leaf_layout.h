// The tensors of a checkpoint or model file as the per-module leaf layout (before the view
// layout of trainer/models/bert.h) named and shaped them, made from this layout's: for tests of
// UpgradeLeafLayout and of resuming such a checkpoint.
#pragma once

#include <map>
#include <string>

#include <torch/torch.h>

#include "trainer/models/bert.h"

namespace mat::trainer::testing {

// The tensors of the leaf layout from this layout's (the inverse of UpgradeLeafLayout, written
// out here as the old names were) under the prefixes "model." (values), "opt.m.", "opt.v."
// (AdamW moments) and "opt.step." (each head's or slice's update count repeated for each of its
// old leaves), those present in `now`.
inline std::map<std::string, torch::Tensor> ToLeafLayout(const BertConfig& c,
                                                  const std::map<std::string, torch::Tensor>& now) {
  std::map<std::string, torch::Tensor> old = now;
  const int64_t dh = c.d_model / c.heads, G = std::max<int64_t>(c.ffn_groups, 1),
                f = c.d_ff / G;
  for (const std::string p : {"model.", "opt.m.", "opt.v.", "opt.step."}) {
    const bool steps = p == "opt.step.";
    if (old.count(p + "layer0.wqkv") == 0) continue;  // e.g. a model file: no optimizer state
    for (int64_t l = 0; l < c.layers; ++l) {
      const std::string L = p + "layer" + std::to_string(l) + ".";
      const torch::Tensor qkv = old.at(L + "wqkv"), b = old.at(L + "bqkv"), o = old.at(L + "wo_t");
      for (int64_t h = 0; h < c.heads; ++h) {
        const char* comp[3] = {"q", "k", "v"};
        for (int k = 0; k < 3; ++k) {
          const std::string n = std::string(comp[k]) + std::to_string(h);
          old[L + "w" + n] = steps ? qkv[h].clone() : qkv.narrow(0, 3 * dh * h + dh * k, dh).clone();
          old[L + "b" + n] = steps ? b[h].clone() : b.narrow(0, 3 * dh * h + dh * k, dh).clone();
        }
        old[L + "wo" + std::to_string(h)] = steps ? o[h].clone() : o.narrow(0, dh * h, dh).t().contiguous();
      }
      if (IsSwitchLayer(c, l)) {  // experts: row e of moe.w1 ... is "moe.expert<e>_w1" ...
        for (const std::string part : {"w1", "b1", "w2", "b2"}) {
          const torch::Tensor t = old.at(L + "moe." + part);
          for (int64_t e = 0; e < c.experts; ++e) old[L + "moe.expert" + std::to_string(e) + "_" + part] = t[e].clone();
          old.erase(L + "moe." + part);
        }
        for (const char* n : {"wqkv", "bqkv", "wo_t"}) old.erase(L + n);
        continue;
      }
      const torch::Tensor w1 = old.at(L + "wff1"), b1 = old.at(L + "bff1"), w2 = old.at(L + "wff2_t");
      for (int64_t g = 0; g < G; ++g) {
        const std::string n = std::to_string(g);
        const bool one = steps && c.ffn_groups == 0;  // an unsplit FFN: one 0-dim count
        old[L + "wff1_" + n] = one ? w1.clone() : steps ? w1[g].clone() : w1.narrow(0, f * g, f).clone();
        old[L + "bff1_" + n] = one ? b1.clone() : steps ? b1[g].clone() : b1.narrow(0, f * g, f).clone();
        old[L + "wff2_" + n] =
            one ? w2.clone() : steps ? w2[g].clone() : w2.narrow(0, f * g, f).t().contiguous();
      }
      for (const char* n : {"wqkv", "bqkv", "wo_t", "wff1", "bff1", "wff2_t"}) old.erase(L + n);
    }
  }
  return old;
}

}  // namespace mat::trainer::testing
