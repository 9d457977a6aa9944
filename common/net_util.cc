#include "common/net_util.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace mat::common {

absl::StatusOr<int> PickFreePort(bool loopback_only) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::UnavailableError("cannot open a socket to pick a free port");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(loopback_only ? INADDR_LOOPBACK : INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  if (!ok) return absl::UnavailableError("cannot bind a socket to pick a free port");
  return int(ntohs(addr.sin_port));
}

absl::StatusOr<std::pair<std::string, int>> ParseHostPort(const std::string& address,
                                                          int min_port) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < min_port || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("address '", address,
                                                   "' is not HOST:PORT with a port in [",
                                                   min_port, ", 65535]"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("address '", address, "' has no host"));
  }
  return std::make_pair(host, port);
}

namespace {

// One non-blocking connect to any of `addresses`, waiting at most `wait` for each.
bool ConnectsOnce(const addrinfo* addresses, std::chrono::milliseconds wait) {
  for (const addrinfo* a = addresses; a != nullptr; a = a->ai_next) {
    const int fd =
        ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    bool ok = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0;
    if (!ok && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int error = 0;
      socklen_t len = sizeof(error);
      ok = ::poll(&p, 1, static_cast<int>(wait.count())) == 1 &&
           ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0;
    }
    ::close(fd);
    if (ok) return true;
  }
  return false;
}

}  // namespace

absl::Status WaitForListener(const std::string& host, int port,
                             std::chrono::steady_clock::time_point deadline,
                             const std::function<bool()>& cancelled) {
  const std::string where = absl::StrCat(host, ":", port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addresses = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &addresses);
      rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve '", host, "': ", ::gai_strerror(rc)));
  }
  absl::Status status;
  while (true) {
    if (cancelled && cancelled()) {
      status = absl::CancelledError(absl::StrCat("cancelled while waiting for ", where));
      break;
    }
    if (ConnectsOnce(addresses, std::chrono::milliseconds(200))) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      status =
          absl::DeadlineExceededError(absl::StrCat("nothing accepted a connection at ", where));
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::freeaddrinfo(addresses);
  return status;
}

}  // namespace mat::common
