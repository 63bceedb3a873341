//! Everything on disk: corpora in, activations and run folders out, written atomically.

pub mod activations;
pub mod assets;
pub mod corpus;
pub mod io;
pub mod run;
pub mod stats;
pub mod torch_pickle;

pub use activations::Activations;
pub use run::{Manifest, RunDir};
