// The safetensors format, read strictly (engine.md §2). Untrusted bytes are validated here,
// in a fixed order, before any offset is trusted; every failure is a HeaderError with its
// own code and a message naming the file, the tensor, and expected vs found.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace pysafe {

/// Every dtype of the safetensors format (0.8): F6_* and F4 are packed below a byte per element
/// (4 elements in 3 bytes, 2 in 1), C64 is a pair of F32 (real, imaginary).
enum class DType {
  F64, F32, F16, BF16, F8_E4M3, F8_E5M2, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, F6_E2M3, F6_E3M2, F4, C64,
  I64, I32, I16, I8, U64, U32, U16, U8, BOOL
};

/// Bits of one element.
size_t dtype_bits(DType d);
/// Bytes of `n` elements: n * bits / 8. For the sub-byte dtypes n * bits must be a multiple of 8
/// (the header check refuses other shapes, as the format's own reader does).
inline uint64_t dtype_nbytes(DType d, uint64_t n) { return n * dtype_bits(d) / 8; }
/// Every dtype name, space separated, for messages.
const char* dtype_names();
/// The format's spelling ("BF16"); inverse of parse_dtype.
const char* dtype_name(DType d);
/// Parse the format's spelling; returns false for an unknown dtype.
bool parse_dtype(const std::string& s, DType& out);

/// Header-validation conditions, one code each (the order in which they are checked).
namespace header_code {
constexpr const char* kTooSmall = "file_too_small";            // < 8 bytes
constexpr const char* kHeaderTooLarge = "header_too_large";    // N above kMaxHeaderBytes
constexpr const char* kHeaderOverflow = "header_overflow";     // 8 + N overflows
constexpr const char* kHeaderOutOfFile = "header_out_of_file"; // 8 + N > file size
constexpr const char* kInvalidUtf8 = "invalid_utf8";
constexpr const char* kInvalidJson = "invalid_json";
constexpr const char* kNotObject = "not_object";
constexpr const char* kInvalidEntry = "invalid_entry";         // entry not {dtype, shape, data_offsets}
constexpr const char* kInvalidMetadata = "invalid_metadata";   // __metadata__ not a map of strings
constexpr const char* kUnknownDtype = "unknown_dtype";
constexpr const char* kInvalidShape = "invalid_shape";
constexpr const char* kSizeMismatch = "size_mismatch";         // elements x dtype size != end - begin
constexpr const char* kOffsetsNotContiguous = "offsets_not_contiguous";
constexpr const char* kDataSizeMismatch = "data_size_mismatch"; // data section != rest of file
}  // namespace header_code

/// The format's own reader caps the header at 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

/// One tensor of a header. begin/end are relative to the data section (as in the file).
struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;

  uint64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

/// A validated header. Entries are in data-offset order.
struct Header {
  std::vector<TensorEntry> entries;
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  ///< 8 + N: absolute file offset of the data section
  uint64_t file_size = 0;

  /// Index of `name` in entries, or -1: O(log n) through `by_name`.
  long find(const std::string& name) const;
  /// Indices of entries sorted by name (built by parse_header_json).
  std::vector<uint32_t> by_name;
};

/// Validate a header given its bytes. `n_declared` is the 8-byte length field, `file_size` the
/// size of the whole file, `json` points to the N header bytes (already bounds-checked by the
/// caller). `path` is used for messages only.
Header parse_header_json(const std::string& path, const char* json, uint64_t n_declared, uint64_t file_size);

/// Read and validate the header of a file without mapping its data (pread of 8 + N bytes).
Header read_header(const std::string& path);

/// A read-only private memory map of a whole file (MAP_PRIVATE|PROT_READ: never writes back).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  /// Hint the kernel: "willneed" (prefetch), "dontneed" (drop our resident pages; the page cache
  /// keeps them), "sequential". Offsets are absolute; rounded out to page boundaries.
  void advise(uint64_t offset, uint64_t length, const std::string& how) const;

 private:
  std::string path_;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

/// An open safetensors file: validated header plus a mapping of the whole file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  const Header& header() const { return header_; }
  const std::string& path() const { return map_->path(); }
  /// Entry by name; throws a KeyError-kind error naming the file when missing.
  const TensorEntry& entry(const std::string& name) const;
  /// Pointer to the first byte of a tensor's data inside the mapping.
  const uint8_t* data(const TensorEntry& e) const { return map_->data() + header_.data_start + e.begin; }
  const MappedFile& mapping() const { return *map_; }

 private:
  Header header_;
  std::shared_ptr<MappedFile> map_;
};

}  // namespace pysafe
