// Tests of the Trainer over its Task interface (trainer/task.h): the loop drives a third, toy
// task (two linear "heads" regressing a fixed map) that knows nothing of BERT or VGG, which
// shows that Run has no family branch: the rand policy's masks reach the task, a masked head's
// weights never move while an active one's always do, the FLOPs saved come from the task's own formulas, the task's
// evaluation and summary fields reach metrics.jsonl and summary.json, and a run stopped half way
// and resumed from its checkpoint (the task's data state included) ends bitwise equal to an
// uninterrupted one. Also: MakeTask picks the task of model.kind, and the masked-LM task's
// unigram baselines are measured on the tokens its evaluations average over.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/testing/temp_dir.h"
#include "tests/trainer/toy_run.h"
#include "trainer/data/corpus.h"
#include "trainer/data/mlm_data.h"
#include "trainer/lm_task.h"
#include "trainer/task.h"
#include "trainer/trainer.h"

namespace mat::trainer {
namespace {

// y = A x + B x on 4 inputs; A and B are the two modules ("heads", layer 0).
struct PairNetImpl : torch::nn::Module {
  PairNetImpl() {
    a = register_module("a", torch::nn::Linear(4, 4));
    b = register_module("b", torch::nn::Linear(4, 4));
  }
  torch::nn::Linear a{nullptr}, b{nullptr};
};
TORCH_MODULE(PairNet);

struct ToyBatch : TaskBatch {
  torch::Tensor x, y;
};

// What the toy task's "loss at [MASK]" adds to its loss on each split.
constexpr double kValidAtMask = 1.25, kTestAtMask = 2.5;

// Training pairs from a counter (the data state): batch k is drawn from a generator seeded by k.
class ToyTask : public Task {
 public:
  ToyTask() {
    torch::manual_seed(3);
    target_ = torch::randn({4, 4});
    for (auto* lin : {&net_->a, &net_->b}) {
      spectral::ModuleSpec m;
      m.group = "heads";
      m.layer = 0;
      m.index = static_cast<int>(partition_.modules.size());
      m.name = m.index == 0 ? "a" : "b";
      m.params = {(*lin)->weight, (*lin)->bias};
      partition_.modules.push_back(m);
    }
    eval_x_ = torch::randn({32, 4});
  }

  torch::nn::Module& network() override { return *net_; }
  const spectral::ModulePartition& partition() const override { return partition_; }
  std::unique_ptr<TaskBatch> NextBatch(int64_t samples) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + next_++);
    auto batch = std::make_unique<ToyBatch>();
    batch->x = torch::randn({samples, 4}, gen, torch::TensorOptions());
    batch->y = torch::mm(batch->x, target_);
    return batch;
  }
  absl::StatusOr<double> ForwardBackward(const TaskBatch& batch,
                                         const std::vector<uint8_t>& active) override {
    const auto& b = static_cast<const ToyBatch&>(batch);
    // The previous step's masked heads must not have moved since (the optimizer skips them).
    for (int m = 0; m < 2 && !snapshot_.empty(); ++m) {
      const bool moved = !torch::equal(snapshot_[m], partition_.modules[m].params[0].value());
      (last_active_[m] != 0 ? active_moved_ : masked_moved_) += moved ? 1 : 0;
      ++checked_;
    }
    snapshot_.clear();
    for (const auto& m : partition_.modules) snapshot_.push_back(m.params[0].value().detach().clone());
    last_active_ = active;
    torch::Tensor out = torch::zeros_like(b.y);
    if (active[0] != 0) out = out + net_->a(b.x);
    if (active[1] != 0) out = out + net_->b(b.x);
    torch::Tensor loss = torch::mse_loss(out, b.y);
    if (active[0] != 0 || active[1] != 0) loss.backward();
    return loss.item<double>();
  }
  FlopCounts StepFlops(const TaskBatch& batch, const std::vector<uint8_t>& active,
                       double* full_total) override {
    const int64_t n = static_cast<const ToyBatch&>(batch).x.size(0);
    *full_total = NominalStepFlops(n, {}).total();
    return NominalStepFlops(n, active);
  }
  FlopCounts NominalStepFlops(int64_t samples, const std::vector<uint8_t>& active) const override {
    FlopCounts f;
    for (int m = 0; m < 2; ++m) {
      if (!active.empty() && active[m] == 0) continue;
      f.forward += 32.0 * samples;
      f.weight_grad += 32.0 * samples;
    }
    return f;
  }
  absl::StatusOr<RecordedProbe> RecordProbe(const TaskBatch&, int64_t,
                                            const spectral::Estimator&) override {
    return absl::UnimplementedError("the toy task is trained with policies that need no probe");
  }
  EvalResult Evaluate(EvalSplit split) override {
    torch::NoGradGuard guard;
    const torch::Tensor x = split == EvalSplit::kValid ? eval_x_ : eval_x_ * 2;
    EvalResult out;
    out.loss = torch::mse_loss(net_->a(x) + net_->b(x), torch::mm(x, target_)).item<double>();
    // A figure of its own per split, so that the trainer's use of each can be told apart.
    out.loss_at_mask = out.loss + (split == EvalSplit::kValid ? kValidAtMask : kTestAtMask);
    return out;
  }
  bool classifies() const override { return false; }
  void AddEvalFields(nlohmann::json* line) override { (*line)["toy_batches_drawn"] = next_; }
  void AddSummaryFields(nlohmann::json* summary) const override { (*summary)["toy"] = "pairs"; }
  int64_t train_size() const override { return 1000; }
  std::string train_size_unit() const override { return "pairs"; }
  void SaveState(nlohmann::json* meta) const override { (*meta)["data"] = next_; }
  absl::Status LoadState(const nlohmann::json& meta) override {
    next_ = meta.at("data").get<int64_t>();
    return absl::OkStatus();
  }

  std::vector<uint8_t> last_active_;
  std::vector<torch::Tensor> snapshot_;  // the heads' weights before the latest step
  int checked_ = 0, masked_moved_ = 0, active_moved_ = 0;
  int64_t next_ = 0;

 private:
  PairNet net_;
  spectral::ModulePartition partition_;
  torch::Tensor target_, eval_x_;
};

// The loop's settings: 40 steps of 8 pairs, rand keeping 1 of the 2 heads from step 0, an
// evaluation every 10 steps, a checkpoint every 10.
config::TrainConfig ToyLoopConfig(const std::string& dir) {
  config::TrainConfig c = testing::ToyConfig(dir);
  c.train.steps = 40;
  c.train.eval_every = 10;
  c.train.checkpoint_every = 10;
  c.train.warmup_steps = 0;
  c.policy.kind = "rand";
  c.policy.rand_fraction = 0.5;
  c.policy.warmup_steps = 0;
  c.policy.probe_every = 5;
  return c;
}

std::unique_ptr<Trainer> MakeToyTrainer(const config::TrainConfig& c, const std::string& out,
                                        bool resume, ToyTask** task_out) {
  auto task = std::make_unique<ToyTask>();
  *task_out = task.get();
  TrainerOptions options;
  options.out_dir = out;
  options.resume = resume;
  auto trainer = Trainer::Create(c, options, std::move(task));
  EXPECT_TRUE(trainer.ok()) << trainer.status();
  return trainer.ok() ? std::move(*trainer) : nullptr;
}

TEST(TaskTest, TheLoopTrainsAThirdTaskUnderMasksWithItsOwnFieldsAndFlops) {
  tests::TempDir tmp("mat_task_toy");
  ASSERT_TRUE(tmp.ok());
  ToyTask* task = nullptr;
  auto trainer = MakeToyTrainer(ToyLoopConfig(tmp.path()), tmp.path() + "/run", false, &task);
  ASSERT_NE(trainer, nullptr);
  EXPECT_FALSE(trainer->is_vgg());
  EXPECT_EQ(&trainer->task(), task);

  auto summary = trainer->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(task->checked_, 2 * 39);
  EXPECT_EQ(task->masked_moved_, 0) << "a masked head moved";
  EXPECT_EQ(task->active_moved_, 39) << "every step's active head moved";
  EXPECT_EQ((*summary)["steps"], 40);
  EXPECT_EQ((*summary)["toy"], "pairs");
  EXPECT_EQ((*summary)["train_size_unit"], "pairs");
  EXPECT_EQ((*summary)["test_metric_name"], "loss");
  EXPECT_DOUBLE_EQ((*summary)["mean_active_fraction"].get<double>(), 0.5);
  // Half the heads each step: the task's formulas say half the training FLOPs were saved.
  EXPECT_DOUBLE_EQ((*summary)["flops_saved"].get<double>(), 40 * 8 * 64.0);
  EXPECT_DOUBLE_EQ((*summary)["step_flops"]["full"].get<double>(), 8 * 128.0);
  EXPECT_DOUBLE_EQ((*summary)["step_flops"]["modules_off"].get<double>(), 0.0);
  const auto metrics = testing::ReadJsonLines(tmp.path() + "/run/metrics.jsonl");
  ASSERT_EQ(metrics.size(), 4u);
  EXPECT_EQ(metrics[0].at("toy_batches_drawn"), 10);
  EXPECT_EQ(metrics[3].at("toy_batches_drawn"), 40);
  EXPECT_LT(metrics[3].at("val_loss").get<double>(), metrics[0].at("val_loss").get<double>())
      << "the heads learn the map";
  // The task's loss at [MASK]: validation's on every evaluation line, test's where test was
  // evaluated (a new best), and the best step's in the summary.
  int tested = 0;
  for (const auto& m : metrics) {
    EXPECT_DOUBLE_EQ(m.at("val_loss_at_mask").get<double>(),
                     m.at("val_loss").get<double>() + kValidAtMask);
    ASSERT_EQ(m.contains("test_loss_at_mask"), m.contains("test_loss")) << m.dump();
    if (m.contains("test_loss")) {
      ++tested;
      EXPECT_DOUBLE_EQ(m.at("test_loss_at_mask").get<double>(),
                       m.at("test_loss").get<double>() + kTestAtMask);
    }
  }
  EXPECT_GE(tested, 1);
  EXPECT_DOUBLE_EQ((*summary)["test_loss_at_mask_at_best"].get<double>(),
                   (*summary)["test_loss_at_best"].get<double>() + kTestAtMask);
  EXPECT_EQ(testing::ReadJsonLines(tmp.path() + "/run/decisions.jsonl").size(), 8u);
}

TEST(TaskTest, AResumedRunOfTheToyTaskEqualsAnUninterruptedOne) {
  tests::TempDir tmp("mat_task_resume");
  ASSERT_TRUE(tmp.ok());
  const config::TrainConfig c = ToyLoopConfig(tmp.path());
  ToyTask* task = nullptr;
  auto straight = MakeToyTrainer(c, tmp.path() + "/straight", false, &task);
  ASSERT_NE(straight, nullptr);
  ASSERT_TRUE(straight->Run().ok());
  const std::string expected = straight->ParamChecksum();

  auto first = MakeToyTrainer(c, tmp.path() + "/cut", false, &task);
  ASSERT_NE(first, nullptr);
  ASSERT_TRUE(first->Run(20).ok());
  first.reset();
  auto second = MakeToyTrainer(c, tmp.path() + "/cut", true, &task);
  ASSERT_NE(second, nullptr);
  auto summary = second->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(second->resumed_from_step(), 20);
  EXPECT_EQ(task->next_, 40) << "the task's data state came back from the checkpoint";
  EXPECT_EQ(second->ParamChecksum(), expected);
}

TEST(TaskTest, MakeTaskPicksTheTaskOfModelKind) {
  const std::string corpus = testing::WriteToyCorpus("task_make");
  TaskContext context;
  context.config = testing::ToyConfig(corpus);
  auto lm = MakeTask(context);
  ASSERT_TRUE(lm.ok()) << lm.status();
  EXPECT_EQ((*lm)->train_size_unit(), "tokens");
  EXPECT_FALSE((*lm)->classifies());
  nlohmann::json summary;
  (*lm)->AddSummaryFields(&summary);
  EXPECT_TRUE(summary.contains("unigram_test_loss"));
  context.config.model.kind = "vgg";
  context.config.data.kind = "fashion-mnist";
  auto images = MakeTask(context);
  ASSERT_FALSE(images.ok()) << "no Fashion-MNIST files in a text corpus folder";
  EXPECT_NE(std::string(images.status().message()).find("data.dir"), std::string::npos)
      << images.status();
  std::filesystem::remove_all(corpus);
}

// The paired baselines: each split opens with one word repeated (alpha in valid, beta in test),
// longer than the one evaluation batch, and goes on with the toy text. So every label the
// evaluations average over is that word, and a unigram model's loss on them is the closed form
// -log((count + 1) / (N + V)) of the training split, far from its loss on the whole split.
TEST(TaskTest, MaskedLmUnigramBaselinesArePairedWithTheEvaluationTokens) {
  namespace fs = std::filesystem;
  const std::string dir = testing::WriteToyCorpus("task_unigram");
  const auto prepend = [&](const std::string& split, const std::string& word, int repeat) {
    std::ifstream in(fs::path(dir) / (split + ".txt"));
    const std::string rest((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream out(fs::path(dir) / (split + ".txt"));
    for (int i = 0; i < repeat; ++i) out << word << ' ';
    out << "\n" << rest;
  };
  prepend("train", "alpha beta", 30);  // 30 of each in training
  prepend("valid", "alpha", 200);
  prepend("test", "beta", 200);
  TaskContext context;
  context.config = testing::ToyConfig(dir);
  context.config.train.eval_batches = 1;  // 8 sequences of 16: 128 tokens, all of them the word
  auto lm = MakeTask(context);
  ASSERT_TRUE(lm.ok()) << lm.status();
  nlohmann::json summary;
  (*lm)->AddSummaryFields(&summary);

  auto corpus = LoadCorpus(dir);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  const double n = double(corpus->train.size()), v = double(corpus->vocab.size());
  const double closed_form = -std::log((30.0 + 1.0) / (n + v));
  EXPECT_NEAR(summary.at("unigram_eval_val_loss").get<double>(), closed_form, 1e-9);
  EXPECT_NEAR(summary.at("unigram_eval_test_loss").get<double>(), closed_form, 1e-9);
  EXPECT_NEAR(summary.at("unigram_eval_val_loss_at_mask").get<double>(), closed_form, 1e-9);
  EXPECT_NEAR(summary.at("unigram_test_loss").get<double>(),
              UnigramModel(corpus->train, corpus->vocab.size()).CrossEntropy(corpus->test), 1e-9);
  EXPECT_GT(std::abs(summary.at("unigram_test_loss").get<double>() -
                     summary.at("unigram_eval_test_loss").get<double>()),
            0.5)
      << "the whole test split is mostly the toy text, about three times as frequent in training "
         "as beta";

  fs::remove_all(dir);
}

// A masked-LM task on a fresh toy corpus in a folder named after `name` (removed by the caller);
// `mask_id`, when given, receives the corpus's [MASK] id (its vocabulary size). nullptr on error.
std::unique_ptr<MaskedLmTask> ToyMlmTask(const std::string& name, std::string* dir,
                                         int64_t* mask_id = nullptr) {
  *dir = testing::WriteToyCorpus(name);
  TaskContext context;
  context.config = testing::ToyConfig(*dir);
  auto task = MaskedLmTask::Create(context);
  EXPECT_TRUE(task.ok()) << task.status();
  if (mask_id != nullptr) {
    auto corpus = LoadCorpus(*dir);
    EXPECT_TRUE(corpus.ok()) << corpus.status();
    if (!corpus.ok()) return nullptr;
    *mask_id = corpus->vocab.size();
  }
  return task.ok() ? std::move(*task) : nullptr;
}

// A probe of more samples than the batch holds is refused, naming both (the Task contract; the
// image task has the same check).
TEST(TaskTest, MaskedLmProbeRefusesABatchShorterThanTheProbe) {
  namespace fs = std::filesystem;
  std::string dir;
  auto task = ToyMlmTask("task_short_probe", &dir);
  ASSERT_NE(task, nullptr);
  auto gram = spectral::MakeEstimator("gram");
  ASSERT_TRUE(gram.ok()) << gram.status();
  const std::unique_ptr<TaskBatch> two = task->NextBatch(2);
  auto probe = task->RecordProbe(*two, 3, **gram);
  EXPECT_EQ(probe.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(probe.status().message()).find("probe batch has 2 sequences, "
                                                       "policy.probe_samples is 3"),
            std::string::npos)
      << probe.status();
  EXPECT_TRUE(task->RecordProbe(*two, 2, **gram).ok());
  fs::remove_all(dir);
}

// On mixed text, the [MASK]-only baselines and losses cover exactly the predicted positions whose
// input is [MASK]: rebuilt here from the task's evaluation batches by reading each position's
// input token.
TEST(TaskTest, MaskedLmLossAtMaskCoversThePositionsShowingMask) {
  namespace fs = std::filesystem;
  std::string dir;
  auto task = ToyMlmTask("task_at_mask", &dir);
  ASSERT_NE(task, nullptr);
  auto corpus = LoadCorpus(dir);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  const int64_t real = corpus->vocab.size();  // [MASK]'s id
  nlohmann::json summary;
  task->AddSummaryFields(&summary);

  struct Split {
    EvalSplit split;
    std::string name;
  };
  for (const Split& split : {Split{EvalSplit::kValid, "val"}, Split{EvalSplit::kTest, "test"}}) {
    SCOPED_TRACE(split.name);
    const std::vector<MlmBatch>& batches = task->eval_batches(split.split);
    std::vector<int32_t> at_mask, shown;
    for (const MlmBatch& b : batches) {
      const auto ids = b.input_ids.reshape({-1});
      for (int64_t i = 0; i < b.positions.size(0); ++i) {
        const int32_t label = int32_t(b.labels[i].item<int64_t>());
        (ids[b.positions[i].item<int64_t>()].item<int64_t>() == real ? at_mask : shown)
            .push_back(label);
      }
    }
    ASSERT_FALSE(at_mask.empty());
    ASSERT_FALSE(shown.empty()) << "no random or unchanged position: nothing told apart";
    EXPECT_NEAR(summary.at("unigram_eval_" + split.name + "_loss_at_mask").get<double>(),
                UnigramModel(corpus->train, real).CrossEntropy(at_mask), 1e-9);

    // The loss there, from the model's own per-position losses over the same batches.
    const EvalResult result = task->Evaluate(split.split);
    double sum_mask = 0, sum = 0;
    int64_t n = 0;
    {
      torch::NoGradGuard guard;
      task->model()->eval();
      for (const MlmBatch& b : batches) {
        const torch::Tensor ce = torch::nn::functional::cross_entropy(
            task->model()->forward(b.input_ids, b.positions), b.labels,
            torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
        const auto ids = b.input_ids.reshape({-1});
        for (int64_t i = 0; i < ce.size(0); ++i) {
          const double x = ce[i].item<double>();
          sum += x;
          if (ids[b.positions[i].item<int64_t>()].item<int64_t>() == real) {
            sum_mask += x;
            ++n;
          }
        }
      }
      task->model()->train();
    }
    EXPECT_NEAR(result.loss, sum / double(at_mask.size() + shown.size()), 1e-5);
    ASSERT_TRUE(result.loss_at_mask.has_value());
    EXPECT_NEAR(*result.loss_at_mask, sum_mask / double(n), 1e-5);
  }
  fs::remove_all(dir);
}

// Batches in which no predicted position shows [MASK] (each [MASK] input put back to its label)
// have a loss but no loss at [MASK]: NaN, not 0 or the loss.
TEST(TaskTest, MaskedLmLossAtMaskIsNanWhenNoPositionShowsMask) {
  namespace fs = std::filesystem;
  std::string dir;
  int64_t real = -1;  // [MASK]'s id
  auto task = ToyMlmTask("task_no_mask", &dir, &real);
  ASSERT_NE(task, nullptr);
  std::vector<MlmBatch> unmasked;
  int64_t put_back = 0;
  for (const MlmBatch& b : task->eval_batches(EvalSplit::kValid)) {
    MlmBatch c{b.input_ids.clone(), b.positions, b.labels};
    auto ids = c.input_ids.view({-1});
    for (int64_t i = 0; i < c.positions.size(0); ++i) {
      const int64_t at = c.positions[i].item<int64_t>();
      if (ids[at].item<int64_t>() == real) {
        ids[at] = c.labels[i];
        ++put_back;
      }
    }
    ASSERT_EQ(c.input_ids.eq(real).sum().item<int64_t>(), 0);
    unmasked.push_back(std::move(c));
  }
  ASSERT_GT(put_back, 0) << "the toy batches showed no [MASK]: nothing tested";
  const EvalResult result = task->Evaluate(unmasked);
  EXPECT_TRUE(std::isfinite(result.loss)) << result.loss;
  ASSERT_TRUE(result.loss_at_mask.has_value());
  EXPECT_TRUE(std::isnan(*result.loss_at_mask)) << *result.loss_at_mask;
  // The task's own batches, untouched, still have one.
  const EvalResult own = task->Evaluate(EvalSplit::kValid);
  ASSERT_TRUE(own.loss_at_mask.has_value());
  EXPECT_TRUE(std::isfinite(*own.loss_at_mask));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace mat::trainer
