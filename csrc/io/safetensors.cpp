#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "core/error.h"
#include "io/json.h"

namespace pysafe {

namespace {

struct DTypeInfo {
  DType d;
  const char* name;
  size_t bits;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 64},          {DType::F32, "F32", 32},
    {DType::F16, "F16", 16},          {DType::BF16, "BF16", 16},
    {DType::F8_E4M3, "F8_E4M3", 8},   {DType::F8_E5M2, "F8_E5M2", 8},
    {DType::F8_E8M0, "F8_E8M0", 8},   {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {DType::F6_E2M3, "F6_E2M3", 6},   {DType::F6_E3M2, "F6_E3M2", 6},
    {DType::F4, "F4", 4},             {DType::C64, "C64", 64},
    {DType::I64, "I64", 64},          {DType::I32, "I32", 32},
    {DType::I16, "I16", 16},          {DType::I8, "I8", 8},
    {DType::U64, "U64", 64},          {DType::U32, "U32", 32},
    {DType::U16, "U16", 16},          {DType::U8, "U8", 8},
    {DType::BOOL, "BOOL", 8},
};

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::string sys_error(int err) { return std::strerror(err); }

// Checked a * b for uint64; false on overflow.
bool mul_ok(uint64_t a, uint64_t b, uint64_t& out) {
  if (a != 0 && b > UINT64_MAX / a) return false;
  out = a * b;
  return true;
}

// A number literal as the user wrote it (an integer stays an integer, whatever its size); a very
// long literal is shown by its ends, saying how many digits were left out.
std::string literal_str(std::string_view text) {
  constexpr size_t kShow = 48;
  if (text.size() <= kShow) return std::string(text);
  return std::string(text.substr(0, 24)) + "..." + std::string(text.substr(text.size() - 16)) + " (a " +
         std::to_string(text.size()) + "-character number)";
}

}  // namespace

size_t dtype_bits(DType d) {
  for (auto& i : kDTypes)
    if (i.d == d) return i.bits;
  PYSAFE_ASSERT(false);
  return 0;
}

const char* dtype_name(DType d) {
  for (auto& i : kDTypes)
    if (i.d == d) return i.name;
  PYSAFE_ASSERT(false);
  return "?";
}

const char* dtype_names() {
  static const std::string all = [] {
    std::string s;
    for (auto& i : kDTypes) s += (s.empty() ? "" : " ") + std::string(i.name);
    return s;
  }();
  return all.c_str();
}

bool parse_dtype(const std::string& s, DType& out) {
  for (auto& i : kDTypes)
    if (s == i.name) {
      out = i.d;
      return true;
    }
  return false;
}

uint64_t TensorEntry::numel() const {
  uint64_t n = 1;
  for (auto d : shape) n *= static_cast<uint64_t>(d);  // validated against overflow at parse time
  return n;
}

long Header::find(const std::string& name) const {
  auto it = std::lower_bound(by_name.begin(), by_name.end(), name,
                             [this](uint32_t i, const std::string& n) { return entries[i].name < n; });
  if (it != by_name.end() && entries[*it].name == name) return static_cast<long>(*it);
  return -1;
}

namespace {

// What the header says about one tensor, gathered while streaming through its JSON object; only
// what the checks below need is kept (a value under an unknown key is syntax-checked, not stored).
struct RawEntry {
  json::Type type = json::Type::Null;  // of the tensor's value
  bool has_dtype = false, has_shape = false, has_offsets = false;
  bool has_unexpected = false;
  std::string unexpected;              // the first unexpected key
  json::Type dtype_type = json::Type::Null;
  std::string dtype;
  json::Type shape_type = json::Type::Null;
  std::vector<int64_t> shape;          // the valid dimensions before the first bad one
  bool shape_bad = false;              // a dimension that is not a non-negative int64
  json::Type bad_type = json::Type::Null;
  std::string bad_text;
  json::Type offsets_type = json::Type::Null;
  size_t offsets_count = 0;
  bool offsets_uint[2] = {false, false};
  uint64_t offsets[2] = {0, 0};
};

// The checks of one tensor entry, in their fixed order (engine order: entry form, dtype, shape,
// offsets, byte count). Throws the first failure.
TensorEntry make_entry(const std::string& path, std::string&& name_in, RawEntry& r) {
  using namespace header_code;
  // printable() only runs when a check fails (PYSAFE_CHECK builds its message lazily)
  PYSAFE_CHECK(r.type == json::Type::Object, Header, kInvalidEntry, path, ": tensor '", printable(name_in),
               "' must be an object with dtype, shape, data_offsets; found a JSON ", json::type_name(r.type));
  PYSAFE_CHECK(r.has_dtype && r.has_shape && r.has_offsets, Header, kInvalidEntry, path, ": tensor '", printable(name_in),
               "' needs keys dtype, shape and data_offsets; missing ",
               !r.has_dtype ? "dtype" : (!r.has_shape ? "shape" : "data_offsets"));
  PYSAFE_CHECK(!r.has_unexpected, Header, kInvalidEntry, path, ": tensor '", printable(name_in), "' has unexpected key '",
               printable(r.unexpected), "'");
  TensorEntry e;
  PYSAFE_CHECK(r.dtype_type == json::Type::String, Header, kUnknownDtype, path, ": tensor '", printable(name_in),
               "' dtype must be a string, found a JSON ", json::type_name(r.dtype_type));
  PYSAFE_CHECK(parse_dtype(r.dtype, e.dtype), Header, kUnknownDtype, path, ": tensor '", printable(name_in),
               "' has unknown dtype '", printable(r.dtype), "' (expected one of ", dtype_names(), ")");
  PYSAFE_CHECK(r.shape_type == json::Type::Array, Header, kInvalidShape, path, ": tensor '", printable(name_in),
               "' shape must be an array, found a JSON ", json::type_name(r.shape_type));
  uint64_t numel = 1;
  for (size_t i = 0; i < r.shape.size(); ++i)
    PYSAFE_CHECK(mul_ok(numel, static_cast<uint64_t>(r.shape[i]), numel), Header, kSizeMismatch, path,
                 ": tensor '", printable(name_in), "' shape ",
                 shape_str(std::vector<int64_t>(r.shape.begin(), r.shape.begin() + static_cast<long>(i) + 1)),
                 " overflows the element count");
  PYSAFE_CHECK(!r.shape_bad, Header, kInvalidShape, path, ": tensor '", printable(name_in),
               "' shape must hold non-negative integers below 2^63; found ",
               r.bad_type == json::Type::Number ? literal_str(r.bad_text) : json::type_name(r.bad_type));
  PYSAFE_CHECK(r.offsets_type == json::Type::Array && r.offsets_count == 2 && r.offsets_uint[0] && r.offsets_uint[1],
               Header, kInvalidEntry, path, ": tensor '", printable(name_in),
               "' data_offsets must be [begin, end] with non-negative integers");
  e.begin = r.offsets[0];
  e.end = r.offsets[1];
  PYSAFE_CHECK(e.begin <= e.end, Header, kOffsetsNotContiguous, path, ": tensor '", printable(name_in),
               "' has data_offsets [", e.begin, ", ", e.end, "] with begin > end");
  // 8. Checked multiply: elements x dtype size == end - begin (whole bytes for sub-byte dtypes).
  const size_t bits = dtype_bits(e.dtype);
  uint64_t nbits = 0;
  PYSAFE_CHECK(mul_ok(numel, bits, nbits), Header, kSizeMismatch, path, ": tensor '", printable(name_in), "' shape ",
               shape_str(r.shape), " overflows the byte count");
  PYSAFE_CHECK(nbits % 8 == 0, Header, kSizeMismatch, path, ": tensor '", printable(name_in), "' has shape ", shape_str(r.shape),
               " and dtype ", r.dtype, ": ", numel, " elements of ", bits, " bits do not fill whole bytes");
  const uint64_t nbytes = nbits / 8;
  PYSAFE_CHECK(nbytes == e.end - e.begin, Header, kSizeMismatch, path, ": tensor '", printable(name_in),
               "' has shape ", shape_str(r.shape), " and dtype ", r.dtype, " (", nbytes,
               " bytes) but data_offsets [", e.begin, ", ", e.end, "] span ", e.end - e.begin, " bytes");
  e.name = std::move(name_in);
  e.shape = std::move(r.shape);
  return e;
}

}  // namespace

Header parse_header_json(const std::string& path, const char* json_bytes, uint64_t n, uint64_t file_size) {
  using namespace header_code;
  // 5. UTF-8, then a JSON object.
  size_t bad = 0;
  PYSAFE_CHECK(json::is_valid_utf8(json_bytes, n, &bad), Header, kInvalidUtf8, path,
               ": header is not valid UTF-8: invalid byte 0x", std::hex, static_cast<unsigned>(
                   static_cast<unsigned char>(json_bytes[bad])), std::dec, " at header byte ", bad, " of ", n);

  // One streaming pass: the syntax of the whole document is checked (it takes precedence, as a
  // JSON error), while each tensor entry is checked as soon as it is read; the first entry
  // failure is held back until the syntax is known to be good. Nothing under a key the format
  // does not use is stored, so memory stays a small multiple of the header.
  json::Parser ps(json_bytes, static_cast<size_t>(n));
  Header h;
  h.data_start = 8 + n;
  h.file_size = file_size;
  std::unique_ptr<Error> held;  // the first semantic failure, in document order
  auto hold = [&](const Error& e) {
    if (!held) held = std::make_unique<Error>(e);
  };

  auto read_tensor = [&](RawEntry& r, int depth) {
    r.type = ps.peek_type();
    if (r.type != json::Type::Object) return ps.skip(depth);
    return ps.object(depth, [&](std::string_view key) {
      const int d = depth + 1;
      if (key == "dtype") {
        r.has_dtype = true;
        r.dtype_type = ps.peek_type();
        if (r.dtype_type == json::Type::String) return ps.string(r.dtype);
        return ps.skip(d);
      }
      if (key == "shape") {
        r.has_shape = true;
        r.shape_type = ps.peek_type();
        if (r.shape_type != json::Type::Array) return ps.skip(d);
        return ps.array(d, [&](size_t) {
          json::Type t = ps.peek_type();
          if (t != json::Type::Number || r.shape_bad) {
            if (!r.shape_bad) {
              r.shape_bad = true;
              r.bad_type = t;
            }
            return ps.skip(d + 1);
          }
          json::Number num;
          if (!ps.number(num, false)) return false;
          if (num.is_uint && num.uint <= static_cast<uint64_t>(INT64_MAX)) {
            r.shape.push_back(static_cast<int64_t>(num.uint));
          } else {
            r.shape_bad = true;
            r.bad_type = json::Type::Number;
            r.bad_text = std::string(num.text);
          }
          return true;
        });
      }
      if (key == "data_offsets") {
        r.has_offsets = true;
        r.offsets_type = ps.peek_type();
        if (r.offsets_type != json::Type::Array) return ps.skip(d);
        return ps.array(d, [&](size_t i) {
          r.offsets_count = i + 1;
          if (i >= 2 || ps.peek_type() != json::Type::Number) return ps.skip(d + 1);
          json::Number num;
          if (!ps.number(num, false)) return false;
          r.offsets_uint[i] = num.is_uint;
          r.offsets[i] = num.uint;
          return true;
        });
      }
      if (!r.has_unexpected) {
        r.has_unexpected = true;
        r.unexpected = std::string(key);
      }
      return ps.skip(d);
    });
  };

  auto read_metadata = [&](int depth) {
    json::Type t = ps.peek_type();
    if (t != json::Type::Object) {
      if (!held)
        hold(Error(ErrorKind::Header, kInvalidMetadata,
                   detail::concat(path, ": __metadata__ must be an object of strings, found a JSON ",
                                  json::type_name(t))));
      return ps.skip(depth);
    }
    return ps.object(depth, [&](std::string_view key) {
      json::Type vt = ps.peek_type();
      if (vt != json::Type::String) {
        if (!held)
          hold(Error(ErrorKind::Header, kInvalidMetadata,
                     detail::concat(path, ": __metadata__['", printable(key), "'] must be a string, found a JSON ",
                                    json::type_name(vt))));
        return ps.skip(depth + 1);
      }
      std::string v;
      if (!ps.string(v)) return false;
      if (!held) h.metadata[std::string(key)] = std::move(v);
      return true;
    });
  };

  json::Type root_type = ps.peek_type();
  bool ok;
  if (root_type != json::Type::Object) {
    ok = ps.skip(0);
  } else {
    ok = ps.object(0, [&](std::string_view key) {
      if (key == "__metadata__") return read_metadata(1);
      if (held) return ps.skip(1);  // an earlier entry failed: only the syntax matters now
      RawEntry r;
      if (!read_tensor(r, 1)) return false;
      try {
        h.entries.push_back(make_entry(path, std::string(key), r));
      } catch (const Error& e) {
        hold(e);
      }
      return true;
    });
  }
  if (ok && !ps.at_end()) ok = ps.fail("trailing characters after the JSON value");
  PYSAFE_CHECK(ok, Header, kInvalidJson, path, ": header is not valid JSON: ", ps.error().what, " at header byte ",
               ps.error().offset);
  PYSAFE_CHECK(root_type == json::Type::Object, Header, kNotObject, path,
               ": header must be a JSON object, found a JSON ", json::type_name(root_type));
  if (held) throw *held;

  // 7. Offsets sorted, contiguous from 0, non-overlapping.
  std::stable_sort(h.entries.begin(), h.entries.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expect = 0;
  const TensorEntry* prev = nullptr;
  for (auto& e : h.entries) {
    PYSAFE_CHECK(e.begin == expect, Header, kOffsetsNotContiguous, path, ": tensor '", printable(e.name),
                 "' data_offsets begin at ", e.begin, " but ",
                 prev ? "the previous tensor '" + printable(prev->name) + "' ends at "
                      : std::string("the data section starts at "),
                 expect, e.begin < expect ? " (overlap)" : " (gap)");
    expect = e.end;
    prev = &e;
  }
  // 9. The data section covers the rest of the file exactly.
  uint64_t data_len = file_size - h.data_start;
  PYSAFE_CHECK(expect == data_len, Header, kDataSizeMismatch, path, ": tensors end at data offset ", expect,
               " but the data section holds ", data_len, " bytes (file size ", file_size, ", header ", n,
               " bytes)", expect > data_len ? "; the file looks truncated" : "; trailing bytes after the last tensor");
  h.by_name.resize(h.entries.size());
  for (size_t i = 0; i < h.entries.size(); ++i) h.by_name[i] = static_cast<uint32_t>(i);
  std::sort(h.by_name.begin(), h.by_name.end(),
            [&h](uint32_t a, uint32_t b) { return h.entries[a].name < h.entries[b].name; });
  return h;
}

namespace {

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

uint64_t open_and_size(const std::string& path, Fd& f) {
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) {
    int err = errno;
    PYSAFE_CHECK(err != ENOENT, FileNotFound, "not_found", path, ": no such file");
    PYSAFE_CHECK(false, Value, "open_failed", path, ": cannot open: ", sys_error(err));
  }
  struct stat st;
  PYSAFE_CHECK(::fstat(f.fd, &st) == 0, Value, "stat_failed", path, ": cannot stat: ", sys_error(errno));
  PYSAFE_CHECK(S_ISREG(st.st_mode), Value, "not_a_file", path, ": not a regular file");
  return static_cast<uint64_t>(st.st_size);
}

bool pread_all(int fd, void* buf, size_t n, uint64_t off) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return true;
}

uint64_t header_length(const std::string& path, const uint8_t* first8, uint64_t file_size) {
  using namespace header_code;
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | first8[i];  // little-endian u64
  PYSAFE_CHECK(n <= kMaxHeaderBytes, Header, kHeaderTooLarge, path, ": header length field says ", n,
               " bytes, above the cap of ", kMaxHeaderBytes, " bytes (not a safetensors file?)");
  PYSAFE_CHECK(n <= UINT64_MAX - 8, Header, kHeaderOverflow, path, ": header length ", n, " overflows");
  PYSAFE_CHECK(8 + n <= file_size, Header, kHeaderOutOfFile, path, ": header length field says ", n,
               " bytes but the file holds only ", file_size, " bytes (truncated file?)");
  return n;
}

}  // namespace

Header read_header(const std::string& path) {
  Fd f;
  uint64_t size = open_and_size(path, f);
  PYSAFE_CHECK(size >= 8, Header, header_code::kTooSmall, path, ": file is ", size,
               " bytes; a safetensors file has at least 8 (the header length)");
  uint8_t first8[8];
  PYSAFE_CHECK(pread_all(f.fd, first8, 8, 0), Value, "read_failed", path, ": read failed");
  uint64_t n = header_length(path, first8, size);
  std::string buf(n, '\0');
  PYSAFE_CHECK(pread_all(f.fd, buf.data(), n, 8), Value, "read_failed", path, ": read failed");
  return parse_header_json(path, buf.data(), n, size);
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
  Fd f;
  size_ = open_and_size(path, f);
  PYSAFE_CHECK(size_ >= 8, Header, header_code::kTooSmall, path, ": file is ", size_,
               " bytes; a safetensors file has at least 8 (the header length)");
  // Private and read-only: nothing can ever reach the user's file.
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, f.fd, 0);
  PYSAFE_CHECK(p != MAP_FAILED, Value, "mmap_failed", path, ": mmap of ", size_, " bytes failed: ",
               sys_error(errno));
  data_ = static_cast<uint8_t*>(p);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
}

void MappedFile::advise(uint64_t offset, uint64_t length, const std::string& how) const {
  if (length == 0 || offset >= size_) return;
  length = std::min(length, size_ - offset);
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t b = offset / page * page;
  uint64_t e = offset + length;
  int advice;
  if (how == "willneed") advice = MADV_WILLNEED;
  else if (how == "dontneed") advice = MADV_DONTNEED;
  else if (how == "sequential") advice = MADV_SEQUENTIAL;
  else PYSAFE_CHECK(false, Value, "bad_advice", "advise: unknown advice '", how,
                    "' (expected willneed, dontneed or sequential)");
  // Advice is only a hint: failures are ignored on purpose.
  (void)::madvise(data_ + b, e - b, advice);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : map_(std::make_shared<MappedFile>(path)) {
  uint64_t n = header_length(path, map_->data(), map_->size());
  header_ = parse_header_json(path, reinterpret_cast<const char*>(map_->data()) + 8, n, map_->size());
}

const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  long i = header_.find(name);
  PYSAFE_CHECK(i >= 0, TensorNotFound, "tensor_not_found", path(), ": no tensor named '", printable(name), "'");
  return header_.entries[static_cast<size_t>(i)];
}

}  // namespace pysafe
