//! Figures of the paper (r² heatmaps, line charts), written as SVG and PNG.
//!
//! Why it is built this way:
//! - The SVG is assembled by hand: the figures are few and simple (rectangles, polylines,
//!   text), and a hand-written SVG is small, deterministic and self-contained, so the report
//!   can inline it into a single HTML file. It references nothing outside itself; text is
//!   plain `<text>` in the generic `sans-serif` family, and the ids it needs (clip paths,
//!   the colour-bar gradient) carry a per-figure prefix so that several figures inlined in
//!   one HTML document do not clash.
//! - The PNG is rasterised from that same SVG by `resvg` (pure Rust) with DejaVu Sans
//!   embedded in the binary (the `dejavu` crate), mapped to `sans-serif`. No system font is
//!   looked up, so a clean machine without fonts (CI) renders the same picture.
//! - Layout uses DejaVu Sans advance widths (a small table) to size margins and legends;
//!   browsers that substitute a narrower sans-serif font only gain room.
//! - Every file is written atomically (temporary file in the same folder, then rename), so
//!   a reader never sees a half-written figure.

use anyhow::{ensure, Context, Result};
use resvg::{tiny_skia, usvg};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// One line chart of a [`line_panels`] figure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Panel {
    /// Title drawn above the chart.
    pub title: String,
    /// Label of the horizontal axis.
    pub x_label: String,
    /// Label of the vertical axis.
    pub y_label: String,
    /// The curves; a name keeps one colour across all panels of a figure.
    pub series: Vec<Series>,
    /// Fixed vertical range `(low, high)`; `None` fits the data (points and bands).
    pub y_range: Option<(f64, f64)>,
}

/// One curve of a [`Panel`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Legend entry; also picks the colour (same name, same colour within a figure).
    pub name: String,
    /// `(x, y)` points, joined in the given order; a non-finite point breaks the line.
    pub points: Vec<(f64, f64)>,
    /// Optional `(lower, upper)` per point (e.g. a 95% confidence interval), drawn as a
    /// translucent band; must have as many entries as `points`.
    pub band: Option<Vec<(f64, f64)>>,
    /// Draw the line dashed.
    pub dashed: bool,
    /// Draw a dot at every point.
    pub markers: bool,
    /// Series with the same key share a colour (e.g. one lens drawn solid and dashed); the
    /// default key is the name.
    pub colour_key: Option<String>,
}

/// Draws the r² heatmaps of a shortcut family, as the paper's Figure 2, into `stem.svg` and
/// `stem.png`.
///
/// Two panels side by side, titled "mat" and "id"; entry `[l][l']` of each matrix is the
/// score of the map from source layer `l` (vertical axis, first layer on top) to target
/// layer `l'` (horizontal axis). `None` and non-finite cells stay blank. The diverging
/// colour scale is clipped to `0..=1`, its lowest tick reads `<= 0`, and both panels share
/// one colour bar.
pub fn r2_heatmaps(stem: &Path, title: &str, mat: &[Vec<Option<f64>>], id: &[Vec<Option<f64>>]) -> Result<()> {
    let svg = r2_heatmaps_svg(&id_prefix(stem, title), title, mat, id)?;
    write_figure(stem, &svg)
}

/// Draws line charts (Precision@k or surprisal against layer, early-exit curves, …) into
/// `stem.svg` and `stem.png`.
///
/// Up to three panels sit in one row; more form a grid (two columns for four panels, three
/// otherwise). Colours come from a fixed qualitative palette, assigned by first appearance
/// of a series name, and one legend below the panels lists every name. Axes whose data are
/// all integers (layers) get integer ticks.
pub fn line_panels(stem: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    let svg = line_panels_svg(&id_prefix(stem, title), title, panels)?;
    write_figure(stem, &svg)
}

/// Rasterises an SVG document to a PNG file at its own size (1 px per SVG unit) on a white
/// background, with the embedded DejaVu Sans as every font family; writes atomically.
pub fn svg_to_png(svg: &str, path: &Path) -> Result<()> {
    let png = render_png(svg)?;
    crate::data::io::write_atomic(path, &png)
}

// ---------------------------------------------------------------------------------------
// Rendering and files

/// DejaVu Sans regular and bold, embedded, answering to every generic family.
fn font_db() -> Arc<usvg::fontdb::Database> {
    static DB: OnceLock<Arc<usvg::fontdb::Database>> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = usvg::fontdb::Database::new();
        for data in [dejavu::sans::regular(), dejavu::sans::bold()] {
            db.load_font_source(usvg::fontdb::Source::Binary(Arc::new(data)));
        }
        db.set_sans_serif_family(FONT_NAME);
        db.set_serif_family(FONT_NAME);
        db.set_monospace_family(FONT_NAME);
        db.set_cursive_family(FONT_NAME);
        db.set_fantasy_family(FONT_NAME);
        Arc::new(db)
    })
    .clone()
}

const FONT_NAME: &str = "DejaVu Sans";

fn usvg_options() -> usvg::Options<'static> {
    let mut opt = usvg::Options {
        font_family: FONT_NAME.to_owned(),
        ..usvg::Options::default()
    };
    opt.fontdb = font_db();
    opt
}

fn render_png(svg: &str) -> Result<Vec<u8>> {
    let tree = usvg::Tree::from_str(svg, &usvg_options()).context("parsing SVG")?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .with_context(|| format!("bad image size {}x{}", size.width(), size.height()))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::identity(), &mut pixmap.as_mut());
    pixmap.encode_png().context("encoding PNG")
}

/// `stem` + `ext`, keeping any dot already in the stem's file name.
fn with_suffix(stem: &Path, ext: &str) -> PathBuf {
    let mut s: OsString = stem.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

fn write_figure(stem: &Path, svg: &str) -> Result<()> {
    crate::data::io::write_atomic(&with_suffix(stem, ".svg"), svg.as_bytes())?;
    svg_to_png(svg, &with_suffix(stem, ".png"))
}

/// A short id prefix, stable for a given output file and title.
fn id_prefix(stem: &Path, title: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let name = stem.file_name().map(|n| n.to_string_lossy().into_owned());
    for b in name.unwrap_or_default().bytes().chain([0]).chain(title.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("jl{:08x}", h as u32)
}

// ---------------------------------------------------------------------------------------
// SVG primitives

const TICK_SIZE: f64 = 13.0;
const LABEL_SIZE: f64 = 14.0;
const TITLE_SIZE: f64 = 16.0;
const INK: &str = "#222222";
const FRAME: &str = "#444444";
const GRID: &str = "#e6e6e6";

/// Advance widths of ASCII 32..=126 in DejaVu Sans, in font units (2048 per em).
const ADVANCE: [u16; 95] = [
    651, 821, 942, 1716, 1303, 1946, 1597, 563, 799, 799, 1024, 1716, 651, 739, 651, 690, 1303, 1303, 1303, 1303, 1303,
    1303, 1303, 1303, 1303, 1303, 690, 690, 1716, 1716, 1716, 1087, 2048, 1401, 1405, 1430, 1577, 1294, 1178, 1587,
    1540, 604, 604, 1343, 1141, 1767, 1532, 1612, 1235, 1612, 1423, 1300, 1251, 1499, 1401, 2025, 1403, 1251, 1403,
    799, 690, 799, 1716, 1024, 1024, 1255, 1300, 1126, 1300, 1260, 721, 1300, 1298, 569, 569, 1186, 569, 1995, 1298,
    1253, 1300, 1300, 842, 1067, 803, 1298, 1212, 1675, 1212, 1212, 1075, 1303, 690, 1303, 1716,
];

/// Width of `s` in px when set in DejaVu Sans (bold is about 10% wider).
fn text_width(s: &str, size: f64, bold: bool) -> f64 {
    let units: f64 = s
        .chars()
        .map(|c| match c {
            ' '..='~' => f64::from(ADVANCE[c as usize - 32]),
            'ℓ' => 846.0,
            '′' => 465.0,
            '²' => 821.0,
            '≤' | '≥' | '−' | '±' => 1716.0,
            '–' => 1024.0,
            '—' | '…' => 2048.0,
            _ => 1303.0,
        })
        .sum();
    units / 2048.0 * size * if bold { 1.1 } else { 1.0 }
}

/// A number for an attribute: at most two decimals, no trailing zeros.
fn n(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

#[derive(Clone, Copy)]
enum Anchor {
    Start,
    Middle,
    End,
}

#[derive(Clone, Copy)]
struct Font {
    size: f64,
    anchor: Anchor,
    bold: bool,
    /// Rotated a quarter turn counter-clockwise about the anchor point.
    vertical: bool,
}

impl Font {
    const fn new(size: f64, anchor: Anchor) -> Self {
        Font {
            size,
            anchor,
            bold: false,
            vertical: false,
        }
    }
    const fn bold(mut self) -> Self {
        self.bold = true;
        self
    }
    const fn vertical(mut self) -> Self {
        self.vertical = true;
        self
    }
}

/// `<text>` whose baseline passes through `(x, y)`.
fn text(out: &mut String, x: f64, y: f64, s: &str, f: Font) {
    let anchor = match f.anchor {
        Anchor::Start => "start",
        Anchor::Middle => "middle",
        Anchor::End => "end",
    };
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" font-size="{}" text-anchor="{anchor}" fill="{INK}""#,
        n(x),
        n(y),
        n(f.size)
    );
    if f.bold {
        out.push_str(r#" font-weight="bold""#);
    }
    if f.vertical {
        let _ = write!(out, r#" transform="rotate(-90 {} {})""#, n(x), n(y));
    }
    let _ = writeln!(out, ">{}</text>", crate::data::io::escape_markup(s));
}

/// Text vertically centred on `y` (baseline shifted by about a third of the size).
fn text_mid(out: &mut String, x: f64, y: f64, s: &str, f: Font) {
    text(out, x, y + 0.35 * f.size, s, f);
}

/// Title centred on `cx`, shrunk if it would not fit in `max_w`.
fn title_text(out: &mut String, cx: f64, y: f64, s: &str, f: Font, max_w: f64) {
    let w = text_width(s, f.size, f.bold);
    let size = if w > max_w && w > 0.0 {
        (f.size * max_w / w).max(8.0)
    } else {
        f.size
    };
    text(out, cx, y, s, Font { size, ..f });
}

fn line(out: &mut String, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, width: f64) {
    let _ = writeln!(
        out,
        r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{stroke}" stroke-width="{}"/>"#,
        n(x1),
        n(y1),
        n(x2),
        n(y2),
        n(width)
    );
}

fn frame(out: &mut String, x: f64, y: f64, w: f64, h: f64) {
    let _ = writeln!(
        out,
        r#"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="{FRAME}" stroke-width="1"/>"#,
        n(x),
        n(y),
        n(w),
        n(h)
    );
}

fn svg_open(w: f64, h: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif">"#,
        w = n(w),
        h = n(h)
    );
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{}" height="{}" fill="#ffffff"/>"##,
        n(w),
        n(h)
    );
    out
}

// ---------------------------------------------------------------------------------------
// Scales

/// Round ticks covering `[lo, hi]`, at most about `max_n` intervals, with the decimals
/// needed to print them. With `integer`, the step is a whole number.
fn nice_ticks(lo: f64, hi: f64, max_n: usize, integer: bool) -> (Vec<f64>, usize) {
    let max_n = max_n.max(1) as f64;
    let span = (hi - lo).abs().max(1e-12);
    let mag = 10f64.powf((span / max_n).log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= max_n + 1e-9)
        .unwrap_or(10.0 * mag);
    if integer {
        step = step.max(1.0).round();
    }
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    let ticks = (first..=last).map(|k| k as f64 * step).collect();
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10() - 1e-9).ceil() as usize
    };
    (ticks, decimals)
}

fn tick_label(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_owned()
    } else {
        s
    }
}

fn all_integers(vals: impl IntoIterator<Item = f64>) -> bool {
    let mut any = false;
    for v in vals.into_iter().filter(|v| v.is_finite()) {
        if v.fract() != 0.0 || v.abs() > 1e9 {
            return false;
        }
        any = true;
    }
    any
}

/// Data range of finite values, padded by `pad` of its span on both sides.
fn auto_range(vals: impl IntoIterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let d = if lo.abs() > 1e-12 { lo.abs() * 0.1 } else { 0.5 };
        return (lo - d, hi + d);
    }
    let p = (hi - lo) * pad;
    (lo - p, hi + p)
}

// ---------------------------------------------------------------------------------------
// Heatmaps

/// Colour of `t` in `0..=1` on a diverging blue–grey–red scale (matplotlib's "coolwarm").
fn diverging(t: f64) -> String {
    const STOPS: [[f64; 3]; 9] = [
        [59.0, 76.0, 192.0],
        [98.0, 130.0, 234.0],
        [141.0, 176.0, 254.0],
        [184.0, 208.0, 249.0],
        [221.0, 221.0, 221.0],
        [245.0, 196.0, 173.0],
        [244.0, 154.0, 123.0],
        [222.0, 96.0, 77.0],
        [180.0, 4.0, 38.0],
    ];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let pos = t * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let f = pos - i as f64;
    let c: Vec<u8> = (0..3)
        .map(|k| (STOPS[i][k] + (STOPS[i + 1][k] - STOPS[i][k]) * f).round() as u8)
        .collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn r2_heatmaps_svg(pfx: &str, title: &str, mat: &[Vec<Option<f64>>], id: &[Vec<Option<f64>>]) -> Result<String> {
    const W: f64 = 900.0;
    const LEFT: f64 = 64.0; // room for the y label and ticks of each panel
    const CB_GAP: f64 = 26.0;
    const CB_W: f64 = 18.0;
    const RIGHT: f64 = 58.0;
    let top = if title.is_empty() { 12.0 } else { 44.0 };
    let side = ((W - 2.0 * LEFT - CB_GAP - CB_W - RIGHT) / 2.0).floor();
    let hm_top = top + 28.0;
    let h = hm_top + side + 56.0;

    let mut out = svg_open(W, h);
    if !title.is_empty() {
        title_text(
            &mut out,
            W / 2.0,
            28.0,
            title,
            Font::new(TITLE_SIZE, Anchor::Middle).bold(),
            W - 20.0,
        );
    }
    let tick = Font::new(TICK_SIZE, Anchor::Middle);
    let label = Font::new(LABEL_SIZE, Anchor::Middle);
    for (k, (name, data)) in [("mat", mat), ("id", id)].into_iter().enumerate() {
        let rows = data.len();
        let cols = data.iter().map(Vec::len).max().unwrap_or(0);
        ensure!(rows > 0 && cols > 0, "heatmap {name:?} has no cells");
        let x0 = LEFT + k as f64 * (side + LEFT);
        let (cw, ch) = (side / cols as f64, side / rows as f64);
        out.push_str("<g shape-rendering=\"crispEdges\">\n");
        for (i, row) in data.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let Some(v) = v.filter(|v| v.is_finite()) else {
                    continue;
                };
                // A hair of overlap hides seams between neighbouring cells.
                let _ = writeln!(
                    out,
                    r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{}"/>"#,
                    n(x0 + j as f64 * cw),
                    n(hm_top + i as f64 * ch),
                    n(cw + 0.3),
                    n(ch + 0.3),
                    diverging(v)
                );
            }
        }
        out.push_str("</g>\n");
        frame(&mut out, x0, hm_top, side, side);
        title_text(
            &mut out,
            x0 + side / 2.0,
            hm_top - 9.0,
            name,
            Font::new(LABEL_SIZE, Anchor::Middle).bold(),
            side,
        );
        // Ticks at cell centres.
        let bottom = hm_top + side;
        let (xt, _) = nice_ticks(0.0, (cols - 1) as f64, (side / 30.0) as usize, true);
        for t in xt {
            let x = x0 + (t + 0.5) * cw;
            line(&mut out, x, bottom, x, bottom + 4.0, FRAME, 1.0);
            text(&mut out, x, bottom + 18.0, &tick_label(t, 0), tick);
        }
        let (yt, _) = nice_ticks(0.0, (rows - 1) as f64, (side / 26.0) as usize, true);
        let mut max_w: f64 = 0.0;
        for t in yt {
            let y = hm_top + (t + 0.5) * ch;
            let s = tick_label(t, 0);
            max_w = max_w.max(text_width(&s, TICK_SIZE, false));
            line(&mut out, x0 - 4.0, y, x0, y, FRAME, 1.0);
            text_mid(&mut out, x0 - 7.0, y, &s, Font::new(TICK_SIZE, Anchor::End));
        }
        text(&mut out, x0 + side / 2.0, bottom + 40.0, "target layer ℓ′", label);
        let ylx = (x0 - 7.0 - max_w - 8.0).max(x0 - LEFT + 16.0);
        text(&mut out, ylx, hm_top + side / 2.0, "source layer ℓ", label.vertical());
    }

    // Shared colour bar, 1 at the top.
    let cb_x = 2.0 * (LEFT + side) + CB_GAP;
    let _ = writeln!(
        out,
        r#"<defs><linearGradient id="{pfx}-cbar" x1="0" y1="0" x2="0" y2="1">"#
    );
    for k in 0..=16 {
        let t = f64::from(k) / 16.0;
        let _ = writeln!(out, r#"<stop offset="{}" stop-color="{}"/>"#, n(t), diverging(1.0 - t));
    }
    out.push_str("</linearGradient></defs>\n");
    let _ = writeln!(
        out,
        r#"<rect x="{}" y="{}" width="{}" height="{}" fill="url(#{pfx}-cbar)"/>"#,
        n(cb_x),
        n(hm_top),
        n(CB_W),
        n(side)
    );
    frame(&mut out, cb_x, hm_top, CB_W, side);
    for k in 0..=5 {
        let v = f64::from(k) / 5.0;
        let y = hm_top + side * (1.0 - v);
        let s = if k == 0 { "<= 0".to_owned() } else { format!("{v:.1}") };
        line(&mut out, cb_x + CB_W, y, cb_x + CB_W + 4.0, y, FRAME, 1.0);
        text_mid(&mut out, cb_x + CB_W + 7.0, y, &s, Font::new(TICK_SIZE, Anchor::Start));
    }
    text(
        &mut out,
        cb_x + CB_W / 2.0,
        hm_top - 9.0,
        "r²",
        Font::new(LABEL_SIZE, Anchor::Middle),
    );
    out.push_str("</svg>\n");
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Line charts

/// Matplotlib's "tab10": distinct hues that stay apart on screen and in print.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];

struct LegendEntry<'a> {
    name: &'a str,
    color: &'static str,
    dashed: bool,
    markers: bool,
    band: bool,
}

const DASH: &str = "6 4";

fn line_panels_svg(pfx: &str, title: &str, panels: &[Panel]) -> Result<String> {
    ensure!(!panels.is_empty(), "a line figure needs at least one panel");
    // Colours by first appearance of a name; the legend keeps that order.
    let mut legend: Vec<LegendEntry> = Vec::new();
    let mut color_of: HashMap<&str, &'static str> = HashMap::new();
    for s in panels.iter().flat_map(|p| &p.series) {
        if let Some(band) = &s.band {
            ensure!(
                band.len() == s.points.len(),
                "series {:?}: band has {} entries for {} points",
                s.name,
                band.len(),
                s.points.len()
            );
        }
        match legend.iter_mut().find(|e| e.name == s.name) {
            Some(e) => e.band |= s.band.is_some(),
            None => {
                let key = s.colour_key.as_deref().unwrap_or(&s.name);
                let next = PALETTE[color_of.len() % PALETTE.len()];
                let color = *color_of.entry(key).or_insert(next);
                legend.push(LegendEntry {
                    name: &s.name,
                    color,
                    dashed: s.dashed,
                    markers: s.markers,
                    band: s.band.is_some(),
                });
            }
        }
    }
    for p in panels {
        if let Some((lo, hi)) = p.y_range {
            ensure!(
                lo.is_finite() && hi.is_finite() && lo < hi,
                "panel {:?}: bad y range {lo}..{hi}",
                p.title
            );
        }
    }

    let count = panels.len();
    let cols = match count {
        1..=3 => count,
        4 => 2,
        _ => 3,
    };
    let rows = count.div_ceil(cols);
    let w = if cols == 1 { 600.0 } else { 900.0 };
    let top = if title.is_empty() { 8.0 } else { 40.0 };
    let row_h = 320.0;

    // Legend rows, wrapped to the figure width.
    let entry_w = |e: &LegendEntry| 30.0 + 6.0 + text_width(e.name, TICK_SIZE, false) + 22.0;
    let mut legend_rows: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0.0;
    for (i, e) in legend.iter().enumerate() {
        let ew = entry_w(e);
        if used + ew > w - 40.0 && !legend_rows.last().is_some_and(Vec::is_empty) {
            legend_rows.push(Vec::new());
            used = 0.0;
        }
        used += ew;
        if let Some(r) = legend_rows.last_mut() {
            r.push(i);
        }
    }
    let legend_h = if legend.is_empty() {
        0.0
    } else {
        legend_rows.len() as f64 * 22.0 + 14.0
    };
    let h = top + rows as f64 * row_h + legend_h;

    let mut out = svg_open(w, h);
    if !title.is_empty() {
        title_text(
            &mut out,
            w / 2.0,
            26.0,
            title,
            Font::new(TITLE_SIZE, Anchor::Middle).bold(),
            w - 20.0,
        );
    }
    let cell_w = w / cols as f64;
    for (i, p) in panels.iter().enumerate() {
        let x0 = (i % cols) as f64 * cell_w;
        let y0 = top + (i / cols) as f64 * row_h;
        draw_panel(&mut out, &format!("{pfx}-p{i}"), p, &color_of, (x0, y0, cell_w, row_h));
    }

    // Legend, centred below the panels.
    let mut y = top + rows as f64 * row_h + 14.0;
    for row in &legend_rows {
        let total: f64 = row.iter().map(|&i| entry_w(&legend[i])).sum::<f64>() - 22.0;
        let mut x = (w - total) / 2.0;
        for &i in row {
            let e = &legend[i];
            if e.band {
                let _ = writeln!(
                    out,
                    r#"<rect x="{}" y="{}" width="30" height="12" fill="{}" fill-opacity="0.2"/>"#,
                    n(x),
                    n(y - 6.0),
                    e.color
                );
            }
            let dash = if e.dashed {
                format!(r#" stroke-dasharray="{DASH}""#)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="2"{dash}/>"#,
                n(x),
                n(x + 30.0),
                e.color,
                y = n(y)
            );
            if e.markers {
                marker(&mut out, x + 15.0, y, e.color);
            }
            text_mid(&mut out, x + 36.0, y, e.name, Font::new(TICK_SIZE, Anchor::Start));
            x += entry_w(e);
        }
        y += 22.0;
    }
    out.push_str("</svg>\n");
    Ok(out)
}

fn marker(out: &mut String, x: f64, y: f64, color: &str) {
    let _ = writeln!(
        out,
        r##"<circle cx="{}" cy="{}" r="3.2" fill="{color}" stroke="#ffffff" stroke-width="0.8"/>"##,
        n(x),
        n(y)
    );
}

/// Draws one chart inside the cell `(x, y, width, height)`.
fn draw_panel(
    out: &mut String,
    pfx: &str,
    p: &Panel,
    color_of: &HashMap<&str, &'static str>,
    (cx, cy, cw, ch): (f64, f64, f64, f64),
) {
    let xs = || p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0));
    let ys = || {
        p.series.iter().flat_map(|s| {
            let band = s.band.iter().flatten().flat_map(|b| [b.0, b.1]);
            s.points.iter().map(|q| q.1).chain(band)
        })
    };
    let x_int = all_integers(xs());
    let y_int = p.y_range.is_none() && all_integers(ys());
    let (x_lo, x_hi) = auto_range(xs(), 0.03);
    let (y_lo, y_hi) = p.y_range.unwrap_or_else(|| auto_range(ys(), 0.05));

    // Plot area: the left margin fits the y tick labels and label.
    let p_top = cy + 30.0;
    let p_bot = cy + ch - 52.0;
    let (y_ticks, y_dec) = nice_ticks(y_lo, y_hi, ((p_bot - p_top) / 32.0) as usize, y_int);
    let y_labels: Vec<String> = y_ticks.iter().map(|&t| tick_label(t, y_dec)).collect();
    let max_w = y_labels
        .iter()
        .map(|s| text_width(s, TICK_SIZE, false))
        .fold(0.0, f64::max);
    let y_label_w = if p.y_label.is_empty() { 0.0 } else { 22.0 };
    let p_left = cx + 12.0 + y_label_w + max_w + 8.0;
    let p_right = cx + cw - 16.0;
    let (pw, ph) = (p_right - p_left, p_bot - p_top);
    let sx = |x: f64| p_left + (x - x_lo) / (x_hi - x_lo) * pw;
    let sy = |y: f64| p_bot - (y - y_lo) / (y_hi - y_lo) * ph;

    // x ticks: as many as fit with their labels apart.
    let mut x_max_n = (pw / 34.0) as usize;
    let (x_ticks, x_dec) = loop {
        let (t, d) = nice_ticks(x_lo, x_hi, x_max_n, x_int);
        let widest = t
            .iter()
            .map(|&v| text_width(&tick_label(v, d), TICK_SIZE, false))
            .fold(0.0, f64::max);
        if x_max_n <= 2 || (widest + 12.0) * t.len() as f64 <= pw {
            break (t, d);
        }
        x_max_n -= 1;
    };

    // Grid, then frame.
    for &t in &x_ticks {
        line(out, sx(t), p_top, sx(t), p_bot, GRID, 1.0);
    }
    for &t in &y_ticks {
        line(out, p_left, sy(t), p_right, sy(t), GRID, 1.0);
    }

    // Clip regions: bands exactly to the plot area, lines with room for markers.
    let _ = writeln!(
        out,
        r#"<defs><clipPath id="{pfx}-band"><rect x="{}" y="{}" width="{}" height="{}"/></clipPath><clipPath id="{pfx}-line"><rect x="{}" y="{}" width="{}" height="{}"/></clipPath></defs>"#,
        n(p_left),
        n(p_top),
        n(pw),
        n(ph),
        n(p_left - 4.0),
        n(p_top - 4.0),
        n(pw + 8.0),
        n(ph + 8.0)
    );
    let finite = |x: f64, y: f64| x.is_finite() && y.is_finite();
    let _ = writeln!(out, r#"<g clip-path="url(#{pfx}-band)">"#);
    for s in &p.series {
        let Some(band) = &s.band else { continue };
        let color = color_of[s.colour_key.as_deref().unwrap_or(&s.name)];
        for run in runs(s.points.len(), |i| {
            finite(s.points[i].0, band[i].0) && band[i].1.is_finite()
        }) {
            if run.len() < 2 {
                continue;
            }
            let mut d = String::new();
            for i in run.clone() {
                let _ = write!(d, "{},{} ", n(sx(s.points[i].0)), n(sy(band[i].1)));
            }
            for i in run.rev() {
                let _ = write!(d, "{},{} ", n(sx(s.points[i].0)), n(sy(band[i].0)));
            }
            let _ = writeln!(
                out,
                r#"<polygon points="{}" fill="{color}" fill-opacity="0.2" stroke="none"/>"#,
                d.trim_end()
            );
        }
    }
    out.push_str("</g>\n");
    let _ = writeln!(out, r#"<g clip-path="url(#{pfx}-line)">"#);
    for s in &p.series {
        let color = color_of[s.colour_key.as_deref().unwrap_or(&s.name)];
        let dash = if s.dashed {
            format!(r#" stroke-dasharray="{DASH}""#)
        } else {
            String::new()
        };
        for run in runs(s.points.len(), |i| finite(s.points[i].0, s.points[i].1)) {
            if run.len() == 1 && !s.markers {
                let (x, y) = s.points[run.start];
                marker(out, sx(x), sy(y), color);
                continue;
            }
            let mut d = String::new();
            for &(x, y) in &s.points[run] {
                let _ = write!(d, "{},{} ", n(sx(x)), n(sy(y)));
            }
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round" stroke-linecap="round"{dash}/>"#,
                d.trim_end()
            );
        }
        if s.markers {
            for &(x, y) in s.points.iter().filter(|q| finite(q.0, q.1)) {
                marker(out, sx(x), sy(y), color);
            }
        }
    }
    out.push_str("</g>\n");
    frame(out, p_left, p_top, pw, ph);

    // Ticks and labels.
    for &t in &x_ticks {
        let x = sx(t);
        line(out, x, p_bot, x, p_bot + 4.0, FRAME, 1.0);
        text(
            out,
            x,
            p_bot + 18.0,
            &tick_label(t, x_dec),
            Font::new(TICK_SIZE, Anchor::Middle),
        );
    }
    for (&t, s) in y_ticks.iter().zip(&y_labels) {
        let y = sy(t);
        line(out, p_left - 4.0, y, p_left, y, FRAME, 1.0);
        text_mid(out, p_left - 7.0, y, s, Font::new(TICK_SIZE, Anchor::End));
    }
    let label = Font::new(LABEL_SIZE, Anchor::Middle);
    if !p.x_label.is_empty() {
        title_text(out, p_left + pw / 2.0, p_bot + 40.0, &p.x_label, label, pw);
    }
    if !p.y_label.is_empty() {
        title_text(
            out,
            p_left - 7.0 - max_w - 10.0,
            p_top + ph / 2.0,
            &p.y_label,
            label.vertical(),
            ph,
        );
    }
    if !p.title.is_empty() {
        title_text(
            out,
            p_left + pw / 2.0,
            p_top - 10.0,
            &p.title,
            Font::new(LABEL_SIZE, Anchor::Middle).bold(),
            pw + 20.0,
        );
    }
}

/// Maximal runs of consecutive indices in `0..len` where `ok` holds.
fn runs(len: usize, ok: impl Fn(usize) -> bool) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    for i in 0..=len {
        match (i < len && ok(i), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Upper-triangular r² matrices shaped like the paper's: `mat` high, `id` lower and
    /// negative far from the diagonal.
    type Grid = Vec<Vec<Option<f64>>>;

    fn r2_sample(layers: usize) -> (Grid, Grid) {
        let make = |f: &dyn Fn(f64, f64) -> f64| -> Grid {
            (0..layers)
                .map(|l| (0..layers).map(|m| (m > l).then(|| f(l as f64, m as f64))).collect())
                .collect()
        };
        let n = layers as f64;
        (
            make(&|l, m| 1.0 - 0.6 * (m - l) / n - 0.2 * (1.0 - l / n) * (m - l) / n),
            make(&|l, m| 1.0 - 1.8 * (m - l) / n),
        )
    }

    fn series(name: &str, f: impl Fn(f64) -> f64, band: bool, dashed: bool) -> Series {
        let points: Vec<(f64, f64)> = (0..12).map(|l| (l as f64, f(l as f64))).collect();
        Series {
            name: name.to_owned(),
            band: band.then(|| points.iter().map(|p| (p.1 - 0.05, p.1 + 0.05)).collect()),
            points,
            dashed,
            markers: !dashed,
            colour_key: None,
        }
    }

    fn sample_panels() -> Vec<Panel> {
        vec![
            Panel {
                title: "Precision@1".into(),
                x_label: "layer ℓ".into(),
                y_label: "Precision@1".into(),
                series: vec![
                    series("mat", |l| 0.2 + 0.065 * l, true, false),
                    series("id", |l| 0.05 + 0.06 * l * l / 11.0, true, true),
                ],
                y_range: Some((0.0, 1.0)),
            },
            Panel {
                title: "Surprisal".into(),
                x_label: "layer ℓ".into(),
                y_label: "surprisal (nats)".into(),
                series: vec![
                    series("mat", |l| 9.0 - 0.6 * l, false, false),
                    series("id", |l| 12.0 - 0.5 * l, false, true),
                ],
                y_range: None,
            },
        ]
    }

    /// Text of every `<text>` in the tree; asserts each was set in a font (has glyphs).
    fn texts(g: &usvg::Group, out: &mut Vec<String>) {
        for node in g.children() {
            match node {
                usvg::Node::Group(g) => texts(g, out),
                usvg::Node::Text(t) => {
                    let s: String = t.chunks().iter().map(|c| c.text()).collect();
                    assert!(
                        !t.flattened().children().is_empty(),
                        "text {s:?} has no glyphs: font missing"
                    );
                    out.push(s);
                }
                _ => {}
            }
        }
    }

    /// Parses `stem.svg` and checks `stem.png`: returns the texts.
    fn check_files(stem: &Path) -> Vec<String> {
        let svg = fs::read_to_string(with_suffix(stem, ".svg")).unwrap();
        let tree = usvg::Tree::from_str(&svg, &usvg_options()).unwrap();
        let mut found = Vec::new();
        texts(tree.root(), &mut found);

        let png = fs::read(with_suffix(stem, ".png")).unwrap();
        let pix = tiny_skia::Pixmap::decode_png(&png).unwrap();
        let size = tree.size().to_int_size();
        assert_eq!((pix.width(), pix.height()), (size.width(), size.height()));
        let px = pix.pixels();
        let non_white = px
            .iter()
            .filter(|p| p.red() < 240 || p.green() < 240 || p.blue() < 240)
            .count();
        let dark = px
            .iter()
            .filter(|p| p.red() < 90 && p.green() < 90 && p.blue() < 90)
            .count();
        assert!(
            non_white * 50 > px.len(),
            "only {non_white} of {} pixels drawn",
            px.len()
        );
        assert!(dark > 2000, "only {dark} dark (text) pixels");

        // Nothing but the two figures is left in the folder (no temporary files).
        let dir = stem.parent().unwrap();
        let left: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        found
    }

    #[test]
    fn heatmap_files() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("fig.r2"); // the dot stays part of the name
        let (mat, id) = r2_sample(24);
        r2_heatmaps(&stem, "r² of linear shortcuts", &mat, &id).unwrap();
        assert!(dir.path().join("fig.r2.svg").is_file());
        let found = check_files(&stem);
        for want in ["mat", "id", "<= 0", "1.0", "target layer ℓ′", "source layer ℓ"] {
            assert!(found.iter().any(|t| t == want), "{want:?} not in {found:?}");
        }
        let svg = fs::read_to_string(with_suffix(&stem, ".svg")).unwrap();
        assert!(svg.contains("&lt;= 0"));
        assert!(!svg.contains("href=\"http") && !svg.contains("@font-face"));
        // The PNG is 900 px wide.
        let png = tiny_skia::Pixmap::load_png(with_suffix(&stem, ".png")).unwrap();
        assert_eq!(png.width(), 900);
    }

    #[test]
    fn line_chart_files() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("nested").join("pk");
        line_panels(&stem, "GPT-2: mat vs id", &sample_panels()).unwrap();
        let found = check_files(&stem);
        for want in ["Precision@1", "Surprisal", "mat", "id", "layer ℓ", "GPT-2: mat vs id"] {
            assert!(found.iter().any(|t| t == want), "{want:?} not in {found:?}");
        }
        // Same name, same colour across panels: two colours only.
        let svg = fs::read_to_string(with_suffix(&stem, ".svg")).unwrap();
        assert!(svg.contains(PALETTE[0]) && svg.contains(PALETTE[1]));
        assert!(!svg.contains(PALETTE[2]));
    }

    #[test]
    fn colour_key_shares_a_colour_across_names() {
        let series = |name: &str, key: &str, dashed: bool| Series {
            name: name.into(),
            points: vec![(0.0, 0.1), (1.0, 0.5)],
            dashed,
            colour_key: Some(key.into()),
            ..Default::default()
        };
        let panel = Panel {
            title: "p".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![
                series("mat dynamic", "mat", false),
                series("mat fixed", "mat", true),
                series("id dynamic", "id", false),
                series("id fixed", "id", true),
            ],
            y_range: None,
        };
        let svg = line_panels_svg("k", "", &[panel]).unwrap();
        // Four legend entries, two colours.
        for name in ["mat dynamic", "mat fixed", "id dynamic", "id fixed"] {
            assert!(svg.contains(name), "{name} missing");
        }
        assert!(svg.contains(PALETTE[0]) && svg.contains(PALETTE[1]));
        assert!(!svg.contains(PALETTE[2]));
    }

    #[test]
    fn grid_and_errors() {
        let mut panels = sample_panels();
        panels.extend(sample_panels());
        panels.extend(sample_panels());
        let svg = line_panels_svg("t", "", &panels).unwrap();
        // Six panels: three columns, two rows.
        let tree = usvg::Tree::from_str(&svg, &usvg_options()).unwrap();
        assert_eq!(tree.size().width(), 900.0);
        assert!(tree.size().height() > 2.0 * 320.0);

        assert!(line_panels_svg("t", "", &[]).is_err());
        let mut bad = sample_panels();
        bad[0].series[0].band = Some(vec![(0.0, 1.0)]);
        assert!(line_panels_svg("t", "", &bad).is_err());
        assert!(r2_heatmaps_svg("t", "", &[], &[]).is_err());
    }

    #[test]
    fn ticks() {
        // Layer axes: whole numbers, every layer when few.
        let (t, d) = nice_ticks(-0.3, 11.3, 12, true);
        assert_eq!(t, (0..=11).map(f64::from).collect::<Vec<_>>());
        assert_eq!(d, 0);
        let (t, _) = nice_ticks(0.0, 47.0, 8, true);
        assert_eq!(t, (0..=4).map(|k| f64::from(k) * 10.0).collect::<Vec<_>>());
        let (t, _) = nice_ticks(0.0, 3.0, 10, true);
        assert!(t.iter().all(|v| v.fract() == 0.0));
        let (t, d) = nice_ticks(0.0, 1.0, 5, false);
        assert_eq!(t.len(), 6);
        assert_eq!(d, 1);
        assert_eq!(tick_label(-0.0001, 2), "0.00");
        assert_eq!(n(-0.001), "0");
        assert_eq!(n(1.50), "1.5");
    }

    #[test]
    fn svg_to_png_is_atomic_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let svg = r#"<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><text x="2" y="15" font-size="14">Hi</text></svg>"#;
        svg_to_png(svg, &path).unwrap();
        svg_to_png(svg, &path).unwrap(); // replaces
        let pix = tiny_skia::Pixmap::load_png(&path).unwrap();
        assert_eq!((pix.width(), pix.height()), (40, 20));
        assert!(pix.pixels().iter().any(|p| p.red() < 100));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(svg_to_png("not svg", &dir.path().join("y.png")).is_err());
    }
}
