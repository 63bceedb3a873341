//! Writing outputs so that nothing half-written is ever left behind: every file goes to a
//! temporary name in the same folder and is renamed into place.

use std::collections::{BTreeMap, HashMap};
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

/// Runs `write` on a temporary file beside `path`, then fsyncs it and renames it into place.
/// The temporary file (`.NAME.<pid>-<n>.tmp`) is removed whenever the write or the rename
/// fails, and temporary files of processes that are no longer alive (killed mid-write) are
/// removed from the folder first.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    remove_stale_temps(dir);
    if path.is_dir() {
        anyhow::bail!("{}: is a folder, cannot write a file there", path.display());
    }
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
    if let Err(e) = std::fs::rename(&tmp, path) {
        std::fs::remove_file(&tmp).ok();
        return Err(anyhow!("{}: cannot move into place ({e})", path.display()));
    }
    Ok(())
}

/// The pid in a temporary name `.NAME.<pid>-<n>.tmp` written by [`write_atomic_with`].
fn temp_owner(file_name: &str) -> Option<u32> {
    let stem = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (rest, counter) = stem.rsplit_once('-')?;
    counter.parse::<u64>().ok()?;
    let (_, pid) = rest.rsplit_once('.')?;
    pid.parse().ok()
}

/// Whether process `pid` is alive (unknown platforms: assume it is, so nothing is removed).
pub fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Removes the temporary files in `dir` left by processes that are no longer alive (a kill
/// during a write); returns how many were removed. Errors are ignored: this is cleanup.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = temp_owner(&name.to_string_lossy()) else {
            continue;
        };
        if !process_alive(pid) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Writes pretty JSON atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Writes named tensors as a safetensors file (with string metadata in its header), atomically.
/// The tensors' bytes are streamed to the file from one host copy each (no whole-file buffer):
/// the all-pairs maps of a 30-layer model are 0.6 GB. The bytes depend only on the inputs: the
/// header's keys are in sorted order (the safetensors crate writes its `HashMap`s in a random
/// order, so identical data had a different sha256 on every run) and the tensors are laid out
/// widest dtype first (so every tensor is aligned), then in the given order.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        owned.push((name.clone(), t.dims().to_vec(), HostData::of(t)?));
    }
    let header = safetensors_header(&owned, metadata)?;
    let order = layout_order(&owned);
    write_atomic_with(path, |tmp| {
        let f = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        let io = |e: std::io::Error| anyhow!("{}: cannot write ({e})", tmp.display());
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for &i in &order {
            w.write_all(owned[i].2.bytes().1).map_err(io)?;
        }
        w.flush().map_err(io)?;
        Ok(())
    })
}

/// The tensors' positions in the file: widest element first (keeps every tensor aligned to its
/// element size), ties in the given order.
fn layout_order(owned: &[(String, Vec<usize>, HostData)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..owned.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(owned[i].2.bytes().0.bitsize()));
    order
}

/// The JSON header of a safetensors file (keys sorted, padded with spaces to a multiple of 8).
fn safetensors_header(
    owned: &[(String, Vec<usize>, HostData)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut header = BTreeMap::new();
    if let Some(m) = metadata {
        let sorted: BTreeMap<String, String> = m.into_iter().collect();
        header.insert("__metadata__".to_string(), serde_json::to_value(sorted)?);
    }
    let mut offset = 0usize;
    for i in layout_order(owned) {
        let (name, shape, data) = &owned[i];
        if name == "__metadata__" || header.contains_key(name) {
            anyhow::bail!("tensor name '{name}' is reserved or repeated");
        }
        let (dtype, bytes) = data.bytes();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    // A Value::Object from a BTreeMap serializes in key order whether or not serde_json keeps
    // insertion order.
    let mut bytes = serde_json::to_vec(&header)?;
    bytes.resize(bytes.len().div_ceil(8) * 8, b' ');
    Ok(bytes)
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

/// The files [`sha256_path`] hashes, in its order, each with its size and modification time:
/// what the cache of [`sha256_path_cached`] is keyed by.
fn file_stamps(path: &Path) -> Result<Vec<(String, u64, u128)>> {
    let mut files = vec![];
    if path.is_dir() {
        for e in std::fs::read_dir(path).with_context(|| format!("{}: cannot read", path.display()))? {
            let p = e?.path();
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).with_context(|| format!("{}: cannot open", f.display()))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let name = std::fs::canonicalize(&f).unwrap_or(f);
            Ok((name.display().to_string(), meta.len(), mtime))
        })
        .collect()
}

/// [`sha256_path`], remembered in the JSON file `cache` by each file's path, size and
/// modification time, so that the later stages of a run can check the model's sha256 without
/// reading an 8B model's 16 GB again. The cache is best effort: an unreadable one is ignored and
/// one that cannot be written (a read-only run folder) is skipped.
pub fn sha256_path_cached(path: &Path, cache: &Path) -> Result<String> {
    type Entries = BTreeMap<String, (Vec<(String, u64, u128)>, String)>;
    let stamps = file_stamps(path)?;
    let id = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let mut entries: Entries = std::fs::read(cache)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some((recorded, sha)) = entries.get(&id) {
        if recorded == &stamps {
            return Ok(sha.clone());
        }
    }
    let sha = sha256_path(path)?;
    entries.insert(id, (stamps, sha.clone()));
    write_json(cache, &entries).ok();
    Ok(sha)
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

    /// Issue 19 item 5: the same tensors and metadata give the same bytes (the metadata used to
    /// be written in `HashMap` order, different for every map built).
    #[test]
    fn safetensors_bytes_are_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let dev = candle_core::Device::Cpu;
        let tensors = vec![
            ("z".to_string(), Tensor::new(&[1i64, 2, 3], &dev).unwrap()),
            ("a".to_string(), Tensor::new(&[1f32, 2.0, 3.0], &dev).unwrap()),
            ("m".to_string(), Tensor::new(&[5f64], &dev).unwrap()),
        ];
        let meta = || {
            (0..20)
                .map(|i| (format!("key{i}"), format!("value{i}")))
                .collect::<HashMap<_, _>>()
        };
        let (p1, p2) = (dir.path().join("1.safetensors"), dir.path().join("2.safetensors"));
        write_safetensors(&p1, &tensors, Some(meta())).unwrap();
        write_safetensors(&p2, &tensors, Some(meta())).unwrap();
        let (b1, b2) = (std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        assert_eq!(b1, b2);
        // And the safetensors crate reads the file back, metadata included.
        let st = safetensors::SafeTensors::deserialize(&b1).unwrap();
        assert_eq!(
            st.tensor("z").unwrap().data(),
            bytemuck::cast_slice::<i64, u8>(&[1, 2, 3])
        );
        let (_, header) = safetensors::SafeTensors::read_metadata(&b1).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["key7"], "value7");
    }

    /// Issue 19 item 4: a failed rename (the output path is a folder) leaves no temporary file,
    /// and temporary files of dead processes are removed by the next write in the folder.
    #[test]
    fn temporary_files_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.json");
        std::fs::create_dir(&out).unwrap();
        let err = write_atomic(&out, b"{}").unwrap_err().to_string();
        assert!(err.contains("out.json") && err.contains("folder"), "{err}");
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(dir.path()), ["out.json"]);
        // A write that fails part-way removes its temporary file.
        let failing = write_atomic_with(&dir.path().join("x.bin"), |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        });
        assert!(failing.is_err());
        assert_eq!(names(dir.path()), ["out.json"]);
        // A dead process's temporary file (pid far above pid_max) goes; a live one's stays.
        let dead = dir.path().join(".maps.safetensors.4999999-0.tmp");
        let live = dir
            .path()
            .join(format!(".maps.safetensors.{}-99.tmp", std::process::id()));
        std::fs::write(&dead, b"x").unwrap();
        std::fs::write(&live, b"x").unwrap();
        write_atomic(&dir.path().join("r2.json"), b"{}").unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
        assert_eq!(temp_owner(".train.safetensors.123-4.tmp"), Some(123));
        assert_eq!(temp_owner("train.safetensors"), None);
    }
}
