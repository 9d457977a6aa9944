// What matctl prints: tables, JSON, CSV, one-line event descriptions and `watch`'s progress bar,
// from mat.v1 messages. Pure functions (no I/O, no network, no clock: the current time is a
// parameter), so the output formats are unit-tested. (The `plot` SVG is in client/plot.h.)
//
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mat/v1/job.pb.h"
#include "mat/v1/service.pb.h"
#include "nlohmann/json.hpp"

namespace mat::client {

// "2024-11-27T03:28:03Z" (UTC); "-" for 0 (unset).
std::string FormatUnixTime(int64_t unix_seconds);

// One log line as `matctl logs` prints it: "2024-11-27T03:28:03.123Z [rank 0] info: text".
std::string FormatLogLine(const v1::LogLine& line);

// A duration, compact and rounded: "0s", "45s", "4m" (from 60 s, to the nearest minute),
// "2h05m" (from 1 h), "3d04h" (from 1 day), ">9999d" beyond (infinity included). Negative or NaN
// durations are "0s".
std::string FormatDuration(double seconds);

// "bert L2 d128 H4" (kind, layers, d_model, heads; "ffn4" appended when model.ffn_groups > 0);
// for vgg e.g. "vgg16 w0.5 g8 h256 cifar10+aug" (arch, width, filter groups, classifier hidden
// features when > 0, data kind, "+aug" with augmentation).
std::string DescribeModel(const v1::JobSpec& spec);

// The policy kind with its main parameter: "mat a=0.3", "mat a=0.3 b=0.05", "full",
// "rand f=0.5", "rand (replays job-000002)" (policy.rand_schedule_job; also frozen-random and
// inverse), "multirate k=4".
std::string DescribePolicy(const v1::JobSpec& spec);

// `list`: a header and one aligned row per job: ID, STATE, MODEL, POLICY, WORKERS (the gang
// asked for: "2 cpu", "1 cuda"), STEP ("1200/6000", "-" before the first), CREATED, ARTIFACTS
// (their size on the coordinator, "-" for none). Ends with a newline; only the header for no jobs.
std::string FormatJobTable(const std::vector<v1::Job>& jobs);

// A size in decimal units with 3 significant digits: "512 B", "17.2 MB", "1.5 GB".
std::string FormatBytes(int64_t bytes);

// The spec's set fields as nested JSON with the YAML key names ({"model": {"layers": 2, …}});
// integers as JSON integers, NaN and infinities as strings ("nan", "inf", "-inf").
nlohmann::json JobSpecToJson(const v1::JobSpec& spec);

// `status -o json`: job_id, client_request_id, state ("QUEUED"), error_message, waiting (a
// QUEUED or RESTARTING job's wait for workers, else ""), step,
// total_steps (spec.train.steps), train_loss, val_loss and test_loss (null until set),
// active_modules, total_modules, mask_version, flops_total, wall_seconds, attempt,
// created/updated (unix seconds and ISO-8601), spec, summary (the parsed summary.json once
// finished, its text when it does not parse, else null) and ranks [{rank, worker_id, step,
// mask_version, param_checksum}]. Non-finite doubles are the strings "nan", "inf", "-inf".
nlohmann::json JobToJson(const v1::GetJobReply& reply);

// `status`: the same as "key: value" lines ("-" for values not reported yet).
std::string FormatJobText(const v1::GetJobReply& reply);

// "IDLE", "BUSY", "DISCONNECTED", "DRAINING" (the enum name without WORKER_STATE_);
// "UNSPECIFIED" otherwise.
std::string WorkerStateName(v1::WorkerState state);

// `workers`: a header and one aligned row per worker: WORKER, STATE, DEVICE, HOST, JOB, RANK,
// LAST-SEEN. STATE is "DISCONNECTED(drained)" for a disconnected worker with a drain waiting for
// it. JOB and RANK are "-" unless the worker runs a rank (BUSY, DRAINING); LAST-SEEN is
// the age of its last message at `now_unix_seconds` ("12s ago", "3m ago"; "-" when never seen).
// Ends with a newline; only the header for no workers.
std::string FormatWorkerTable(const std::vector<v1::WorkerInfo>& workers,
                              int64_t now_unix_seconds);

// `watch`: one line (no newline) per event: time, job, step and what happened, e.g.
// "2024-11-27T03:28:03Z job-000001 step 0 state CANCELLED (by request)".
std::string FormatJobEvent(const v1::JobEvent& event);

// What `watch --progress` knows about a job: the GetJob reply it started from, updated by every
// event (ApplyJobEvent).
struct WatchState {
  v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
  int64_t step = 0;                  // latest step, steps
  int64_t total_steps = 0;           // spec.train.steps; 0 = unknown (no bar fill, no %, no ETA)
  std::optional<double> train_loss;  // latest training loss, nats per masked token
  std::optional<double> val_loss;    // latest validation loss, nats per masked token
  int64_t active_modules = 0;        // modules on under the latest mask, count
  int64_t total_modules = 0;         // modules of the job, count; 0 = not declared yet
  int64_t mask_version = 0;          // latest mask version, 0 = none
  double steps_per_second = 0;       // recent throughput, steps per second; 0 = unknown
};

// The state of a job as GetJob reports it (steps_per_second: step / wall_seconds, the average so
// far; train_loss unset while it is 0 and there is no validation loss, i.e. before the first
// Progress).
WatchState WatchStateFromJob(const v1::GetJobReply& reply);

// Folds `event` into `state`. Returns true when the event deserves a line of its own above the
// bar (a state change or an evaluation); progress and mask events only update the bar.
bool ApplyJobEvent(const v1::JobEvent& event, WatchState* state);

// `watch` on a terminal: one line, no newline, at most max(width - 1, 40) characters (so it
// never wraps and `\r` redraws it in place), e.g.
//   "[#####.....] step 120/1000 12% loss 6.123 val 6.05 active 40/48 mask v7 3.2 step/s ETA 4m"
// The bar is 10 to 30 cells wide, as the width allows; when even 10 cells do not fit, parts are
// left out, the least useful first: mask, step/s, active, val, ETA, loss. Unknown parts are
// left out too (no loss before the first progress, no ETA without a rate); a job that is not
// RUNNING ends with its state ("... QUEUED", "... SUCCEEDED") instead of the rate and ETA.
std::string FormatProgressBar(const WatchState& state, int width);

// `spectra -o csv`: header "step,<module names>" (m0, m1, … when the modules are not known),
// then one row per probe step; doubles in shortest round-trip form.
std::string SpectraToCsv(const v1::GetSpectraReply& spectra);

// `spectra -o json`: {"job_id", "modules": [{name, group, layer, index}], "points":
// [{"step", "lambda_max": [...]}]}.
nlohmann::json SpectraToJson(const std::string& job_id, const v1::GetSpectraReply& spectra);

}  // namespace mat::client
