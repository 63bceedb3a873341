//! Figures (SVG + PNG) and the HTML report: [`plot`] draws, [`figures`] builds the stages'
//! figures from their reports, [`html`] writes the self-contained page of a run folder.

pub mod figures;
pub mod html;
pub mod plot;
