#include "worker/corpus.h"

#include <lzma.h>

#include <cctype>
#include <filesystem>

#include "common/file_util.h"
#include "common/status.h"

namespace mat::worker {

int32_t Vocabulary::Add(const std::string& word) {
  auto it = ids_.find(word);
  if (it != ids_.end()) return it->second;
  int32_t id = static_cast<int32_t>(words_.size());
  ids_.emplace(word, id);
  words_.push_back(word);
  return id;
}

int32_t Vocabulary::Find(const std::string& word) const {
  auto it = ids_.find(word);
  return it == ids_.end() ? -1 : it->second;
}

absl::StatusOr<std::string> DecompressXz(const std::string& compressed, const std::string& what) {
  lzma_stream strm = LZMA_STREAM_INIT;
  if (lzma_stream_decoder(&strm, UINT64_MAX, LZMA_CONCATENATED) != LZMA_OK) {
    return absl::InternalError("cannot initialise the xz decoder");
  }
  std::string out;
  std::vector<uint8_t> buf(1 << 20);
  strm.next_in = reinterpret_cast<const uint8_t*>(compressed.data());
  strm.avail_in = compressed.size();
  lzma_ret ret = LZMA_OK;
  while (true) {
    strm.next_out = buf.data();
    strm.avail_out = buf.size();
    ret = lzma_code(&strm, LZMA_FINISH);
    out.append(reinterpret_cast<const char*>(buf.data()), buf.size() - strm.avail_out);
    if (ret != LZMA_OK) break;
  }
  lzma_end(&strm);
  if (ret != LZMA_STREAM_END) {
    return absl::DataLossError(what + " is not a complete xz stream (truncated or corrupt, lzma code " +
                               std::to_string(int(ret)) + ")");
  }
  return out;
}

namespace {

absl::StatusOr<std::string> ReadSplit(const std::string& dir, const std::string& split) {
  namespace fs = std::filesystem;
  fs::path xz = fs::path(dir) / (split + ".txt.xz");
  fs::path txt = fs::path(dir) / (split + ".txt");
  if (fs::exists(xz)) {
    MAT_ASSIGN_OR_RETURN(std::string raw, common::ReadFile(xz.string()));
    return DecompressXz(raw, xz.string());
  }
  if (fs::exists(txt)) return common::ReadFile(txt.string());
  return absl::NotFoundError("data.dir: neither " + xz.string() + " nor " + txt.string() + " exists");
}

// Appends the ids of `text`'s words, one "<eos>" per line. build: add unknown words to vocab.
void Tokenize(const std::string& text, bool build, Vocabulary& vocab, std::vector<int32_t>& ids) {
  const int32_t eos = vocab.Add("<eos>");
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    size_t eol = text.find('\n', i);
    if (eol == std::string::npos) eol = n;
    size_t j = i;
    while (j < eol) {
      while (j < eol && std::isspace(static_cast<unsigned char>(text[j]))) ++j;
      size_t k = j;
      while (k < eol && !std::isspace(static_cast<unsigned char>(text[k]))) ++k;
      if (k > j) {
        std::string w = text.substr(j, k - j);
        int32_t id = build ? vocab.Add(w) : vocab.Find(w);
        if (id < 0) id = vocab.Add("<unk>");
        ids.push_back(id);
      }
      j = k;
    }
    ids.push_back(eos);
    i = eol + 1;
  }
}

}  // namespace

absl::StatusOr<Corpus> LoadCorpus(const std::string& dir) {
  Corpus c;
  MAT_ASSIGN_OR_RETURN(std::string train, ReadSplit(dir, "train"));
  MAT_ASSIGN_OR_RETURN(std::string valid, ReadSplit(dir, "valid"));
  MAT_ASSIGN_OR_RETURN(std::string test, ReadSplit(dir, "test"));
  Tokenize(train, true, c.vocab, c.train);
  Tokenize(valid, false, c.vocab, c.valid);
  Tokenize(test, false, c.vocab, c.test);
  if (c.train.empty()) return absl::InvalidArgumentError("data.dir: " + dir + "/train is empty");
  return c;
}

}  // namespace mat::worker
