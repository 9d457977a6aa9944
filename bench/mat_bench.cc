// mat-bench: micro-benchmarks of the one-process trainer. `bench/run NAME` calls this.
//
//   masked-backward  backward (and whole-step) time with 100 %, 50 %, 25 % of heads active, on
//                    the tiny and the default BERT, in both backward modes (weights, detach);
//                    configurations interleaved round-robin in one process, median of the
//                    repeats, ratios to the weights mode at 100 %.
//   spectral-cost    the gram probe's cost as a fraction of training time at the config's
//                    (--config, default the default BERT's) policy settings (probe_samples every
//                    probe_every steps), probe and steps measured side by side on the real data.
//   spectral-compare gram vs exact (loss kernel), lanczos vs exact-output (output kernel) and
//                    the kernels against each other on the same probe batches (tiny and
//                    default BERT trained with full masks on the real data, --reps probes
//                    --gap steps apart): Spearman ρ of the modules' λ_max, threshold decisions
//                    that differ at policy.alpha, relative errors, seconds per probe.
//   output-kernel    the paper's mNTK (every logit, brute-force Jacobians) at trained checkpoints
//                    of the tiny BERT with a capped vocabulary, against the shared-pass output
//                    estimator (exact and k = 4 projections) and the loss kernel (OutputKernel).
//   op-census        the ops one full step runs, per phase (forward, backward, optimizer), from
//                    the autograd profiler: calls and input elements by op name, to compare
//                    with the PyTorch peer's (bench/op_census.py). --probe: one λ probe
//                    against one training step instead. LibTorch 1.x only.
//
// Figures are ratios measured in one run; absolute times are printed for context only.
#include <algorithm>
#include <cmath>
#include <map>
#include <thread>
#include <tuple>
#include <chrono>
#include <fstream>
#include <functional>
#include <set>
#include <iostream>

#include "CLI/CLI.hpp"
#include "torch/version.h"
#if TORCH_VERSION_MAJOR < 2
#include "torch/csrc/autograd/profiler_legacy.h"
#define MAT_BENCH_PROFILE 1
#endif
#ifdef MAT_BENCH_KINETO
#include "torch/csrc/autograd/profiler_kineto.h"
#endif
#include "common/file_util.h"
#include "common/allocator.h"
#include "common/logging.h"
#include "nlohmann/json.hpp"
#include "trainer/models/autocast.h"
#include "spectral/estimator.h"
#include "trainer/models/bert.h"
#include "trainer/models/flops.h"
#include "trainer/optim/optimizer.h"
#include "config/train_config.h"
#include "trainer/trainer.h"

namespace mat::bench {
namespace {

using Clock = std::chrono::steady_clock;
std::string g_profile_path;  // --profile: chrome trace of one full-mask step per model
std::string g_device = "cpu";  // --device
std::string g_precision = "fp32";  // --precision: the step's forward under bf16 autocast or not
trainer::Precision Prec() {
  return g_precision == "bf16" ? trainer::Precision::kBFloat16 : trainer::Precision::kFloat32;
}
std::string g_data_dir;        // --data-dir: overrides the examples' data.dir
std::string g_step_config = "examples/bert-wikitext2.yaml";  // --config: step, matmul-peak
std::string g_trace_path;       // --trace: step's Kineto trace (CPU ops and CUDA kernels)
int64_t g_batch = 0;           // --batch: op-census's batch size (0: the config's)
int g_compare_gap = 20;        // --gap: spectral-compare's training steps between probes

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
    const trainer::BertConfig& c, int64_t B, int64_t T, const torch::Device& dev) {
  torch::Tensor ids = torch::randint(0, c.vocab_size - 1, {B, T}, torch::kLong).to(dev);
  torch::Tensor positions =
      std::get<0>(torch::randperm(B * T, torch::kLong).slice(0, 0, B * T * 15 / 100).sort()).to(dev);
  torch::Tensor labels =
      torch::randint(0, c.vocab_size - 1, {positions.size(0)}, torch::kLong).to(dev);
  return {ids, positions, labels};
}

// The masked-LM loss of one forward pass, under bf16 autocast when --precision bf16 (the
// backward then runs outside it, as in the trainer).
torch::Tensor MlmLoss(trainer::BertMlm& model, const torch::Tensor& ids, const torch::Tensor& positions,
                      const torch::Tensor& labels) {
  trainer::AutocastGuard autocast(ids.device(), Prec());
  return torch::nn::functional::cross_entropy(model->forward(ids, positions), labels);
}

// Heads active per layer: the first `fraction` of each layer's heads (FFN slices, if any, on).
std::vector<uint8_t> HeadMask(const trainer::BertConfig& c, double fraction) {
  std::vector<uint8_t> m(c.layers * (c.heads + c.ffn_groups), 1);
  std::fill(m.begin(), m.begin() + c.layers * c.heads, 0);
  int64_t on = std::max<int64_t>(1, int64_t(c.heads * fraction + 0.5));
  for (int64_t l = 0; l < c.layers; ++l)
    for (int64_t h = 0; h < on; ++h) m[l * c.heads + h] = 1;
  return m;
}

// Both backward modes (policy.backward) side by side: `weights` (a masked head still passes
// activation gradients) and `detach` (it is a constant in the backward), same weights, same
// batch, configurations interleaved; ratios to the weights mode at 100 %.
nlohmann::json MaskedBackwardFor(const std::string& name, const config::TrainConfig& tc, int reps) {
  trainer::BertConfig c = trainer::MakeBertConfig(tc, 33279);  // WikiText-2 + [MASK]
  const torch::Device dev(g_device);
  std::vector<trainer::BertMlm> models;
  for (bool detach : {false, true}) {
    trainer::BertConfig mc = c;
    mc.detach_masked = detach;
    torch::manual_seed(0);  // the same initial weights
    trainer::BertMlm model(mc);
    model->to(dev);
    model->train();
    models.push_back(model);
  }
  const int64_t B = tc.train.batch_size, T = tc.data.seq_len;
  torch::Tensor ids, positions, labels;
  std::tie(ids, positions, labels) = RandomMlmBatch(c, B, T, dev);
  const std::vector<double> fractions = {1.0, 0.5, 0.25};
  // [mode][fraction]
  std::vector<std::vector<std::vector<double>>> bwd(2, std::vector<std::vector<double>>(fractions.size())),
      step = bwd;
  auto run = [&](size_t mode, size_t k) {
    trainer::BertMlm& model = models[mode];
    model->SetMask(HeadMask(c, fractions[k]));
    Sync(dev);
    auto t0 = Clock::now();
    torch::Tensor loss = MlmLoss(model, ids, positions, labels);
    Sync(dev);
    auto t1 = Clock::now();
    loss.backward();
    Sync(dev);
    auto t2 = Clock::now();
    for (auto& p : model->parameters()) p.mutable_grad().reset();
    bwd[mode][k].push_back(Seconds(t1, t2));
    step[mode][k].push_back(Seconds(t0, t2));
  };
  for (size_t mode = 0; mode < 2; ++mode)
    for (size_t k = 0; k < fractions.size(); ++k) run(mode, k);  // warm-up, discarded
  for (auto* v : {&bwd, &step})
    for (auto& per_mode : *v)
      for (auto& x : per_mode) x.clear();
  for (int r = 0; r < reps; ++r)
    for (size_t k = 0; k < fractions.size(); ++k)
      for (size_t mode = 0; mode < 2; ++mode) run(mode, k);
#ifdef MAT_BENCH_PROFILE
  if (!g_profile_path.empty()) {
    torch::autograd::profiler::RecordProfile guard(g_profile_path + "." + name + ".json");
    run(0, 0);
  }
#endif
  nlohmann::json out = {{"model", name}, {"device", g_device}, {"layers", c.layers}, {"d_model", c.d_model},
                        {"heads", c.heads}, {"batch", B}, {"seq_len", T}, {"reps", reps}};
  const int64_t M = positions.size(0);
  const double full_bwd_flops = [&] {
    auto f = trainer::BertStepFlops(c, B, T, M, {});
    return f.activation_grad + f.weight_grad;
  }();
  for (size_t mode = 0; mode < 2; ++mode) {
    trainer::BertConfig mc = c;
    mc.detach_masked = mode == 1;
    const std::string prefix = mode == 1 ? "detach_" : "";
    for (size_t k = 0; k < fractions.size(); ++k) {
      auto f = trainer::BertStepFlops(mc, B, T, M, HeadMask(c, fractions[k]));
      std::string tag = std::to_string(int(fractions[k] * 100));
      out[prefix + "backward_seconds_" + tag] = Median(bwd[mode][k]);
      out[prefix + "fwd_bwd_seconds_" + tag] = Median(step[mode][k]);
      out[prefix + "ratio_" + tag] = Median(bwd[mode][k]) / Median(bwd[0][0]);
      out[prefix + "fwd_bwd_ratio_" + tag] = Median(step[mode][k]) / Median(step[0][0]);
      out[prefix + "flop_ratio_backward_" + tag] = (f.activation_grad + f.weight_grad) / full_bwd_flops;
    }
  }
  return out;
}

absl::StatusOr<config::TrainConfig> Config(const std::string& path) {
  auto c = config::LoadTrainConfig(path);
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
            {"ratio_50", def_r["ratio_50"]}, {"ratio_25", def_r["ratio_25"]},
            {"detach_ratio_50", def_r["detach_ratio_50"]}, {"detach_ratio_25", def_r["detach_ratio_25"]}};
  std::printf("%-8s %-8s %-6s %12s %10s %12s %14s\n", "model", "backward", "heads", "backward_s", "ratio", "flop_ratio", "fwd+bwd ratio");
  for (const auto* r : {&tiny_r, &def_r}) {
    for (const std::string prefix : {"", "detach_"}) {
      for (const char* tag : {"100", "50", "25"}) {
        std::printf("%-8s %-8s %5s%% %12.4f %10.3f %12.3f %14.3f\n", (*r)["model"].get<std::string>().c_str(),
                    prefix.empty() ? "weights" : "detach", tag,
                    (*r)[prefix + "backward_seconds_" + tag].get<double>(),
                    (*r)[prefix + "ratio_" + tag].get<double>(),
                    (*r)[prefix + "flop_ratio_backward_" + tag].get<double>(),
                    (*r)[prefix + "fwd_bwd_ratio_" + tag].get<double>());
      }
    }
  }
  return 0;
}

// What spectral-cost and op-census --probe run: a MAT trainer (the gram probe by default) on the
// --config model and the real data, on --device in --precision, and all-on masks for it.
struct ProbeRig {
  config::TrainConfig config;
  std::unique_ptr<trainer::Trainer> trainer;
  std::vector<uint8_t> all;  // every module on
  std::vector<double> ones;  // every module's learning-rate scale 1
};

absl::StatusOr<ProbeRig> MakeProbeRig(const std::string& root) {
  auto c = Config(root + "/" + g_step_config);
  if (!c.ok()) return c.status();
  c->policy.kind = "mat";
  c->train.device = g_device;
  c->train.precision = g_precision;
  auto t = trainer::Trainer::Create(*c, {"", false, false});
  if (!t.ok()) return t.status();
  ProbeRig rig{*c, std::move(*t), {}, {}};
  rig.all.assign(rig.trainer->partition().size(), 1);
  rig.ones.assign(rig.all.size(), 1.0);
  return rig;
}

// What `step`, its trace and `op-census` run: the --config BERT on --device in training mode
// (seed 0), masked AdamW over its modules, and a random batch of the config's shape (`batch`
// rows when positive).
struct StepRig {
  trainer::BertConfig c;
  torch::Device dev{torch::kCPU};
  trainer::BertMlm model{nullptr};
  spectral::ModulePartition partition;
  trainer::AdamWOptions ao;
  std::unique_ptr<trainer::MaskedAdamW> opt;
  int64_t batch = 0, seq_len = 0;
  torch::Tensor ids, positions, labels;
};

absl::StatusOr<std::unique_ptr<StepRig>> MakeStepRig(const std::string& root, int64_t batch) {
  auto tc = Config(root + "/" + g_step_config);
  if (!tc.ok()) return tc.status();
  auto r = std::make_unique<StepRig>();
  r->c = trainer::MakeBertConfig(*tc, 33279);
  torch::manual_seed(0);
  r->dev = torch::Device(g_device);
  r->model = trainer::BertMlm(r->c);
  r->model->to(r->dev);
  r->model->train();
  r->partition = r->model->Partition();
  r->ao.weight_decay = tc->train.weight_decay;
  r->opt = std::make_unique<trainer::MaskedAdamW>(
      trainer::BuildParamEntries(*r->model, r->partition), r->ao);
  r->batch = batch > 0 ? batch : tc->train.batch_size;
  r->seq_len = tc->data.seq_len;
  std::tie(r->ids, r->positions, r->labels) = RandomMlmBatch(r->c, r->batch, r->seq_len, r->dev);
  return r;
}

// `steps` full steps under LibTorch's Kineto profiler (CPU ops and, on a GPU, CUDA kernels with
// their device times), each inside a "mat::step" user scope, saved as a Chrome trace at `path`;
// bench/gpu/kernels.py compares it with the PyTorch peer's (bert_step.py --trace). The same
// calls exist in LibTorch 1.13 and 2.x. A build without Kineto (Debian's) says so and writes
// nothing.
int TraceSteps(const std::string& path, int steps, const torch::Device& dev,
               const std::function<void()>& step) {
#ifndef MAT_BENCH_KINETO
  (void)steps, (void)dev, (void)step;
  std::cerr << "mat-bench: --trace: this build has no Kineto profiler API (the configure's "
               "MAT_HAVE_KINETO_API check failed against LibTorch " TORCH_VERSION "); no trace "
            << path << "\n";
  return 2;
#else
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  std::set<ActivityType> activities{ActivityType::CPU};
  if (dev.is_cuda()) activities.insert(ActivityType::CUDA);
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  try {
    prof::prepareProfiler(config, activities);
    prof::enableProfiler(config, activities);
    for (int i = 0; i < steps; ++i) {
      RECORD_USER_SCOPE("mat::step");
      step();
    }
    Sync(dev);
    std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
    result->save(path);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    std::cerr << "mat-bench: --trace: " << what.substr(0, what.find('\n')) << "\n";
    return 2;
  }
  if (!std::ifstream(path).good()) {
    std::cerr << "mat-bench: --trace: no trace written to " << path
              << " (a LibTorch without Kineto, as Debian's, records none)\n";
    return 2;
  }
  std::printf("trace of %d steps: %s\n", steps, path.c_str());
  return 0;
#endif
}

// One full training step (forward, backward, masked AdamW with every module on) of the default
// BERT on a random batch of the configured shape, median of `reps` — the figure bench/run
// step-vs-pytorch compares with the PyTorch peer's.
int Step(const std::string& root, int reps, nlohmann::json& result) {
  auto rig_or = MakeStepRig(root, 0);
  if (!rig_or.ok()) {
    std::cerr << "mat-bench: " << rig_or.status() << "\n";
    return 2;
  }
  StepRig& rig = **rig_or;
  const trainer::BertConfig& c = rig.c;
  const torch::Device dev = rig.dev;
  trainer::BertMlm& model = rig.model;
  spectral::ModulePartition& partition = rig.partition;
  trainer::AdamWOptions& ao = rig.ao;
  trainer::MaskedAdamW& opt = *rig.opt;
  const int64_t B = rig.batch, T = rig.seq_len;
  const torch::Tensor &ids = rig.ids, &positions = rig.positions, &labels = rig.labels;
  std::vector<uint8_t> all(partition.size(), 1);
  std::vector<double> ones(all.size(), 1.0);
  std::vector<double> times;
  double loss_value = 0;
  absl::Status s;
  // One full step: forward with every module on, backward, the masked AdamW update (status in s).
  auto full_step = [&] {
    model->SetMask(all);
    torch::Tensor loss = MlmLoss(model, ids, positions, labels);
    loss.backward();
    s = opt.Step(1e-4, all, ones);
    return loss;
  };
  for (int r = -1; r < reps; ++r) {
    Sync(dev);
    auto t0 = Clock::now();
    torch::Tensor loss = full_step();
    Sync(dev);
    auto t1 = Clock::now();
    if (!s.ok()) {
      std::cerr << "mat-bench: " << s << "\n";
      return 1;
    }
    loss_value = loss.item<double>();
    if (r >= 0) times.push_back(Seconds(t0, t1));
  }
  // Where the time goes: the same step with the device synchronized between phases (separate
  // repeats, so the figure above stays free of the extra synchronizations).
  // The optimizer also as the plain per-tensor sequence (AdamWOptions::fused = false), alternated
  // with the fused/multi-tensor one: what fusing buys, side by side.
  trainer::AdamWOptions plain_options = ao;
  plain_options.fused = false;
  trainer::MaskedAdamW plain(trainer::BuildParamEntries(*model, partition), plain_options);
  std::vector<double> fwd, bwd, optim, optim_plain;
  for (int r = 0; r < 2 * reps; ++r) {
    trainer::MaskedAdamW& o = r % 2 == 0 ? opt : plain;
    Sync(dev);
    auto t0 = Clock::now();
    model->SetMask(all);
    torch::Tensor loss = MlmLoss(model, ids, positions, labels);
    Sync(dev);
    auto t1 = Clock::now();
    loss.backward();
    Sync(dev);
    auto t2 = Clock::now();
    s = o.Step(1e-4, all, ones);
    Sync(dev);
    auto t3 = Clock::now();
    if (!s.ok()) return 1;
    fwd.push_back(Seconds(t0, t1));
    bwd.push_back(Seconds(t1, t2));
    (r % 2 == 0 ? optim : optim_plain).push_back(Seconds(t2, t3));
  }
  if (!g_trace_path.empty()) {
    int rc = TraceSteps(g_trace_path, 3, dev, [&] { full_step(); });
    if (rc != 0) return rc;
    if (!s.ok()) {
      std::cerr << "mat-bench: " << s << "\n";
      return 1;
    }
  }
  auto f = trainer::BertStepFlops(c, B, T, positions.size(0), {});
  const double step = Median(times);
  result = {{"benchmark", "step"}, {"config", g_step_config}, {"device", g_device},
            {"precision", g_precision}, {"layers", c.layers}, {"d_model", c.d_model},
            {"heads", c.heads}, {"d_ff", c.d_ff}, {"batch", B}, {"seq_len", T},
            {"reps", reps}, {"step_seconds_median", step}, {"flops_per_step", f.total()},
            {"achieved_flops_per_second", f.total() / step}, {"loss", loss_value},
            {"phases_seconds_median", {{"forward", Median(fwd)}, {"backward", Median(bwd)},
                                       {"optimizer", Median(optim)},
                                       {"optimizer_per_tensor_ops", Median(optim_plain)}}}};
  std::printf("step %.4f s  %.2f GFLOP/s  loss %.3f  (synchronized phases: forward %.4f s, "
              "backward %.4f s, optimizer %.4f s; per-tensor-op optimizer %.4f s)\n",
              step, f.total() / step / 1e9, loss_value, Median(fwd), Median(bwd), Median(optim),
              Median(optim_plain));
  return 0;
}

#ifdef MAT_BENCH_PROFILE
// One op name's calls in a profiled region. A "leaf" call nests no other op: on a GPU that is
// what launches a kernel (or only allocates or makes a view; bench/op_census.py tells them
// apart). Its input elements are the product of each tensor argument's shape, summed. An
// "innermost" call nests no call of its own name (autocast's wrapper and the kernel it calls
// have one name), which counts the matmuls: they nest helper ops, so they are never leaves.
struct OpTally {
  int64_t calls = 0, leaf_calls = 0;
  int64_t innermost_calls = 0;  // calls that nest no call of the same name (autocast nests one)
  double leaf_input_elements = 0;
  std::map<std::string, int64_t> leaf_shapes;  // "[[8,128,768],[768]]" -> leaf calls
};

// The ops `fn` runs, by name, from LibTorch's (legacy) autograd profiler with input shapes.
// Each thread's events are nested push/pop ranges in order.
std::map<std::string, OpTally> Census(const std::function<void()>& fn) {
  std::map<std::string, OpTally> tally;
  {
    using namespace torch::autograd::profiler;
    TLSLegacyProfilerGuard guard(
        torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::CPU,
                                              /*report_input_shapes=*/true,
                                              /*profile_memory=*/false, /*with_stack=*/false,
                                              /*with_flops=*/false),
        [&tally](const thread_event_lists& lists) {
          struct Open {
            const LegacyEvent* event;
            bool parent;
            bool parent_of_same;  // nests a call of its own name
          };
          for (const auto& list : lists) {
            std::vector<Open> stack;
            for (const auto& e : list) {
              if (e.kind() == EventKind::PushRange) {
                if (!stack.empty()) {
                  stack.back().parent = true;
                  if (std::string(stack.back().event->name()) == e.name()) {
                    stack.back().parent_of_same = true;
                  }
                }
                stack.push_back({&e, false, false});
              } else if (e.kind() == EventKind::PopRange && !stack.empty()) {
                const Open o = stack.back();
                stack.pop_back();
                OpTally& t = tally[o.event->name()];
                ++t.calls;
                if (!o.parent_of_same) ++t.innermost_calls;
                if (o.parent) continue;
                ++t.leaf_calls;
                const std::vector<std::vector<int64_t>> shapes = o.event->shapes();
                for (const auto& shape : shapes) {
                  if (shape.empty()) continue;  // a scalar or a non-tensor argument
                  double n = 1;
                  for (int64_t d : shape) n *= double(d);
                  t.leaf_input_elements += n;
                }
                ++t.leaf_shapes[nlohmann::json(shapes).dump()];
              }
            }
          }
        });
    fn();
  }
  return tally;
}

nlohmann::json ToJson(const std::map<std::string, OpTally>& tally) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [name, t] : tally) {
    out[name] = {{"calls", t.calls}, {"leaf_calls", t.leaf_calls},
                 {"innermost_calls", t.innermost_calls},
                 {"leaf_input_elements", t.leaf_input_elements}, {"leaf_shapes", t.leaf_shapes}};
  }
  return out;
}

// The ops of one full training step (`step`'s: forward under autocast as --precision says,
// backward, masked AdamW with every module on) after one unprofiled warm-up step, per phase;
// the PyTorch peer's counterpart is bench/peers/bert_step.py --census, and bench/op_census.py
// compares the two.
int OpCensus(const std::string& root, nlohmann::json& result) {
  auto rig_or = MakeStepRig(root, g_batch);
  if (!rig_or.ok()) {
    std::cerr << "mat-bench: " << rig_or.status() << "\n";
    return 2;
  }
  StepRig& rig = **rig_or;
  const trainer::BertConfig& c = rig.c;
  trainer::BertMlm& model = rig.model;
  trainer::MaskedAdamW& opt = *rig.opt;
  const int64_t B = rig.batch, T = rig.seq_len;
  const torch::Tensor &ids = rig.ids, &positions = rig.positions, &labels = rig.labels;
  std::vector<uint8_t> all(rig.partition.size(), 1);
  std::vector<double> ones(all.size(), 1.0);
  nlohmann::json phases = nlohmann::json::object();
  for (int r = 0; r < 2; ++r) {
    model->SetMask(all);
    torch::Tensor loss;
    absl::Status s;
    auto forward = [&] { loss = MlmLoss(model, ids, positions, labels); };
    auto backward = [&] { loss.backward(); };
    auto step = [&] { s = opt.Step(1e-4, all, ones); };
    if (r == 0) {
      forward();
      backward();
      step();
    } else {
      phases["forward"] = ToJson(Census(forward));
      phases["backward"] = ToJson(Census(backward));
      phases["optimizer"] = ToJson(Census(step));
    }
    if (!s.ok()) {
      std::cerr << "mat-bench: " << s << "\n";
      return 1;
    }
  }
  result = {{"benchmark", "op-census"}, {"program", "mat-bench"}, {"config", g_step_config},
            {"device", g_device}, {"precision", g_precision}, {"layers", c.layers},
            {"d_model", c.d_model}, {"heads", c.heads}, {"d_ff", c.d_ff}, {"batch", B},
            {"seq_len", T}, {"phases", phases}};
  return 0;
}

// op-census --probe: the ops of one λ probe (Trainer::Probe: the probe forward recording the
// sites, the estimator's backward and kernels, the eigen-statistics) against those of one
// training step (Trainer::TrainStep, every module on), on the real data, after one unprofiled
// probe and step. What spectral-cost times, counted: on a GPU where the step is launch-bound,
// the probe's share of training time follows its launches.
int ProbeCensus(const std::string& root, nlohmann::json& result) {
  auto rig = MakeProbeRig(root);
  if (!rig.ok()) {
    std::cerr << "mat-bench: " << rig.status() << "\n";
    return 2;
  }
  const config::TrainConfig* c = &rig->config;
  trainer::Trainer& tr = *rig->trainer;
  trainer::MlmBatch batch = tr.train_stream().Next(c->train.batch_size);
  nlohmann::json phases = nlohmann::json::object();
  absl::Status s;
  for (int r = 0; r < 2; ++r) {
    auto probe = [&] {
      auto p = tr.Probe(batch);
      if (!p.ok()) s = p.status();
    };
    auto step = [&] {
      auto l = tr.TrainStep(batch, rig->all, rig->ones, 1e-4);
      if (!l.ok()) s = l.status();
    };
    if (r == 0) {
      probe();
      step();
    } else {
      phases["probe"] = ToJson(Census(probe));
      phases["step"] = ToJson(Census(step));
    }
    if (!s.ok()) {
      std::cerr << "mat-bench: " << s << "\n";
      return 1;
    }
  }
  result = {{"benchmark", "op-census"}, {"program", "mat-bench"}, {"mode", "probe"},
            {"config", g_step_config}, {"device", g_device}, {"precision", g_precision},
            {"estimator", c->policy.estimator}, {"probe_samples", c->policy.probe_samples},
            {"probe_every", c->policy.probe_every}, {"batch", c->train.batch_size},
            {"seq_len", c->data.seq_len}, {"phases", phases}};
  return 0;
}
#endif

// The machine's float32 matmul peak through the BLAS LibTorch uses (torch::mm, square sizes),
// and the default BERT step's achieved FLOP/s as a fraction of the best size's figure.
int MatmulPeak(const std::string& root, int reps, nlohmann::json& result) {
  const torch::Device dev(g_device);
  nlohmann::json sizes = nlohmann::json::array();
  double best = 0;
  for (int64_t n : {512, 1024, 2048, 4096}) {
    // bf16: the peak the bf16 step's matmuls can reach (autocast runs them in bf16).
    const auto dtype = Prec() == trainer::Precision::kBFloat16 ? torch::kBFloat16 : torch::kFloat;
    torch::Tensor a = torch::randn({n, n}, torch::TensorOptions().device(dev)).to(dtype);
    torch::Tensor b = torch::randn({n, n}, torch::TensorOptions().device(dev)).to(dtype);
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
    std::printf("%s mm %5lld^3  %8.2f GFLOP/s\n", g_precision.c_str(), (long long)n, flops / 1e9);
  }
  nlohmann::json step;
  if (int rc = Step(root, reps, step); rc != 0) return rc;
  const double achieved = step["achieved_flops_per_second"].get<double>();
  result = {{"benchmark", "matmul-peak"}, {"device", g_device}, {"precision", g_precision},
            {"sizes", sizes},
            {"peak_flops_per_second", best}, {"step", step},
            {"step_fraction_of_peak", achieved / best}, {"goal_fraction", 0.5}};
  std::printf("default BERT step: %.2f GFLOP/s = %.3f of the sgemm peak %.2f GFLOP/s\n",
              achieved / 1e9, achieved / best, best / 1e9);
  return 0;
}

int SpectralCost(const std::string& root, int reps, nlohmann::json& result) {
  auto rig = MakeProbeRig(root);
  if (!rig.ok()) {
    std::cerr << "mat-bench: " << rig.status() << "\n";
    return 2;
  }
  const config::TrainConfig* c = &rig->config;
  trainer::Trainer& tr = *rig->trainer;
  const std::vector<uint8_t>& all = rig->all;
  const std::vector<double>& ones = rig->ones;
  std::vector<double> step_s, probe_s;
  for (int r = -1; r < reps; ++r) {  // r = -1: warm-up
    trainer::MlmBatch batch = tr.train_stream().Next(c->train.batch_size);
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
            {"config", g_step_config},
            {"device", g_device},
            {"precision", g_precision},
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

// Average ranks (ties share their mean rank), then Pearson of the ranks.
double Spearman(const std::vector<double>& a, const std::vector<double>& b) {
  auto ranks = [](const std::vector<double>& v) {
    std::vector<size_t> idx(v.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    std::sort(idx.begin(), idx.end(), [&](size_t x, size_t y) { return v[x] < v[y]; });
    std::vector<double> r(v.size());
    for (size_t i = 0; i < idx.size();) {
      size_t j = i;
      while (j + 1 < idx.size() && v[idx[j + 1]] == v[idx[i]]) ++j;
      for (size_t k = i; k <= j; ++k) r[idx[k]] = 0.5 * double(i + j);
      i = j + 1;
    }
    return r;
  };
  std::vector<double> x = ranks(a), y = ranks(b);
  const double n = double(x.size());
  double mx = 0, my = 0;
  for (size_t i = 0; i < x.size(); ++i) mx += x[i] / n, my += y[i] / n;
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    sxy += (x[i] - mx) * (y[i] - my);
    sxx += (x[i] - mx) * (x[i] - mx);
    syy += (y[i] - my) * (y[i] - my);
  }
  return sxx > 0 && syy > 0 ? sxy / std::sqrt(sxx * syy) : 0;
}

// The policy's threshold decision per module (DESIGN §5, without EMA and guards): within each
// group, active iff λ > λ_min + (λ_max - λ_min)·α (all active when λ_min = λ_max).
std::vector<bool> ThresholdDecisions(const spectral::ModulePartition& p, const std::vector<double>& lambda,
                                     double alpha) {
  std::map<std::string, std::pair<double, double>> range;
  for (int i = 0; i < p.size(); ++i) {
    auto [it, fresh] = range.emplace(p.modules[i].group, std::pair{lambda[i], lambda[i]});
    if (!fresh) {
      it->second.first = std::min(it->second.first, lambda[i]);
      it->second.second = std::max(it->second.second, lambda[i]);
    }
  }
  std::vector<bool> active(p.size());
  for (int i = 0; i < p.size(); ++i) {
    const auto [lo, hi] = range[p.modules[i].group];
    active[i] = lo == hi || lambda[i] > lo + (hi - lo) * alpha;
  }
  return active;
}

// gram (loss kernel) vs exact (loss kernel), lanczos (output kernel) vs exact-output, and the
// kernels against each other, on the same probe batches of a model trained with full masks on
// the real data: probes at steps 0, gap, 2·gap, ... (`probes` of them), each estimator on its own
// probe forward of the same batch (estimators consume the graph).
nlohmann::json SpectralCompareFor(const std::string& model, config::TrainConfig c, int probes,
                                  int gap) {
  c.train.device = g_device;
  c.policy.kind = "full";
  auto created = trainer::Trainer::Create(c, {"", false, false});
  if (!created.ok()) return {{"error", created.status().ToString()}};
  auto& tr = **created;
  const spectral::ModulePartition& part = tr.partition();
  const std::vector<std::string> names = {"gram", "exact", "lanczos", "exact-output"};
  spectral::EstimatorOptions eo;
  eo.lanczos_iterations = int(c.policy.lanczos_iterations);
  eo.projections = int(c.policy.probe_projections);
  eo.seed = c.seed + 0x6c616e637a6f73ULL;
  std::vector<std::unique_ptr<spectral::Estimator>> est;
  for (const auto& n : names) est.push_back(std::move(*spectral::MakeEstimator(n, eo)));
  const std::vector<std::pair<int, int>> pairs = {{0, 1}, {2, 3}, {0, 2}, {1, 3}};
  auto pair_name = [&](std::pair<int, int> p) { return names[p.first] + "~" + names[p.second]; };

  std::vector<uint8_t> all(part.size(), 1);
  std::vector<double> ones(all.size(), 1.0);
  std::map<std::string, std::vector<double>> seconds;
  std::vector<double> step_s;
  nlohmann::json points = nlohmann::json::array();
  {  // warm-up (allocator, first-call costs), untimed
    trainer::MlmBatch warm = tr.train_stream().Next(c.train.batch_size);
    auto r = tr.Probe(warm, est[0].get());
    if (!r.ok()) return {{"error", r.status().ToString()}};
  }
  int64_t step = 0;
  for (int pr = 0; pr < probes; ++pr) {
    trainer::MlmBatch batch = tr.train_stream().Next(c.train.batch_size);
    std::vector<std::vector<double>> lambda(names.size());
    nlohmann::json point = {{"step", step}};
    for (size_t e = 0; e < names.size(); ++e) {
      auto t0 = Clock::now();
      auto r = tr.Probe(batch, est[e].get());
      Sync(tr.device());
      const double sec = Seconds(t0, Clock::now());
      if (!r.ok()) return {{"error", names[e] + ": " + r.status().ToString()}};
      seconds[names[e]].push_back(sec);
      for (const auto& m : r->modules) lambda[e].push_back(m.lambda_max);
      point["lambda_max"][names[e]] = lambda[e];
      point["seconds"][names[e]] = sec;
    }
    for (auto pp : pairs) {
      const auto da = ThresholdDecisions(part, lambda[pp.first], c.policy.alpha);
      const auto db = ThresholdDecisions(part, lambda[pp.second], c.policy.alpha);
      int diff = 0;
      for (size_t i = 0; i < da.size(); ++i) diff += da[i] != db[i];
      point["spearman"][pair_name(pp)] = Spearman(lambda[pp.first], lambda[pp.second]);
      point["decisions_differ"][pair_name(pp)] = diff;
    }
    for (auto pp : {std::pair{0, 1}, std::pair{2, 3}}) {
      double worst = 0;
      for (size_t i = 0; i < lambda[pp.first].size(); ++i) {
        const double ref = lambda[pp.second][i];
        worst = std::max(worst, std::abs(lambda[pp.first][i] - ref) / std::max(std::abs(ref), 1e-30));
      }
      point["max_rel_err"][pair_name(pp)] = worst;
    }
    points.push_back(point);
    std::fprintf(stderr, "%s probe at step %lld done\n", model.c_str(), (long long)step);
    if (pr + 1 == probes) break;
    for (int g = 0; g < gap; ++g, ++step) {  // the first step trains on the probe's batch
      if (g > 0) batch = tr.train_stream().Next(c.train.batch_size);
      Sync(tr.device());
      auto t0 = Clock::now();
      auto loss = tr.TrainStep(batch, all, ones, tr.LearningRate(step));
      Sync(tr.device());
      if (!loss.ok()) return {{"error", loss.status().ToString()}};
      step_s.push_back(Seconds(t0, Clock::now()));
    }
  }
  if (step_s.empty()) {  // one probe only: time a few steps anyway
    for (int g = 0; g < 3; ++g) {
      trainer::MlmBatch batch = tr.train_stream().Next(c.train.batch_size);
      auto t0 = Clock::now();
      auto loss = tr.TrainStep(batch, all, ones, tr.LearningRate(g));
      Sync(tr.device());
      if (!loss.ok()) return {{"error", loss.status().ToString()}};
      step_s.push_back(Seconds(t0, Clock::now()));
    }
  }
  const double step_med = Median(step_s);
  nlohmann::json summary;
  for (auto pp : pairs) {
    double mean = 0, lo = 1;
    int diff_total = 0, diff_max = 0;
    for (const auto& p : points) {
      const double r = p["spearman"][pair_name(pp)].get<double>();
      mean += r / double(points.size());
      lo = std::min(lo, r);
      const int d = p["decisions_differ"][pair_name(pp)].get<int>();
      diff_total += d;
      diff_max = std::max(diff_max, d);
    }
    summary["spearman_mean"][pair_name(pp)] = mean;
    summary["spearman_min"][pair_name(pp)] = lo;
    summary["decisions_differ_max"][pair_name(pp)] = diff_max;
    summary["decisions_differ_total"][pair_name(pp)] = diff_total;
  }
  for (auto pp : {std::pair{0, 1}, std::pair{2, 3}}) {
    double worst = 0;
    for (const auto& p : points) worst = std::max(worst, p["max_rel_err"][pair_name(pp)].get<double>());
    summary["max_rel_err"][pair_name(pp)] = worst;
  }
  for (const auto& n : names) {
    summary["probe_seconds_median"][n] = Median(seconds[n]);
    summary["probe_over_step"][n] = Median(seconds[n]) / step_med;
  }
  return {{"model", model},
          {"layers", c.model.layers},
          {"d_model", c.model.d_model},
          {"heads", c.model.heads},
          {"modules", part.size()},
          {"batch_size", c.train.batch_size},
          {"seq_len", c.data.seq_len},
          {"probe_samples", c.policy.probe_samples},
          {"probe_projections", c.policy.probe_projections},
          {"lanczos_iterations", c.policy.lanczos_iterations},
          {"output_kernel_d", c.policy.probe_samples * c.policy.probe_projections},
          {"alpha", c.policy.alpha},
          {"probes", probes},
          {"steps_between_probes", gap},
          {"step_seconds_median", step_med},
          {"summary", summary},
          {"points", points}};
}

int SpectralCompare(const std::string& root, int reps, nlohmann::json& result) {
  const int probes = std::max(1, reps);
  nlohmann::json models = nlohmann::json::array();
  for (const auto& [name, file] : {std::pair{std::string("tiny"), std::string("bert-wikitext2-tiny.yaml")},
                                   std::pair{std::string("default"), std::string("bert-wikitext2.yaml")}}) {
    auto c = Config(root + "/examples/" + file);
    if (!c.ok()) {
      std::cerr << "mat-bench: " << c.status() << "\n";
      return 2;
    }
    nlohmann::json r = SpectralCompareFor(name, *c, probes, g_compare_gap);
    if (r.contains("error")) {
      std::cerr << "mat-bench: " << name << ": " << r["error"].get<std::string>() << "\n";
      return 1;
    }
    models.push_back(r);
  }
  result = {{"benchmark", "spectral-compare"}, {"device", g_device}, {"models", models}};
  const std::vector<std::string> pairs = {"gram~exact", "lanczos~exact-output", "gram~lanczos",
                                          "exact~exact-output"};
  std::printf("\n| model | modules | pair | Spearman ρ mean (min) | threshold decisions differ, max per probe (total) |\n");
  std::printf("|---|---|---|---|---|\n");
  for (const auto& m : models) {
    for (const auto& p : pairs) {
      const auto& s = m["summary"];
      std::printf("| %s | %d | %s | %.3f (%.3f) | %d (%d) |\n", m["model"].get<std::string>().c_str(),
                  m["modules"].get<int>(), p.c_str(), s["spearman_mean"][p].get<double>(),
                  s["spearman_min"][p].get<double>(), s["decisions_differ_max"][p].get<int>(),
                  s["decisions_differ_total"][p].get<int>());
    }
  }
  std::printf("\n| model | max rel err gram vs exact | max rel err lanczos vs exact-output | step s | gram s (×step) | exact s (×step) | lanczos s (×step) | exact-output s (×step) |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const auto& m : models) {
    const auto& s = m["summary"];
    std::printf("| %s | %.2e | %.2e | %.3f |", m["model"].get<std::string>().c_str(),
                s["max_rel_err"]["gram~exact"].get<double>(),
                s["max_rel_err"]["lanczos~exact-output"].get<double>(),
                m["step_seconds_median"].get<double>());
    for (const char* e : {"gram", "exact", "lanczos", "exact-output"}) {
      std::printf(" %.3f (%.1f) |", s["probe_seconds_median"][e].get<double>(),
                  s["probe_over_step"][e].get<double>());
    }
    std::printf("\n");
  }
  std::printf("\n");
  return 0;
}

// The paper's mNTK at trained checkpoints: the tiny BERT on WikiText-2 with its vocabulary
// capped at g_output_vocab words (so that the full kernel over every logit is affordable),
// trained with full masks, probed every --gap steps (--reps probes, step 0 first) on the same
// batch by
//   exact-output-all  brute force: J_m built row by row (n·V backward passes), Θ_m = J_m J_m^T
//                     over every logit at one masked position per sample (the paper's mNTK);
//   output-all        the shared-pass estimator on the same outputs (V backward passes);
//   output            the shared-pass estimator on k = 4 random projections (4 passes);
//   gram              the loss kernel (1 pass).
// Reported per probe: output-all's relative error against the brute force (the estimator's
// validation), and against the exact mNTK: output's λ_max scaled by V/k (E[R R^T] = k/V · I)
// and the loss kernel's, as Spearman ρ of the modules' λ_max, threshold decisions that differ at
// policy.alpha, and the scaled relative error; seconds per probe against a training step.
int64_t g_output_vocab = 256;  // --output-vocab

nlohmann::json OutputKernelRun(config::TrainConfig c, int probes, int gap) {
  c.train.device = g_device;
  c.policy.kind = "full";
  c.data.vocab_size = g_output_vocab;
  c.policy.probe_samples = 8;
  c.policy.probe_positions = 1;
  auto created = trainer::Trainer::Create(c, {"", false, false});
  if (!created.ok()) return {{"error", created.status().ToString()}};
  auto& tr = **created;
  const spectral::ModulePartition& part = tr.partition();
  const int k = 4;
  struct Named {
    std::string name;
    std::unique_ptr<spectral::Estimator> est;
  };
  std::vector<Named> est;
  for (const auto& [name, kind, proj] :
       {std::tuple{std::string("exact-output-all"), std::string("exact-output"), 0},
        std::tuple{std::string("output-all"), std::string("output"), 0},
        std::tuple{std::string("output"), std::string("output"), k},
        std::tuple{std::string("gram"), std::string("gram"), 1}}) {
    spectral::EstimatorOptions o;
    o.projections = std::max(proj, 1);
    o.every_logit = proj == 0;
    o.positions = 1;
    auto e = spectral::MakeEstimator(kind, o);
    if (!e.ok()) return {{"error", e.status().ToString()}};
    est.push_back({name, std::move(*e)});
  }
  std::vector<uint8_t> all(part.size(), 1);
  std::vector<double> ones(all.size(), 1.0);
  std::map<std::string, std::vector<double>> seconds;
  std::vector<double> step_s;
  nlohmann::json points = nlohmann::json::array();
  double vocab = 0;
  int64_t step = 0;
  for (int pr = 0; pr < probes; ++pr) {
    trainer::MlmBatch batch = tr.train_stream().Next(c.train.batch_size);
    std::map<std::string, std::vector<double>> lambda;
    nlohmann::json point = {{"step", step}};
    for (auto& e : est) {
      auto t0 = Clock::now();
      auto r = tr.Probe(batch, e.est.get());
      Sync(tr.device());
      const double sec = Seconds(t0, Clock::now());
      if (!r.ok()) return {{"error", e.name + ": " + r.status().ToString()}};
      if (pr > 0) seconds[e.name].push_back(sec);  // the first probe pays first-call costs
      for (const auto& m : r->modules) lambda[e.name].push_back(m.lambda_max);
      point["lambda_max"][e.name] = lambda[e.name];
      point["seconds"][e.name] = sec;
    }
    vocab = double(tr.model()->config().vocab_size);
    const auto& ref = lambda["exact-output-all"];
    auto rel_err = [&](const std::vector<double>& x, double scale) {
      double worst = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        worst = std::max(worst, std::abs(scale * x[i] - ref[i]) / std::max(std::abs(ref[i]), 1e-30));
      }
      return worst;
    };
    point["max_rel_err"]["output-all~exact-output-all"] = rel_err(lambda["output-all"], 1.0);
    point["max_rel_err"]["output(scaled V/k)~exact-output-all"] = rel_err(lambda["output"], vocab / k);
    for (const std::string other : {"output", "gram"}) {
      const std::string key = other + "~exact-output-all";
      point["spearman"][key] = Spearman(lambda[other], ref);
      const auto da = ThresholdDecisions(part, lambda[other], c.policy.alpha);
      const auto db = ThresholdDecisions(part, ref, c.policy.alpha);
      int diff = 0;
      for (size_t i = 0; i < da.size(); ++i) diff += da[i] != db[i];
      point["decisions_differ"][key] = diff;
    }
    points.push_back(point);
    std::fprintf(stderr, "output-kernel probe at step %lld done\n", (long long)step);
    if (pr + 1 == probes) break;
    for (int g = 0; g < gap; ++g, ++step) {
      trainer::MlmBatch b = tr.train_stream().Next(c.train.batch_size);
      auto t0 = Clock::now();
      auto loss = tr.TrainStep(b, all, ones, tr.LearningRate(step));
      Sync(tr.device());
      if (!loss.ok()) return {{"error", loss.status().ToString()}};
      step_s.push_back(Seconds(t0, Clock::now()));
      if (g + 1 == gap) points.back()["train_loss_after"] = *loss;
    }
  }
  if (step_s.empty()) return {{"error", "--reps must be >= 2 (probes apart by --gap steps)"}};
  const double step_med = Median(step_s);
  nlohmann::json summary;
  for (const std::string key : {"output-all~exact-output-all", "output(scaled V/k)~exact-output-all"}) {
    double worst = 0;
    for (const auto& p : points) worst = std::max(worst, p["max_rel_err"][key].get<double>());
    summary["max_rel_err"][key] = worst;
  }
  for (const std::string key : {"output~exact-output-all", "gram~exact-output-all"}) {
    double mean = 0, lo = 1;
    int total = 0;
    for (const auto& p : points) {
      mean += p["spearman"][key].get<double>() / double(points.size());
      lo = std::min(lo, p["spearman"][key].get<double>());
      total += p["decisions_differ"][key].get<int>();
    }
    summary["spearman_mean"][key] = mean;
    summary["spearman_min"][key] = lo;
    summary["decisions_differ_total"][key] = total;
  }
  for (const auto& e : est) {
    summary["probe_seconds_median"][e.name] = Median(seconds[e.name]);
    summary["probe_over_step"][e.name] = Median(seconds[e.name]) / step_med;
  }
  return {{"model", "tiny"}, {"vocab_size", vocab}, {"modules", part.size()},
          {"probe_samples", c.policy.probe_samples}, {"positions_per_sample", 1},
          {"projections", k}, {"batch_size", c.train.batch_size}, {"seq_len", c.data.seq_len},
          {"alpha", c.policy.alpha}, {"probes", probes}, {"steps_between_probes", gap},
          {"step_seconds_median", step_med}, {"summary", summary}, {"points", points}};
}

int OutputKernel(const std::string& root, int reps, nlohmann::json& result) {
  auto c = Config(root + "/examples/bert-wikitext2-tiny.yaml");
  if (!c.ok()) {
    std::cerr << "mat-bench: " << c.status() << "\n";
    return 2;
  }
  c->model.ffn_groups = 4;  // heads and FFN slices: 16 modules
  nlohmann::json r = OutputKernelRun(*c, std::max(2, reps), g_compare_gap);
  if (r.contains("error")) {
    std::cerr << "mat-bench: output-kernel: " << r["error"].get<std::string>() << "\n";
    return 1;
  }
  result = {{"benchmark", "output-kernel"}, {"device", g_device}, {"run", r}};
  const auto& s = r["summary"];
  std::printf("\n| probe | step | output-all vs brute force (max rel err) | output k=4 scaled vs exact mNTK (max rel err) | Spearman output~mNTK | Spearman gram~mNTK | decisions differ output / gram |\n|---|---|---|---|---|---|---|\n");
  int i = 0;
  for (const auto& p : r["points"]) {
    std::printf("| %d | %lld | %.2e | %.3f | %.3f | %.3f | %d / %d |\n", i++,
                (long long)p["step"].get<int64_t>(),
                p["max_rel_err"]["output-all~exact-output-all"].get<double>(),
                p["max_rel_err"]["output(scaled V/k)~exact-output-all"].get<double>(),
                p["spearman"]["output~exact-output-all"].get<double>(),
                p["spearman"]["gram~exact-output-all"].get<double>(),
                p["decisions_differ"]["output~exact-output-all"].get<int>(),
                p["decisions_differ"]["gram~exact-output-all"].get<int>());
  }
  std::printf("\nseconds per probe (× a training step of %.3f s):", r["step_seconds_median"].get<double>());
  for (const char* e : {"exact-output-all", "output-all", "output", "gram"}) {
    std::printf(" %s %.3f (%.1f)", e, s["probe_seconds_median"][e].get<double>(),
                s["probe_over_step"][e].get<double>());
  }
  std::printf("\n");
  return 0;
}

}  // namespace
}  // namespace mat::bench

int main(int argc, char** argv) {
  CLI::App app{"mat-bench: micro-benchmarks (masked-backward, spectral-cost, step)"};
  std::string name, root = ".", out;
  int reps = 10, threads = 0;
  app.add_option("name", name, "benchmark")->required()->check(CLI::IsMember({"masked-backward", "spectral-cost", "spectral-compare", "output-kernel", "step", "matmul-peak", "op-census"}));
  app.add_option("--root", root, "repository root (examples/ live there)");
  app.add_option("--reps", reps, "repeats per configuration");
  app.add_option("--out", out, "JSON result file");
  app.add_option("--device", mat::bench::g_device, "cpu | cuda | cuda:N");
  app.add_option("--precision", mat::bench::g_precision, "fp32 | bf16 (autocast of the forward)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--threads", threads, "intra-op threads (0: all cores, as mat-train)");
  app.add_option("--gap", mat::bench::g_compare_gap, "spectral-compare, output-kernel: training steps between probes");
  app.add_option("--output-vocab", mat::bench::g_output_vocab, "output-kernel: vocabulary cap (the exact mNTK has V outputs per position)");
  app.add_option("--config", mat::bench::g_step_config,
                 "step, matmul-peak, spectral-cost, op-census: the model/batch config, relative to --root");
  app.add_option("--data-dir", mat::bench::g_data_dir, "corpus folder (default: the examples' data.dir)");
  app.add_option("--trace", mat::bench::g_trace_path,
                 "step: also write a Chrome trace (Kineto: CPU ops, CUDA kernels) of 3 steps to PATH");
  app.add_option("--batch", mat::bench::g_batch, "op-census: batch size (default: the config's)");
  bool probe_census = false;
  app.add_flag("--probe", probe_census, "op-census: one λ probe against one training step instead");
  app.add_option("--profile", mat::bench::g_profile_path, "masked-backward: write a chrome trace of one step per model to PATH.<model>.json");
  CLI11_PARSE(app, argc, argv);
  mat::common::ConfigureAllocatorForTraining();
  mat::common::InitLogging("warn", false);
  // LibTorch's OpenMP default can be 1 thread here; use every core, as the trainer does.
  torch::set_num_threads(threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency())));
  nlohmann::json result;
#ifndef MAT_BENCH_PROFILE
  if (name == "op-census") {
    std::cerr << "mat-bench: op-census reads LibTorch 1.x's legacy profiler; this build has LibTorch "
              << TORCH_VERSION << "\n";
    return 2;
  }
#endif
  int rc = name == "masked-backward" ? mat::bench::MaskedBackward(root, reps, result)
           : name == "step"           ? mat::bench::Step(root, reps, result)
#ifdef MAT_BENCH_PROFILE
           : name == "op-census"      ? (probe_census ? mat::bench::ProbeCensus(root, result)
                                                      : mat::bench::OpCensus(root, result))
#endif
           : name == "matmul-peak"    ? mat::bench::MatmulPeak(root, reps, result)
           : name == "spectral-compare" ? mat::bench::SpectralCompare(root, reps, result)
           : name == "output-kernel"  ? mat::bench::OutputKernel(root, reps, result)
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
