//! Figures (SVG + PNG) and HTML.

pub mod plot;
