// What matctl prints: tables, JSON, CSV and one-line event descriptions, from mat.v1 messages.
// Pure functions (no I/O, no network), so the output formats are unit-tested.
//
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mat/v1/job.pb.h"
#include "mat/v1/service.pb.h"
#include "nlohmann/json.hpp"

namespace mat::client {

// "2024-11-27T03:28:03Z" (UTC); "-" for 0 (unset).
std::string FormatUnixTime(int64_t unix_seconds);

// "bert L2 d128 H4" (kind, layers, d_model, heads; "ffn4" appended when model.ffn_groups > 0).
std::string DescribeModel(const v1::JobSpec& spec);

// The policy kind with its main parameter: "mat a=0.3", "mat a=0.3 b=0.05", "full",
// "rand f=0.5", "multirate k=4".
std::string DescribePolicy(const v1::JobSpec& spec);

// `list`: a header and one aligned row per job: ID, STATE, MODEL, POLICY, CREATED. Ends with a
// newline; only the header for no jobs.
std::string FormatJobTable(const std::vector<v1::Job>& jobs);

// The spec's set fields as nested JSON with the YAML key names ({"model": {"layers": 2, …}});
// integers as JSON integers, NaN and infinities as strings ("nan", "inf", "-inf").
nlohmann::json JobSpecToJson(const v1::JobSpec& spec);

// `status -o json`: job_id, client_request_id, state ("QUEUED"), step, error_message,
// created/updated (unix seconds and ISO-8601), spec, summary (the parsed summary.json once
// finished, else null) and ranks [{rank, worker_id, step, mask_version, param_checksum}].
nlohmann::json JobToJson(const v1::GetJobReply& reply);

// `status`: the same as "key: value" lines.
std::string FormatJobText(const v1::GetJobReply& reply);

// `watch`: one line (no newline) per event: time, job, step and what happened, e.g.
// "2024-11-27T03:28:03Z job-000001 step 0 state CANCELLED (by request)".
std::string FormatJobEvent(const v1::JobEvent& event);

// `spectra -o csv`: header "step,<module names>" (m0, m1, … when the modules are not known),
// then one row per probe step; doubles in shortest round-trip form.
std::string SpectraToCsv(const v1::GetSpectraReply& spectra);

// `spectra -o json`: {"job_id", "modules": [{name, group, layer, index}], "points":
// [{"step", "lambda_max": [...]}]}.
nlohmann::json SpectraToJson(const std::string& job_id, const v1::GetSpectraReply& spectra);

}  // namespace mat::client
