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

namespace mat::worker {

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

// Decompresses a whole .xz stream held in memory.
absl::StatusOr<std::string> DecompressXz(const std::string& compressed, const std::string& what);

}  // namespace mat::worker
