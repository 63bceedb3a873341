//! The Gram's in-place accumulation through cuBLAS ([`gram_add`]: `syrk` for diagonal blocks,
//! `gemm` with beta = 1), and factorisations of symmetric float64 matrices on a CUDA device,
//! through cuSOLVER: the
//! eigendecomposition (`syevd`, divide and conquer) and the inverse of a positive definite matrix
//! through its Cholesky factor (`potrf`, then `potrs` on the identity: two triangular solves with
//! n right-hand sides, cuBLAS-speed work, where `potri` goes through a triangular inverse).
//!
//! Why by hand: candle has no factorisation on the GPU, and the host ones (faer's, single-threaded
//! per matrix) were where the 8B-shaped study spent most of two stages: the sub-module maps (128
//! least-norm maps from 3,000 examples, each needing the spectrum of its 3,000 x 3,000 examples'
//! Gram for scikit-learn's cutoff, [`super::few_rows`]: 142 s of the stage's 224 s on 16 cores),
//! and the fit from statistics (32 inverses of 4096 x 4096 source Grams, [`super::stats`]: 15.6 s
//! of factorisation plus the copies of the Grams to the host and of the inverses back). cudarc,
//! the CUDA layer under candle, carries cuSOLVER's entry points; this module is the thin call of
//! them on a candle tensor's storage.

use candle_core::Tensor;

/// Eigenvalues in ascending order ([n], f64) and eigenvectors (row `j` of the [n, n] f64 result
/// is the unit eigenvector of eigenvalue `j`) of a symmetric f64 matrix `[n, n]` on a CUDA
/// device. Only the lower triangle is read.
#[cfg(feature = "cuda")]
pub fn sym_eigen(m: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
    let (n, n2) = m.dims2()?;
    anyhow::ensure!(n == n2, "eigendecomposition of a non-square [{n}, {n2}] matrix");
    let packed = m.contiguous()?.apply_op1_no_bwd(&cuda::SymEigen)?;
    // The eigenvalues copied out of the packed buffer: a host read of the row as a view would
    // bring the whole [n + 1, n] storage across (see `sym_inverse_cholesky`).
    Ok((packed.get(n)?.force_contiguous()?, packed.narrow(0, 0, n)?))
}

/// The inverse of a symmetric positive definite f64 matrix `[n, n]` on a CUDA device through its
/// Cholesky factor (cuSOLVER `potrf`, then `potrs` with the identity as right-hand side),
/// symmetrised; `None` when the factorisation fails (the matrix is not numerically positive
/// definite). Only the lower triangle is read.
#[cfg(feature = "cuda")]
pub fn sym_inverse_cholesky(m: &Tensor) -> anyhow::Result<Option<Tensor>> {
    let (n, n2) = m.dims2()?;
    anyhow::ensure!(n == n2, "inverse of a non-square [{n}, {n2}] matrix");
    let eye = Tensor::eye(n, candle_core::DType::F64, m.device())?;
    let packed = m.contiguous()?.apply_op2_no_bwd(&eye, &cuda::CholInverse)?;
    // `info` copied out first (force_contiguous: `contiguous` keeps a contiguous view as it is):
    // candle's host read of a view copies the whole storage under it, here all [n + 1, n] values
    // (~95 ms of an 8B-shaped source's ~105 ms inverse on the H200).
    let info = packed.get(n)?.narrow(0, 0, 1)?.force_contiguous()?.to_vec1::<f64>()?[0];
    if info != 0.0 {
        return Ok(None);
    }
    // potrs wrote G^-1 column-major, which read row-major is its transpose: the same matrix up
    // to rounding. The average makes it exactly symmetric, as the host path's mirrored triangle.
    let p = packed.narrow(0, 0, n)?;
    let p = ((&p + p.t()?)? * 0.5)?.contiguous()?;
    Ok(Some(p))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cusolver::{sys, DnHandle};
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, Layout, Result, Shape};

    thread_local! {
        /// One cuSOLVER handle per stream, kept rather than made (cusolverDnCreate) and
        /// destroyed by every call.
        static SOLVER_HANDLES: std::cell::RefCell<Vec<(usize, std::rc::Rc<DnHandle>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    /// The kept cuSOLVER handle of `stream` (made on first use).
    fn solver_handle(stream: &Arc<CudaStream>) -> Result<std::rc::Rc<DnHandle>> {
        let key = Arc::as_ptr(stream) as usize;
        SOLVER_HANDLES.with(|handles| {
            let mut handles = handles.borrow_mut();
            if let Some((_, h)) = handles.iter().find(|(k, _)| *k == key) {
                return Ok(h.clone());
            }
            let h = std::rc::Rc::new(DnHandle::new(stream.clone()).map_err(|e| solver_err("handle", e))?);
            handles.push((key, h.clone()));
            Ok(h)
        })
    }

    /// Wall time of each step of an op (the stream synchronised at each mark), printed to
    /// stderr when `JUMPLENS_SOLVE_TRACE` is set.
    struct OpTrace<'a> {
        stream: Option<&'a Arc<CudaStream>>,
        what: &'static str,
        last: std::time::Instant,
        steps: Vec<(&'static str, f64)>,
    }

    impl<'a> OpTrace<'a> {
        fn new(stream: &'a Arc<CudaStream>, what: &'static str) -> Self {
            let on = std::env::var_os("JUMPLENS_SOLVE_TRACE").is_some();
            OpTrace {
                stream: on.then_some(stream),
                what,
                last: std::time::Instant::now(),
                steps: Vec::new(),
            }
        }
        fn since(&mut self, start: std::time::Instant) {
            self.last = start;
        }
        fn mark(&mut self, step: &'static str) {
            if let Some(stream) = self.stream {
                let _ = stream.synchronize();
                self.steps.push((step, self.last.elapsed().as_secs_f64() * 1e3));
                self.last = std::time::Instant::now();
            }
        }
        fn finish(&self, n: usize) {
            if self.stream.is_some() {
                let steps: Vec<String> = self.steps.iter().map(|(s, ms)| format!("{s} {ms:.1} ms")).collect();
                eprintln!("{} n={n}: {}", self.what, steps.join(", "));
            }
        }
    }

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
        handle: std::rc::Rc<DnHandle>,
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
        let handle = solver_handle(&stream)?;
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

    /// The packed result `[n + 1, n]`: rows `0..n` the inverse (column-major), row `n`
    /// cuSOLVER's `info` in its first entry (0: success). Inputs: the matrix and the identity
    /// (the right-hand side `potrs` overwrites with the inverse).
    pub(super) struct CholInverse;

    impl candle_core::CustomOp2 for CholInverse {
        fn name(&self) -> &'static str {
            "jumplens-cholesky-inverse"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the cuSOLVER Cholesky inverse runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
            eye: &CudaStorage,
            eye_l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let started = std::time::Instant::now();
            // `factor` starts as a copy of the matrix (potrf factorises in place); `rhs` (the
            // output) as a copy of the identity, with row n for `info`.
            let Packed {
                out: mut factor,
                n,
                ni,
                dev,
                stream,
                handle,
            } = packed_input(s, l, "Cholesky inverse")?;
            let mut trace = OpTrace::new(&stream, "cholesky inverse");
            trace.since(started);
            trace.mark("handle and copy");
            let mut rhs = dev.alloc_zeros::<f64>(n * n + n)?;
            match (&eye.slice, eye_l.contiguous_offsets()) {
                (CudaStorageSlice::F64(v), Some((a, b))) if b - a == n * n => {
                    stream.memcpy_dtod(&v.slice(a..b), &mut rhs.slice_mut(0..n * n)).w()?
                }
                _ => bail!("Cholesky inverse: the identity must be a contiguous f64 [{n}, {n}]"),
            }
            let uplo = sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
            let mut lwork: i32 = 0;
            {
                let (a, _a_sync) = factor.device_ptr_mut(&stream);
                // SAFETY: `a` holds n x n f64, on the handle's stream.
                unsafe {
                    sys::cusolverDnDpotrf_bufferSize(handle.cu(), uplo, ni, a as *mut f64, ni, &mut lwork)
                        .result()
                        .map_err(|e| solver_err("potrf workspace size", e))?;
                }
            }
            // SAFETY: scratch space, written by potrf before it is read.
            let mut work = unsafe { dev.alloc::<f64>(usize::try_from(lwork.max(1)).unwrap_or(1))? };
            let mut info = dev.alloc_zeros::<i32>(1)?;
            {
                let (a, _a_sync) = factor.device_ptr_mut(&stream);
                let (wk, _wk_sync) = work.device_ptr_mut(&stream);
                let (inf, _inf_sync) = info.device_ptr_mut(&stream);
                // SAFETY: the buffers are sized as cuSOLVER's documentation asks, on one stream.
                unsafe {
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
                }
                .result()
                .map_err(|e| solver_err("potrf", e))?;
            }
            let status = stream.clone_dtoh(&info).w()?[0];
            trace.mark("potrf");
            if status == 0 {
                // G^-1 = L^-T L^-1: two triangular solves on the identity, L Y = I then L^T X = Y
                // (cuBLAS trsm; potrf + potrs took 99 ms per 4096 x 4096 inverse on the H200).
                use candle_core::cuda_backend::cudarc::cublas::sys as blas_sys;
                let blas = dev.cublas_handle();
                let one = 1f64;
                let (a, _a_sync) = factor.device_ptr_mut(&stream);
                let (b, _b_sync) = rhs.device_ptr_mut(&stream);
                for trans in [
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                ] {
                    // SAFETY: `a` holds the n x n factor (lower triangle), `b` n x n right-hand
                    // sides (then one spare row), on candle's stream, which both handles use.
                    unsafe {
                        blas_sys::cublasDtrsm_v2(
                            *blas.handle(),
                            blas_sys::cublasSideMode_t::CUBLAS_SIDE_LEFT,
                            blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                            trans,
                            blas_sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                            ni,
                            ni,
                            &one,
                            a as *const f64,
                            ni,
                            b as *mut f64,
                            ni,
                        )
                    }
                    .result()
                    .map_err(|e| solver_err("trsm", e))?;
                }
            }
            trace.mark("trsm");
            trace.finish(n);
            if status != 0 {
                stream
                    .memcpy_htod(&[f64::from(status)], &mut rhs.slice_mut(n * n..n * n + 1))
                    .w()?;
            }
            Ok((CudaStorage::wrap_cuda_slice(rhs, dev), Shape::from((n + 1, n))))
        }
    }
}

/// Adds the products of one chunk of examples to a Gram accumulator, in place: with `zt` the
/// chunk's `Z^T` ([K d, rows] row-major f64, state c in rows c d..(c + 1) d) and `x` =
/// `zt[source_row..source_row + d]` ([d, rows], the source's `X^T`), adds
/// `zt[band_row..band_row + m] x^T` ([m, d]) to `acc` ([m, d] row-major f64). When the band is
/// the source itself (the diagonal block) only the upper triangle of `acc` (row-major) is
/// written on a GPU: cuBLAS `syrk`, half the flops of a GEMM; the caller mirrors it
/// ([`mirror_upper`]). Elsewhere cuBLAS `gemm` with beta = 1 accumulates in place (no product
/// tensor and no addition per chunk); on the CPU (the tests) faer's GEMM does both triangles.
///
/// Why by hand: candle has no symmetric rank-k update and no accumulating matmul.
pub fn gram_add(acc: &Tensor, zt: &Tensor, band_row: usize, source_row: usize, d: usize) -> anyhow::Result<()> {
    let (m, dd) = acc.dims2()?;
    let (kd, rows) = zt.dims2()?;
    anyhow::ensure!(
        dd == d && band_row + m <= kd && source_row + d <= kd && zt.is_contiguous() && acc.is_contiguous(),
        "gram_add: accumulator [{m}, {dd}] does not fit the chunk [{kd}, {rows}] at rows {band_row} / {source_row}"
    );
    acc.inplace_op2(
        zt,
        &GramAdd {
            band_row,
            source_row,
            m,
            d,
            rows,
        },
    )?;
    Ok(())
}

/// `g` with its strictly lower triangle replaced by the mirror of its upper one (what a
/// [`gram_add`] diagonal accumulator holds on a GPU).
pub fn mirror_upper(g: &Tensor) -> anyhow::Result<Tensor> {
    let n = g.dim(0)?;
    let dev = g.device();
    let on_and_above = Tensor::triu2(n, candle_core::DType::F64, dev)?;
    let above = (&on_and_above - Tensor::eye(n, candle_core::DType::F64, dev)?)?;
    Ok(((g * &on_and_above)? + (g * &above)?.t()?)?.contiguous()?)
}

struct GramAdd {
    band_row: usize,
    source_row: usize,
    m: usize,
    d: usize,
    rows: usize,
}

impl candle_core::InplaceOp2 for GramAdd {
    fn name(&self) -> &'static str {
        "jumplens-gram-add"
    }

    fn cpu_fwd(
        &self,
        acc: &mut candle_core::CpuStorage,
        acc_l: &candle_core::Layout,
        zt: &candle_core::CpuStorage,
        zt_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        use faer::{Accum, MatMut, MatRef, Par};
        let (CpuStorage::F64(acc), CpuStorage::F64(zt)) = (acc, zt) else {
            candle_core::bail!("gram_add: needs f64 tensors")
        };
        let (Some((a0, a1)), Some((z0, _))) = (acc_l.contiguous_offsets(), zt_l.contiguous_offsets()) else {
            candle_core::bail!("gram_add: needs contiguous tensors")
        };
        let (m, d, rows) = (self.m, self.d, self.rows);
        let band = MatRef::from_row_major_slice(&zt[z0 + self.band_row * rows..][..m * rows], m, rows);
        let x = MatRef::from_row_major_slice(&zt[z0 + self.source_row * rows..][..d * rows], d, rows);
        faer::linalg::matmul::matmul(
            MatMut::from_row_major_slice_mut(&mut acc[a0..a1], m, d),
            Accum::Add,
            band,
            x.transpose(),
            1.0,
            Par::rayon(0),
        );
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        acc_l: &candle_core::Layout,
        zt: &candle_core::CudaStorage,
        zt_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::sys;
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        use candle_core::cuda_backend::CudaStorageSlice;
        let dev = acc.device.clone();
        let stream = dev.cuda_stream();
        let (Some((a0, a1)), Some((z0, z1))) = (acc_l.contiguous_offsets(), zt_l.contiguous_offsets()) else {
            candle_core::bail!("gram_add: needs contiguous tensors")
        };
        let (CudaStorageSlice::F64(acc), CudaStorageSlice::F64(zt)) = (&mut acc.slice, &zt.slice) else {
            candle_core::bail!("gram_add: needs f64 tensors")
        };
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gram_add: {v} too large for cuBLAS")))
        };
        let (m, d, rows) = (int(self.m)?, int(self.d)?, int(self.rows)?);
        let blas = dev.cublas_handle();
        let (one, f64s) = (1f64, std::mem::size_of::<f64>() as u64);
        let mut acc = acc.slice_mut(a0..a1);
        let zt = zt.slice(z0..z1);
        let (c, _c_sync) = acc.device_ptr_mut(&stream);
        let (z, _z_sync) = zt.device_ptr(&stream);
        // Column-major, the chunk's rows are the data matrix: `zt[r..r + k]` is the [rows, k]
        // matrix of k states' coordinates with leading dimension `rows`; `acc` [m, d] row-major
        // is the column-major [d, m] matrix C = X^T B with leading dimension d.
        let x = z + (self.source_row * self.rows) as u64 * f64s;
        let band = z + (self.band_row * self.rows) as u64 * f64s;
        // SAFETY: the pointers address the bounds checked by `gram_add` on candle's stream, which
        // the cuBLAS handle runs on.
        let status = unsafe {
            if self.band_row == self.source_row && self.m == self.d {
                sys::cublasDsyrk_v2(
                    *blas.handle(),
                    sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    d,
                    rows,
                    &one,
                    x as *const f64,
                    rows,
                    &one,
                    c as *mut f64,
                    d,
                )
            } else {
                sys::cublasDgemm_v2(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    d,
                    m,
                    rows,
                    &one,
                    x as *const f64,
                    rows,
                    band as *const f64,
                    rows,
                    &one,
                    c as *mut f64,
                    d,
                )
            }
        };
        status
            .result()
            .map_err(|e| candle_core::Error::Msg(format!("cuBLAS gram_add: {e:?}")))?;
        Ok(())
    }
}
