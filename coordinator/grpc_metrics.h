// Counts the coordinator's gRPC calls by method and status code
// (mat_coordinator_grpc_requests_total{method, code}; coordinator_metrics.h) with a server
// interceptor, so that every service (JobService, WorkerService, health, reflection) and every
// way a call ends (a handler's status, an auth refusal, a cancelled stream) is counted once, when
// its status is sent. Method: the full name without the leading '/' ("mat.v1.JobService/GetJob")
// when it is one of the methods served, else "unknown" (a caller's made-up path); code: the status
// code's name ("OK", "NOT_FOUND", …). Cardinality: (the methods served + 1) × 17 codes.
//
// Thread-safety: gRPC creates one interceptor per call; the counter is thread-safe.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "metrics/registry.h"

namespace mat::coordinator {

// The methods ("package.Service/Method") of the named services, from the protobuf descriptors
// linked into this binary (a name it does not know adds nothing), plus the gRPC health service's
// two (served without a protobuf descriptor).
std::set<std::string> ServedMethods(const std::vector<std::string>& services);

// A factory for grpc::ServerBuilder::experimental().SetInterceptorCreators. `requests` (a
// {method, code} counter) must outlive the server; `methods` (ServedMethods) are the labels it
// uses, any other path counts as "unknown".
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeRequestCounter(
    metrics::Counter requests, std::set<std::string> methods);

}  // namespace mat::coordinator
