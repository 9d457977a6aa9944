// The one mapping between absl::Status (every library boundary) and grpc::Status (the wire),
// used by the coordinator's gRPC adapters and by matctl.
//
// Both directions keep the code (the two enums share their numbering: OK = 0 … UNAUTHENTICATED =
// 16) and the message; a code outside that range becomes UNKNOWN. Error details and payloads are
// not carried.
//
// Thread-safety: pure functions; safe from any thread.
#pragma once

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace mat::api {

// absl -> grpc (a server finishing an RPC).
grpc::Status ToGrpcStatus(const absl::Status& status);

// grpc -> absl (a client reading an RPC's outcome).
absl::Status FromGrpcStatus(const grpc::Status& status);

// "NOT_FOUND: job 'job-000009' not found" ("OK" for an OK status): what matctl prints.
std::string StatusLine(const absl::Status& status);

}  // namespace mat::api
