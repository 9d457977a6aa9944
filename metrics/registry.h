// The daemons' Prometheus metrics registry (DESIGN §9) over prometheus-cpp (Debian's
// prometheus-cpp-dev 1.0.1, core library): families of counters, gauges and histograms with
// fixed label names, one series per tuple of label values, rendered in the Prometheus text
// exposition format 0.0.4 by prometheus-cpp's TextSerializer in Expose(). What this layer adds to
// prometheus-cpp: handles that take label values in the family's label order, Value/Exists
// lookups, removal of every series with a given label value, checks that crash naming the metric,
// and families listed in registration order (with HELP and TYPE even before their first series).
//
//   Registry registry;
//   Gauge step = registry.AddGauge("mat_job_step", "Latest step of the job.", {"mat_job"});
//   step.Set({"job-000001"}, 120);
//   Histogram latency = registry.AddHistogram("x_seconds", "…", {}, {0.001, 0.01, 0.1});
//   latency.Observe({}, 0.004);
//   std::string text = registry.Expose();  // served on /metrics
//
// Families are registered once (a daemon defines all of them in one file, STYLE habit 14) and
// live as long as the Registry; the handles (Counter, Gauge, Histogram) are cheap copyable
// pointers into it. A series is created by its first update; a family without label names has
// its one series from the start (value 0), so it always appears in the exposition. Series go away
// with Remove(labels) or Registry::RemoveSeriesWithLabel("mat_job", id) (every family that has a
// `job` label).
//
// Exposition (prometheus-cpp's TextSerializer): families in registration order, each with
// `# HELP` and `# TYPE`, then its series sorted by their labels; labels in name order; label
// values escape `\`, `"` and newline; HELP text escapes `\` and newline; values with 16
// significant digits, NaN as `Nan`, infinities as `+Inf` / `-Inf`. A histogram series has one
// cumulative `_bucket{le="…"}` line per bucket bound plus `le="+Inf"`, then `_sum` and `_count`.
//
// Thread-safety: every method of Registry and of the handles is thread-safe (one mutex per
// Registry, held for the series index and the update, and while collecting); the daemons update from their loop
// or rank threads and Expose() runs on the HTTP thread. Registering families is meant for start-up
// but is also safe. Not copyable.
//
// REQUIRES (checked with MAT_CHECK, a crash names the metric): metric and label names match
// [a-zA-Z_:][a-zA-Z0-9_:]* (labels without ':'; `le` is reserved for histograms); names are
// unique in a registry; an update passes exactly one value per label name; histogram bounds are
// finite and strictly increasing; Counter::Inc gets a value >= 0.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace prometheus {
class Registry;
}

namespace mat::metrics {

// Label values, in the order of the family's label names.
using LabelValues = std::vector<std::string>;

enum class MetricType { kCounter, kGauge, kHistogram };

// What a histogram series holds (bucket counts are cumulative, one per bound, then +Inf).
struct HistogramSnapshot {
  std::vector<double> bounds;            // upper bounds, increasing, without +Inf
  std::vector<uint64_t> cumulative;      // bounds.size() + 1 entries; the last = count
  double sum = 0;
  uint64_t count = 0;
};

class Registry;

namespace internal {
struct Family;
}

// A monotonically increasing value (a `_total` name by convention).
class Counter {
 public:
  Counter() = default;
  // Adds `v` (REQUIRES: v >= 0) to the series of `labels`, creating it at 0 first.
  void Inc(const LabelValues& labels, double v = 1) const;
  // Sets the series to `v` when v is larger than its value (for totals counted elsewhere, e.g. a
  // worker's cumulative FLOPs); creates it.
  void SetIfGreater(const LabelValues& labels, double v) const;
  // The series' value; 0 when it does not exist.
  double Value(const LabelValues& labels) const;
  // Drops the series (no-op when absent). The series of a family without labels stays (at 0).
  void Remove(const LabelValues& labels) const;
  bool Exists(const LabelValues& labels) const;

 private:
  friend class Registry;
  Counter(Registry* registry, internal::Family* family) : registry_(registry), family_(family) {}
  Registry* registry_ = nullptr;
  internal::Family* family_ = nullptr;
};

// A value that goes up and down.
class Gauge {
 public:
  Gauge() = default;
  void Set(const LabelValues& labels, double v) const;
  void Add(const LabelValues& labels, double v) const;
  double Value(const LabelValues& labels) const;  // 0 when absent
  void Remove(const LabelValues& labels) const;
  bool Exists(const LabelValues& labels) const;

 private:
  friend class Registry;
  Gauge(Registry* registry, internal::Family* family) : registry_(registry), family_(family) {}
  Registry* registry_ = nullptr;
  internal::Family* family_ = nullptr;
};

// Observations counted into fixed buckets.
class Histogram {
 public:
  Histogram() = default;
  // Counts `v` into every bucket whose bound is >= v (and +Inf); NaN only counts in +Inf, _sum
  // and _count.
  void Observe(const LabelValues& labels, double v) const;
  // The series' buckets (all zero when absent).
  HistogramSnapshot Get(const LabelValues& labels) const;
  void Remove(const LabelValues& labels) const;
  bool Exists(const LabelValues& labels) const;

 private:
  friend class Registry;
  Histogram(Registry* registry, internal::Family* family)
      : registry_(registry), family_(family) {}
  Registry* registry_ = nullptr;
  internal::Family* family_ = nullptr;
};

// `count` bounds start, start·factor, start·factor², … (REQUIRES: start > 0, factor > 1).
std::vector<double> ExponentialBuckets(double start, double factor, int count);

class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  Counter AddCounter(const std::string& name, const std::string& help,
                     const std::vector<std::string>& label_names);
  Gauge AddGauge(const std::string& name, const std::string& help,
                 const std::vector<std::string>& label_names);
  Histogram AddHistogram(const std::string& name, const std::string& help,
                         const std::vector<std::string>& label_names, std::vector<double> bounds);

  // Removes, in every family with a label named `label`, each series whose value of it equals
  // `value` (e.g. ("mat_job", "job-000003")). Returns how many series went away.
  int RemoveSeriesWithLabel(const std::string& label, const std::string& value);

  // Every family's name, in registration order.
  std::vector<std::string> Names() const;

  // The text exposition format 0.0.4 of every family (see the file comment).
  std::string Expose() const;

 private:
  friend class Counter;
  friend class Gauge;
  friend class Histogram;
  internal::Family* Add(const std::string& name, const std::string& help, MetricType type,
                        const std::vector<std::string>& label_names, std::vector<double> bounds);

  mutable std::mutex mu_;
  std::unique_ptr<prometheus::Registry> prometheus_;  // owns the prometheus-cpp families
  std::vector<std::unique_ptr<internal::Family>> families_;  // guarded by mu_ (the series)
};

// The Content-Type of Expose()'s text.
inline constexpr const char* kExpositionContentType = "text/plain; version=0.0.4";

}  // namespace mat::metrics
