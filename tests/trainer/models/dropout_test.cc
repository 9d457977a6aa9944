// trainer/models/dropout.h: the hash-filled CPU dropout keeps F::dropout's semantics (drop rate, scale,
// gradient, identity outside training) and is reproducible from the torch seed and independent of
// the thread count.
#include "trainer/models/dropout.h"

#include <gtest/gtest.h>

namespace mat::trainer {
namespace {

TEST(DropoutTest, DropsAtRatePAndScalesTheRest) {
  for (double p : {0.1, 0.5}) {
    torch::Tensor noise = DropoutNoise(torch::empty({1000, 1000}), p, 42);
    const double dropped = (noise == 0).to(torch::kDouble).mean().item<double>();
    // 10^6 Bernoulli draws: standard deviation sqrt(p(1-p)/n) <= 5e-4; allow 6 of them.
    EXPECT_NEAR(dropped, p, 3e-3) << "p " << p;
    torch::Tensor kept = noise.masked_select(noise != 0);
    EXPECT_TRUE(torch::allclose(kept, torch::full_like(kept, 1.0 / (1.0 - p)))) << "p " << p;
  }
}

TEST(DropoutTest, NeighboursAreIndependent) {
  // Both halves of one hash and consecutive hashes: P(both dropped) = p^2.
  const double p = 0.3;
  torch::Tensor drop = (DropoutNoise(torch::empty({1 << 20}), p, 7) == 0).to(torch::kDouble);
  const double both_even = (drop.slice(0, 0, -1, 2) * drop.slice(0, 1, at::nullopt, 2)).mean().item<double>();
  const double both_odd = (drop.slice(0, 1, -1, 2) * drop.slice(0, 2, at::nullopt, 2)).mean().item<double>();
  EXPECT_NEAR(both_even, p * p, 4e-3);
  EXPECT_NEAR(both_odd, p * p, 4e-3);
}

TEST(DropoutTest, ReproducibleFromTheTorchSeedAndIndependentOfThreads) {
  torch::Tensor x = torch::ones({64, 257});
  const int threads = torch::get_num_threads();
  torch::manual_seed(5);
  torch::Tensor a = Dropout(x, 0.2, true);
  torch::manual_seed(5);
  torch::set_num_threads(1);
  torch::Tensor b = Dropout(x, 0.2, true);
  torch::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(a, b));
  torch::Tensor c = Dropout(x, 0.2, true);  // the generator moved on: another mask
  EXPECT_FALSE(torch::equal(a, c));
  torch::manual_seed(6);
  EXPECT_FALSE(torch::equal(a, Dropout(x, 0.2, true)));
}

TEST(DropoutTest, GradientIsTheNoiseAndEvalIsIdentity) {
  torch::Tensor x = torch::randn({33, 17}, torch::requires_grad());
  torch::Tensor y = Dropout(x, 0.25, true);
  y.sum().backward();
  torch::Tensor noise = (y / x).detach();
  EXPECT_TRUE(torch::allclose(x.grad(), noise, 1e-5, 1e-6));
  EXPECT_TRUE(torch::equal(Dropout(x, 0.25, false), x));
  EXPECT_TRUE(torch::equal(Dropout(x, 0.0, true), x));
  torch::Tensor h = Dropout(torch::ones({8, 8}, torch::kBFloat16), 0.5, true);
  EXPECT_EQ(h.scalar_type(), torch::kBFloat16);
}

}  // namespace
}  // namespace mat::trainer
