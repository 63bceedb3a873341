//! The float64 sufficient statistics of the least-squares fit (`collect --stats-only`): for the
//! requested pairs, the Gram blocks `X_l^T X_t`, the column sums of every state and the example
//! count. They add up over any split of the examples, so a collection can stream them batch by
//! batch (memory independent of N), shards can be summed ([`GramStats::add`]) and the fit
//! (`lens::fit::stats`) needs nothing else.
//!
//! The accumulation is one float64 matmul per batch of candle tensors, so it runs on the
//! device the model runs on (CPU or GPU) and only the finished sums come to the host.
//!
//! Layouts (`RUN/activations/train.stats.safetensors`, metadata `pairs`, `n`, `n_states`,
//! `d_model`):
//! * `all`: `gram` [S d, S d] = `Z^T Z` with `Z = [X_0 | ... | X_{S-1}]` ([N, S d]); block
//!   (l, t) is `X_l^T X_t`.
//! * `to-final`: `diag` [S-1, d, d] with `diag[l] = X_l^T X_l`, and `cross` [S-1, d, d] with
//!   `cross[l] = X_{S-1}^T X_l` (rows: coordinates of the last state).
//! * both: `sums` [S, d] (column sums), `n` in the metadata.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// Which pairs the statistics can fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatsPairs {
    /// Every l < l' (the whole Gram of all states).
    All,
    /// Only l -> S-1.
    ToFinal,
}

impl StatsPairs {
    pub fn name(self) -> &'static str {
        match self {
            StatsPairs::All => "all",
            StatsPairs::ToFinal => "to-final",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "all" => Some(StatsPairs::All),
            "to-final" => Some(StatsPairs::ToFinal),
            _ => None,
        }
    }

    /// `--pairs auto`: all pairs when their statistics fit in `max_bytes`, else to-final.
    pub fn auto(n_states: usize, d: usize, max_bytes: u64) -> Self {
        if StatsPairs::All.bytes(n_states, d) <= max_bytes {
            StatsPairs::All
        } else {
            StatsPairs::ToFinal
        }
    }

    /// Bytes of the statistics of `n_states` states of width `d` (float64).
    pub fn bytes(self, n_states: usize, d: usize) -> u64 {
        let (s, d) = (n_states as u64, d as u64);
        let blocks = match self {
            StatsPairs::All => s * s * d * d,
            StatsPairs::ToFinal => 2 * s.saturating_sub(1) * d * d,
        };
        8 * (blocks + s * d)
    }
}

/// The sums of one set of examples (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct GramStats {
    pub pairs: StatsPairs,
    pub n_states: usize,
    pub d: usize,
    /// Examples summed.
    pub n: u64,
    /// [S, d] float64 column sums.
    pub sums: Tensor,
    /// `all`: [S d, S d]; `to-final`: `diag` [S-1, d, d].
    pub gram: Tensor,
    /// `to-final` only: [S-1, d, d].
    pub cross: Option<Tensor>,
}

/// [`GramStats`] on the host, ready to be written (see [`GramStats::to_host`]).
pub struct HostStats {
    tensors: Vec<(String, Tensor)>,
    meta: HashMap<String, String>,
}

impl HostStats {
    /// Writes the statistics file atomically (the format [`GramStats::read`] reads).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::data::io::write_safetensors(path, &self.tensors, Some(self.meta.clone()))
    }
}

impl GramStats {
    /// Zero statistics on `device`.
    pub fn zeros(pairs: StatsPairs, n_states: usize, d: usize, device: &Device) -> Result<Self> {
        ensure!(
            n_states >= 2 && d >= 1,
            "statistics need at least 2 states (got {n_states}, width {d})"
        );
        let (gram, cross) = match pairs {
            StatsPairs::All => (Tensor::zeros((n_states * d, n_states * d), DType::F64, device)?, None),
            StatsPairs::ToFinal => (
                Tensor::zeros((n_states - 1, d, d), DType::F64, device)?,
                Some(Tensor::zeros((n_states - 1, d, d), DType::F64, device)?),
            ),
        };
        Ok(Self {
            pairs,
            n_states,
            d,
            n: 0,
            sums: Tensor::zeros((n_states, d), DType::F64, device)?,
            gram,
            cross,
        })
    }

    /// Adds the examples `rows` [S, r, d] (any float dtype, on the statistics' device).
    pub fn accumulate(&mut self, rows: &Tensor) -> Result<()> {
        let (s, r, d) = rows.dims3()?;
        ensure!(
            s == self.n_states && d == self.d,
            "statistics of [{}, _, {}] cannot take rows [{s}, {r}, {d}]",
            self.n_states,
            self.d
        );
        if r == 0 {
            return Ok(());
        }
        let x = rows.to_dtype(DType::F64)?;
        self.sums = (&self.sums + x.sum(1)?)?;
        match self.pairs {
            StatsPairs::All => {
                // Z [r, S d]: example-major, the states side by side.
                let z = x.transpose(0, 1)?.contiguous()?.reshape((r, s * d))?;
                self.gram = (&self.gram + z.t()?.matmul(&z)?)?;
            }
            StatsPairs::ToFinal => {
                let xs = x.narrow(0, 0, s - 1)?.contiguous()?; // [S-1, r, d]
                let xt = xs.transpose(1, 2)?.contiguous()?; // [S-1, d, r]
                self.gram = (&self.gram + xt.matmul(&xs)?)?;
                let last = x.get(s - 1)?.t()?.contiguous()?; // [d, r]
                let cross = last.broadcast_matmul(&xs)?; // [S-1, d, d]
                let old = self.cross.take().expect("to-final statistics hold cross blocks");
                self.cross = Some((old + cross)?);
            }
        }
        self.n += r as u64;
        Ok(())
    }

    /// Adds another set of statistics of the same shape and pairs.
    pub fn add(&mut self, other: &GramStats) -> Result<()> {
        ensure!(
            self.pairs == other.pairs && self.n_states == other.n_states && self.d == other.d,
            "statistics of different shapes (pairs {} / {}, states {} / {}, width {} / {})",
            self.pairs.name(),
            other.pairs.name(),
            self.n_states,
            other.n_states,
            self.d,
            other.d
        );
        let dev = self.gram.device().clone();
        self.sums = (&self.sums + other.sums.to_device(&dev)?)?;
        self.gram = (&self.gram + other.gram.to_device(&dev)?)?;
        if let (Some(a), Some(b)) = (self.cross.take(), &other.cross) {
            self.cross = Some((a + b.to_device(&dev)?)?);
        }
        self.n += other.n;
        Ok(())
    }

    /// `X_l^T X_t` [d, d] on the host, float64, row-major; `None` when these statistics do not
    /// hold it.
    pub fn block(&self, l: usize, t: usize) -> Result<Option<Vec<f64>>> {
        match self.block_tensor(l, t)? {
            // Only the block's own d x d values travel (a view's `to_device` would copy all S - 1
            // blocks of a GPU's statistics for each one).
            Some(b) => Ok(Some(
                crate::host::view_to_device(&b, &Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f64>()?,
            )),
            None => Ok(None),
        }
    }

    /// `X_l^T X_t` [d, d] on the statistics' device (float64, possibly a strided view); `None`
    /// when these statistics do not hold it.
    pub fn block_tensor(&self, l: usize, t: usize) -> Result<Option<Tensor>> {
        let (s, d) = (self.n_states, self.d);
        ensure!(l < s && t < s, "block ({l}, {t}) outside {s} states");
        match self.pairs {
            StatsPairs::All => Ok(Some(self.gram.narrow(0, l * d, d)?.narrow(1, t * d, d)?)),
            StatsPairs::ToFinal => {
                let cross = self.cross.as_ref().expect("to-final statistics hold cross blocks");
                if l == t && l < s - 1 {
                    Ok(Some(self.gram.get(l)?))
                } else if t == s - 1 && l < s - 1 {
                    // cross[l] = X_last^T X_l; its transpose is X_l^T X_last.
                    Ok(Some(cross.get(l)?.t()?))
                } else if l == s - 1 && t < s - 1 {
                    Ok(Some(cross.get(t)?))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Column sums of state `l` on the host.
    pub fn column_sums(&self, l: usize) -> Result<Vec<f64>> {
        Ok(crate::host::view_to_device(&self.sums.get(l)?, &Device::Cpu)?.to_vec1::<f64>()?)
    }

    /// Whether the pair (l, t) can be fitted from these statistics.
    pub fn holds_pair(&self, l: usize, t: usize) -> bool {
        l < t
            && t < self.n_states
            && match self.pairs {
                StatsPairs::All => true,
                StatsPairs::ToFinal => t == self.n_states - 1,
            }
    }

    /// Writes the statistics atomically (tensors moved to the host).
    pub fn write(&self, path: &Path) -> Result<()> {
        self.to_host()?.write(path)
    }

    /// The tensors and header of [`GramStats::write`], copied to the host: what a background
    /// thread writes while the device goes on (`collect` writes the training sums during the
    /// validation split).
    pub fn to_host(&self) -> Result<HostStats> {
        let cpu = Device::Cpu;
        let mut tensors = vec![
            ("sums".to_string(), self.sums.to_device(&cpu)?),
            (
                match self.pairs {
                    StatsPairs::All => "gram".to_string(),
                    StatsPairs::ToFinal => "diag".to_string(),
                },
                self.gram.to_device(&cpu)?,
            ),
        ];
        if let Some(c) = &self.cross {
            tensors.push(("cross".to_string(), c.to_device(&cpu)?));
        }
        let meta = HashMap::from([
            ("pairs".to_string(), self.pairs.name().to_string()),
            ("n".to_string(), self.n.to_string()),
            ("n_states".to_string(), self.n_states.to_string()),
            ("d_model".to_string(), self.d.to_string()),
            (
                "note".to_string(),
                "float64 sums over the training examples: gram = Z^T Z (Z = [X_0 | ... | X_{S-1}]) for all \
                 pairs; diag[l] = X_l^T X_l and cross[l] = X_{S-1}^T X_l for to-final; sums = column sums"
                    .to_string(),
            ),
        ]);
        Ok(HostStats { tensors, meta })
    }

    /// Reads statistics written by [`GramStats::write`] onto `device`, checking their shapes.
    /// The file is mapped, not read: each tensor goes from the mapping straight to `device`
    /// (at d = 4096 the to-final sums are 8.6 GB, which were read twice and copied once more on
    /// the host before).
    pub fn read(path: &Path, device: &Device) -> Result<Self> {
        use candle_core::safetensors::Load;
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
        // SAFETY: the file is only read; stages write it atomically (rename), never in place.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let invalid =
            |e: safetensors::SafeTensorError| anyhow!("{}: not a valid safetensors file ({e})", path.display());
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(invalid)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| -> Result<&String> {
            meta.get(k)
                .ok_or_else(|| anyhow!("{}: no '{k}' in the metadata (not a statistics file)", path.display()))
        };
        let number = |k: &str| -> Result<u64> {
            field(k)?
                .parse()
                .map_err(|_| anyhow!("{}: metadata '{k}' is not a number", path.display()))
        };
        let pairs = StatsPairs::parse(field("pairs")?)
            .ok_or_else(|| anyhow!("{}: unknown pairs '{}'", path.display(), meta["pairs"]))?;
        let (n, s, d) = (number("n")?, number("n_states")? as usize, number("d_model")? as usize);
        let t = safetensors::SafeTensors::deserialize(&bytes).map_err(invalid)?;
        let get = |k: &str, shape: &[usize]| -> Result<Tensor> {
            let v = t
                .tensor(k)
                .map_err(|_| anyhow!("{}: no tensor '{k}'", path.display()))?;
            if v.shape() != shape || v.dtype() != safetensors::Dtype::F64 {
                bail!(
                    "{}: '{k}' is {:?} {:?}, expected F64 {shape:?}",
                    path.display(),
                    v.dtype(),
                    v.shape()
                );
            }
            v.load(device)
                .map_err(|e| anyhow!("{}: '{k}': {}", path.display(), crate::error::one_line(&e)))
        };
        ensure!(s >= 2 && d >= 1, "{}: {s} states of width {d}", path.display());
        let (gram, cross) = match pairs {
            StatsPairs::All => (get("gram", &[s * d, s * d])?, None),
            StatsPairs::ToFinal => (get("diag", &[s - 1, d, d])?, Some(get("cross", &[s - 1, d, d])?)),
        };
        Ok(Self {
            pairs,
            n_states: s,
            d,
            n,
            sums: get("sums", &[s, d])?,
            gram,
            cross,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows [S, r, d] with values i + 0.1 j + 0.01 k-ish, deterministic.
    fn rows(s: usize, r: usize, d: usize, seed: u64) -> Tensor {
        let v: Vec<f32> = (0..s * r * d)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32) / 100.0 - 5.0)
            .collect();
        Tensor::from_vec(v, (s, r, d), &Device::Cpu).unwrap()
    }

    /// The blocks equal `X_l^T X_t` computed directly, for both layouts, and accumulation in
    /// two batches equals one, as does `add` of two halves.
    #[test]
    fn blocks_are_the_gram_of_the_rows() {
        let (s, r, d) = (4, 30, 5);
        let x = rows(s, r, d, 1);
        for pairs in [StatsPairs::All, StatsPairs::ToFinal] {
            let mut whole = GramStats::zeros(pairs, s, d, &Device::Cpu).unwrap();
            whole.accumulate(&x).unwrap();
            let mut a = GramStats::zeros(pairs, s, d, &Device::Cpu).unwrap();
            let mut b = a.clone();
            a.accumulate(&x.narrow(1, 0, 12).unwrap()).unwrap();
            b.accumulate(&x.narrow(1, 12, 18).unwrap()).unwrap();
            a.add(&b).unwrap();
            assert_eq!(whole.n, 30);
            assert_eq!(a.n, 30);
            let x64: Vec<Vec<Vec<f64>>> = x.to_dtype(DType::F64).unwrap().to_vec3().unwrap();
            for l in 0..s {
                for t in 0..s {
                    let Some(got) = whole.block(l, t).unwrap() else {
                        assert!(
                            pairs == StatsPairs::ToFinal && !((l == t && l < s - 1) || ((l == s - 1) != (t == s - 1)))
                        );
                        continue;
                    };
                    let split = a.block(l, t).unwrap().unwrap();
                    for i in 0..d {
                        for j in 0..d {
                            let want: f64 = (0..r).map(|e| x64[l][e][i] * x64[t][e][j]).sum();
                            let g = got[i * d + j];
                            assert!(
                                (g - want).abs() <= 1e-12 * want.abs().max(1.0),
                                "{pairs:?} ({l},{t}) {g} {want}"
                            );
                            assert!((split[i * d + j] - want).abs() <= 1e-12 * want.abs().max(1.0));
                        }
                    }
                }
                let sums = whole.column_sums(l).unwrap();
                let want: f64 = (0..r).map(|e| x64[l][e][0]).sum();
                assert!((sums[0] - want).abs() < 1e-12 * want.abs().max(1.0));
            }
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s.safetensors");
            whole.write(&p).unwrap();
            let back = GramStats::read(&p, &Device::Cpu).unwrap();
            assert_eq!(back.n, 30);
            assert_eq!(back.block(0, s - 1).unwrap(), whole.block(0, s - 1).unwrap());
        }
    }

    #[test]
    fn sizes() {
        // 31 states of 576: all pairs 2.55 GB (the whole Gram), to-final 0.16 GB.
        assert_eq!(StatsPairs::All.bytes(31, 576), 8 * (31 * 31 * 576 * 576 + 31 * 576));
        assert_eq!(StatsPairs::ToFinal.bytes(31, 576), 8 * (2 * 30 * 576 * 576 + 31 * 576));
    }
}
