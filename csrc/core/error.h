// Two tiers of errors, as in faiss: PYSAFE_CHECK for bad input (typed, carries a message
// naming the file/tensor, what was expected and what was found), PYSAFE_ASSERT for our own
// invariants (InternalError with file:line). Nothing here ever aborts the process.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace pysafe {

/// Which Python exception class (pysafe.errors) an Error maps to.
enum class ErrorKind { Header, ShardIndex, ShapeMismatch, Value, FileNotFound, TensorNotFound, Internal };

/// Base of every exception thrown by the core. `code` is a stable machine-readable tag
/// (for header errors: one per validation condition, see safetensors.h).
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string code, const std::string& msg)
      : std::runtime_error(msg), kind_(kind), code_(std::move(code)) {}
  ErrorKind kind() const { return kind_; }
  const std::string& code() const { return code_; }

 private:
  ErrorKind kind_;
  std::string code_;
};

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
