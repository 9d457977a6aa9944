// Tests of client/plot.h: the approximate mask (per group and probe step), the viridis ramp, XML
// escaping, and the SVG document: well-formed (checked by a minimal XML reader below), one cell
// per (module, step), escaped names, no NaN/infinity, clear errors for nothing to plot.
#include "client/plot.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace mat::client {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// A minimal XML well-formedness check, enough for the SVG written by RenderSpectraSvg: an
// optional <?xml …?> declaration, then exactly one root element; tags balanced and properly
// nested; attributes quoted, unique per element and without '<'; '&' only in the five named
// entities or numeric references; comments skipped. Returns "" when well-formed, else why not.
class XmlChecker {
 public:
  explicit XmlChecker(const std::string& text) : s_(text) {}

  std::string Check() {
    if (s_.compare(0, 5, "<?xml") == 0) {
      const size_t end = s_.find("?>");
      if (end == std::string::npos) return "unterminated XML declaration";
      pos_ = end + 2;
    }
    std::vector<std::string> open;
    int roots = 0;
    while (pos_ < s_.size()) {
      const size_t lt = s_.find('<', pos_);
      const std::string text =
          s_.substr(pos_, lt == std::string::npos ? std::string::npos : lt - pos_);
      if (std::string why = CheckText(text); !why.empty()) return why;
      if (open.empty() && text.find_first_not_of(" \t\r\n") != std::string::npos) {
        return "text outside the root element";
      }
      if (lt == std::string::npos) break;
      pos_ = lt;
      if (s_.compare(pos_, 4, "<!--") == 0) {
        const size_t end = s_.find("-->", pos_);
        if (end == std::string::npos) return "unterminated comment";
        pos_ = end + 3;
      } else if (s_.compare(pos_, 2, "</") == 0) {
        pos_ += 2;
        const std::string name = Name();
        if (open.empty() || open.back() != name) return "unexpected </" + name + ">";
        open.pop_back();
        SkipSpace();
        if (!Eat('>')) return "malformed </" + name;
      } else {
        ++pos_;
        const std::string name = Name();
        if (name.empty()) return "a tag without a name at " + std::to_string(pos_);
        if (open.empty() && ++roots > 1) return "a second root element <" + name + ">";
        std::vector<std::string> attributes;
        while (true) {
          SkipSpace();
          if (Eat('>')) {
            open.push_back(name);
            break;
          }
          if (s_.compare(pos_, 2, "/>") == 0) {
            pos_ += 2;
            break;
          }
          const std::string attribute = Name();
          if (attribute.empty()) return "malformed attribute in <" + name + ">";
          for (const std::string& a : attributes) {
            if (a == attribute) return "duplicate attribute " + attribute + " in <" + name + ">";
          }
          attributes.push_back(attribute);
          SkipSpace();
          if (!Eat('=')) return "attribute " + attribute + " without '='";
          SkipSpace();
          if (pos_ >= s_.size() || (s_[pos_] != '"' && s_[pos_] != '\'')) {
            return "unquoted attribute " + attribute;
          }
          const char quote = s_[pos_++];
          const size_t end = s_.find(quote, pos_);
          if (end == std::string::npos) return "unterminated attribute " + attribute;
          const std::string value = s_.substr(pos_, end - pos_);
          if (value.find('<') != std::string::npos) return "'<' in attribute " + attribute;
          if (std::string why = CheckText(value); !why.empty()) return why;
          pos_ = end + 1;
        }
      }
    }
    if (!open.empty()) return "unclosed <" + open.back() + ">";
    if (roots != 1) return "no root element";
    return "";
  }

 private:
  // '&' only as &amp; &lt; &gt; &quot; &apos; or &#…;
  static std::string CheckText(const std::string& text) {
    for (size_t i = text.find('&'); i != std::string::npos; i = text.find('&', i + 1)) {
      const size_t semi = text.find(';', i);
      if (semi == std::string::npos) return "bare '&'";
      const std::string entity = text.substr(i + 1, semi - i - 1);
      if (entity != "amp" && entity != "lt" && entity != "gt" && entity != "quot" &&
          entity != "apos" && (entity.empty() || entity[0] != '#')) {
        return "unknown entity &" + entity + ";";
      }
    }
    return "";
  }
  std::string Name() {
    const size_t start = pos_;
    while (pos_ < s_.size() &&
           (std::isalnum(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '-' ||
            s_[pos_] == '_' || s_[pos_] == ':' || s_[pos_] == '.')) {
      ++pos_;
    }
    return s_.substr(start, pos_ - start);
  }
  void SkipSpace() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool Eat(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  const std::string& s_;
  size_t pos_ = 0;
};

std::string CheckXml(const std::string& text) { return XmlChecker(text).Check(); }

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t i = text.find(what); i != std::string::npos; i = text.find(what, i + what.size())) {
    ++n;
  }
  return n;
}

void AddModule(v1::GetSpectraReply* spectra, const std::string& name, const std::string& group,
               int layer, int index) {
  v1::ModuleDescriptor* m = spectra->add_modules();
  m->set_name(name);
  m->set_group(group);
  m->set_layer(layer);
  m->set_index(index);
}

void AddPoint(v1::GetSpectraReply* spectra, int64_t step, const std::vector<double>& lambda) {
  v1::SpectraPoint* p = spectra->add_points();
  p->set_step(step);
  for (double v : lambda) p->add_lambda_max(v);
}

// Modules interleaved by group: 0 heads, 1 ffn, 2 heads, 3 heads, 4 ffn, 5 heads.
v1::GetSpectraReply TwoGroups() {
  v1::GetSpectraReply spectra;
  AddModule(&spectra, "layer0.head0", "heads", 0, 0);
  AddModule(&spectra, "layer0.ffn0", "ffn", 0, 0);
  AddModule(&spectra, "layer0.head1", "heads", 0, 1);
  AddModule(&spectra, "layer1.head0", "heads", 1, 0);
  AddModule(&spectra, "layer1.ffn0", "ffn", 1, 0);
  AddModule(&spectra, "layer1.head1", "heads", 1, 1);
  //              heads      ffn       heads   heads   ffn      heads
  AddPoint(&spectra, 0, {1.0, 5.0, 2.0, 3.0, 5.0, 10.0});
  AddPoint(&spectra, 20, {10.0, 0.5, 1.0, 4.0, 2.5, 7.0});
  AddPoint(&spectra, 40, {0.001, 100.0, 0.002, 0.003, 0.1, 0.004});
  return spectra;
}

TEST(PlotTest, ApproximateMaskThresholdsEachGroupAtEachStep) {
  const auto off = ApproximateOffCells(TwoGroups(), 0.3);
  ASSERT_EQ(off.size(), 3u);
  // Step 0, heads {1, 2, 3, 10}: λ_α = 1 + 9·0.3 = 3.7, so 1, 2, 3 are off; ffn {5, 5} are all
  // equal: none off (the policy keeps every module of an all-equal group).
  EXPECT_EQ(off[0], (std::vector<bool>{true, false, true, true, false, false}));
  // Step 20, heads {10, 1, 4, 7}: λ_α = 1 + 9·0.3 = 3.7; ffn {0.5, 2.5}: 0.5 + 2·0.3 = 1.1.
  EXPECT_EQ(off[1], (std::vector<bool>{false, true, true, false, false, false}));
  // Step 40, heads {0.001 … 0.004}: λ_α = 0.0019; ffn {100, 0.1}: 0.1 + 99.9·0.3.
  EXPECT_EQ(off[2], (std::vector<bool>{true, false, false, false, true, false}));

  // "At or below": α = 0 turns off exactly the group minimum, α = 1 every module of a group
  // whose values are not all equal.
  EXPECT_EQ(ApproximateOffCells(TwoGroups(), 0)[0],
            (std::vector<bool>{true, false, false, false, false, false}));
  EXPECT_EQ(ApproximateOffCells(TwoGroups(), 1)[0],
            (std::vector<bool>{true, false, true, true, false, true}));
}

TEST(PlotTest, ApproximateMaskIsEmptyWithoutAValidAlphaAndSkipsMissingValues) {
  for (double alpha : {std::nan(""), -0.1, 1.5}) {
    for (const auto& row : ApproximateOffCells(TwoGroups(), alpha)) {
      EXPECT_EQ(row, std::vector<bool>(6, false)) << alpha;
    }
  }
  v1::GetSpectraReply spectra;
  AddModule(&spectra, "a", "heads", 0, 0);
  AddModule(&spectra, "b", "heads", 0, 1);
  AddModule(&spectra, "c", "heads", 0, 2);
  AddPoint(&spectra, 0, {1, 2});  // c missing
  AddPoint(&spectra, 20, {1, std::numeric_limits<double>::infinity(), 3});
  const auto off = ApproximateOffCells(spectra, 0.5);
  EXPECT_EQ(off[0], (std::vector<bool>{true, false, false}));
  EXPECT_EQ(off[1], (std::vector<bool>{true, false, false})) << "Inf neither off nor in min/max";
}

TEST(PlotTest, ViridisRampHitsItsSamplesAndClamps) {
  EXPECT_EQ(ViridisColor(0), "#440154");
  EXPECT_EQ(ViridisColor(0.5), "#21918c");
  EXPECT_EQ(ViridisColor(1), "#fde725");
  EXPECT_EQ(ViridisColor(-3), "#440154");
  EXPECT_EQ(ViridisColor(7), "#fde725");
  EXPECT_EQ(ViridisColor(std::nan("")), "#440154");
  // Halfway between the samples at 0.2 (#414487) and 0.3 (#355f8d), rounded.
  EXPECT_EQ(ViridisColor(0.25), "#3b528a");
}

TEST(PlotTest, XmlEscapeCoversMarkupQuotesAndControlCharacters) {
  EXPECT_EQ(XmlEscape("a<b>&\"c\"'d'"), "a&lt;b&gt;&amp;&quot;c&quot;&apos;d&apos;");
  EXPECT_EQ(XmlEscape(std::string("x\x01y\tz")), "x?y\tz");
  EXPECT_EQ(XmlEscape("λ_max"), "λ_max");
}

TEST(PlotTest, SvgIsWellFormedWithOneCellPerModuleAndStep) {
  absl::StatusOr<std::string> svg = RenderSpectraSvg(TwoGroups(), 0.3, "job-000003: λ_max");
  ASSERT_TRUE(svg.ok()) << svg.status();
  EXPECT_EQ(CheckXml(*svg), "");
  EXPECT_THAT(*svg, ::testing::StartsWith("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg "));
  EXPECT_EQ(Count(*svg, "<rect class=\"cell"), 6u * 3u);
  // Off cells as ApproximateOffCells says: 3 + 2 + 2.
  EXPECT_EQ(Count(*svg, "<rect class=\"cell off\""), 7u);
  EXPECT_EQ(Count(*svg, "<path class=\"hatch\""), 1u);
  EXPECT_THAT(*svg, HasSubstr("<title>job-000003: λ_max</title>"));
  // Axis labels, steps, groups, the legend with min/max and the approximation stated.
  EXPECT_THAT(*svg, HasSubstr(">probe step</text>"));
  EXPECT_THAT(*svg, HasSubstr(">module</text>"));
  EXPECT_THAT(*svg, HasSubstr(">40</text>"));
  EXPECT_THAT(*svg, HasSubstr(">heads (4)</text>"));
  EXPECT_THAT(*svg, HasSubstr(">ffn (2)</text>"));
  EXPECT_THAT(*svg, HasSubstr("min λ 0.001<"));
  EXPECT_THAT(*svg, HasSubstr("max λ 100<"));
  EXPECT_THAT(*svg, HasSubstr("log10 λ_max from -3 to 2"));
  EXPECT_THAT(*svg, HasSubstr("approximated: λ ≤ λ_α = min + (max − min)·α"));
  EXPECT_THAT(*svg, HasSubstr("α = 0.3"));
  EXPECT_THAT(*svg, HasSubstr("temporal rule"));
  // Tooltips name module, step and value; the largest λ has the top color.
  EXPECT_THAT(*svg, HasSubstr("fill=\"#fde725\"><title>layer0.ffn0 step 40: λ 100</title>"));
  EXPECT_THAT(*svg, HasSubstr("fill=\"#440154\" fill-opacity=\"0.45\"><title>layer0.head0 step "
                              "40: λ 0.001 (off, approx.)</title>"));
  // Rows grouped: every heads row comes before the ffn rows (first appearance order).
  EXPECT_LT(svg->find(">layer1.head1</text>"), svg->find(">layer0.ffn0</text>"));
  EXPECT_THAT(*svg, Not(HasSubstr("no value")));
}

TEST(PlotTest, SvgEscapesNamesAndTitleAndNeverWritesNanOrInfinity) {
  v1::GetSpectraReply spectra;
  AddModule(&spectra, "a<b>&\"c\"", "g&<", 0, 0);
  AddModule(&spectra, "plain", "g&<", 0, 1);
  // One module short at the first point, an infinite and a zero λ at the second: grey "no
  // value" cells, the lowest color for 0, nothing non-finite in the document.
  AddPoint(&spectra, 0, {2.0});
  AddPoint(&spectra, 20, {std::numeric_limits<double>::infinity(), 0.0});
  AddPoint(&spectra, 40, {std::nan(""), 4.0});
  absl::StatusOr<std::string> svg = RenderSpectraSvg(spectra, 0.3, "job <1> & 'co'");
  ASSERT_TRUE(svg.ok()) << svg.status();
  EXPECT_EQ(CheckXml(*svg), "");
  EXPECT_EQ(Count(*svg, "<rect class=\"cell"), 2u * 3u);
  EXPECT_EQ(Count(*svg, "<rect class=\"cell na\""), 3u);
  EXPECT_THAT(*svg, HasSubstr("a&lt;b&gt;&amp;&quot;c&quot;"));
  EXPECT_THAT(*svg, HasSubstr("g&amp;&lt; (2)"));
  EXPECT_THAT(*svg, HasSubstr("<title>job &lt;1&gt; &amp; &apos;co&apos;</title>"));
  EXPECT_THAT(*svg, HasSubstr(">no value</text>"));
  EXPECT_THAT(*svg, Not(HasSubstr("a<b")));
  std::string lower = *svg;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  EXPECT_THAT(lower, Not(HasSubstr("nan")));
  EXPECT_THAT(lower, Not(HasSubstr("inf")));

  // Every λ equal (one value): a valid scale, still no NaN.
  v1::GetSpectraReply flat;
  AddPoint(&flat, 0, {3.0, 3.0});
  absl::StatusOr<std::string> flat_svg = RenderSpectraSvg(flat, 0.3, "flat");
  ASSERT_TRUE(flat_svg.ok()) << flat_svg.status();
  EXPECT_EQ(CheckXml(*flat_svg), "");
  EXPECT_THAT(*flat_svg, Not(HasSubstr("nan")));
  EXPECT_THAT(*flat_svg, HasSubstr(">m1</text>")) << "unknown modules get generic names";
  EXPECT_EQ(Count(*flat_svg, "<rect class=\"cell off\""), 0u);
}

TEST(PlotTest, LongNamesAreCutBetweenCharactersNotBytes) {
  std::string greek;
  for (int i = 0; i < 40; ++i) greek += "λ";  // two bytes each
  v1::GetSpectraReply spectra;
  AddModule(&spectra, greek, "heads", 0, 0);
  AddPoint(&spectra, 0, {1.0});
  absl::StatusOr<std::string> svg = RenderSpectraSvg(spectra, 0.3, "t");
  ASSERT_TRUE(svg.ok()) << svg.status();
  std::string head, tail;
  for (int i = 0; i < 13; ++i) head += "λ";
  for (int i = 0; i < 14; ++i) tail += "λ";
  EXPECT_THAT(*svg, HasSubstr(">" + head + "…" + tail + "</text>"));
  EXPECT_THAT(*svg, HasSubstr("<title>" + greek + " step 0: λ 1</title>"))
      << "tooltips keep it all";
}

TEST(PlotTest, SvgWithoutAlphaHasNoOverlay) {
  absl::StatusOr<std::string> svg = RenderSpectraSvg(TwoGroups(), std::nan(""), "full");
  ASSERT_TRUE(svg.ok()) << svg.status();
  EXPECT_EQ(CheckXml(*svg), "");
  EXPECT_EQ(Count(*svg, "cell off"), 0u);
  EXPECT_THAT(*svg, Not(HasSubstr("class=\"hatch\"")));
  EXPECT_THAT(*svg, HasSubstr("no mask overlay"));
}

TEST(PlotTest, NothingToPlotIsFailedPrecondition) {
  absl::StatusOr<std::string> none = RenderSpectraSvg(v1::GetSpectraReply(), 0.3, "t");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("no λ reports"));

  v1::GetSpectraReply empty_reports;  // a policy without spectra sends empty reports
  AddModule(&empty_reports, "layer0.head0", "heads", 0, 0);
  AddPoint(&empty_reports, 0, {});
  absl::StatusOr<std::string> empty = RenderSpectraSvg(empty_reports, 0.3, "t");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(PlotTest, LargeHistoriesStayWellFormedWithThinLabelledRows) {
  v1::GetSpectraReply spectra;
  const int modules = 150, steps = 400;
  for (int i = 0; i < modules; ++i) {
    AddModule(
        &spectra,
        "layer" + std::to_string(i / 12) + ".a_rather_long_module_name_" + std::to_string(i % 12),
        i % 3 == 0 ? "ffn" : "heads", i / 12, i % 12);
  }
  for (int s = 0; s < steps; ++s) {
    std::vector<double> lambda;
    for (int i = 0; i < modules; ++i) lambda.push_back(std::exp(0.01 * (i - s % 50)));
    AddPoint(&spectra, 20 * s, lambda);
  }
  absl::StatusOr<std::string> svg = RenderSpectraSvg(spectra, 0.3, "big");
  ASSERT_TRUE(svg.ok()) << svg.status();
  EXPECT_EQ(CheckXml(*svg), "");
  EXPECT_EQ(Count(*svg, "<rect class=\"cell"), static_cast<size_t>(modules * steps));
  const size_t labels = Count(*svg, "<text class=\"module\"");
  EXPECT_GT(labels, 10u);
  EXPECT_LT(labels, static_cast<size_t>(modules)) << "every few rows, not every row";
  EXPECT_THAT(*svg, HasSubstr(">layer0.a_rath…_module_name_0</text>"))
      << "long names keep their start and end";
  EXPECT_LT(Count(*svg, "<text class=\"step\""), 30u);
}

}  // namespace
}  // namespace mat::client
