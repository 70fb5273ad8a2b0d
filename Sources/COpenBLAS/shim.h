#ifndef SWIFT_LYCORIS_COPENBLAS_SHIM_H
#define SWIFT_LYCORIS_COPENBLAS_SHIM_H

#include <stddef.h>
#include <cblas.h>

/* OpenBLAS thread pool control (exported by libopenblas, declared in its cblas.h on
   some distributions only). */
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);

/* LAPACK, Fortran calling convention. The trailing size_t is gfortran's hidden
   CHARACTER length argument; always pass 1. */
void sgesdd_(const char *jobz, const int *m, const int *n, float *a, const int *lda,
             float *s, float *u, const int *ldu, float *vt, const int *ldvt,
             float *work, const int *lwork, int *iwork, int *info, size_t jobz_len);

/* The same in double precision (T-LoRA's SVD initialisation). */
void dgesdd_(const char *jobz, const int *m, const int *n, double *a, const int *lda,
             double *s, double *u, const int *ldu, double *vt, const int *ldvt,
             double *work, const int *lwork, int *iwork, int *info, size_t jobz_len);

/* LU factorisation and solves (the Cayley transform of Diag-OFT/BOFT). */
void sgetrf_(const int *m, const int *n, float *a, const int *lda, int *ipiv, int *info);
void sgetrs_(const char *trans, const int *n, const int *nrhs, const float *a, const int *lda,
             const int *ipiv, float *b, const int *ldb, int *info, size_t trans_len);

#endif
