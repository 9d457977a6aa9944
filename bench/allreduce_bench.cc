// mat-bench-allreduce: gradient all-reduce bytes and time per step at 100 % and 50 % active heads,
// two ranks over a real ProcessGroupGloo on loopback (two threads of this process), on the tiny
// and the default BERT configs. Each rank runs a real forward/backward under the mask, so only
// the active modules have gradients, then GradientSync::AllReduce; the bytes are what the
// buckets actually carried (GradSyncStats), the time is the AllReduce call, median of --reps.
//
//   mat-bench-allreduce --root . --out bench/results/allreduce-bytes.json [--reps N]
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <thread>

#include "CLI/CLI.hpp"
#include "common/allocator.h"
#include "common/net_util.h"
#include "nlohmann/json.hpp"
#include "trainer/models/bert.h"
#include "trainer/grad_sync.h"
#include "trainer/optim/optimizer.h"
#include "trainer/trainer.h"

namespace mat::bench {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Measured {
  int64_t bytes_per_step = 0;
  int64_t module_bytes_per_step = 0;  // the part that belongs to modules
  int64_t skipped_bytes_per_step = 0;
  double seconds = 0;
  int active = 0;
};

// Both ranks; returns rank 0's figures per mask.
std::vector<Measured> Run(const config::TrainConfig& tc, const std::vector<double>& fractions,
                          int reps) {
  const int port = common::PickFreePort().value_or(29500);
  std::vector<Measured> result(fractions.size());
  auto rank_main = [&](int rank) {
    torch::set_num_threads(1);
    trainer::BertConfig c = trainer::MakeBertConfig(tc, 33279);
    torch::manual_seed(0);
    trainer::BertMlm model(c);
    model->train();
    spectral::ModulePartition partition = model->Partition();
    std::vector<trainer::ParamEntry> params = trainer::BuildParamEntries(*model, partition);
    trainer::RendezvousOptions o;
    o.master_host = "127.0.0.1";
    o.master_port = port;
    o.local_host = "127.0.0.1";
    o.rank = rank;
    o.world_size = 2;
    o.prefix = "bench";
    auto group = trainer::ConnectProcessGroup(o);
    if (!group.ok()) {
      std::cerr << group.status() << "\n";
      std::exit(1);
    }
    trainer::GradientSync sync(*group, params);
    const int64_t B = 4, T = tc.data.seq_len;
    for (size_t k = 0; k < fractions.size(); ++k) {
      std::vector<uint8_t> active(partition.size(), 1);
      for (int m = 0; m < partition.size(); ++m) {
        const auto& mod = partition.modules[m];
        if (mod.group == "heads") {
          const int heads = partition.GroupSize("heads") / c.layers;
          active[m] = mod.index < int(fractions[k] * heads + 0.5) ? 1 : 0;
        }
      }
      std::vector<double> times;
      const trainer::GradSyncStats before = sync.stats();
      for (int r = 0; r < reps; ++r) {
        model->SetMask(active);
        torch::Tensor ids = torch::randint(0, c.vocab_size - 1, {B, T}, torch::kLong);
        torch::Tensor positions = torch::arange(0, B * T, 7, torch::kLong);
        torch::Tensor labels = torch::randint(0, c.vocab_size - 1, {positions.size(0)}, torch::kLong);
        torch::nn::functional::cross_entropy(model->forward(ids, positions), labels).backward();
        const auto t0 = std::chrono::steady_clock::now();
        absl::StatusOr<int> s = sync.AllReduce(active, true);
        times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        if (!s.ok()) {
          std::cerr << s.status() << "\n";
          std::exit(1);
        }
        for (auto& p : model->parameters()) p.mutable_grad().reset();
      }
      if (rank == 0) {
        Measured& m = result[k];
        m.bytes_per_step = (sync.stats().bytes_reduced - before.bytes_reduced) / reps;
        m.skipped_bytes_per_step = (sync.stats().bytes_skipped - before.bytes_skipped) / reps;
        int64_t module_bytes = 0;
        for (const auto& p : params) {
          const int64_t row = p.param.dim() == 0 ? 1 : p.param.numel() / p.param.size(0);
          for (const trainer::ParamSegment& seg : p.Segments()) {
            if (seg.module >= 0 && active[seg.module]) module_bytes += (seg.end - seg.begin) * row * 4;
          }
        }
        m.module_bytes_per_step = module_bytes;
        m.seconds = Median(times);
        for (uint8_t a : active) m.active += a;
      }
    }
  };
  std::thread other(rank_main, 1);
  rank_main(0);
  other.join();
  return result;
}

}  // namespace
}  // namespace mat::bench

int main(int argc, char** argv) {
  std::string root = ".", out;
  int reps = 5;
  CLI::App app{"mat-bench-allreduce: all-reduce bytes per step at 100 % and 50 % active heads"};
  app.add_option("--root", root, "repository root (for examples/)");
  app.add_option("--out", out, "write the results JSON here");
  app.add_option("--reps", reps, "steps per mask")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  mat::common::ConfigureAllocatorForTraining();
  nlohmann::json result = {{"bench", "allreduce-bytes"},
                           {"ranks", 2},
                           {"transport", "ProcessGroupGloo over loopback TCP (two threads)"},
                           {"reps", reps}};
  for (const char* name : {"tiny", "default"}) {
    const std::string path = root + (std::string(name) == "tiny" ? "/examples/bert-wikitext2-tiny.yaml"
                                                                  : "/examples/bert-wikitext2.yaml");
    auto tc = mat::config::LoadTrainConfig(path);
    if (!tc.ok()) {
      std::cerr << tc.status() << "\n";
      return 1;
    }
    auto m = mat::bench::Run(*tc, {1.0, 0.5}, reps);
    nlohmann::json r = {
        {"config", path.substr(root.size() + 1)},
        {"bytes_100", m[0].bytes_per_step},
        {"bytes_50", m[1].bytes_per_step},
        {"ratio_50", double(m[1].bytes_per_step) / double(m[0].bytes_per_step)},
        {"module_bytes_100", m[0].module_bytes_per_step},
        {"module_bytes_50", m[1].module_bytes_per_step},
        {"module_ratio_50", m[0].module_bytes_per_step > 0
                                ? double(m[1].module_bytes_per_step) / double(m[0].module_bytes_per_step)
                                : 0.0},
        {"skipped_bytes_50", m[1].skipped_bytes_per_step},
        {"active_modules_100", m[0].active},
        {"active_modules_50", m[1].active},
        {"seconds_100", m[0].seconds},
        {"seconds_50", m[1].seconds},
        {"time_ratio_50", m[0].seconds > 0 ? m[1].seconds / m[0].seconds : 0.0},
    };
    result[name] = r;
    std::printf("%-8s bytes/step 100%% %10lld  50%% %10lld  ratio_50 %.3f  (module bytes ratio %.3f)"
                "  all-reduce %.1f ms -> %.1f ms\n",
                name, (long long)m[0].bytes_per_step, (long long)m[1].bytes_per_step,
                r["ratio_50"].get<double>(), r["module_ratio_50"].get<double>(),
                1e3 * m[0].seconds, 1e3 * m[1].seconds);
  }
  result["ratio_50"] = result["default"]["ratio_50"];
  if (!out.empty()) std::ofstream(out) << result.dump(2) << "\n";
  return 0;
}
