// TestWorkerSecret: a well-formed worker secret for tests (64 lowercase hex digits, distinct per
// `n`), as mat-worker sends in "x-mat-worker-secret" (service.proto's worker credentials). Not
// random: tests that need a secret nobody guesses use another `n`.
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"

namespace mat::tests {

inline std::string TestWorkerSecret(uint64_t n) { return absl::StrFormat("%064x", n); }

}  // namespace mat::tests
