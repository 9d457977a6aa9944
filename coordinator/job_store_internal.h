// Helpers the job_store*.cc files share (not part of JobStore's interface).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mat::coordinator::store_internal {

// INVALID_ARGUMENT naming `field` unless `value` is finite (and >= 0 when `non_negative`).
absl::Status CheckNumber(const std::string& field, double value, bool non_negative);
// INVALID_ARGUMENT naming the first non-finite λ (as AppendLambdas documents).
absl::Status CheckLambdas(const std::string& job_id, int64_t step,
                          const std::vector<double>& lambda);
// Page size after defaults and clamping; INVALID_ARGUMENT when negative.
absl::StatusOr<int> EffectivePageSize(int page_size);
// Page tokens are the decimal position (a job seq or a step) the next page starts at.
absl::StatusOr<int64_t> ParsePageToken(const std::string& token);

}  // namespace mat::coordinator::store_internal
