// Mixed precision for the training step: a scoped autocast region on one device.
//
// `train.precision: bf16` runs the forward pass and the loss under LibTorch's autocast with
// bfloat16 as the lower precision (matmuls and linear maps in bf16, reductions, softmax and
// the cross-entropy in float32, as autocast's op lists say); parameters, gradients and the
// optimizer state stay float32. The backward runs outside the region, in the dtypes autocast
// chose for the forward. The sliced linear maps (custom autograd functions, sliced_linear.h)
// ask `AutocastDtype` and cast their inputs themselves, as PyTorch's custom_fwd(cast_inputs=)
// does for Python functions.
//
// Works with LibTorch 1.13 (Debian) and 2.x (the CUDA machine's); the API differs between them
// and is hidden here. Thread-local, like autocast itself.
#pragma once

#include <optional>
#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"

namespace mat::trainer {

enum class Precision { kFloat32, kBFloat16 };

// "fp32" | "bf16". INVALID_ARGUMENT names anything else.
absl::StatusOr<Precision> ParsePrecision(const std::string& name);
const char* PrecisionName(Precision p);

// Enables autocast with `precision`'s dtype on `device`'s type for the guard's lifetime (nothing
// for kFloat32) and restores the previous state, clearing autocast's cast cache on exit.
class AutocastGuard {
 public:
  AutocastGuard(const torch::Device& device, Precision precision);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_ = false;
  torch::DeviceType type_ = torch::kCPU;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kFloat;
};

// The dtype autocast casts linear maps to on `type` when it is enabled there; nullopt otherwise.
std::optional<at::ScalarType> AutocastDtype(torch::DeviceType type);

}  // namespace mat::trainer
