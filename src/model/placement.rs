//! Which device runs which blocks when a model is split across devices (`--device cuda:0,cuda:1`).
//!
//! The blocks are cut into contiguous ranges, one per device, so the hidden state crosses from
//! one device to the next once per boundary. The ranges balance memory: each block costs its
//! weights plus the hidden state it keeps for a batch; the first device also holds the token
//! embedding and the last the final norm and the unembedding (which runs there, with the
//! statistics computed from its logits).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Padded tokens per batch the activation estimate assumes (the GPU default of `collect`).
pub const ESTIMATE_TOKENS: usize = 16384;

/// Blocks assigned to devices in contiguous ranges.
#[derive(Clone)]
pub struct Placement {
    /// One handle per listed device (a repeated name is a second handle to the same hardware).
    pub devices: Vec<Device>,
    /// The `--device` names, in order.
    pub names: Vec<String>,
    /// Blocks of each device: `ranges[i]` = (first block, end) on `devices[i]`.
    pub ranges: Vec<(usize, usize)>,
    /// Estimated bytes on each device (weights + the batch's kept states).
    pub bytes: Vec<u64>,
}

/// What one piece of the model costs on a device, in bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Costs {
    /// Per block: weights + activations kept for a batch.
    pub blocks: Vec<u64>,
    /// The token (and position) embedding, on the first device.
    pub embedding: u64,
    /// The final norm and the unembedding, on the last device.
    pub head: u64,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Placement({})", self.describe())
    }
}

impl Placement {
    /// Balances `costs` over `devices`: contiguous ranges, at least one block per device,
    /// minimising the largest device's bytes.
    pub fn balance(devices: Vec<Device>, costs: &Costs) -> Result<Self> {
        let names = devices.iter().map(crate::device::name).collect();
        let ranges = balance_ranges(costs, devices.len())?;
        let bytes = ranges
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| device_bytes(costs, &ranges, i, a, b))
            .collect();
        Ok(Self {
            devices,
            names,
            ranges,
            bytes,
        })
    }

    /// The index into [`Placement::devices`] of the device running block `layer`.
    pub fn device_index(&self, layer: usize) -> usize {
        self.ranges
            .iter()
            .position(|&(a, b)| (a..b).contains(&layer))
            .unwrap_or(self.ranges.len() - 1)
    }

    /// The device running block `layer`.
    pub fn block_device(&self, layer: usize) -> &Device {
        &self.devices[self.device_index(layer)]
    }

    /// The device of the embedding (and of the input ids).
    pub fn first(&self) -> &Device {
        &self.devices[0]
    }

    /// The device of the final norm and the unembedding.
    pub fn last(&self) -> &Device {
        self.devices.last().expect("a placement has devices")
    }

    /// One line, e.g. `cuda:0 embedding + blocks 0-39 (70.1 GB), cuda:1 blocks 40-79 + head (71.3 GB)`.
    pub fn describe(&self) -> String {
        let n = self.ranges.len();
        self.ranges
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| {
                let mut parts = Vec::new();
                if i == 0 {
                    parts.push("embedding".to_string());
                }
                parts.push(if b - a == 1 {
                    format!("block {a}")
                } else {
                    format!("blocks {a}-{}", b - 1)
                });
                if i + 1 == n {
                    parts.push("head".to_string());
                }
                format!(
                    "{} {} ({:.2} GB)",
                    self.names[i],
                    parts.join(" + "),
                    self.bytes[i] as f64 / 1e9
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Bytes on device `i` holding blocks `a..b`.
fn device_bytes(costs: &Costs, ranges: &[(usize, usize)], i: usize, a: usize, b: usize) -> u64 {
    let mut sum: u64 = costs.blocks[a..b].iter().sum();
    if i == 0 {
        sum += costs.embedding;
    }
    if i + 1 == ranges.len() {
        sum += costs.head;
    }
    sum
}

/// The contiguous ranges minimising the largest device's bytes (exact, by dynamic programming
/// over the cut points; blocks and devices are few).
fn balance_ranges(costs: &Costs, n_devices: usize) -> Result<Vec<(usize, usize)>> {
    let n = costs.blocks.len();
    if n_devices == 0 {
        bail!("--device: no devices listed");
    }
    if n_devices > n {
        bail!("--device lists {n_devices} devices but the model has only {n} blocks (at most one device per block)");
    }
    let mut prefix = vec![0u64; n + 1];
    for (i, c) in costs.blocks.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c;
    }
    let load = |dev: usize, a: usize, b: usize| {
        prefix[b] - prefix[a]
            + if dev == 0 { costs.embedding } else { 0 }
            + if dev + 1 == n_devices { costs.head } else { 0 }
    };
    // best[k][j]: the smallest largest load placing blocks 0..j on devices 0..k (inclusive),
    // each with at least one block; cut[k][j]: where device k's range starts.
    let mut best = vec![vec![u64::MAX; n + 1]; n_devices];
    let mut cut = vec![vec![0usize; n + 1]; n_devices];
    for (j, cell) in best[0].iter_mut().enumerate().skip(1) {
        *cell = load(0, 0, j);
    }
    for k in 1..n_devices {
        for j in (k + 1)..=n {
            // Later starts first and only a strictly smaller load replaces: deterministic ties.
            for start in (k..j).rev() {
                let prev = best[k - 1][start];
                if prev == u64::MAX {
                    continue;
                }
                let m = prev.max(load(k, start, j));
                if m < best[k][j] {
                    best[k][j] = m;
                    cut[k][j] = start;
                }
            }
        }
    }
    let mut ranges = vec![(0, 0); n_devices];
    let mut end = n;
    for k in (0..n_devices).rev() {
        let start = if k == 0 { 0 } else { cut[k][end] };
        ranges[k] = (start, end);
        end = start;
    }
    Ok(ranges)
}

/// `t` on `device`: itself when already there, else a copy. Between two CUDA handles candle
/// 0.11 copies device to device on the destination's stream (`clone_dtod`), so the source
/// device is synchronised first: the state must be finished before the other stream reads it.
pub fn move_to(t: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
    if t.device().same_device(device) {
        return Ok(t.clone());
    }
    if t.device().is_cuda() && device.is_cuda() {
        t.device().synchronize()?;
    }
    t.to_device(device)
}

/// The block a checkpoint tensor belongs to: the first dot-separated number of its name
/// (`model.layers.12.mlp.up_proj.weight` -> 12, `transformer.h.3.attn.c_attn.weight` -> 3);
/// None for the embedding, the final norm and the head.
pub fn tensor_block(name: &str) -> Option<usize> {
    name.split('.').find_map(|part| part.parse::<usize>().ok())
}

/// Whether a tensor outside the blocks belongs on the first device (the input embeddings) rather
/// than the last (final norm, unembedding). GPT-NeoX's `embed_out` is its unembedding.
pub fn is_input_embedding(name: &str) -> bool {
    (name.contains("embed") || name.contains("wte") || name.contains("wpe")) && !name.contains("embed_out")
}

/// Memory costs from a checkpoint's tensor names and element counts, in the compute `dtype`:
/// each block's weights plus the hidden state it keeps for a batch of [`ESTIMATE_TOKENS`]
/// tokens of width `d_model` (estimated from the embedding when not known).
pub fn costs_from_tensors<'a>(tensors: impl IntoIterator<Item = (&'a str, usize)>, dtype: DType) -> Costs {
    let size = dtype.size_in_bytes() as u64;
    let mut costs = Costs::default();
    let mut d_model = 0usize;
    for (name, elems) in tensors {
        let bytes = elems as u64 * size;
        match tensor_block(name) {
            Some(l) => {
                if costs.blocks.len() <= l {
                    costs.blocks.resize(l + 1, 0);
                }
                costs.blocks[l] += bytes;
            }
            None if is_input_embedding(name) => {
                costs.embedding += bytes;
            }
            None => {
                costs.head += bytes;
                // A final norm's weight is one row of the residual stream.
                if name.ends_with("norm.weight") || name.ends_with("ln_f.weight") {
                    d_model = d_model.max(elems);
                }
            }
        }
    }
    let state = ESTIMATE_TOKENS as u64 * d_model as u64 * size;
    for b in &mut costs.blocks {
        *b += state;
    }
    costs.embedding += state;
    costs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(costs: &Costs, n: usize) -> Vec<(usize, usize)> {
        Placement::balance(vec![Device::Cpu; n], costs).unwrap().ranges
    }

    /// 32 equal blocks on two devices: 16/16 when the embedding and the head cost the same (tied
    /// or same size); a head as large as two blocks moves one block to the first device.
    #[test]
    fn equal_blocks_split_in_halves_with_the_ends_considered() {
        let even = Costs {
            blocks: vec![100; 32],
            embedding: 50,
            head: 50,
        };
        assert_eq!(place(&even, 2), [(0, 16), (16, 32)]);
        let heavy_head = Costs {
            blocks: vec![100; 32],
            embedding: 0,
            head: 200,
        };
        // 17 x 100 = 1700 vs 15 x 100 + 200 = 1700.
        assert_eq!(place(&heavy_head, 2), [(0, 17), (17, 32)]);
        let p = Placement::balance(vec![Device::Cpu; 2], &heavy_head).unwrap();
        assert_eq!(p.bytes, [1700, 1700]);
        assert_eq!((p.device_index(16), p.device_index(17)), (0, 1));
        assert_eq!(place(&even, 4), [(0, 8), (8, 16), (16, 24), (24, 32)]);
    }

    /// Unequal blocks: the cut minimises the largest device (checked against every cut).
    #[test]
    fn unequal_blocks_minimise_the_largest_device() {
        let costs = Costs {
            blocks: vec![10, 10, 10, 80, 10, 10],
            embedding: 5,
            head: 30,
        };
        let ranges = place(&costs, 2);
        let largest = |cut: usize| {
            let a: u64 = costs.blocks[..cut].iter().sum::<u64>() + costs.embedding;
            let b: u64 = costs.blocks[cut..].iter().sum::<u64>() + costs.head;
            a.max(b)
        };
        let best = (1..6).map(largest).min().unwrap();
        assert_eq!(largest(ranges[0].1), best);
        assert_eq!(ranges, [(0, 4), (4, 6)]);
        // Three devices: one block each at least, contiguous and covering every block.
        let three = place(&costs, 3);
        assert_eq!(three[0].0, 0);
        assert_eq!(three[2].1, 6);
        assert!(three.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
        assert_eq!(three, [(0, 3), (3, 4), (4, 6)]);
    }

    #[test]
    fn more_devices_than_blocks_is_an_error() {
        let costs = Costs {
            blocks: vec![1; 2],
            ..Costs::default()
        };
        let e = Placement::balance(vec![Device::Cpu; 3], &costs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--device lists 3 devices") && e.contains("only 2 blocks"),
            "{e}"
        );
    }

    #[test]
    fn tensor_names_map_to_blocks_and_ends() {
        assert_eq!(tensor_block("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(
            tensor_block("gpt_neox.layers.0.attention.query_key_value.weight"),
            Some(0)
        );
        assert_eq!(
            tensor_block("model.layers.3.block_sparse_moe.experts.5.w1.weight"),
            Some(3)
        );
        assert_eq!(tensor_block("model.norm.weight"), None);
        assert!(is_input_embedding("model.embed_tokens.weight"));
        assert!(is_input_embedding("gpt_neox.embed_in.weight"));
        assert!(!is_input_embedding("embed_out.weight"));
        assert!(!is_input_embedding("lm_head.weight"));
        let costs = costs_from_tensors(
            [
                ("model.embed_tokens.weight", 40),
                ("model.layers.0.w", 10),
                ("model.layers.1.w", 10),
                ("model.norm.weight", 4),
                ("lm_head.weight", 40),
            ],
            DType::F32,
        );
        let state = ESTIMATE_TOKENS as u64 * 4 * 4;
        assert_eq!(costs.blocks, [40 + state, 40 + state]);
        assert_eq!(costs.embedding, 160 + state);
        assert_eq!(costs.head, 176);
    }
}
