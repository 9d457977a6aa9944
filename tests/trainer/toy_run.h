// A toy corpus, small training configs, a pair of identical toy BERTs with one batch (tests that
// compare two ways of running the same model: autocast_test, cuda_test), a BERT with its masked
// optimizer (masking tests), a whole in-memory run (RunToEnd) and a JSON-lines reader (the
// trainer's logs).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "spectral/estimator.h"
#include "trainer/models/bert.h"
#include "trainer/optim/optimizer.h"
#include "config/train_config.h"
#include "trainer/trainer.h"

namespace mat::trainer::testing {

// train/valid/test.txt of 300 lines of 12 words from a 40-word vocabulary under the temp dir
// (`name` and the pid keep concurrent tests apart); returns the folder.
inline std::string WriteToyCorpus(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("mat_" + name + "_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  for (const char* split : {"train", "valid", "test"}) {
    std::ofstream out(dir / (std::string(split) + ".txt"));
    for (int l = 0; l < 300; ++l) {
      for (int w = 0; w < 12; ++w) out << "w" << (l * 7 + w * 3) % 40 << ' ';
      out << "\n";
    }
  }
  return dir.string();
}

// One layer of 32 units, 4 heads, sequences of 16, batches of 8, probes of 4 samples.
inline config::TrainConfig ToyConfig(const std::string& data_dir) {
  config::TrainConfig c;
  c.model.layers = 1;
  c.model.d_model = 32;
  c.model.heads = 4;
  c.model.d_ff = 64;
  c.model.max_seq_len = 16;
  c.data.dir = data_dir;
  c.data.seq_len = 16;
  c.train.batch_size = 8;
  c.train.eval_batches = 2;
  c.policy.probe_samples = 4;
  return c;
}

// Two layers of 16 units, 4 heads, 2 FFN groups, 40 steps of 8 sequences of 16, evaluations every
// 10 steps, the policy `kind` probing every 5 steps after a 10-step warm-up.
inline config::TrainConfig TinyTrainConfig(const std::string& data, const std::string& kind) {
  config::TrainConfig c;
  c.seed = 5;
  c.model.layers = 2;
  c.model.d_model = 16;
  c.model.heads = 4;
  c.model.d_ff = 32;
  c.model.ffn_groups = 2;
  c.model.max_seq_len = 16;
  c.data.dir = data;
  c.data.seq_len = 16;
  c.train.steps = 40;
  c.train.batch_size = 8;
  c.train.lr = 3e-3;
  c.train.warmup_steps = 5;
  c.train.eval_every = 10;
  c.train.eval_batches = 2;
  c.train.threads = 1;
  c.policy.kind = kind;
  c.policy.warmup_steps = 10;
  c.policy.probe_every = 5;
  c.policy.probe_samples = 4;
  return c;
}

// Runs `c` to its last step in memory (no output folder); returns the parameter checksum and
// stores the summary in *summary ("" and a failed expectation when creation or the run fails).
inline std::string RunToEnd(const config::TrainConfig& c, nlohmann::json* summary) {
  auto t = Trainer::Create(c, {"", false, false});
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return "";
  auto s = (*t)->Run();
  EXPECT_TRUE(s.ok()) << s.status();
  if (s.ok()) *summary = *s;
  return (*t)->ParamChecksum();
}

// One JSON value per line of `path` (metrics.jsonl, decisions.jsonl).
inline std::vector<nlohmann::json> ReadJsonLines(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

// A BERT of `c` (seed 7, training mode), its partition and a MaskedAdamW over it.
// Two layers of 16 units, 4 heads, 2 FFN slices, no dropout, a vocabulary of 40 and 8
// positions: the BERT of the masking tests (12 modules: 8 heads, then 4 FFN slices).
inline BertConfig MaskingTestConfig() {
  BertConfig c;
  c.vocab_size = 40;
  c.max_seq_len = 8;
  c.layers = 2;
  c.d_model = 16;
  c.heads = 4;
  c.d_ff = 32;
  c.ffn_groups = 2;
  c.dropout = 0;
  return c;
}

struct Net {
  BertMlm model{nullptr};
  std::unique_ptr<MaskedAdamW> opt;
  spectral::ModulePartition partition;
};

inline Net MakeNet(const BertConfig& c) {
  torch::manual_seed(7);
  Net n;
  n.model = BertMlm(c);
  n.model->train();
  n.partition = n.model->Partition();
  n.opt = std::make_unique<MaskedAdamW>(BuildParamEntries(*n.model, n.partition), AdamWOptions{});
  return n;
}

// Two BERTs (2 layers of 32, 4 heads, 2 FFN groups, vocabulary 50, no dropout) with the same
// weights (seeded by `seed`), and one batch: ids [6, 16], every 5th position masked, labels.
// After a backward of `masked` under `mask` and of `ref` with every module on (the same model
// and batch): each slice of a masked-off module has no gradient or a zero one (not computed);
// each slice of an active one has `ref`'s gradient within `rel` (relative, floor 1e-3). Returns
// the slices checked: {masked off, active}.
inline std::pair<int, int> ExpectModuleGradients(const spectral::ModulePartition& masked,
                                                 const spectral::ModulePartition& ref,
                                                 const std::vector<uint8_t>& mask, double rel) {
  int off = 0, on = 0;
  for (int m = 0; m < masked.size(); ++m) {
    for (size_t k = 0; k < masked.modules[m].params.size(); ++k) {
      SCOPED_TRACE(masked.modules[m].name + " slice " + std::to_string(k));
      const torch::Tensor g = masked.modules[m].params[k].grad();
      if (!mask[m]) {
        EXPECT_TRUE(!g.defined() || g.abs().max().item<double>() == 0.0)
            << "a masked-off module's gradient was computed";
        ++off;
        continue;
      }
      EXPECT_TRUE(g.defined()) << "an active module has a gradient";
      if (!g.defined()) continue;
      const torch::Tensor r = ref.modules[m].params[k].grad();
      EXPECT_LE((g - r).norm().item<double>() / std::max(r.norm().item<double>(), 1e-3), rel);
      ++on;
    }
  }
  return {off, on};
}

struct ModelPair {
  BertConfig config;
  BertMlm a{nullptr}, b{nullptr};
  torch::Tensor ids, positions, labels;
};

inline ModelPair MakeModelPair(uint64_t seed) {
  ModelPair p;
  BertConfig& c = p.config;
  c.vocab_size = 50;
  c.max_seq_len = 16;
  c.layers = 2;
  c.d_model = 32;
  c.heads = 4;
  c.d_ff = 64;
  c.ffn_groups = 2;
  c.dropout = 0;
  torch::manual_seed(seed);
  p.a = BertMlm(c);
  p.b = BertMlm(c);
  {
    torch::NoGradGuard g;
    auto src = p.a->named_parameters();
    for (auto& kv : p.b->named_parameters()) kv.value().copy_(src[kv.key()]);
  }
  p.ids = torch::randint(0, 50, {6, 16}, torch::kLong);
  p.positions = torch::arange(0, 96, 5, torch::kLong);
  p.labels = torch::randint(0, 50, {p.positions.size(0)}, torch::kLong);
  return p;
}

}  // namespace mat::trainer::testing
