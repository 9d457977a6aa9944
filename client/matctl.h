// matctl, the MAT service's command-line client, as a library function (the binary's main only
// calls it), so its commands run in tests against an in-process coordinator.
//
//   matctl [--coordinator HOST:PORT] [--timeout SECONDS] COMMAND ...
//     submit JOB.yaml [--request-id ID] [--wait]   prints the job id
//     list [--state STATE]...                       table: ID STATE MODEL POLICY CREATED
//     status JOB [-o text|json]
//     cancel JOB [--reason TEXT]                    prints "JOB CANCELLED"
//     watch JOB                                     one line per event until the job finishes
//     spectra JOB [-o csv|json]                     λ_max per module per probe step
//
// A job spec is checked before it is sent (ParseJobSpecYaml + ValidateJobSpec: INVALID_ARGUMENT
// naming the key), and again by the coordinator.
//
// Exit codes: 0 success (`watch` and `submit --wait`: the job finished; `--wait` exits 1 unless
// it SUCCEEDED); 1 an error, printed on `err` as "matctl: CODE: message" (the gRPC status code
// name, e.g. "matctl: NOT_FOUND: job 'job-000009' not found"); 2 bad command-line usage.
//
// Thread-safety: each call is independent (no global state besides gRPC's).
#pragma once

#include <ostream>

namespace mat::client {

// Runs matctl with argv[1..argc) (argv[0] is the program name), printing results on `out` and
// errors on `err`. Returns the exit code.
int RunMatctl(int argc, const char* const* argv, std::ostream& out, std::ostream& err);

}  // namespace mat::client
