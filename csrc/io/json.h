// A small, strict JSON reader for untrusted safetensors headers and shard indexes.
// Strict: no trailing commas, no comments, no duplicate keys, bounded nesting depth, and
// integers kept exact (a shape or offset is never routed through a double).
//
// Two ways in: parse() builds a tree (fine for small documents such as a shard index), and
// Parser is a pull parser that a reader drives member by member, keeping only what it needs and
// checking the syntax of everything else with skip() without building anything. Both run in
// time linear in the input (duplicate keys are found with a hash table, not by rescanning).
#pragma once

#include <cstdint>
#include <forward_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/error.h"

namespace pysafe::json {

enum class Type { Null, Bool, Number, String, Array, Object };

/// One parsed JSON value. Objects keep insertion order (pairs) for faithful error messages.
struct Value {
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  bool is_uint = false;   ///< number is a non-negative integer literal that fits in uint64
  uint64_t uint = 0;      ///< its exact value when is_uint
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;

  /// Linear lookup (objects here are looked up by a handful of fixed keys).
  const Value* find(const std::string& key) const;
};

/// Why parsing failed and at which byte offset.
struct ParseError {
  size_t offset = 0;
  std::string what;
};

/// A number literal. `text` views the literal as written (for messages: exact, never a double).
struct Number {
  bool is_uint = false;  ///< a non-negative integer literal that fits in uint64
  uint64_t uint = 0;
  double value = 0.0;    ///< only filled when asked for (parse() does; the header reader does not)
  std::string_view text;
};

/// The keys of one object, to refuse duplicates: a linear scan for a few keys, then an
/// open-addressing hash table of indices (about 24 bytes per key, expected O(1) per insert).
class KeySet {
 public:
  /// False when `key` was already inserted. `stable`: the view outlives the set (it points into
  /// the document); otherwise the set keeps its own copy.
  bool insert(std::string_view key, bool stable);

 private:
  void rehash(size_t cap);
  std::vector<std::string_view> keys_;
  std::vector<uint32_t> table_;  // index + 1 into keys_, 0 = empty
  std::forward_list<std::string> owned_;  // node-stable, and no allocation while empty
};

constexpr int kMaxDepth = 64;

/// A strict pull parser over [text, text + size). Every method returns false on a syntax error,
/// after which `error()` says what and where; the parser must not be used further.
class Parser {
 public:
  Parser(const char* text, size_t size) : p_(text), begin_(text), end_(text + size) {}

  const ParseError& error() const { return err_; }
  size_t offset() const { return static_cast<size_t>(p_ - begin_); }
  bool fail(const std::string& what);

  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  /// After whitespace: true when the input is exhausted.
  bool at_end() {
    skip_ws();
    return p_ >= end_;
  }
  /// The type of the next value, judged by its first byte (after whitespace); Null when that byte
  /// starts no value (value() or skip() then reports the error).
  Type peek_type();

  /// One whole value as a tree (depth: nesting level of this value; the root is 0).
  bool value(Value& v, int depth);
  /// One whole value, syntax-checked (duplicate keys included) without building anything.
  bool skip(int depth);
  /// A string value into `out` (decoded).
  bool string(std::string& out);
  /// A number value. `want_double`: also fill Number::value.
  bool number(Number& n, bool want_double);

  /// Walk an object member by member: `member(key)` is called with the parser at the member's
  /// value and must consume exactly that value (at depth + 1). `key` is only valid during the call.
  template <typename F>
  bool object(int depth, F&& member);
  /// Walk an array: `element(index)` must consume one value (at depth + 1).
  template <typename F>
  bool array(int depth, F&& element);

 private:
  bool literal(const char* word);
  bool hex4(uint32_t& v);
  // A string at p_ (opening quote). `out` may be null (syntax only). `raw` views the bytes between
  // the quotes; `escaped` says whether they hold an escape (then raw != the decoded string).
  bool string_impl(std::string* out, std::string_view* raw, bool* escaped);
  bool unexpected();

  const char* p_;
  const char* begin_;
  const char* end_;
  ParseError err_;
};

/// Parse `text` (must be a single JSON value, surrounded only by whitespace).
/// Returns false and fills `err` on failure. Does not validate UTF-8 (see is_valid_utf8).
bool parse(const char* text, size_t size, Value& out, ParseError& err);

/// True when [data, data+size) is well-formed UTF-8 (no overlongs, no surrogates, <= U+10FFFF).
/// On failure, `bad_offset` (if given) receives the offset of the first invalid byte.
bool is_valid_utf8(const char* data, size_t size, size_t* bad_offset = nullptr);

const char* type_name(Type t);

// -- templates -------------------------------------------------------------------------------------
template <typename F>
bool Parser::object(int depth, F&& member) {
  if (depth > kMaxDepth) return fail("nesting deeper than 64 levels");
  skip_ws();
  if (p_ >= end_ || *p_ != '{') return fail("expected '{'");
  ++p_;
  skip_ws();
  if (p_ < end_ && *p_ == '}') {
    ++p_;
    return true;
  }
  KeySet keys;
  std::string decoded;
  while (true) {
    skip_ws();
    if (p_ >= end_ || *p_ != '"') return fail("expected a string key");
    std::string_view raw;
    bool escaped = false;
    decoded.clear();
    if (!string_impl(&decoded, &raw, &escaped)) return false;
    std::string_view key = escaped ? std::string_view(decoded) : raw;
    if (!keys.insert(key, !escaped)) return fail("duplicate key '" + ::pysafe::printable(key) + "'");
    skip_ws();
    if (p_ >= end_ || *p_ != ':') return fail("expected ':'");
    ++p_;
    if (!member(key)) return false;
    skip_ws();
    if (p_ < end_ && *p_ == ',') {
      ++p_;
      continue;
    }
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      return true;
    }
    return fail("expected ',' or '}'");
  }
}

template <typename F>
bool Parser::array(int depth, F&& element) {
  if (depth > kMaxDepth) return fail("nesting deeper than 64 levels");
  skip_ws();
  if (p_ >= end_ || *p_ != '[') return fail("expected '['");
  ++p_;
  skip_ws();
  if (p_ < end_ && *p_ == ']') {
    ++p_;
    return true;
  }
  for (size_t i = 0;; ++i) {
    if (!element(i)) return false;
    skip_ws();
    if (p_ < end_ && *p_ == ',') {
      ++p_;
      continue;
    }
    if (p_ < end_ && *p_ == ']') {
      ++p_;
      return true;
    }
    return fail("expected ',' or ']'");
  }
}

}  // namespace pysafe::json
