//! The lenses: linear maps between hidden states fitted by least squares ([`fit`]), held in one
//! type ([`maps::Maps`], also the `maps.safetensors` format), and scored by r^2 ([`r2`]); the tuned lens ([`tuned`], trained by gradient descent, tuned-lens's format); the paper's published
//! matrices imported ([`import`]).

pub mod fit;
pub mod import;
pub mod maps;
pub mod r2;
pub mod tuned;
