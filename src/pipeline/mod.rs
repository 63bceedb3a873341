//! The stages on a run folder: each runner reads its inputs from the folder, calls the numeric
//! modules ([`crate::lens`], [`crate::eval`]) on in-memory data, and writes its JSON, figures
//! ([`crate::render`]) and manifest record. [`stage::Stage`] names them with their inputs,
//! outputs and runner; [`report`] drives them in order.

pub mod early_exit;
pub mod fit;
pub mod import;
pub mod integrity;
pub mod merge;
pub mod predict;
pub mod r2;
pub mod report;
pub mod stage;
pub mod submodules;
pub mod tuned;

pub use fit::{run_fit, FitSummary, Pairs};
pub use r2::{run_r2, R2Report};
pub use stage::Stage;
