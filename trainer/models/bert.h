// BERT encoder with a masked-LM head; attention heads (and optionally FFN slices) as MAT modules.
//
// Every head h of layer l owns its own leaves: W_Q^h, W_K^h, W_V^h [d_h, d] with biases [d_h],
// and W_O^h [d, d_h] (the columns of W_O that read head h). With ffn_groups = G > 0 the FFN
// hidden units are split into G slices: W_1^g [d_ff/G, d] + b_1^g and W_2^g [d, d_ff/G].
// Everything else (embeddings, LayerNorms, W_O's bias, the MLM head, the FFN when G = 0) is
// always trained. The decoder is tied to the token embedding.
//
// With experts = E > 0 (model.kind switch) the FFN of every moe_every-th layer (layers 0,
// moe_every, 2·moe_every, ...) is a Switch FFN (trainer/models/switch_ffn.h): E top-1 routed experts,
// each a module of group "experts" ("layer0.expert3"); the router is always trained. forward
// then also leaves the load-balancing loss in aux_loss(), which training adds to the MLM loss.
//
// Not thread-safe. The mask set by SetMask applies to every following forward.
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "spectral/module_partition.h"
#include "spectral/probe.h"
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

  std::vector<std::vector<torch::Tensor>> qkv_w, qkv_b;  // [head][q,k,v]: [d_h, d], [d_h]
  std::vector<torch::Tensor> o_w;                         // [head]: [d, d_h]
  torch::Tensor o_b;                                      // [d]
  std::vector<std::vector<torch::Tensor>> ff1_w, ff1_b;   // [slice][1]: [d_ff/G, d], [d_ff/G]
  std::vector<torch::Tensor> ff2_w;                       // [slice]: [d, d_ff/G]
  torch::Tensor ff2_b;                                    // [d]  (dense layers only)
  SwitchFfn moe{nullptr};                                 // Switch layers only
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};

 private:
  // Heads `order` (a subset of the layer's, in that order) on x: [B, T, d] -> [B, T, d] without
  // W_O's bias; weight gradients for the first num_attached of them.
  torch::Tensor HeadsForward(const torch::Tensor& x, const std::vector<int>& order,
                             size_t num_attached);
  // FFN slices `order` on x without the output bias; weight gradients for the first
  // num_attached.
  torch::Tensor SlicesForward(const torch::Tensor& x, const std::vector<int>& order,
                              size_t num_attached);

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
