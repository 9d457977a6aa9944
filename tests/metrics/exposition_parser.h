// Test helper: reads a text exposition (format 0.0.4) back into samples, undoing label escaping,
// so tests check what a scraper would see rather than the exact text.
#pragma once

#include <cstdlib>
#include <limits>
#include <map>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

namespace mat::metrics::testing {

// "name{a=\"x\",b=\"y\"}" (labels in exposition order, values unescaped) -> value.
using Samples = std::map<std::string, double>;

// Parses `text`; ADD_FAILURE for a line it cannot read. `types` gets name -> TYPE.
inline Samples ParseExposition(const std::string& text,
                               std::map<std::string, std::string>* types = nullptr) {
  Samples out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line.rfind("# TYPE ", 0) == 0) {
      std::istringstream t(line.substr(7));
      std::string name, type;
      t >> name >> type;
      if (types != nullptr) (*types)[name] = type;
      continue;
    }
    if (line[0] == '#') continue;
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    std::string key = line.substr(0, i);
    if (i < line.size() && line[i] == '{') {
      key += '{';
      ++i;
      bool first = true;
      while (i < line.size() && line[i] != '}') {
        if (line[i] == ',') ++i;
        const size_t eq = line.find('=', i);
        if (eq == std::string::npos || eq + 1 >= line.size() || line[eq + 1] != '"') {
          ADD_FAILURE() << "bad labels in: " << line;
          return out;
        }
        std::string name = line.substr(i, eq - i), value;
        i = eq + 2;
        while (i < line.size() && line[i] != '"') {
          if (line[i] == '\\' && i + 1 < line.size()) {
            const char c = line[i + 1];
            value += c == 'n' ? '\n' : c;
            i += 2;
          } else {
            value += line[i++];
          }
        }
        ++i;  // closing quote
        key += (first ? "" : ",") + name + "=\"" + value + "\"";
        first = false;
      }
      key += '}';
      ++i;  // '}'
    }
    if (i >= line.size() || line[i] != ' ') {
      ADD_FAILURE() << "no value in: " << line;
      continue;
    }
    const std::string v = line.substr(i + 1);
    double value = 0;
    if (v == "NaN") {
      value = std::numeric_limits<double>::quiet_NaN();
    } else if (v == "+Inf") {
      value = std::numeric_limits<double>::infinity();
    } else if (v == "-Inf") {
      value = -std::numeric_limits<double>::infinity();
    } else {
      char* end = nullptr;
      value = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0') ADD_FAILURE() << "bad value in: " << line;
    }
    out[key] = value;
  }
  return out;
}

}  // namespace mat::metrics::testing
