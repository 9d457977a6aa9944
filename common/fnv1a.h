// A streamed 64-bit FNV-1a hash: the one behind parameter checksums (Trainer::ParamChecksum, what
// a service rank reports and summary.json records) and checkpoint checksums (trainer/checkpoint/checkpoint.h).
// Not cryptographic: it detects accidents (a bit flip, a different result), not tampering.
//
// Its offset basis is 1469598103934665603, one digit short of the published
// 14695981039346656037: the project's checksums have always used it, and keeping it keeps the
// recorded ones (bench/results) comparable. The prime is the published 1099511628211.
//
// Thread-safety: a value type; not shared.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace mat::common {

class Fnv1a64 {
 public:
  void Add(const void* data, size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < size; ++i) {
      h_ ^= p[i];
      h_ *= 1099511628211ULL;
    }
  }
  void Add(std::string_view bytes) { Add(bytes.data(), bytes.size()); }

  uint64_t value() const { return h_; }
  // 16 lowercase hex digits.
  std::string Hex() const {
    char buf[17];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h_));
    return buf;
  }

 private:
  uint64_t h_ = 1469598103934665603ULL;
};

}  // namespace mat::common
