// The emulated GPU: the cuSOLVER calls csrc/backend/cuda_backend.cu makes (Householder QR), with
// cuSOLVER's argument checks and devInfo, run on the handle's stream (csrc/backend/emu/mathlibs.cpp).
#pragma once

#include "cuda_runtime.h"

enum cusolverStatus_t {
  CUSOLVER_STATUS_SUCCESS = 0,
  CUSOLVER_STATUS_NOT_INITIALIZED = 1,
  CUSOLVER_STATUS_INVALID_VALUE = 3,
  CUSOLVER_STATUS_EXECUTION_FAILED = 6,
};
namespace emu {
struct SolverHandle;
}
using cusolverDnHandle_t = emu::SolverHandle*;

extern "C" {
cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* handle);
cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t handle, cudaStream_t stream);
cusolverStatus_t cusolverDnSgeqrf_bufferSize(cusolverDnHandle_t h, int m, int n, float* A, int lda, int* lwork);
cusolverStatus_t cusolverDnDgeqrf_bufferSize(cusolverDnHandle_t h, int m, int n, double* A, int lda, int* lwork);
cusolverStatus_t cusolverDnSgeqrf(cusolverDnHandle_t h, int m, int n, float* A, int lda, float* tau, float* work,
                                  int lwork, int* devInfo);
cusolverStatus_t cusolverDnDgeqrf(cusolverDnHandle_t h, int m, int n, double* A, int lda, double* tau, double* work,
                                  int lwork, int* devInfo);
cusolverStatus_t cusolverDnSorgqr_bufferSize(cusolverDnHandle_t h, int m, int n, int k, const float* A, int lda,
                                             const float* tau, int* lwork);
cusolverStatus_t cusolverDnDorgqr_bufferSize(cusolverDnHandle_t h, int m, int n, int k, const double* A, int lda,
                                             const double* tau, int* lwork);
cusolverStatus_t cusolverDnSorgqr(cusolverDnHandle_t h, int m, int n, int k, float* A, int lda, const float* tau,
                                  float* work, int lwork, int* devInfo);
cusolverStatus_t cusolverDnDorgqr(cusolverDnHandle_t h, int m, int n, int k, double* A, int lda, const double* tau,
                                  double* work, int lwork, int* devInfo);
}
