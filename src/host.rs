//! Borrowed host views of candle tensors: the numeric kernels (faer GEMMs, the fit, r^2) work on
//! plain slices, and these give them one without a copy when the tensor allows it. Also the
//! borrowed [S, N, d] hidden states ([`States`]) and the element types ([`Elem`]) the fit and
//! r^2 kernels are generic over: shared by `lens::fit` and `lens::r2`, so neither borrows them
//! from the other.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Storage, Tensor};

/// Calls `f` with the contiguous f32 data of a CPU f32 tensor (copies only if not contiguous).
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        return with_f32_slice(&t, f);
    }
    let (storage, layout) = t.storage_and_layout();
    let offsets = layout.contiguous_offsets();
    match (&*storage, offsets) {
        (Storage::Cpu(cpu), Some((a, b))) => {
            let all = cpu.as_slice::<f32>()?;
            f(&all[a..b])
        }
        _ => {
            drop(storage);
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            f(&v)
        }
    }
}

/// `t` on `device`, carrying only `t`'s own elements. candle's `to_device` copies the whole
/// storage under a view: one layer's batch of rows of the [S, N, d] validation states would
/// carry all S N d values to the GPU (predict on an 8B-shaped model moved 1.6 GB per cast,
/// ~200 times). A view going to another device is first made compact where it is.
pub fn view_to_device(t: &Tensor, device: &Device) -> Result<Tensor> {
    if t.device().same_device(device) {
        return Ok(t.clone());
    }
    Ok(t.force_contiguous()?.to_device(device)?)
}

/// f32 or f64 for the Gram.
pub(crate) trait Elem: faer::traits::RealField + Copy + Send + Sync + std::fmt::Debug + 'static {
    const BYTES: usize;
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    /// dst = src - mean (mean: None = 0).
    fn convert(src: &[f32], mean: Option<&[f64]>, dst: &mut [Self]);
    /// The f32 data as `Self` when that needs no conversion.
    fn view_f32(data: &[f32]) -> Option<&[Self]>;
}

impl Elem for f32 {
    const BYTES: usize = 4;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    fn view_f32(data: &[f32]) -> Option<&[f32]> {
        Some(data)
    }
    fn convert(src: &[f32], mean: Option<&[f64]>, dst: &mut [f32]) {
        match mean {
            None => dst.copy_from_slice(src),
            Some(mu) => {
                for ((o, &x), &m) in dst.iter_mut().zip(src).zip(mu) {
                    *o = (x as f64 - m) as f32;
                }
            }
        }
    }
}

impl Elem for f64 {
    const BYTES: usize = 8;
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
    fn view_f32(_data: &[f32]) -> Option<&[f64]> {
        None
    }
    fn convert(src: &[f32], mean: Option<&[f64]>, dst: &mut [f64]) {
        match mean {
            None => {
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o = x as f64;
                }
            }
            Some(mu) => {
                for ((o, &x), &m) in dst.iter_mut().zip(src).zip(mu) {
                    *o = x as f64 - m;
                }
            }
        }
    }
}

/// A borrowed, contiguous [S, N, d] f32 array.
pub(crate) struct States<'a> {
    pub data: &'a [f32],
    pub s: usize,
    pub n: usize,
    pub d: usize,
}

impl States<'_> {
    #[inline]
    pub fn row(&self, state: usize, i: usize) -> &[f32] {
        let o = (state * self.n + i) * self.d;
        &self.data[o..o + self.d]
    }
}

/// Calls `f` with the f32 data of a [S, N, d] tensor (converted to f32 / CPU / contiguous only
/// when needed; otherwise no copy).
pub(crate) fn with_states<R>(h: &Tensor, f: impl FnOnce(States<'_>) -> Result<R>) -> Result<R> {
    let (s, n, d) = h.dims3().context("expected hidden states [S, N, d]")?;
    let h = h.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    with_f32_slice(&h, |data| f(States { data, s, n, d }))
}
