#include "bindings/backend_bindings.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "backend/backend.h"
#include "backend/staging.h"
#include "io/safetensors.h"
#include "linalg/blas.h"
#include "linalg/convert.h"

namespace py = pybind11;

namespace pysafe {

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

// A numpy array copied into the backend's memory.
template <typename T>
backend::Buffer<T> put(backend::Backend& be, const Arr<T>& a) {
  backend::Buffer<T> b(be, static_cast<size_t>(a.size()));
  if (a.size()) be.upload(b.data(), a.data(), static_cast<size_t>(a.size()) * sizeof(T));
  return b;
}

template <typename T>
Arr<T> get(const backend::Buffer<T>& b, std::vector<py::ssize_t> shape) {
  Arr<T> out(shape);
  const auto host = b.to_host();
  std::copy(host.begin(), host.end(), out.mutable_data());
  return out;
}

py::array doubles(const std::vector<double>& v) { return py::array_t<double>(static_cast<py::ssize_t>(v.size()), v.data()); }

// Run fn(T{}) for the float dtype of `a` (float32 or float64).
template <typename F>
py::object by_dtype(const py::array& a, const char* what, F&& fn) {
  if (py::dtype::of<float>().is(a.dtype())) return fn(float{});
  if (py::dtype::of<double>().is(a.dtype())) return fn(double{});
  throw py::type_error(std::string(what) + ": expected float32 or float64, got " + std::string(py::str(a.dtype())));
}

void need_2d(const py::array& a, const char* what) {
  if (a.ndim() != 2) throw py::value_error(std::string(what) + " must be 2-D");
}

}  // namespace

void add_cuda_info(py::dict& d) {
  const backend::CudaInfo info = backend::cuda_info();
  d["cuda"] = info.built;
  if (!info.built) return;
  d["cuda_runtime"] = info.runtime_version;
  d["cuda_driver"] = info.driver_version;
  d["cuda_device_names"] = info.devices;
  d["cuda_libraries"] = info.libraries;
  d["cuda_stage_bytes"] = info.stage_bytes;
#ifdef PYSAFE_CUDA_EMULATOR
  d["cuda_emulator"] = true;  // a test build: the GPU is emulated on the host (docs/gpu.md)
#else
  d["cuda_emulator"] = false;
#endif
}

void register_backend(py::module_& m) {
  py::module_ b = m.def_submodule("backend", "One primitive at a time on a chosen device (-1: CPU, N: cuda:N).");
  b.def("name", [](int device) { return backend::get(device).name(); }, py::arg("device"));
  b.def("peak_bytes", [](int device) { return backend::get(device).peak_bytes(); }, py::arg("device"));
  b.def("reset_peak", [](int device) { backend::get(device).reset_peak(); }, py::arg("device"));
  b.def("staging_plan", [](size_t bytes, size_t chunk_bytes, size_t align) {
    std::vector<std::tuple<size_t, size_t, int>> out;
    for (const auto& c : backend::plan_chunks(bytes, chunk_bytes, align)) out.emplace_back(c.offset, c.bytes, c.slot);
    return out;
  }, py::arg("bytes"), py::arg("chunk_bytes"), py::arg("align"),
     "The (offset, bytes, slot) chunks a host array of `bytes` travels in to a GPU.");

  b.def("gemm", [](int device, py::array A, py::array B, bool ta, bool tb) {
    need_2d(A, "A");
    need_2d(B, "B");
    return by_dtype(A, "gemm", [&](auto tag) -> py::object {
      using T = decltype(tag);
      auto a = Arr<T>::ensure(A), bb = Arr<T>::ensure(B);
      const int64_t M = ta ? a.shape(1) : a.shape(0), K = ta ? a.shape(0) : a.shape(1);
      const int64_t K2 = tb ? bb.shape(1) : bb.shape(0), N = tb ? bb.shape(0) : bb.shape(1);
      if (K != K2) throw py::value_error("gemm: inner dimensions differ");
      backend::Backend& be = backend::get(device);
      auto da = put(be, a), db = put(be, bb);
      backend::Buffer<T> c(be, static_cast<size_t>(M * N));
      be.gemm(ta, tb, M, N, K, T(1), da.data(), a.shape(1), db.data(), bb.shape(1), T(0), c.data(), N);
      return get(c, {M, N});
    });
  }, py::arg("device"), py::arg("A"), py::arg("B"), py::arg("ta") = false, py::arg("tb") = false);

  b.def("orthonormalize", [](int device, py::array A, bool full) {
    need_2d(A, "A");
    return by_dtype(A, "orthonormalize", [&](auto tag) -> py::object {
      using T = decltype(tag);
      auto a = Arr<T>::ensure(A);
      if (a.shape(0) < a.shape(1)) throw py::value_error("orthonormalize: A must have rows >= cols");
      backend::Backend& be = backend::get(device);
      auto da = put(be, a);
      const auto path = be.orthonormalize(a.shape(0), a.shape(1), da.data(), full);
      return py::make_tuple(get(da, {a.shape(0), a.shape(1)}), blas::ortho_path_name(path));
    });
  }, py::arg("device"), py::arg("A"), py::arg("full") = true);

  b.def("gram_f64", [](int device, py::array A, bool columns) {
    need_2d(A, "A");
    return by_dtype(A, "gram_f64", [&](auto tag) -> py::object {
      using T = decltype(tag);
      auto a = Arr<T>::ensure(A);
      std::vector<double> G;
      backend::get(device).gram_f64(a.shape(0), a.shape(1), a.data(), columns, G, nullptr);
      const py::ssize_t dd = columns ? a.shape(1) : a.shape(0);
      return py::array_t<double>({dd, dd}, G.data());
    });
  }, py::arg("device"), py::arg("A"), py::arg("columns") = true,
     "Upper triangle (row-major) of AᵀA (columns) or AAᵀ in double; the lower triangle is not defined.");

  // The per-column reductions in double: ‖Y[:, j]‖₂ (col_norms) and Σ_r Y[r, j] (col_sums).
  for (const bool sums : {false, true})
    b.def(sums ? "col_sums" : "col_norms", [sums](int device, py::array Y) {
      need_2d(Y, "Y");
      return by_dtype(Y, "column reduction", [&](auto tag) -> py::object {
        using T = decltype(tag);
        auto y = Arr<T>::ensure(Y);
        backend::Backend& be = backend::get(device);
        auto dy = put(be, y);
        std::vector<double> out;
        if (sums)
          be.col_sums(dy.data(), y.shape(0), y.shape(1), out);
        else
          be.col_norms(dy.data(), y.shape(0), y.shape(1), out);
        return doubles(out);
      });
    }, py::arg("device"), py::arg("Y"));

  b.def("residual_sumsq", [](int device, py::array R, py::array U, std::vector<double> theta) {
    need_2d(R, "R");
    return by_dtype(R, "residual_sumsq", [&](auto tag) -> py::object {
      using T = decltype(tag);
      auto r = Arr<T>::ensure(R), u = Arr<T>::ensure(U);
      if (u.ndim() != 2 || u.shape(0) != r.shape(0) || u.shape(1) != r.shape(1) ||
          static_cast<py::ssize_t>(theta.size()) != r.shape(1))
        throw py::value_error("residual_sumsq: R, U and theta disagree in shape");
      backend::Backend& be = backend::get(device);
      auto dr = put(be, r), du = put(be, u);
      std::vector<double> out;
      be.residual_sumsq(dr.data(), du.data(), r.shape(0), r.shape(1), theta, out);
      return doubles(out);
    });
  }, py::arg("device"), py::arg("R"), py::arg("U"), py::arg("theta"));

  b.def("to_f64", [](int device, py::array X) {
    need_2d(X, "X");
    return by_dtype(X, "to_f64", [&](auto tag) -> py::object {
      using T = decltype(tag);
      auto x = Arr<T>::ensure(X);
      backend::Backend& be = backend::get(device);
      auto dx = put(be, x);
      backend::Buffer<double> out(be, static_cast<size_t>(x.size()));
      be.to_f64(dx.data(), x.shape(1), x.shape(0), x.shape(1), out.data(), x.shape(1));
      return get(out, {x.shape(0), x.shape(1)});
    });
  }, py::arg("device"), py::arg("X"));

  b.def("from_f64_div", [](int device, Arr<double> X, std::vector<double> div, bool f64) {
    if (X.ndim() != 2 || static_cast<py::ssize_t>(div.size()) != X.shape(1))
      throw py::value_error("from_f64_div: X must be 2-D with one divisor per column");
    backend::Backend& be = backend::get(device);
    auto dx = put(be, X);
    auto run = [&](auto tag) -> py::object {
      using T = decltype(tag);
      backend::Buffer<T> out(be, static_cast<size_t>(X.size()));
      be.from_f64_div(dx.data(), X.shape(0), X.shape(1), div, out.data());
      return get(out, {X.shape(0), X.shape(1)});
    };
    return f64 ? run(double{}) : run(float{});
  }, py::arg("device"), py::arg("X"), py::arg("div"), py::arg("f64") = false);

  // A C-contiguous float32/float64 matrix copied into a GPU backend's memory, announced by
  // __cuda_array_interface__ (version 3) as CuPy and Numba arrays are: tests of the distances' resident
  // path that need no PyTorch.
  struct DeviceArray {
    backend::Buffer<uint8_t> bytes;
    std::vector<py::ssize_t> shape;
    std::string typestr;
  };
  py::class_<DeviceArray>(b, "DeviceArray", "A matrix in a GPU backend's memory (see device_array).")
      .def_property_readonly("__cuda_array_interface__", [](const DeviceArray& a) {
        py::dict d;
        d["shape"] = py::tuple(py::cast(a.shape));
        d["typestr"] = a.typestr;
        d["data"] = py::make_tuple(reinterpret_cast<uintptr_t>(a.bytes.data()), false);
        d["strides"] = py::none();
        d["version"] = 3;
        return d;
      });
  b.def("device_array", [](int device, py::array X) {
    need_2d(X, "X");
    if (device < 0) throw py::value_error("device_array: a GPU device index (>= 0) is needed");
    return by_dtype(X, "device_array", [&](auto tag) -> py::object {
      using T = decltype(tag);
      auto x = Arr<T>::ensure(X);
      backend::Backend& be = backend::get(device);
      const size_t n = static_cast<size_t>(x.size()) * sizeof(T);
      DeviceArray a{backend::Buffer<uint8_t>(be, n), {x.shape(0), x.shape(1)}, sizeof(T) == 4 ? "<f4" : "<f8"};
      if (n) be.upload(a.bytes.data(), x.data(), n);
      return py::cast(std::move(a));
    });
  }, py::arg("device"), py::arg("X"), "X copied into the memory of GPU `device`, as a DeviceArray.");

  b.def("fused_delta", [](int device, py::bytes tuned, const std::string& tdt, py::bytes base, const std::string& bdt,
                          bool f64, bool from_host) {
    DType t, bd;
    if (!parse_dtype(tdt, t) || !parse_dtype(bdt, bd)) throw py::value_error("fused_delta: unknown dtype");
    const std::string ts = tuned, bs = base;
    const uint64_t n = ts.size() * 8 / dtype_bits(t);
    if (dtype_nbytes(bd, n) != bs.size()) throw py::value_error("fused_delta: tuned and base hold different counts");
    backend::Backend& be = backend::get(device);
    if (from_host && (!be.upcasts(t) || !be.upcasts(bd)))
      throw py::value_error("fused_delta: " + be.name() + " does not upcast " + tdt + " or " + bdt);
    backend::Buffer<uint8_t> dt(be, from_host ? 0 : ts.size()), db(be, from_host ? 0 : bs.size());
    if (!from_host) {
      be.upload(dt.data(), ts.data(), ts.size());
      be.upload(db.data(), bs.data(), bs.size());
    }
    const auto* th = reinterpret_cast<const uint8_t*>(ts.data());
    const auto* bh = reinterpret_cast<const uint8_t*>(bs.data());
    auto run = [&](auto tag) -> py::object {
      using T = decltype(tag);
      backend::Buffer<T> delta(be, n), bout(be, n);
      const DeltaStats st = from_host ? be.upload_delta(th, t, bh, bd, n, bout.data(), delta.data())
                                      : be.fused_delta(dt.data(), t, db.data(), bd, n, bout.data(), delta.data());
      py::dict s;
      s["nonfinite_base"] = st.nonfinite_base;
      s["nonfinite_tuned"] = st.nonfinite_tuned;
      s["sumsq_base"] = st.sumsq_base;
      s["sumsq_delta"] = st.sumsq_delta;
      return py::make_tuple(get(delta, {static_cast<py::ssize_t>(n)}), get(bout, {static_cast<py::ssize_t>(n)}), s);
    };
    return f64 ? run(double{}) : run(float{});
  }, py::arg("device"), py::arg("tuned"), py::arg("tuned_dtype"), py::arg("base"), py::arg("base_dtype"),
     py::arg("f64") = false, py::arg("from_host") = false,
     "The fused upcast-subtract on raw stored bytes: (delta, base, stats). from_host: the bytes are read from "
     "the host by upload_delta (staged, chunk by chunk, on a GPU) instead of being uploaded first.");

  b.def("prepare_rows", [](int device, py::array P, bool cosine, std::vector<double> mu) {
    need_2d(P, "P");
    return by_dtype(P, "prepare_rows", [&](auto tag) -> py::object {
      using T = decltype(tag);
      auto p = Arr<T>::ensure(P);
      if (!cosine && static_cast<py::ssize_t>(mu.size()) != p.shape(1))
        throw py::value_error("prepare_rows: mu must have one value per column");
      backend::Backend& be = backend::get(device);
      auto dp = put(be, p);
      backend::Buffer<T> X(be, static_cast<size_t>(p.size()));
      std::vector<double> sq, inv;
      be.prepare_rows(dp.data(), p.shape(0), p.shape(1), cosine, mu, X.data(), sq, inv);
      return py::make_tuple(get(X, {p.shape(0), p.shape(1)}), doubles(sq), doubles(inv));
    });
  }, py::arg("device"), py::arg("P"), py::arg("cosine"), py::arg("mu") = std::vector<double>(),
     "The distance engine's row preparation: (X, ‖X_i‖² in f64, 1/‖P_i‖ for cosine).");

  b.def("distance_epilogue", [](int device, py::array G, py::array sa, py::array sb, py::array ca, py::array nb,
                                bool euclid) {
    need_2d(G, "G");
    return by_dtype(G, "distance_epilogue", [&](auto tag) -> py::object {
      using T = decltype(tag);
      auto g = Arr<T>::ensure(G), a = Arr<T>::ensure(sa), bq = Arr<T>::ensure(sb), c = Arr<T>::ensure(ca),
           nq = Arr<T>::ensure(nb);
      if (a.size() != g.shape(0) || c.size() != g.shape(0) || bq.size() != g.shape(1) || nq.size() != g.shape(1))
        throw py::value_error("distance_epilogue: vector lengths do not match G's shape");
      backend::Backend& be = backend::get(device);
      auto dg = put(be, g), da = put(be, a), dbq = put(be, bq), dc = put(be, c), dn = put(be, nq);
      const int64_t marked = be.distance_epilogue(dg.data(), g.shape(0), g.shape(1), da.data(), dbq.data(), dc.data(),
                                                  dn.data(), euclid);
      return py::make_tuple(get(dg, {g.shape(0), g.shape(1)}), marked);
    });
  }, py::arg("device"), py::arg("G"), py::arg("sa"), py::arg("sb"), py::arg("ca"), py::arg("nb"),
     py::arg("euclid") = true);
}

}  // namespace pysafe
