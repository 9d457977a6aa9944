// VGG-11 (configuration A) and VGG-16 (configuration D) with BatchNorm and a width multiplier,
// for 10-class images of 1 or 3 channels at 28x28 (Fashion-MNIST) or 32x32 (CIFAR-10); filter
// groups of every conv layer as MAT modules (group "filters", DESIGN §3).
//
// Layout. Each conv layer is conv 3x3 (stride 1, padding 1, NO bias) → BatchNorm2d → ReLU; an
// "M" in the configuration is a 2x2 max-pool with stride 2 and ceil_mode = true, so a 28x28
// input goes 28 → 14 → 7 → 4 → 2 → 1 and a 32x32 one 32 → 16 → 8 → 4 → 2 → 1 through the same
// five pools (no pool is skipped; with floor mode 28 would lose a row at 7 → 3 and reach 0).
// An adaptive average pool to 1x1 follows (a no-op for those two sizes; it makes any input size
// ≥ 1 valid), then the classifier: Linear(C_last, classes) when classifier_hidden = 0, else
// Linear(C_last, hidden) → ReLU → Linear(hidden, classes). Channels of a layer with nominal
// width c are max(1, round(c · width)).
//
// Modules. The C_out output channels of every conv layer are split into filter_groups
// contiguous slices (sizes differ by at most one, larger first). Storage: modules as views. A
// layer has three leaves, the conv kernel w [C_out, C_in, 3, 3] (the conv has no bias: the BN
// shift plays its part), the BatchNorm scale gamma [C_out] and shift beta [C_out]; filter group
// g's module is its channels' rows of each (GroupParams, spectral::ParamSlice). Everything else
// — the classifier — is always trained. Partition order: layer 0 groups 0..G-1, then layer 1,
// ...; names "conv<l>.filters<g>". The kernels are drawn per group in the order of the earlier
// per-group leaves, so a seed gives the same model.
//
// Masking (SetMask). A masked-off group's rows of w, gamma and beta get no gradient computed
// (they stay zero in the layer's gradients): the conv is a custom autograd function whose
// backward forms the input gradient with one convolution over all channels and the kernel
// gradient only for the active groups' output channels (one convolution-backward per
// contiguous run of active groups), and the BN affine entries of masked groups enter the batch
// norm detached. (The BN affine gradient of a layer with some active group is one per-channel
// reduction over all its channels, element-wise work that is then dropped for the masked
// slices; the FLOP counter counts element-wise work as zero.) Activations and activation
// gradients still flow through masked groups. BatchNorm running statistics (buffers, not
// parameters) keep updating for every channel, masked or not: the masked group's inputs still
// change as earlier layers train, and evaluation needs current statistics. The input gradient
// of a layer is computed only when something before it trains (the first layer's only when the
// images themselves require a gradient).
//
// Probe (SetRecorder). While a spectral::SiteRecorder is set the model must be in eval() mode
// (BatchNorm on its running statistics, so sample i's loss depends on sample i only; a forward
// in training mode throws c10::Error), and every conv layer l runs as explicit linear maps that
// the gram estimator can read, giving the same logits as the plain eval forward (up to float
// rounding):
//   a = unfold(x, 3x3, padding 1)^T: [n, H·W, C_in·9] (recorded detached; the forward's own a
//     stays in the graph, so earlier layers still get their gradient), y = a W^T: [n, H·W, C_out]
//     with W = w reshaped [C_out, C_in·9] (attached: gradients reach every group's rows),
//     recorded as a LinearSite with one kRows slice per group (no bias);
//   xhat = (y − running_mean) / sqrt(running_var + eps): [n, H·W, C_out] (recorded detached),
//     z = xhat ⊙ gamma + beta, recorded as a
//     ScaleShiftSite with one ChannelSlice per group (scale and shift);
// then z is laid out back to [n, C_out, H, W] for ReLU and pooling. Slice modules are Partition()
// indices. Every group's rows are attached whatever SetMask said (the probe measures every
// module; callers set the mask all-on anyway). Under autocast a and W are cast like the plain
// forward's convolution, and y is cast up to float32 before the normalisation.
// The unfolded input a holds n·H·W·C_in·9 elements per layer, nine times the layer's input,
// kept until the estimator's backward.
//
// Not thread-safe. The mask set by SetMask applies to every following forward. float32 on CPU;
// under bf16 autocast the masked convolution computes in bf16 like sliced_linear.h (untested
// here: no GPU on this machine).
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "spectral/module_partition.h"
#include "spectral/probe.h"
#include "trainer/models/flops.h"
#include "trainer/models/sliced_linear.h"

namespace mat::trainer {

struct VggConfig {
  std::string arch = "vgg11";     // "vgg11" (configuration A) | "vgg16" (configuration D)
  double width = 1.0;             // channel multiplier, > 0 (0.25: 16…128 channels)
  int64_t in_channels = 3;        // 1 (Fashion-MNIST) or 3 (CIFAR-10)
  int64_t image_size = 32;        // input H = W, 28 or 32 (used by the FLOP counter)
  int64_t num_classes = 10;
  int64_t filter_groups = 4;      // modules per conv layer, 1 <= G <= the layer's channels
  int64_t classifier_hidden = 0;  // 0: one linear layer
  double bn_momentum = 0.1;       // running statistics: r = (1 − m) r + m · batch
  double bn_eps = 1e-5;
};

// INVALID_ARGUMENT naming the field ("vgg.arch", "vgg.width", ...) when `c` is unusable.
absl::Status ValidateVggConfig(const VggConfig& c);

// One conv layer's shape: input [B, in_channels, height, width] → output channels; pool_after:
// a 2x2 max-pool follows.
struct VggConvShape {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t height = 0, width = 0;  // spatial size of the conv's input and output (padding 1)
  bool pool_after = false;
};
// REQUIRES: ValidateVggConfig(c).ok().
std::vector<VggConvShape> VggConvShapes(const VggConfig& c);
// Channel counts of the filter groups of a layer with `channels` outputs (larger first).
std::vector<int64_t> VggGroupSizes(int64_t channels, int64_t groups);

// Checkpoints and model files written with the per-group leaf layout that the view layout
// replaced name a conv layer's tensors per filter group: "conv<l>.w<g>", "conv<l>.gamma<g>",
// "conv<l>.beta<g>". Rewrites every complete such group of `tensors` into "conv<l>.w", "gamma",
// "beta" (rows stacked in group order; update counts one per group), under the key prefixes of
// LayoutValuePrefixes and LayoutStepPrefixes (trainer/models/model_io.h), in place. Returns the
// number of (prefix, layer) kernels rewritten; 0 when `tensors` has nothing of the old layout.
int UpgradeVggLeafLayout(const VggConfig& c, std::map<std::string, torch::Tensor>* tensors);

class VggConvImpl : public torch::nn::Module {
 public:
  VggConvImpl(int64_t in_channels, int64_t out_channels, int64_t groups, double bn_momentum,
              double bn_eps);
  // x: [B, C_in, H, W] → relu(bn(conv(x))): [B, C_out, H, W]. active: one flag per group.
  // With a recorder set: the probe path of vgg.h's "Probe" (REQUIRES eval mode; `active` is
  // ignored).
  torch::Tensor forward(const torch::Tensor& x, const std::vector<bool>& active);

  // nullptr: off. first_module: the Partition() index of group 0 (group g is first_module + g).
  // `recorder` is borrowed and must outlive every forward made while it is set.
  void set_recorder(spectral::SiteRecorder* recorder, int first_module);

  // Group g's module: its channels' rows of w, gamma and beta.
  std::vector<spectral::ParamSlice> GroupParams(int64_t g) const;

  torch::Tensor w;                          // "w" [C_out, C_in, 3, 3]
  torch::Tensor gamma, beta;                // "gamma", "beta" [C_out]
  std::vector<RowBlock> rows;               // [group]: its output channels [begin, end)
  torch::Tensor running_mean, running_var;  // buffers [C_out] float32

 private:
  torch::Tensor RecordedForward(const torch::Tensor& x);

  double bn_momentum_, bn_eps_;
  spectral::SiteRecorder* recorder_ = nullptr;
  int first_module_ = 0;
};
TORCH_MODULE(VggConv);

class VggImpl : public torch::nn::Module {
 public:
  // REQUIRES: ValidateVggConfig(c).ok() (checked; throws c10::Error otherwise).
  explicit VggImpl(const VggConfig& c);

  // images: [B, in_channels, H, W] float32 → logits [B, num_classes] float32.
  torch::Tensor forward(const torch::Tensor& images);

  // The switchable modules (filter groups), layer-major; indices match SetMask.
  spectral::ModulePartition Partition();
  // active: one flag per Partition() module.
  void SetMask(const std::vector<uint8_t>& active);
  // While set (nullptr: off), every forward records one LinearSite and one ScaleShiftSite per
  // conv layer (see "Probe" above; REQUIRES eval mode). Take both kinds from the recorder
  // (SiteRecorder::TakeInto). `recorder` is borrowed; unset it before it dies.
  void SetRecorder(spectral::SiteRecorder* recorder);

  const VggConfig& config() const { return c_; }
  int num_modules() const { return num_modules_; }
  const std::vector<VggConvShape>& shapes() const { return shapes_; }

  std::vector<VggConv> convs;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};  // fc2 only when classifier_hidden > 0

 private:
  VggConfig c_;
  std::vector<VggConvShape> shapes_;
  int num_modules_ = 0;
  std::vector<std::vector<bool>> active_;  // [layer][group]
};
TORCH_MODULE(Vgg);

// Top-1: the number of rows of logits [B, classes] whose argmax equals labels [B] int64.
int64_t CountTop1Correct(const torch::Tensor& logits, const torch::Tensor& labels);

// Analytic FLOPs (multiply-add = 2) of one training step of `c` on `batch` images of
// c.image_size², by phase, in the conventions of flops.h: convolutions (2·B·H·W·C_out·C_in·9 per
// layer and phase) and the classifier's linear maps; BatchNorm, ReLU, pooling, the loss and the
// optimizer count zero. Weight gradients count only active groups' output channels; the input
// gradient of a conv layer counts only when some module before it is active (the first layer's
// never), the classifier's first input gradient only when some filter group is active — exactly
// what VggImpl computes. `decoder` stays 0 (no embedding or decoder). active: one flag per
// module (Partition order); empty = all active.
FlopCounts VggStepFlops(const VggConfig& c, int64_t batch, const std::vector<uint8_t>& active);

// The forward pass only (evaluation or the probe's forward).
FlopCounts VggForwardFlops(const VggConfig& c, int64_t batch);

// Per module (Partition order): the weight-gradient FLOPs its kernel slice costs per step.
std::vector<double> VggModuleWeightGradFlops(const VggConfig& c, int64_t batch);

}  // namespace mat::trainer
