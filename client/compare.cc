#include "client/compare.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "api/run_summary.h"
#include "client/plot.h"

namespace mat::client {
namespace {

using json = nlohmann::json;

struct Curve {
  std::vector<double> step, flops, val, wall;
  bool empty() const { return step.empty(); }
};

absl::Status Missing(const std::string& run, const std::string& key) {
  return absl::InvalidArgumentError(
      absl::StrCat(run, ": summary has no number '", key, "' (not a finished run's summary.json?)"));
}

absl::StatusOr<double> Number(const CompareRun& run, const std::string& key) {
  auto it = run.summary.find(key);
  if (it == run.summary.end() || !it->is_number()) return Missing(run.name, key);
  return it->get<double>();
}

// The run's data-parallel ranks (api::SummaryRanks), its error naming the run.
absl::StatusOr<int64_t> Ranks(const CompareRun& run) {
  absl::StatusOr<int64_t> ranks = api::SummaryRanks(run.summary);
  if (!ranks.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(run.name, ": ", ranks.status().message()));
  }
  return ranks;
}

// The eval curve with the whole run's FLOPs (Ranks).
absl::StatusOr<Curve> ReadCurve(const CompareRun& run) {
  Curve c;
  absl::StatusOr<int64_t> ranks = Ranks(run);
  if (!ranks.ok()) return ranks.status();
  auto it = run.summary.find("eval_curve");
  if (it == run.summary.end()) return c;
  const json& e = *it;
  const std::vector<std::pair<const char*, std::vector<double>*>> keys = {
      {"step", &c.step}, {"flops", &c.flops}, {"val_loss", &c.val}, {"wall_seconds", &c.wall}};
  for (const auto& [key, out] : keys) {
    if (!e.is_object() || !e.contains(key) || !e[key].is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(run.name, ": summary's eval_curve has no array '", key, "'"));
    }
    for (const json& v : e[key]) {
      if (!v.is_number()) {
        return absl::InvalidArgumentError(
            absl::StrCat(run.name, ": summary's eval_curve.", key, " holds a non-number"));
      }
      out->push_back(v.get<double>());
    }
  }
  for (double& f : c.flops) f *= static_cast<double>(*ranks);
  if (c.flops.size() != c.step.size() || c.val.size() != c.step.size() ||
      c.wall.size() != c.step.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        run.name, ": summary's eval_curve arrays differ in length (step ", c.step.size(),
        ", flops ", c.flops.size(), ", val_loss ", c.val.size(), ", wall_seconds ",
        c.wall.size(), ")"));
  }
  return c;
}

std::string Or(const std::optional<double>& v, const char* format) {
  return v.has_value() ? absl::StrFormat(format, *v) : std::string("-");
}

json OrNull(const std::optional<double>& v) { return v.has_value() ? json(*v) : json(nullptr); }

}  // namespace

int DefaultBaseline(const std::vector<CompareRun>& runs) {
  for (size_t i = 0; i < runs.size(); ++i) {
    if (runs[i].summary.value("mode", std::string()) == "full") return static_cast<int>(i);
  }
  return runs.empty() ? -1 : 0;
}

absl::StatusOr<CompareTable> CompareRuns(const std::vector<CompareRun>& runs, int baseline,
                                         const std::vector<double>& budget_fractions) {
  if (baseline < 0 || baseline >= static_cast<int>(runs.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("baseline ", baseline, " is not one of the ", runs.size(), " runs"));
  }
  for (double b : budget_fractions) {
    if (!(b > 0 && b <= 1e6)) {
      return absl::InvalidArgumentError(
          absl::StrCat("budget fraction ", b, " is not in (0, 1e6]"));
    }
  }
  // One task's runs only: a loss and an accuracy, or token and image losses, do not compare.
  for (const CompareRun& run : runs) {
    for (const char* key : {"test_metric_name", "train_size_unit"}) {
      const std::string mine = run.summary.value(key, std::string());
      const std::string base = runs[baseline].summary.value(key, std::string());
      if (mine != base) {
        return absl::InvalidArgumentError(absl::StrCat(
            "runs of different tasks do not compare: ", run.name, " has ", key, " '", mine,
            "', the baseline ", runs[baseline].name, " '", base, "'"));
      }
    }
  }
  CompareTable table;
  table.baseline = runs[baseline].name;
  table.budget_fractions = budget_fractions;
  std::vector<Curve> curves;
  for (const CompareRun& run : runs) {
    CompareRow row;
    row.name = run.name;
    auto mode = run.summary.find("mode");
    if (mode == run.summary.end() || !mode->is_string()) return Missing(run.name, "mode");
    row.mode = mode->get<std::string>();
    row.seed = run.summary.value("seed", int64_t{0});
    row.steps = run.summary.value("steps", int64_t{0});
    absl::StatusOr<int64_t> ranks = Ranks(run);
    if (!ranks.ok()) return ranks.status();
    row.world_size = *ranks;
    absl::StatusOr<double> v = Number(run, "flops_total");
    if (!v.ok()) return v.status();
    row.flops_total = *v * static_cast<double>(row.world_size);
    if (v = Number(run, "best_val_loss"); !v.ok()) return v.status();
    row.best_val_loss = *v;
    if (v = Number(run, "best_step"); !v.ok()) return v.status();
    row.best_step = static_cast<int64_t>(*v);
    if (v = Number(run, "test_metric"); !v.ok()) return v.status();
    row.test_metric = *v;
    row.test_metric_name = run.summary.value("test_metric_name", std::string("loss"));
    if (v = Number(run, "wall_seconds"); !v.ok()) return v.status();
    row.wall_seconds = *v;
    row.mean_active_fraction = run.summary.value("mean_active_fraction", 1.0);
    absl::StatusOr<Curve> curve = ReadCurve(run);
    if (!curve.ok()) return curve.status();
    row.has_curve = !curve->empty();
    curves.push_back(std::move(*curve));
    table.rows.push_back(std::move(row));
  }
  const CompareRow& base = table.rows[baseline];
  for (double b : budget_fractions) table.budget_flops.push_back(b * base.flops_total);
  for (size_t r = 0; r < table.rows.size(); ++r) {
    CompareRow& row = table.rows[r];
    const Curve& c = curves[r];
    row.flops_ratio = base.flops_total > 0 ? row.flops_total / base.flops_total : 0;
    for (double budget : table.budget_flops) {
      std::optional<double> at;
      for (size_t i = 0; i < c.step.size(); ++i) {
        if (c.flops[i] <= budget) at = c.val[i];
      }
      row.val_at_budget.push_back(at);
    }
    if (static_cast<int>(r) == baseline) {
      // The baseline reaches its own best at its best step.
      row.flops_to_baseline_best =
          runs[r].summary.contains("flops_to_best")
              ? runs[r].summary.value("flops_to_best", 0.0) * static_cast<double>(row.world_size)
              : row.flops_total;
      row.wall_seconds_to_baseline_best =
          runs[r].summary.value("wall_seconds_to_best", row.wall_seconds);
      continue;
    }
    for (size_t i = 0; i < c.step.size(); ++i) {
      if (c.val[i] <= base.best_val_loss) {
        row.flops_to_baseline_best = c.flops[i];
        row.wall_seconds_to_baseline_best = c.wall[i];
        break;
      }
    }
  }
  return table;
}

std::string FormatCompareTable(const CompareTable& table) {
  std::ostringstream out;
  const CompareRow* base = nullptr;
  for (const CompareRow& row : table.rows) {
    if (row.name == table.baseline) base = &row;
  }
  out << "baseline: " << table.baseline;
  if (base != nullptr) {
    out << absl::StrFormat(" (%s, %.4g FLOPs, best validation loss %.4f)", base->mode,
                           base->flops_total, base->best_val_loss);
  }
  out << "\n";
  size_t name_width = 4;
  for (const CompareRow& row : table.rows) name_width = std::max(name_width, row.name.size());
  std::vector<std::string> header = {"RUN", "MODE", "SEED", "FLOPS", "xBASE"};
  for (double b : table.budget_fractions) {
    header.push_back(absl::StrFormat("VAL@%g%%", b * 100));
  }
  const std::string test_name =
      !table.rows.empty() && table.rows.front().test_metric_name == "accuracy" ? "TEST-ACC"
                                                                               : "TEST@BEST";
  header.push_back("BEST-VAL");
  header.push_back(test_name);
  for (const char* h : {"FLOPS>BASE-BEST", "SECS>BASE-BEST", "ACTIVE"}) header.push_back(h);
  std::vector<std::vector<std::string>> cells = {header};
  for (const CompareRow& row : table.rows) {
    std::vector<std::string> line = {row.name, row.mode, std::to_string(row.seed),
                                     absl::StrFormat("%.3e", row.flops_total),
                                     absl::StrFormat("%.2f", row.flops_ratio)};
    for (const auto& v : row.val_at_budget) line.push_back(Or(v, "%.4f"));
    line.push_back(absl::StrFormat("%.4f", row.best_val_loss));
    line.push_back(absl::StrFormat("%.4f", row.test_metric));
    std::string flops_to = Or(row.flops_to_baseline_best, "%.3e");
    if (row.flops_to_baseline_best.has_value() && base != nullptr &&
        base->flops_to_baseline_best.value_or(0) > 0) {
      flops_to += absl::StrFormat(" (%.2f)", *row.flops_to_baseline_best /
                                                 *base->flops_to_baseline_best);
    }
    const char* unknown = row.has_curve ? "never" : "-";  // without a curve: not known
    if (!row.flops_to_baseline_best.has_value()) flops_to = unknown;
    line.push_back(flops_to);
    line.push_back(row.wall_seconds_to_baseline_best.has_value()
                       ? absl::StrFormat("%.1f", *row.wall_seconds_to_baseline_best)
                       : std::string(unknown));
    line.push_back(absl::StrFormat("%.3f", row.mean_active_fraction));
    cells.push_back(std::move(line));
  }
  std::vector<size_t> width(header.size(), 0);
  for (const auto& line : cells) {
    for (size_t i = 0; i < line.size(); ++i) width[i] = std::max(width[i], line[i].size());
  }
  width[0] = std::max(width[0], name_width);
  for (const auto& line : cells) {
    std::string text;
    for (size_t i = 0; i < line.size(); ++i) {
      std::string cell = line[i];
      if (i + 1 < line.size()) cell.resize(width[i] + 2, ' ');
      text += cell;
    }
    out << text << "\n";
  }
  out << "VAL@b: validation loss at the last evaluation within b of the baseline's FLOPs. "
         "FLOPS>BASE-BEST, SECS>BASE-BEST: FLOPs (ratio to the baseline's) and training "
         "seconds until validation first reached the baseline's best. ACTIVE: mean fraction of "
         "modules trained per step.\n";
  return out.str();
}

json CompareToJson(const CompareTable& table) {
  json runs = json::array();
  for (const CompareRow& row : table.rows) {
    json at = json::array();
    for (const auto& v : row.val_at_budget) at.push_back(OrNull(v));
    runs.push_back({{"name", row.name},
                    {"mode", row.mode},
                    {"seed", row.seed},
                    {"steps", row.steps},
                    {"world_size", row.world_size},
                    {"flops_total", row.flops_total},
                    {"flops_ratio", row.flops_ratio},
                    {"val_loss_at_budget", at},
                    {"best_val_loss", row.best_val_loss},
                    {"best_step", row.best_step},
                    {"test_metric_name", row.test_metric_name},
                    {"test_metric", row.test_metric},
                    {"flops_to_baseline_best", OrNull(row.flops_to_baseline_best)},
                    {"wall_seconds_to_baseline_best", OrNull(row.wall_seconds_to_baseline_best)},
                    {"mean_active_fraction", row.mean_active_fraction},
                    {"wall_seconds", row.wall_seconds}});
  }
  return {{"baseline", table.baseline},
          {"budget_fractions", table.budget_fractions},
          {"budget_flops", table.budget_flops},
          {"runs", runs}};
}

absl::StatusOr<std::string> RenderCompareSvg(const std::vector<CompareRun>& runs,
                                             const CompareTable& table, const std::string& title) {
  struct Series {
    std::string name;
    std::vector<std::pair<double, double>> points;  // (FLOPs, validation loss), finite only
  };
  std::vector<Series> series;
  double x_max = 0, y_min = INFINITY, y_max = -INFINITY;
  for (const CompareRun& run : runs) {
    absl::StatusOr<Curve> c = ReadCurve(run);
    if (!c.ok()) return c.status();
    Series s{run.name, {}};
    for (size_t i = 0; i < c->step.size(); ++i) {
      if (!std::isfinite(c->flops[i]) || !std::isfinite(c->val[i])) continue;
      s.points.push_back({c->flops[i], c->val[i]});
      x_max = std::max(x_max, c->flops[i]);
      y_min = std::min(y_min, c->val[i]);
      y_max = std::max(y_max, c->val[i]);
    }
    if (!s.points.empty()) series.push_back(std::move(s));
  }
  if (series.empty()) {
    return absl::FailedPreconditionError(
        "no run has an eval_curve in its summary (finished before it was recorded?)");
  }
  if (x_max <= 0) x_max = 1;
  if (!(y_max > y_min)) {
    y_min -= 0.5;
    y_max += 0.5;
  }
  const double pad = 0.05 * (y_max - y_min);
  y_min -= pad;
  y_max += pad;
  constexpr int kWidth = 820, kHeight = 520, kLeft = 80, kRight = 200, kTop = 50, kBottom = 60;
  const double plot_w = kWidth - kLeft - kRight, plot_h = kHeight - kTop - kBottom;
  auto X = [&](double f) { return kLeft + plot_w * f / x_max; };
  auto Y = [&](double v) { return kTop + plot_h * (y_max - v) / (y_max - y_min); };
  static const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  std::ostringstream svg;
  svg << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kWidth << "\" height=\""
      << kHeight << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
      << "<title>" << XmlEscape(title) << "</title>\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << kLeft << "\" y=\"24\" font-size=\"14\">" << XmlEscape(title)
      << "</text>\n";
  // Axes and ticks: 5 on each.
  svg << absl::StrFormat(
      "<rect x=\"%d\" y=\"%d\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"black\"/>\n",
      kLeft, kTop, plot_w, plot_h);
  for (int i = 0; i <= 5; ++i) {
    const double f = x_max * i / 5, v = y_min + (y_max - y_min) * i / 5;
    svg << absl::StrFormat(
        "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%.2e</text>\n", X(f), kHeight - kBottom + 18, f);
    svg << absl::StrFormat("<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.3f</text>\n",
                           kLeft - 6, Y(v) + 4, v);
  }
  svg << absl::StrFormat(
      "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">FLOPs</text>\n"
      "<text x=\"16\" y=\"%.1f\" transform=\"rotate(-90 16 %.1f)\" text-anchor=\"middle\">"
      "validation loss (nats)</text>\n",
      kLeft + plot_w / 2, kHeight - 16, kTop + plot_h / 2, kTop + plot_h / 2);
  for (const CompareRow& row : table.rows) {
    if (row.name != table.baseline || !std::isfinite(row.best_val_loss)) continue;
    if (row.best_val_loss < y_min || row.best_val_loss > y_max) continue;
    svg << absl::StrFormat(
        "<line class=\"baseline-best\" x1=\"%d\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
        "stroke=\"gray\" stroke-dasharray=\"4 3\"><title>%s: best validation loss %.4f</title>"
        "</line>\n",
        kLeft, Y(row.best_val_loss), kLeft + plot_w, Y(row.best_val_loss),
        XmlEscape(row.name), row.best_val_loss);
  }
  for (size_t s = 0; s < series.size(); ++s) {
    const char* color = kColors[s % (sizeof(kColors) / sizeof(kColors[0]))];
    svg << "<polyline class=\"run\" fill=\"none\" stroke=\"" << color
        << "\" stroke-width=\"1.5\" points=\"";
    for (const auto& [f, v] : series[s].points) svg << absl::StrFormat("%.1f,%.1f ", X(f), Y(v));
    svg << "\"><title>" << XmlEscape(series[s].name) << "</title></polyline>\n";
    const double ly = kTop + 16 * s + 8;
    svg << absl::StrFormat(
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>"
        "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
        kLeft + plot_w + 12, ly, kLeft + plot_w + 32, ly, color, kLeft + plot_w + 38, ly + 4,
        XmlEscape(series[s].name));
  }
  svg << "</svg>\n";
  return svg.str();
}

}  // namespace mat::client
