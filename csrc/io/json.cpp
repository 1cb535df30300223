#include "io/json.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

namespace pysafe::json {

// -- KeySet ----------------------------------------------------------------------------------------
namespace {
constexpr size_t kLinearKeys = 8;  // below this, a scan beats hashing
inline size_t hash_of(std::string_view s) { return std::hash<std::string_view>{}(s); }
}  // namespace

void KeySet::rehash(size_t cap) {
  table_.assign(cap, 0);
  const size_t mask = cap - 1;
  for (size_t i = 0; i < keys_.size(); ++i) {
    size_t h = hash_of(keys_[i]) & mask;
    while (table_[h] != 0) h = (h + 1) & mask;
    table_[h] = static_cast<uint32_t>(i + 1);
  }
}

bool KeySet::insert(std::string_view key, bool stable) {
  if (table_.empty()) {
    for (auto& k : keys_)
      if (k == key) return false;
  } else {
    const size_t mask = table_.size() - 1;
    for (size_t h = hash_of(key) & mask; table_[h] != 0; h = (h + 1) & mask)
      if (keys_[table_[h] - 1] == key) return false;
  }
  if (!stable) key = owned_.emplace_front(key);
  keys_.push_back(key);
  if (keys_.size() > kLinearKeys && keys_.size() * 2 > table_.size()) {
    size_t cap = 16;
    while (cap < keys_.size() * 4) cap *= 2;  // load factor <= 1/2 until the next growth
    rehash(cap);
  } else if (!table_.empty()) {
    const size_t mask = table_.size() - 1;
    size_t h = hash_of(key) & mask;
    while (table_[h] != 0) h = (h + 1) & mask;
    table_[h] = static_cast<uint32_t>(keys_.size());
  }
  return true;
}

// -- Parser ----------------------------------------------------------------------------------------
bool Parser::fail(const std::string& what) {
  err_.offset = offset();
  err_.what = what;
  return false;
}

bool Parser::literal(const char* word) {
  size_t n = std::strlen(word);
  if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0)
    return fail(std::string("invalid literal, expected '") + word + "'");
  p_ += n;
  return true;
}

bool Parser::hex4(uint32_t& v) {
  if (end_ - p_ < 4) return fail("truncated \\u escape");
  v = 0;
  for (int i = 0; i < 4; ++i) {
    char c = *p_++;
    v <<= 4;
    if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
    else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
    else return fail("invalid hex digit in \\u escape");
  }
  return true;
}

namespace {
void put_utf8(std::string& s, uint32_t cp) {
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

// The character at p as it can be shown in a message: "'x'" for printable ASCII, otherwise
// "U+XXXX 'escaped'" for a whole UTF-8 character, or "byte 0xNN" for a byte that starts none.
std::string describe_char(const char* p, const char* end) {
  unsigned char c = static_cast<unsigned char>(*p);
  if (c >= 0x20 && c < 0x7F) return std::string("'") + static_cast<char>(c) + "'";
  size_t len = 1;
  if (c >= 0x80) len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
  char buf[16];
  if (len == 0 || static_cast<size_t>(end - p) < len || !is_valid_utf8(p, len)) {
    std::snprintf(buf, sizeof buf, "byte 0x%02X", c);
    return buf;
  }
  uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(p[k]) & 0x3Fu);
  std::snprintf(buf, sizeof buf, "U+%04X", cp);
  std::string s = std::string(buf) + " '" + printable(std::string_view(p, len)) + "'";
  if (cp == 0xFEFF) s += " (a byte-order mark)";
  return s;
}
}  // namespace

bool Parser::unexpected() { return fail("unexpected character " + describe_char(p_, end_)); }

bool Parser::string_impl(std::string* out, std::string_view* raw, bool* escaped) {
  ++p_;  // opening quote
  const char* start = p_;
  if (out) out->clear();
  bool esc = false;
  while (true) {
    if (p_ >= end_) return fail("unterminated string");
    unsigned char c = static_cast<unsigned char>(*p_);
    if (c == '"') {
      if (raw) *raw = std::string_view(start, static_cast<size_t>(p_ - start));
      if (escaped) *escaped = esc;
      ++p_;
      return true;
    }
    if (c < 0x20) return fail("control character in string");
    if (c != '\\') {
      // Copy a run of plain bytes at once.
      const char* run = p_;
      while (p_ < end_ && *p_ != '"' && *p_ != '\\' && static_cast<unsigned char>(*p_) >= 0x20) ++p_;
      if (out) out->append(run, static_cast<size_t>(p_ - run));
      continue;
    }
    esc = true;
    ++p_;
    if (p_ >= end_) return fail("unterminated escape");
    const char* at = p_;
    char e = *p_++;
    char simple = 0;
    switch (e) {
      case '"': simple = '"'; break;
      case '\\': simple = '\\'; break;
      case '/': simple = '/'; break;
      case 'b': simple = '\b'; break;
      case 'f': simple = '\f'; break;
      case 'n': simple = '\n'; break;
      case 'r': simple = '\r'; break;
      case 't': simple = '\t'; break;
      case 'u': {
        uint32_t cp;
        if (!hex4(cp)) return false;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') return fail("unpaired high surrogate");
          p_ += 2;
          uint32_t lo;
          if (!hex4(lo)) return false;
          if (lo < 0xDC00 || lo > 0xDFFF) return fail("invalid low surrogate");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
          return fail("unpaired low surrogate");
        }
        if (out) put_utf8(*out, cp);
        continue;
      }
      default:
        p_ = at;
        return fail("invalid escape: backslash followed by " + describe_char(at, end_));
    }
    if (out) *out += simple;
  }
}

bool Parser::string(std::string& out) {
  skip_ws();
  if (p_ >= end_ || *p_ != '"') return fail("expected a string");
  return string_impl(&out, nullptr, nullptr);
}

bool Parser::number(Number& n, bool want_double) {
  skip_ws();
  const char* start = p_;
  bool neg = false;
  if (p_ < end_ && *p_ == '-') {
    neg = true;
    ++p_;
  }
  if (p_ >= end_ || !(*p_ >= '0' && *p_ <= '9')) return fail("invalid number");
  if (*p_ == '0' && p_ + 1 < end_ && p_[1] >= '0' && p_[1] <= '9') return fail("leading zero in number");
  bool integral = true;
  uint64_t acc = 0;
  bool overflow = false;
  while (p_ < end_ && *p_ >= '0' && *p_ <= '9') {
    uint64_t d = static_cast<uint64_t>(*p_ - '0');
    if (acc > (UINT64_MAX - d) / 10) overflow = true;
    else acc = acc * 10 + d;
    ++p_;
  }
  if (p_ < end_ && *p_ == '.') {
    integral = false;
    ++p_;
    if (p_ >= end_ || !(*p_ >= '0' && *p_ <= '9')) return fail("invalid fraction");
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
  }
  if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
    integral = false;
    ++p_;
    if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
    if (p_ >= end_ || !(*p_ >= '0' && *p_ <= '9')) return fail("invalid exponent");
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
  }
  n.text = std::string_view(start, static_cast<size_t>(p_ - start));
  n.is_uint = integral && !neg && !overflow;
  n.uint = n.is_uint ? acc : 0;
  n.value = want_double ? std::strtod(std::string(n.text).c_str(), nullptr) : 0.0;
  return true;
}

Type Parser::peek_type() {
  skip_ws();
  if (p_ >= end_) return Type::Null;
  switch (*p_) {
    case '{': return Type::Object;
    case '[': return Type::Array;
    case '"': return Type::String;
    case 't':
    case 'f': return Type::Bool;
    case '-':
    case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9': return Type::Number;
    default: return Type::Null;
  }
}

bool Parser::value(Value& v, int depth) {
  if (depth > kMaxDepth) return fail("nesting deeper than 64 levels");
  skip_ws();
  if (p_ >= end_) return fail("unexpected end of input");
  char c = *p_;
  if (c == '{') {
    v.type = Type::Object;
    return object(depth, [&](std::string_view key) {
      v.object.emplace_back(std::string(key), Value());
      return value(v.object.back().second, depth + 1);
    });
  }
  if (c == '[') {
    v.type = Type::Array;
    return array(depth, [&](size_t) {
      v.array.emplace_back();
      return value(v.array.back(), depth + 1);
    });
  }
  if (c == '"') {
    v.type = Type::String;
    return string_impl(&v.string, nullptr, nullptr);
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
  if (c == '-' || (c >= '0' && c <= '9')) {
    Number n;
    if (!number(n, true)) return false;
    v.type = Type::Number;
    v.number = n.value;
    v.is_uint = n.is_uint;
    v.uint = n.uint;
    return true;
  }
  return unexpected();
}

bool Parser::skip(int depth) {
  if (depth > kMaxDepth) return fail("nesting deeper than 64 levels");
  skip_ws();
  if (p_ >= end_) return fail("unexpected end of input");
  char c = *p_;
  if (c == '{') return object(depth, [&](std::string_view) { return skip(depth + 1); });
  if (c == '[') return array(depth, [&](size_t) { return skip(depth + 1); });
  if (c == '"') return string_impl(nullptr, nullptr, nullptr);
  if (c == 't') return literal("true");
  if (c == 'f') return literal("false");
  if (c == 'n') return literal("null");
  if (c == '-' || (c >= '0' && c <= '9')) {
    Number n;
    return number(n, false);
  }
  return unexpected();
}

// -- tree ------------------------------------------------------------------------------------------
const Value* Value::find(const std::string& key) const {
  for (auto& kv : object)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

bool parse(const char* text, size_t size, Value& out, ParseError& err) {
  Parser ps(text, size);
  out = Value{};
  bool ok = ps.value(out, 0);
  if (ok && !ps.at_end()) ok = ps.fail("trailing characters after the JSON value");
  if (!ok) err = ps.error();
  return ok;
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
