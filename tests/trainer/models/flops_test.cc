// The analytic FLOP counter against a hand count of one layer.
#include "trainer/models/flops.h"

#include <gtest/gtest.h>

namespace mat::trainer {
namespace {

BertConfig OneLayer() {
  BertConfig c;
  c.vocab_size = 10;
  c.layers = 1;
  c.d_model = 8;
  c.heads = 2;
  c.d_ff = 16;
  return c;
}

// B = 2, T = 4 (N = 8 tokens), M = 3 predicted positions, d = 8, H = 2, d_h = 4, f = 16, V = 10.
//   QKV   2·N·d·3d          = 2·8·8·24   = 3072
//   O     2·N·d·d           = 2·8·8·8    = 1024
//   FFN   2·(2·N·d·f)       = 2·2·8·8·16 = 4096
//   attn  2·(2·B·H·T·T·d_h) = 4·2·2·16·4 = 1024  (QK^T and PV; backward: twice that)
//   dense 2·M·d·d           = 2·3·8·8    = 384
//   dec   2·M·d·V           = 2·3·8·10   = 480
TEST(FlopsTest, MatchesHandCountForOneLayer) {
  FlopCounts f = BertStepFlops(OneLayer(), 2, 4, 3, {});
  EXPECT_DOUBLE_EQ(f.forward, 3072 + 1024 + 4096 + 1024 + 384 + 480);
  EXPECT_DOUBLE_EQ(f.activation_grad, 3072 + 1024 + 4096 + 2048 + 384 + 480);
  EXPECT_DOUBLE_EQ(f.weight_grad, 3072 + 1024 + 4096 + 384 + 480);
  EXPECT_DOUBLE_EQ(f.decoder, 3 * 480);
  EXPECT_DOUBLE_EQ(BertDecoderPassFlops(OneLayer(), 3), 480);
  EXPECT_DOUBLE_EQ(f.spectral, 0);
  EXPECT_DOUBLE_EQ(f.total_without_decoder(), f.total() - 1440);
  EXPECT_DOUBLE_EQ(BertForwardFlops(OneLayer(), 2, 4, 3).total(), f.forward);
}

TEST(FlopsTest, MaskedHeadsSaveOnlyTheirWeightGradients) {
  FlopCounts full = BertStepFlops(OneLayer(), 2, 4, 3, {1, 1});
  FlopCounts half = BertStepFlops(OneLayer(), 2, 4, 3, {1, 0});
  FlopCounts none = BertStepFlops(OneLayer(), 2, 4, 3, {0, 0});
  EXPECT_DOUBLE_EQ(half.forward, full.forward);
  EXPECT_DOUBLE_EQ(half.activation_grad, full.activation_grad);
  EXPECT_DOUBLE_EQ(full.weight_grad - half.weight_grad, (3072 + 1024) / 2.0);
  EXPECT_DOUBLE_EQ(full.weight_grad - none.weight_grad, 3072 + 1024);
}

TEST(FlopsTest, FfnSlicesCountWhenTheyAreModules) {
  BertConfig c = OneLayer();
  c.ffn_groups = 4;
  // Modules: 2 heads, then 4 FFN slices; switch off 3 of the slices.
  FlopCounts f = BertStepFlops(c, 2, 4, 3, {1, 1, 1, 0, 0, 0});
  FlopCounts full = BertStepFlops(c, 2, 4, 3, {});
  EXPECT_DOUBLE_EQ(full.weight_grad - f.weight_grad, 4096 * 3.0 / 4.0);
}

// detach_masked: a masked head's QKV and W_O input gradients and its attention backward count
// zero too (one of two heads: half of 3072 + 1024 + 2048); the weight gradients as before.
TEST(FlopsTest, DetachSkipsTheMaskedHeadsInputGradientsToo) {
  BertConfig c = OneLayer();
  c.detach_masked = true;
  FlopCounts full = BertStepFlops(c, 2, 4, 3, {1, 1});
  FlopCounts half = BertStepFlops(c, 2, 4, 3, {1, 0});
  FlopCounts none = BertStepFlops(c, 2, 4, 3, {0, 0});
  EXPECT_DOUBLE_EQ(full.activation_grad, BertStepFlops(OneLayer(), 2, 4, 3, {1, 1}).activation_grad);
  EXPECT_DOUBLE_EQ(half.forward, full.forward);
  EXPECT_DOUBLE_EQ(full.activation_grad - half.activation_grad, (3072 + 1024 + 2048) / 2.0);
  EXPECT_DOUBLE_EQ(full.weight_grad - half.weight_grad, (3072 + 1024) / 2.0);
  // Every head masked: the FFN and the MLM head's backward are left.
  EXPECT_DOUBLE_EQ(none.activation_grad, 4096 + 384 + 480);
}

TEST(FlopsTest, DetachSkipsTheMaskedFfnSlicesInputGradients) {
  BertConfig c = OneLayer();
  c.ffn_groups = 4;
  c.detach_masked = true;
  FlopCounts f = BertStepFlops(c, 2, 4, 3, {1, 1, 1, 0, 0, 0});
  FlopCounts full = BertStepFlops(c, 2, 4, 3, {});
  EXPECT_DOUBLE_EQ(full.activation_grad - f.activation_grad, 4096 * 3.0 / 4.0);
  EXPECT_DOUBLE_EQ(full.weight_grad - f.weight_grad, 4096 * 3.0 / 4.0);
}

}  // namespace
}  // namespace mat::trainer
