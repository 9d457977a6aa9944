// What a model hands to a λ_max estimator after a probe forward pass.
//
// The probe forward runs the model on n samples with every module's weights attached to the
// autograd graph and records, for every linear map that contains module slices, its input
// activations and its output (a LinearSite), and for every per-channel affine map that contains
// module channels (a BatchNorm's scale and shift), its normalised input and its output (a
// ScaleShiftSite). Estimators then need one backward pass.
//
// Contract of a recorded site (both kinds): `output` is the very tensor the rest of the forward
// reads from (so ∂Σℓ/∂output is the gradient the estimator needs), row i of input and output
// belongs to sample i only, and the model parameters the slices name enter `output` only through
// the recorded map. Only the gram estimator reads the sites; the others (exact, lanczos,
// exact-output) differentiate the partition's leaf tensors and ignore them (lanczos reads the
// linear sites' token counts for its FLOP count only).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace mat::spectral {

// Which part of a linear map's weight W [out, in] belongs to a module.
enum class SliceAxis {
  kRows,  // output units [begin, end): W[begin:end, :] (and bias[begin:end] when has_bias)
  kCols,  // input units [begin, end): W[:, begin:end] (a bias, if any, is not the module's)
};

struct SiteSlice {
  int module = 0;  // index into ModulePartition::modules
  SliceAxis axis = SliceAxis::kRows;
  int64_t begin = 0;
  int64_t end = 0;
  bool has_bias = false;  // kRows only: the bias entries [begin, end) are the module's too
};

// y = a W^T (+ b), recorded during the probe forward.
struct LinearSite {
  torch::Tensor input;   // a: [n, T, in] or [n, in]; same dtype/device as the model
  torch::Tensor output;  // y: [n, T, out] or [n, out]; part of the autograd graph of `losses`
  std::vector<SiteSlice> slices;
};

// Which channels of a per-channel affine map y = x · scale + shift belong to a module: the scale
// entries [begin, end) when has_scale, the shift entries [begin, end) when has_shift.
struct ChannelSlice {
  int module = 0;  // index into ModulePartition::modules
  int64_t begin = 0;
  int64_t end = 0;
  bool has_scale = true;
  bool has_shift = true;
};

// y = x · scale + shift with scale, shift: [C] broadcast over the last dimension, recorded
// during the probe forward (a BatchNorm's affine part: x is the normalised activation). Per
// sample, ∇_scale ℓ_i = Σ_t g_{i,t} ⊙ x_{i,t} and ∇_shift ℓ_i = Σ_t g_{i,t}, g = ∂Σℓ/∂y.
struct ScaleShiftSite {
  torch::Tensor input;   // x: [n, T, C] or [n, C]; detached; same dtype/device as the model
  torch::Tensor output;  // y: same shape as x; part of the autograd graph of `losses`
  std::vector<ChannelSlice> slices;
};

// One probe: per-sample losses of n samples and the sites recorded while computing them.
struct ProbeBatch {
  torch::Tensor losses;  // [n], requires grad; ℓ_i depends on sample i only
  std::vector<LinearSite> sites;
  // [n, q], part of the graph; only when the estimator NeedsOutputs(), else undefined. q outputs
  // per sample: for the masked LM, q = P·k, the logits at each of sample i's first P masked
  // positions times a fixed Gaussian R [V, k] / sqrt(V) (0 where a sample has fewer than P).
  // outputs[i] depends on sample i only. The output kernel's entries are indexed by the
  // flattened (i, c), d = n * q.
  torch::Tensor outputs;
  // Per-channel affine sites (gram estimator only, like `sites`). Last and with an explicit
  // initialiser, so that aggregate initialisations {losses, sites, outputs} stay valid and
  // warning-free.
  std::vector<ScaleShiftSite> scale_shift_sites{};
};

// Collects sites during a probe forward. Models call Record when a recorder is installed.
// Not thread-safe; one recorder per forward.
class SiteRecorder {
 public:
  void Record(LinearSite site) { sites_.push_back(std::move(site)); }
  void Record(ScaleShiftSite site) { scale_shift_sites_.push_back(std::move(site)); }
  // The linear sites recorded so far, in order; leaves none behind.
  std::vector<LinearSite> Take() { return std::exchange(sites_, {}); }
  // The per-channel affine sites recorded so far, in order; leaves none behind.
  std::vector<ScaleShiftSite> TakeScaleShift() { return std::exchange(scale_shift_sites_, {}); }
  // Moves every recorded site of both kinds into `probe` (replacing its sites).
  void TakeInto(ProbeBatch* probe) {
    probe->sites = Take();
    probe->scale_shift_sites = TakeScaleShift();
  }

 private:
  std::vector<LinearSite> sites_;
  std::vector<ScaleShiftSite> scale_shift_sites_;
};

}  // namespace mat::spectral
