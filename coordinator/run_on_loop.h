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

// The shape of an RPC whose work is file I/O (the artifacts): `check` (a callable returning
// absl::Status: may the caller do this?) runs on `loop`; when it passes, `call` (returning
// absl::StatusOr<Reply>) runs on `io`, off the loop, which finishes the RPC there.
template <typename Reply, typename Executor, typename Check, typename Call>
grpc::ServerUnaryReactor* CheckOnLoopThenRun(boost::asio::io_context& loop, Executor io,
                                             grpc::CallbackServerContext* context, Reply* reply,
                                             Check check, Call call) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  boost::asio::post(loop, [reactor, reply, io, check = std::move(check),
                           call = std::move(call)]() mutable {
    if (absl::Status allowed = check(); !allowed.ok()) {
      reactor->Finish(api::ToGrpcStatus(allowed));
      return;
    }
    boost::asio::post(io, [reactor, reply, call = std::move(call)]() mutable {
      absl::StatusOr<Reply> result = call();
      if (result.ok()) *reply = std::move(*result);
      reactor->Finish(api::ToGrpcStatus(result.status()));
    });
  });
  return reactor;
}

}  // namespace mat::coordinator
