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
    Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("--device {name}: no usable GPU ({})", crate::error::one_line(&e)))
}

/// The `--device` name of a device (`cpu`, `cuda:N`, ...), for run records.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Turns an out-of-memory error from the device into one saying what to change (there is never
/// an automatic fall back to the CPU); other errors pass through unchanged.
pub fn explain_oom(err: anyhow::Error, what: &str, remedy: &str) -> anyhow::Error {
    let text = format!("{err:#}");
    if text.contains("OUT_OF_MEMORY") || text.to_ascii_lowercase().contains("out of memory") {
        anyhow::anyhow!("out of device memory {what}: {remedy}")
    } else {
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_errors_name_the_option() {
        let e = explain_oom(
            anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"),
            "running a batch of 512 x 32 tokens",
            "lower --batch-tokens",
        );
        assert_eq!(
            e.to_string(),
            "out of device memory running a batch of 512 x 32 tokens: lower --batch-tokens"
        );
        let other = explain_oom(anyhow::anyhow!("shape mismatch"), "x", "--y");
        assert_eq!(other.to_string(), "shape mismatch");
    }

    #[test]
    fn device_names() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse("gpu").unwrap_err().to_string().contains("cpu or cuda[:N]"));
        assert!(parse("cuda:x").unwrap_err().to_string().contains("cpu or cuda[:N]"));
        if !cfg!(feature = "cuda") {
            assert!(parse("cuda").unwrap_err().to_string().contains("without CUDA support"));
        }
    }
}
