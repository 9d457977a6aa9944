// A toy corpus, a one-layer training config, and a pair of identical toy BERTs with one batch,
// for tests that compare two ways of running the same model (autocast_test, cuda_test).
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "worker/bert.h"
#include "worker/train_config.h"

namespace mat::worker::testing {

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
inline TrainConfig ToyConfig(const std::string& data_dir) {
  TrainConfig c;
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

// Two BERTs (2 layers of 32, 4 heads, 2 FFN groups, vocabulary 50, no dropout) with the same
// weights (seeded by `seed`), and one batch: ids [6, 16], every 5th position masked, labels.
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

}  // namespace mat::worker::testing
