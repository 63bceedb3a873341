//! The hooked transformer runtime: one trait, [`Transformer`], that every experiment drives.
//!
//! A model is split into the pieces the paper reasons about: the embedding (h_0), the blocks
//! (h_l = block_{l-1}(h_{l-1}), 0-based block index as in TransformerLens), the final norm and the
//! unembedding. Every tap is reported through [`Hooks`] by its TransformerLens name and can be
//! patched (activation patching), and any sub-module can be replaced by a caller-supplied
//! function (for instance a fitted linear map).
//!
//! Files: `transformer` (the trait), `hooks` (taps, hooks), `batch` (batches, masks), `block`
//! (shared block, attention and MLP pieces), `layers` (numeric building blocks), `config`
//! (config.json into typed structs), `dtype` (the compute dtype), `weights` (named tensors), `placement` (blocks split across devices), `arch/` (one file per family and
//! the registry), `load/` (folders, GGUF, the Hugging Face cache).
//!
//! Padding is always on the right, so position ids are `0..T` for every row; attention masks keep
//! padded keys out of every real token's attention.

pub mod arch;
pub mod batch;
pub mod block;
pub mod config;
pub mod dtype;
pub mod fused;
pub mod hooks;
pub mod layers;
pub mod load;
#[cfg(feature = "cuda")]
pub mod pinned_upload;
pub mod placement;
pub mod transformer;
pub mod weights;

pub use batch::{Batch, BatchContext};
pub use dtype::{DtypeChoice, LoadOptions};
pub use hooks::{BlockTap, Hooks, LinearReplacement, NoHooks, SubModule, Tap, TapPatch, TapRecorder, LN_FINAL_TAP};
pub use load::{load_model, load_model_with, LoadedModel};
pub use placement::Placement;
pub use transformer::{hidden_states, hidden_states_with, run_blocks, AttentionKind, ModelInfo, Transformer};
