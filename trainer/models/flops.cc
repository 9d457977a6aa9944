#include "trainer/models/flops.h"

namespace mat::trainer {

FlopCounts& FlopCounts::operator+=(const FlopCounts& o) {
  forward += o.forward;
  activation_grad += o.activation_grad;
  weight_grad += o.weight_grad;
  spectral += o.spectral;
  decoder += o.decoder;
  return *this;
}

double BertDecoderPassFlops(const BertConfig& c, int64_t masked) {
  return 2 * double(masked) * double(c.d_model) * double(c.vocab_size);
}

namespace {

FlopCounts Count(const BertConfig& c, int64_t B, int64_t T, int64_t M,
                 const std::vector<uint8_t>& active, const std::vector<int64_t>& routed,
                 bool backward) {
  const double N = double(B) * T;  // tokens
  const double d = double(c.d_model), dh = d / c.heads, f = double(c.d_ff);
  const int64_t G = c.ffn_groups;
  FlopCounts r;
  size_t heads_base = 0, ffn_base = size_t(c.layers * c.heads);
  size_t expert_next = size_t(c.layers * (c.heads + G));  // module index of the next expert
  size_t routed_next = 0;                                  // its index in `routed`
  for (int64_t l = 0; l < c.layers; ++l) {
    double heads_on = 0, ffn_on_frac = 1;
    for (int64_t h = 0; h < c.heads; ++h)
      heads_on += active.empty() ? 1 : active[heads_base + l * c.heads + h];
    if (G > 0) {
      double on = 0;
      for (int64_t g = 0; g < G; ++g) on += active.empty() ? 1 : active[ffn_base + l * G + g];
      ffn_on_frac = on / G;
    }
    const double qkv = 2 * N * d * 3 * d, out = 2 * N * d * d;
    const double attn = 2 * 2 * double(B) * c.heads * double(T) * T * dh;  // QK^T and PV
    double ffn = 0, ffn_weight = 0;
    if (IsSwitchLayer(c, l)) {
      const double router = 2 * N * d * double(c.experts);
      ffn = router;
      ffn_weight = router;
      for (int64_t e = 0; e < c.experts; ++e, ++expert_next, ++routed_next) {
        const double tokens =
            routed.empty() ? N / double(c.experts) : double(routed.at(routed_next));
        const double expert = 2 * 2 * tokens * d * f;
        ffn += expert;
        if (active.empty() || active[expert_next]) ffn_weight += expert;
      }
    } else {
      ffn = 2 * 2 * N * d * f;
      ffn_weight = ffn * ffn_on_frac;
    }
    r.forward += qkv + out + ffn + attn;
    if (backward && c.detach_masked) {
      // A masked head or FFN slice is a constant in the backward: its attention backward and
      // its slices of the QKV, W_O, W_1 and W_2 input gradients are not computed.
      const double ffn_act = IsSwitchLayer(c, l) ? ffn : ffn * ffn_on_frac;
      r.activation_grad += (qkv + out + 2 * attn) * (heads_on / c.heads) + ffn_act;
      r.weight_grad += (qkv + out) * (heads_on / c.heads) + ffn_weight;
    } else if (backward) {
      r.activation_grad += qkv + out + ffn + 2 * attn;  // both operands of QK^T and PV
      r.weight_grad += (qkv + out) * (heads_on / c.heads) + ffn_weight;
    }
  }
  // MLM head on the M predicted positions: dense d x d, then the tied decoder d x V.
  const double dense = 2 * double(M) * d * d, dec = BertDecoderPassFlops(c, M);
  r.forward += dense + dec;
  r.decoder += dec;
  if (backward) {
    r.activation_grad += dense + dec;
    r.weight_grad += dense + dec;
    r.decoder += 2 * dec;
  }
  return r;
}

}  // namespace

FlopCounts BertStepFlops(const BertConfig& c, int64_t batch, int64_t seq, int64_t masked,
                         const std::vector<uint8_t>& active, const std::vector<int64_t>& routed) {
  return Count(c, batch, seq, masked, active, routed, true);
}

FlopCounts BertForwardFlops(const BertConfig& c, int64_t batch, int64_t seq, int64_t masked,
                            const std::vector<int64_t>& routed) {
  return Count(c, batch, seq, masked, {}, routed, false);
}

}  // namespace mat::trainer
