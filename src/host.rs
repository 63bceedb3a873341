//! Borrowed host views of candle tensors: the numeric kernels (faer GEMMs, the fit, r^2) work on
//! plain slices, and these give them one without a copy when the tensor allows it.

use anyhow::Result;
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
