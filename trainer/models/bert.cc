#include "trainer/models/bert.h"

#include <cmath>
#include <utility>
#include <vector>

#include "trainer/models/dropout.h"
#include "trainer/models/model_io.h"

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

// qkv [B, T, H, 3, d_h] -> q, k, v, each [B, H, T, d_h] contiguous, so the batched matmuls read
// contiguous operands: one strided copy forward. The backward writes the three gradients into
// one [B, T, H, 3, d_h] tensor with one stack. (Autograd's own backward of permute, contiguous
// and unbind stacks them as [3, B, H, T, d_h] and then copies that again into qkv's layout;
// three selects of qkv would each write a zero-filled tensor of qkv's size.)
class SplitQkv : public torch::autograd::Function<SplitQkv> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext*,
                                                const torch::Tensor& qkv) {
    return qkv.permute({3, 0, 2, 1, 4}).contiguous().unbind(0);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    // Autograd materializes an unused output's gradient as zeros: all three are defined.
    std::vector<torch::Tensor> parts;
    for (const torch::Tensor& g : grads) parts.push_back(g.permute({0, 2, 1, 3}));  // [B,T,H,d_h]
    return {torch::stack(parts, 3)};
  }
};
}  // namespace

bool IsSwitchLayer(const BertConfig& c, int64_t layer) {
  return c.experts > 0 && layer % std::max<int64_t>(c.moe_every, 1) == 0;
}

int64_t NumSwitchLayers(const BertConfig& c) {
  int64_t n = 0;
  for (int64_t l = 0; l < c.layers; ++l) n += IsSwitchLayer(c, l);
  return n;
}

namespace {

// One old leaf name per head or slice for each of `parts` (e.g. {"wq", "wk", "wv"}), index-major.
std::vector<std::string> OldKeys(const std::string& base, const std::vector<std::string>& parts,
                                 int64_t count) {
  std::vector<std::string> keys;
  for (int64_t i = 0; i < count; ++i)
    for (const std::string& p : parts) keys.push_back(base + p + std::to_string(i));
  return keys;
}

}  // namespace

int UpgradeLeafLayout(const BertConfig& c, std::map<std::string, torch::Tensor>* tensors) {
  int upgraded = 0;
  const int64_t groups = std::max<int64_t>(c.ffn_groups, 1);
  std::vector<std::pair<std::string, bool>> prefixes;  // (prefix, holds update counts)
  for (const std::string& p : LayoutValuePrefixes()) prefixes.emplace_back(p, false);
  for (const std::string& p : LayoutStepPrefixes()) prefixes.emplace_back(p, true);
  for (const auto& [prefix, steps] : prefixes) {
    for (int64_t l = 0; l < c.layers; ++l) {
      const std::string base = prefix + "layer" + std::to_string(l) + ".";
      if (auto w = TakeTensors(tensors, OldKeys(base, {"wq", "wk", "wv"}, c.heads))) {
        (*tensors)[base + "wqkv"] = JoinOldLeaves(*w, steps, 3, false, false);
        ++upgraded;
      }
      if (auto b = TakeTensors(tensors, OldKeys(base, {"bq", "bk", "bv"}, c.heads))) {
        (*tensors)[base + "bqkv"] = JoinOldLeaves(*b, steps, 3, false, false);
      }
      if (auto o = TakeTensors(tensors, OldKeys(base, {"wo"}, c.heads))) {
        (*tensors)[base + "wo_t"] = JoinOldLeaves(*o, steps, 1, true, false);
      }
      if (IsSwitchLayer(c, l)) {  // experts: "moe.expert<e>_w1" ... stacked into "moe.w1" ...
        for (const std::string part : {"w1", "b1", "w2", "b2"}) {
          std::vector<std::string> keys;
          for (int64_t e = 0; e < c.experts; ++e) {
            keys.push_back(base + "moe.expert" + std::to_string(e) + "_" + part);
          }
          if (auto t = TakeTensors(tensors, keys)) {
            (*tensors)[base + "moe." + part] = steps ? torch::stack(*t).reshape({-1}) : torch::stack(*t);
            upgraded += part == "w1";
          }
        }
        continue;
      }
      const bool unsplit = c.ffn_groups == 0;
      if (auto w1 = TakeTensors(tensors, OldKeys(base, {"wff1_"}, groups))) {
        (*tensors)[base + "wff1"] = JoinOldLeaves(*w1, steps, 1, false, unsplit);
      }
      if (auto b1 = TakeTensors(tensors, OldKeys(base, {"bff1_"}, groups))) {
        (*tensors)[base + "bff1"] = JoinOldLeaves(*b1, steps, 1, false, unsplit);
      }
      if (auto w2 = TakeTensors(tensors, OldKeys(base, {"wff2_"}, groups))) {
        (*tensors)[base + "wff2_t"] = JoinOldLeaves(*w2, steps, 1, true, unsplit);
      }
    }
  }
  return upgraded;
}

BertLayerImpl::BertLayerImpl(const BertConfig& c, int layer) : c_(c) {
  const int64_t dh = c.d_model / c.heads;
  // Drawn per head in the order of the earlier per-head leaves (W_Q^h, W_K^h, W_V^h, W_O^h).
  std::vector<torch::Tensor> qkv_rows, o_rows;
  for (int64_t h = 0; h < c.heads; ++h) {
    for (int k = 0; k < 3; ++k) qkv_rows.push_back(Normal({dh, c.d_model}));
    o_rows.push_back(Normal({c.d_model, dh}).t());
  }
  qkv_w = register_parameter("wqkv", torch::cat(qkv_rows, 0));
  qkv_b = register_parameter("bqkv", torch::zeros({3 * c.d_model}));
  o_w_t = register_parameter("wo_t", torch::cat(o_rows, 0));
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
  std::vector<torch::Tensor> ff1_rows, ff2_rows;
  for (int64_t g = 0; g < groups; ++g) {
    ff1_rows.push_back(Normal({fs, c.d_model}));
    ff2_rows.push_back(Normal({c.d_model, fs}).t());
  }
  ff1_w = register_parameter("wff1", torch::cat(ff1_rows, 0));
  ff1_b = register_parameter("bff1", torch::zeros({c.d_ff}));
  ff2_w_t = register_parameter("wff2_t", torch::cat(ff2_rows, 0));
  ff2_b = register_parameter("bff2", torch::zeros({c.d_model}));
}

RowBlock BertLayerImpl::QkvRows(int64_t h) const {
  const int64_t n = 3 * (c_.d_model / c_.heads);
  return {h * n, (h + 1) * n};
}

RowBlock BertLayerImpl::ORows(int64_t h) const {
  const int64_t n = c_.d_model / c_.heads;
  return {h * n, (h + 1) * n};
}

RowBlock BertLayerImpl::FfnRows(int64_t g) const {
  const int64_t n = c_.d_ff / std::max<int64_t>(c_.ffn_groups, 1);
  return {g * n, (g + 1) * n};
}

std::vector<spectral::ParamSlice> BertLayerImpl::HeadParams(int64_t h) const {
  const RowBlock qkv = QkvRows(h), o = ORows(h);
  return {{qkv_w, qkv.begin, qkv.end}, {qkv_b, qkv.begin, qkv.end}, {o_w_t, o.begin, o.end}};
}

std::vector<spectral::ParamSlice> BertLayerImpl::FfnParams(int64_t g) const {
  const RowBlock r = FfnRows(g);
  return {{ff1_w, r.begin, r.end}, {ff1_b, r.begin, r.end}, {ff2_w_t, r.begin, r.end}};
}

void BertLayerImpl::set_recorder(spectral::SiteRecorder* r, std::vector<int> head_modules,
                                 std::vector<int> ffn_modules, std::vector<int> expert_modules) {
  recorder_ = r;
  head_modules_ = std::move(head_modules);
  ffn_modules_ = std::move(ffn_modules);
  if (!moe.is_empty()) moe->set_recorder(r, std::move(expert_modules));
}

torch::Tensor BertLayerImpl::HeadsForward(const torch::Tensor& x, const std::vector<int>& heads,
                                          const std::vector<bool>& attached,
                                          const torch::Tensor& out_bias) {
  const int64_t B = x.size(0), T = x.size(1), H = int64_t(heads.size()),
                dh = c_.d_model / c_.heads;
  std::vector<RowBlock> qkv_blocks, o_blocks;
  for (int h : heads) {
    qkv_blocks.push_back(QkvRows(h));
    o_blocks.push_back(ORows(h));
  }
  torch::Tensor qkv = RowSplitForward(x, qkv_w, qkv_b, qkv_blocks, attached);  // [B,T,H*3*dh]
  if (recorder_ != nullptr) {
    spectral::LinearSite site{x, qkv, {}};
    for (int64_t i = 0; i < H; ++i) {
      site.slices.push_back({head_modules_[heads[i]], spectral::SliceAxis::kRows, i * 3 * dh,
                             (i + 1) * 3 * dh, true});
    }
    recorder_->Record(std::move(site));
  }
  std::vector<torch::Tensor> parts = SplitQkv::apply(qkv.view({B, T, H, 3, dh}));
  torch::Tensor q = parts[0], k = parts[1], v = parts[2];  // [B,H,T,dh]
  torch::Tensor scores = torch::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(double(dh)));
  torch::Tensor probs = Dropout(torch::softmax(scores, -1), c_.dropout, is_training());
  torch::Tensor ctx = torch::matmul(probs, v).transpose(1, 2).reshape({B, T, H * dh});
  torch::Tensor y = ColSplitForward(ctx, o_w_t, o_blocks, attached, out_bias);  // [B,T,d]
  if (recorder_ != nullptr) {
    spectral::LinearSite site{ctx, y, {}};
    for (int64_t i = 0; i < H; ++i) {
      site.slices.push_back(
          {head_modules_[heads[i]], spectral::SliceAxis::kCols, i * dh, (i + 1) * dh, false});
    }
    recorder_->Record(std::move(site));
  }
  return y;
}

namespace {

// The indices with active[i] == want, ascending.
std::vector<int> Where(const std::vector<bool>& active, bool want) {
  std::vector<int> out;
  for (size_t i = 0; i < active.size(); ++i)
    if (active[i] == want) out.push_back(static_cast<int>(i));
  return out;
}

std::vector<int> All(size_t n) {
  std::vector<int> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<int>(i);
  return out;
}

bool AllOn(const std::vector<bool>& active) {
  for (bool a : active)
    if (!a) return false;
  return true;
}

}  // namespace

torch::Tensor BertLayerImpl::Attention(const torch::Tensor& x, const std::vector<bool>& active) {
  if (!c_.detach_masked || AllOn(active)) {
    return HeadsForward(x, All(active.size()), active, o_b);
  }
  // detach: the masked heads run outside autograd (a constant in the backward), the active ones
  // in a graph of their own, so no backward work is done for the masked heads at all.
  const std::vector<int> on = Where(active, true), off = Where(active, false);
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = HeadsForward(x.detach(), off, std::vector<bool>(off.size(), false));
  }
  if (!on.empty()) y = HeadsForward(x, on, std::vector<bool>(on.size(), true)) + y;
  return y + o_b;
}

torch::Tensor BertLayerImpl::SlicesForward(const torch::Tensor& x, const std::vector<int>& slices,
                                           const std::vector<bool>& attached,
                                           const torch::Tensor& out_bias) {
  std::vector<RowBlock> blocks;
  for (int g : slices) blocks.push_back(FfnRows(g));
  torch::Tensor h = RowSplitForward(x, ff1_w, ff1_b, blocks, attached);
  const bool record = recorder_ != nullptr && !ffn_modules_.empty();
  const int64_t fs = blocks[0].end - blocks[0].begin;
  if (record) {
    spectral::LinearSite site{x, h, {}};
    for (size_t i = 0; i < slices.size(); ++i) {
      site.slices.push_back({ffn_modules_[slices[i]], spectral::SliceAxis::kRows,
                             int64_t(i) * fs, int64_t(i + 1) * fs, true});
    }
    recorder_->Record(std::move(site));
  }
  torch::Tensor a = Dropout(F::gelu(h), c_.dropout, is_training());
  torch::Tensor y = ColSplitForward(a, ff2_w_t, blocks, attached, out_bias);
  if (record) {
    spectral::LinearSite site{a, y, {}};
    for (size_t i = 0; i < slices.size(); ++i) {
      site.slices.push_back({ffn_modules_[slices[i]], spectral::SliceAxis::kCols,
                             int64_t(i) * fs, int64_t(i + 1) * fs, false});
    }
    recorder_->Record(std::move(site));
  }
  return y;
}

torch::Tensor BertLayerImpl::FeedForward(const torch::Tensor& x, const std::vector<bool>& active,
                                         const std::vector<bool>& expert_active) {
  if (!moe.is_empty()) return moe(x, expert_active);
  if (active.empty()) return SlicesForward(x, {0}, {true}, ff2_b);
  if (!c_.detach_masked || AllOn(active)) return SlicesForward(x, All(active.size()), active, ff2_b);
  const std::vector<int> on = Where(active, true), off = Where(active, false);  // as Attention
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = SlicesForward(x.detach(), off, std::vector<bool>(off.size(), false));
  }
  if (!on.empty()) y = SlicesForward(x, on, std::vector<bool>(on.size(), true)) + y;
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
      m.params = layers[l]->HeadParams(h);
      p.modules.push_back(std::move(m));
    }
  }
  for (int64_t l = 0; l < c_.layers; ++l) {
    for (int64_t g = 0; g < c_.ffn_groups; ++g) {
      spectral::ModuleSpec m{"ffn", int(l), int(g), "layer" + std::to_string(l) + ".ffn" + std::to_string(g), {}};
      m.params = layers[l]->FfnParams(g);
      p.modules.push_back(std::move(m));
    }
  }
  for (int64_t l = 0; l < c_.layers; ++l) {
    if (!IsSwitchLayer(c_, l)) continue;
    const SwitchFfn& moe = layers[l]->moe;
    for (int64_t e = 0; e < c_.experts; ++e) {
      spectral::ModuleSpec m{"experts", int(l), int(e),
                             "layer" + std::to_string(l) + ".expert" + std::to_string(e), {}};
      m.params = moe->ExpertParams(e);
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
