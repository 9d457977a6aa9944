// A toy corpus and a one-layer BERT config for trainer tests that need a real run but not
// real data (autocast_test, cuda_test).
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

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

}  // namespace mat::worker::testing
