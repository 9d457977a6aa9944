// matctl, the MAT service's command-line client, as a library function (the binary's main only
// calls it), so its commands run in tests against an in-process coordinator.
//
//   matctl [--coordinator HOST:PORT] [--timeout SECONDS] [--token-file FILE]
//          [--tls-ca FILE [--tls-cert FILE --tls-key FILE]] COMMAND ...
//     submit JOB.yaml [--request-id ID] [--wait [--progress|--no-progress]]   prints the job id
//     list [--state STATE]...                       table: ID STATE MODEL POLICY CREATED
//     status JOB [-o text|json]                     state, progress, losses, mask, ranks, summary
//     cancel JOB [--reason TEXT]                    prints "JOB CANCELLED"
//     watch JOB [--progress|--no-progress]          until the job finishes: on a terminal a
//                                                   progress bar redrawn in place (state changes
//                                                   and evaluations on lines of their own),
//                                                   otherwise one line per event
//     spectra JOB [-o csv|json]                     λ_max per module per probe step
//     plot JOB --out FILE.svg                       λ_max heatmap with an approximate mask
//                                                   overlay (client/plot.h); prints FILE.svg
//     workers                                       table: WORKER STATE DEVICE HOST JOB RANK
//                                                   LAST-SEEN
//     logs JOB [--rank R] [-f|--follow]              the job's log lines ("TIME [rank R] level:
//                                                   text"); --follow until the job ends
//     compare RUN... [--baseline RUN] [--budgets 0.25,0.5,0.75,1] [-o text|json] [--svg FILE]
//                                                   finished jobs (or run directories) side by
//                                                   side: client/compare.h
//
// A job spec is checked before it is sent (ParseJobSpecYaml + ValidateJobSpec: INVALID_ARGUMENT
// naming the key), and again by the coordinator.
//
// Exit codes: 0 success (`watch` and `submit --wait`: the job finished; `--wait` exits 1 unless
// it SUCCEEDED); 1 an error, printed on `err` as "matctl: CODE: message" (the gRPC status code
// name, e.g. "matctl: NOT_FOUND: job 'job-000009' not found"; `plot` of a job without λ:
// "matctl: UNAUTHENTICATED: missing bearer token" without --token-file against a coordinator
// that requires one, "matctl: PERMISSION_DENIED: unknown token" with a wrong one;
// "matctl: FAILED_PRECONDITION: job-000003 has no λ reports yet"; `workers` against a
// coordinator without ListWorkers: UNIMPLEMENTED); 2 bad command-line usage.
//
// Thread-safety: each call is independent (no global state besides gRPC's).
#pragma once

#include <ostream>

namespace mat::client {

// What matctl knows about the device behind `out`: whether `watch` draws its progress bar by
// default (`--progress`/`--no-progress` override it) and how wide the bar may be.
struct OutputTerminal {
  bool is_terminal = false;  // `out` is an interactive terminal
  int columns = 80;          // its width, characters
};

// The process's stdout: isatty(STDOUT_FILENO) and its TIOCGWINSZ width (80 when unknown).
OutputTerminal DetectStdoutTerminal();

// Runs matctl with argv[1..argc) (argv[0] is the program name), printing results on `out` and
// errors on `err`; `terminal` describes `out` (the default: not a terminal). Returns the exit
// code.
int RunMatctl(int argc, const char* const* argv, std::ostream& out, std::ostream& err,
              const OutputTerminal& terminal = {});

}  // namespace mat::client
