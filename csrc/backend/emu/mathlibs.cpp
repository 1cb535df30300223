// The emulated GPU's cuBLAS and cuSOLVER: the calls cuda_backend.cu makes, with the libraries'
// documented column-major semantics and argument checks, executed on the handle's stream by the
// reference BLAS/LAPACK (OpenBLAS's column-major interface), and opened through emu::dl_open/dl_sym
// by the sonames the real backend asks for. A matrix argument that is not device memory, or whose
// leading dimension and size reach past its allocation, is refused with a line on stderr, where the
// real library would fault or read garbage.
#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/emu/emu.h"
#include "cublas_v2.h"
#include "cusolverDn.h"

namespace emu {

struct BlasHandle {
  cudaStream_t stream = nullptr;
};
struct SolverHandle {
  cudaStream_t stream = nullptr;
};

namespace {

// A column-major rows×cols matrix with leading dimension ld lies in device memory.
template <typename T>
bool on_device(const char* fn, const char* arg, const T* p, int rows, int cols, int ld) {
  if (rows == 0 || cols == 0) return true;
  const size_t bytes = (static_cast<size_t>(ld) * static_cast<size_t>(cols - 1) + static_cast<size_t>(rows)) * sizeof(T);
  if (is_device(p, bytes)) return true;
  complain(std::string(fn) + ": " + arg + " (" + std::to_string(rows) + " x " + std::to_string(cols) + ", ld " +
           std::to_string(ld) + ") is not inside one device allocation");
  return false;
}

bool bad(const char* fn, const std::string& what) {
  complain(std::string(fn) + ": invalid argument: " + what);
  return true;
}

// A leading dimension below max(1, rows): invalid, as cuBLAS documents.
bool bad_ld(const char* fn, const char* name, int ld, int rows) {
  return ld < std::max(1, rows) && bad(fn, std::string(name) + " " + std::to_string(ld) + " < " + std::to_string(rows));
}

CBLAS_TRANSPOSE op(cublasOperation_t o) { return o == CUBLAS_OP_N ? CblasNoTrans : CblasTrans; }

template <typename T>
cublasStatus_t gemm(const char* fn, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                    const T* alpha, const T* A, int lda, const T* B, int ldb, const T* beta, T* C, int ldc) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  const int arows = ta == CUBLAS_OP_N ? m : k, acols = ta == CUBLAS_OP_N ? k : m;
  const int brows = tb == CUBLAS_OP_N ? k : n, bcols = tb == CUBLAS_OP_N ? n : k;
  if ((m < 0 || n < 0 || k < 0) && bad(fn, "negative m, n or k")) return CUBLAS_STATUS_INVALID_VALUE;
  if (bad_ld(fn, "lda", lda, arows) || bad_ld(fn, "ldb", ldb, brows) || bad_ld(fn, "ldc", ldc, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  if (!on_device(fn, "C", C, m, n, ldc) || (k > 0 && (!on_device(fn, "A", A, arows, acols, lda) ||
                                                      !on_device(fn, "B", B, brows, bcols, ldb))))
    return CUBLAS_STATUS_EXECUTION_FAILED;
  const T a = *alpha, b = *beta;  // pointer mode host: read at the call
  enqueue(h->stream, [=, A = on_data(A), B = on_data(B), C = on_data(C)] {
    if constexpr (std::is_same_v<T, float>)
      scipy_cblas_sgemm(CblasColMajor, op(ta), op(tb), m, n, k, a, A, lda, B, ldb, b, C, ldc);
    else
      scipy_cblas_dgemm(CblasColMajor, op(ta), op(tb), m, n, k, a, A, lda, B, ldb, b, C, ldc);
  });
  return CUBLAS_STATUS_SUCCESS;
}

// C = alpha·op(A) + beta·op(B), m×n; in place only as cuBLAS allows it (C = A with lda = ldc and
// transa = N, or the same for B). B is not read when beta is 0.
template <typename T>
cublasStatus_t geam(const char* fn, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                    const T* alpha, const T* A, int lda, const T* beta, const T* B, int ldb, T* C, int ldc) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  const int arows = ta == CUBLAS_OP_N ? m : n, acols = ta == CUBLAS_OP_N ? n : m;
  const int brows = tb == CUBLAS_OP_N ? m : n, bcols = tb == CUBLAS_OP_N ? n : m;
  if ((m < 0 || n < 0) && bad(fn, "negative m or n")) return CUBLAS_STATUS_INVALID_VALUE;
  if (bad_ld(fn, "lda", lda, arows) || bad_ld(fn, "ldb", ldb, brows) || bad_ld(fn, "ldc", ldc, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (C == A && (lda != ldc || ta != CUBLAS_OP_N) && bad(fn, "C = A in place needs lda = ldc and transa = N"))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (C == B && (ldb != ldc || tb != CUBLAS_OP_N) && bad(fn, "C = B in place needs ldb = ldc and transb = N"))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const T a = *alpha, b = *beta;
  if (!on_device(fn, "C", C, m, n, ldc) || (a != T(0) && !on_device(fn, "A", A, arows, acols, lda)) ||
      (b != T(0) && !on_device(fn, "B", B, brows, bcols, ldb)))
    return CUBLAS_STATUS_EXECUTION_FAILED;
  enqueue(h->stream, [=, A = on_data(A), B = on_data(B), C = on_data(C)] {
    std::vector<T> out(static_cast<size_t>(m) * n);
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        T v = 0;
        if (a != T(0)) v += a * (ta == CUBLAS_OP_N ? A[i + static_cast<size_t>(j) * lda] : A[j + static_cast<size_t>(i) * lda]);
        if (b != T(0)) v += b * (tb == CUBLAS_OP_N ? B[i + static_cast<size_t>(j) * ldb] : B[j + static_cast<size_t>(i) * ldb]);
        out[i + static_cast<size_t>(j) * m] = v;
      }
    for (int j = 0; j < n; ++j) std::memcpy(C + static_cast<size_t>(j) * ldc, out.data() + static_cast<size_t>(j) * m, m * sizeof(T));
  });
  return CUBLAS_STATUS_SUCCESS;
}

// geqrf's and orgqr's workspace: what LAPACK's blocked code asks for (n · 64), as cuSOLVER's own query
// returns a size the call then checks.
int work_size(int n) { return std::max(1, n) * 64; }

// geqrf's and orgqr's common checks once their dimensions are valid: the workspace as large as the
// query said, and A (m×n), tau (`ntau` values), the workspace and devInfo in device memory.
template <typename T>
cusolverStatus_t qr_operands(const char* fn, int m, int n, const T* A, int lda, const T* tau, int ntau, const T* work,
                             int lwork, const int* info) {
  if (lwork < work_size(n) && bad(fn, "lwork " + std::to_string(lwork) + " below the size the query returned"))
    return CUSOLVER_STATUS_INVALID_VALUE;
  if (!on_device(fn, "A", A, m, n, lda) || !on_device(fn, "tau", tau, ntau, 1, 1) ||
      !on_device(fn, "work", work, lwork, 1, 1) || !on_device(fn, "devInfo", info, 1, 1, 1))
    return CUSOLVER_STATUS_EXECUTION_FAILED;
  return CUSOLVER_STATUS_SUCCESS;
}

bool geqrf_dims_ok(int m, int n, int lda) { return m >= 0 && n >= 0 && lda >= std::max(1, m); }
bool orgqr_dims_ok(int m, int n, int k, int lda) { return n >= 0 && m >= n && k >= 0 && k <= n && lda >= std::max(1, m); }

// A workspace query: the size for n columns when the dimensions are valid.
cusolverStatus_t query(cusolverDnHandle_t h, bool dims_ok, int n, int* lwork) {
  if (!h) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (!dims_ok) return CUSOLVER_STATUS_INVALID_VALUE;
  *lwork = work_size(n);
  return CUSOLVER_STATUS_SUCCESS;
}

template <typename T>
cusolverStatus_t geqrf(const char* fn, cusolverDnHandle_t h, int m, int n, T* A, int lda, T* tau, T* work, int lwork,
                       int* info) {
  if (!h) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (!geqrf_dims_ok(m, n, lda) && bad(fn, "m, n or lda")) return CUSOLVER_STATUS_INVALID_VALUE;
  if (auto st = qr_operands(fn, m, n, A, lda, tau, std::min(m, n), work, lwork, info); st != CUSOLVER_STATUS_SUCCESS)
    return st;
  enqueue(h->stream, [=, A = on_data(A), tau = on_data(tau), work = on_data(work), info = on_data(info)] {
    if constexpr (std::is_same_v<T, float>)
      *info = scipy_LAPACKE_sgeqrf_work(LAPACK_COL_MAJOR, m, n, A, lda, tau, work, lwork);
    else
      *info = scipy_LAPACKE_dgeqrf_work(LAPACK_COL_MAJOR, m, n, A, lda, tau, work, lwork);
  });
  return CUSOLVER_STATUS_SUCCESS;
}

template <typename T>
cusolverStatus_t orgqr(const char* fn, cusolverDnHandle_t h, int m, int n, int k, T* A, int lda, const T* tau, T* work,
                       int lwork, int* info) {
  if (!h) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (!orgqr_dims_ok(m, n, k, lda) && bad(fn, "m, n, k or lda")) return CUSOLVER_STATUS_INVALID_VALUE;
  if (auto st = qr_operands(fn, m, n, A, lda, tau, k, work, lwork, info); st != CUSOLVER_STATUS_SUCCESS) return st;
  enqueue(h->stream, [=, A = on_data(A), tau = on_data(tau), work = on_data(work), info = on_data(info)] {
    if constexpr (std::is_same_v<T, float>)
      *info = scipy_LAPACKE_sorgqr_work(LAPACK_COL_MAJOR, m, n, k, A, lda, tau, work, lwork);
    else
      *info = scipy_LAPACKE_dorgqr_work(LAPACK_COL_MAJOR, m, n, k, A, lda, tau, work, lwork);
  });
  return CUSOLVER_STATUS_SUCCESS;
}

}  // namespace
}  // namespace emu

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = new emu::BlasHandle;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              const float* alpha, const float* A, int lda, const float* B, int ldb, const float* beta,
                              float* C, int ldc) {
  return emu::gemm("cublasSgemm", h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}
cublasStatus_t cublasDgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              const double* alpha, const double* A, int lda, const double* B, int ldb,
                              const double* beta, double* C, int ldc) {
  return emu::gemm("cublasDgemm", h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}
// C (n×n, the `uplo` triangle only) = alpha·op(A)·op(A)ᵀ + beta·C, op(A) n×k.
cublasStatus_t cublasDsyrk_v2(cublasHandle_t h, cublasFillMode_t uplo, cublasOperation_t trans, int n, int k,
                              const double* alpha, const double* A, int lda, const double* beta, double* C, int ldc) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  const char* fn = "cublasDsyrk";
  const int arows = trans == CUBLAS_OP_N ? n : k, acols = trans == CUBLAS_OP_N ? k : n;
  if (((n < 0 || k < 0) && emu::bad(fn, "negative n or k")) || emu::bad_ld(fn, "lda", lda, arows) ||
      emu::bad_ld(fn, "ldc", ldc, n))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (n == 0) return CUBLAS_STATUS_SUCCESS;
  if (!emu::on_device(fn, "C", C, n, n, ldc) || (k > 0 && !emu::on_device(fn, "A", A, arows, acols, lda)))
    return CUBLAS_STATUS_EXECUTION_FAILED;
  const double a = *alpha, b = *beta;
  emu::enqueue(h->stream, [=, A = emu::on_data(A), C = emu::on_data(C)] {
    scipy_cblas_dsyrk(CblasColMajor, uplo == CUBLAS_FILL_MODE_LOWER ? CblasLower : CblasUpper, emu::op(trans), n, k, a,
                      A, lda, b, C, ldc);
  });
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSgeam(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                           const float* alpha, const float* A, int lda, const float* beta, const float* B, int ldb,
                           float* C, int ldc) {
  return emu::geam("cublasSgeam", h, ta, tb, m, n, alpha, A, lda, beta, B, ldb, C, ldc);
}
cublasStatus_t cublasDgeam(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                           const double* alpha, const double* A, int lda, const double* beta, const double* B, int ldb,
                           double* C, int ldc) {
  return emu::geam("cublasDgeam", h, ta, tb, m, n, alpha, A, lda, beta, B, ldb, C, ldc);
}

cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* handle) {
  *handle = new emu::SolverHandle;
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t handle, cudaStream_t stream) {
  if (!handle) return CUSOLVER_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnSgeqrf_bufferSize(cusolverDnHandle_t h, int m, int n, float*, int lda, int* lwork) {
  return emu::query(h, emu::geqrf_dims_ok(m, n, lda), n, lwork);
}
cusolverStatus_t cusolverDnDgeqrf_bufferSize(cusolverDnHandle_t h, int m, int n, double*, int lda, int* lwork) {
  return emu::query(h, emu::geqrf_dims_ok(m, n, lda), n, lwork);
}
cusolverStatus_t cusolverDnSgeqrf(cusolverDnHandle_t h, int m, int n, float* A, int lda, float* tau, float* work,
                                  int lwork, int* devInfo) {
  return emu::geqrf("cusolverDnSgeqrf", h, m, n, A, lda, tau, work, lwork, devInfo);
}
cusolverStatus_t cusolverDnDgeqrf(cusolverDnHandle_t h, int m, int n, double* A, int lda, double* tau, double* work,
                                  int lwork, int* devInfo) {
  return emu::geqrf("cusolverDnDgeqrf", h, m, n, A, lda, tau, work, lwork, devInfo);
}
cusolverStatus_t cusolverDnSorgqr_bufferSize(cusolverDnHandle_t h, int m, int n, int k, const float*, int lda,
                                             const float*, int* lwork) {
  return emu::query(h, emu::orgqr_dims_ok(m, n, k, lda), n, lwork);
}
cusolverStatus_t cusolverDnDorgqr_bufferSize(cusolverDnHandle_t h, int m, int n, int k, const double*, int lda,
                                             const double*, int* lwork) {
  return emu::query(h, emu::orgqr_dims_ok(m, n, k, lda), n, lwork);
}
cusolverStatus_t cusolverDnSorgqr(cusolverDnHandle_t h, int m, int n, int k, float* A, int lda, const float* tau,
                                  float* work, int lwork, int* devInfo) {
  return emu::orgqr("cusolverDnSorgqr", h, m, n, k, A, lda, tau, work, lwork, devInfo);
}
cusolverStatus_t cusolverDnDorgqr(cusolverDnHandle_t h, int m, int n, int k, double* A, int lda, const double* tau,
                                  double* work, int lwork, int* devInfo) {
  return emu::orgqr("cusolverDnDorgqr", h, m, n, k, A, lda, tau, work, lwork, devInfo);
}

}  // extern "C"

// ---- opening the libraries -------------------------------------------------------------------------------

namespace emu {

namespace {

struct Symbol {
  const char* name;
  void* address;
};
#define PYSAFE_EMU_SYM(f) Symbol{#f, reinterpret_cast<void*>(&::f)}
const Symbol kBlas[] = {PYSAFE_EMU_SYM(cublasCreate_v2), PYSAFE_EMU_SYM(cublasSetStream_v2),
                        PYSAFE_EMU_SYM(cublasSgemm_v2),  PYSAFE_EMU_SYM(cublasDgemm_v2),
                        PYSAFE_EMU_SYM(cublasDsyrk_v2),  PYSAFE_EMU_SYM(cublasSgeam),
                        PYSAFE_EMU_SYM(cublasDgeam)};
const Symbol kSolver[] = {PYSAFE_EMU_SYM(cusolverDnCreate),           PYSAFE_EMU_SYM(cusolverDnSetStream),
                          PYSAFE_EMU_SYM(cusolverDnSgeqrf_bufferSize), PYSAFE_EMU_SYM(cusolverDnDgeqrf_bufferSize),
                          PYSAFE_EMU_SYM(cusolverDnSgeqrf),            PYSAFE_EMU_SYM(cusolverDnDgeqrf),
                          PYSAFE_EMU_SYM(cusolverDnSorgqr_bufferSize), PYSAFE_EMU_SYM(cusolverDnDorgqr_bufferSize),
                          PYSAFE_EMU_SYM(cusolverDnSorgqr),            PYSAFE_EMU_SYM(cusolverDnDorgqr)};
#undef PYSAFE_EMU_SYM

struct Library {
  const char* soname;
  const char* family;  // what PYSAFE_CUDA_EMU_HIDE names
  const Symbol* symbols;
  size_t count;
};
const Library kLibraries[] = {{"libcublas.so.13", "cublas", kBlas, sizeof kBlas / sizeof *kBlas},
                              {"libcusolver.so.12", "cusolver", kSolver, sizeof kSolver / sizeof *kSolver}};

bool hidden(const char* family) {
  const char* h = std::getenv("PYSAFE_CUDA_EMU_HIDE");
  return h && std::string(h).find(family) != std::string::npos;
}

}  // namespace

void* dl_open(const char* name, int) {
  for (const Library& lib : kLibraries)
    if (std::strcmp(name, lib.soname) == 0 && !hidden(lib.family)) return const_cast<Library*>(&lib);
  return nullptr;  // another soname (the backend tries the CUDA 13 ones first), or hidden
}

void* dl_sym(void* handle, const char* symbol) {
  const auto* lib = static_cast<const Library*>(handle);
  for (size_t i = 0; i < lib->count; ++i)
    if (std::strcmp(symbol, lib->symbols[i].name) == 0) return lib->symbols[i].address;
  return nullptr;
}

}  // namespace emu
