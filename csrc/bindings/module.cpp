// PYBIND11_MODULE(_core): conversion, GIL release, exception registration and docstrings only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>

#include "core/error.h"
#include "core/parallel.h"
#include "backend/backend.h"
#include "bindings/backend_bindings.h"
#include "io/safetensors.h"
#include "io/shard_index.h"
#include "linalg/blas.h"
#include "linalg/convert.h"
#include "linalg/distance.h"
#include "linalg/metrics.h"
#include "linalg/svd.h"

namespace py = pybind11;
using namespace pysafe;

#ifndef PYSAFE_VERSION
#define PYSAFE_VERSION "0.0.0"
#endif

namespace {

// A read-only byte view of a Python buffer (numpy array, bytes, memoryview), checked for length.
struct ByteView {
  const uint8_t* ptr = nullptr;
  size_t size = 0;
};

ByteView bytes_of(const py::buffer& b, size_t expected, const char* what) {
  py::buffer_info info = b.request();
  size_t size = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  bool contiguous = true;
  py::ssize_t stride = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] > 1 && info.strides[d] != stride) contiguous = false;
    stride *= info.shape[d];
  }
  if (!contiguous) throw py::value_error(std::string(what) + ": buffer must be C-contiguous");
  if (size != expected)
    throw py::value_error(std::string(what) + ": buffer holds " + std::to_string(size) + " bytes, expected " +
                          std::to_string(expected));
  return {static_cast<const uint8_t*>(info.ptr), size};
}

DType dtype_of(const std::string& s) {
  DType d;
  if (!parse_dtype(s, d)) throw py::value_error("unknown dtype '" + printable(s) + "'");
  return d;
}

// Headers can list a million tensors: the entry dicts are built with the C API directly (about
// ten times faster than through pybind11's generic casts), with interned keys and dtype names.
py::object steal(PyObject* o) {
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

py::object entry_dict(const TensorEntry& e) {
  static PyObject* k_name = PyUnicode_InternFromString("name");
  static PyObject* k_dtype = PyUnicode_InternFromString("dtype");
  static PyObject* k_shape = PyUnicode_InternFromString("shape");
  static PyObject* k_offsets = PyUnicode_InternFromString("data_offsets");
  py::object d = steal(PyDict_New());
  py::object name = steal(PyUnicode_DecodeUTF8(e.name.data(), static_cast<Py_ssize_t>(e.name.size()), nullptr));
  py::object dtype = steal(PyUnicode_InternFromString(dtype_name(e.dtype)));
  py::object shape = steal(PyTuple_New(static_cast<Py_ssize_t>(e.shape.size())));
  for (size_t i = 0; i < e.shape.size(); ++i)
    PyTuple_SET_ITEM(shape.ptr(), static_cast<Py_ssize_t>(i), steal(PyLong_FromLongLong(e.shape[i])).release().ptr());
  py::object offsets = steal(Py_BuildValue("(KK)", static_cast<unsigned long long>(e.begin),
                                           static_cast<unsigned long long>(e.end)));
  if (PyDict_SetItem(d.ptr(), k_name, name.ptr()) || PyDict_SetItem(d.ptr(), k_dtype, dtype.ptr()) ||
      PyDict_SetItem(d.ptr(), k_shape, shape.ptr()) || PyDict_SetItem(d.ptr(), k_offsets, offsets.ptr()))
    throw py::error_already_set();
  return d;
}

py::list entry_list(const std::vector<TensorEntry>& entries) {
  // Without this, the cyclic GC runs every few hundred new dicts and rescans all earlier ones (60% of
  // the time at 300k entries); these dicts hold only strings and ints, so they can form no cycle.
  struct GcPause {
    int was = PyGC_Disable();
    ~GcPause() {
      if (was) PyGC_Enable();
    }
  } pause;
  py::object l = steal(PyList_New(static_cast<Py_ssize_t>(entries.size())));
  for (size_t i = 0; i < entries.size(); ++i)
    PyList_SET_ITEM(l.ptr(), static_cast<Py_ssize_t>(i), entry_dict(entries[i]).release().ptr());
  return py::reinterpret_borrow<py::list>(l);
}

py::dict record_dict(Record&& r) {
  py::dict d;
  for (auto& kv : r.scalars) d[py::str(kv.first)] = kv.second;
  for (auto& kv : r.strings) d[py::str(kv.first)] = kv.second;
  for (auto& kv : r.arrays) d[py::str(kv.first)] = py::array_t<double>(kv.second.size(), kv.second.data());
  if (!r.vectors.empty()) {
    py::dict v;
    for (auto& kv : r.vectors) {
      py::array_t<float> a({kv.second.rows, kv.second.cols});
      std::memcpy(a.mutable_data(), kv.second.data.data(), kv.second.data.size() * sizeof(float));
      v[py::str(kv.first)] = a;
    }
    d["vectors"] = v;
  }
  if (!r.skip_reason.empty()) d["skip_reason"] = r.skip_reason;
  return d;
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> a(shape);
  std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

template <typename T>
py::tuple svd_tuple(const TruncatedSvd<T>& s) {
  py::dict info;
  info["method"] = s.method;
  info["k"] = s.k;
  info["r"] = s.r;
  info["energy_reached"] = s.energy_reached;
  info["rel_error"] = s.rel_error;
  info["tail_rel"] = s.tail_rel;
  info["sketch_passes"] = s.sketch_passes;
  info["iterations"] = s.sketch_passes;
  info["tol_reached"] = s.tol_reached;
  info["err"] = s.err;
  info["full_spectrum"] = s.full_spectrum;
  info["spectrum"] = s.spectrum;
  info["spectrum_err"] = s.spectrum_err;
  info["flops"] = s.flops;
  return py::make_tuple(to_array(s.U, {s.m, s.r}), to_array(s.S, {s.r}), to_array(s.Vt, {s.r, s.n}), info);
}

// W_base's decomposition (metrics.h) to and from a dict of arrays and values, so that Python can
// store it and hand it back. U and Vt come out in the analysis' precision (float32 or float64).
py::object decomposition_dict(const BaseDecomposition& d) {
  if (d.rows == 0 && d.cols == 0) return py::none();  // skipped tensor: nothing was decomposed
  py::dict out;
  auto arr = [&](const std::vector<double>& v, std::vector<py::ssize_t> shape) -> py::array {
    if (d.f64) return to_array(v, shape);
    std::vector<float> f(v.begin(), v.end());
    return to_array(f, shape);
  };
  out["U"] = arr(d.U, {d.rows, d.k});
  out["S"] = arr(d.S, {static_cast<py::ssize_t>(d.S.size())});
  out["Vt"] = arr(d.Vt, {d.k, d.cols});
  out["rows"] = d.rows;
  out["cols"] = d.cols;
  out["k"] = d.k;
  out["f64"] = d.f64;
  out["method"] = d.method;
  out["full_spectrum"] = d.full_spectrum;
  out["energy_reached"] = d.energy_reached;
  out["fro2"] = d.fro2;
  out["rel_error"] = d.rel_error;
  out["tail_rel"] = d.tail_rel;
  out["sketch_passes"] = d.sketch_passes;
  out["tol_reached"] = d.tol_reached;
  out["err"] = to_array(d.err, {static_cast<py::ssize_t>(d.err.size())});
  out["spectrum"] = to_array(d.spectrum, {static_cast<py::ssize_t>(d.spectrum.size())});
  out["spectrum_err"] = d.spectrum_err;
  out["flops"] = d.flops;
  return std::move(out);
}

BaseDecomposition decomposition_from(const py::dict& in) {
  BaseDecomposition d;
  auto vec = [&](const char* key) {
    auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(in[key]);
    if (!a) throw py::value_error(std::string("base_decomposition: '") + key + "' is not a numeric array");
    return std::vector<double>(a.data(), a.data() + a.size());
  };
  try {
    d.rows = in["rows"].cast<int64_t>();
    d.cols = in["cols"].cast<int64_t>();
    d.k = in["k"].cast<int64_t>();
    d.f64 = in["f64"].cast<bool>();
    d.method = in["method"].cast<std::string>();
    d.full_spectrum = in["full_spectrum"].cast<bool>();
    d.energy_reached = in["energy_reached"].cast<bool>();
    d.fro2 = in["fro2"].cast<double>();
    d.rel_error = in["rel_error"].cast<double>();
    d.tail_rel = in["tail_rel"].cast<double>();
    d.sketch_passes = in["sketch_passes"].cast<int64_t>();
    d.tol_reached = in["tol_reached"].cast<bool>();
    d.spectrum_err = in["spectrum_err"].cast<double>();
    if (in.contains("flops")) d.flops = in["flops"].cast<double>();
  } catch (const py::error_already_set& e) {
    throw py::value_error(std::string("base_decomposition: missing or malformed field (") + e.what() + ")");
  } catch (const py::cast_error& e) {
    throw py::value_error(std::string("base_decomposition: malformed field (") + e.what() + ")");
  }
  d.U = vec("U");
  d.S = vec("S");
  d.Vt = vec("Vt");
  d.err = vec("err");
  d.spectrum = vec("spectrum");
  return d;
}

/// run(float()) or run(double()) by A's dtype; any other dtype is a TypeError naming `what`.
template <typename Run>
auto by_float_dtype(const py::array& A, const std::string& what, Run&& run) {
  if (A.dtype().is(py::dtype::of<double>())) return run(double());
  if (A.dtype().is(py::dtype::of<float>())) return run(float());
  throw py::type_error(what + ": expected float32 or float64");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pysafe native core: strict safetensors reading, fused weight deltas, SVD and subspace metrics";

  // Map core errors onto the hierarchy in pysafe.errors (imported lazily: it is pure Python).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::gil_scoped_acquire gil;
      py::module_ errors = py::module_::import("pysafe.errors");
      const char* cls = "InternalError";
      switch (e.kind()) {
        case ErrorKind::Header: cls = "HeaderError"; break;
        case ErrorKind::ShardIndex: cls = "ShardIndexError"; break;
        case ErrorKind::ShapeMismatch: cls = "ShapeMismatchError"; break;
        case ErrorKind::Value: cls = "CheckpointError"; break;
        case ErrorKind::FileNotFound: cls = nullptr; break;
        case ErrorKind::TensorNotFound: cls = "TensorNotFoundError"; break;
        case ErrorKind::Internal: cls = "InternalError"; break;
        case ErrorKind::Device: cls = "DeviceUnavailableError"; break;
      }
      // The whole message (not what(), which stops at a NUL), decoded with a safety net: the core
      // escapes what it echoes, so 'backslashreplace' should never have anything to replace.
      const std::string& m = e.message();
      py::object msg = py::reinterpret_steal<py::object>(
          PyUnicode_DecodeUTF8(m.data(), static_cast<Py_ssize_t>(m.size()), "backslashreplace"));
      if (!msg) throw py::error_already_set();
      if (cls == nullptr) {
        PyErr_SetObject(PyExc_FileNotFoundError, msg.ptr());
        return;
      }
      py::object type = errors.attr(cls);
      py::object exc = type(msg);
      exc.attr("code") = e.code();
      PyErr_SetObject(type.ptr(), exc.ptr());
    }
  });

  m.def("build_info", [] {
    py::dict d;
    d["version"] = PYSAFE_VERSION;
    add_cuda_info(d);
    d["blas"] = std::string(blas::config());
    d["threads"] = num_threads();
    d["compiler"] = std::string(__VERSION__);
    return d;
  }, "What this build contains: version, cuda (bool) and its devices, BLAS configuration, default thread count.");
  m.def("cuda_device_count", &backend::cuda_device_count, "Visible CUDA devices (0 on a CPU-only build).");
  register_backend(m);
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Threads for the core's loops and OpenBLAS; n <= 0 means all hardware threads.");
  m.def("get_num_threads", &num_threads);

  py::class_<SvdOptions>(m, "SvdOptions", "Options of one truncated SVD (see svd.h).")
      .def(py::init<>())
      .def_readwrite("rank", &SvdOptions::rank)
      .def_readwrite("energy", &SvdOptions::energy)
      .def_readwrite("exact", &SvdOptions::exact)
      .def_readwrite("exact_max_dim", &SvdOptions::exact_max_dim)
      .def_readwrite("max_rank", &SvdOptions::max_rank)
      .def_readwrite("oversample", &SvdOptions::oversample)
      .def_readwrite("power_iters", &SvdOptions::power_iters)
      .def_readwrite("seed", &SvdOptions::seed)
      .def_readwrite("residual_check", &SvdOptions::residual_check)
      .def_readwrite("tol", &SvdOptions::tol)
      .def_readwrite("full_spectrum", &SvdOptions::full_spectrum)
      .def_readwrite("device", &SvdOptions::device);

  m.def("sin_theta_chance", &sin_theta_chance, py::arg("n"), py::arg("k"),
        "E[‖(I − P)u‖] for u uniform on the unit sphere of R^n and P a rank-k projector: the chance "
        "level of a mean sin θ against a k-dimensional subspace.");

  m.def("sin_theta", [](py::array Ub, py::array Ud) {
    if (Ub.ndim() != 2 || Ud.ndim() != 2) throw py::value_error("sin_theta: expected two 2-D arrays");
    if (Ub.shape(0) != Ud.shape(0))
      throw py::value_error("sin_theta: the bases have " + std::to_string(Ub.shape(0)) + " and " +
                            std::to_string(Ud.shape(0)) + " rows; they must live in the same space");
    int64_t dim = Ub.shape(0), kb = Ub.shape(1), kd = Ud.shape(1);
    bool f64 = Ub.dtype().is(py::dtype::of<double>()) || Ud.dtype().is(py::dtype::of<double>());
    double cos2 = 0;
    std::vector<double> s;
    auto run = [&](auto tag) {
      using T = decltype(tag);
      auto b = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(Ub);
      auto d = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(Ud);
      if (!b || !d) throw py::type_error("sin_theta: expected real floating-point arrays");
      py::gil_scoped_release nogil;
      s = sin_theta<T>(b.data(), kb, d.data(), kd, dim, cos2);
    };
    if (f64) run(double{}); else run(float{});
    return py::make_tuple(py::array_t<double>(static_cast<py::ssize_t>(s.size()), s.data()), cos2);
  }, py::arg("U_base"), py::arg("U"),
     "sin θ of each column of U (n×k) to the column space of U_base (n×k_base, orthonormal columns), "
     "clipped to [0, 1], and ‖U_baseᵀ U‖_F² (float64 when either input is, else float32 arithmetic).");

  py::class_<AnalyzeParams>(m, "AnalyzeParams", "Options of one matrix analysis (see metrics.h).")
      .def(py::init<>())
      .def_readwrite("delta", &AnalyzeParams::delta)
      .def_readwrite("base", &AnalyzeParams::base)
      .def_readwrite("center", &AnalyzeParams::center)
      .def_readwrite("transpose", &AnalyzeParams::transpose)
      .def_readwrite("save_vectors", &AnalyzeParams::save_vectors);

  m.def("read_header", [](const std::string& path) {
    Header h;
    {
      py::gil_scoped_release nogil;
      h = read_header(path);
    }
    py::dict d;
    d["entries"] = entry_list(h.entries);
    d["metadata"] = h.metadata;
    d["data_start"] = h.data_start;
    d["file_size"] = h.file_size;
    return d;
  }, py::arg("path"), "Validate and return a safetensors header without mapping the data.");

  py::class_<SafetensorsFile, std::shared_ptr<SafetensorsFile>>(m, "SafetensorsFile",
                                                                "A validated, read-only memory-mapped safetensors file.")
      .def(py::init([](const std::string& path) {
             py::gil_scoped_release nogil;
             return std::make_shared<SafetensorsFile>(path);
           }),
           py::arg("path"))
      .def_property_readonly("path", &SafetensorsFile::path)
      .def_property_readonly("metadata", [](const SafetensorsFile& f) { return f.header().metadata; })
      .def_property_readonly("data_start", [](const SafetensorsFile& f) { return f.header().data_start; })
      .def("entries", [](const SafetensorsFile& f) {
        return entry_list(f.header().entries);
      })
      .def("buffer", [](py::object self, const std::string& name) {
        auto& f = self.cast<SafetensorsFile&>();
        const TensorEntry& e = f.entry(name);
        // A read-only view into the mapping that keeps the file object (and so the mapping) alive.
        py::array_t<uint8_t> a({static_cast<py::ssize_t>(e.nbytes())}, {1}, f.data(e), self);
        a.attr("setflags")(py::arg("write") = false);  // the pages are PROT_READ
        return a;
      }, py::arg("name"), "Raw bytes of a tensor: a read-only uint8 view into the mapping.")
      .def("advise", [](const SafetensorsFile& f, const std::string& name, const std::string& how) {
        const TensorEntry& e = f.entry(name);
        f.mapping().advise(f.header().data_start + e.begin, e.nbytes(), how);
      }, py::arg("name"), py::arg("how"), "madvise a tensor's pages: willneed, dontneed or sequential.");

  m.def("parse_shard_index", [](const std::string& path) {
    ShardIndex idx = parse_shard_index(path);
    return py::make_tuple(idx.weight_map, idx.metadata);
  }, py::arg("path"), "Validate model.safetensors.index.json: returns (weight_map, metadata).");

  m.def("upcast", [](py::buffer buf, const std::string& dtype, std::vector<int64_t> shape, bool f64) -> py::array {
    DType dt = dtype_of(dtype);
    size_t n = 1;
    for (auto d : shape) n *= static_cast<size_t>(d);
    ByteView v = bytes_of(buf, dtype_nbytes(dt, n), "upcast");
    std::vector<py::ssize_t> shp(shape.begin(), shape.end());
    if (f64) {
      py::array_t<double> out(shp);
      double* o = out.mutable_data();
      py::gil_scoped_release nogil;
      upcast<double>(v.ptr, dt, n, o);
      return std::move(out);
    }
    py::array_t<float> out(shp);
    float* o = out.mutable_data();
    py::gil_scoped_release nogil;
    upcast<float>(v.ptr, dt, n, o);
    return std::move(out);
  }, py::arg("buffer"), py::arg("dtype"), py::arg("shape"), py::arg("f64") = false,
     "Upcast raw tensor bytes of a safetensors dtype to a new float32 (or float64) array.");

  m.def("fused_delta", [](py::buffer tuned, const std::string& tdt, py::buffer base, const std::string& bdt, size_t n,
                          bool f64) {
    DType t = dtype_of(tdt), b = dtype_of(bdt);
    ByteView tv = bytes_of(tuned, dtype_nbytes(t, n), "tuned"), bv = bytes_of(base, dtype_nbytes(b, n), "base");
    py::dict stats;
    DeltaStats st;
    py::array out;
    if (f64) {
      py::array_t<double> d({static_cast<py::ssize_t>(n)});
      double* p = d.mutable_data();
      {
        py::gil_scoped_release nogil;
        st = fused_delta<double>(tv.ptr, t, bv.ptr, b, n, nullptr, p);
      }
      out = d;
    } else {
      py::array_t<float> d({static_cast<py::ssize_t>(n)});
      float* p = d.mutable_data();
      {
        py::gil_scoped_release nogil;
        st = fused_delta<float>(tv.ptr, t, bv.ptr, b, n, nullptr, p);
      }
      out = d;
    }
    stats["nonfinite_base"] = st.nonfinite_base;
    stats["nonfinite_tuned"] = st.nonfinite_tuned;
    stats["sumsq_base"] = st.sumsq_base;
    stats["sumsq_delta"] = st.sumsq_delta;
    return py::make_tuple(out, stats);
  }, py::arg("tuned"), py::arg("tuned_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("n"),
     py::arg("f64") = false, "ΔW = upcast(tuned) − upcast(base) in one pass; returns (delta, stats).");

  m.def("analyze_dense", [](py::buffer base, const std::string& bdt, py::buffer tuned, const std::string& tdt,
                            int64_t rows, int64_t cols, const AnalyzeParams& p, bool f64, py::object base_decomposition,
                            bool return_base) -> py::object {
    DType b = dtype_of(bdt), t = dtype_of(tdt);
    size_t n = static_cast<size_t>(rows * cols);
    ByteView bv = bytes_of(base, dtype_nbytes(b, n), "base"), tv = bytes_of(tuned, dtype_nbytes(t, n), "tuned");
    std::unique_ptr<BaseDecomposition> in;
    if (!base_decomposition.is_none()) in.reset(new BaseDecomposition(decomposition_from(base_decomposition)));
    BaseDecomposition out;
    Record r;
    {
      py::gil_scoped_release nogil;
      r = f64 ? analyze_dense<double>(bv.ptr, b, tv.ptr, t, rows, cols, p, in.get(), return_base ? &out : nullptr)
              : analyze_dense<float>(bv.ptr, b, tv.ptr, t, rows, cols, p, in.get(), return_base ? &out : nullptr);
    }
    if (!return_base) return record_dict(std::move(r));
    return py::make_tuple(record_dict(std::move(r)), decomposition_dict(out));
  }, py::arg("base"), py::arg("base_dtype"), py::arg("tuned"), py::arg("tuned_dtype"), py::arg("rows"),
     py::arg("cols"), py::arg("params"), py::arg("f64") = false, py::arg("base_decomposition") = py::none(),
     py::arg("return_base") = false,
     "All metrics of one stored rows×cols matrix pair (engine.md §5), ΔW formed in f32 or f64. "
     "base_decomposition: W_base's decomposition from an earlier return_base=True call with the same base "
     "tensor and options (its SVD is then not recomputed); return_base=True returns (record, decomposition "
     "or None for a skipped tensor).");

  m.def("analyze_factored", [](py::buffer base, const std::string& bdt, int64_t rows, int64_t cols, py::array L,
                               py::array R, const AnalyzeParams& p, py::object base_decomposition, bool return_base) -> py::object {
    DType b = dtype_of(bdt);
    ByteView bv = bytes_of(base, dtype_nbytes(b, static_cast<size_t>(rows * cols)), "base");
    if (L.ndim() != 2 || R.ndim() != 2 || L.shape(0) != rows || R.shape(1) != cols || L.shape(1) != R.shape(0))
      throw py::value_error("analyze_factored: expected L (rows×r) and R (r×cols) matching the base shape");
    int64_t r = L.shape(1);
    bool f64 = L.dtype().is(py::dtype::of<double>());
    std::unique_ptr<BaseDecomposition> in;
    if (!base_decomposition.is_none()) in.reset(new BaseDecomposition(decomposition_from(base_decomposition)));
    BaseDecomposition out;
    BaseDecomposition* outp = return_base ? &out : nullptr;
    Record rec;
    if (f64) {
      auto Lc = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(L);
      auto Rc = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(R);
      py::gil_scoped_release nogil;
      rec = analyze_factored<double>(bv.ptr, b, rows, cols, Lc.data(), Rc.data(), r, p, in.get(), outp);
    } else {
      auto Lc = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(L);
      auto Rc = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(R);
      py::gil_scoped_release nogil;
      rec = analyze_factored<float>(bv.ptr, b, rows, cols, Lc.data(), Rc.data(), r, p, in.get(), outp);
    }
    if (!return_base) return record_dict(std::move(rec));
    return py::make_tuple(record_dict(std::move(rec)), decomposition_dict(out));
  }, py::arg("base"), py::arg("base_dtype"), py::arg("rows"), py::arg("cols"), py::arg("L"), py::arg("R"),
     py::arg("params"), py::arg("base_decomposition") = py::none(), py::arg("return_base") = false,
     "Metrics of a low-rank ΔW = L·R (PEFT adapters) without forming L·R. base_decomposition and "
     "return_base as in analyze_dense.");

  m.def("analyze_norms", [](py::buffer base, const std::string& bdt, py::buffer tuned, const std::string& tdt,
                            size_t n) {
    DType b = dtype_of(bdt), t = dtype_of(tdt);
    ByteView bv = bytes_of(base, dtype_nbytes(b, n), "base"), tv = bytes_of(tuned, dtype_nbytes(t, n), "tuned");
    Record r;
    {
      py::gil_scoped_release nogil;
      r = analyze_norms(bv.ptr, b, tv.ptr, t, n);
    }
    return record_dict(std::move(r));
  }, py::arg("base"), py::arg("base_dtype"), py::arg("tuned"), py::arg("tuned_dtype"), py::arg("n"),
     "delta_fro and delta_rel of any tensor (1-D tensors get only these).");

  m.def("truncated_svd", [](py::array A, const SvdOptions& o) {
    if (A.ndim() != 2) throw py::value_error("truncated_svd: expected a 2-D array");
    int64_t rows = A.shape(0), cols = A.shape(1);
    if (A.dtype().is(py::dtype::of<double>())) {
      auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(A);
      TruncatedSvd<double> s;
      {
        py::gil_scoped_release nogil;
        double fro2 = 0;
        for (int64_t i = 0; i < rows * cols; ++i) fro2 += a.data()[i] * a.data()[i];
        s = truncated_svd<double>(a.data(), rows, cols, fro2, o);
      }
      return svd_tuple(s);
    }
    if (!A.dtype().is(py::dtype::of<float>())) throw py::type_error("truncated_svd: expected float32 or float64");
    auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(A);
    TruncatedSvd<float> s;
    {
      py::gil_scoped_release nogil;
      double fro2 = 0;
      for (int64_t i = 0; i < rows * cols; ++i) fro2 += static_cast<double>(a.data()[i]) * a.data()[i];
      s = truncated_svd<float>(a.data(), rows, cols, fro2, o);
    }
    return svd_tuple(s);
  }, py::arg("A"), py::arg("options"), "Truncated SVD (exact or randomized per options): (U, S, Vt, info).");

  m.def("orthonormalize", [](py::array A, bool householder) {
    if (A.ndim() != 2) throw py::value_error("orthonormalize: expected a 2-D array");
    const int64_t rows = A.shape(0), cols = A.shape(1);
    if (rows < cols) throw py::value_error("orthonormalize: expected rows >= cols");
    auto run = [&](auto tag) -> py::tuple {
      using T = decltype(tag);
      auto src = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(A);
      py::array_t<T> q({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});  // overwritten in place
      std::memcpy(q.mutable_data(), src.data(), static_cast<size_t>(rows * cols) * sizeof(T));
      blas::OrthoPath path = blas::OrthoPath::kHouseholder;
      {
        py::gil_scoped_release nogil;
        if (householder)
          blas::orthonormalize_householder<T>(rows, cols, q.mutable_data());
        else
          path = blas::orthonormalize<T>(rows, cols, q.mutable_data());
      }
      return py::make_tuple(q, blas::ortho_path_name(path));
    };
    return by_float_dtype(A, "orthonormalize", run);
  }, py::arg("A"), py::arg("householder") = false,
     "Orthonormal basis of A's columns (the range finder's kernel): (Q, path), path one of cholqr2, "
     "cholqr3, householder.");

  // -- activation distances (linalg/distance.h) ------------------------------------------------------------
  auto metric_of = [](const std::string& m) {
    if (m == "euclidean") return dist::Metric::kEuclidean;
    if (m == "cosine") return dist::Metric::kCosine;
    throw py::value_error("metric must be 'euclidean' or 'cosine', got '" + m + "'");
  };
  auto stats_dict = [](const dist::Stats& st) {
    py::dict d;
    d["entries"] = st.entries;
    d["recomputed"] = st.recomputed;
    return d;
  };

  m.def("pairwise_distances", [metric_of, stats_dict](py::array A, py::object B, const std::string& metric,
                                                     int device) {
    const auto mt = metric_of(metric);
    if (A.ndim() != 2) throw py::value_error("pairwise_distances: a must be 2-D (n × d)");
    auto run = [&](auto tag) -> py::tuple {
      using T = decltype(tag);
      auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(A);
      const int64_t n = a.shape(0), d = a.shape(1);
      py::array_t<T, py::array::c_style | py::array::forcecast> b;
      int64_t mrows = n;
      if (!B.is_none()) {
        b = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(B);
        if (!b || b.ndim() != 2) throw py::value_error("pairwise_distances: b must be 2-D (m × d)");
        if (b.shape(1) != d)
          throw py::value_error("pairwise_distances: a has " + std::to_string(d) + " columns, b has " +
                                std::to_string(b.shape(1)));
        mrows = b.shape(0);
      }
      py::array_t<T> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(mrows)});
      dist::Stats st;
      {
        py::gil_scoped_release nogil;
        st = dist::pairwise<T>(a.data(), n, B.is_none() ? nullptr : b.data(), mrows, d, mt, out.mutable_data(),
                               device);
      }
      return py::make_tuple(out, stats_dict(st));
    };
    return by_float_dtype(A, "pairwise_distances", run);
  }, py::arg("a"), py::arg("b") = py::none(), py::arg("metric") = "euclidean", py::arg("device") = -1,
     "Exact blocked pairwise distances: (n×m array in a's precision, stats). b=None: a against itself "
     "(symmetric, zero diagonal). device >= 0: on cuda:device.");

  m.def("pairwise_distances_resident", [metric_of, stats_dict](uintptr_t a, int64_t n, int64_t d, py::object b,
                                                              int64_t mrows, bool f64, const std::string& metric,
                                                              int device) {
    const auto mt = metric_of(metric);
    if (n < 0 || d < 0 || mrows < 0) throw py::value_error("pairwise_distances_resident: negative dimension");
    const uintptr_t bp = b.is_none() ? 0 : b.cast<uintptr_t>();
    const int64_t m = b.is_none() ? n : mrows;
    auto run = [&](auto tag) -> py::tuple {
      using T = decltype(tag);
      py::array_t<T> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(m)});
      dist::Stats st;
      {
        py::gil_scoped_release nogil;
        st = dist::pairwise_resident<T>(reinterpret_cast<const T*>(a), n, reinterpret_cast<const T*>(bp), m, d, mt,
                                        out.mutable_data(), device);
      }
      return py::make_tuple(out, stats_dict(st));
    };
    return f64 ? run(double{}) : run(float{});
  }, py::arg("a"), py::arg("n"), py::arg("d"), py::arg("b"), py::arg("m"), py::arg("f64"), py::arg("metric"),
     py::arg("device"),
     "pairwise_distances on C-contiguous rows at the addresses a (n×d) and b (m×d, None: a against itself) in "
     "the memory of `device` (a GPU; host memory for -1): (n×m host array, stats).");

  m.def("distance_rows", [metric_of, stats_dict](py::array A, const std::string& metric, int64_t r0, int64_t r1) {
    const auto mt = metric_of(metric);
    if (A.ndim() != 2) throw py::value_error("distance_rows: a must be 2-D (n × d)");
    auto run = [&](auto tag) -> py::tuple {
      using T = decltype(tag);
      auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(A);
      const int64_t n = a.shape(0), d = a.shape(1);
      if (r0 < 0 || r1 < r0 || r1 > n) throw py::value_error("distance_rows: need 0 <= r0 <= r1 <= n");
      py::array_t<T> out({static_cast<py::ssize_t>(r1 - r0), static_cast<py::ssize_t>(n)});
      dist::Stats st;
      {
        py::gil_scoped_release nogil;
        st = dist::self_rows<T>(a.data(), n, d, mt, r0, r1, out.mutable_data());
      }
      return py::make_tuple(out, stats_dict(st));
    };
    return by_float_dtype(A, "distance_rows", run);
  }, py::arg("a"), py::arg("metric"), py::arg("r0"), py::arg("r1"),
     "Rows [r0, r1) of the self-distance matrix of a, identical to those of pairwise_distances(a).");

  m.def("distance_summary", [metric_of, stats_dict](py::array A, py::array_t<int64_t, py::array::c_style | py::array::forcecast> labels,
                                                    int64_t groups, int64_t k, const std::string& metric) {
    const auto mt = metric_of(metric);
    if (A.ndim() != 2) throw py::value_error("distance_summary: a must be 2-D (n × d)");
    const int64_t n = A.shape(0);
    if (labels.ndim() != 1 || labels.shape(0) != n)
      throw py::value_error("distance_summary: labels must be 1-D with one entry per row of a");
    for (int64_t i = 0; i < n; ++i)
      if (labels.data()[i] < 0 || labels.data()[i] >= groups)
        throw py::value_error("distance_summary: label " + std::to_string(labels.data()[i]) + " of row " +
                              std::to_string(i) + " is outside [0, " + std::to_string(groups) + ")");
    if (k < 0 || (n > 0 && k > n - 1)) throw py::value_error("distance_summary: need 0 <= k <= n - 1");
    py::array_t<double> sums({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(groups)});
    py::array_t<int64_t> idx({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(k)});
    py::array_t<double> dst({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(k)});
    auto run = [&](auto tag) {
      using T = decltype(tag);
      auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(A);
      py::gil_scoped_release nogil;
      return dist::summarize<T>(a.data(), n, a.shape(1), labels.data(), groups, k, mt, sums.mutable_data(),
                                idx.mutable_data(), dst.mutable_data());
    };
    const dist::Stats st = by_float_dtype(A, "distance_summary", run);
    return py::make_tuple(sums, idx, dst, stats_dict(st));
  }, py::arg("a"), py::arg("labels"), py::arg("groups"), py::arg("k"), py::arg("metric") = "euclidean",
     "Streaming summaries of a's self distances without the n×n matrix: (group_sum n×g, knn_idx n×k, "
     "knn_dist n×k, stats); group_sum[i, c] sums the distances from i to the other members of group c.");
}
