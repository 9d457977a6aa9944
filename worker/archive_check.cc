#include "worker/archive_check.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status.h"

namespace mat::worker {
namespace {

constexpr int kMaxDepth = 64;
constexpr size_t kMaxDims = 64;
constexpr size_t kMaxNameLength = 256;
constexpr int64_t kMaxBytes = int64_t{1} << 50;  // no storage is a petabyte
constexpr absl::string_view kTorchPrefix = "__torch__";

// ---------------------------------------------------------------------------------------------
// code/__torch__.py

bool IsIdentifier(absl::string_view s) {
  if (s.empty() || s.size() > kMaxNameLength) return false;
  if (!(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
  for (char c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  }
  return true;
}

// An attribute key as the writer prints it inside quotes ("model.encoder.0.weight").
bool IsKey(absl::string_view s) {
  if (s.empty() || s.size() > kMaxNameLength) return false;
  for (char c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.')) return false;
  }
  return true;
}

bool IsType(absl::string_view s) {
  return s == "Tensor" || s == "int" || s == "float" || s == "bool" || s == "str";
}

absl::Status SourceError(size_t line, absl::string_view what, absl::string_view text) {
  std::string shown(text.substr(0, 80));
  for (char& c : shown) {
    if (!std::isprint(static_cast<unsigned char>(c))) c = '?';
  }
  return absl::DataLossError(
      absl::StrCat("code/__torch__.py line ", line, ": ", what, " (\"", shown, "\")"));
}

// `prefix` then `"NAME", ` repeated then `]`, to the end of the line.
absl::StatusOr<std::vector<std::string>> ParseNameList(absl::string_view line, size_t number,
                                                       absl::string_view prefix) {
  if (!absl::ConsumePrefix(&line, prefix)) {
    return SourceError(number, absl::StrCat("expected `", prefix, "`"), line);
  }
  std::vector<std::string> names;
  while (!line.empty() && line[0] == '"') {
    const size_t close = line.find('"', 1);
    if (close == absl::string_view::npos) return SourceError(number, "unterminated name", line);
    const absl::string_view name = line.substr(1, close - 1);
    if (!IsKey(name)) return SourceError(number, "not an attribute name", name);
    names.emplace_back(name);
    line.remove_prefix(close + 1);
    if (!absl::ConsumePrefix(&line, ", ")) return SourceError(number, "expected `, `", line);
  }
  if (line != "]") return SourceError(number, "expected a quoted name or `]` at the end", line);
  return names;
}

}  // namespace

absl::StatusOr<std::vector<ArchiveAttribute>> ParseArchiveClassSource(absl::string_view source) {
  if (source.empty() || source.back() != '\n') {
    return absl::DataLossError("code/__torch__.py is empty or does not end with a newline");
  }
  source.remove_suffix(1);
  const std::vector<absl::string_view> lines = absl::StrSplit(source, '\n');
  if (lines[0] != "class Module(Module):") {
    return SourceError(1, "expected `class Module(Module):`", lines[0]);
  }
  if (lines.size() < 3) return SourceError(lines.size(), "class body ends early", lines.back());
  MAT_ASSIGN_OR_RETURN(auto parameters, ParseNameList(lines[1], 2, "  __parameters__ = ["));
  MAT_ASSIGN_OR_RETURN(auto buffers, ParseNameList(lines[2], 3, "  __buffers__ = ["));

  std::vector<ArchiveAttribute> attributes;
  std::map<std::string, size_t> index;
  bool annotations_line = false;
  for (size_t i = 3; i < lines.size(); ++i) {
    absl::string_view line = lines[i];
    const size_t number = i + 1;
    if (line == "  __annotations__ = []") {
      if (annotations_line || !attributes.empty()) {
        return SourceError(number, "`__annotations__ = []` only once, before the attributes", line);
      }
      annotations_line = true;
      continue;
    }
    ArchiveAttribute attr;
    absl::string_view type;
    if (absl::ConsumePrefix(&line, "  __annotations__[\"")) {
      const size_t close = line.find("\"] = ");
      if (close == absl::string_view::npos) return SourceError(number, "expected `\"] = `", line);
      attr.name = std::string(line.substr(0, close));
      if (!IsKey(attr.name)) return SourceError(number, "not an attribute name", attr.name);
      type = line.substr(close + 5);
    } else if (absl::ConsumePrefix(&line, "  ")) {
      const size_t colon = line.find(" : ");
      if (colon == absl::string_view::npos) {
        return SourceError(number, "expected `NAME : TYPE`", lines[i]);
      }
      attr.name = std::string(line.substr(0, colon));
      if (!IsIdentifier(attr.name)) return SourceError(number, "not an identifier", attr.name);
      type = line.substr(colon + 3);
    } else {
      return SourceError(number, "expected an indented attribute", line);
    }
    if (absl::StartsWith(attr.name, "__")) {
      return SourceError(number, "attribute names do not start with `__`", attr.name);
    }
    if (!IsType(type)) {
      return SourceError(number, "type is not Tensor, int, float, bool or str", type);
    }
    attr.type = std::string(type);
    if (!index.emplace(attr.name, attributes.size()).second) {
      return SourceError(number, "attribute declared twice", attr.name);
    }
    attributes.push_back(std::move(attr));
  }
  for (auto* list : {&parameters, &buffers}) {
    const bool is_param = list == &parameters;
    for (const std::string& name : *list) {
      auto it = index.find(name);
      if (it == index.end() || attributes[it->second].type != "Tensor") {
        return absl::DataLossError(absl::StrCat("code/__torch__.py: ", is_param ? "parameter" : "buffer",
                                                " \"", name, "\" is not a Tensor attribute"));
      }
      ArchiveAttribute& attr = attributes[it->second];
      if (attr.parameter || attr.buffer) {
        return absl::DataLossError(
            absl::StrCat("code/__torch__.py: \"", name, "\" is listed twice as parameter or buffer"));
      }
      (is_param ? attr.parameter : attr.buffer) = true;
    }
  }
  return attributes;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Pickles

enum class Kind { kNone, kBool, kInt, kFloat, kStr, kTuple, kList, kDict, kGlobal, kStorage, kTensor, kObject };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kNone: return "None";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kFloat: return "float";
    case Kind::kStr: return "str";
    case Kind::kTuple: return "tuple";
    case Kind::kList: return "list";
    case Kind::kDict: return "dict";
    case Kind::kGlobal: return "global";
    case Kind::kStorage: return "storage";
    case Kind::kTensor: return "tensor";
    case Kind::kObject: return "object";
  }
  return "?";
}

struct Value;
using Ref = std::shared_ptr<Value>;

struct Value {
  explicit Value(Kind k) : kind(k) {}
  Kind kind;
  int64_t i = 0;        // int, bool; storage: numel
  double f = 0;         // float
  std::string s;        // str; global: module; storage: key; tensor: dtype
  std::string s2;       // global: name
  std::vector<Ref> items;  // tuple / list elements; dict keys and values alternating; object state
  std::string element;  // list: element kind of a build_*list ("int", ...), or empty
  int depth = 1;
  bool sealed = false;  // part of another value: no longer mutable (so no cycles)
  bool built = false;   // object: BUILD done
  std::set<std::string> keys;  // dict: its keys
};

struct StorageType {
  const char* name;
  int itemsize;
};
constexpr StorageType kStorageTypes[] = {
    {"FloatStorage", 4},   {"DoubleStorage", 8},       {"HalfStorage", 2},
    {"BFloat16Storage", 2}, {"LongStorage", 8},        {"IntStorage", 4},
    {"ShortStorage", 2},   {"CharStorage", 1},         {"ByteStorage", 1},
    {"BoolStorage", 1},    {"ComplexFloatStorage", 8}, {"ComplexDoubleStorage", 16},
};

int ItemSize(absl::string_view storage) {
  for (const StorageType& t : kStorageTypes) {
    if (storage == t.name) return t.itemsize;
  }
  return 0;
}

bool GlobalAllowed(absl::string_view module, absl::string_view name) {
  if (module == kTorchPrefix) return name == "Module";
  if (module == "torch._utils") return name == "_rebuild_tensor_v2";
  if (module == "collections") return name == "OrderedDict";
  if (module == "torch.jit._pickle") {
    return name == "build_intlist" || name == "build_doublelist" || name == "build_boollist" ||
           name == "build_tensorlist";
  }
  if (module == "torch") return ItemSize(name) > 0;
  return false;
}

bool IsDigits(absl::string_view s, size_t max) {
  if (s.empty() || s.size() > max) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

bool IsLocation(absl::string_view s) {
  if (s == "cpu" || s == "cuda") return true;
  return absl::ConsumePrefix(&s, "cuda:") && IsDigits(s, 3);
}

// Tensor data records, shared by the pickles of one archive.
struct Storages {
  const ArchiveRecords* archive;
  std::set<std::string> names;
  std::map<std::string, std::pair<std::string, int64_t>> seen;  // record -> (type, numel)
};

// Runs a pickle over the opcode subset LibTorch's pickler writes, building its value.
class PickleChecker {
 public:
  PickleChecker(absl::string_view record, absl::string_view data, std::string storage_prefix,
                Storages* storages)
      : record_(record), data_(data), prefix_(std::move(storage_prefix)), storages_(storages) {}

  absl::StatusOr<Ref> Run() {
    if (data_.empty() || static_cast<uint8_t>(data_[0]) != 0x80) {
      return absl::DataLossError(absl::StrCat(record_, ": not a pickle (no PROTO opcode first)"));
    }
    while (true) {
      if (pos_ >= data_.size()) return Error("ends without STOP");
      at_ = pos_;
      const uint8_t op = static_cast<uint8_t>(data_[pos_++]);
      absl::Status st = Step(op);
      if (!st.ok()) return st;
      if (op == '.') return stack_[0];
    }
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::DataLossError(absl::StrCat(record_, " byte ", at_, ": ", what));
  }

  absl::Status Need(size_t n) const {
    if (data_.size() - pos_ < n) {
      return Error(absl::StrCat("needs ", n, " more bytes, the record has ", data_.size() - pos_));
    }
    return absl::OkStatus();
  }
  uint64_t Le(size_t n) {  // after Need(n)
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= uint64_t(static_cast<uint8_t>(data_[pos_ + k])) << (8 * k);
    pos_ += n;
    return v;
  }
  absl::StatusOr<absl::string_view> Line() {
    const size_t nl = data_.find('\n', pos_);
    if (nl == absl::string_view::npos || nl - pos_ > kMaxNameLength) {
      return Error("GLOBAL name without a newline");
    }
    absl::string_view s = data_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    return s;
  }

  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  absl::StatusOr<Ref> Pop() {
    if (stack_.size() <= Floor()) return Error("pops an empty stack (or past a MARK)");
    Ref v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  absl::StatusOr<std::vector<Ref>> PopMark() {
    if (marks_.empty()) return Error("no MARK to pop to");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Ref> items(std::make_move_iterator(stack_.begin() + m),
                           std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  absl::Status Push(Ref v) {
    if (v->depth > kMaxDepth) return Error(absl::StrCat("values nest deeper than ", kMaxDepth));
    stack_.push_back(std::move(v));
    return absl::OkStatus();
  }
  // Makes `child` part of `parent` (sealed), keeping depths.
  absl::Status Adopt(Value& parent, Ref child) {
    if (child.get() == &parent) return Error("a container cannot hold itself");
    child->sealed = true;
    parent.depth = std::max(parent.depth, child->depth + 1);
    if (parent.depth > kMaxDepth) return Error(absl::StrCat("values nest deeper than ", kMaxDepth));
    parent.items.push_back(std::move(child));
    return absl::OkStatus();
  }
  absl::StatusOr<Ref> MakeTuple(std::vector<Ref> items) {
    auto t = std::make_shared<Value>(Kind::kTuple);
    for (Ref& v : items) {
      absl::Status st = Adopt(*t, std::move(v));
      if (!st.ok()) return st;
    }
    return t;
  }
  static Ref Scalar(Kind k, int64_t i) {
    auto v = std::make_shared<Value>(k);
    v->i = i;
    return v;
  }
  absl::Status Mutable(const Ref& target, Kind kind) {
    if (target->kind != kind) {
      return Error(absl::StrCat("adds items to a ", KindName(target->kind), ", not a ", KindName(kind)));
    }
    if (target->sealed) return Error(absl::StrCat("adds items to a ", KindName(kind), " already in use"));
    return absl::OkStatus();
  }

  absl::Status Step(uint8_t op);
  absl::StatusOr<Ref> Reduce(const Ref& fn, const Ref& args);
  absl::StatusOr<Ref> Storage(const Ref& pid);
  absl::StatusOr<Ref> Tensor(const Ref& args);

  absl::string_view record_;
  absl::string_view data_;
  std::string prefix_;
  Storages* storages_;
  size_t pos_ = 0;
  size_t at_ = 0;
  std::vector<Ref> stack_;
  std::vector<size_t> marks_;
  std::vector<Ref> memo_;
};

absl::Status PickleChecker::Step(uint8_t op) {
  switch (op) {
    case 0x80: {  // PROTO
      if (at_ != 0) return Error("PROTO after the start");
      MAT_RETURN_IF_ERROR(Need(1));
      const uint64_t proto = Le(1);
      if (proto != 2) return Error(absl::StrCat("pickle protocol ", proto, ", the writer uses 2"));
      return absl::OkStatus();
    }
    case '.': {  // STOP
      if (pos_ != data_.size()) return Error(absl::StrCat(data_.size() - pos_, " bytes after STOP"));
      if (stack_.size() != 1 || !marks_.empty()) {
        return Error(absl::StrCat("STOP with ", stack_.size(), " values and ", marks_.size(),
                                  " marks left (expected one value)"));
      }
      return absl::OkStatus();
    }
    case 'c': {  // GLOBAL
      MAT_ASSIGN_OR_RETURN(auto module, Line());
      MAT_ASSIGN_OR_RETURN(auto name, Line());
      if (!GlobalAllowed(module, name)) {
        return Error(absl::StrCat("GLOBAL ", module, ".", name, " is not one the writer uses"));
      }
      auto g = std::make_shared<Value>(Kind::kGlobal);
      g->s = std::string(module);
      g->s2 = std::string(name);
      return Push(std::move(g));
    }
    case 'q':    // BINPUT
    case 'r': {  // LONG_BINPUT
      const size_t n = op == 'q' ? 1 : 4;
      MAT_RETURN_IF_ERROR(Need(n));
      const uint64_t id = Le(n);
      if (stack_.empty()) return Error("BINPUT with an empty stack");
      if (id > memo_.size()) {
        return Error(absl::StrCat("memo id ", id, " skips ids (the memo holds ", memo_.size(), ")"));
      }
      if (id == memo_.size()) {
        memo_.push_back(stack_.back());
      } else {
        memo_[id] = stack_.back();
      }
      return absl::OkStatus();
    }
    case 'h':    // BINGET
    case 'j': {  // LONG_BINGET
      const size_t n = op == 'h' ? 1 : 4;
      MAT_RETURN_IF_ERROR(Need(n));
      const uint64_t id = Le(n);
      if (id >= memo_.size()) {
        return Error(absl::StrCat("memo id ", id, " was never stored (the memo holds ", memo_.size(), ")"));
      }
      return Push(memo_[id]);
    }
    case ')': return Push(std::make_shared<Value>(Kind::kTuple));
    case ']': return Push(std::make_shared<Value>(Kind::kList));
    case '}': return Push(std::make_shared<Value>(Kind::kDict));
    case 'N': return Push(std::make_shared<Value>(Kind::kNone));
    case 0x88: return Push(Scalar(Kind::kBool, 1));
    case 0x89: return Push(Scalar(Kind::kBool, 0));
    case 'K': MAT_RETURN_IF_ERROR(Need(1)); return Push(Scalar(Kind::kInt, int64_t(Le(1))));
    case 'M': MAT_RETURN_IF_ERROR(Need(2)); return Push(Scalar(Kind::kInt, int64_t(Le(2))));
    case 'J': MAT_RETURN_IF_ERROR(Need(4)); return Push(Scalar(Kind::kInt, int64_t(int32_t(uint32_t(Le(4))))));
    case 0x8a: {  // LONG1
      MAT_RETURN_IF_ERROR(Need(1));
      const size_t n = Le(1);
      if (n > 8) return Error(absl::StrCat("LONG1 of ", n, " bytes (more than 64 bits)"));
      MAT_RETURN_IF_ERROR(Need(n));
      uint64_t v = Le(n);
      if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);  // sign
      return Push(Scalar(Kind::kInt, static_cast<int64_t>(v)));
    }
    case 'G': {  // BINFLOAT, big-endian
      MAT_RETURN_IF_ERROR(Need(8));
      uint64_t bits = 0;
      for (int k = 0; k < 8; ++k) bits = (bits << 8) | static_cast<uint8_t>(data_[pos_ + k]);
      pos_ += 8;
      auto v = std::make_shared<Value>(Kind::kFloat);
      std::memcpy(&v->f, &bits, sizeof(bits));
      return Push(std::move(v));
    }
    case 'X': {  // BINUNICODE
      MAT_RETURN_IF_ERROR(Need(4));
      const uint64_t n = Le(4);
      MAT_RETURN_IF_ERROR(Need(n));
      auto v = std::make_shared<Value>(Kind::kStr);
      v->s = std::string(data_.substr(pos_, n));
      pos_ += n;
      return Push(std::move(v));
    }
    case '(':  // MARK
      marks_.push_back(stack_.size());
      return absl::OkStatus();
    case 't': {  // TUPLE
      MAT_ASSIGN_OR_RETURN(auto items, PopMark());
      MAT_ASSIGN_OR_RETURN(auto t, MakeTuple(std::move(items)));
      return Push(std::move(t));
    }
    case 0x85:
    case 0x86:
    case 0x87: {  // TUPLE1..3
      const size_t n = op - 0x84;
      std::vector<Ref> items(n);
      for (size_t k = n; k-- > 0;) {
        MAT_ASSIGN_OR_RETURN(auto v, Pop());
        items[k] = std::move(v);
      }
      MAT_ASSIGN_OR_RETURN(auto t, MakeTuple(std::move(items)));
      return Push(std::move(t));
    }
    case 'e':    // APPENDS
    case 'a': {  // APPEND
      std::vector<Ref> items;
      if (op == 'e') {
        MAT_ASSIGN_OR_RETURN(auto popped, PopMark());
        items = std::move(popped);
      } else {
        MAT_ASSIGN_OR_RETURN(auto v, Pop());
        items.push_back(std::move(v));
      }
      if (stack_.size() <= Floor()) return Error("APPEND without a list");
      Ref target = stack_.back();
      for (Ref& v : items) v->sealed = true;
      MAT_RETURN_IF_ERROR(Mutable(target, Kind::kList));
      for (Ref& v : items) MAT_RETURN_IF_ERROR(Adopt(*target, std::move(v)));
      return absl::OkStatus();
    }
    case 'u':    // SETITEMS
    case 's': {  // SETITEM
      std::vector<Ref> items;
      if (op == 'u') {
        MAT_ASSIGN_OR_RETURN(auto popped, PopMark());
        items = std::move(popped);
      } else {
        MAT_ASSIGN_OR_RETURN(auto v, Pop());
        MAT_ASSIGN_OR_RETURN(auto k, Pop());
        items = {std::move(k), std::move(v)};
      }
      if (items.size() % 2 != 0) return Error("SETITEMS with an odd number of values");
      if (stack_.size() <= Floor()) return Error("SETITEM without a dict");
      Ref target = stack_.back();
      for (Ref& v : items) v->sealed = true;
      MAT_RETURN_IF_ERROR(Mutable(target, Kind::kDict));
      for (size_t k = 0; k < items.size(); k += 2) {
        if (items[k]->kind != Kind::kStr) {
          return Error(absl::StrCat("dict key is a ", KindName(items[k]->kind), ", not a str"));
        }
        if (!target->keys.insert(items[k]->s).second) {
          return Error(absl::StrCat("dict key \"", items[k]->s, "\" twice"));
        }
        MAT_RETURN_IF_ERROR(Adopt(*target, std::move(items[k])));
        MAT_RETURN_IF_ERROR(Adopt(*target, std::move(items[k + 1])));
      }
      return absl::OkStatus();
    }
    case 0x81: {  // NEWOBJ
      MAT_ASSIGN_OR_RETURN(auto args, Pop());
      MAT_ASSIGN_OR_RETURN(auto cls, Pop());
      if (cls->kind != Kind::kGlobal || cls->s != kTorchPrefix) return Error("NEWOBJ of something not a __torch__ class");
      if (args->kind != Kind::kTuple || !args->items.empty()) return Error("NEWOBJ with arguments");
      auto obj = std::make_shared<Value>(Kind::kObject);
      obj->s = cls->s2;
      return Push(std::move(obj));
    }
    case 'b': {  // BUILD
      MAT_ASSIGN_OR_RETURN(auto state, Pop());
      if (stack_.size() <= Floor()) return Error("BUILD without an object");
      Ref obj = stack_.back();
      if (obj->kind != Kind::kObject || obj->built || obj->sealed) return Error("BUILD of something not a fresh object");
      if (state->kind != Kind::kDict) return Error(absl::StrCat("BUILD with a ", KindName(state->kind), " state, not a dict"));
      obj->built = true;
      return Adopt(*obj, std::move(state));
    }
    case 'R': {  // REDUCE
      MAT_ASSIGN_OR_RETURN(auto args, Pop());
      MAT_ASSIGN_OR_RETURN(auto fn, Pop());
      MAT_ASSIGN_OR_RETURN(auto v, Reduce(fn, args));
      return Push(std::move(v));
    }
    case 'Q': {  // BINPERSID
      MAT_ASSIGN_OR_RETURN(auto pid, Pop());
      MAT_ASSIGN_OR_RETURN(auto v, Storage(pid));
      return Push(std::move(v));
    }
    default:
      return Error(absl::StrFormat("opcode 0x%02x is not one the writer uses", op));
  }
}

absl::StatusOr<Ref> PickleChecker::Reduce(const Ref& fn, const Ref& args) {
  if (fn->kind != Kind::kGlobal) return Error(absl::StrCat("REDUCE calls a ", KindName(fn->kind)));
  if (args->kind != Kind::kTuple) return Error("REDUCE arguments are not a tuple");
  const std::string name = fn->s + "." + fn->s2;
  if (name == "collections.OrderedDict") {
    if (!args->items.empty()) return Error("OrderedDict with arguments");
    return std::make_shared<Value>(Kind::kDict);
  }
  if (name == "torch._utils._rebuild_tensor_v2") return Tensor(args);
  if (fn->s == "torch.jit._pickle") {
    if (args->items.size() != 1 || args->items[0]->kind != Kind::kList) {
      return Error(absl::StrCat(fn->s2, " takes one list"));
    }
    const Kind want = fn->s2 == "build_intlist"      ? Kind::kInt
                      : fn->s2 == "build_doublelist" ? Kind::kFloat
                      : fn->s2 == "build_boollist"   ? Kind::kBool
                                                     : Kind::kTensor;
    auto list = std::make_shared<Value>(Kind::kList);
    list->element = KindName(want);
    for (const Ref& v : args->items[0]->items) {
      if (v->kind != want) return Error(absl::StrCat(fn->s2, " holds a ", KindName(v->kind)));
      MAT_RETURN_IF_ERROR(Adopt(*list, v));
    }
    return list;
  }
  return Error(absl::StrCat("REDUCE of ", name, " is not one the writer uses"));
}

absl::StatusOr<Ref> PickleChecker::Storage(const Ref& pid) {
  if (prefix_.empty()) return Error("BINPERSID (a tensor storage) in a record that holds no tensors");
  const auto& e = pid->items;
  if (pid->kind != Kind::kTuple || e.size() != 5 || e[0]->kind != Kind::kStr || e[0]->s != "storage" ||
      e[1]->kind != Kind::kGlobal || e[1]->s != "torch" || e[2]->kind != Kind::kStr ||
      e[3]->kind != Kind::kStr || e[4]->kind != Kind::kInt) {
    return Error("BINPERSID is not ('storage', torch.<Type>Storage, key, location, numel)");
  }
  const int itemsize = ItemSize(e[1]->s2);
  if (!IsDigits(e[2]->s, 20)) return Error("storage key is not a record number");
  if (!IsLocation(e[3]->s)) return Error(absl::StrCat("storage location \"", e[3]->s, "\" is not cpu or cuda[:N]"));
  const int64_t numel = e[4]->i;
  if (numel < 0 || numel > kMaxBytes / itemsize) return Error(absl::StrCat("storage of ", numel, " elements"));
  const std::string record = prefix_ + e[2]->s;
  auto seen = storages_->seen.find(record);
  if (seen != storages_->seen.end()) {
    if (seen->second != std::make_pair(e[1]->s2, numel)) {
      return Error(absl::StrCat("storage ", record, " appears with two types or sizes"));
    }
  } else if (numel > 0) {
    if (storages_->names.count(record) == 0) return Error(absl::StrCat("storage record ", record, " is missing"));
    MAT_ASSIGN_OR_RETURN(auto size, storages_->archive->size(record));
    if (size < uint64_t(numel) * uint64_t(itemsize)) {
      return Error(absl::StrCat("storage record ", record, " holds ", size, " bytes, the pickle says ",
                                numel, " x ", itemsize));
    }
    storages_->seen.emplace(record, std::make_pair(e[1]->s2, numel));
  }
  auto v = std::make_shared<Value>(Kind::kStorage);
  v->s = e[1]->s2;
  v->i = numel;
  return v;
}

absl::StatusOr<Ref> PickleChecker::Tensor(const Ref& args) {
  const auto& e = args->items;
  if ((e.size() != 6 && e.size() != 7) || e[0]->kind != Kind::kStorage || e[1]->kind != Kind::kInt ||
      e[2]->kind != Kind::kTuple || e[3]->kind != Kind::kTuple || e[4]->kind != Kind::kBool ||
      e[5]->kind != Kind::kDict || !e[5]->items.empty()) {
    return Error("_rebuild_tensor_v2 arguments are not (storage, offset, sizes, strides, requires_grad, {})");
  }
  const auto& sizes = e[2]->items;
  const auto& strides = e[3]->items;
  if (sizes.size() != strides.size() || sizes.size() > kMaxDims) {
    return Error(absl::StrCat("tensor with ", sizes.size(), " sizes and ", strides.size(), " strides"));
  }
  const int64_t offset = e[1]->i;
  const int64_t storage = e[0]->i;
  int64_t numel = 1;
  int64_t last = offset;  // index of the last element
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d]->kind != Kind::kInt || strides[d]->kind != Kind::kInt) return Error("tensor size or stride is not an int");
    const int64_t n = sizes[d]->i;
    const int64_t s = strides[d]->i;
    if (n < 0 || s < 0) return Error(absl::StrCat("tensor size ", n, " or stride ", s, " is negative"));
    if (__builtin_mul_overflow(numel, n, &numel) || numel > kMaxBytes) return Error("tensor has too many elements");
    int64_t reach = 0;
    if (n > 0 && (__builtin_mul_overflow(n - 1, s, &reach) || __builtin_add_overflow(last, reach, &last))) {
      return Error("tensor strides overflow");
    }
  }
  if (offset < 0 || offset > storage || (numel > 0 && last >= storage)) {
    return Error(absl::StrCat("tensor reaches element ", numel > 0 ? last : offset, " of a storage of ",
                              storage));
  }
  auto v = std::make_shared<Value>(Kind::kTensor);
  v->s = e[0]->s;
  return v;
}

absl::Status CheckData(const Ref& top, const std::vector<ArchiveAttribute>& attrs) {
  if (top->kind != Kind::kObject || top->s != "Module" || !top->built) {
    return absl::DataLossError("data.pkl: the value is not a built __torch__.Module object");
  }
  const auto& state = top->items[0]->items;
  std::map<std::string, Kind> have;
  for (size_t k = 0; k < state.size(); k += 2) have.emplace(state[k]->s, state[k + 1]->kind);
  for (const ArchiveAttribute& a : attrs) {
    auto it = have.find(a.name);
    if (it == have.end()) return absl::DataLossError(absl::StrCat("data.pkl: attribute \"", a.name, "\" is missing"));
    const Kind want = a.type == "Tensor" ? Kind::kTensor
                      : a.type == "int"  ? Kind::kInt
                      : a.type == "float" ? Kind::kFloat
                      : a.type == "bool" ? Kind::kBool
                                         : Kind::kStr;
    if (it->second != want) {
      return absl::DataLossError(absl::StrCat("data.pkl: attribute \"", a.name, "\" is a ", KindName(it->second),
                                              ", the class says ", a.type));
    }
    have.erase(it);
  }
  if (!have.empty()) {
    return absl::DataLossError(absl::StrCat("data.pkl: attribute \"", have.begin()->first,
                                            "\" is not declared in code/__torch__.py"));
  }
  return absl::OkStatus();
}

absl::Status CheckConstants(const Ref& top) {
  if (top->kind != Kind::kTuple) return absl::DataLossError("constants.pkl: the value is not a tuple");
  for (const Ref& v : top->items) {
    if (v->kind != Kind::kTensor) return absl::DataLossError("constants.pkl: a constant is not a tensor");
  }
  return absl::OkStatus();
}

bool IsTuple(const Ref& v, size_t n) { return v->kind == Kind::kTuple && v->items.size() == n; }

absl::Status CheckDebug(const Ref& top) {
  constexpr absl::string_view kRecord = "code/__torch__.py.debug_pkl: ";
  if (!IsTuple(top, 3) || top->items[0]->kind != Kind::kStr || top->items[0]->s != "FORMAT_WITH_STRING_TABLE" ||
      top->items[1]->kind != Kind::kTuple || top->items[2]->kind != Kind::kTuple) {
    return absl::DataLossError(absl::StrCat(kRecord, "not ('FORMAT_WITH_STRING_TABLE', strings, ranges)"));
  }
  const auto& table = top->items[1]->items;
  for (const Ref& s : table) {
    if (s->kind != Kind::kStr) return absl::DataLossError(absl::StrCat(kRecord, "string table holds a ", KindName(s->kind)));
  }
  const auto in_table = [&](const Ref& v) {
    return v->kind == Kind::kInt && v->i >= 0 && uint64_t(v->i) < table.size();
  };
  for (const Ref& row : top->items[2]->items) {
    // (byte offset, ((text indices, file name index, line), start, end), tag)
    if (!IsTuple(row, 3) || row->items[0]->kind != Kind::kInt || row->items[0]->i < 0 ||
        row->items[2]->kind != Kind::kInt || !IsTuple(row->items[1], 3)) {
      return absl::DataLossError(absl::StrCat(kRecord, "a row is not (offset, range, tag)"));
    }
    const Ref& range = row->items[1];
    const Ref& source = range->items[0];
    if (!IsTuple(source, 3) || source->items[0]->kind != Kind::kList || source->items[0]->element != "int" ||
        !in_table(source->items[1]) || source->items[2]->kind != Kind::kInt) {
      return absl::DataLossError(absl::StrCat(kRecord, "a source is not (text indices, file index, line)"));
    }
    uint64_t length = 0;
    for (const Ref& i : source->items[0]->items) {
      if (!in_table(i)) return absl::DataLossError(absl::StrCat(kRecord, "text index ", i->i, " outside the table"));
      length += table[i->i]->s.size();
    }
    const Ref& start = range->items[1];
    const Ref& end = range->items[2];
    if (start->kind != Kind::kInt || end->kind != Kind::kInt || start->i < 0 || end->i < start->i ||
        uint64_t(end->i) > length) {
      return absl::DataLossError(absl::StrCat(kRecord, "a range is outside its source text"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Ref> RunPickle(const ArchiveRecords& archive, const std::string& record,
                              const std::string& storage_prefix, Storages* storages) {
  MAT_ASSIGN_OR_RETURN(auto bytes, archive.read(record));
  PickleChecker checker(record, bytes, storage_prefix, storages);
  return checker.Run();
}

}  // namespace

absl::Status CheckArchiveRecords(const ArchiveRecords& archive) {
  Storages storages{&archive, {archive.names.begin(), archive.names.end()}, {}};
  for (const std::string& name : archive.names) {
    const bool known = name == "data.pkl" || name == "constants.pkl" || name == "code/__torch__.py" ||
                       name == "code/__torch__.py.debug_pkl";
    if (known) continue;
    if (absl::StartsWith(name, "code/") || absl::EndsWith(name, "pkl")) {
      return absl::DataLossError(absl::StrCat("record ", name, " is not one the writer makes"));
    }
    if (name == "version") {
      MAT_ASSIGN_OR_RETURN(auto v, archive.read(name));
      absl::string_view text = v;
      absl::ConsumeSuffix(&text, "\n");
      if (!IsDigits(text, 4)) return absl::DataLossError("record version is not a number");
    }
  }
  for (const char* needed : {"data.pkl", "code/__torch__.py"}) {
    if (storages.names.count(needed) == 0) {
      return absl::DataLossError(absl::StrCat("record ", needed, " is missing"));
    }
  }
  MAT_ASSIGN_OR_RETURN(auto source, archive.read("code/__torch__.py"));
  MAT_ASSIGN_OR_RETURN(auto attrs, ParseArchiveClassSource(source));
  if (storages.names.count("code/__torch__.py.debug_pkl") != 0) {
    MAT_ASSIGN_OR_RETURN(auto debug, RunPickle(archive, "code/__torch__.py.debug_pkl", "", &storages));
    MAT_RETURN_IF_ERROR(CheckDebug(debug));
  }
  if (storages.names.count("constants.pkl") != 0) {
    MAT_ASSIGN_OR_RETURN(auto constants, RunPickle(archive, "constants.pkl", "constants/", &storages));
    MAT_RETURN_IF_ERROR(CheckConstants(constants));
  }
  MAT_ASSIGN_OR_RETURN(auto data, RunPickle(archive, "data.pkl", "data/", &storages));
  return CheckData(data, attrs);
}

// ---------------------------------------------------------------------------------------------
// The zip directory

namespace {

uint64_t Le(absl::string_view zip, uint64_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(static_cast<unsigned char>(zip[at + i])) << (8 * i);
  return v;
}

absl::Status ZipError(absl::string_view what) {
  return absl::DataLossError(absl::StrCat("zip directory: ", what));
}

}  // namespace

absl::StatusOr<std::map<std::string, uint64_t>> CheckZipDirectory(absl::string_view zip) {
  constexpr uint64_t kEndSize = 22, kLocatorSize = 20, kEnd64Size = 56, kEntrySize = 46,
                     kLocalSize = 30, kMax32 = 0xffffffffu;
  constexpr uint64_t kMaxCodeBytes = uint64_t{64} << 20;  // a class's source, 64 MiB at most
  constexpr uint64_t kMaxDeflateRatio = 1032;              // deflate's limit
  const uint64_t size = zip.size();
  if (size < kEndSize) return ZipError(absl::StrCat("the archive has only ", size, " bytes"));
  // The end record: the last signature with a whole record after it, within 64 KiB of comment
  // (miniz's search).
  uint64_t end = size - kEndSize + 1;
  const uint64_t lowest = size - kEndSize > 0xffff ? size - kEndSize - 0xffff : 0;
  for (uint64_t at = size - kEndSize + 1; at-- > lowest;) {
    if (Le(zip, at, 4) == 0x06054b50) {
      end = at;
      break;
    }
  }
  if (end > size - kEndSize) return ZipError("no end-of-directory record");
  uint64_t entries = Le(zip, end + 10, 2), dir_size = Le(zip, end + 12, 4),
           dir_at = Le(zip, end + 16, 4);
  if (end >= kLocatorSize && Le(zip, end - kLocatorSize, 4) == 0x07064b50) {
    const uint64_t end64 = Le(zip, end - kLocatorSize + 8, 8);
    if (size < kEnd64Size || end64 > size - kEnd64Size) return ZipError("the zip64 end record lies outside the archive");
    if (Le(zip, end64, 4) == 0x06064b50) {
      entries = Le(zip, end64 + 32, 8);
      dir_size = Le(zip, end64 + 40, 8);
      dir_at = Le(zip, end64 + 48, 8);
    }
  }
  if (dir_at > size || dir_size > size - dir_at) {
    return ZipError(absl::StrCat("the directory (", dir_size, " bytes at ", dir_at,
                                 ") lies outside the archive of ", size, " bytes"));
  }
  if (entries > dir_size / kEntrySize) {
    return ZipError(absl::StrCat(entries, " entries cannot fit in ", dir_size, " bytes"));
  }
  std::map<std::string, uint64_t> sizes;
  std::string folder;  // "archive/": every entry's, as PyTorchStreamReader requires
  uint64_t p = dir_at;
  const uint64_t dir_end = dir_at + dir_size;
  for (uint64_t i = 0; i < entries; ++i) {
    if (dir_end - p < kEntrySize || Le(zip, p, 4) != 0x02014b50) {
      return ZipError(absl::StrCat("entry ", i, " at byte ", p, " is not a directory entry"));
    }
    const uint64_t method = Le(zip, p + 10, 2), name_len = Le(zip, p + 28, 2),
                   extra_len = Le(zip, p + 30, 2), comment_len = Le(zip, p + 32, 2);
    uint64_t packed = Le(zip, p + 20, 4), unpacked = Le(zip, p + 24, 4),
             local = Le(zip, p + 42, 4);
    if (dir_end - p - kEntrySize < name_len + extra_len + comment_len) {
      return ZipError(absl::StrCat("entry ", i, " runs past the directory"));
    }
    const absl::string_view name = zip.substr(p + kEntrySize, name_len);
    if (folder.empty()) folder = std::string(name.substr(0, name.find('/') + 1));
    if (folder.empty()) {
      return ZipError(absl::StrCat("entry ", name, " is not in a folder (the writer puts every "
                                   "record in one)"));
    }
    if (name.size() == folder.size() || !absl::StartsWith(name, folder)) {
      return ZipError(absl::StrCat("entry ", name, " is not a record in the folder ", folder));
    }
    const std::string record(name.substr(folder.size()));
    if (sizes.count(record) != 0) return ZipError(absl::StrCat("two entries are named ", name));
    if (unpacked == kMax32 || packed == kMax32 || local == kMax32) {
      // The zip64 extra field holds the 64-bit values, in this order, of those that are 0xffffffff.
      bool found = false;
      uint64_t e = p + kEntrySize + name_len;
      const uint64_t extra_end = e + extra_len;
      while (extra_end - e >= 4) {
        const uint64_t id = Le(zip, e, 2), len = Le(zip, e + 2, 2);
        if (extra_end - e - 4 < len) break;
        if (id == 1) {
          uint64_t f = e + 4;
          const uint64_t f_end = f + len;
          for (uint64_t* v : {&unpacked, &packed, &local}) {
            if (*v != kMax32) continue;
            if (f_end - f < 8) return ZipError(absl::StrCat("entry ", name, ": short zip64 field"));
            *v = Le(zip, f, 8);
            f += 8;
          }
          found = true;
          break;
        }
        e += 4 + len;
      }
      if (!found) return ZipError(absl::StrCat("entry ", name, ": no zip64 field"));
    }
    // The writer deflates the code records (small) and stores the rest.
    const size_t slash = name.find('/');
    const bool code = slash != absl::string_view::npos &&
                      absl::StartsWith(name.substr(slash + 1), "code/");
    if (method == 8 && code) {
      if (unpacked > kMaxCodeBytes || unpacked > packed * kMaxDeflateRatio) {
        return ZipError(absl::StrCat("entry ", name, " says ", packed, " compressed bytes hold ",
                                     unpacked, " bytes (at most ", kMaxCodeBytes, ")"));
      }
    } else if (method != 0) {
      return ZipError(absl::StrCat("entry ", name, " is compressed (method ", method,
                                   "); the writer stores all but code records uncompressed"));
    } else if (packed != unpacked) {
      return ZipError(absl::StrCat("entry ", name, " is stored but says ", packed,
                                   " bytes stored and ", unpacked, " bytes of data"));
    }
    if (local > size || size - local < kLocalSize || Le(zip, local, 4) != 0x04034b50) {
      return ZipError(absl::StrCat("entry ", name, ": no local header at byte ", local));
    }
    const uint64_t data_at = local + kLocalSize + Le(zip, local + 26, 2) + Le(zip, local + 28, 2);
    if (data_at > size || size - data_at < packed) {
      return ZipError(absl::StrCat("entry ", name, " holds ", packed, " bytes at byte ", data_at,
                                   ", past the end of the archive (", size, " bytes)"));
    }
    sizes[record] = unpacked;
    p += kEntrySize + name_len + extra_len + comment_len;
  }
  return sizes;
}

}  // namespace mat::worker
