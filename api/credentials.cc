#include "api/credentials.h"

#include <grpcpp/security/credentials.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/file_util.h"

namespace mat::api {

absl::StatusOr<std::string> ReadPemFile(const std::string& flag, const std::string& path,
                                        PemKind kind) {
  absl::StatusOr<std::string> text = common::ReadFile(path);
  if (!text.ok()) {
    return absl::Status(text.status().code(), absl::StrCat(flag, ": ", text.status().message()));
  }
  if (text->find("-----BEGIN") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": '", path, "' holds no PEM data"));
  }
  // "PRIVATE KEY-----" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY".
  constexpr const char* kCertificate = "-----BEGIN CERTIFICATE-----";
  constexpr const char* kKey = "PRIVATE KEY-----";
  const bool want_key = kind == PemKind::kPrivateKey;
  if (text->find(want_key ? kKey : kCertificate) == std::string::npos) {
    const bool holds_other = text->find(want_key ? kCertificate : kKey) != std::string::npos;
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": '", path, "' holds no ", want_key ? "private key" : "certificate",
        !holds_other ? ""
        : want_key   ? " (it holds a certificate: the key is another file)"
                     : " (it holds a private key: give the certificate's file)"));
  }
  return text;
}

absl::StatusOr<std::string> ReadFirstToken(const std::string& path) {
  absl::StatusOr<std::string> text = common::ReadFile(path);
  if (!text.ok()) return text.status();
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (!line.empty() && line.front() != '#') return std::string(line);
  }
  return absl::InvalidArgumentError(absl::StrCat("'", path, "' holds no token"));
}

std::string TlsMismatchHint(const TlsFiles& files, std::string_view error) {
  if (error.find("Socket closed") == std::string_view::npos) return "";
  if (files.ca_file.empty()) {
    // An HTTP/1 server (the coordinator's own --metrics-listen port) closes the same way.
    return " (the coordinator closed the connection: if it serves TLS, give --tls-ca; or the "
           "address is not its gRPC --listen port: its --metrics-listen port closes so too)";
  }
  if (files.cert_file.empty()) {
    return " (the coordinator closed the connection: if it requires client certificates, "
           "give --tls-cert and --tls-key)";
  }
  return " (the coordinator closed the connection: it may refuse this client certificate, "
         "expired or of another CA)";
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files) {
  if (files.cert_file.empty() != files.key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (files.ca_file.empty()) {
    if (!files.cert_file.empty()) {
      return absl::InvalidArgumentError("--tls-cert needs --tls-ca");
    }
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions options;
  absl::StatusOr<std::string> ca = ReadPemFile("--tls-ca", files.ca_file, PemKind::kCertificate);
  if (!ca.ok()) return ca.status();
  options.pem_root_certs = std::move(*ca);
  if (!files.cert_file.empty()) {
    absl::StatusOr<std::string> cert = ReadPemFile("--tls-cert", files.cert_file, PemKind::kCertificate);
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadPemFile("--tls-key", files.key_file, PemKind::kPrivateKey);
    if (!key.ok()) return key.status();
    options.pem_cert_chain = std::move(*cert);
    options.pem_private_key = std::move(*key);
  }
  return grpc::SslCredentials(options);
}

}  // namespace mat::api
