// Tests of mat::trainer::LoadCorpus, DecompressXz and Vocabulary.
//
// Real data: the WikiText-2 files in MAT_SHARED_DIR/data/wikitext-2. The known figures were
// checked independently with Python (lzma, line by line, len(line.split()) + 1 tokens a line):
//   train 2,088,628 tokens, valid 217,646, test 245,569; 33,278 types, valid/test add none;
//   "<unk>" occurs 54,625 / 11,718 / 15,218 times.
// Generated data: tiny corpora in a temporary directory, plain and compressed with `xz`.
#include "trainer/data/corpus.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "tests/testing/temp_dir.h"

namespace mat::trainer {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kWikiText2 = std::string(MAT_SHARED_DIR) + "/data/wikitext-2";

void WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::string ReadBytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool HaveXz() { return std::system("xz --version > /dev/null 2>&1") == 0; }

// Compresses `path` into `path`.xz with the xz command, removing `path`.
void XzCompress(const fs::path& path) {
  const std::string cmd = "xz -9 -f '" + path.string() + "'";
  int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << cmd;
  ASSERT_TRUE(fs::exists(path.string() + ".xz"));
}

// Reference tokenizer: the words of `text` (split on ASCII whitespace) with "<eos>" after
// every line, as the header describes.
std::vector<std::string> ReferenceWords(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string w;
    while (words >> w) out.push_back(w);
    out.push_back("<eos>");
  }
  return out;
}

std::vector<std::string> Words(const Vocabulary& vocab, const std::vector<int32_t>& ids) {
  std::vector<std::string> out;
  for (int32_t id : ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, vocab.size());
    if (id < 0 || id >= vocab.size()) return out;
    out.push_back(vocab.Word(id));
  }
  return out;
}

int64_t CountId(const std::vector<int32_t>& ids, int32_t id) {
  return std::count(ids.begin(), ids.end(), id);
}

// ---------------------------------------------------------------------------------------------
// The real WikiText-2.

class WikiText2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto c = LoadCorpus(kWikiText2);
    if (c.ok()) {
      corpus_ = new Corpus(std::move(*c));
    } else {
      load_error_ = new std::string(c.status().ToString());
    }
  }
  static void TearDownTestSuite() {
    delete corpus_;
    corpus_ = nullptr;
    delete load_error_;
    load_error_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(corpus_, nullptr) << "LoadCorpus(" << kWikiText2 << "): "
                                << (load_error_ ? *load_error_ : "");
  }
  static Corpus* corpus_;
  static std::string* load_error_;
};
Corpus* WikiText2Test::corpus_ = nullptr;
std::string* WikiText2Test::load_error_ = nullptr;

TEST_F(WikiText2Test, TrainHasKnownTokenCount) {
  EXPECT_EQ(corpus_->train.size(), 2088628u);
}

TEST_F(WikiText2Test, VocabularyHasKnownTypeCount) {
  EXPECT_EQ(corpus_->vocab.size(), 33278);
  // Every type is used by train (valid/test add none, see below).
  std::vector<uint8_t> seen(corpus_->vocab.size(), 0);
  for (int32_t id : corpus_->train) seen[id] = 1;
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), 33278);
}

TEST_F(WikiText2Test, ValidAndTestHaveKnownTokenCountsAndAddNoTypes) {
  EXPECT_EQ(corpus_->valid.size(), 217646u);
  EXPECT_EQ(corpus_->test.size(), 245569u);
  for (int32_t id : corpus_->valid) ASSERT_TRUE(id >= 0 && id < 33278) << id;
  for (int32_t id : corpus_->test) ASSERT_TRUE(id >= 0 && id < 33278) << id;
  EXPECT_EQ(corpus_->vocab.size(), 33278);
}

TEST_F(WikiText2Test, UnkAndEosCountsMatchTheFiles) {
  const int32_t unk = corpus_->vocab.Find("<unk>");
  const int32_t eos = corpus_->vocab.Find("<eos>");
  ASSERT_GE(unk, 0);
  ASSERT_GE(eos, 0);
  EXPECT_EQ(CountId(corpus_->train, unk), 54625);
  EXPECT_EQ(CountId(corpus_->valid, unk), 11718);
  EXPECT_EQ(CountId(corpus_->test, unk), 15218);
  // One "<eos>" per line: 36,718 / 3,760 / 4,358 lines (SOURCE.md, checked with Python).
  EXPECT_EQ(CountId(corpus_->train, eos), 36718);
  EXPECT_EQ(CountId(corpus_->valid, eos), 3760);
  EXPECT_EQ(CountId(corpus_->test, eos), 4358);
}

TEST_F(WikiText2Test, StartsWithTheKnownFirstLines) {
  // train: " \n" then " = Valkyria Chronicles III = \n"; valid: " \n", " = Homarus gammarus = \n".
  const Vocabulary& v = corpus_->vocab;
  ASSERT_GE(corpus_->train.size(), 8u);
  std::vector<std::string> head = Words(v, {corpus_->train.begin(), corpus_->train.begin() + 8});
  EXPECT_EQ(head, (std::vector<std::string>{"<eos>", "=", "Valkyria", "Chronicles", "III", "=",
                                            "<eos>", "<eos>"}));
  std::vector<std::string> vhead = Words(v, {corpus_->valid.begin(), corpus_->valid.begin() + 6});
  EXPECT_EQ(vhead, (std::vector<std::string>{"<eos>", "=", "Homarus", "gammarus", "=", "<eos>"}));
}

// ---------------------------------------------------------------------------------------------
// Generated corpora.

class CorpusTest : public ::testing::Test {
 protected:
  tests::TempDir tmp_{"mat_corpus_test"};  // outlives the members below

  void SetUp() override {
    ASSERT_TRUE(tmp_.ok()) << "cannot create a temporary directory";
    dir_ = tmp_.path();
  }
  void WriteSplits(const std::string& train, const std::string& valid, const std::string& test) {
    WriteText(dir_ / "train.txt", train);
    WriteText(dir_ / "valid.txt", valid);
    WriteText(dir_ / "test.txt", test);
  }

  fs::path dir_;
  // Leading/trailing/double spaces, tabs, a blank line, CRLF, and no newline at the very end.
  const std::string train_ = "\n the cat  sat \n\non\tthe mat\r\nthe dog ran";
  const std::string valid_ = " the zebra sat \n";
  const std::string test_ = "dog\ncat <eos> mat\n";
};

TEST_F(CorpusTest, TokenizesPlainTextWithEosPerLine) {
  WriteSplits(train_, valid_, test_);
  auto c = LoadCorpus(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(Words(c->vocab, c->train), ReferenceWords(train_));
  EXPECT_EQ(Words(c->vocab, c->train),
            (std::vector<std::string>{"<eos>", "the", "cat", "sat", "<eos>", "<eos>", "on", "the",
                                      "mat", "<eos>", "the", "dog", "ran", "<eos>"}));
  // The train file starts with a blank line, so first appearance puts "<eos>" at 0.
  EXPECT_EQ(c->train, (std::vector<int32_t>{0, 1, 2, 3, 0, 0, 4, 1, 5, 0, 1, 6, 7, 0}));
  EXPECT_EQ(c->test, (std::vector<int32_t>{6, 0, 2, 0, 5, 0}));
}

TEST_F(CorpusTest, AssignsIdsInOrderOfFirstAppearance) {
  const std::string train = "b a c a\nd b e\n";
  WriteSplits(train, "a\n", "e\n");
  auto c = LoadCorpus(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab.size(), 6);  // b a c d e <eos>
  EXPECT_EQ(Words(c->vocab, c->train), ReferenceWords(train));
  // Words (other than "<eos>") get increasing ids as they first appear.
  int32_t last = -1;
  for (const char* w : {"b", "a", "c", "d", "e"}) {
    int32_t id = c->vocab.Find(w);
    EXPECT_GT(id, last) << w;
    last = id;
  }
  for (int32_t id = 0; id < c->vocab.size(); ++id) EXPECT_EQ(c->vocab.Find(c->vocab.Word(id)), id);
}

TEST_F(CorpusTest, UnknownValidAndTestWordsMapToUnk) {
  WriteSplits(train_, valid_, test_);
  auto c = LoadCorpus(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  // train has 8 types including "<eos>"; "<unk>" is added for valid's "zebra". test's literal
  // "<eos>" is a known word.
  const int32_t unk = c->vocab.Find("<unk>");
  ASSERT_GE(unk, 0);
  EXPECT_EQ(c->vocab.size(), 9);
  EXPECT_EQ(c->vocab.Find("zebra"), -1);
  EXPECT_EQ(Words(c->vocab, c->valid),
            (std::vector<std::string>{"the", "<unk>", "sat", "<eos>"}));
}

TEST_F(CorpusTest, UnkAlreadyInTrainDoesNotGrowTheVocabulary) {
  WriteSplits("a <unk> b\n", "a zebra\n", "yak b\n");
  auto c = LoadCorpus(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab.size(), 4);  // <eos> a <unk> b
  const int32_t unk = c->vocab.Find("<unk>");
  EXPECT_EQ(c->valid, (std::vector<int32_t>{c->vocab.Find("a"), unk, c->vocab.Find("<eos>")}));
  EXPECT_EQ(c->test, (std::vector<int32_t>{unk, c->vocab.Find("b"), c->vocab.Find("<eos>")}));
}

TEST_F(CorpusTest, XzFilesGiveTheSameIdsAsPlainText) {
  ASSERT_TRUE(HaveXz()) << "the xz command is missing (scripts/setup installs xz-utils)";
  WriteSplits(train_, valid_, test_);
  auto plain = LoadCorpus(dir_.string());
  ASSERT_TRUE(plain.ok()) << plain.status();
  for (const char* s : {"train.txt", "valid.txt", "test.txt"}) XzCompress(dir_ / s);
  ASSERT_FALSE(fs::exists(dir_ / "train.txt"));
  auto xz = LoadCorpus(dir_.string());
  ASSERT_TRUE(xz.ok()) << xz.status();
  EXPECT_EQ(xz->train, plain->train);
  EXPECT_EQ(xz->valid, plain->valid);
  EXPECT_EQ(xz->test, plain->test);
  EXPECT_EQ(xz->vocab.size(), plain->vocab.size());
}

TEST_F(CorpusTest, PrefersXzOverPlainText) {
  ASSERT_TRUE(HaveXz()) << "the xz command is missing (scripts/setup installs xz-utils)";
  WriteSplits("from xz\n", "xz\n", "xz\n");
  XzCompress(dir_ / "train.txt");
  WriteText(dir_ / "train.txt", "from plain text\n");
  auto c = LoadCorpus(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(Words(c->vocab, c->train), (std::vector<std::string>{"from", "xz", "<eos>"}));
}

TEST_F(CorpusTest, MissingSplitIsNotFoundNamingTheFile) {
  WriteText(dir_ / "train.txt", "a b\n");
  WriteText(dir_ / "valid.txt", "a b\n");
  auto c = LoadCorpus(dir_.string());
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound) << c.status();
  EXPECT_THAT(c.status().message(), HasSubstr((dir_ / "test.txt").string()));

  auto none = LoadCorpus((dir_ / "no_such_dir").string());
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound) << none.status();
  EXPECT_THAT(none.status().message(), HasSubstr("no_such_dir/train.txt"));
}

TEST_F(CorpusTest, EmptyTrainIsAnError) {
  WriteSplits("", "a\n", "a\n");
  auto c = LoadCorpus(dir_.string());
  EXPECT_FALSE(c.ok());
}

// A truncated or corrupt .xz split: DATA_LOSS naming the file, at several cut points.
class TruncatedXzTest : public CorpusTest, public ::testing::WithParamInterface<int> {};

TEST_P(TruncatedXzTest, IsDataLossNamingTheFile) {
  ASSERT_TRUE(HaveXz()) << "the xz command is missing (scripts/setup installs xz-utils)";
  std::string text;
  for (int i = 0; i < 2000; ++i) text += " word" + std::to_string(i % 97) + " x" + std::to_string(i) + "\n";
  WriteSplits("a b\n", text, "a b\n");
  XzCompress(dir_ / "valid.txt");
  const fs::path xz = dir_ / "valid.txt.xz";
  const std::string full = ReadBytes(xz);
  ASSERT_GT(full.size(), 64u);
  // Param: bytes kept; negative means "all but -param bytes"; 1000 means "flip a middle byte".
  std::string cut;
  const int p = GetParam();
  if (p == 1000) {
    cut = full;
    cut[cut.size() / 2] ^= 0x55;
  } else {
    cut = full.substr(0, p >= 0 ? size_t(p) : full.size() - size_t(-p));
  }
  WriteText(xz, cut);
  auto c = LoadCorpus(dir_.string());
  ASSERT_FALSE(c.ok()) << "kept " << cut.size() << " of " << full.size() << " bytes";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss) << c.status();
  EXPECT_THAT(c.status().message(), HasSubstr(xz.string()));
}

INSTANTIATE_TEST_SUITE_P(CutPoints, TruncatedXzTest,
                         ::testing::Values(0, 6, 12, 40, -40, -13, -1, 1000));

TEST_F(CorpusTest, DecompressXzRoundTripsAndConcatenatesStreams) {
  ASSERT_TRUE(HaveXz()) << "the xz command is missing (scripts/setup installs xz-utils)";
  WriteText(dir_ / "a", "first stream\n");
  WriteText(dir_ / "b", std::string(100000, 'z') + "\n");
  XzCompress(dir_ / "a");
  XzCompress(dir_ / "b");
  const std::string a = ReadBytes(dir_ / "a.xz"), b = ReadBytes(dir_ / "b.xz");
  auto one = DecompressXz(a, "a.xz");
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(*one, "first stream\n");
  auto both = DecompressXz(a + b, "a+b");
  ASSERT_TRUE(both.ok()) << both.status();
  EXPECT_EQ(*both, "first stream\n" + std::string(100000, 'z') + "\n");

  auto bad = DecompressXz("not xz at all", "junk.xz");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(bad.status().message(), HasSubstr("junk.xz"));
}

TEST(VocabularyTest, AddIsIdempotentAndFindReportsAbsence) {
  Vocabulary v;
  EXPECT_EQ(v.size(), 0);
  EXPECT_EQ(v.Find("x"), -1);
  EXPECT_EQ(v.Add("x"), 0);
  EXPECT_EQ(v.Add("y"), 1);
  EXPECT_EQ(v.Add("x"), 0);
  EXPECT_EQ(v.size(), 2);
  EXPECT_EQ(v.Find("y"), 1);
  EXPECT_EQ(v.Word(1), "y");
}

// CapVocabulary keeps the max_size − 1 most frequent training words (ties: first appearance) and
// "<unk>", renumbers in order of first appearance, and maps every other word of every split to
// "<unk>"; UnigramModel is the add-one closed form.
TEST(CapVocabularyTest, KeepsTheMostFrequentWordsAndMapsTheRestToUnk) {
  Corpus c;
  for (const char* w : {"<eos>", "a", "b", "c", "d"}) c.vocab.Add(w);
  // counts in train: <eos> 3, a 1, b 3, c 2, d 1
  c.train = {1, 0, 2, 2, 3, 0, 2, 3, 4, 0};
  c.valid = {4, 1, 2};
  c.test = {3, 4};
  CapVocabulary(c, 4);  // <eos>, b, c and <unk>
  ASSERT_EQ(c.vocab.size(), 4);
  EXPECT_EQ(c.vocab.Word(0), "<eos>");
  EXPECT_EQ(c.vocab.Word(1), "b");
  EXPECT_EQ(c.vocab.Word(2), "c");
  EXPECT_EQ(c.vocab.Word(3), "<unk>");
  EXPECT_EQ(c.train, (std::vector<int32_t>{3, 0, 1, 1, 2, 0, 1, 2, 3, 0}));
  EXPECT_EQ(c.valid, (std::vector<int32_t>{3, 3, 1}));
  EXPECT_EQ(c.test, (std::vector<int32_t>{2, 3}));
  Corpus same = c;
  CapVocabulary(same, 4);  // already within the cap: unchanged
  EXPECT_EQ(same.train, c.train);
  EXPECT_EQ(same.vocab.size(), 4);
}

TEST(CapVocabularyTest, UnigramModelIsTheAddOneClosedForm) {
  // fit: ids 0,0,0,1 over 3 types -> p = (3+1)/7, (1+1)/7, (0+1)/7.
  const double ce = UnigramModel({0, 0, 0, 1}, 3).CrossEntropy({0, 1, 2});
  EXPECT_NEAR(ce, -(std::log(4.0 / 7) + std::log(2.0 / 7) + std::log(1.0 / 7)) / 3, 1e-12);
}

TEST_F(WikiText2Test, CappedVocabularyOfWikiText2) {
  Corpus c = *corpus_;
  CapVocabulary(c, 8192);
  EXPECT_EQ(c.vocab.size(), 8192);
  EXPECT_EQ(c.train.size(), corpus_->train.size());
  const int32_t unk = c.vocab.Find("<unk>");
  ASSERT_GE(unk, 0);
  for (const auto* split : {&c.train, &c.valid, &c.test}) {
    for (int32_t id : *split) ASSERT_LT(id, 8192);
  }
  // A unigram model is a worse predictor with all 33,278 words than with the cap's <unk> class.
  EXPECT_LT(UnigramModel(c.train, c.vocab.size()).CrossEntropy(c.test),
            UnigramModel(corpus_->train, corpus_->vocab.size()).CrossEntropy(corpus_->test));
}

}  // namespace
}  // namespace mat::trainer
