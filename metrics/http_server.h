// A small HTTP/1.1 server (Boost.Beast) for the daemons' metrics listeners (mat-coordinator's
// `/healthz`, `/readyz` and `/metrics`; mat-worker's `/metrics`; DESIGN §9). It answers GET and
// HEAD with whatever the handler returns, one request per connection (`Connection: close`), other
// methods with 405. MetricsResponse() is the `/metrics` answer for a Registry.
//
// It runs its own io_context on one thread of its own (never a daemon's loop), so a slow client
// cannot delay the daemon; a connection that does not deliver its request within
// `request_timeout_seconds` is closed.
//
// Thread-safety: Start/Stop/address from one owner thread. The handler is called on the server's
// thread and must be thread-safe with respect to the rest of the process.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "metrics/registry.h"

namespace mat::metrics {

struct HttpResponse {
  int status = 200;                         // HTTP status code
  std::string content_type = "text/plain";  // Content-Type header
  std::string body;
};

// 200 with `registry.Expose()` as `text/plain; version=0.0.4` (kExpositionContentType).
// Thread-safe (the registry's mutex).
HttpResponse MetricsResponse(const Registry& registry);

// "HOST:PORT" for display and address files (IPv6 hosts in brackets).
std::string JoinHostPort(const std::string& host, int port);

// Maps a request's path (its target without the query: "/metrics" for "/metrics?x=1") to a
// response.
using HttpHandler = std::function<HttpResponse(const std::string& target)>;

class HttpServer {
 public:
  // Binds `address` ("HOST:PORT"; port 0 picks a free one) and starts serving on a new thread.
  // INVALID_ARGUMENT for a malformed address; UNAVAILABLE when it cannot be resolved or bound.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& address,
                                                           HttpHandler handler,
                                                           double request_timeout_seconds = 5);
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;
  ~HttpServer();  // Stop()

  // The bound address, "HOST:PORT" with the real port.
  const std::string& address() const { return address_; }

  // Stops accepting, drops open connections, joins the thread. Idempotent.
  void Stop();

 private:
  struct Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
  std::string address_;
  std::thread thread_;
};

}  // namespace mat::metrics
