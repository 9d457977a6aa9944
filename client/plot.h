// `matctl plot`: a job's λ_max history (GetSpectra) as a standalone SVG heatmap with an
// approximate mask overlay. Pure functions (no I/O, no network), unit-tested.
//
// Layout: x = probe step (one column per SpectraPoint, in the reply's ascending order), y = module,
// grouped by ModuleDescriptor.group (groups in order of first appearance, modules in index order
// within a group, a gap between groups, the group's name and size at the right), labelled by
// name every few rows; color = log10 λ on a hand-coded viridis ramp between the smallest and
// largest finite positive λ of the whole history (the legend names both). A value <= 0 gets the
// lowest color; a missing value (a point with fewer λ than modules) is a grey "no value" cell.
//
// Mask overlay, an APPROXIMATION (the coordinator's decisions are not available over the API):
// module i counts as "off" at a probe step when its λ there is at or below
//   λ_α = min + (max − min)·α
// over that step's finite λ of i's group (no module is off when they are all equal). This is
// the policy's modular rule (policy/policy.h) applied to the raw λ of one step; the
// real mask also depends on the EMA smoothing, warm-up, min_active_fraction and the temporal
// rule. Off cells are dimmed and hatched; the SVG's legend states the approximation.
//
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "mat/v1/service.pb.h"

namespace mat::client {

// The approximate mask (see above): off[p][i] is true when module i counts as off at
// spectra.points(p). Rows have max(modules_size, the longest lambda_max) entries. A module with
// no finite λ at a point is never off there, nor is any module when `alpha` is outside [0, 1]
// (NaN included: no overlay).
std::vector<std::vector<bool>> ApproximateOffCells(const v1::GetSpectraReply& spectra,
                                                   double alpha);

// "#rrggbb" of the viridis color map at t in [0, 1] (clamped; NaN is 0), linear between 11
// samples (t = 0, 0.1, …, 1) of matplotlib's viridis.
std::string ViridisColor(double t);

// "a &amp; b": text and attribute values made safe for XML (&, <, >, ", ' as entities; control
// characters XML 1.0 does not allow become '?').
std::string XmlEscape(const std::string& text);

// The whole SVG document (UTF-8, XML declaration first, no NaN or infinity anywhere): `title`
// (escaped) as its <title> and heading, one <rect class="cell…"> per (module, probe step) with a
// <title> tooltip ("layer0.head1 step 40: λ 0.0123"), "cell off" for masked-off cells and
// "cell na" for missing values, axis labels, the color legend with min/max λ, and the overlay's
// legend with `alpha` and the approximation stated.
// FAILED_PRECONDITION when there is nothing to plot: no points, or no λ in any point.
absl::StatusOr<std::string> RenderSpectraSvg(const v1::GetSpectraReply& spectra, double alpha,
                                             const std::string& title);

}  // namespace mat::client
