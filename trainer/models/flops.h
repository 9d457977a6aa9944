// Analytic FLOP accounting for the BERT masked-LM step, by phase (DESIGN §6).
//
// A multiply-add is 2 FLOPs. Counted: every matmul (linear maps, attention scores and
// context), forward, activation gradients and weight gradients, each only where it is computed:
// a masked-off module's weight gradient counts zero. Element-wise work (softmax, GELU,
// LayerNorm, dropout, the optimizer) and embedding lookups count zero. The decoder (tied
// embedding, [M, d] x [d, V]) is counted separately so the "without embedding/decoder" figure
// the paper uses is available.
//
// Switch layers (BertConfig::experts > 0): the router (d x E, always trained) counts for every
// token in all three phases; expert e's two matmuls (d x d_ff each) count only for the tokens it
// actually processed in that step (`routed`, BertMlm::RoutedTokens(); overflow tokens cost
// nothing), in forward and activation_grad, and in weight_grad only while expert e is active.
// Without `routed` every token is assumed processed, spread evenly over the experts.
//
// With BertConfig::detach_masked a masked head's attention backward and its slices of the QKV
// and W_O input gradients count zero, and so do a masked FFN slice's W_1 and W_2 input
// gradients (Switch experts keep the weights accounting).
#pragma once

#include <cstdint>
#include <vector>

#include "trainer/models/bert.h"

namespace mat::trainer {

struct FlopCounts {
  double forward = 0;
  double activation_grad = 0;
  double weight_grad = 0;
  double spectral = 0;
  double decoder = 0;  // part of the phases above that belongs to the decoder (a probe's passes too)

  double total() const { return forward + activation_grad + weight_grad + spectral; }
  double total_without_decoder() const { return total() - decoder; }
  FlopCounts& operator+=(const FlopCounts& o);
};

// One training step of `c` on a [batch, seq] input with `masked` predicted positions.
// active: one flag per module (BertMlm::Partition order); empty = all active.
// routed: tokens processed per expert (BertMlm::RoutedTokens() order); empty = even spread.
FlopCounts BertStepFlops(const BertConfig& c, int64_t batch, int64_t seq, int64_t masked,
                         const std::vector<uint8_t>& active,
                         const std::vector<int64_t>& routed = {});

// One pass through the tied decoder ([M, d] x [d, V]) on `masked` predicted positions: its
// forward, its activation gradient and its weight gradient each cost this much.
double BertDecoderPassFlops(const BertConfig& c, int64_t masked);

// The forward pass only (evaluation or the probe's forward).
FlopCounts BertForwardFlops(const BertConfig& c, int64_t batch, int64_t seq, int64_t masked,
                            const std::vector<int64_t>& routed = {});

}  // namespace mat::trainer
