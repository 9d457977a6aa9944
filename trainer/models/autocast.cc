#include "trainer/models/autocast.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

// LibTorch >= 2.4 has device-generic autocast state; 1.13 one function per device kind.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define MAT_AUTOCAST_GENERIC 1
#endif

namespace mat::trainer {
namespace {

bool IsEnabled(torch::DeviceType t) {
#ifdef MAT_AUTOCAST_GENERIC
  return at::autocast::is_autocast_enabled(t);
#else
  return t == torch::kCUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
#endif
}

void SetEnabled(torch::DeviceType t, bool on) {
#ifdef MAT_AUTOCAST_GENERIC
  at::autocast::set_autocast_enabled(t, on);
#else
  if (t == torch::kCUDA) {
    at::autocast::set_enabled(on);
  } else {
    at::autocast::set_cpu_enabled(on);
  }
#endif
}

at::ScalarType GetDtype(torch::DeviceType t) {
#ifdef MAT_AUTOCAST_GENERIC
  return at::autocast::get_autocast_dtype(t);
#else
  return t == torch::kCUDA ? at::autocast::get_autocast_gpu_dtype()
                           : at::autocast::get_autocast_cpu_dtype();
#endif
}

void SetDtype(torch::DeviceType t, at::ScalarType d) {
#ifdef MAT_AUTOCAST_GENERIC
  at::autocast::set_autocast_dtype(t, d);
#else
  if (t == torch::kCUDA) {
    at::autocast::set_autocast_gpu_dtype(d);
  } else {
    at::autocast::set_autocast_cpu_dtype(d);
  }
#endif
}

}  // namespace

absl::StatusOr<Precision> ParsePrecision(const std::string& name) {
  if (name == "fp32") return Precision::kFloat32;
  if (name == "bf16") return Precision::kBFloat16;
  return absl::InvalidArgumentError("train.precision: unknown precision '" + name +
                                    "' (expected fp32 or bf16)");
}

const char* PrecisionName(Precision p) { return p == Precision::kBFloat16 ? "bf16" : "fp32"; }

AutocastGuard::AutocastGuard(const torch::Device& device, Precision precision) {
  if (precision == Precision::kFloat32) return;
  active_ = true;
  type_ = device.type() == torch::kCUDA ? torch::kCUDA : torch::kCPU;
  was_enabled_ = IsEnabled(type_);
  was_dtype_ = GetDtype(type_);
  SetDtype(type_, at::kBFloat16);
  SetEnabled(type_, true);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  SetEnabled(type_, was_enabled_);
  SetDtype(type_, was_dtype_);
}

std::optional<at::ScalarType> AutocastDtype(torch::DeviceType type) {
  if (!IsEnabled(type)) return std::nullopt;
  return GetDtype(type);
}

}  // namespace mat::trainer
