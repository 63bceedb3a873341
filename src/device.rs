//! Choosing the compute device from `--device cpu|cuda[:N]`.

use anyhow::{bail, Result};
use candle_core::Device;

/// Parses a device name. CUDA needs a build with the `cuda` feature and a usable GPU; there is
/// never a silent fallback to the CPU.
pub fn parse(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("--device takes cpu or cuda[:N], not '{name}'"),
        },
        None => bail!("--device takes cpu or cuda[:N], not '{name}'"),
    };
    if !cfg!(feature = "cuda") {
        bail!("--device {name}: this jumplens was built without CUDA support (rebuild with `--features cuda`)");
    }
    Device::new_cuda(ordinal).map_err(|e| {
        anyhow::anyhow!(
            "--device {name}: no usable GPU ({})",
            crate::model::weights::one_line(&e)
        )
    })
}
