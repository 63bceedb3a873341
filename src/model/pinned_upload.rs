//! Checkpoint bytes to one CUDA device through two page-locked staging buffers that all cores
//! fill while the previous one is being copied.
//!
//! Why by hand: candle's `Tensor::from_raw_buffer(..).to_device(..)` copies each tensor from the
//! mapped file into a fresh host `Vec` on one thread, then hands that pageable memory to the
//! driver, which stages it again through its own pinned buffer. For the 16 GB of an 8B-shaped
//! bf16 checkpoint that was ~13 s of every stage that loads the model (README, issue 13). Here the
//! mapped pages are read by every core straight into pinned memory (faulting them in from the
//! page cache in parallel) and the copy to the device runs asynchronously from there, overlapping
//! the next fill. candle has no such loader; cudarc gives the pinned memory and the async copy.

use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaEvent, CudaSlice, DevicePtrMut, PinnedHostSlice};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};
use rayon::prelude::*;

/// Bytes per staging buffer: large enough that a copy's fixed cost is small, small enough that
/// two of them are a rounding error next to the weights.
const CHUNK: usize = 64 << 20;
/// Bytes each thread copies at a time when filling a buffer.
const PIECE: usize = 1 << 20;

pub struct PinnedUploader {
    device: CudaDevice,
    buffers: [PinnedHostSlice<u8>; 2],
    /// The copy last issued from each buffer (waited for before the buffer is refilled).
    pending: [Option<CudaEvent>; 2],
    next: usize,
}

impl PinnedUploader {
    pub fn new(device: &CudaDevice) -> Result<Self> {
        let ctx = device.cuda_stream().context().clone();
        // SAFETY: the buffers are written before any byte of them is read (by the copies).
        let alloc = || unsafe { ctx.alloc_pinned::<u8>(CHUNK) }.map_err(|e| anyhow!("pinned host memory: {e:?}"));
        Ok(Self {
            device: device.clone(),
            buffers: [alloc()?, alloc()?],
            pending: [None, None],
            next: 0,
        })
    }

    /// A tensor of `dtype` and `shape` on the device, holding `bytes` (the stored little-endian
    /// elements, as a safetensors file lays them out).
    pub fn upload(&mut self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        anyhow::ensure!(
            n * dtype.size_in_bytes() == bytes.len(),
            "{} bytes for {n} elements of {dtype:?}",
            bytes.len()
        );
        let storage = match dtype {
            DType::BF16 => self.copy::<half::bf16>(bytes, n)?,
            DType::F16 => self.copy::<half::f16>(bytes, n)?,
            DType::F32 => self.copy::<f32>(bytes, n)?,
            DType::F64 => self.copy::<f64>(bytes, n)?,
            other => anyhow::bail!("no pinned upload for {other:?}"),
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }

    fn copy<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &mut self,
        bytes: &[u8],
        n: usize,
    ) -> Result<CudaStorage> {
        let stream = self.device.cuda_stream();
        // SAFETY: every byte is written by the copies below before the tensor is used (the
        // copies are on the tensor's stream, ahead of any kernel reading it).
        let mut dst: CudaSlice<T> = unsafe { self.device.alloc::<T>(n.max(1))? };
        {
            let (base, _record) = dst.device_ptr_mut(&stream);
            for (i, src) in bytes.chunks(CHUNK).enumerate() {
                let b = self.next;
                self.next ^= 1;
                if let Some(ev) = self.pending[b].take() {
                    ev.synchronize().w()?;
                }
                let host = self.buffers[b].as_mut_slice().w()?;
                let host = &mut host[..src.len()];
                host.par_chunks_mut(PIECE)
                    .zip(src.par_chunks(PIECE))
                    .for_each(|(d, s)| d.copy_from_slice(s));
                let at = base + (i * CHUNK) as sys::CUdeviceptr;
                // SAFETY: `at .. at + len` lies inside `dst`; the pinned buffer is not touched
                // again until the event recorded after this copy has completed.
                unsafe { result::memcpy_htod_async(at, &*host, stream.cu_stream()) }.w()?;
                self.pending[b] = Some(stream.record_event(None).w()?);
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, self.device.clone()))
    }
}

impl Drop for PinnedUploader {
    fn drop(&mut self) {
        // The buffers must outlive the copies reading them.
        for ev in self.pending.iter_mut().filter_map(Option::take) {
            let _ = ev.synchronize();
        }
    }
}
