// Two tiers of errors, as in faiss: PYSAFE_CHECK for bad input (typed, carries a message
// naming the file/tensor, what was expected and what was found), PYSAFE_ASSERT for our own
// invariants (InternalError with file:line). Nothing here ever aborts the process.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace pysafe {

/// Which Python exception class (pysafe.errors) an Error maps to.
enum class ErrorKind { Header, ShardIndex, ShapeMismatch, Value, FileNotFound, TensorNotFound, Internal, Device };

/// Base of every exception thrown by the core. `code` is a stable machine-readable tag
/// (for header errors: one per validation condition, see safetensors.h).
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string code, const std::string& msg)
      : std::runtime_error(msg), kind_(kind), code_(std::move(code)), message_(msg) {}
  ErrorKind kind() const { return kind_; }
  const std::string& code() const { return code_; }
  /// The whole message (what() is a C string and would stop at an embedded NUL).
  const std::string& message() const { return message_; }

 private:
  ErrorKind kind_;
  std::string code_;
  std::string message_;
};

/// `s` made safe to echo in a one-line message: valid UTF-8 passes through, except control
/// characters (C0, DEL, C1, line/paragraph separators, bidi overrides), which become \uXXXX as in
/// JSON; bytes that are not valid UTF-8 become \xNN. Nothing is dropped or cut.
inline std::string printable(std::string_view s) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  auto u_escape = [&](uint32_t cp) {
    out += "\\u";
    for (int sh = 12; sh >= 0; sh -= 4) out += hex[(cp >> sh) & 0xF];
  };
  size_t i = 0;
  while (i < n) {
    unsigned char c = b[i];
    if (c < 0x80) {
      if (c < 0x20 || c == 0x7F) u_escape(c);
      else out += static_cast<char>(c);
      ++i;
      continue;
    }
    int k = (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 0;
    uint32_t cp = k == 1 ? (c & 0x1Fu) : k == 2 ? (c & 0x0Fu) : (c & 0x07u);
    bool ok = k > 0;
    for (int j = 1; ok && j <= k; ++j) {
      if (i + static_cast<size_t>(j) >= n || (b[i + j] & 0xC0) != 0x80) ok = false;
      else cp = (cp << 6) | (b[i + j] & 0x3Fu);
    }
    if (ok && ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) || cp > 0x10FFFF ||
               (cp >= 0xD800 && cp <= 0xDFFF)))
      ok = false;
    if (!ok) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 0xF];
      ++i;
      continue;
    }
    if ((cp >= 0x80 && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029 || (cp >= 0x202A && cp <= 0x202E) ||
        (cp >= 0x2066 && cp <= 0x2069) || cp == 0x200E || cp == 0x200F || cp == 0x061C || cp == 0xFEFF)
      u_escape(cp);
    else
      out.append(s.data() + i, static_cast<size_t>(k) + 1);
    i += static_cast<size_t>(k) + 1;
  }
  return out;
}

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  append(os, args...);
  return os.str();
}
}  // namespace detail

}  // namespace pysafe

/// Bad input: throw a typed pysafe::Error with a message built from the remaining arguments.
#define PYSAFE_CHECK(cond, kind, code, ...)                                                   \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      throw ::pysafe::Error(::pysafe::ErrorKind::kind, code, ::pysafe::detail::concat(__VA_ARGS__)); \
    }                                                                                         \
  } while (0)

/// Our own invariant: a failure is a pysafe bug, reported as InternalError with file:line.
#define PYSAFE_ASSERT(cond)                                                                    \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      throw ::pysafe::Error(::pysafe::ErrorKind::Internal, "internal",                        \
                            ::pysafe::detail::concat(__FILE__, ":", __LINE__, ": assertion '", \
                                                     #cond, "' failed; this is a pysafe bug"));  \
    }                                                                                          \
  } while (0)
