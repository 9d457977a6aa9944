#include "client/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace mat::client {
namespace {

// Layout, pixels.
constexpr int kMaxHeatmapWidth = 720;   // columns shrink to fit, down to kMinCellWidth
constexpr int kMaxHeatmapHeight = 520;  // rows shrink to fit, down to kMinCellHeight
constexpr int kMinCellWidth = 2;
constexpr int kMaxCellWidth = 40;
constexpr int kMinCellHeight = 2;
constexpr int kMaxCellHeight = 14;
constexpr int kGroupGap = 6;
constexpr int kTop = 64;
constexpr int kRight = 110;
constexpr int kMinWidth = 820;
constexpr int kLabelFontPx = 9;
constexpr size_t kMaxLabelChars = 28;
constexpr const char* kNoValueColor = "#d0d0d0";

// The number of modules: the descriptors or the longest point, whichever is more.
int ModuleCount(const v1::GetSpectraReply& spectra) {
  int m = spectra.modules_size();
  for (const v1::SpectraPoint& p : spectra.points()) m = std::max(m, p.lambda_max_size());
  return m;
}

std::string ModuleName(const v1::GetSpectraReply& spectra, int i) {
  return i < spectra.modules_size() ? spectra.modules(i).name() : absl::StrCat("m", i);
}

std::string ModuleGroup(const v1::GetSpectraReply& spectra, int i) {
  return i < spectra.modules_size() ? spectra.modules(i).group() : "";
}

// Module indices per group: groups in order of first appearance, modules in index order.
std::vector<std::pair<std::string, std::vector<int>>> Groups(const v1::GetSpectraReply& spectra,
                                                             int modules) {
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  std::map<std::string, size_t> position;
  for (int i = 0; i < modules; ++i) {
    const std::string group = ModuleGroup(spectra, i);
    auto [it, inserted] = position.emplace(group, groups.size());
    if (inserted) groups.push_back({group, {}});
    groups[it->second].second.push_back(i);
  }
  return groups;
}

// The finite λ of module i at point p, or NaN when missing or not finite.
double Lambda(const v1::SpectraPoint& p, int i) {
  if (i >= p.lambda_max_size() || !std::isfinite(p.lambda_max(i))) return std::nan("");
  return p.lambda_max(i);
}

// "%.3g" of a finite value ("0.0123", "1.5e+03").
std::string Short(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  return buf;
}

bool StartsCharacter(char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; }

size_t CharCount(const std::string& text) {
  return static_cast<size_t>(std::count_if(text.begin(), text.end(), StartsCharacter));
}

// At most kMaxLabelChars characters (UTF-8 aware): a longer name keeps its start and its end
// (where layer and index usually are) around a "…".
std::string Truncate(const std::string& text) {
  const size_t chars = CharCount(text);
  if (chars <= kMaxLabelChars) return text;
  const size_t head = (kMaxLabelChars - 1) / 2;
  const size_t tail = kMaxLabelChars - 1 - head;
  size_t head_end = 0, tail_start = 0, seen = 0;  // byte offsets
  for (size_t i = 0; i < text.size(); ++i) {
    if (!StartsCharacter(text[i])) continue;
    if (seen == head) head_end = i;
    if (seen == chars - tail) tail_start = i;
    ++seen;
  }
  return text.substr(0, head_end) + "…" + text.substr(tail_start);
}

}  // namespace

std::vector<std::vector<bool>> ApproximateOffCells(const v1::GetSpectraReply& spectra,
                                                   double alpha) {
  const int modules = ModuleCount(spectra);
  std::vector<std::vector<bool>> off(spectra.points_size(), std::vector<bool>(modules, false));
  if (!(alpha >= 0 && alpha <= 1)) return off;  // no overlay
  const auto groups = Groups(spectra, modules);
  for (int p = 0; p < spectra.points_size(); ++p) {
    const v1::SpectraPoint& point = spectra.points(p);
    for (const auto& [name, members] : groups) {
      double lo = INFINITY, hi = -INFINITY;
      for (int i : members) {
        const double v = Lambda(point, i);
        if (std::isnan(v)) continue;
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
      if (!(hi > lo)) continue;  // no finite value, or all equal: every module active
      const double threshold = lo + (hi - lo) * alpha;
      for (int i : members) {
        const double v = Lambda(point, i);
        if (!std::isnan(v) && v <= threshold) off[p][i] = true;
      }
    }
  }
  return off;
}

std::string ViridisColor(double t) {
  static constexpr int kSamples[11][3] = {
      {0x44, 0x01, 0x54}, {0x48, 0x24, 0x75}, {0x41, 0x44, 0x87}, {0x35, 0x5f, 0x8d},
      {0x2a, 0x78, 0x8e}, {0x21, 0x91, 0x8c}, {0x22, 0xa8, 0x84}, {0x44, 0xbf, 0x70},
      {0x7a, 0xd1, 0x51}, {0xbd, 0xdf, 0x26}, {0xfd, 0xe7, 0x25}};
  if (!(t > 0)) t = 0;  // also NaN
  if (t > 1) t = 1;
  const double x = t * 10;
  const int k = std::min(static_cast<int>(x), 9);
  const double f = x - k;
  char buf[8];
  int rgb[3];
  for (int c = 0; c < 3; ++c) {
    rgb[c] =
        static_cast<int>(std::lround(kSamples[k][c] + (kSamples[k + 1][c] - kSamples[k][c]) * f));
  }
  std::snprintf(buf, sizeof(buf), "#%02x%02x%02x", rgb[0], rgb[1], rgb[2]);
  return buf;
}

std::string XmlEscape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n' && c != '\r') {
          out += '?';
        } else {
          out += c;
        }
    }
  }
  return out;
}

absl::StatusOr<std::string> RenderSpectraSvg(const v1::GetSpectraReply& spectra, double alpha,
                                             const std::string& title) {
  const int steps = spectra.points_size();
  int reported = 0;
  for (const v1::SpectraPoint& p : spectra.points())
    reported = std::max(reported, p.lambda_max_size());
  if (steps == 0) return absl::FailedPreconditionError("no λ reports to plot");
  if (reported == 0) {
    return absl::FailedPreconditionError(
        "no λ values to plot: every report is empty (a policy that needs no spectra)");
  }
  const int modules = ModuleCount(spectra);
  const auto groups = Groups(spectra, modules);
  const auto off = ApproximateOffCells(spectra, alpha);
  const bool overlay = alpha >= 0 && alpha <= 1;

  // Color scale: log10 over the finite positive λ.
  double lo = INFINITY, hi = -INFINITY;
  for (const v1::SpectraPoint& p : spectra.points()) {
    for (double v : p.lambda_max()) {
      if (std::isfinite(v) && v > 0) {
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
    }
  }
  const bool have_scale = hi >= lo;  // some positive value
  const double log_lo = have_scale ? std::log10(lo) : 0;
  const double log_hi = have_scale ? std::log10(hi) : 0;
  auto color_of = [&](double v) -> std::string {
    if (std::isnan(v)) return kNoValueColor;
    if (!have_scale || v <= 0) return ViridisColor(0);
    if (!(log_hi > log_lo)) return ViridisColor(0.5);
    return ViridisColor((std::log10(v) - log_lo) / (log_hi - log_lo));
  };

  // Geometry.
  const int cell_w = std::clamp(kMaxHeatmapWidth / steps, kMinCellWidth, kMaxCellWidth);
  const int cell_h = std::clamp(kMaxHeatmapHeight / modules, kMinCellHeight, kMaxCellHeight);
  size_t label_chars = 4;
  for (int i = 0; i < modules; ++i) {
    label_chars = std::max(label_chars, CharCount(Truncate(ModuleName(spectra, i))));
  }
  const int left = 34 + static_cast<int>(label_chars) * 6 + 8;
  const int heat_w = steps * cell_w;
  const int heat_h = modules * cell_h + kGroupGap * (static_cast<int>(groups.size()) - 1);
  const int heat_bottom = kTop + heat_h;
  const int legend_top = heat_bottom + 52;
  const int width = std::max(left + heat_w + kRight, kMinWidth);
  const int height = legend_top + 90;
  const int label_every = std::max(1, (kLabelFontPx + 1 + cell_h - 1) / cell_h);
  const int x_every = (40 + cell_w - 1) / cell_w;  // a step label every 40 px or more

  std::string svg;
  svg.reserve(static_cast<size_t>(steps) * modules * 150 + 8192);
  absl::StrAppend(&svg, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
                  "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"", width, "\" height=\"",
                  height, "\" viewBox=\"0 0 ", width, " ", height,
                  "\" font-family=\"sans-serif\">\n");
  absl::StrAppend(&svg, "<title>", XmlEscape(title), "</title>\n");
  svg += "<defs>\n<linearGradient id=\"viridis\" x1=\"0\" x2=\"1\" y1=\"0\" y2=\"0\">\n";
  for (int k = 0; k <= 10; ++k) {
    absl::StrAppend(&svg, "<stop offset=\"", k * 10, "%\" stop-color=\"", ViridisColor(k / 10.0),
                    "\"/>\n");
  }
  svg +=
      "</linearGradient>\n"
      "<pattern id=\"hatch\" width=\"4\" height=\"4\" patternUnits=\"userSpaceOnUse\" "
      "patternTransform=\"rotate(45)\"><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"4\" "
      "stroke=\"#202020\" stroke-width=\"1.2\" stroke-opacity=\"0.7\"/></pattern>\n"
      "</defs>\n";
  absl::StrAppend(&svg, "<rect class=\"background\" x=\"0\" y=\"0\" width=\"", width,
                  "\" height=\"", height, "\" fill=\"#ffffff\"/>\n");
  absl::StrAppend(&svg, "<text x=\"16\" y=\"26\" font-size=\"16\" font-weight=\"bold\">",
                  XmlEscape(title), "</text>\n");
  absl::StrAppend(&svg, "<text x=\"16\" y=\"46\" font-size=\"11\" fill=\"#404040\">",
                  "λ_max per module (rows, grouped) and probe step (columns); color: log10 λ_max",
                  overlay ? absl::StrCat("; hatched: approximately masked off (α = ", Short(alpha),
                                         ", see below)")
                          : std::string("; no mask overlay"),
                  "</text>\n");

  // Cells, row by row in group order; off cells also go into one hatch path.
  std::string hatch;
  bool any_missing = false;
  int y = kTop;
  svg += "<g class=\"cells\">\n";
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& [group, members] = groups[g];
    const int group_top = y;
    for (size_t r = 0; r < members.size(); ++r, y += cell_h) {
      const int i = members[r];
      const std::string name = XmlEscape(ModuleName(spectra, i));
      if (r % label_every == 0) {
        absl::StrAppend(&svg, "<text class=\"module\" x=\"", left - 6, "\" y=\"",
                        y + cell_h / 2 + 3, "\" font-size=\"", kLabelFontPx,
                        "\" text-anchor=\"end\">", XmlEscape(Truncate(ModuleName(spectra, i))),
                        "</text>\n");
      }
      for (int p = 0; p < steps; ++p) {
        const v1::SpectraPoint& point = spectra.points(p);
        const double v = Lambda(point, i);
        const int x = left + p * cell_w;
        std::string cls = "cell";
        if (std::isnan(v)) {
          cls += " na";
          any_missing = true;
        } else if (off[p][i]) {
          cls += " off";
          absl::StrAppend(&hatch, "M", x, " ", y, "h", cell_w, "v", cell_h, "h-", cell_w, "z");
        }
        absl::StrAppend(&svg, "<rect class=\"", cls, "\" x=\"", x, "\" y=\"", y, "\" width=\"",
                        cell_w, "\" height=\"", cell_h, "\" fill=\"", color_of(v), "\"",
                        off[p][i] ? " fill-opacity=\"0.45\"" : "", "><title>", name, " step ",
                        point.step(), ": ",
                        std::isnan(v) ? std::string("no value") : absl::StrCat("λ ", Short(v)),
                        off[p][i] ? " (off, approx.)" : "", "</title></rect>\n");
      }
    }
    const std::string group_name = group.empty() ? "(no group)" : group;
    absl::StrAppend(&svg, "<text class=\"group\" x=\"", left + heat_w + 8, "\" y=\"",
                    (group_top + y) / 2 + 4, "\" font-size=\"11\">", XmlEscape(group_name), " (",
                    members.size(), ")</text>\n");
    if (g + 1 < groups.size()) y += kGroupGap;
  }
  svg += "</g>\n";
  if (!hatch.empty()) {
    absl::StrAppend(&svg, "<path class=\"hatch\" d=\"", hatch, "\" fill=\"url(#hatch)\"/>\n");
  }

  // Axes: step labels under the columns, axis titles.
  for (int p = 0; p < steps; p += x_every) {
    absl::StrAppend(&svg, "<text class=\"step\" x=\"", left + p * cell_w + cell_w / 2, "\" y=\"",
                    heat_bottom + 14, "\" font-size=\"10\" text-anchor=\"middle\">",
                    spectra.points(p).step(), "</text>\n");
  }
  absl::StrAppend(&svg, "<text x=\"", left + heat_w / 2, "\" y=\"", heat_bottom + 32,
                  "\" font-size=\"12\" text-anchor=\"middle\">probe step</text>\n");
  absl::StrAppend(&svg, "<text x=\"16\" y=\"", kTop + heat_h / 2,
                  "\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 16 ",
                  kTop + heat_h / 2, ")\">module</text>\n");

  // Legend: the color ramp with min/max λ, then the overlay and missing values.
  absl::StrAppend(&svg, "<rect class=\"legend\" x=\"", left, "\" y=\"", legend_top,
                  "\" width=\"200\" height=\"12\" fill=\"url(#viridis)\"/>\n");
  absl::StrAppend(&svg, "<text x=\"", left, "\" y=\"", legend_top + 26,
                  "\" font-size=\"10\">min λ ", have_scale ? Short(lo) : std::string("-"),
                  "</text>\n");
  absl::StrAppend(&svg, "<text x=\"", left + 200, "\" y=\"", legend_top + 26,
                  "\" font-size=\"10\" text-anchor=\"end\">max λ ",
                  have_scale ? Short(hi) : std::string("-"), "</text>\n");
  absl::StrAppend(&svg, "<text x=\"", left + 210, "\" y=\"", legend_top + 10,
                  "\" font-size=\"10\">log10 λ_max from ", Short(log_lo), " to ", Short(log_hi),
                  " (viridis)</text>\n");
  int note_y = legend_top + 46;
  if (overlay) {
    absl::StrAppend(&svg, "<rect class=\"legend\" x=\"", left, "\" y=\"", note_y - 10,
                    "\" width=\"14\" height=\"12\" fill=\"", ViridisColor(0.5),
                    "\" fill-opacity=\"0.45\"/>\n");
    absl::StrAppend(&svg, "<rect class=\"legend\" x=\"", left, "\" y=\"", note_y - 10,
                    "\" width=\"14\" height=\"12\" fill=\"url(#hatch)\"/>\n");
    absl::StrAppend(&svg, "<text x=\"", left + 20, "\" y=\"", note_y,
                    "\" font-size=\"10\">masked off, approximated: λ ≤ λ_α = min + (max − min)·α "
                    "of its group at that probe step, α = ",
                    Short(alpha), "</text>\n");
    absl::StrAppend(&svg, "<text x=\"", left + 20, "\" y=\"", note_y + 14,
                    "\" font-size=\"10\" fill=\"#404040\">(the real mask also depends on the "
                    "EMA smoothing, warm-up, min_active_fraction and the temporal rule)</text>\n");
    note_y += 32;
  }
  if (any_missing) {
    absl::StrAppend(&svg, "<rect class=\"legend\" x=\"", left, "\" y=\"", note_y - 10,
                    "\" width=\"14\" height=\"12\" fill=\"", kNoValueColor, "\"/>\n");
    absl::StrAppend(&svg, "<text x=\"", left + 20, "\" y=\"", note_y,
                    "\" font-size=\"10\">no value</text>\n");
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace mat::client
