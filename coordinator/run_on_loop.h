// RunOnLoop: the one shape of every unary RPC of the coordinator's gRPC adapters (JobService,
// WorkerService): post the call to the coordinator loop, move its result into the reply there and
// finish the RPC with the mapped status. The handler returns at once; the RPC finishes exactly
// once, on the loop.
//
// Lifetime: gRPC keeps `context` and `reply` (and the request the call captures) alive until
// Finish; the loop must run until the server has shut down (see job_service.h).
// Thread-safety: call from a gRPC handler thread; `call` runs on the loop.
#pragma once

#include <grpcpp/grpcpp.h>

#include <utility>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "absl/status/statusor.h"
#include "api/grpc_status.h"

namespace mat::coordinator {

// `call` is a callable returning absl::StatusOr<Reply>, run once on `loop`.
template <typename Reply, typename Call>
grpc::ServerUnaryReactor* RunOnLoop(boost::asio::io_context& loop,
                                    grpc::CallbackServerContext* context, Reply* reply,
                                    Call call) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  boost::asio::post(loop, [reactor, reply, call = std::move(call)]() mutable {
    absl::StatusOr<Reply> result = call();
    if (result.ok()) *reply = std::move(*result);
    reactor->Finish(api::ToGrpcStatus(result.status()));
  });
  return reactor;
}

}  // namespace mat::coordinator
