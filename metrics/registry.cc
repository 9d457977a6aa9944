// The registry over prometheus-cpp (registry.h): prometheus::Family objects hold the series and
// the text serializer writes the exposition; this file keeps the project's handles, its checks
// and an index of the series by label values (for Value, Exists and removal by label).
#include "metrics/registry.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "common/status.h"

namespace mat::metrics {
namespace internal {

struct Family {
  std::string name;
  std::string help;  // escaped for the exposition
  MetricType type = MetricType::kGauge;
  std::vector<std::string> label_names;
  std::vector<double> bounds;  // histogram only
  // The prometheus-cpp family of `type` (owned by the Registry's prometheus::Registry).
  prometheus::Family<prometheus::Counter>* counters = nullptr;
  prometheus::Family<prometheus::Gauge>* gauges = nullptr;
  prometheus::Family<prometheus::Histogram>* histograms = nullptr;
  // Every series, by label values: the prometheus-cpp metric of that family.
  std::map<LabelValues, void*> series;

  prometheus::Labels Labels(const LabelValues& values) const {
    MAT_CHECK(values.size() == label_names.size())
        << "metric " << name << " has " << label_names.size() << " labels, got "
        << values.size() << " values";
    prometheus::Labels out;
    for (size_t i = 0; i < values.size(); ++i) out.emplace(label_names[i], values[i]);
    return out;
  }
  // The series of `values`, created (at 0) when absent. REQUIRES: the registry's mutex is held.
  void* At(const LabelValues& values) {
    auto it = series.find(values);
    if (it != series.end()) return it->second;
    const prometheus::Labels labels = Labels(values);
    void* metric = nullptr;
    switch (type) {
      case MetricType::kCounter:
        metric = &counters->Add(labels);
        break;
      case MetricType::kGauge:
        metric = &gauges->Add(labels);
        break;
      case MetricType::kHistogram:
        metric = &histograms->Add(labels, prometheus::Histogram::BucketBoundaries(bounds));
        break;
    }
    series.emplace(values, metric);
    return metric;
  }
  void* Find(const LabelValues& values) const {
    auto it = series.find(values);
    return it == series.end() ? nullptr : it->second;
  }
  // Drops one series. REQUIRES: the registry's mutex is held.
  void Erase(std::map<LabelValues, void*>::iterator it) {
    switch (type) {
      case MetricType::kCounter:
        counters->Remove(static_cast<prometheus::Counter*>(it->second));
        break;
      case MetricType::kGauge:
        gauges->Remove(static_cast<prometheus::Gauge*>(it->second));
        break;
      case MetricType::kHistogram:
        histograms->Remove(static_cast<prometheus::Histogram*>(it->second));
        break;
    }
    series.erase(it);
  }
  void Remove(const LabelValues& values) {
    auto it = series.find(values);
    if (it != series.end()) Erase(it);
    if (label_names.empty()) At({});  // a family without labels always has its one series
  }
  // The family's series as prometheus-cpp collects them, sorted by labels; a family without
  // series still has its HELP and TYPE.
  prometheus::MetricFamily Collect() const {
    std::vector<prometheus::MetricFamily> collected;
    switch (type) {
      case MetricType::kCounter:
        collected = counters->Collect();
        break;
      case MetricType::kGauge:
        collected = gauges->Collect();
        break;
      case MetricType::kHistogram:
        collected = histograms->Collect();
        break;
    }
    prometheus::MetricFamily out;
    if (!collected.empty()) out = std::move(collected.front());
    out.name = name;
    out.help = help;
    out.type = type == MetricType::kCounter ? prometheus::MetricType::Counter
               : type == MetricType::kGauge ? prometheus::MetricType::Gauge
                                            : prometheus::MetricType::Histogram;
    std::sort(out.metric.begin(), out.metric.end(),
              [](const prometheus::ClientMetric& a, const prometheus::ClientMetric& b) {
                return a.label < b.label;
              });
    return out;
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

// HELP text as the exposition format wants it: `\` -> `\\`, newline -> `\n`. prometheus-cpp
// 1.0.1 writes HELP as given, so a newline in it would break the exposition.
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

}  // namespace

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
  static_cast<prometheus::Counter*>(family_->At(labels))->Increment(v);
}

void Counter::SetIfGreater(const LabelValues& labels, double v) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  auto* c = static_cast<prometheus::Counter*>(family_->At(labels));
  if (v > c->Value()) c->Increment(v - c->Value());
}

double Counter::Value(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  const void* c = family_->Find(labels);
  return c == nullptr ? 0 : static_cast<const prometheus::Counter*>(c)->Value();
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
  static_cast<prometheus::Gauge*>(family_->At(labels))->Set(v);
}

void Gauge::Add(const LabelValues& labels, double v) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  static_cast<prometheus::Gauge*>(family_->At(labels))->Increment(v);
}

double Gauge::Value(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  const void* g = family_->Find(labels);
  return g == nullptr ? 0 : static_cast<const prometheus::Gauge*>(g)->Value();
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
  auto* h = static_cast<prometheus::Histogram*>(family_->At(labels));
  if (std::isnan(v)) {
    // prometheus-cpp would put NaN in the first bucket; it counts in +Inf, _sum and _count only.
    std::vector<double> increments(family_->bounds.size() + 1, 0.0);
    increments.back() = 1;
    h->ObserveMultiple(increments, v);
    return;
  }
  h->Observe(v);
}

HistogramSnapshot Histogram::Get(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(registry_->mu_);
  HistogramSnapshot out;
  out.bounds = family_->bounds;
  out.cumulative.assign(out.bounds.size() + 1, 0);
  const void* h = family_->Find(labels);
  if (h == nullptr) return out;
  const prometheus::ClientMetric m = static_cast<const prometheus::Histogram*>(h)->Collect();
  for (size_t i = 0; i < m.histogram.bucket.size() && i < out.cumulative.size(); ++i) {
    out.cumulative[i] = m.histogram.bucket[i].cumulative_count;
  }
  out.sum = m.histogram.sample_sum;
  out.count = m.histogram.sample_count;
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

Registry::Registry() : prometheus_(std::make_unique<prometheus::Registry>()) {}
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
  family->help = EscapeHelp(help);
  family->type = type;
  family->label_names = label_names;
  family->bounds = std::move(bounds);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& f : families_) {
    MAT_CHECK(f->name != name) << "metric " << name << " registered twice";
  }
  switch (type) {
    case MetricType::kCounter:
      family->counters =
          &prometheus::BuildCounter().Name(name).Help(family->help).Register(*prometheus_);
      break;
    case MetricType::kGauge:
      family->gauges =
          &prometheus::BuildGauge().Name(name).Help(family->help).Register(*prometheus_);
      break;
    case MetricType::kHistogram:
      family->histograms =
          &prometheus::BuildHistogram().Name(name).Help(family->help).Register(*prometheus_);
      break;
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
        family->Erase(it++);
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
  std::vector<prometheus::MetricFamily> families;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& family : families_) families.push_back(family->Collect());
  }
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace mat::metrics
