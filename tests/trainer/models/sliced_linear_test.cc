// trainer/models/sliced_linear.h: ColSplitForward's shared bias (W_O's and W_2's) is added in the
// same matmul and trained whatever blocks are attached; the weight gradient has the attached
// blocks' rows only; under bf16 autocast the output stays bf16, as nn.Linear's does.
#include "trainer/models/sliced_linear.h"

#include <atomic>
#include <memory>
#include <string>

#include <ATen/record_function.h>
#include <gtest/gtest.h>

#include "trainer/models/autocast.h"

namespace mat::trainer {
namespace {

namespace F = torch::nn::functional;

class ColSplitBiasTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(3);
    auto f64 = torch::TensorOptions().dtype(torch::kDouble);
    x_ = torch::randn({2, 5, 6}, f64);
    w_t_ = torch::randn({6, 4}, f64).requires_grad_(true);  // W^T: input units are rows
    b_ = torch::randn({4}, f64).requires_grad_(true);
    r_ = torch::randn({2, 5, 4}, f64);  // the loss is sum(y * r): dL/dy = r
  }

  torch::Tensor x_, w_t_, b_, r_;
  const std::vector<RowBlock> blocks_ = EqualBlocks(3, 2);
};

TEST_F(ColSplitBiasTest, TheBiasIsAddedAndTrainedWhateverIsAttached) {
  for (const std::vector<bool>& attached :
       {std::vector<bool>{true, true, true}, {true, false, true}, {false, false, false}}) {
    SCOPED_TRACE(::testing::Message() << attached[0] << attached[1] << attached[2]);
    w_t_.mutable_grad().reset();
    b_.mutable_grad().reset();
    torch::Tensor y = ColSplitForward(x_, w_t_, blocks_, attached, b_);
    ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, 4}));
    const torch::Tensor want = F::linear(x_, w_t_.detach().t(), b_.detach());
    EXPECT_TRUE(torch::allclose(y.detach(), want, 1e-12, 1e-12));
    (y * r_).sum().backward();
    ASSERT_TRUE(b_.grad().defined()) << "the shared bias belongs to no block";
    EXPECT_TRUE(torch::allclose(b_.grad(), r_.sum(std::vector<int64_t>{0, 1}), 1e-12, 1e-12));
    const bool any = attached[0] || attached[1] || attached[2];
    ASSERT_EQ(w_t_.grad().defined(), any);
    if (!any) continue;
    // dL/dW^T = x^T r over the batch; rows of detached blocks stay zero.
    const torch::Tensor full = torch::matmul(x_.reshape({-1, 6}).t(), r_.reshape({-1, 4}));
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const int64_t n = blocks_[i].end - blocks_[i].begin;
      const torch::Tensor got = w_t_.grad().narrow(0, blocks_[i].begin, n);
      if (attached[i]) {
        EXPECT_TRUE(torch::allclose(got, full.narrow(0, blocks_[i].begin, n), 1e-12, 1e-12)) << i;
      } else {
        EXPECT_EQ(got.abs().max().item<double>(), 0.0) << i;
      }
    }
  }
}

TEST_F(ColSplitBiasTest, WithoutABiasTheMapHasNone) {
  torch::Tensor y = ColSplitForward(x_, w_t_, blocks_, {true, true, true});
  EXPECT_TRUE(torch::allclose(y.detach(), torch::matmul(x_, w_t_.detach()), 1e-12, 1e-12));
}

TEST_F(ColSplitBiasTest, UnderBf16AutocastTheOutputIsBf16AsNnLinears) {
  torch::Tensor x = x_.to(torch::kFloat), w_t = w_t_.detach().to(torch::kFloat).requires_grad_(true),
                b = b_.detach().to(torch::kFloat).requires_grad_(true);
  torch::Tensor y, want;
  {
    AutocastGuard bf16(torch::Device(torch::kCPU), Precision::kBFloat16);
    y = ColSplitForward(x, w_t, blocks_, {true, true, true}, b);
    want = F::linear(x, w_t.detach().t(), b.detach());
  }
  // A separate fp32 bias add after a bf16 matmul promoted the sum to float32.
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(want.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::allclose(y.to(torch::kFloat), want.to(torch::kFloat), 2e-2, 2e-2));
  (y.to(torch::kFloat) * r_.to(torch::kFloat)).sum().backward();
  ASSERT_TRUE(b.grad().defined());
  EXPECT_EQ(b.grad().scalar_type(), torch::kFloat) << "the leaf's dtype";
  EXPECT_TRUE(torch::allclose(b.grad(), r_.sum(std::vector<int64_t>{0, 1}).to(torch::kFloat), 2e-2, 2e-2));
}

// The matmuls run while a MatmulCounter lives (a RecordFunction callback on every dispatched
// op): aten::mm and aten::addmm calls, innermost ones only (autocast's wrapper has the same name).
class MatmulCounter {
 public:
  MatmulCounter() {
    count_ = 0;
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(
        [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
          const std::string name = fn.name();
          if (name == "aten::mm" || name == "aten::addmm") ++count_;
          return nullptr;
        }));
  }
  ~MatmulCounter() { at::removeCallback(handle_); }
  int count() const { return count_; }

 private:
  static inline std::atomic<int> count_{0};
  at::CallbackHandle handle_;
};

// A λ probe differentiates the recorded maps' outputs, not the weights (autograd::grad with
// other inputs): the split maps' backward then computes no weight or bias gradient. It did, for
// every attached block: one matmul per map wasted in every probe.
TEST(SplitMapsTest, NoWeightGradientWhenTheCallerWantsOnlyTheInputs) {
  torch::manual_seed(4);
  torch::Tensor x = torch::randn({3, 5, 6}, torch::kDouble).requires_grad_(true);
  torch::Tensor w = torch::randn({4, 6}, torch::kDouble).requires_grad_(true);
  torch::Tensor b = torch::randn({4}, torch::kDouble).requires_grad_(true);
  const std::vector<RowBlock> blocks = EqualBlocks(2, 2);
  auto matmuls_in_backward = [&](const std::vector<torch::Tensor>& wrt) {
    torch::Tensor y = RowSplitForward(x, w, b, blocks, {true, true});
    std::vector<torch::Tensor> g;
    int matmuls = 0;
    {
      MatmulCounter counter;
      g = torch::autograd::grad({y.pow(2).sum()}, wrt);
      matmuls = counter.count();
    }
    EXPECT_TRUE(torch::allclose(g[0], 2 * torch::matmul(y.detach(), w.detach()), 1e-12, 1e-12));
    return matmuls;
  };
  EXPECT_EQ(matmuls_in_backward({x}), 1) << "the input gradient only";
  EXPECT_EQ(matmuls_in_backward({x, w}), 2) << "the input and the weight gradient";

  // The same for the per-expert maps: one matmul per expert with rows, for the input only.
  torch::Tensor we = torch::randn({2, 4, 6}, torch::kDouble).requires_grad_(true);
  torch::Tensor be = torch::randn({2, 4}, torch::kDouble).requires_grad_(true);
  torch::Tensor xe = torch::randn({5, 6}, torch::kDouble).requires_grad_(true);
  auto expert_matmuls = [&](const std::vector<torch::Tensor>& wrt) {
    torch::Tensor y = GroupedForward(xe, we, be, {2, 3}, {true, true});
    MatmulCounter counter;
    torch::autograd::grad({y.pow(2).sum()}, wrt);
    return counter.count();
  };
  EXPECT_EQ(expert_matmuls({xe}), 2);
  EXPECT_EQ(expert_matmuls({xe, we}), 4);
}

}  // namespace
}  // namespace mat::trainer
