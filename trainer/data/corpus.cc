#include "trainer/data/corpus.h"

#include <lzma.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "common/file_util.h"
#include "common/status.h"

namespace mat::trainer {

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

void CapVocabulary(Corpus& corpus, int64_t max_size) {
  const int64_t n = corpus.vocab.size();
  if (n <= max_size) return;
  std::vector<int64_t> count(n, 0);
  for (int32_t id : corpus.train) ++count[id];
  const int32_t old_unk = corpus.vocab.Find("<unk>");
  std::vector<int32_t> by_count(n);
  std::iota(by_count.begin(), by_count.end(), 0);
  std::stable_sort(by_count.begin(), by_count.end(),
                   [&count](int32_t a, int32_t b) { return count[a] > count[b]; });
  std::vector<uint8_t> keep(n, 0);
  int64_t kept = 0;
  for (int32_t id : by_count) {
    if (kept + 1 >= max_size) break;  // one place is "<unk>"'s
    if (id == old_unk) continue;
    keep[id] = 1;
    ++kept;
  }
  Vocabulary capped;
  std::vector<int32_t> map(n, -1);
  for (int32_t id = 0; id < n; ++id) {
    if (keep[id]) map[id] = capped.Add(corpus.vocab.Word(id));
  }
  const int32_t unk = capped.Add("<unk>");
  for (std::vector<int32_t>* split : {&corpus.train, &corpus.valid, &corpus.test}) {
    for (int32_t& id : *split) id = map[id] >= 0 ? map[id] : unk;
  }
  corpus.vocab = std::move(capped);
}

UnigramModel::UnigramModel(const std::vector<int32_t>& fit, int64_t vocab_size)
    : log_prob_(vocab_size, 1.0) {  // add-one counts first
  for (int32_t id : fit) log_prob_[id] += 1.0;
  const double total = double(fit.size()) + double(vocab_size);
  for (double& p : log_prob_) p = std::log(p / total);
}

double UnigramModel::CrossEntropy(const std::vector<int32_t>& tokens) const {
  double sum = 0;
  for (int32_t id : tokens) sum -= log_prob_[id];
  return tokens.empty() ? 0.0 : sum / double(tokens.size());
}

absl::StatusOr<Corpus> LoadCorpus(const std::string& dir) {
  Corpus c;
  MAT_ASSIGN_OR_RETURN(std::string train, ReadSplit(dir, "train"));
  MAT_ASSIGN_OR_RETURN(std::string valid, ReadSplit(dir, "valid"));
  MAT_ASSIGN_OR_RETURN(std::string test, ReadSplit(dir, "test"));
  Tokenize(train, true, c.vocab, c.train);
  Tokenize(valid, false, c.vocab, c.valid);
  Tokenize(test, false, c.vocab, c.test);
  if (c.train.empty()) {
    return absl::InvalidArgumentError("data.dir: the train split in " + dir +
                                      " (train.txt.xz or train.txt) has no words");
  }
  return c;
}

}  // namespace mat::trainer
