#include "metrics/process_metrics.h"

#include <sys/resource.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "mat_build_info.h"  // generated: MAT_BUILD_VERSION, MAT_BUILD_COMMIT

namespace mat::metrics {
namespace {

// Seconds since the Unix epoch at boot (/proc/stat "btime"); 0 when unreadable.
double BootTime() {
  std::ifstream in("/proc/stat");
  std::string key;
  double value = 0;
  while (in >> key) {
    if (key == "btime") {
      in >> value;
      return value;
    }
    in.ignore(1 << 20, '\n');
  }
  return 0;
}

}  // namespace

const char* BuildVersion() { return MAT_BUILD_VERSION; }
const char* BuildCommit() { return MAT_BUILD_COMMIT; }

ProcessMetrics::ProcessMetrics(Registry& registry)
    : cpu_seconds_(registry.AddCounter("process_cpu_seconds_total",
                                       "Total user and system CPU time spent in seconds.", {})),
      resident_bytes_(registry.AddGauge("process_resident_memory_bytes",
                                        "Resident memory size in bytes.", {})),
      virtual_bytes_(registry.AddGauge("process_virtual_memory_bytes",
                                       "Virtual memory size in bytes.", {})),
      open_fds_(registry.AddGauge("process_open_fds", "Number of open file descriptors.", {})),
      max_fds_(registry.AddGauge("process_max_fds", "Maximum number of open file descriptors.",
                                 {})),
      start_time_(registry.AddGauge("process_start_time_seconds",
                                    "Start time of the process since unix epoch in seconds.", {})),
      build_info_(registry.AddGauge("mat_build_info",
                                    "1, labelled with the MAT version and git commit built.",
                                    {"version", "commit"})) {
  build_info_.Set({BuildVersion(), BuildCommit()}, 1);
  Update();
}

void ProcessMetrics::Update() {
  std::ifstream in("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // The command name (field 2) may hold spaces and parentheses: the fields after it start past
  // the last ')'. Field 3 is then index 0.
  const size_t close = stat.rfind(')');
  if (close != std::string::npos) {
    std::istringstream fields(stat.substr(close + 2));
    std::vector<std::string> f;
    for (std::string x; fields >> x;) f.push_back(x);
    const double ticks = double(::sysconf(_SC_CLK_TCK));
    const double page = double(::sysconf(_SC_PAGESIZE));
    // utime 14, stime 15, starttime 22, vsize 23, rss 24 (1-based, proc(5)) -> index - 3.
    if (f.size() > 21 && ticks > 0) {
      cpu_seconds_.SetIfGreater({}, (std::stod(f[11]) + std::stod(f[12])) / ticks);
      if (const double boot = BootTime(); boot > 0) {
        start_time_.Set({}, boot + std::stod(f[19]) / ticks);
      }
      virtual_bytes_.Set({}, std::stod(f[20]));
      resident_bytes_.Set({}, std::stod(f[21]) * page);
    }
  }
  std::error_code ec;
  int fds = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++fds;
  }
  if (!ec) open_fds_.Set({}, fds - 1);  // less the directory iterator's own descriptor
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0) max_fds_.Set({}, double(limit.rlim_cur));
}

}  // namespace mat::metrics
