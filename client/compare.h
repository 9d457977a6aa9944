// `matctl compare`: finished runs side by side, as the MAT paper's tables put them. Pure
// functions over summary.json objects (mat-train's keys; a job's Job.summary_json), no I/O and
// no network; unit-tested.
//
// One run is the baseline (normally full training). Every FLOP figure is the whole run's: a
// summary's FLOPs are rank 0's share, times its "world_size" (every rank does the same work).
// For every run:
//   - FLOPs, and FLOPs as a ratio to the baseline's;
//   - the validation loss at equal FLOP budgets: budget b·F (F = the baseline's total FLOPs,
//     b in `budget_fractions`, e.g. 0.25 … 1) reads the run's eval_curve at the LAST evaluation
//     whose FLOPs are <= b·F (what the run had reached for that much compute; a run that ended
//     below b·F gives its last evaluation); none when its first evaluation cost more;
//   - the best validation loss and the test metric at that step (test_metric: loss, lower is
//     better, or accuracy for images, higher is better);
//   - FLOPs and training seconds to the baseline's best: at the run's FIRST evaluation whose
//     validation loss is <= the baseline's best_val_loss (for the baseline itself, its best
//     step); none when it never got there;
//   - the mean active fraction of modules over its steps (1 for full).
// A summary without "eval_curve" (written before it existed) has no equal-budget values and no
// FLOPs to the baseline's best except for the baseline itself ("-", not "never").
//
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace mat::client {

struct CompareRun {
  std::string name;        // what the user named: a job id or a run directory
  nlohmann::json summary;  // its summary.json
};

struct CompareRow {
  std::string name;
  std::string mode;            // policy kind ("full", "mat", ...)
  int64_t seed = 0;
  int64_t steps = 0;
  int64_t world_size = 1;      // data-parallel ranks (summary's world_size; 1 when absent)
  double flops_total = 0;      // floating-point operations, all ranks
  double flops_ratio = 0;      // flops_total / the baseline's
  std::vector<std::optional<double>> val_at_budget;  // one per budget fraction, nats
  double best_val_loss = 0;    // nats
  int64_t best_step = 0;
  std::string test_metric_name;  // "loss" | "accuracy"
  double test_metric = 0;        // at best_step
  std::optional<double> flops_to_baseline_best;         // FLOPs
  std::optional<double> wall_seconds_to_baseline_best;  // training seconds
  double mean_active_fraction = 1;
  double wall_seconds = 0;     // the run's wall time, seconds
  bool has_curve = false;      // its summary had an eval_curve (else nothing at budgets)
};

struct CompareTable {
  std::string baseline;                  // the baseline run's name
  std::vector<double> budget_fractions;  // of the baseline's FLOPs
  std::vector<double> budget_flops;      // the same budgets in FLOPs
  std::vector<CompareRow> rows;          // in the order of the runs given
};

// The default baseline: the first run whose mode is "full", else the first run. -1 for none.
int DefaultBaseline(const std::vector<CompareRun>& runs);

// INVALID_ARGUMENT naming the run and the key when a summary lacks a number compare needs
// (mode, flops_total, best_val_loss, best_step, test_metric, wall_seconds), its world_size is not
// a positive integer or its eval_curve is malformed (arrays of unequal length); naming both runs
// when a run's test_metric_name or train_size_unit differs from the baseline's (another task:
// image accuracy against token loss); when `baseline` is out of range; or when a budget fraction
// is not in (0, 1e6].
absl::StatusOr<CompareTable> CompareRuns(const std::vector<CompareRun>& runs, int baseline,
                                         const std::vector<double>& budget_fractions);

// A fixed-width text table with a header line naming the baseline; "-" for a missing value.
std::string FormatCompareTable(const CompareTable& table);

// {"baseline", "budget_fractions", "budget_flops", "runs": [{name, mode, seed, steps,
//  world_size, flops_total, flops_ratio, val_loss_at_budget: [x|null…], best_val_loss, best_step,
//  test_metric_name, test_metric, flops_to_baseline_best|null, wall_seconds_to_baseline_best|null,
//  mean_active_fraction, wall_seconds}]}.
nlohmann::json CompareToJson(const CompareTable& table);

// An SVG (UTF-8, no NaN anywhere) of validation loss against FLOPs, one polyline per run with a
// legend, a dashed horizontal line at the baseline's best validation loss, and the title
// escaped. FAILED_PRECONDITION when no run has an eval_curve.
absl::StatusOr<std::string> RenderCompareSvg(const std::vector<CompareRun>& runs,
                                             const CompareTable& table, const std::string& title);

}  // namespace mat::client
