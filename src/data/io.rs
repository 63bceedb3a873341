//! Writing outputs so that nothing half-written is ever left behind: every file goes to a
//! temporary name in the same folder and is renamed into place.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};

/// Writes `bytes` to `path` atomically (temp file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("{}: cannot write", tmp.display()))
    })
}

/// Runs `write` on a temporary file beside `path`, then fsyncs it and renames it into place;
/// the temporary file is removed if `write` fails.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    // The pid and a per-process counter keep concurrent writers (threads included) of one
    // path apart.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if let Err(e) = write(&tmp) {
        std::fs::remove_file(&tmp).ok();
        return Err(e);
    }
    if let Ok(f) = std::fs::File::open(&tmp) {
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot move into place", path.display()))?;
    Ok(())
}

/// Writes pretty JSON atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Writes named tensors as a safetensors file (with string metadata in its header), atomically.
/// The tensors' bytes are streamed to the file from one host copy each (no whole-file buffer):
/// the all-pairs maps of a 30-layer model are 0.6 GB.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        owned.push((name.clone(), t.dims().to_vec(), HostData::of(t)?));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, shape, data)| {
            let (dtype, bytes) = data.bytes();
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        // safetensors writes through a private (0600) temporary file; give the output the
        // permissions of every other file jumplens writes.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644))
                .with_context(|| format!("{}: cannot set permissions", tmp.display()))?;
        }
        Ok(())
    })
}

// safetensors stores little-endian values; the host copies below are written as they are.
#[cfg(target_endian = "big")]
compile_error!("jumplens writes safetensors from host memory and needs a little-endian target");

/// A tensor's values on the host, in one typed buffer.
enum HostData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U32(Vec<u32>),
    U8(Vec<u8>),
}

impl HostData {
    fn of(t: &Tensor) -> Result<Self> {
        let t = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::F32 => HostData::F32(t.to_vec1()?),
            DType::F64 => HostData::F64(t.to_vec1()?),
            DType::I64 => HostData::I64(t.to_vec1()?),
            DType::U32 => HostData::U32(t.to_vec1()?),
            DType::U8 => HostData::U8(t.to_vec1()?),
            other => anyhow::bail!("cannot write tensors of dtype {other:?}"),
        })
    }

    fn bytes(&self) -> (safetensors::Dtype, &[u8]) {
        match self {
            HostData::F32(v) => (safetensors::Dtype::F32, bytemuck::cast_slice(v)),
            HostData::F64(v) => (safetensors::Dtype::F64, bytemuck::cast_slice(v)),
            HostData::I64(v) => (safetensors::Dtype::I64, bytemuck::cast_slice(v)),
            HostData::U32(v) => (safetensors::Dtype::U32, bytemuck::cast_slice(v)),
            HostData::U8(v) => (safetensors::Dtype::U8, v),
        }
    }
}

/// Reads every tensor of a safetensors file (CPU), with errors naming the file.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        anyhow::bail!("{}: no such file", path.display());
    }
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).map_err(|e| {
        anyhow!(
            "{}: not a valid safetensors file ({})",
            path.display(),
            crate::error::one_line(&e)
        )
    })
}

/// SHA-256 of a file (or of every file in a folder, in name order), hex encoded.
pub fn sha256_path(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut files = vec![];
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    for f in files {
        let mut file = std::fs::File::open(&f).with_context(|| format!("{}: cannot open", f.display()))?;
        std::io::copy(&mut file, &mut hasher)?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Escapes text for HTML and SVG (XML): markup characters become entities and control
/// characters other than tab and newline, which XML forbids, are dropped.
pub fn escape_markup(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_is_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[[1f32, -2.5], [3.0, 4.0]], &dev).unwrap();
        let b = Tensor::new(&[7i64, 8, 9], &dev).unwrap();
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&path, &[("a".into(), a.clone()), ("b".into(), b.clone())], Some(meta)).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back["a"].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(back["b"].to_vec1::<i64>().unwrap(), vec![7, 8, 9]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644);
        }
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
