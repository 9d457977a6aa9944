// Word-level corpora in the WikiText layout: DIR/{train,valid,test}.txt, or .txt.xz.
//
// Each line is split on whitespace and followed by "<eos>" (empty lines contribute "<eos>"
// only), as in the reference word-level language-model data pipeline. The vocabulary is built
// from train: "<eos>" is id 0, the other words follow in order of first appearance; a valid/test word missing from it maps to "<unk>"
// (added to the vocabulary when absent). WikiText-2: train 2,088,628 tokens, 33,278 types.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace mat::trainer {

class Vocabulary {
 public:
  int32_t Add(const std::string& word);       // id of word, inserting it if new
  int32_t Find(const std::string& word) const;  // -1 when absent
  const std::string& Word(int32_t id) const { return words_[id]; }
  int64_t size() const { return static_cast<int64_t>(words_.size()); }

 private:
  std::unordered_map<std::string, int32_t> ids_;
  std::vector<std::string> words_;
};

struct Corpus {
  Vocabulary vocab;
  std::vector<int32_t> train, valid, test;  // token ids, "<eos>" included
};

// Reads DIR/<split>.txt.xz, falling back to DIR/<split>.txt. NOT_FOUND names the missing file;
// DATA_LOSS names a corrupt or truncated .xz file.
absl::StatusOr<Corpus> LoadCorpus(const std::string& dir);

// Keeps the max_size − 1 most frequent words of train (ties: first appearance) and "<unk>": every
// other word of every split becomes "<unk>" (added when absent). Ids are renumbered in the order
// of the words' first appearance, as LoadCorpus numbers them. A no-op when the vocabulary has at
// most max_size words. REQUIRES: max_size >= 2.
void CapVocabulary(Corpus& corpus, int64_t max_size);

// A unigram model fitted on `fit` with add-one smoothing over `vocab_size` types: the loss it
// reaches is what a model that ignores the context reaches (the MLM loss of one that predicts
// word frequencies). REQUIRES: ids in [0, vocab_size).
class UnigramModel {
 public:
  UnigramModel(const std::vector<int32_t>& fit, int64_t vocab_size);
  // The cross-entropy in nats per token of `tokens` (0 when empty).
  double CrossEntropy(const std::vector<int32_t>& tokens) const;

 private:
  std::vector<double> log_prob_;  // [vocab_size]
};

// Decompresses a whole .xz stream held in memory.
absl::StatusOr<std::string> DecompressXz(const std::string& compressed, const std::string& what);

}  // namespace mat::trainer
