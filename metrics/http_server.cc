#include "metrics/http_server.h"

#include <chrono>
#include <memory>
#include <utility>

#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/net_util.h"

namespace mat::metrics {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

}  // namespace

HttpResponse MetricsResponse(const Registry& registry) {
  return HttpResponse{200, kExpositionContentType, registry.Expose()};
}

std::string JoinHostPort(const std::string& host, int port) {
  return host.find(':') != std::string::npos ? absl::StrCat("[", host, "]:", port)
                                             : absl::StrCat(host, ":", port);
}

struct HttpServer::Impl {
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  HttpHandler handler;
  std::chrono::milliseconds timeout{5000};

  void Accept();
};

namespace {

// One connection: read one request, write the handler's response, close.
class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(tcp::socket socket, const HttpHandler& handler, std::chrono::milliseconds timeout)
      : stream_(std::move(socket)), handler_(handler), timeout_(timeout) {}

  void Run() {
    stream_.expires_after(timeout_);
    http::async_read(stream_, buffer_, request_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->OnRead(ec);
                     });
  }

 private:
  void OnRead(beast::error_code ec) {
    if (ec) return Close();
    const bool get = request_.method() == http::verb::get;
    const bool head = request_.method() == http::verb::head;
    HttpResponse out;
    if (get || head) {
      // The path alone: a scrape config's `params:` adds a query ("/metrics?x=1"), which made
      // every route answer 404.
      const std::string target(request_.target());
      out = handler_(target.substr(0, target.find('?')));
    } else {
      out = HttpResponse{405, "text/plain", "method not allowed\n"};
    }
    response_.version(request_.version());
    response_.result(static_cast<unsigned>(out.status));
    response_.set(http::field::content_type, out.content_type);
    response_.set(http::field::server, "mat");
    response_.keep_alive(false);
    response_.body() = head ? std::string() : std::move(out.body);
    response_.prepare_payload();
    if (head) response_.content_length(out.body.size());
    stream_.expires_after(timeout_);
    http::async_write(stream_, response_,
                      [self = shared_from_this()](beast::error_code, size_t) { self->Close(); });
  }

  void Close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.socket().close(ignored);
  }

  beast::tcp_stream stream_;
  const HttpHandler& handler_;  // owned by HttpServer::Impl, which outlives every session
  std::chrono::milliseconds timeout_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> request_;
  http::response<http::string_body> response_;
};

}  // namespace

void HttpServer::Impl::Accept() {
  acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
    if (!acceptor.is_open()) return;  // stopping
    if (!ec) std::make_shared<HttpSession>(std::move(socket), handler, timeout)->Run();
    Accept();
  });
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& address,
                                                              HttpHandler handler,
                                                              double request_timeout_seconds) {
  auto host_port = common::ParseHostPort(address);
  if (!host_port.ok()) return host_port.status();
  const auto& [host, port] = *host_port;

  auto impl = std::make_unique<Impl>();
  impl->handler = std::move(handler);
  impl->timeout = std::chrono::milliseconds(static_cast<int64_t>(request_timeout_seconds * 1000));
  beast::error_code ec;
  tcp::resolver resolver(impl->io);
  auto endpoints = resolver.resolve(host, std::to_string(port), tcp::resolver::passive, ec);
  if (ec || endpoints.empty()) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve metrics address '", address, "': ", ec.message()));
  }
  const tcp::endpoint endpoint = endpoints.begin()->endpoint();
  tcp::acceptor& acceptor = impl->acceptor;
  if (acceptor.open(endpoint.protocol(), ec) ||
      acceptor.set_option(asio::socket_base::reuse_address(true), ec) ||
      acceptor.bind(endpoint, ec) || acceptor.listen(asio::socket_base::max_listen_connections, ec)) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on metrics address '", address, "': ", ec.message()));
  }
  const int bound_port = acceptor.local_endpoint(ec).port();
  const std::string shown_host =
      host.find(':') != std::string::npos ? absl::StrCat("[", host, "]") : host;

  std::unique_ptr<HttpServer> server(new HttpServer(std::move(impl)));
  server->address_ = absl::StrCat(shown_host, ":", bound_port);
  server->impl_->Accept();
  server->thread_ = std::thread([io = &server->impl_->io] { io->run(); });
  return server;
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Stop() {
  if (!thread_.joinable()) return;
  impl_->io.stop();  // pending handlers (accept, sessions) are dropped with the io_context
  thread_.join();
  beast::error_code ignored;
  impl_->acceptor.close(ignored);
}

}  // namespace mat::metrics
