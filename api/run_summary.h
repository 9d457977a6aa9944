// What matctl and the coordinator agree on about a run's summary.json (trainer/trainer.cc writes
// it; rank 0 uploads it as an artifact): how many data-parallel ranks its FLOPs stand for.
//
// Thread-safety: free functions without shared state.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace mat::api {

// The run's data-parallel ranks, its "world_size". A summary's FLOPs (flops_total,
// flops_by_phase, flops_saved, flops_to_best and the eval curve's) are rank 0's share; every rank
// does the same work (its equal share of the batch, the same masks), so the whole run's FLOPs are
// those times this. 1 for a summary without "world_size" (mat-train's before it wrote one);
// INVALID_ARGUMENT, quoting the value, when it is not a positive integer.
absl::StatusOr<int64_t> SummaryRanks(const nlohmann::json& summary);

}  // namespace mat::api
