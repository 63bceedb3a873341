//! jumplens: linear shortcuts through transformer layers.
//!
//! Data flows one way: corpus -> model (hooked forward) -> activations -> fit -> evaluate ->
//! report. Each stage is a module with a small public surface.

pub mod bench;
pub mod collect;
pub mod corpus;
pub mod device;
pub mod early_exit;
pub mod fit;
pub mod fit_device;
pub mod io;
pub mod maps;
pub mod model;
pub mod peek;
pub mod plot;
pub mod predict;
pub mod progress;
pub mod r2;
pub mod report;
pub mod run;
pub mod stages;
pub mod submodules;
