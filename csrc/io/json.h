// A small, strict JSON reader for untrusted safetensors headers and shard indexes.
// Strict: no trailing commas, no comments, no duplicate keys, bounded nesting depth, and
// integers kept exact (a shape or offset is never routed through a double).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

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

  const Value* find(const std::string& key) const;
};

/// Why parsing failed and at which byte offset.
struct ParseError {
  size_t offset = 0;
  std::string what;
};

/// Parse `text` (must be a single JSON value, surrounded only by whitespace).
/// Returns false and fills `err` on failure. Does not validate UTF-8 (see is_valid_utf8).
bool parse(const char* text, size_t size, Value& out, ParseError& err);

/// True when [data, data+size) is well-formed UTF-8 (no overlongs, no surrogates, <= U+10FFFF).
/// On failure, `bad_offset` (if given) receives the offset of the first invalid byte.
bool is_valid_utf8(const char* data, size_t size, size_t* bad_offset = nullptr);

const char* type_name(Type t);

}  // namespace pysafe::json
