//! Evaluation of the lenses against the model: predictions per layer ([`predict`]), early exit
//! ([`early_exit`]), sub-modules replaced by maps ([`submodules`]) and one text at a time ([`peek`]).

pub mod early_exit;
pub mod peek;
pub mod predict;
pub mod submodules;
