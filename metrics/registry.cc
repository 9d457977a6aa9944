#include "metrics/registry.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "common/status.h"

namespace mat::metrics {
namespace internal {

struct Series {
  double value = 0;                 // counter, gauge
  std::vector<uint64_t> buckets;    // histogram: per bound (not cumulative), then +Inf
  double sum = 0;
  uint64_t count = 0;
};

struct Family {
  std::string name;
  std::string help;
  MetricType type = MetricType::kGauge;
  std::vector<std::string> label_names;
  std::vector<double> bounds;  // histogram only
  std::map<LabelValues, Series> series;

  // The series of `labels`, created when absent. REQUIRES: the registry's mutex is held.
  Series& At(const LabelValues& labels) {
    MAT_CHECK(labels.size() == label_names.size())
        << "metric " << name << " has " << label_names.size() << " labels, got "
        << labels.size() << " values";
    auto it = series.find(labels);
    if (it == series.end()) {
      it = series.emplace(labels, Series{}).first;
      if (type == MetricType::kHistogram) it->second.buckets.assign(bounds.size() + 1, 0);
    }
    return it->second;
  }
  const Series* Find(const LabelValues& labels) const {
    auto it = series.find(labels);
    return it == series.end() ? nullptr : &it->second;
  }
  void Remove(const LabelValues& labels) {
    if (label_names.empty()) {
      series.clear();
      At({});  // a family without labels always has its one series
      return;
    }
    series.erase(labels);
  }
};

}  // namespace internal

namespace {

bool ValidName(const std::string& name, bool allow_colon) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                       (allow_colon && c == ':');
    const bool digit = c >= '0' && c <= '9';
    if (!(alpha || (i > 0 && digit))) return false;
  }
  return true;
}

std::string EscapeHelp(const std::string& help) {
  std::string out;
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

const char* TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

// `{a="x",b="y"}` (with `extra` = `le="…"` appended), or "" without labels.
std::string LabelText(const std::vector<std::string>& names, const LabelValues& values,
                      const std::string& extra = "") {
  if (names.empty() && extra.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ',';
    out += names[i] + "=\"" + EscapeLabelValue(values[i]) + "\"";
  }
  if (!extra.empty()) {
    if (!names.empty()) out += ',';
    out += extra;
  }
  out += '}';
  return out;
}

}  // namespace

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    std::snprintf(buf, sizeof(buf), "%.0f", v);  // integers without an exponent: "10", not "1e+01"
    return buf;
  }
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string EscapeLabelValue(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  MAT_CHECK(start > 0 && factor > 1 && count >= 1)
      << "ExponentialBuckets(" << start << ", " << factor << ", " << count << ")";
  std::vector<double> out;
  double b = start;
  for (int i = 0; i < count; ++i, b *= factor) out.push_back(b);
  return out;
}

// ----- handles -----

void Counter::Inc(const LabelValues& labels, double v) const {
  MAT_CHECK(v >= 0) << "counter " << family_->name << " cannot decrease (Inc " << v << ")";
  std::lock_guard<std::mutex> lock(registry_->mu_);
  family_->At(labels).value += v;
}

void Counter::SetIfGreater(const LabelValues& labels, double v) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  internal::Series& s = family_->At(labels);
  if (v > s.value) s.value = v;
}

double Counter::Value(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  const internal::Series* s = family_->Find(labels);
  return s == nullptr ? 0 : s->value;
}

void Counter::Remove(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  family_->Remove(labels);
}

bool Counter::Exists(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  return family_->Find(labels) != nullptr;
}

void Gauge::Set(const LabelValues& labels, double v) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  family_->At(labels).value = v;
}

void Gauge::Add(const LabelValues& labels, double v) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  family_->At(labels).value += v;
}

double Gauge::Value(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  const internal::Series* s = family_->Find(labels);
  return s == nullptr ? 0 : s->value;
}

void Gauge::Remove(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  family_->Remove(labels);
}

bool Gauge::Exists(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  return family_->Find(labels) != nullptr;
}

void Histogram::Observe(const LabelValues& labels, double v) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  internal::Series& s = family_->At(labels);
  const auto& bounds = family_->bounds;
  // The first bound >= v (NaN compares false everywhere: +Inf only).
  size_t i = 0;
  while (i < bounds.size() && !(v <= bounds[i])) ++i;
  ++s.buckets[i];
  s.sum += v;
  ++s.count;
}

HistogramSnapshot Histogram::Get(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  HistogramSnapshot out;
  out.bounds = family_->bounds;
  out.cumulative.assign(out.bounds.size() + 1, 0);
  const internal::Series* s = family_->Find(labels);
  if (s == nullptr) return out;
  uint64_t running = 0;
  for (size_t i = 0; i < s->buckets.size(); ++i) out.cumulative[i] = running += s->buckets[i];
  out.sum = s->sum;
  out.count = s->count;
  return out;
}

void Histogram::Remove(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  family_->Remove(labels);
}

bool Histogram::Exists(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  return family_->Find(labels) != nullptr;
}

// ----- Registry -----

Registry::Registry() = default;
Registry::~Registry() = default;

internal::Family* Registry::Add(const std::string& name, const std::string& help, MetricType type,
                                const std::vector<std::string>& label_names,
                                std::vector<double> bounds) {
  MAT_CHECK(ValidName(name, /*allow_colon=*/true)) << "bad metric name '" << name << "'";
  std::set<std::string> seen;
  for (const std::string& label : label_names) {
    MAT_CHECK(ValidName(label, /*allow_colon=*/false) && label.rfind("__", 0) != 0)
        << "metric " << name << ": bad label name '" << label << "'";
    MAT_CHECK(!(type == MetricType::kHistogram && label == "le"))
        << "metric " << name << ": 'le' is reserved for histogram buckets";
    MAT_CHECK(seen.insert(label).second) << "metric " << name << ": label " << label << " twice";
  }
  if (type == MetricType::kHistogram) {
    MAT_CHECK(!bounds.empty()) << "histogram " << name << " has no buckets";
    for (size_t i = 0; i < bounds.size(); ++i) {
      MAT_CHECK(std::isfinite(bounds[i]) && (i == 0 || bounds[i] > bounds[i - 1]))
          << "histogram " << name << ": bounds must be finite and strictly increasing";
    }
  }
  auto family = std::make_unique<internal::Family>();
  family->name = name;
  family->help = help;
  family->type = type;
  family->label_names = label_names;
  family->bounds = std::move(bounds);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& f : families_) {
    MAT_CHECK(f->name != name) << "metric " << name << " registered twice";
  }
  if (label_names.empty()) family->At({});
  families_.push_back(std::move(family));
  return families_.back().get();
}

Counter Registry::AddCounter(const std::string& name, const std::string& help,
                             const std::vector<std::string>& label_names) {
  return Counter(this, Add(name, help, MetricType::kCounter, label_names, {}));
}

Gauge Registry::AddGauge(const std::string& name, const std::string& help,
                         const std::vector<std::string>& label_names) {
  return Gauge(this, Add(name, help, MetricType::kGauge, label_names, {}));
}

Histogram Registry::AddHistogram(const std::string& name, const std::string& help,
                                 const std::vector<std::string>& label_names,
                                 std::vector<double> bounds) {
  return Histogram(this, Add(name, help, MetricType::kHistogram, label_names, std::move(bounds)));
}

int Registry::RemoveSeriesWithLabel(const std::string& label, const std::string& value) {
  std::lock_guard<std::mutex> lock(mu_);
  int removed = 0;
  for (const auto& family : families_) {
    const auto& names = family->label_names;
    const auto pos = std::find(names.begin(), names.end(), label);
    if (pos == names.end()) continue;
    const size_t index = static_cast<size_t>(pos - names.begin());
    for (auto it = family->series.begin(); it != family->series.end();) {
      if (it->first[index] == value) {
        it = family->series.erase(it);
        ++removed;
      } else {
        ++it;
      }
    }
  }
  return removed;
}

std::vector<std::string> Registry::Names() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& family : families_) out.push_back(family->name);
  return out;
}

std::string Registry::Expose() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& family : families_) {
    const std::string& name = family->name;
    out += "# HELP " + name + " " + EscapeHelp(family->help) + "\n";
    out += "# TYPE " + name + " " + TypeName(family->type) + "\n";
    for (const auto& [labels, series] : family->series) {
      if (family->type != MetricType::kHistogram) {
        out += name + LabelText(family->label_names, labels) + " " + FormatValue(series.value) +
               "\n";
        continue;
      }
      uint64_t running = 0;
      for (size_t i = 0; i <= family->bounds.size(); ++i) {
        running += series.buckets[i];
        const std::string le =
            i < family->bounds.size() ? FormatValue(family->bounds[i]) : std::string("+Inf");
        out += name + "_bucket" + LabelText(family->label_names, labels, "le=\"" + le + "\"") +
               " " + std::to_string(running) + "\n";
      }
      const std::string text = LabelText(family->label_names, labels);
      out += name + "_sum" + text + " " + FormatValue(series.sum) + "\n";
      out += name + "_count" + text + " " + std::to_string(series.count) + "\n";
    }
  }
  return out;
}

}  // namespace mat::metrics
