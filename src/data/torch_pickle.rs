//! PyTorch checkpoints (`torch.save` zip files, e.g. a tuned lens's `params.pt`) read without
//! executing any pickle code, and written so that `torch.load(path, weights_only=True)` reads
//! them.
//!
//! Reading is two passes over the archive's `data.pkl`: first a scan that accepts only the
//! opcodes a plain tensor state dict uses (the subset `candle_core::pickle` interprets) and
//! refuses any other opcode by name, then `candle_core::pickle`'s pure-Rust interpreter builds
//! the object tree, in which every class must be one of [`ALLOWED_CLASSES`] (tensor rebuilding
//! and storage types; `collections.OrderedDict` is already folded into a plain dict by candle).
//! Nothing is ever called: classes are only names. The tensor bytes are read from the
//! archive's `data/{key}` entries with bounds checks.
//!
//! Writing produces what `torch.save(state_dict)` produces for contiguous float32 tensors:
//! a stored (uncompressed) zip with `{name}/data.pkl` (pickle protocol 2: an `OrderedDict` of
//! `torch._utils._rebuild_tensor_v2` calls on persistent `torch.FloatStorage` ids),
//! `{name}/data/{i}` (little-endian bytes, 64-byte aligned as torch aligns them),
//! `{name}/byteorder` and `{name}/version`.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

/// The only classes a state dict may name.
pub const ALLOWED_CLASSES: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
];

/// Opcode byte -> (name, bytes of argument; `None` = a newline-terminated pair (GLOBAL) or a
/// length-prefixed string). Anything else is refused.
fn opcode_arg(op: u8) -> Option<(&'static str, ArgLen)> {
    use ArgLen::*;
    Some(match op {
        0x80 => ("PROTO", Fixed(1)),
        b'c' => ("GLOBAL", TwoLines),
        b'q' => ("BINPUT", Fixed(1)),
        b'r' => ("LONG_BINPUT", Fixed(4)),
        b')' => ("EMPTY_TUPLE", Fixed(0)),
        b'R' => ("REDUCE", Fixed(0)),
        b'(' => ("MARK", Fixed(0)),
        b'X' => ("BINUNICODE", U32Prefixed),
        b'J' => ("BININT", Fixed(4)),
        b't' => ("TUPLE", Fixed(0)),
        b'Q' => ("BINPERSID", Fixed(0)),
        b'K' => ("BININT1", Fixed(1)),
        b'M' => ("BININT2", Fixed(2)),
        0x85 => ("TUPLE1", Fixed(0)),
        0x86 => ("TUPLE2", Fixed(0)),
        0x87 => ("TUPLE3", Fixed(0)),
        0x88 => ("NEWTRUE", Fixed(0)),
        0x89 => ("NEWFALSE", Fixed(0)),
        b'N' => ("NONE", Fixed(0)),
        b'h' => ("BINGET", Fixed(1)),
        b'j' => ("LONG_BINGET", Fixed(4)),
        b's' => ("SETITEM", Fixed(0)),
        b'u' => ("SETITEMS", Fixed(0)),
        b'}' => ("EMPTY_DICT", Fixed(0)),
        b'b' => ("BUILD", Fixed(0)),
        b'.' => ("STOP", Fixed(0)),
        b']' => ("EMPTY_LIST", Fixed(0)),
        b'G' => ("BINFLOAT", Fixed(8)),
        b'a' => ("APPEND", Fixed(0)),
        b'e' => ("APPENDS", Fixed(0)),
        0x8a => ("LONG1", U8Prefixed),
        _ => return None,
    })
}

#[derive(Clone, Copy)]
enum ArgLen {
    Fixed(usize),
    TwoLines,
    U32Prefixed,
    U8Prefixed,
}

/// A name for a refused opcode (the common dangerous ones by their pickletools names).
fn refused_name(op: u8) -> String {
    let name = match op {
        0x93 => "STACK_GLOBAL",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82..=0x84 => "EXT",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        b'P' => "PERSID",
        b'V' => "UNICODE",
        b'S' => "STRING",
        _ => "",
    };
    if name.is_empty() {
        format!("0x{op:02x}")
    } else {
        format!("{name} (0x{op:02x})")
    }
}

/// Checks that `pkl` uses only the allowed opcodes and ends with STOP.
fn scan_opcodes(pkl: &[u8], what: &str) -> Result<()> {
    let mut i = 0;
    while i < pkl.len() {
        let op = pkl[i];
        let Some((name, arg)) = opcode_arg(op) else {
            bail!(
                "{what}: pickle opcode {} at byte {i} is not allowed (only a plain tensor state dict is read)",
                refused_name(op)
            );
        };
        i += 1;
        let len = match arg {
            ArgLen::Fixed(n) => n,
            ArgLen::TwoLines => {
                let mut end = i;
                for _ in 0..2 {
                    end += pkl[end.min(pkl.len())..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| anyhow!("{what}: truncated pickle (GLOBAL at byte {})", i - 1))?
                        + 1;
                }
                end - i
            }
            ArgLen::U32Prefixed => {
                let b = pkl
                    .get(i..i + 4)
                    .ok_or_else(|| anyhow!("{what}: truncated pickle ({name} at byte {})", i - 1))?;
                4 + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
            }
            ArgLen::U8Prefixed => {
                1 + *pkl
                    .get(i)
                    .ok_or_else(|| anyhow!("{what}: truncated pickle ({name} at byte {})", i - 1))?
                    as usize
            }
        };
        if i + len > pkl.len() {
            bail!("{what}: truncated pickle ({name} at byte {})", i - 1);
        }
        i += len;
        if op == b'.' {
            return Ok(());
        }
    }
    bail!("{what}: truncated pickle (no STOP opcode)")
}

/// Every class named anywhere in the object tree must be allowed.
fn check_classes(obj: &Object, what: &str) -> Result<()> {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => {
            if !ALLOWED_CLASSES.iter().any(|(m, c)| m == module_name && c == class_name) {
                bail!(
                    "{what}: class {module_name}.{class_name} is not allowed (only a plain tensor state dict is read)"
                );
            }
            Ok(())
        }
        Object::Tuple(v) | Object::List(v) => v.iter().try_for_each(|o| check_classes(o, what)),
        Object::Dict(kv) => kv.iter().try_for_each(|(k, v)| {
            check_classes(k, what)?;
            check_classes(v, what)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            check_classes(callable, what)?;
            check_classes(args, what)
        }
        Object::PersistentLoad(o) => check_classes(o, what),
        _ => Ok(()),
    }
}

/// The archive of a `torch.save` file and its checked object tree: (name for messages, archive,
/// object, the folder of its storages).
type Opened = (
    String,
    zip::ZipArchive<std::io::BufReader<std::fs::File>>,
    Object,
    String,
);

fn open_pickle(path: &Path) -> Result<Opened> {
    let what = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("{what}: cannot open"))?;
    let mut head = [0u8; 2];
    let is_zip = {
        use std::io::Read as _;
        let mut f = &file;
        f.read_exact(&mut head).is_ok() && &head == b"PK"
    };
    if !is_zip {
        // A plain `pickle.dump` of a tensor, or torch.save's legacy (pre-1.6) format: both
        // rebuild storages by calling torch (torch.storage._load_from_bytes), so not read.
        bail!(
            "{what}: not a torch.save zip archive (a plain pickle.dump or legacy torch.save file is not read: \
             re-save it with torch.save(tensor, path))"
        );
    }
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| anyhow!("{what}: not a torch.save zip archive ({e})"))?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow!("{what}: unreadable archive ({e})"))?;
    let pkls: Vec<&String> = names.iter().filter(|n| n.ends_with("data.pkl")).collect();
    let pkl_name = match pkls.as_slice() {
        [one] => (*one).clone(),
        [] => bail!("{what}: no data.pkl in the archive (not a torch.save file)"),
        _ => bail!("{what}: {} data.pkl entries in the archive", pkls.len()),
    };
    // Storage `k` is the entry `{prefix}data/{k}` (candle names it from the pickle's path).
    let data_dir = pkl_name.strip_suffix(".pkl").unwrap_or_default().to_string();
    let pkl = read_entry(&mut zip, &pkl_name, &what, 1 << 26)?;
    scan_opcodes(&pkl, &what)?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(&pkl))
        .map_err(|e| anyhow!("{what}: unreadable pickle ({e})"))?;
    let obj = stack
        .finalize()
        .map_err(|e| anyhow!("{what}: unreadable pickle ({e})"))?;
    check_classes(&obj, &what)?;
    Ok((what, zip, obj, data_dir))
}

/// Reads one `torch.save(tensor)` file (a float tensor, returned as f32 on the CPU) with the same
/// checks as [`read_state_dict`]; anything but a single tensor is refused.
pub fn read_tensor_file(path: &Path) -> Result<Tensor> {
    let (what, mut zip, obj, data_dir) = open_pickle(path)?;
    if matches!(obj, Object::Dict(_)) {
        bail!("{what}: a dict (a state dict?), not a single tensor");
    }
    let info = obj
        .into_tensor_info(Object::Unicode("tensor".into()), Path::new(&data_dir))
        .map_err(|e| anyhow!("{what}: not a tensor ({e})"))?
        .ok_or_else(|| anyhow!("{what}: not a tensor"))?;
    read_tensor(&mut zip, &info, &what)
}

/// Reads a `torch.save`d state dict of float tensors (f32/f64/f16/bf16, returned as f32 on
/// the CPU), sorted by name (candle's interpreter reverses each SETITEMS batch, so the file's
/// order is not kept); a repeated key is refused. Refuses (one line, naming `path`) anything that is not a plain
/// tensor state dict.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let (what, mut zip, obj, data_dir) = open_pickle(path)?;
    let Object::Dict(entries) = obj else {
        bail!("{what}: the pickle is not a dict of tensors");
    };
    let mut out = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let Object::Unicode(name) = key else {
            bail!("{what}: a state dict key is not a string ({key:?})");
        };
        // `state_dict()`'s module version record (an attribute of the OrderedDict that the
        // pickle's BUILD merges into the dict).
        if name == "_metadata" && matches!(value, Object::Dict(_)) {
            continue;
        }
        let info = value
            .into_tensor_info(Object::Unicode(name.clone()), Path::new(&data_dir))
            .map_err(|e| anyhow!("{what}: entry '{name}' is not a tensor ({e})"))?
            .ok_or_else(|| anyhow!("{what}: entry '{name}' is not a tensor"))?;
        out.push((name, read_tensor(&mut zip, &info, &what)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("{what}: key '{}' appears twice in the state dict", w[0].0);
    }
    Ok(out)
}

fn read_entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    what: &str,
    max: u64,
) -> Result<Vec<u8>> {
    let mut entry = zip
        .by_name(name)
        .map_err(|e| anyhow!("{what}: archive entry {name}: {e}"))?;
    if entry.size() > max {
        bail!("{what}: archive entry {name} is {} bytes (at most {max})", entry.size());
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow!("{what}: archive entry {name}: {e}"))?;
    Ok(bytes)
}

fn read_tensor<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    info: &candle_core::pickle::TensorInfo,
    what: &str,
) -> Result<Tensor> {
    let name = &info.name;
    if !matches!(info.dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
        bail!(
            "{what}: tensor '{name}' has dtype {:?} (float tensors only)",
            info.dtype
        );
    }
    if !info.layout.is_contiguous() {
        bail!(
            "{what}: tensor '{name}' is not contiguous (strides {:?})",
            info.layout.stride()
        );
    }
    let size = info.dtype.size_in_bytes();
    let count = info.layout.shape().elem_count();
    let start = info.layout.start_offset();
    let bytes = read_entry(zip, &info.path, what, 1 << 34)?;
    let end = start
        .checked_add(
            count
                .checked_mul(size)
                .ok_or_else(|| anyhow!("{what}: tensor '{name}' too large"))?,
        )
        .ok_or_else(|| anyhow!("{what}: tensor '{name}' too large"))?;
    if end > bytes.len() {
        bail!(
            "{what}: tensor '{name}' needs {end} bytes of storage {} but it has {}",
            info.path,
            bytes.len()
        );
    }
    let t = Tensor::from_raw_buffer(&bytes[start..end], info.dtype, info.layout.dims(), &Device::Cpu)
        .map_err(|e| anyhow!("{what}: tensor '{name}': {e}"))?;
    Ok(t.to_dtype(DType::F32)?)
}

/// Writes float32 tensors as a `torch.save` zip that `torch.load(path, weights_only=True)`
/// reads back as an `OrderedDict[str, Tensor]` (in the given order). Atomic. The bytes depend
/// only on the tensors (fixed timestamps), so the same state dict gives the same file.
pub fn write_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let archive = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or_else(|| "archive".to_string());
    let mut datas = Vec::with_capacity(tensors.len());
    let mut pkl = vec![0x80, 2, b'c'];
    pkl.extend_from_slice(b"collections\nOrderedDict\n");
    pkl.extend_from_slice(b")R(");
    for (i, (name, t)) in tensors.iter().enumerate() {
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?;
        let dims = t.dims().to_vec();
        let numel = t.elem_count();
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        datas.push(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        push_str(&mut pkl, name);
        pkl.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        // Persistent id ('storage', torch.FloatStorage, key, 'cpu', numel).
        pkl.push(b'(');
        push_str(&mut pkl, "storage");
        pkl.extend_from_slice(b"ctorch\nFloatStorage\n");
        push_str(&mut pkl, &i.to_string());
        push_str(&mut pkl, "cpu");
        push_int(&mut pkl, numel)?;
        pkl.extend_from_slice(b"tQ");
        push_int(&mut pkl, 0)?; // storage offset
        pkl.push(b'(');
        for &d in &dims {
            push_int(&mut pkl, d)?;
        }
        pkl.push(b't');
        pkl.push(b'(');
        let mut stride = vec![1usize; dims.len()];
        for k in (0..dims.len().saturating_sub(1)).rev() {
            stride[k] = stride[k + 1] * dims[k + 1];
        }
        for &s in &stride {
            push_int(&mut pkl, s)?;
        }
        pkl.push(b't');
        pkl.push(0x89); // requires_grad False
        pkl.extend_from_slice(b"ccollections\nOrderedDict\n)R"); // backward hooks
        pkl.extend_from_slice(b"tR");
    }
    pkl.extend_from_slice(b"u.");
    crate::data::io::write_atomic_with(path, |tmp| {
        let file = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .last_modified_time(zip::DateTime::default())
            .with_alignment(64);
        let err = |e: zip::result::ZipError| anyhow!("{}: {e}", path.display());
        zip.start_file(format!("{archive}/data.pkl"), opts).map_err(err)?;
        zip.write_all(&pkl)?;
        zip.start_file(format!("{archive}/byteorder"), opts).map_err(err)?;
        zip.write_all(b"little")?;
        for (i, bytes) in datas.iter().enumerate() {
            zip.start_file(format!("{archive}/data/{i}"), opts).map_err(err)?;
            zip.write_all(bytes)?;
        }
        zip.start_file(format!("{archive}/version"), opts).map_err(err)?;
        zip.write_all(b"3\n")?;
        zip.finish().map_err(err)?.flush()?;
        Ok(())
    })
}

fn push_str(pkl: &mut Vec<u8>, s: &str) {
    pkl.push(b'X');
    pkl.extend_from_slice(&(s.len() as u32).to_le_bytes());
    pkl.extend_from_slice(s.as_bytes());
}

fn push_int(pkl: &mut Vec<u8>, v: usize) -> Result<()> {
    if v < 256 {
        pkl.extend_from_slice(&[b'K', v as u8]);
    } else if v < 65536 {
        pkl.push(b'M');
        pkl.extend_from_slice(&(v as u16).to_le_bytes());
    } else {
        let v = i32::try_from(v).map_err(|_| anyhow!("tensor dimension {v} too large for a pickle BININT"))?;
        pkl.push(b'J');
        pkl.extend_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_state_dict_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("params.pt");
        let a = Tensor::arange(0f32, 600.0, &Device::Cpu)
            .unwrap()
            .reshape((20, 30))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0, 3.25], &Device::Cpu).unwrap();
        write_state_dict(&p, &[("0.weight".into(), a.clone()), ("0.bias".into(), b.clone())]).unwrap();
        let back = read_state_dict(&p).unwrap();
        assert_eq!(back.len(), 2);
        // Sorted by name.
        assert_eq!(back[0].0, "0.bias");
        assert_eq!(back[1].0, "0.weight");
        assert_eq!(back[1].1.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(back[0].1.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        // Deterministic bytes.
        let first = std::fs::read(&p).unwrap();
        write_state_dict(&p, &[("0.weight".into(), a), ("0.bias".into(), b)]).unwrap();
        assert_eq!(first, std::fs::read(&p).unwrap());
    }

    #[test]
    fn refuses_other_opcodes_and_classes() {
        let e = scan_opcodes(b"\x80\x02\x93.", "x").unwrap_err().to_string();
        assert!(e.contains("STACK_GLOBAL"), "{e}");
        let e = scan_opcodes(b"\x80\x02(X\x05\x00\x00", "x").unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let obj = Object::Reduce {
            callable: Box::new(Object::Class {
                module_name: "os".into(),
                class_name: "system".into(),
            }),
            args: Box::new(Object::Tuple(vec![Object::Unicode("ls".into())])),
        };
        let e = check_classes(&obj, "x").unwrap_err().to_string();
        assert!(e.contains("os.system"), "{e}");
    }
}
