// What every Prometheus client library exposes about its process, under the standard names
// (prometheus-cpp, client_golang, client_python), read from /proc/self when Update() runs (each
// /metrics scrape), plus the build: 
//
//   name                             type     labels            what
//   process_cpu_seconds_total        counter  -                 user + system CPU time, seconds
//   process_resident_memory_bytes    gauge    -                 resident set size, bytes
//   process_virtual_memory_bytes     gauge    -                 virtual memory size, bytes
//   process_open_fds                 gauge    -                 open file descriptors, count
//   process_max_fds                  gauge    -                 RLIMIT_NOFILE's soft limit, count
//   process_start_time_seconds       gauge    -                 start time, seconds since the Unix epoch
//   mat_build_info                   gauge    version, commit   1; the project's version and the git
//                                                               commit built (12 hex digits, "-dirty"
//                                                               with uncommitted changes, "unknown"
//                                                               outside a git checkout)
//
// Thread-safety: Update may be called from any thread (the registry is thread-safe; the CPU
// counter only moves up). Not copyable.
#pragma once

#include "metrics/registry.h"

namespace mat::metrics {

class ProcessMetrics {
 public:
  // Registers the families above in `registry` (borrowed: must outlive this) and reads once.
  explicit ProcessMetrics(Registry& registry);
  ProcessMetrics(const ProcessMetrics&) = delete;
  ProcessMetrics& operator=(const ProcessMetrics&) = delete;

  // Reads /proc/self/stat, /proc/self/fd and the fd limit; a value it cannot read stays as it was.
  void Update();

 private:
  Counter cpu_seconds_;
  Gauge resident_bytes_, virtual_bytes_, open_fds_, max_fds_, start_time_, build_info_;
};

// The version and commit mat_build_info reports ("0.1.0", "1a2b3c4d5e6f").
const char* BuildVersion();
const char* BuildCommit();

}  // namespace mat::metrics
