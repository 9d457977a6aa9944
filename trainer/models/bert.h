// BERT encoder with a masked-LM head; attention heads (and optionally FFN slices) as MAT modules.
//
// Storage: modules as views. Each projection of a layer is one leaf tensor, and a module is a row
// block of it (spectral::ParamSlice; trainer/models/sliced_linear.h):
//   wqkv [H·3·d_h, d] and bqkv [H·3·d_h]: head h's rows [3·d_h·h, 3·d_h·(h+1)) are its W_Q^h,
//     W_K^h, W_V^h rows in that order (so the QKV output is laid out [head][q, k, v][d_h]);
//   wo_t [H·d_h, d]: W_O transposed; head h's rows [d_h·h, d_h·(h+1)) are the columns of W_O
//     that read head h;
//   with ffn_groups = G > 0 the FFN hidden units are split into G slices of d_ff/G: wff1
//     [d_ff, d] + bff1 [d_ff] and wff2_t [d_ff, d] (W_2 transposed), slice g being rows
//     [g·d_ff/G, (g+1)·d_ff/G) of each.
// A layer's masked modules are skipped in the backward by rows of these few tensors, not by
// hundreds of leaves. Everything else (embeddings, LayerNorms, W_O's bias bo, the MLM head, the
// FFN when G = 0) is always trained. The decoder is tied to the token embedding. The initial
// values are drawn per head and slice in the order of the earlier per-module leaf layout (W_Q^h,
// W_K^h, W_V^h, W_O^h for h = 0, 1, ...; then W_1^g, W_2^g), so a seed gives the same model.
//
// With experts = E > 0 (model.kind switch) the FFN of every moe_every-th layer (layers 0,
// moe_every, 2·moe_every, ...) is a Switch FFN (trainer/models/switch_ffn.h): E top-1 routed experts,
// each a module of group "experts" ("layer0.expert3"); the router is always trained. forward
// then also leaves the load-balancing loss in aux_loss(), which training adds to the MLM loss.
//
// Not thread-safe. The mask set by SetMask applies to every following forward.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "spectral/module_partition.h"
#include "spectral/probe.h"
#include "trainer/models/sliced_linear.h"
#include "trainer/models/switch_ffn.h"

namespace mat::trainer {

struct BertConfig {
  int64_t vocab_size = 0;      // including special tokens
  int64_t max_seq_len = 128;   // positions
  int64_t layers = 4;
  int64_t d_model = 256;
  int64_t heads = 8;           // d_model % heads == 0
  int64_t d_ff = 1024;
  int64_t ffn_groups = 0;      // 0: FFN always trained; G > 0: G modules per layer, d_ff % G == 0
  double dropout = 0.1;
  bool pre_ln = false;         // false: post-LN (original BERT)
  // Switch Transformer. experts = 0: every FFN dense (BERT). E > 0: E experts of size d_ff in
  // the Switch layers; REQUIRES ffn_groups == 0.
  int64_t experts = 0;
  int64_t moe_every = 1;        // layer l has experts iff l % moe_every == 0 (>= 1)
  double capacity_factor = 1.25;  // capacity = ceil(capacity_factor · tokens / experts)
  double aux_loss_weight = 0.01;  // α in α · Σ_layers E · Σ_i f_i · P_i (load balancing)
  // The backward of a masked-off head or FFN slice (policy.backward):
  //   false ("weights")  it still passes activation gradients; only its weight gradients and
  //                      update are skipped;
  //   true ("detach")    its output is a constant in the backward: neither its weight gradients
  //                      nor its share of the input gradient (its attention-probability and value
  //                      backward, its slice of the QKV and W_O input gradients; an FFN slice's
  //                      W_1/W_2 input gradients) are computed. The forward is the same.
  // Switch experts keep the weights behaviour.
  bool detach_masked = false;
};

// Whether layer `layer` of `c` has a Switch FFN instead of a dense one.
bool IsSwitchLayer(const BertConfig& c, int64_t layer);
// The number of Switch layers of `c`.
int64_t NumSwitchLayers(const BertConfig& c);

// Checkpoints and model files written with the per-module leaf layout that the view layout
// replaced name a layer's tensors per head and FFN slice: "layer<l>.{w,b}{q,k,v}<h>",
// "layer<l>.wo<h>" ([d, d_h]), "layer<l>.{wff1_,bff1_,wff2_}<g>" (wff2_ [d, d_ff/G]; g = 0 only
// when ffn_groups = 0), and a Switch layer's experts "layer<l>.moe.expert<e>_{w1,b1,w2,b2}".
// Rewrites every such group of `tensors` into this layout's tensors ("layer<l>.wqkv", "bqkv",
// "wo_t", "wff1", "bff1", "wff2_t"; "layer<l>.moe.w1", ... stacked), under each of the key prefixes
// a model file or a checkpoint uses: "" and "model." (values), "opt.m.", "opt.v.", "sgd.buf."
// (optimizer state, shaped as the parameter) and "opt.step.", "sgd.step." (update counts: one
// per head or FFN slice, from its W_Q or W_1 leaf). A layer whose old names are incomplete is
// left as it is (the loader then names what is missing). Returns the number of (prefix, layer)
// groups rewritten; 0 when `tensors` has nothing of the old layout.
int UpgradeLeafLayout(const BertConfig& c, std::map<std::string, torch::Tensor>* tensors);

class BertLayerImpl : public torch::nn::Module {
 public:
  BertLayerImpl(const BertConfig& c, int layer);
  // x: [B, T, d] -> [B, T, d]. head_active: [heads], ffn_active: [ffn_groups] (may be empty),
  // expert_active: [experts] in a Switch layer (empty: all active).
  torch::Tensor forward(const torch::Tensor& x, const std::vector<bool>& head_active,
                        const std::vector<bool>& ffn_active,
                        const std::vector<bool>& expert_active = {});
  // The attention sublayer with W_O's bias: x [B, T, d] -> [B, T, d]; head_active: [heads].
  torch::Tensor Attention(const torch::Tensor& x, const std::vector<bool>& head_active);
  // The FFN sublayer with its output bias: x [B, T, d] -> [B, T, d]; ffn_active: [ffn_groups]
  // (empty: one always-trained FFN), expert_active: as forward's.
  torch::Tensor FeedForward(const torch::Tensor& x, const std::vector<bool>& ffn_active,
                            const std::vector<bool>& expert_active);
  void set_recorder(spectral::SiteRecorder* r, std::vector<int> head_modules,
                    std::vector<int> ffn_modules, std::vector<int> expert_modules = {});

  // The rows of head h in qkv_w/qkv_b and in o_w_t; of FFN slice g in ff1_w/ff1_b/ff2_w_t.
  RowBlock QkvRows(int64_t h) const;
  RowBlock ORows(int64_t h) const;
  RowBlock FfnRows(int64_t g) const;
  // Head h's module: its rows of wqkv, bqkv and wo_t. FFN slice g's: its rows of wff1, bff1,
  // wff2_t.
  std::vector<spectral::ParamSlice> HeadParams(int64_t h) const;
  std::vector<spectral::ParamSlice> FfnParams(int64_t g) const;

  torch::Tensor qkv_w;    // "wqkv" [H·3·d_h, d]
  torch::Tensor qkv_b;    // "bqkv" [H·3·d_h]
  torch::Tensor o_w_t;    // "wo_t" [H·d_h, d] = W_O^T
  torch::Tensor o_b;      // "bo"   [d]
  torch::Tensor ff1_w;    // "wff1" [d_ff, d]      (dense layers only)
  torch::Tensor ff1_b;    // "bff1" [d_ff]
  torch::Tensor ff2_w_t;  // "wff2_t" [d_ff, d] = W_2^T
  torch::Tensor ff2_b;    // "bff2" [d]
  SwitchFfn moe{nullptr};                                 // Switch layers only
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};

 private:
  // Heads `heads` (ascending, a subset of the layer's) on x: [B, T, d] -> [B, T, d], plus
  // `out_bias` (W_O's bias, or undefined: none) in W_O's matmul; weight gradients for those
  // with attached[i].
  torch::Tensor HeadsForward(const torch::Tensor& x, const std::vector<int>& heads,
                             const std::vector<bool>& attached,
                             const torch::Tensor& out_bias = torch::Tensor());
  // FFN slices `slices` (ascending) on x, plus `out_bias` (W_2's bias or undefined) in W_2's
  // matmul; weight gradients for those with attached[i].
  torch::Tensor SlicesForward(const torch::Tensor& x, const std::vector<int>& slices,
                              const std::vector<bool>& attached,
                              const torch::Tensor& out_bias = torch::Tensor());

  BertConfig c_;
  spectral::SiteRecorder* recorder_ = nullptr;
  std::vector<int> head_modules_, ffn_modules_;
};
TORCH_MODULE(BertLayer);

class BertMlmImpl : public torch::nn::Module {
 public:
  explicit BertMlmImpl(const BertConfig& c);

  // input_ids: [B, T] int64 (T <= max_seq_len); positions: [M] int64, flat indices into B*T of
  // the positions to predict. Returns logits [M, vocab_size] float32.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& positions);

  // The switchable modules: heads of layer 0..L-1, then FFN slices, then experts of the Switch
  // layers (layer by layer); indices match SetMask.
  spectral::ModulePartition Partition();
  // active: one flag per Partition() module.
  void SetMask(const std::vector<uint8_t>& active);
  // While set, every forward records its module sites (call with all modules active).
  void SetRecorder(spectral::SiteRecorder* recorder);

  const BertConfig& config() const { return c_; }
  int num_modules() const { return num_modules_; }
  // The last forward's load-balancing loss, aux_loss_weight · Σ over Switch layers of
  // E · Σ_i f_i · P_i: a scalar (float32; float64 for a float64 model) in the forward's graph;
  // undefined without experts.
  torch::Tensor aux_loss() const;
  // The last forward's tokens processed per expert, in Partition()'s expert order (empty
  // without experts). For FLOP accounting (trainer/models/flops.h).
  std::vector<int64_t> RoutedTokens() const;

  torch::nn::Embedding tok_emb{nullptr}, pos_emb{nullptr};
  torch::nn::LayerNorm emb_ln{nullptr}, head_ln{nullptr};
  torch::nn::Linear head_dense{nullptr};
  torch::Tensor decoder_bias;  // [vocab]
  std::vector<BertLayer> layers;

 private:
  BertConfig c_;
  int num_modules_ = 0;
  std::vector<std::vector<bool>> head_active_, ffn_active_, expert_active_;  // [layer][module]
};
TORCH_MODULE(BertMlm);

}  // namespace mat::trainer
