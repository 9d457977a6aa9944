#include "trainer/models/dropout.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <mutex>

namespace mat::trainer {
namespace {

inline uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

template <typename T>
void Fill(T* out, int64_t n, uint64_t seed, uint32_t drop_below, float scale) {
  const T keep = static_cast<T>(scale), zero = static_cast<T>(0.0f);
  // Two 24-bit uniforms per 64-bit hash: element 2k uses the low half, 2k+1 the high half.
  at::parallel_for(0, (n + 1) / 2, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const uint64_t h = SplitMix64(seed + uint64_t(k) * 0x9e3779b97f4a7c15ULL);
      const uint32_t lo = uint32_t(h) >> 8, hi = uint32_t(h >> 32) >> 8;
      out[2 * k] = lo < drop_below ? zero : keep;
      if (2 * k + 1 < n) out[2 * k + 1] = hi < drop_below ? zero : keep;
    }
  });
}

}  // namespace

torch::Tensor DropoutNoise(const torch::Tensor& like, double p, uint64_t seed) {
  torch::Tensor noise = torch::empty(like.sizes(), like.options().device(torch::kCPU));
  const int64_t n = noise.numel();
  const uint32_t drop_below = static_cast<uint32_t>(p * double(1u << 24) + 0.5);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  switch (noise.scalar_type()) {
    case torch::kFloat:
      Fill(noise.data_ptr<float>(), n, seed, drop_below, scale);
      break;
    case torch::kDouble:
      Fill(noise.data_ptr<double>(), n, seed, drop_below, scale);
      break;
    case torch::kBFloat16:
      Fill(noise.data_ptr<at::BFloat16>(), n, seed, drop_below, scale);
      break;
    default:
      TORCH_CHECK(false, "Dropout: unsupported dtype ", noise.scalar_type());
  }
  return noise;
}

torch::Tensor Dropout(const torch::Tensor& x, double p, bool training) {
  if (!training || p == 0) return x;
  TORCH_CHECK(p > 0 && p < 1, "dropout probability must be in [0, 1), got ", p);
  if (!x.device().is_cpu()) {
    return torch::nn::functional::dropout(
        x, torch::nn::functional::DropoutFuncOptions().p(p).training(true));
  }
  uint64_t seed;
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed = gen.get<at::CPUGeneratorImpl>()->random64();
  }
  return x * DropoutNoise(x, p, seed);
}

}  // namespace mat::trainer
