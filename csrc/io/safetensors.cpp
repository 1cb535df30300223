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
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8},        {DType::F32, "F32", 4},        {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},      {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::I64, "I64", 8},        {DType::I32, "I32", 4},        {DType::I16, "I16", 2},
    {DType::I8, "I8", 1},          {DType::U64, "U64", 8},        {DType::U32, "U32", 4},
    {DType::U16, "U16", 2},        {DType::U8, "U8", 1},          {DType::BOOL, "BOOL", 1},
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

// A JSON number as the user wrote it: "-1" rather than "-1.000000".
std::string number_str(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

// Checked a * b for uint64; false on overflow.
bool mul_ok(uint64_t a, uint64_t b, uint64_t& out) {
  if (a != 0 && b > UINT64_MAX / a) return false;
  out = a * b;
  return true;
}

}  // namespace

size_t dtype_size(DType d) {
  for (auto& i : kDTypes)
    if (i.d == d) return i.size;
  PYSAFE_ASSERT(false);
  return 0;
}

const char* dtype_name(DType d) {
  for (auto& i : kDTypes)
    if (i.d == d) return i.name;
  PYSAFE_ASSERT(false);
  return "?";
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
  for (size_t i = 0; i < entries.size(); ++i)
    if (entries[i].name == name) return static_cast<long>(i);
  return -1;
}

Header parse_header_json(const std::string& path, const char* json_bytes, uint64_t n, uint64_t file_size) {
  using namespace header_code;
  // 5. UTF-8, then a JSON object.
  size_t bad = 0;
  PYSAFE_CHECK(json::is_valid_utf8(json_bytes, n, &bad), Header, kInvalidUtf8, path,
               ": header is not valid UTF-8: invalid byte 0x", std::hex, static_cast<unsigned>(
                   static_cast<unsigned char>(json_bytes[bad])), std::dec, " at header byte ", bad, " of ", n);
  json::Value root;
  json::ParseError perr;
  PYSAFE_CHECK(json::parse(json_bytes, n, root, perr), Header, kInvalidJson, path,
               ": header is not valid JSON: ", perr.what, " at header byte ", perr.offset);
  PYSAFE_CHECK(root.type == json::Type::Object, Header, kNotObject, path,
               ": header must be a JSON object, found a JSON ", json::type_name(root.type));

  Header h;
  h.data_start = 8 + n;
  h.file_size = file_size;
  for (auto& kv : root.object) {
    const std::string& name = kv.first;
    const json::Value& v = kv.second;
    if (name == "__metadata__") {
      PYSAFE_CHECK(v.type == json::Type::Object, Header, kInvalidMetadata, path,
                   ": __metadata__ must be an object of strings, found a JSON ", json::type_name(v.type));
      for (auto& m : v.object) {
        PYSAFE_CHECK(m.second.type == json::Type::String, Header, kInvalidMetadata, path,
                     ": __metadata__['", m.first, "'] must be a string, found a JSON ",
                     json::type_name(m.second.type));
        h.metadata[m.first] = m.second.string;
      }
      continue;
    }
    PYSAFE_CHECK(v.type == json::Type::Object, Header, kInvalidEntry, path, ": tensor '", name,
                 "' must be an object with dtype, shape, data_offsets; found a JSON ", json::type_name(v.type));
    const json::Value* jd = v.find("dtype");
    const json::Value* js = v.find("shape");
    const json::Value* jo = v.find("data_offsets");
    PYSAFE_CHECK(jd && js && jo, Header, kInvalidEntry, path, ": tensor '", name,
                 "' needs keys dtype, shape and data_offsets; missing ",
                 !jd ? "dtype" : (!js ? "shape" : "data_offsets"));
    for (auto& f : v.object)
      PYSAFE_CHECK(f.first == "dtype" || f.first == "shape" || f.first == "data_offsets", Header,
                   kInvalidEntry, path, ": tensor '", name, "' has unexpected key '", f.first, "'");
    TensorEntry e;
    e.name = name;
    // 6. Known dtype, non-negative integer shape.
    PYSAFE_CHECK(jd->type == json::Type::String, Header, kUnknownDtype, path, ": tensor '", name,
                 "' dtype must be a string, found a JSON ", json::type_name(jd->type));
    PYSAFE_CHECK(parse_dtype(jd->string, e.dtype), Header, kUnknownDtype, path, ": tensor '", name,
                 "' has unknown dtype '", jd->string,
                 "' (expected one of F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U64 U32 U16 U8 BOOL)");
    PYSAFE_CHECK(js->type == json::Type::Array, Header, kInvalidShape, path, ": tensor '", name,
                 "' shape must be an array, found a JSON ", json::type_name(js->type));
    uint64_t numel = 1;
    for (auto& d : js->array) {
      PYSAFE_CHECK(d.type == json::Type::Number && d.is_uint && d.uint <= static_cast<uint64_t>(INT64_MAX),
                   Header, kInvalidShape, path, ": tensor '", name,
                   "' shape must hold non-negative integers; found ",
                   d.type == json::Type::Number ? number_str(d.number) : json::type_name(d.type));
      e.shape.push_back(static_cast<int64_t>(d.uint));
      PYSAFE_CHECK(mul_ok(numel, d.uint, numel), Header, kSizeMismatch, path, ": tensor '", name,
                   "' shape ", shape_str(e.shape), " overflows the element count");
    }
    PYSAFE_CHECK(jo->type == json::Type::Array && jo->array.size() == 2 && jo->array[0].is_uint &&
                     jo->array[1].is_uint,
                 Header, kInvalidEntry, path, ": tensor '", name,
                 "' data_offsets must be [begin, end] with non-negative integers");
    e.begin = jo->array[0].uint;
    e.end = jo->array[1].uint;
    PYSAFE_CHECK(e.begin <= e.end, Header, kOffsetsNotContiguous, path, ": tensor '", name,
                 "' has data_offsets [", e.begin, ", ", e.end, "] with begin > end");
    // 8. Checked multiply: elements x dtype size == end - begin.
    uint64_t nbytes = 0;
    PYSAFE_CHECK(mul_ok(numel, dtype_size(e.dtype), nbytes), Header, kSizeMismatch, path, ": tensor '",
                 name, "' shape ", shape_str(e.shape), " overflows the byte count");
    PYSAFE_CHECK(nbytes == e.end - e.begin, Header, kSizeMismatch, path, ": tensor '", name,
                 "' has shape ", shape_str(e.shape), " and dtype ", jd->string, " (", nbytes,
                 " bytes) but data_offsets [", e.begin, ", ", e.end, "] span ", e.end - e.begin, " bytes");
    h.entries.push_back(std::move(e));
  }
  // 7. Offsets sorted, contiguous from 0, non-overlapping.
  std::stable_sort(h.entries.begin(), h.entries.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expect = 0;
  const TensorEntry* prev = nullptr;
  for (auto& e : h.entries) {
    PYSAFE_CHECK(e.begin == expect, Header, kOffsetsNotContiguous, path, ": tensor '", e.name,
                 "' data_offsets begin at ", e.begin, " but ",
                 prev ? "the previous tensor '" + prev->name + "' ends at " : std::string("the data section starts at "),
                 expect, e.begin < expect ? " (overlap)" : " (gap)");
    expect = e.end;
    prev = &e;
  }
  // 9. The data section covers the rest of the file exactly.
  uint64_t data_len = file_size - h.data_start;
  PYSAFE_CHECK(expect == data_len, Header, kDataSizeMismatch, path, ": tensors end at data offset ", expect,
               " but the data section holds ", data_len, " bytes (file size ", file_size, ", header ", n,
               " bytes)", expect > data_len ? "; the file looks truncated" : "; trailing bytes after the last tensor");
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
  PYSAFE_CHECK(i >= 0, TensorNotFound, "tensor_not_found", path(), ": no tensor named '", name, "'");
  return header_.entries[static_cast<size_t>(i)];
}

}  // namespace pysafe
