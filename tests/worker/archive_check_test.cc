// Tests of worker/archive_check.h without LibTorch: archives as fakes (a map of records), pickles
// assembled opcode by opcode as LibTorch's pickler writes them, then broken one way at a time.
// Each broken form is one LibTorch 1.13 mishandles (a crash, an 18 GB allocation, a read past a
// storage) or that the writer never emits; each must be DATA_LOSS naming what is wrong.
#include "worker/archive_check.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mat::worker {
namespace {

using ::testing::HasSubstr;

// Assembles a protocol-2 pickle.
class Pickle {
 public:
  Pickle() { bytes_ = "\x80\x02"; }
  Pickle& Op(char op) { bytes_.push_back(op); return *this; }
  Pickle& Global(const std::string& module, const std::string& name) {
    bytes_ += "c" + module + "\n" + name + "\n";
    return *this;
  }
  Pickle& Put(uint32_t id) {
    if (id < 256) {
      bytes_ += 'q';
      bytes_.push_back(char(id));
    } else {
      bytes_ += 'r';
      Le(id, 4);
    }
    return *this;
  }
  Pickle& Get(uint32_t id) { bytes_ += 'h'; bytes_.push_back(char(id)); return *this; }
  Pickle& Str(const std::string& s) {
    bytes_ += 'X';
    Le(s.size(), 4);
    bytes_ += s;
    return *this;
  }
  Pickle& Int(int32_t v) {
    if (v >= 0 && v < 256) {
      bytes_ += 'K';
      bytes_.push_back(char(v));
    } else {
      bytes_ += 'J';
      Le(uint32_t(v), 4);
    }
    return *this;
  }
  Pickle& Mark() { return Op('('); }
  Pickle& Tuple() { return Op('t'); }
  Pickle& Stop() { return Op('.'); }
  // A tensor as _rebuild_tensor_v2 of storage `key` (FloatStorage of `numel`) with `sizes`,
  // contiguous strides, offset `offset`.
  Pickle& Tensor(const std::string& key, int numel, std::vector<int> sizes, int offset = 0) {
    Global("torch._utils", "_rebuild_tensor_v2").Mark().Mark();
    Str("storage").Global("torch", "FloatStorage").Str(key).Str("cpu").Int(numel).Tuple().Op('Q');
    Int(offset).Mark();
    for (int s : sizes) Int(s);
    Tuple().Mark();
    int stride = 1;
    std::vector<int> strides(sizes.size());
    for (size_t d = sizes.size(); d-- > 0;) {
      strides[d] = stride;
      stride *= sizes[d];
    }
    for (int s : strides) Int(s);
    Tuple().Op('\x89').Global("collections", "OrderedDict").Op(')').Op('R').Tuple().Op('R');
    return *this;
  }
  const std::string& bytes() const { return bytes_; }

 private:
  void Le(uint64_t v, int n) {
    for (int k = 0; k < n; ++k) bytes_.push_back(char((v >> (8 * k)) & 0xff));
  }
  std::string bytes_;
};

// data.pkl of a Module with tensor "w" (2 x 3 floats in data/0) and int "step", as written.
Pickle ModuleStart() {
  Pickle p;
  p.Global("__torch__", "Module").Put(0).Op(')').Op('\x81').Op('}').Mark();
  return p;
}
std::string GoodData() {
  Pickle p = ModuleStart();
  p.Str("w").Tensor("0", 6, {2, 3}).Str("step").Int(7).Op('u').Op('b').Stop();
  return p.bytes();
}

constexpr char kSource[] =
    "class Module(Module):\n"
    "  __parameters__ = [\"w\", ]\n"
    "  __buffers__ = []\n"
    "  w : Tensor\n"
    "  step : int\n";

class ArchiveCheckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    records_["data.pkl"] = GoodData();
    records_["code/__torch__.py"] = kSource;
    records_["constants.pkl"] = Pickle().Op(')').Stop().bytes();
    records_["data/0"] = std::string(24, '\0');
    records_["version"] = "3\n";
  }
  absl::Status Check() {
    ArchiveRecords a;
    for (const auto& kv : records_) a.names.push_back(kv.first);
    a.read = [this](const std::string& name) -> absl::StatusOr<std::string> {
      auto it = records_.find(name);
      if (it == records_.end()) return absl::NotFoundError(name);
      return it->second;
    };
    a.size = [this](const std::string& name) -> absl::StatusOr<uint64_t> {
      auto it = records_.find(name);
      if (it == records_.end()) return absl::NotFoundError(name);
      return it->second.size();
    };
    return CheckArchiveRecords(a);
  }
  void ExpectDataLoss(const std::string& what) {
    const absl::Status st = Check();
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr(what));
  }
  std::map<std::string, std::string> records_;
};

TEST_F(ArchiveCheckTest, AcceptsWhatTheWriterWrites) {
  EXPECT_TRUE(Check().ok()) << Check();
  // PyTorch 2's extra records are left alone.
  records_["byteorder"] = "little";
  records_[".data/serialization_id"] = "1234";
  EXPECT_TRUE(Check().ok()) << Check();
}

TEST(ArchiveClassSourceTest, ParsesTheWritersForms) {
  auto attrs = ParseArchiveClassSource(
      "class Module(Module):\n"
      "  __parameters__ = [\"model.a.weight\", \"w\", ]\n"
      "  __buffers__ = [\"buffer.bn.running_mean\", ]\n"
      "  __annotations__ = []\n"
      "  __annotations__[\"model.a.weight\"] = Tensor\n"
      "  w : Tensor\n"
      "  __annotations__[\"buffer.bn.running_mean\"] = Tensor\n"
      "  meta : str\n"
      "  lr : float\n"
      "  on : bool\n");
  ASSERT_TRUE(attrs.ok()) << attrs.status();
  ASSERT_EQ(attrs->size(), 6u);
  EXPECT_EQ((*attrs)[0].name, "model.a.weight");
  EXPECT_TRUE((*attrs)[0].parameter);
  EXPECT_TRUE((*attrs)[2].buffer);
  EXPECT_EQ((*attrs)[3].type, "str");
  EXPECT_FALSE((*attrs)[3].parameter || (*attrs)[3].buffer);
  auto empty = ParseArchiveClassSource("class Module(Module):\n  __parameters__ = []\n  __buffers__ = []\n");
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->empty());
}

TEST(ArchiveClassSourceTest, RefusesWhatTheWriterNeverWrites) {
  const std::string head = "class Module(Module):\n  __parameters__ = []\n  __buffers__ = []\n";
  const std::pair<std::string, std::string> cases[] = {
      // LibTorch 1.13 SEGVs in parseTypeFromExpr / parseClassConstant on these two kinds.
      {head + "  w : Tensor[\n", "line 4: type is not"},
      {head + "  x : Final[int] = 3\n", "line 4: type is not"},
      {head + "  x = 3\n", "line 4: expected `NAME : TYPE`"},
      {head + "  w : Tensr\n", "line 4: type is not"},
      {head + "  w : Tensor", "does not end with a newline"},
      {head + "\tw : Tensor\n", "line 4: expected an indented attribute"},
      {head + "  w-x : Tensor\n", "line 4: not an identifier"},
      {head + "  __parameters__ : Tensor\n", "do not start with `__`"},
      {head + "  w : Tensor\n  w : int\n", "line 5: attribute declared twice"},
      {head + "  w : Tensor\n  __annotations__ = []\n", "only once, before the attributes"},
      {head + "  __annotations__[\"a\"b\"] = Tensor\n", "line 4: not an attribute name"},
      {head + "  def forward(self):\n", "line 4: expected `NAME : TYPE`"},
      {"class Evil(Module):\n  __parameters__ = []\n  __buffers__ = []\n", "line 1: expected `class Module"},
      {"class Module(Module):\n  __parameters__ = [\"w\"]\n  __buffers__ = []\n", "line 2: expected `, `"},
      {"class Module(Module):\n  __parameters__ = [\"w\", ]\n  __buffers__ = []\n", "\"w\" is not a Tensor"},
      {"class Module(Module):\n  __parameters__ = [\"w\", ]\n  __buffers__ = [\"w\", ]\n  w : Tensor\n",
       "listed twice"},
      {"class Module(Module):\n  __parameters__ = []\n", "class body ends early"},
  };
  for (const auto& [source, what] : cases) {
    auto attrs = ParseArchiveClassSource(source);
    EXPECT_EQ(attrs.status().code(), absl::StatusCode::kDataLoss) << source;
    EXPECT_THAT(std::string(attrs.status().message()), HasSubstr(what)) << source;
  }
}

TEST_F(ArchiveCheckTest, RefusesAMemoIdThatSkipsIds) {
  // The fuzzer's out-of-memory input: LibTorch resizes its memo to the id (here ~1.2e9 entries).
  Pickle p;
  p.Global("__torch__", "Module").Put(0x45000000u).Op(')').Op('\x81').Op('}').Op('b').Stop();
  records_["data.pkl"] = p.bytes();
  ExpectDataLoss("data.pkl byte 20: memo id 1157627904 skips ids (the memo holds 0)");
}

TEST_F(ArchiveCheckTest, RefusesAMemoGetOfAnIdNeverStored) {
  Pickle p = ModuleStart();
  p.Str("w").Get(9);
  records_["data.pkl"] = p.Stop().bytes();
  ExpectDataLoss("memo id 9 was never stored (the memo holds 1)");
}

TEST_F(ArchiveCheckTest, RefusesAStringLongerThanTheRecord) {
  std::string data = GoodData();
  const size_t at = data.find("X\x01\x00\x00\x00w", 0, 6);
  ASSERT_NE(at, std::string::npos);
  data[at + 4] = '\x7f';  // length 0x7f000001
  records_["data.pkl"] = data;
  ExpectDataLoss("needs 2130706433 more bytes");
}

TEST_F(ArchiveCheckTest, RefusesAStorageRecordShorterThanItsTensor) {
  records_["data/0"] = std::string(20, '\0');
  ExpectDataLoss("storage record data/0 holds 20 bytes, the pickle says 6 x 4");
  records_.erase("data/0");
  ExpectDataLoss("storage record data/0 is missing");
}

TEST_F(ArchiveCheckTest, RefusesATensorReachingPastItsStorage) {
  Pickle p = ModuleStart();
  p.Str("w").Tensor("0", 6, {2, 4}).Str("step").Int(7).Op('u').Op('b').Stop();
  records_["data.pkl"] = p.bytes();
  ExpectDataLoss("tensor reaches element 7 of a storage of 6");
  Pickle q = ModuleStart();
  q.Str("w").Tensor("0", 6, {2, 3}, /*offset=*/1).Str("step").Int(7).Op('u').Op('b').Stop();
  records_["data.pkl"] = q.bytes();
  ExpectDataLoss("tensor reaches element 6 of a storage of 6");
  Pickle e = ModuleStart();  // an empty view at the storage's end is fine
  e.Str("w").Tensor("0", 6, {0, 3}, /*offset=*/6).Str("step").Int(7).Op('u').Op('b').Stop();
  records_["data.pkl"] = e.bytes();
  EXPECT_TRUE(Check().ok()) << Check();
}

TEST_F(ArchiveCheckTest, RefusesOpcodesAndGlobalsTheWriterNeverUses) {
  Pickle p = ModuleStart();
  p.Str("w").Op('\x8c');  // SHORT_BINUNICODE (protocol 4)
  records_["data.pkl"] = p.Stop().bytes();
  ExpectDataLoss("opcode 0x8c is not one the writer uses");
  Pickle g;
  g.Global("os", "system").Str("true").Op('\x85').Op('R').Stop();
  records_["data.pkl"] = g.bytes();
  ExpectDataLoss("GLOBAL os.system is not one the writer uses");
  Pickle r;
  r.Global("torch", "FloatStorage").Op(')').Op('R').Stop();
  records_["data.pkl"] = r.bytes();
  ExpectDataLoss("REDUCE of torch.FloatStorage");
}

TEST_F(ArchiveCheckTest, RefusesDeepNestingAndSelfReference) {
  Pickle p;
  p.Op(')');
  for (int i = 0; i < 100; ++i) p.Op('\x85');  // ((((),),),)...
  records_["data.pkl"] = p.Stop().bytes();
  ExpectDataLoss("values nest deeper than 64");
  Pickle s;
  s.Op(']').Put(0).Get(0).Op('a').Stop();  // L.append(L)
  records_["data.pkl"] = s.bytes();
  ExpectDataLoss("already in use");
}

TEST_F(ArchiveCheckTest, RefusesAStructureThatIsNotTheModule) {
  Pickle p;
  p.Str("w").Stop();
  records_["data.pkl"] = p.bytes();
  ExpectDataLoss("data.pkl: the value is not a built __torch__.Module object");
  Pickle t;
  t.Str("w").Str("x").Stop();
  records_["data.pkl"] = t.bytes();
  ExpectDataLoss("STOP with 2 values");
  records_["data.pkl"] = GoodData() + "junk";
  ExpectDataLoss("4 bytes after STOP");
  records_["data.pkl"] = GoodData().substr(0, GoodData().size() - 1);
  ExpectDataLoss("ends without STOP");
  records_["data.pkl"] = "PK\x03\x04";
  ExpectDataLoss("data.pkl: not a pickle");
}

TEST_F(ArchiveCheckTest, RefusesAttributesThatDoNotMatchTheClass) {
  Pickle p = ModuleStart();
  p.Str("w").Tensor("0", 6, {2, 3}).Str("step").Str("seven").Op('u').Op('b').Stop();
  records_["data.pkl"] = p.bytes();
  ExpectDataLoss("attribute \"step\" is a str, the class says int");
  Pickle m = ModuleStart();
  m.Str("w").Tensor("0", 6, {2, 3}).Op('u').Op('b').Stop();
  records_["data.pkl"] = m.bytes();
  ExpectDataLoss("attribute \"step\" is missing");
  Pickle x = ModuleStart();
  x.Str("w").Tensor("0", 6, {2, 3}).Str("step").Int(7).Str("more").Int(1).Op('u').Op('b').Stop();
  records_["data.pkl"] = x.bytes();
  ExpectDataLoss("attribute \"more\" is not declared");
  Pickle d = ModuleStart();
  d.Str("w").Tensor("0", 6, {2, 3}).Str("w").Int(7).Op('u').Op('b').Stop();
  records_["data.pkl"] = d.bytes();
  ExpectDataLoss("dict key \"w\" twice");
}

TEST_F(ArchiveCheckTest, RefusesRecordsTheWriterNeverMakes) {
  records_["code/__torch__/evil.py"] = "class Evil(Module):\n";
  ExpectDataLoss("record code/__torch__/evil.py is not one the writer makes");
  records_.erase("code/__torch__/evil.py");
  records_["extra.pkl"] = Pickle().Op('N').Stop().bytes();
  ExpectDataLoss("record extra.pkl is not one");
  records_.erase("extra.pkl");
  records_["version"] = "three";
  ExpectDataLoss("record version is not a number");
  records_["version"] = "3\n";
  records_.erase("code/__torch__.py");
  ExpectDataLoss("record code/__torch__.py is missing");
}

TEST_F(ArchiveCheckTest, ChecksConstantsAndTheSourceRangeTable) {
  Pickle c;
  c.Mark().Tensor("0", 6, {6}).Tuple().Stop();
  records_["constants.pkl"] = c.bytes();
  ExpectDataLoss("storage record constants/0 is missing");
  records_["constants/0"] = std::string(24, '\0');
  EXPECT_TRUE(Check().ok()) << Check();
  records_["constants.pkl"] = Pickle().Mark().Int(1).Tuple().Stop().bytes();
  ExpectDataLoss("constants.pkl: a constant is not a tensor");
  records_["constants.pkl"] = Pickle().Op(')').Stop().bytes();

  // What the writer emits for the class above: one range in a one-string table.
  const auto debug = [](int text_index, int end) {
    Pickle p;
    p.Str("FORMAT_WITH_STRING_TABLE").Str("").Op('\x85').Int(0);
    p.Global("torch.jit._pickle", "build_intlist").Mark().Op(']').Mark().Int(text_index).Op('e').Tuple().Op('R');
    p.Int(0).Int(0).Op('\x87').Int(0).Int(end).Op('\x87').Int(0).Op('\x87').Op('\x85').Op('\x87').Stop();
    return p.bytes();
  };
  records_["code/__torch__.py.debug_pkl"] = debug(0, 0);
  EXPECT_TRUE(Check().ok()) << Check();
  records_["code/__torch__.py.debug_pkl"] = debug(5, 0);
  ExpectDataLoss("text index 5 outside the table");
  records_["code/__torch__.py.debug_pkl"] = debug(0, 3);
  ExpectDataLoss("a range is outside its source text");
  Pickle t;
  t.Mark().Str("storage").Global("torch", "FloatStorage").Str("0").Str("cpu").Int(6).Tuple().Op('Q').Stop();
  records_["code/__torch__.py.debug_pkl"] = t.bytes();
  ExpectDataLoss("in a record that holds no tensors");
}

// A zip as miniz writes it: local headers and data, the central directory, the end record.
struct ZipEntry {
  std::string name, data;
  uint16_t method = 0;
  uint32_t packed = 0, unpacked = 0;  // 0: data.size()
};

void Put(std::string& s, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string Zip(const std::vector<ZipEntry>& entries) {
  std::string zip, dir;
  for (const ZipEntry& e : entries) {
    const uint32_t packed = e.packed ? e.packed : uint32_t(e.data.size());
    const uint32_t unpacked = e.unpacked ? e.unpacked : uint32_t(e.data.size());
    const uint64_t local = zip.size();
    Put(zip, 0x04034b50, 4);
    Put(zip, 20, 2), Put(zip, 0, 2), Put(zip, e.method, 2), Put(zip, 0, 4), Put(zip, 0, 4);
    Put(zip, packed, 4), Put(zip, unpacked, 4), Put(zip, e.name.size(), 2), Put(zip, 0, 2);
    zip += e.name + e.data;
    Put(dir, 0x02014b50, 4);
    Put(dir, 20, 2), Put(dir, 20, 2), Put(dir, 0, 2), Put(dir, e.method, 2), Put(dir, 0, 4);
    Put(dir, 0, 4), Put(dir, packed, 4), Put(dir, unpacked, 4), Put(dir, e.name.size(), 2);
    Put(dir, 0, 2), Put(dir, 0, 2), Put(dir, 0, 2), Put(dir, 0, 2), Put(dir, 0, 4);
    Put(dir, local, 4);
    dir += e.name;
  }
  const uint64_t dir_at = zip.size();
  zip += dir;
  Put(zip, 0x06054b50, 4);
  Put(zip, 0, 2), Put(zip, 0, 2), Put(zip, entries.size(), 2), Put(zip, entries.size(), 2);
  Put(zip, dir.size(), 4), Put(zip, dir_at, 4), Put(zip, 0, 2);
  return zip;
}

void ExpectZipLoss(const std::string& zip, const std::string& what) {
  absl::Status st = CheckZipDirectory(zip).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr(what));
}

TEST(ZipDirectoryTest, AcceptsWhatTheWriterStores) {
  EXPECT_TRUE(CheckZipDirectory(Zip({})).ok());
  const auto sizes = CheckZipDirectory(
      Zip({{"archive/data.pkl", "\x80\x02"}, {"archive/data/0", std::string(8, '\0')},
           {"archive/code/__torch__.py", "xx", 8, 2, 40}}));  // deflated code
  ASSERT_TRUE(sizes.ok()) << sizes.status();
  EXPECT_EQ(*sizes, (std::map<std::string, uint64_t>{
                        {"data.pkl", 2}, {"data/0", 8}, {"code/__torch__.py", 40}}));
}

TEST(ZipDirectoryTest, RefusesWhatWouldMakeLibTorchAllocateOrReadPastTheEnd) {
  ExpectZipLoss("", "only 0 bytes");
  ExpectZipLoss(std::string(40, 'x'), "no end-of-directory record");
  // fuzz/corpus/checkpoint/regress-zip64-short.payload: a zip64 locator in a 50-byte archive.
  ExpectZipLoss(std::string("\x07\0\0PK\x06\x07\0\0\0\0\xa4\x05\0\0\0\0\0\0\x01\0\0\0"
                            "PK\x05\x06\0\0\0\0\x06\0\x06\0\x92\x01\0\0\x12\x04\0\0\0\0", 50),
                "zip64 end record lies outside");
  ExpectZipLoss(Zip({{"archive/data/0", "abcd", 8, 4, 0xfffffff0u}}),
                "archive/data/0 is compressed (method 8)");
  ExpectZipLoss(Zip({{"archive/code/__torch__.py", "abcd", 8, 4, 0xfffffff0u}}),
                "archive/code/__torch__.py says 4 compressed bytes hold 4294967280 bytes");
  ExpectZipLoss(Zip({{"archive/data/0", "abcd", 0, 4, 5}}), "4 bytes stored and 5 bytes of data");
  ExpectZipLoss(Zip({{"archive/data/0", "abcd", 0, 4000, 4000}}), "past the end of the archive");
  ExpectZipLoss(Zip({{"archive/data/0", "ab"}, {"archive/data/0", "cd"}}),
                "two entries are named archive/data/0");
  ExpectZipLoss(Zip({{"archive/data/0", "ab"}, {"other/data/1", "cd"}}),
                "entry other/data/1 is not a record in the folder archive/");
  ExpectZipLoss(Zip({{"data.pkl", "ab"}}), "entry data.pkl is not in a folder");
  std::string lying = Zip({{"archive/data/0", "ab"}});
  lying[lying.size() - 12] = 9;  // 9 entries in a 60-byte directory
  ExpectZipLoss(lying, "9 entries cannot fit");
  std::string moved = Zip({{"archive/data/0", "ab"}});
  moved[moved.size() - 6] = 1;  // the directory said to start at byte 1
  ExpectZipLoss(moved, "is not a directory entry");
}

}  // namespace
}  // namespace mat::worker
