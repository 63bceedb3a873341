//! The stages on a run folder and the report that drives them.

pub mod report;
pub mod stages;
