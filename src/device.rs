//! Choosing the compute device from `--device cpu|cuda[:N]`, or several devices the blocks are
//! split across (`--device cuda:0,cuda:1`).

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

/// Parses a `--device` value that may list several devices (`cuda:0,cuda:1`, `cpu,cpu`). One
/// item is the single-device case. Each item is its own device handle, also when an item repeats
/// (`cuda:0,cuda:0` is two handles on one GPU, so a split runs its transfers on one GPU). CPU and
/// GPU items cannot be mixed: the compute dtype `auto` and the batch sizes follow the device kind,
/// and a mixed split would run at the speed of the CPU part.
pub fn parse_list(value: &str) -> Result<Vec<Device>> {
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if let Some(i) = items.iter().position(|s| s.is_empty()) {
        bail!("--device '{value}': item {} of the list is empty", i + 1);
    }
    let devices = items.iter().map(|s| parse(s)).collect::<Result<Vec<_>>>()?;
    if devices.iter().any(Device::is_cpu) && !devices.iter().all(Device::is_cpu) {
        bail!("--device '{value}': a split cannot mix the CPU and GPUs (list only cpu or only cuda:N)");
    }
    Ok(devices)
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

/// Free memory of a CUDA device in bytes (`None` on the CPU or when the driver does not say):
/// what sizes the working buffers of the GPU fit.
pub fn free_memory(device: &Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        return dev.cuda_stream().context().mem_get_info().ok().map(|(free, _)| free);
    }
    let _ = device;
    None
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

    #[test]
    fn device_lists() {
        assert_eq!(parse_list("cpu").unwrap().len(), 1);
        let two = parse_list("cpu, cpu").unwrap();
        assert!(two.len() == 2 && two.iter().all(Device::is_cpu));
        assert_eq!(parse_list("cpu,cpu,cpu").unwrap().len(), 3);
        for (bad, says) in [
            ("cpu,", "item 2 of the list is empty"),
            (",cpu", "item 1 of the list is empty"),
            ("cpu,,cpu", "item 2 of the list is empty"),
            ("cpu,tpu", "cpu or cuda[:N], not 'tpu'"),
        ] {
            let e = parse_list(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        if !cfg!(feature = "cuda") {
            let e = parse_list("cpu,cuda:0").unwrap_err().to_string();
            assert!(e.contains("without CUDA support"), "{e}");
        }
    }
}
