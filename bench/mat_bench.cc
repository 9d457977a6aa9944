// mat-bench: micro-benchmarks of the one-process trainer. `bench/run NAME` calls this.
//
//   masked-backward  backward (and whole-step) time with 100 %, 50 %, 25 % of heads active, on
//                    the tiny and the default BERT; configurations interleaved round-robin in one
//                    process, median of the repeats, ratios to 100 %.
//   spectral-cost    the gram probe's cost as a fraction of training time at the default
//                    settings (probe_samples every probe_every steps), probe and steps measured
//                    side by side on the real data.
//
// Figures are ratios measured in one run; absolute times are printed for context only.
#include <algorithm>
#include <thread>
#include <tuple>
#include <chrono>
#include <fstream>
#include <iostream>

#include "CLI/CLI.hpp"
#include "torch/version.h"
#if TORCH_VERSION_MAJOR < 2
#include "torch/csrc/autograd/profiler_legacy.h"
#define MAT_BENCH_PROFILE 1
#endif
#include "common/file_util.h"
#include "common/allocator.h"
#include "common/logging.h"
#include "nlohmann/json.hpp"
#include "worker/bert.h"
#include "worker/flops.h"
#include "worker/optimizer.h"
#include "worker/train_config.h"
#include "worker/trainer.h"

namespace mat::bench {
namespace {

using Clock = std::chrono::steady_clock;
std::string g_profile_path;  // --profile: chrome trace of one full-mask step per model
std::string g_device = "cpu";  // --device
std::string g_data_dir;        // --data-dir: overrides the examples' data.dir

// Waits for the device's queued work (a host copy of a scalar is stream-ordered).
void Sync(const torch::Device& d) {
  if (d.is_cuda()) torch::zeros({1}, torch::TensorOptions().device(d)).item<float>();
}
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}
double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// A random masked-LM batch of the benchmarks' shape: ids [B, T], 15 % of the positions sorted,
// random labels; on `dev`.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> RandomMlmBatch(
    const worker::BertConfig& c, int64_t B, int64_t T, const torch::Device& dev) {
  torch::Tensor ids = torch::randint(0, c.vocab_size - 1, {B, T}, torch::kLong).to(dev);
  torch::Tensor positions =
      std::get<0>(torch::randperm(B * T, torch::kLong).slice(0, 0, B * T * 15 / 100).sort()).to(dev);
  torch::Tensor labels =
      torch::randint(0, c.vocab_size - 1, {positions.size(0)}, torch::kLong).to(dev);
  return {ids, positions, labels};
}

// Heads active per layer: the first `fraction` of each layer's heads (FFN slices, if any, on).
std::vector<uint8_t> HeadMask(const worker::BertConfig& c, double fraction) {
  std::vector<uint8_t> m(c.layers * (c.heads + c.ffn_groups), 1);
  std::fill(m.begin(), m.begin() + c.layers * c.heads, 0);
  int64_t on = std::max<int64_t>(1, int64_t(c.heads * fraction + 0.5));
  for (int64_t l = 0; l < c.layers; ++l)
    for (int64_t h = 0; h < on; ++h) m[l * c.heads + h] = 1;
  return m;
}

nlohmann::json MaskedBackwardFor(const std::string& name, const worker::TrainConfig& tc, int reps) {
  worker::BertConfig c = worker::MakeBertConfig(tc, 33279);  // WikiText-2 + [MASK]
  torch::manual_seed(0);
  const torch::Device dev(g_device);
  worker::BertMlm model(c);
  model->to(dev);
  model->train();
  const int64_t B = tc.train.batch_size, T = tc.data.seq_len;
  torch::Tensor ids, positions, labels;
  std::tie(ids, positions, labels) = RandomMlmBatch(c, B, T, dev);
  const std::vector<double> fractions = {1.0, 0.5, 0.25};
  std::vector<std::vector<double>> bwd(fractions.size()), step(fractions.size());
  auto run = [&](size_t k) {
    model->SetMask(HeadMask(c, fractions[k]));
    Sync(dev);
    auto t0 = Clock::now();
    torch::Tensor loss = torch::nn::functional::cross_entropy(model->forward(ids, positions), labels);
    Sync(dev);
    auto t1 = Clock::now();
    loss.backward();
    Sync(dev);
    auto t2 = Clock::now();
    for (auto& p : model->parameters()) p.mutable_grad().reset();
    bwd[k].push_back(Seconds(t1, t2));
    step[k].push_back(Seconds(t0, t2));
  };
  for (size_t k = 0; k < fractions.size(); ++k) run(k);  // warm-up, discarded
  for (auto& v : bwd) v.clear();
  for (auto& v : step) v.clear();
  for (int r = 0; r < reps; ++r)
    for (size_t k = 0; k < fractions.size(); ++k) run(k);
#ifdef MAT_BENCH_PROFILE
  if (!g_profile_path.empty()) {
    torch::autograd::profiler::RecordProfile guard(g_profile_path + "." + name + ".json");
    run(0);
  }
#endif
  nlohmann::json out = {{"model", name}, {"device", g_device}, {"layers", c.layers}, {"d_model", c.d_model},
                        {"heads", c.heads}, {"batch", B}, {"seq_len", T}, {"reps", reps}};
  const int64_t M = positions.size(0);
  const double full_bwd_flops = [&] {
    auto f = worker::BertStepFlops(c, B, T, M, {});
    return f.activation_grad + f.weight_grad;
  }();
  for (size_t k = 0; k < fractions.size(); ++k) {
    auto f = worker::BertStepFlops(c, B, T, M, HeadMask(c, fractions[k]));
    std::string tag = std::to_string(int(fractions[k] * 100));
    out["backward_seconds_" + tag] = Median(bwd[k]);
    out["fwd_bwd_seconds_" + tag] = Median(step[k]);
    out["ratio_" + tag] = Median(bwd[k]) / Median(bwd[0]);
    out["fwd_bwd_ratio_" + tag] = Median(step[k]) / Median(step[0]);
    out["flop_ratio_backward_" + tag] = (f.activation_grad + f.weight_grad) / full_bwd_flops;
  }
  return out;
}

absl::StatusOr<worker::TrainConfig> Config(const std::string& path) {
  auto c = worker::LoadTrainConfig(path);
  if (!c.ok()) return c.status();
  if (!g_data_dir.empty()) c->data.dir = g_data_dir;
  return c;
}

int MaskedBackward(const std::string& root, int reps, nlohmann::json& result) {
  auto tiny = Config(root + "/examples/bert-wikitext2-tiny.yaml");
  auto def = Config(root + "/examples/bert-wikitext2.yaml");
  if (!tiny.ok() || !def.ok()) {
    std::cerr << "mat-bench: " << (tiny.ok() ? def.status() : tiny.status()) << "\n";
    return 2;
  }
  nlohmann::json tiny_r = MaskedBackwardFor("tiny", *tiny, reps);
  nlohmann::json def_r = MaskedBackwardFor("default", *def, reps);
  result = {{"benchmark", "masked-backward"}, {"tiny", tiny_r}, {"default", def_r},
            {"ratio_50", def_r["ratio_50"]}, {"ratio_25", def_r["ratio_25"]}};
  std::printf("%-8s %-6s %12s %10s %12s %14s\n", "model", "heads", "backward_s", "ratio", "flop_ratio", "fwd+bwd ratio");
  for (const auto* r : {&tiny_r, &def_r}) {
    for (const char* tag : {"100", "50", "25"}) {
      std::printf("%-8s %5s%% %12.4f %10.3f %12.3f %14.3f\n", (*r)["model"].get<std::string>().c_str(), tag,
                  (*r)[std::string("backward_seconds_") + tag].get<double>(),
                  (*r)[std::string("ratio_") + tag].get<double>(),
                  (*r)[std::string("flop_ratio_backward_") + tag].get<double>(),
                  (*r)[std::string("fwd_bwd_ratio_") + tag].get<double>());
    }
  }
  return 0;
}

// One full training step (forward, backward, masked AdamW with every module on) of the default
// BERT on a random batch of the configured shape, median of `reps` — the figure bench/run
// step-vs-pytorch compares with the PyTorch peer's.
int Step(const std::string& root, int reps, nlohmann::json& result) {
  auto tc = Config(root + "/examples/bert-wikitext2.yaml");
  if (!tc.ok()) {
    std::cerr << "mat-bench: " << tc.status() << "\n";
    return 2;
  }
  worker::BertConfig c = worker::MakeBertConfig(*tc, 33279);
  torch::manual_seed(0);
  const torch::Device dev(g_device);
  worker::BertMlm model(c);
  model->to(dev);
  model->train();
  spectral::ModulePartition partition = model->Partition();
  worker::AdamWOptions ao;
  ao.weight_decay = tc->train.weight_decay;
  worker::MaskedAdamW opt(worker::BuildParamEntries(*model, partition), ao);
  const int64_t B = tc->train.batch_size, T = tc->data.seq_len;
  torch::Tensor ids, positions, labels;
  std::tie(ids, positions, labels) = RandomMlmBatch(c, B, T, dev);
  std::vector<uint8_t> all(partition.size(), 1);
  std::vector<double> ones(all.size(), 1.0);
  std::vector<double> times;
  double loss_value = 0;
  for (int r = -1; r < reps; ++r) {
    Sync(dev);
    auto t0 = Clock::now();
    model->SetMask(all);
    torch::Tensor loss = torch::nn::functional::cross_entropy(model->forward(ids, positions), labels);
    loss.backward();
    absl::Status s = opt.Step(1e-4, all, ones);
    Sync(dev);
    auto t1 = Clock::now();
    if (!s.ok()) {
      std::cerr << "mat-bench: " << s << "\n";
      return 1;
    }
    loss_value = loss.item<double>();
    if (r >= 0) times.push_back(Seconds(t0, t1));
  }
  auto f = worker::BertStepFlops(c, B, T, positions.size(0), {});
  const double step = Median(times);
  result = {{"benchmark", "step"}, {"device", g_device}, {"layers", c.layers},
            {"d_model", c.d_model}, {"heads", c.heads}, {"batch", B}, {"seq_len", T},
            {"reps", reps}, {"step_seconds_median", step}, {"flops_per_step", f.total()},
            {"achieved_flops_per_second", f.total() / step}, {"loss", loss_value}};
  std::printf("step %.4f s  %.2f GFLOP/s  loss %.3f\n", step, f.total() / step / 1e9, loss_value);
  return 0;
}

// The machine's float32 matmul peak through the BLAS LibTorch uses (torch::mm, square sizes),
// and the default BERT step's achieved FLOP/s as a fraction of the best size's figure.
int MatmulPeak(const std::string& root, int reps, nlohmann::json& result) {
  const torch::Device dev(g_device);
  nlohmann::json sizes = nlohmann::json::array();
  double best = 0;
  for (int64_t n : {512, 1024, 2048, 4096}) {
    torch::Tensor a = torch::randn({n, n}, torch::TensorOptions().device(dev));
    torch::Tensor b = torch::randn({n, n}, torch::TensorOptions().device(dev));
    std::vector<double> t;
    for (int r = -1; r < reps; ++r) {
      Sync(dev);
      auto t0 = Clock::now();
      torch::Tensor c = torch::mm(a, b);
      Sync(dev);
      if (r >= 0) t.push_back(Seconds(t0, Clock::now()));
    }
    double flops = 2.0 * n * n * n / Median(t);
    best = std::max(best, flops);
    sizes.push_back({{"n", n}, {"seconds_median", Median(t)}, {"flops_per_second", flops}});
    std::printf("sgemm %5lld^3  %8.2f GFLOP/s\n", (long long)n, flops / 1e9);
  }
  nlohmann::json step;
  if (int rc = Step(root, reps, step); rc != 0) return rc;
  const double achieved = step["achieved_flops_per_second"].get<double>();
  result = {{"benchmark", "matmul-peak"}, {"device", g_device}, {"sizes", sizes},
            {"peak_flops_per_second", best}, {"step", step},
            {"step_fraction_of_peak", achieved / best}, {"goal_fraction", 0.5}};
  std::printf("default BERT step: %.2f GFLOP/s = %.3f of the sgemm peak %.2f GFLOP/s\n",
              achieved / 1e9, achieved / best, best / 1e9);
  return 0;
}

int SpectralCost(const std::string& root, int reps, nlohmann::json& result) {
  auto c = Config(root + "/examples/bert-wikitext2.yaml");
  if (!c.ok()) {
    std::cerr << "mat-bench: " << c.status() << "\n";
    return 2;
  }
  c->policy.kind = "mat";
  c->train.device = g_device;
  auto t = worker::Trainer::Create(*c, {"", false, false});
  if (!t.ok()) {
    std::cerr << "mat-bench: " << t.status() << "\n";
    return 2;
  }
  auto& tr = **t;
  std::vector<uint8_t> all(tr.partition().size(), 1);
  std::vector<double> ones(all.size(), 1.0);
  std::vector<double> step_s, probe_s;
  for (int r = -1; r < reps; ++r) {  // r = -1: warm-up
    worker::MlmBatch batch = tr.train_stream().Next(c->train.batch_size);
    auto t0 = Clock::now();
    auto probe = tr.Probe(batch);
    auto t1 = Clock::now();
    auto loss = tr.TrainStep(batch, all, ones, 1e-4);
    auto t2 = Clock::now();
    if (!probe.ok() || !loss.ok()) {
      std::cerr << "mat-bench: " << (probe.ok() ? loss.status() : probe.status()) << "\n";
      return 1;
    }
    if (r >= 0) {
      probe_s.push_back(Seconds(t0, t1));
      step_s.push_back(Seconds(t1, t2));
    }
  }
  const double step = Median(step_s), probe = Median(probe_s);
  const double every = double(c->policy.probe_every);
  const double fraction = probe / (every * step + probe);
  result = {{"benchmark", "spectral-cost"},
            {"device", g_device},
            {"probe_samples", c->policy.probe_samples},
            {"probe_every", c->policy.probe_every},
            {"batch_size", c->train.batch_size},
            {"seq_len", c->data.seq_len},
            {"layers", c->model.layers},
            {"d_model", c->model.d_model},
            {"heads", c->model.heads},
            {"reps", reps},
            {"step_seconds_median", step},
            {"probe_seconds_median", probe},
            {"probe_over_step", probe / step},
            {"probe_fraction", fraction},
            {"goal_probe_fraction", 0.05}};
  std::printf("step %.4f s  probe %.4f s (n=%lld)  probe/step %.3f  probe_fraction (every %lld) %.4f\n",
              step, probe, (long long)c->policy.probe_samples, probe / step,
              (long long)c->policy.probe_every, fraction);
  return 0;
}

}  // namespace
}  // namespace mat::bench

int main(int argc, char** argv) {
  CLI::App app{"mat-bench: micro-benchmarks (masked-backward, spectral-cost, step)"};
  std::string name, root = ".", out;
  int reps = 10, threads = 0;
  app.add_option("name", name, "benchmark")->required()->check(CLI::IsMember({"masked-backward", "spectral-cost", "step", "matmul-peak"}));
  app.add_option("--root", root, "repository root (examples/ live there)");
  app.add_option("--reps", reps, "repeats per configuration");
  app.add_option("--out", out, "JSON result file");
  app.add_option("--device", mat::bench::g_device, "cpu | cuda | cuda:N");
  app.add_option("--threads", threads, "intra-op threads (0: all cores, as mat-train)");
  app.add_option("--data-dir", mat::bench::g_data_dir, "corpus folder (default: the examples' data.dir)");
  app.add_option("--profile", mat::bench::g_profile_path, "masked-backward: write a chrome trace of one step per model to PATH.<model>.json");
  CLI11_PARSE(app, argc, argv);
  mat::common::ConfigureAllocatorForTraining();
  mat::common::InitLogging("warn", false);
  // LibTorch's OpenMP default can be 1 thread here; use every core, as the trainer does.
  torch::set_num_threads(threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency())));
  nlohmann::json result;
  int rc = name == "masked-backward" ? mat::bench::MaskedBackward(root, reps, result)
           : name == "step"           ? mat::bench::Step(root, reps, result)
           : name == "matmul-peak"    ? mat::bench::MatmulPeak(root, reps, result)
                                      : mat::bench::SpectralCost(root, reps, result);
  if (rc != 0) return rc;
  result["threads"] = torch::get_num_threads();
  std::cout << result.dump(2) << std::endl;
  if (!out.empty()) {
    absl::Status s = mat::common::WriteFileAtomic(out, result.dump(2) + "\n");
    if (!s.ok()) {
      std::cerr << "mat-bench: " << s << "\n";
      return 1;
    }
  }
  return 0;
}
