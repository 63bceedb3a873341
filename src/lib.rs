//! jumplens: linear shortcuts through transformer layers.
//!
//! Data flows one way, and the modules are laid out in that order (none imports from a later
//! stage):
//!
//! corpus ([`data`]) -> model, hooked forward ([`model`], [`tokenizer`]) -> activations
//! ([`collect`], [`data`]) -> fit ([`lens`]) -> evaluate ([`eval`]) -> report ([`pipeline`],
//! [`render`]). [`cli`] is a thin layer over the same calls. `docs/architecture.md` has the map.

// Shared infrastructure.
pub mod cancel;
pub mod device;
pub mod error;
pub mod host;
pub mod interrupt;
pub mod progress;

// The pipeline, in order.
pub mod collect;
pub mod data;
pub mod eval;
pub mod lens;
pub mod model;
pub mod pipeline;
pub mod render;
pub mod tokenizer;

// Front ends and tools.
pub mod bench;
pub mod cli;
