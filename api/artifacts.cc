#include "api/artifacts.h"

#include <openssl/evp.h>

#include <cstdio>
#include <fstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mat::api {

absl::Status CheckArtifactName(std::string_view name) {
  auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("artifact name '", std::string(name.substr(0, 160)), "': ", std::string(why)));
  };
  if (name.empty()) return bad("empty");
  if (name.size() > 128) return bad("longer than 128 bytes");
  if (name.front() == '.') return bad("starts with '.'");
  if (name.size() >= 5 && name.substr(name.size() - 5) == ".part") return bad("ends in '.part'");
  // The store's own file (and its set-aside copies): an artifact of that name replaced the
  // manifest, and the job's download failed.
  if (name.substr(0, 13) == "MANIFEST.json") return bad("MANIFEST.json is the store's own file");
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return bad("only letters, digits, '.', '_' and '-' are allowed");
  }
  return absl::OkStatus();
}

absl::Status CheckJobArtifactName(std::string_view name) {
  for (const char* known : kJobArtifactNames) {
    if (name == known) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("artifact name '", std::string(name.substr(0, 160)),
                   "' is not one a job gives back (", absl::StrJoin(kJobArtifactNames, ", "),
                   ")"));
}

absl::Status CheckSha256Hex(std::string_view hex) {
  bool ok = hex.size() == 64;
  for (char c : hex) ok = ok && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sha256 '", std::string(hex.substr(0, 80)), "' is not 64 lowercase hex digits"));
  }
  return absl::OkStatus();
}

struct Sha256::State {
  EVP_MD_CTX* ctx = nullptr;
};

Sha256::Sha256() : state_(std::make_unique<State>()) {
  state_->ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(state_->ctx, EVP_sha256(), nullptr);
}

Sha256::~Sha256() { EVP_MD_CTX_free(state_->ctx); }

void Sha256::Add(std::string_view bytes) {
  EVP_DigestUpdate(state_->ctx, bytes.data(), bytes.size());
}

std::string Sha256::Hex() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_DigestFinal_ex(state_->ctx, digest, &size);
  std::string hex;
  hex.reserve(size * 2);
  for (unsigned int i = 0; i < size; ++i) {
    char two[3];
    std::snprintf(two, sizeof two, "%02x", digest[i]);
    hex += two;
  }
  return hex;
}

absl::StatusOr<FileDigest> DigestFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  Sha256 sha;
  FileDigest d;
  std::vector<char> buffer(1 << 16);
  while (in) {
    in.read(buffer.data(), std::streamsize(buffer.size()));
    const std::streamsize n = in.gcount();
    if (n <= 0) break;
    sha.Add(std::string_view(buffer.data(), size_t(n)));
    d.bytes += n;
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  d.sha256 = sha.Hex();
  return d;
}

}  // namespace mat::api
