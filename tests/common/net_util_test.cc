// common/net_util: ParseHostPort's accepted and refused forms; WaitForListener against a real
// listening socket on loopback, nobody listening (deadline), and a cancel.
#include "common/net_util.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace mat::common {
namespace {

using Clock = std::chrono::steady_clock;

TEST(ParseHostPortTest, SplitsHostAndPort) {
  auto hp = ParseHostPort("[::1]:80");
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_EQ(hp->first, "::1");
  EXPECT_EQ(hp->second, 80);
  hp = ParseHostPort("localhost:0");
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_EQ(hp->second, 0);
}

TEST(ParseHostPortTest, RefusesWhatIsNotHostPortNamingIt) {
  for (const char* bad : {"nohost", ":80", "h:70000", "h:", "h:x", "", "127.0.0.1:99999"}) {
    auto hp = ParseHostPort(bad);
    ASSERT_FALSE(hp.ok()) << bad;
    EXPECT_EQ(hp.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(hp.status().message().find(std::string("'") + bad + "'"), std::string::npos)
        << hp.status();
  }
  // An address to connect to needs a port: 0 only for a server that picks one.
  auto zero = ParseHostPort("127.0.0.1:0", /*min_port=*/1);
  ASSERT_FALSE(zero.ok());
  EXPECT_NE(zero.status().message().find("[1, 65535]"), std::string::npos) << zero.status();
}

// A listening socket on 127.0.0.1 with a kernel-chosen port (connects complete in the backlog).
class Listener {
 public:
  Listener() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(fd_, 4), 0);
    EXPECT_EQ(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port_ = ntohs(addr.sin_port);
  }
  ~Listener() { ::close(fd_); }
  int port() const { return port_; }

 private:
  int fd_ = -1, port_ = 0;
};

TEST(WaitForListenerTest, ReturnsOnceSomethingListens) {
  Listener listener;
  const absl::Status s =
      WaitForListener("127.0.0.1", listener.port(), Clock::now() + std::chrono::seconds(5), {});
  EXPECT_TRUE(s.ok()) << s;
}

TEST(WaitForListenerTest, GivesUpAtTheDeadlineNamingTheAddress) {
  absl::StatusOr<int> port = PickFreePort();  // nobody listens there
  ASSERT_TRUE(port.ok()) << port.status();
  const auto t0 = Clock::now();
  const absl::Status s = WaitForListener("127.0.0.1", *port, t0 + std::chrono::milliseconds(300), {});
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_NE(s.message().find("127.0.0.1:" + std::to_string(*port)), std::string::npos) << s;
  EXPECT_GE(Clock::now() - t0, std::chrono::milliseconds(300));
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
}

TEST(WaitForListenerTest, StopsWhenCancelledLongBeforeTheDeadline) {
  absl::StatusOr<int> port = PickFreePort();
  ASSERT_TRUE(port.ok()) << port.status();
  const auto t0 = Clock::now();
  const absl::Status s =
      WaitForListener("127.0.0.1", *port, t0 + std::chrono::seconds(120),
                      [&] { return Clock::now() - t0 > std::chrono::milliseconds(200); });
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
}

}  // namespace
}  // namespace mat::common
