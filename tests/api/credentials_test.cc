#include "api/credentials.h"

#include <fstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/temp_dir.h"

namespace mat::api {
namespace {

using ::testing::HasSubstr;

constexpr const char* kCert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
constexpr const char* kKey = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
constexpr const char* kRsaKey =
    "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n";

class CredentialsTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_credentials"};
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = tmp_.path() + "/" + name;
    std::ofstream(path) << text;
    return path;
  }
};

// `--tls-ca server.key` gave gRPC's "Could not load any root certificate" and then "empty
// address list"; the worker retried it forever.
TEST_F(CredentialsTest, AKeyGivenAsTheCaIsRefusedNamingTheFlagTheFileAndWhatItHolds) {
  const std::string key = Write("server.key", kKey);
  absl::StatusOr<std::string> pem = ReadPemFile("--tls-ca", key, PemKind::kCertificate);
  ASSERT_FALSE(pem.ok());
  EXPECT_EQ(pem.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pem.status().message(), "--tls-ca: '" + key +
                                        "' holds no certificate (it holds a private key: give "
                                        "the certificate's file)");
  auto creds = MakeChannelCredentials(TlsFiles{key, "", ""});
  ASSERT_FALSE(creds.ok());
  EXPECT_EQ(creds.status().message(), pem.status().message());
}

TEST_F(CredentialsTest, EachFileMustHoldItsKind) {
  const std::string cert = Write("client.pem", kCert);
  const std::string key = Write("client.key", kKey);
  const std::string rsa = Write("rsa.key", kRsaKey);
  const std::string junk = Write("junk.txt", "not pem\n");
  EXPECT_TRUE(ReadPemFile("--tls-ca", cert, PemKind::kCertificate).ok());
  EXPECT_TRUE(ReadPemFile("--tls-key", key, PemKind::kPrivateKey).ok());
  EXPECT_TRUE(ReadPemFile("--tls-key", rsa, PemKind::kPrivateKey).ok());
  EXPECT_EQ(ReadPemFile("--tls-key", cert, PemKind::kPrivateKey).status().message(),
            "--tls-key: '" + cert +
                "' holds no private key (it holds a certificate: the key is another file)");
  EXPECT_EQ(ReadPemFile("--tls-cert", junk, PemKind::kCertificate).status().message(),
            "--tls-cert: '" + junk + "' holds no PEM data");
  absl::Status missing =
      ReadPemFile("--tls-ca", tmp_.path() + "/none.pem", PemKind::kCertificate).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound) << missing;
  EXPECT_THAT(std::string(missing.message()), HasSubstr("--tls-ca: "));

  EXPECT_TRUE(MakeChannelCredentials(TlsFiles{cert, cert, key}).ok());
  auto swapped = MakeChannelCredentials(TlsFiles{cert, key, cert});
  ASSERT_FALSE(swapped.ok());
  EXPECT_THAT(std::string(swapped.status().message()), HasSubstr("--tls-cert: '" + key + "'"));
  EXPECT_EQ(MakeChannelCredentials(TlsFiles{"", cert, key}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeChannelCredentials(TlsFiles{cert, cert, ""}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TlsMismatchHintTest, NamesWhatToCheckWhenTheCoordinatorClosedTheConnection) {
  EXPECT_EQ(TlsMismatchHint(TlsFiles{}, "Connection refused"), "");
  EXPECT_THAT(TlsMismatchHint(TlsFiles{}, "Socket closed"), HasSubstr("give --tls-ca"));
  // matctl pointed at the metrics port saw only the TLS hint (checked against a real coordinator).
  EXPECT_THAT(TlsMismatchHint(TlsFiles{}, "Socket closed"), HasSubstr("--metrics-listen"));
  EXPECT_THAT(TlsMismatchHint(TlsFiles{"ca.pem", "", ""}, "Socket closed"),
              HasSubstr("give --tls-cert and --tls-key"));
  EXPECT_THAT(TlsMismatchHint(TlsFiles{"ca.pem", "c.pem", "c.key"}, "Socket closed"),
              HasSubstr("may refuse this client certificate"));
}

}  // namespace
}  // namespace mat::api
