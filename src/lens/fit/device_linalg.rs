//! Factorisations of symmetric float64 matrices on a CUDA device, through cuSOLVER: the
//! eigendecomposition (`syevd`, divide and conquer) and the inverse of a positive definite matrix
//! through its Cholesky factor (`potrf` + `potri`).
//!
//! Why by hand: candle has no factorisation on the GPU, and the host ones (faer's, single-threaded
//! per matrix) were where the 8B-shaped study spent most of two stages: the sub-module maps (128
//! least-norm maps from 3,000 examples, each needing the spectrum of its 3,000 x 3,000 examples'
//! Gram for scikit-learn's cutoff, [`super::few_rows`]: 142 s of the stage's 224 s on 16 cores),
//! and the fit from statistics (32 inverses of 4096 x 4096 source Grams, [`super::stats`]: 15.6 s
//! of factorisation plus the copies of the Grams to the host and of the inverses back). cudarc,
//! the CUDA layer under candle, carries cuSOLVER's entry points; this module is the thin call of
//! them on a candle tensor's storage.

#[cfg(feature = "cuda")]
use candle_core::Tensor;

/// Eigenvalues in ascending order ([n], f64) and eigenvectors (row `j` of the [n, n] f64 result
/// is the unit eigenvector of eigenvalue `j`) of a symmetric f64 matrix `[n, n]` on a CUDA
/// device. Only the lower triangle is read.
#[cfg(feature = "cuda")]
pub fn sym_eigen(m: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
    let (n, n2) = m.dims2()?;
    anyhow::ensure!(n == n2, "eigendecomposition of a non-square [{n}, {n2}] matrix");
    let packed = m.contiguous()?.apply_op1_no_bwd(&cuda::SymEigen)?;
    Ok((packed.get(n)?, packed.narrow(0, 0, n)?))
}

/// The inverse of a symmetric positive definite f64 matrix `[n, n]` on a CUDA device through its
/// Cholesky factor (cuSOLVER `potrf` + `potri`), both triangles filled; `None` when the
/// factorisation fails (the matrix is not numerically positive definite). Only the lower
/// triangle is read.
#[cfg(feature = "cuda")]
pub fn sym_inverse_cholesky(m: &Tensor) -> anyhow::Result<Option<Tensor>> {
    let (n, n2) = m.dims2()?;
    anyhow::ensure!(n == n2, "inverse of a non-square [{n}, {n2}] matrix");
    let packed = m.contiguous()?.apply_op1_no_bwd(&cuda::CholInverse)?;
    let info = packed.get(n)?.get(0)?.to_scalar::<f64>()?;
    if info != 0.0 {
        return Ok(None);
    }
    // cuSOLVER filled the lower triangle of the column-major matrix, which read row-major is the
    // upper one; the other triangle still holds input. Mirror the upper triangle.
    let upper = packed.narrow(0, 0, n)?;
    let dev = m.device();
    let on_and_above = Tensor::triu2(n, candle_core::DType::F64, dev)?;
    let above = (&on_and_above - Tensor::eye(n, candle_core::DType::F64, dev)?)?;
    let full = ((&upper * &on_and_above)? + (&upper * &above)?.t()?)?;
    Ok(Some(full.contiguous()?))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cusolver::{sys, DnHandle};
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, Layout, Result, Shape};

    /// The packed result `[n + 1, n]`: rows `0..n` the eigenvectors (cuSOLVER writes them as the
    /// columns of a column-major matrix, which read row-major are its rows), row `n` the
    /// eigenvalues; one allocation, one custom op.
    pub(super) struct SymEigen;

    fn solver_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuSOLVER {what}: {e:?}"))
    }

    /// A packed `[n + 1, n]` f64 output buffer whose rows `0..n` hold a copy of the op's input
    /// (row `n` zeroed), with the device, its stream and a cuSOLVER handle on that stream: what
    /// both ops start from (cuSOLVER factorises in place).
    struct Packed {
        out: CudaSlice<f64>,
        n: usize,
        ni: i32,
        dev: CudaDevice,
        stream: Arc<CudaStream>,
        handle: DnHandle,
    }

    /// [`Packed`] for the contiguous f64 `[n, n]` input `s` / `l` of the op `what`.
    fn packed_input(s: &CudaStorage, l: &Layout, what: &str) -> Result<Packed> {
        let (n, _) = l.shape().dims2()?;
        let src = match &s.slice {
            CudaStorageSlice::F64(v) => v,
            _ => bail!("{what}: needs f64, got {:?}", s.dtype()),
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("{what}: needs a contiguous matrix")
        };
        let ni = i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what}: n = {n} too large")))?;
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let mut out = dev.alloc_zeros::<f64>(n * n + n)?;
        stream
            .memcpy_dtod(&src.slice(start..end), &mut out.slice_mut(0..n * n))
            .w()?;
        let handle = DnHandle::new(stream.clone()).map_err(|e| solver_err("handle", e))?;
        Ok(Packed {
            out,
            n,
            ni,
            dev,
            stream,
            handle,
        })
    }

    impl candle_core::CustomOp1 for SymEigen {
        fn name(&self) -> &'static str {
            "jumplens-sym-eigen"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the cuSOLVER eigendecomposition runs on CUDA only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let Packed {
                mut out,
                n,
                ni,
                dev,
                stream,
                handle,
            } = packed_input(s, l, "eigendecomposition")?;
            let jobz = sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
            let uplo = sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
            let mut lwork: i32 = 0;
            {
                let (a, _a_sync) = out.device_ptr_mut(&stream);
                let w = a + (n * n * std::mem::size_of::<f64>()) as u64;
                // SAFETY: `a` holds n x n f64 and `w` n more, on the handle's stream.
                unsafe {
                    sys::cusolverDnDsyevd_bufferSize(
                        handle.cu(),
                        jobz,
                        uplo,
                        ni,
                        a as *const f64,
                        ni,
                        w as *const f64,
                        &mut lwork,
                    )
                }
                .result()
                .map_err(|e| solver_err("workspace size", e))?;
            }
            let lwork_len = usize::try_from(lwork.max(1)).unwrap_or(1);
            // SAFETY: scratch space, written by syevd before it is read.
            let mut work = unsafe { dev.alloc::<f64>(lwork_len)? };
            let mut info = dev.alloc_zeros::<i32>(1)?;
            {
                let (a, _a_sync) = out.device_ptr_mut(&stream);
                let w = a + (n * n * std::mem::size_of::<f64>()) as u64;
                let (wk, _wk_sync) = work.device_ptr_mut(&stream);
                let (inf, _inf_sync) = info.device_ptr_mut(&stream);
                // SAFETY: the buffers are sized as syevd's documentation asks, on one stream.
                unsafe {
                    sys::cusolverDnDsyevd(
                        handle.cu(),
                        jobz,
                        uplo,
                        ni,
                        a as *mut f64,
                        ni,
                        w as *mut f64,
                        wk as *mut f64,
                        lwork,
                        inf as *mut i32,
                    )
                }
                .result()
                .map_err(|e| solver_err("syevd", e))?;
            }
            let info = stream.clone_dtoh(&info).w()?;
            if info[0] != 0 {
                bail!(
                    "eigendecomposition did not converge (cuSOLVER syevd info {}): the matrix holds non-finite values or is badly scaled",
                    info[0]
                )
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n + 1, n))))
        }
    }

    /// The packed result `[n + 1, n]`: rows `0..n` the inverse (valid in the lower triangle of the
    /// column-major matrix), row `n` cuSOLVER's `info` in its first entry (0: success).
    pub(super) struct CholInverse;

    impl candle_core::CustomOp1 for CholInverse {
        fn name(&self) -> &'static str {
            "jumplens-cholesky-inverse"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the cuSOLVER Cholesky inverse runs on CUDA only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            // Row n of the packed buffer carries `info` in its first entry and zeros elsewhere.
            let Packed {
                mut out,
                n,
                ni,
                dev,
                stream,
                handle,
            } = packed_input(s, l, "Cholesky inverse")?;
            let uplo = sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
            let (mut lwork_f, mut lwork_i): (i32, i32) = (0, 0);
            {
                let (a, _a_sync) = out.device_ptr_mut(&stream);
                // SAFETY: `a` holds n x n f64, on the handle's stream.
                unsafe {
                    sys::cusolverDnDpotrf_bufferSize(handle.cu(), uplo, ni, a as *mut f64, ni, &mut lwork_f)
                        .result()
                        .map_err(|e| solver_err("potrf workspace size", e))?;
                    sys::cusolverDnDpotri_bufferSize(handle.cu(), uplo, ni, a as *mut f64, ni, &mut lwork_i)
                        .result()
                        .map_err(|e| solver_err("potri workspace size", e))?;
                }
            }
            let lwork = lwork_f.max(lwork_i).max(1);
            // SAFETY: scratch space, written by potrf / potri before it is read.
            let mut work = unsafe { dev.alloc::<f64>(usize::try_from(lwork).unwrap_or(1))? };
            let mut info = dev.alloc_zeros::<i32>(1)?;
            let mut status = 0i32;
            for step in ["potrf", "potri"] {
                {
                    let (a, _a_sync) = out.device_ptr_mut(&stream);
                    let (wk, _wk_sync) = work.device_ptr_mut(&stream);
                    let (inf, _inf_sync) = info.device_ptr_mut(&stream);
                    // SAFETY: the buffers are sized as cuSOLVER's documentation asks, on one stream.
                    let r = unsafe {
                        if step == "potrf" {
                            sys::cusolverDnDpotrf(
                                handle.cu(),
                                uplo,
                                ni,
                                a as *mut f64,
                                ni,
                                wk as *mut f64,
                                lwork,
                                inf as *mut i32,
                            )
                        } else {
                            sys::cusolverDnDpotri(
                                handle.cu(),
                                uplo,
                                ni,
                                a as *mut f64,
                                ni,
                                wk as *mut f64,
                                lwork,
                                inf as *mut i32,
                            )
                        }
                    };
                    r.result().map_err(|e| solver_err(step, e))?;
                }
                status = stream.clone_dtoh(&info).w()?[0];
                if status != 0 {
                    break;
                }
            }
            if status != 0 {
                stream
                    .memcpy_htod(&[f64::from(status)], &mut out.slice_mut(n * n..n * n + 1))
                    .w()?;
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n + 1, n))))
        }
    }
}
