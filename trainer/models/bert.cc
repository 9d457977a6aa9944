#include "trainer/models/bert.h"

#include <cmath>
#include <utility>
#include <vector>

#include "trainer/models/dropout.h"
#include "trainer/models/sliced_linear.h"

namespace mat::trainer {
namespace F = torch::nn::functional;

namespace {
torch::Tensor Normal(std::vector<int64_t> shape) { return torch::randn(shape) * 0.02; }

// Layer norms take float32 (their weights' dtype): under bf16 autocast a bf16 activation is cast
// up first (CUDA's autocast does this itself; LibTorch 1.13's CPU layer_norm rejects the mix).
torch::Tensor UpIfLow(const torch::Tensor& t) {
  const auto d = t.scalar_type();
  return d == torch::kBFloat16 || d == torch::kHalf ? t.to(torch::kFloat) : t;
}
}  // namespace

bool IsSwitchLayer(const BertConfig& c, int64_t layer) {
  return c.experts > 0 && layer % std::max<int64_t>(c.moe_every, 1) == 0;
}

int64_t NumSwitchLayers(const BertConfig& c) {
  int64_t n = 0;
  for (int64_t l = 0; l < c.layers; ++l) n += IsSwitchLayer(c, l);
  return n;
}

BertLayerImpl::BertLayerImpl(const BertConfig& c, int layer) : c_(c) {
  const int64_t dh = c.d_model / c.heads;
  const char* comp[3] = {"q", "k", "v"};
  qkv_w.resize(c.heads);
  qkv_b.resize(c.heads);
  for (int64_t h = 0; h < c.heads; ++h) {
    for (int k = 0; k < 3; ++k) {
      std::string n = std::string(comp[k]) + std::to_string(h);
      qkv_w[h].push_back(register_parameter("w" + n, Normal({dh, c.d_model})));
      qkv_b[h].push_back(register_parameter("b" + n, torch::zeros({dh})));
    }
    o_w.push_back(register_parameter("wo" + std::to_string(h), Normal({c.d_model, dh})));
  }
  o_b = register_parameter("bo", torch::zeros({c.d_model}));
  ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})));
  ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})));
  if (IsSwitchLayer(c, layer)) {
    TORCH_CHECK(c.ffn_groups == 0, "a Switch layer has experts, not FFN slices (ffn_groups ",
                c.ffn_groups, ")");
    SwitchFfnConfig sc;
    sc.d_model = c.d_model;
    sc.d_ff = c.d_ff;
    sc.experts = c.experts;
    sc.capacity_factor = c.capacity_factor;
    sc.dropout = c.dropout;
    moe = register_module("moe", SwitchFfn(sc));
    return;
  }
  const int64_t groups = std::max<int64_t>(c.ffn_groups, 1);
  const int64_t fs = c.d_ff / groups;
  ff1_w.resize(groups);
  ff1_b.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    ff1_w[g].push_back(register_parameter("wff1_" + std::to_string(g), Normal({fs, c.d_model})));
    ff1_b[g].push_back(register_parameter("bff1_" + std::to_string(g), torch::zeros({fs})));
    ff2_w.push_back(register_parameter("wff2_" + std::to_string(g), Normal({c.d_model, fs})));
  }
  ff2_b = register_parameter("bff2", torch::zeros({c.d_model}));
}

void BertLayerImpl::set_recorder(spectral::SiteRecorder* r, std::vector<int> head_modules,
                                 std::vector<int> ffn_modules, std::vector<int> expert_modules) {
  recorder_ = r;
  head_modules_ = std::move(head_modules);
  ffn_modules_ = std::move(ffn_modules);
  if (!moe.is_empty()) moe->set_recorder(r, std::move(expert_modules));
}

torch::Tensor BertLayerImpl::HeadsForward(const torch::Tensor& x, const std::vector<int>& order,
                                          size_t num_attached) {
  const int64_t B = x.size(0), T = x.size(1), H = int64_t(order.size()),
                dh = c_.d_model / c_.heads;
  torch::Tensor qkv = RowSplitForward(x, qkv_w, qkv_b, order, num_attached);  // [B,T,3*H*dh]
  if (recorder_ != nullptr) {
    spectral::LinearSite site{x, qkv, {}};
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t k = 0; k < 3; ++k) {
        int64_t begin = k * H * dh + i * dh;
        site.slices.push_back({head_modules_[order[i]], spectral::SliceAxis::kRows, begin,
                               begin + dh, true});
      }
    }
    recorder_->Record(std::move(site));
  }
  std::vector<torch::Tensor> parts = qkv.chunk(3, -1);
  auto heads = [&](const torch::Tensor& t) { return t.view({B, T, H, dh}).transpose(1, 2); };
  torch::Tensor q = heads(parts[0]), k = heads(parts[1]), v = heads(parts[2]);  // [B,H,T,dh]
  torch::Tensor scores = torch::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(double(dh)));
  torch::Tensor probs = Dropout(torch::softmax(scores, -1), c_.dropout, is_training());
  torch::Tensor ctx = torch::matmul(probs, v).transpose(1, 2).reshape({B, T, H * dh});
  torch::Tensor y = ColSplitForward(ctx, o_w, order, num_attached);  // [B,T,d]
  if (recorder_ != nullptr) {
    spectral::LinearSite site{ctx, y, {}};
    for (int64_t i = 0; i < H; ++i) {
      site.slices.push_back(
          {head_modules_[order[i]], spectral::SliceAxis::kCols, i * dh, (i + 1) * dh, false});
    }
    recorder_->Record(std::move(site));
  }
  return y;
}

namespace {

// Splits an active-first order into its active and masked parts.
std::pair<std::vector<int>, std::vector<int>> SplitOrder(const std::vector<int>& order,
                                                         size_t num_active) {
  return {std::vector<int>(order.begin(), order.begin() + num_active),
          std::vector<int>(order.begin() + num_active, order.end())};
}

}  // namespace

torch::Tensor BertLayerImpl::Attention(const torch::Tensor& x, const std::vector<bool>& active) {
  size_t num_active = 0;
  std::vector<int> order = ActiveFirstOrder(active, &num_active);
  if (!c_.detach_masked || num_active == order.size()) {
    return HeadsForward(x, order, num_active) + o_b;
  }
  // detach: the masked heads run outside autograd (a constant in the backward), the active ones
  // in a graph of their own, so no backward work is done for the masked heads at all.
  auto [on, off] = SplitOrder(order, num_active);
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = HeadsForward(x.detach(), off, 0);
  }
  if (!on.empty()) y = HeadsForward(x, on, on.size()) + y;
  return y + o_b;
}

torch::Tensor BertLayerImpl::SlicesForward(const torch::Tensor& x, const std::vector<int>& order,
                                           size_t num_attached) {
  torch::Tensor h = RowSplitForward(x, ff1_w, ff1_b, order, num_attached);
  const bool record = recorder_ != nullptr && !ffn_modules_.empty();
  const int64_t fs = ff2_w[0].size(1);
  if (record) {
    spectral::LinearSite site{x, h, {}};
    for (size_t i = 0; i < order.size(); ++i) {
      site.slices.push_back({ffn_modules_[order[i]], spectral::SliceAxis::kRows,
                             int64_t(i) * fs, int64_t(i + 1) * fs, true});
    }
    recorder_->Record(std::move(site));
  }
  torch::Tensor a = Dropout(F::gelu(h), c_.dropout, is_training());
  torch::Tensor y = ColSplitForward(a, ff2_w, order, num_attached);
  if (record) {
    spectral::LinearSite site{a, y, {}};
    for (size_t i = 0; i < order.size(); ++i) {
      site.slices.push_back({ffn_modules_[order[i]], spectral::SliceAxis::kCols,
                             int64_t(i) * fs, int64_t(i + 1) * fs, false});
    }
    recorder_->Record(std::move(site));
  }
  return y;
}

torch::Tensor BertLayerImpl::FeedForward(const torch::Tensor& x, const std::vector<bool>& active,
                                         const std::vector<bool>& expert_active) {
  if (!moe.is_empty()) return moe(x, expert_active);
  if (active.empty()) return SlicesForward(x, {0}, 1) + ff2_b;
  size_t num_active = 0;
  std::vector<int> order = ActiveFirstOrder(active, &num_active);
  if (!c_.detach_masked || num_active == order.size()) {
    return SlicesForward(x, order, num_active) + ff2_b;
  }
  auto [on, off] = SplitOrder(order, num_active);  // detach: as in Attention
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = SlicesForward(x.detach(), off, 0);
  }
  if (!on.empty()) y = SlicesForward(x, on, on.size()) + y;
  return y + ff2_b;
}

torch::Tensor BertLayerImpl::forward(const torch::Tensor& x, const std::vector<bool>& head_active,
                                     const std::vector<bool>& ffn_active,
                                     const std::vector<bool>& expert_active) {
  auto drop = [&](const torch::Tensor& t) {
    return Dropout(t, c_.dropout, is_training());
  };
  if (c_.pre_ln) {
    torch::Tensor h = x + drop(Attention(ln1(UpIfLow(x)), head_active));
    return h + drop(FeedForward(ln2(UpIfLow(h)), ffn_active, expert_active));
  }
  torch::Tensor h = ln1(UpIfLow(x + drop(Attention(x, head_active))));
  return ln2(UpIfLow(h + drop(FeedForward(h, ffn_active, expert_active))));
}

BertMlmImpl::BertMlmImpl(const BertConfig& c) : c_(c) {
  tok_emb = register_module("tok_emb", torch::nn::Embedding(c.vocab_size, c.d_model));
  pos_emb = register_module("pos_emb", torch::nn::Embedding(c.max_seq_len, c.d_model));
  {
    torch::NoGradGuard g;
    tok_emb->weight.normal_(0, 0.02);
    pos_emb->weight.normal_(0, 0.02);
  }
  emb_ln = register_module("emb_ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})));
  for (int64_t l = 0; l < c.layers; ++l) {
    layers.push_back(register_module("layer" + std::to_string(l), BertLayer(c, int(l))));
  }
  head_dense = register_module("head_dense", torch::nn::Linear(c.d_model, c.d_model));
  {
    torch::NoGradGuard g;
    head_dense->weight.normal_(0, 0.02);
    head_dense->bias.zero_();
  }
  head_ln = register_module("head_ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})));
  decoder_bias = register_parameter("decoder_bias", torch::zeros({c.vocab_size}));
  head_active_.assign(c.layers, std::vector<bool>(c.heads, true));
  ffn_active_.assign(c.layers, std::vector<bool>(c.ffn_groups, true));
  expert_active_.assign(c.layers, {});
  for (int64_t l = 0; l < c.layers; ++l)
    if (IsSwitchLayer(c, l)) expert_active_[l].assign(c.experts, true);
  num_modules_ = int(c.layers * (c.heads + c.ffn_groups) + NumSwitchLayers(c) * c.experts);
}

torch::Tensor BertMlmImpl::forward(const torch::Tensor& input_ids, const torch::Tensor& positions) {
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  torch::Tensor pos = torch::arange(T, input_ids.options());
  torch::Tensor x = tok_emb(input_ids) + pos_emb(pos).unsqueeze(0);
  x = Dropout(emb_ln(x), c_.dropout, is_training());
  for (int64_t l = 0; l < c_.layers; ++l) {
    x = layers[l](x, head_active_[l], ffn_active_[l], expert_active_[l]);
  }
  // Predict only the masked positions: [M, d] -> [M, V].
  torch::Tensor h = x.reshape({B * T, c_.d_model}).index_select(0, positions);
  h = head_ln(UpIfLow(F::gelu(head_dense(h))));
  return F::linear(h, tok_emb->weight, decoder_bias);
}

spectral::ModulePartition BertMlmImpl::Partition() {
  spectral::ModulePartition p;
  for (int64_t l = 0; l < c_.layers; ++l) {
    for (int64_t h = 0; h < c_.heads; ++h) {
      spectral::ModuleSpec m{"heads", int(l), int(h), "layer" + std::to_string(l) + ".head" + std::to_string(h), {}};
      for (int k = 0; k < 3; ++k) {
        m.params.push_back(layers[l]->qkv_w[h][k]);
        m.params.push_back(layers[l]->qkv_b[h][k]);
      }
      m.params.push_back(layers[l]->o_w[h]);
      p.modules.push_back(std::move(m));
    }
  }
  for (int64_t l = 0; l < c_.layers; ++l) {
    for (int64_t g = 0; g < c_.ffn_groups; ++g) {
      spectral::ModuleSpec m{"ffn", int(l), int(g), "layer" + std::to_string(l) + ".ffn" + std::to_string(g), {}};
      m.params = {layers[l]->ff1_w[g][0], layers[l]->ff1_b[g][0], layers[l]->ff2_w[g]};
      p.modules.push_back(std::move(m));
    }
  }
  for (int64_t l = 0; l < c_.layers; ++l) {
    if (!IsSwitchLayer(c_, l)) continue;
    const SwitchFfn& moe = layers[l]->moe;
    for (int64_t e = 0; e < c_.experts; ++e) {
      spectral::ModuleSpec m{"experts", int(l), int(e),
                             "layer" + std::to_string(l) + ".expert" + std::to_string(e), {}};
      m.params = {moe->w1[e], moe->b1[e], moe->w2[e], moe->b2[e]};
      p.modules.push_back(std::move(m));
    }
  }
  return p;
}

torch::Tensor BertMlmImpl::aux_loss() const {
  torch::Tensor sum;
  for (int64_t l = 0; l < c_.layers; ++l) {
    if (!IsSwitchLayer(c_, l)) continue;
    const torch::Tensor& a = layers[l]->moe->aux_loss();
    if (!a.defined()) continue;
    sum = sum.defined() ? sum + a : a;
  }
  return sum.defined() ? sum * c_.aux_loss_weight : sum;
}

std::vector<int64_t> BertMlmImpl::RoutedTokens() const {
  std::vector<int64_t> out;
  for (int64_t l = 0; l < c_.layers; ++l) {
    if (!IsSwitchLayer(c_, l)) continue;
    const auto& r = layers[l]->moe->routed_tokens();
    out.insert(out.end(), r.begin(), r.end());
  }
  return out;
}

void BertMlmImpl::SetMask(const std::vector<uint8_t>& active) {
  TORCH_CHECK(int(active.size()) == num_modules_, "mask has ", active.size(), " bits, model has ",
              num_modules_, " modules");
  size_t i = 0;
  for (int64_t l = 0; l < c_.layers; ++l)
    for (int64_t h = 0; h < c_.heads; ++h) head_active_[l][h] = active[i++] != 0;
  for (int64_t l = 0; l < c_.layers; ++l)
    for (int64_t g = 0; g < c_.ffn_groups; ++g) ffn_active_[l][g] = active[i++] != 0;
  for (int64_t l = 0; l < c_.layers; ++l)
    for (size_t e = 0; e < expert_active_[l].size(); ++e) expert_active_[l][e] = active[i++] != 0;
}

void BertMlmImpl::SetRecorder(spectral::SiteRecorder* recorder) {
  int heads_base = 0;
  int ffn_base = int(c_.layers * c_.heads);
  int expert_next = int(c_.layers * (c_.heads + c_.ffn_groups));
  for (int64_t l = 0; l < c_.layers; ++l) {
    std::vector<int> hm, fm, em;
    for (int64_t h = 0; h < c_.heads; ++h) hm.push_back(heads_base + int(l * c_.heads + h));
    for (int64_t g = 0; g < c_.ffn_groups; ++g) fm.push_back(ffn_base + int(l * c_.ffn_groups + g));
    for (size_t e = 0; e < expert_active_[l].size(); ++e) em.push_back(expert_next++);
    layers[l]->set_recorder(recorder, hm, fm, em);
  }
}

}  // namespace mat::trainer
