#include "io/json.h"

#include <cstdlib>
#include <cstring>

namespace pysafe::json {

namespace {

constexpr int kMaxDepth = 64;

struct Parser {
  const char* p;
  const char* begin;
  const char* end;
  ParseError* err;

  bool fail(const std::string& what) {
    err->offset = static_cast<size_t>(p - begin);
    err->what = what;
    return false;
  }
  void skip_ws() {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  }
  bool literal(const char* word) {
    size_t n = std::strlen(word);
    if (static_cast<size_t>(end - p) < n || std::memcmp(p, word, n) != 0)
      return fail(std::string("invalid literal, expected '") + word + "'");
    p += n;
    return true;
  }
  static void put_utf8(std::string& s, uint32_t cp) {
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xE0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      s += static_cast<char>(0xF0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  bool hex4(uint32_t& v) {
    if (end - p < 4) return fail("truncated \\u escape");
    v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = *p++;
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
      else return fail("invalid hex digit in \\u escape");
    }
    return true;
  }
  bool string(std::string& out) {
    ++p;  // opening quote
    out.clear();
    while (true) {
      if (p >= end) return fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(*p);
      if (c == '"') {
        ++p;
        return true;
      }
      if (c < 0x20) return fail("control character in string");
      if (c != '\\') {
        out += static_cast<char>(c);
        ++p;
        continue;
      }
      ++p;
      if (p >= end) return fail("unterminated escape");
      char e = *p++;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp;
          if (!hex4(cp)) return false;
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (end - p < 2 || p[0] != '\\' || p[1] != 'u') return fail("unpaired high surrogate");
            p += 2;
            uint32_t lo;
            if (!hex4(lo)) return false;
            if (lo < 0xDC00 || lo > 0xDFFF) return fail("invalid low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return fail("unpaired low surrogate");
          }
          put_utf8(out, cp);
          break;
        }
        default: return fail(std::string("invalid escape '\\") + e + "'");
      }
    }
  }
  bool number(Value& v) {
    const char* start = p;
    bool neg = false;
    if (*p == '-') {
      neg = true;
      ++p;
    }
    if (p >= end || !(*p >= '0' && *p <= '9')) return fail("invalid number");
    if (*p == '0' && p + 1 < end && p[1] >= '0' && p[1] <= '9') return fail("leading zero in number");
    bool integral = true;
    uint64_t acc = 0;
    bool overflow = false;
    while (p < end && *p >= '0' && *p <= '9') {
      uint64_t d = static_cast<uint64_t>(*p - '0');
      if (acc > (UINT64_MAX - d) / 10) overflow = true;
      else acc = acc * 10 + d;
      ++p;
    }
    if (p < end && *p == '.') {
      integral = false;
      ++p;
      if (p >= end || !(*p >= '0' && *p <= '9')) return fail("invalid fraction");
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
      integral = false;
      ++p;
      if (p < end && (*p == '+' || *p == '-')) ++p;
      if (p >= end || !(*p >= '0' && *p <= '9')) return fail("invalid exponent");
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    v.type = Type::Number;
    v.number = std::strtod(std::string(start, p).c_str(), nullptr);
    v.is_uint = integral && !neg && !overflow;
    v.uint = v.is_uint ? acc : 0;
    return true;
  }
  bool value(Value& v, int depth) {
    if (depth > kMaxDepth) return fail("nesting deeper than 64 levels");
    skip_ws();
    if (p >= end) return fail("unexpected end of input");
    char c = *p;
    if (c == '{') {
      v.type = Type::Object;
      ++p;
      skip_ws();
      if (p < end && *p == '}') {
        ++p;
        return true;
      }
      while (true) {
        skip_ws();
        if (p >= end || *p != '"') return fail("expected a string key");
        std::string key;
        if (!string(key)) return false;
        for (auto& kv : v.object)
          if (kv.first == key) return fail("duplicate key '" + key + "'");
        skip_ws();
        if (p >= end || *p != ':') return fail("expected ':'");
        ++p;
        Value child;
        if (!value(child, depth + 1)) return false;
        v.object.emplace_back(std::move(key), std::move(child));
        skip_ws();
        if (p < end && *p == ',') {
          ++p;
          continue;
        }
        if (p < end && *p == '}') {
          ++p;
          return true;
        }
        return fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.type = Type::Array;
      ++p;
      skip_ws();
      if (p < end && *p == ']') {
        ++p;
        return true;
      }
      while (true) {
        Value child;
        if (!value(child, depth + 1)) return false;
        v.array.push_back(std::move(child));
        skip_ws();
        if (p < end && *p == ',') {
          ++p;
          continue;
        }
        if (p < end && *p == ']') {
          ++p;
          return true;
        }
        return fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.type = Type::String;
      return string(v.string);
    }
    if (c == 't') {
      v.type = Type::Bool;
      v.boolean = true;
      return literal("true");
    }
    if (c == 'f') {
      v.type = Type::Bool;
      return literal("false");
    }
    if (c == 'n') {
      v.type = Type::Null;
      return literal("null");
    }
    if (c == '-' || (c >= '0' && c <= '9')) return number(v);
    return fail(std::string("unexpected character '") + c + "'");
  }
};

}  // namespace

const Value* Value::find(const std::string& key) const {
  for (auto& kv : object)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

bool parse(const char* text, size_t size, Value& out, ParseError& err) {
  Parser ps{text, text, text + size, &err};
  out = Value{};
  if (!ps.value(out, 0)) return false;
  ps.skip_ws();
  if (ps.p != ps.end) return ps.fail("trailing characters after the JSON value");
  return true;
}

namespace {
bool fail_at(size_t* out, size_t i) {
  if (out) *out = i;
  return false;
}
}  // namespace

bool is_valid_utf8(const char* data, size_t size, size_t* bad_offset) {
  const unsigned char* s = reinterpret_cast<const unsigned char*>(data);
  size_t i = 0;
  while (i < size) {
    unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int n;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return fail_at(bad_offset, i);
    }
    for (int k = 1; k <= n; ++k) {
      if (i + k >= size) return fail_at(bad_offset, i);
      unsigned char cc = s[i + k];
      if ((cc & 0xC0) != 0x80) return fail_at(bad_offset, i);
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000)) return fail_at(bad_offset, i);
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return fail_at(bad_offset, i);
    i += static_cast<size_t>(n) + 1;
  }
  return true;
}

const char* type_name(Type t) {
  switch (t) {
    case Type::Null: return "null";
    case Type::Bool: return "boolean";
    case Type::Number: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "?";
}

}  // namespace pysafe::json
