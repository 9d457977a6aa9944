// Counts the coordinator's gRPC calls by method and status code
// (mat_coordinator_grpc_requests_total{method, code}; coordinator_metrics.h) with a server
// interceptor, so that every service (JobService, WorkerService, health, reflection) and every
// way a call ends (a handler's status, an auth refusal, a cancelled stream) is counted once, when
// its status is sent. Method: the full name without the leading '/' ("mat.v1.JobService/GetJob");
// code: the status code's name ("OK", "NOT_FOUND", …). Cardinality: the methods served × 17 codes.
//
// Thread-safety: gRPC creates one interceptor per call; the counter is thread-safe.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <memory>

#include "metrics/registry.h"

namespace mat::coordinator {

// A factory for grpc::ServerBuilder::experimental().SetInterceptorCreators. `requests` (a
// {method, code} counter) must outlive the server.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeRequestCounter(
    metrics::Counter requests);

}  // namespace mat::coordinator
