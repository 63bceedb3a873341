//! The HTML report of a run folder: [`write_report_html`] turns the folder into one
//! self-contained page (metadata, every figure with a caption, the Precision@1 and
//! layers-saved tables, peek grids when the model is given).
//!
//! The page references nothing outside itself: the figures are the stages' own SVG files,
//! inlined as markup (their ids carry per-figure prefixes; clashes are renamed anyway), or the
//! PNG as a `data:` URI when only the PNG exists. There is no script, web font or link.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::Value;

use crate::data::run::{Manifest, RunDir};
use crate::data::Activations;
use crate::eval::peek;
use crate::lens::maps::Maps;
use crate::model::{AttentionKind, LoadedModel};

const CSS: &str = "\
*{box-sizing:border-box}\
body{margin:0;background:#f4f5f7;color:#1d1f23;font:15px/1.55 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif}\
main{max-width:1000px;margin:0 auto;padding:28px 32px 56px;background:#fff;min-height:100vh}\
h1{font-size:1.75em;margin:0 0 .2em}\
h2{font-size:1.3em;margin:2.2em 0 .6em;padding-bottom:.25em;border-bottom:1px solid #dde0e5}\
h3{font-size:1.05em;margin:1.6em 0 .4em}\
p.lead{color:#4a4f57;margin-top:0}\
figure{margin:1.2em 0 1.6em}\
figure svg,figure img{display:block;max-width:100%;height:auto;margin:0 auto}\
figcaption{color:#4a4f57;font-size:.92em;margin-top:.5em}\
table.data{border-collapse:collapse;margin:.6em 0 1em;font-variant-numeric:tabular-nums}\
table.data th,table.data td{padding:3px 12px;border-bottom:1px solid #e6e8ec;text-align:right}\
table.data th{background:#f6f7f9;font-weight:600}\
table.data th:first-child,table.data td:first-child{text-align:left}\
p.tcap{color:#4a4f57;font-size:.9em;margin:-.5em 0 1.4em}\
table.meta{border-collapse:collapse;margin:.5em 0}\
table.meta th{text-align:left;font-weight:normal;color:#5d636c;padding:2px 18px 2px 0;vertical-align:top;white-space:nowrap}\
table.meta td{padding:2px 0}\
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.86em;word-break:break-all}\
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em;background:#f1f2f4;padding:0 4px;border-radius:3px}\
p.note{color:#6b7079;font-style:italic}\
.scroll{overflow-x:auto}\
.peek-text{margin:1.4em 0 .2em;font-weight:600}\
footer{margin-top:3em;color:#8a8f98;font-size:.85em}\
";

pub fn fmt_secs(s: f64) -> String {
    if s < 1.0 {
        format!("{s:.2} s")
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02.0} s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{} h {:02.0} min", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    }
}

fn fmt_pct(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("—".into(), |x| format!("{:.1}%", 100.0 * x))
}

/// FLOPs as MFLOP with three significant digits.
fn fmt_mflop(v: Option<f64>) -> String {
    match v.filter(|x| x.is_finite()) {
        None => "—".into(),
        Some(x) => {
            let m = x / 1e6;
            let digits = if m >= 100.0 {
                0
            } else if m >= 10.0 {
                1
            } else if m >= 1.0 {
                2
            } else {
                3
            };
            format!("{m:.digits$} MFLOP")
        }
    }
}

fn fmt_num(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or("—".into(), |x| format!("{x:.digits$}"))
}

/// A JSON file of the run, or `None` when it does not exist.
fn read_json(run: &RunDir, name: &str) -> Result<Option<Value>> {
    let p = run.file(name);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| anyhow!("{}: invalid JSON ({e})", p.display()))
}

/// The figures inlined so far; renames ids that would clash with an earlier figure's.
struct Figures {
    ids: HashSet<String>,
    count: usize,
}

impl Figures {
    /// The figure `stem` of the run as inline markup: its SVG (ids made unique in the page) or,
    /// when only the PNG exists, the PNG as a data: URI. `None` when neither exists.
    fn markup(&mut self, run: &RunDir, stem: &str, alt: &str) -> Result<Option<String>> {
        self.count += 1;
        let svg_path = run.file(&format!("{stem}.svg"));
        if svg_path.exists() {
            let text =
                std::fs::read_to_string(&svg_path).with_context(|| format!("{}: cannot read", svg_path.display()))?;
            let svg = strip_prolog(&text);
            if !svg.trim_start().starts_with("<svg") {
                bail!("{}: not an SVG document", svg_path.display());
            }
            let ids = svg_ids(svg);
            let svg = if ids.iter().any(|i| self.ids.contains(i)) {
                prefix_ids(svg, &ids, &format!("f{}-", self.count))
            } else {
                svg.to_string()
            };
            self.ids.extend(svg_ids(&svg));
            // Label the graphic for screen readers; the caption says the rest.
            let svg = svg.replacen(
                "<svg",
                &format!(
                    "<svg role=\"img\" aria-label=\"{}\"",
                    crate::data::io::escape_markup(alt)
                ),
                1,
            );
            return Ok(Some(svg.trim().to_string()));
        }
        let png_path = run.file(&format!("{stem}.png"));
        if png_path.exists() {
            let bytes = std::fs::read(&png_path).with_context(|| format!("{}: cannot read", png_path.display()))?;
            return Ok(Some(format!(
                "<img alt=\"{}\" src=\"data:image/png;base64,{}\">",
                crate::data::io::escape_markup(alt),
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            )));
        }
        Ok(None)
    }
}

/// The document without an XML declaration, DOCTYPE or leading comments.
fn strip_prolog(text: &str) -> &str {
    let mut s = text.trim_start_matches('\u{feff}').trim_start();
    loop {
        let end = if s.starts_with("<?") {
            s.find("?>").map(|i| i + 2)
        } else if s.starts_with("<!--") {
            s.find("-->").map(|i| i + 3)
        } else if s.starts_with("<!") {
            s.find('>').map(|i| i + 1)
        } else {
            None
        };
        match end {
            Some(e) => s = s[e..].trim_start(),
            None => return s,
        }
    }
}

/// Every `id="…"` value in an SVG.
fn svg_ids(svg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find(" id=\"") {
        rest = &rest[i + 5..];
        if let Some(end) = rest.find('"') {
            out.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    out
}

/// Renames every id of `svg` to `prefix + id`, and every reference to it (`url(#id)`,
/// `href="#id"`).
fn prefix_ids(svg: &str, ids: &[String], prefix: &str) -> String {
    let mut s = svg.to_string();
    for id in ids {
        for (from, to) in [
            (format!(" id=\"{id}\""), format!(" id=\"{prefix}{id}\"")),
            (format!("url(#{id})"), format!("url(#{prefix}{id})")),
            (format!("href=\"#{id}\""), format!("href=\"#{prefix}{id}\"")),
        ] {
            s = s.replace(&from, &to);
        }
    }
    s
}

/// Writes `RUN/report.html`: one self-contained page with the run's metadata, every figure the
/// run has (with a caption saying how to read it), the Precision@1 and layers-saved tables,
/// and, when `lm` is given, peek grids of three validation sentences. Sections whose stage has
/// not run are replaced by a note. Returns the page's path.
///
/// # Example
///
/// ```no_run
/// use jumplens::render::html::write_report_html;
/// use jumplens::pipeline::report::STAGES;
/// use jumplens::data::run::RunDir;
///
/// // Regenerate the page of an existing run, without peek grids (no model loaded).
/// let page = write_report_html(&RunDir::new("runs/smollm2-wiki"), None, &STAGES)?;
/// println!("{}", page.display());
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn write_report_html(run: &RunDir, lm: Option<&LoadedModel>, stages: &[&str]) -> Result<PathBuf> {
    let m = run.read_manifest()?;
    let mut figs = Figures {
        ids: HashSet::new(),
        count: 0,
    };
    let arch = crate::data::io::escape_markup(&m.model.arch);
    let model_name = Path::new(&m.model.path)
        .file_name()
        .map_or(m.model.path.clone(), |n| n.to_string_lossy().into_owned());
    let corpus_name = Path::new(&m.corpus.path)
        .file_name()
        .map_or(m.corpus.path.clone(), |n| n.to_string_lossy().into_owned());
    let n_layers = m.model.n_layers;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>jumplens report — {} on {}</title><style>{CSS}{}</style></head>\n<body><main>\n",
        crate::data::io::escape_markup(&model_name),
        crate::data::io::escape_markup(&corpus_name),
        peek::PEEK_CSS
    );
    let _ = write!(
        h,
        "<h1>Linear shortcuts through {} ({arch}, {n_layers} layers)</h1>\n\
         <p class=\"lead\">How well a linear map <i>A</i> fitted from layer ℓ to a later layer predicts the later \
         hidden state and the model's final prediction, compared with using the state as it is (the logit \
         lens) — after Yom Din et al., <i>Jump to Conclusions</i> (LREC-COLING 2024). Corpus: {}.</p>\n",
        crate::data::io::escape_markup(&model_name),
        crate::data::io::escape_markup(&corpus_name)
    );
    h.push_str(&metadata_section(&m, stages));
    h.push_str(&r2_section(run, &m, &mut figs)?);
    h.push_str(&predict_section(run, &m, &mut figs)?);
    h.push_str(&early_exit_section(run, &m, &mut figs)?);
    h.push_str(&submodules_section(run, &mut figs)?);
    h.push_str(&peek_section(run, &m, lm));
    let _ = write!(
        h,
        "<footer>Written by jumplens {} from <span class=\"mono\">{}</span>. Self-contained: no scripts, \
         fonts or images are loaded from anywhere.</footer>\n</main></body></html>\n",
        env!("CARGO_PKG_VERSION"),
        crate::data::io::escape_markup(&run.root.display().to_string())
    );
    let path = run.file("report.html");
    crate::data::io::write_atomic(&path, h.as_bytes())?;
    Ok(path)
}

fn metadata_section(m: &Manifest, stages: &[&str]) -> String {
    let mut h = String::from("<h2 id=\"run\">Run</h2>\n<table class=\"meta\">\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(h, "<tr><th>{k}</th><td>{v}</td></tr>");
    };
    let md = &m.model;
    row(
        "model",
        format!(
            "<span class=\"mono\">{}</span>",
            crate::data::io::escape_markup(&md.path)
        ),
    );
    row(
        "model sha256",
        format!(
            "<span class=\"mono\">{}</span>",
            crate::data::io::escape_markup(&md.sha256)
        ),
    );
    row(
        "architecture",
        format!(
            "{}, {} layers, d = {}, vocabulary {}, {} attention",
            crate::data::io::escape_markup(&md.arch),
            md.n_layers,
            md.d_model,
            md.vocab_size,
            crate::data::io::escape_markup(&md.attention)
        ),
    );
    let c = &m.corpus;
    row(
        "corpus",
        format!(
            "<span class=\"mono\">{}</span>",
            crate::data::io::escape_markup(&c.path)
        ),
    );
    row(
        "corpus sha256",
        format!(
            "<span class=\"mono\">{}</span>",
            crate::data::io::escape_markup(&c.sha256)
        ),
    );
    row(
        "corpus format",
        format!(
            "{} ({} articles)",
            crate::data::io::escape_markup(&c.format.replace('_', " ")),
            c.articles
        ),
    );
    row("seed", m.seed.to_string());
    let positions = m
        .options
        .get("positions")
        .map(|p| match p {
            Value::Object(o) if o.contains_key("random") => {
                let k = o["random"].get("k").and_then(Value::as_u64).unwrap_or(1);
                format!(
                    "{k} random token position{} per sentence",
                    if k == 1 { "" } else { "s" }
                )
            }
            Value::String(s) if s == "all" => "every token position".into(),
            other => crate::data::io::escape_markup(&other.to_string()),
        })
        .unwrap_or_default();
    let count = |split: &str| -> String {
        m.counts.get(split).map_or("not collected".into(), |c| {
            let get = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
            format!(
                "{} examples from {} sentences (asked for {})",
                get("examples"),
                get("sentences"),
                get("requested")
            )
        })
    };
    row("training set", count("train"));
    row("validation set", format!("{}; {positions}", count("val")));
    if let Some(r) = m.stages.get("report") {
        let quick = r.get("quick").and_then(Value::as_bool).unwrap_or(false);
        let sub = |k: &str| r.get(k).and_then(Value::as_u64).map_or("all".into(), |v| v.to_string());
        row(
            "preset",
            format!(
                "{} (sub-modules: fitted on {} training examples, scored on {} validation examples)",
                if quick { "quick" } else { "paper sizes" },
                sub("submodule_train"),
                sub("submodule_eval")
            ),
        );
    }
    row(
        "tool",
        format!(
            "{} {} (run); page written by jumplens {}",
            crate::data::io::escape_markup(&m.tool),
            crate::data::io::escape_markup(&m.version),
            env!("CARGO_PKG_VERSION")
        ),
    );
    h.push_str(
        "</table>\n<h3>Wall time per stage</h3>\n<table class=\"data\"><tr><th>stage</th><th>wall time</th></tr>\n",
    );
    let mut total = 0.0;
    for (stage, t) in m.wall_times(stages) {
        total += t.unwrap_or(0.0);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            crate::data::io::escape_markup(&stage.replace('_', "-")),
            t.map_or("not run".into(), fmt_secs)
        );
    }
    let _ = writeln!(
        h,
        "<tr><th>total</th><th>{}</th></tr>\n</table><p class=\"tcap\">Wall time of the last run of each stage \
         (a report that found a stage up to date keeps the earlier time).</p>",
        fmt_secs(total)
    );
    h
}

/// A `<figure>` with the figure (or a note when it is missing) and its caption.
fn figure(figs: &mut Figures, run: &RunDir, stem: &str, alt: &str, caption: &str) -> Result<String> {
    Ok(match figs.markup(run, stem, alt)? {
        Some(markup) => format!("<figure>\n{markup}\n<figcaption>{caption}</figcaption></figure>\n"),
        None => format!(
            "<p class=\"note\">Figure {} is missing (neither {stem}.svg nor {stem}.png is in the run folder).</p>\n",
            crate::data::io::escape_markup(stem)
        ),
    })
}

fn not_run(what: &str, file: &str, cmd: &str) -> String {
    format!(
        "<p class=\"note\">{what}: not run yet ({file} is missing). Run <code>jumplens report</code> or \
         <code>{cmd}</code>.</p>\n"
    )
}

fn r2_section(run: &RunDir, m: &Manifest, figs: &mut Figures) -> Result<String> {
    let mut h = String::from("<h2 id=\"r2\">From one layer's state to a later one: r²</h2>\n");
    let Some(r2) = read_json(run, "r2.json")? else {
        h.push_str(&not_run(
            "r² heatmaps",
            "r2.json",
            "jumplens fit RUN && jumplens r2 RUN",
        ));
        return Ok(h);
    };
    let n_val = r2.get("n_val").and_then(Value::as_u64).unwrap_or(0);
    let caption = format!(
        "r² of predicting the hidden state h<sub>ℓ′</sub> from h<sub>ℓ</sub> on the {n_val} validation \
         examples, for every pair ℓ &lt; ℓ′ (averaged over coordinates, as scikit-learn's r2_score). Rows = \
         source layer ℓ (first layer on top), columns = target layer ℓ′. <b>mat</b> = the linear map \
         A<sub>ℓ→ℓ′</sub> fitted by least squares on the training set; <b>id</b> = the state itself, h<sub>ℓ</sub> \
         used as h<sub>ℓ′</sub>. 1 means a perfect prediction; the lowest colour is r² ≤ 0 (no better than \
         predicting the mean). Blank cells are pairs that were not fitted."
    );
    h.push_str(&figure(
        figs,
        run,
        "r2",
        "r² heatmaps of mat and id over source and target layers",
        &caption,
    )?);
    // The jump to the last layer, in numbers.
    let (mat, id) = (r2.get("mat"), r2.get("id"));
    let last = r2.get("layers").and_then(Value::as_u64).unwrap_or(0) as usize;
    let cell = |t: Option<&Value>, l: usize| {
        t.and_then(|t| t.get(l))
            .and_then(|r| r.get(last))
            .and_then(Value::as_f64)
    };
    if last > 0 && mat.is_some() {
        h.push_str("<table class=\"data\"><tr><th>source layer ℓ</th><th>r² mat ℓ→L</th><th>r² id ℓ→L</th></tr>\n");
        for l in layer_rows(last).into_iter().filter(|&l| l < last) {
            let _ = writeln!(
                h,
                "<tr><td>{l}</td><td>{}</td><td>{}</td></tr>",
                fmt_num(cell(mat, l), 3),
                fmt_num(cell(id, l), 3)
            );
        }
        let _ = writeln!(
            h,
            "</table><p class=\"tcap\">r² of the jump from layer ℓ straight to the last layer L = {last} (the last column of \
             the heatmaps).</p>"
        );
    }
    // Few training examples per coordinate: least squares overfits, most visibly from early layers.
    let n_train = m
        .counts
        .get("train")
        .and_then(|c| c.get("examples"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let d = m.model.d_model as u64;
    if n_train > 0 && n_train < 10 * d {
        let _ = writeln!(
            h,
            "<p class=\"note\">Each map has d = {d} inputs per output coordinate and was fitted on {n_train} training \
             examples ({:.1} per input), so least squares can overfit: validation r² may fall well below what more \
             data would give, even below 0.{}</p>",
            n_train as f64 / d as f64,
            if n_train < 9000 {
                " The paper fits on 9000 sentences (<code>jumplens report</code> without <code>--quick</code>)."
            } else {
                ""
            }
        );
    }
    Ok(h)
}

/// Layers 0..=last at a stride giving about ten rows, always including the last.
fn layer_rows(last: usize) -> Vec<usize> {
    let stride = last.div_ceil(10).max(1);
    let mut v: Vec<usize> = (0..=last).step_by(stride).collect();
    if v.last() != Some(&last) {
        v.push(last);
    }
    v
}

fn predict_section(run: &RunDir, m: &Manifest, figs: &mut Figures) -> Result<String> {
    let mut h = String::from("<h2 id=\"predict\">Reading the final prediction out of earlier layers</h2>\n");
    let Some(p) = read_json(run, "predict.json")? else {
        h.push_str(&not_run("Predictions", "predict.json", "jumplens predict RUN"));
        return Ok(h);
    };
    let n_val = p.get("n_val").and_then(Value::as_u64).unwrap_or(0);
    let masked = m.model.attention == "bidirectional";
    let target = if masked {
        "the token at the masked position"
    } else {
        "the next token"
    };
    let caption =
        format!(
        "Agreement of each lens with the full model at {target}, on {n_val} validation examples; x = source \
         layer ℓ. <b>mat</b> = h<sub>ℓ</sub> cast to the last layer by the fitted map A<sub>ℓ→L</sub>, then read \
         out with the model's own final norm and unembedding; <b>id</b> = the logit lens (h<sub>ℓ</sub> read out \
         directly){}. Precision@k = share of examples whose lens top-1 token is among the model's top-k (it \
         measures agreement with the model, not with the text); higher is better. Surprisal = −ln \
         p<sub>model</sub>(lens top-1) in nats, with a 95% confidence band; lower is better.",
        [
            ("affine", "; <b>affine</b> = A h + b"),
            (
                "tuned",
                "; <b>tuned</b> = the tuned lens (h + W<sub>ℓ</sub> h + b<sub>ℓ</sub>, trained on KL to the model's \
                 final distribution, Belrose et al. 2023)",
            ),
            ("mat+kl", "; <b>mat+kl</b> = the tuned lens trained from W<sub>ℓ</sub> = A<sub>ℓ→L</sub> − I"),
        ]
        .iter()
        .filter(|(k, _)| p.get("lenses").and_then(|l| l.get(*k)).is_some())
        .map(|(_, text)| *text)
        .collect::<String>()
    );
    h.push_str(&figure(
        figs,
        run,
        "predict",
        "Precision@1, @5, @10 and surprisal of each lens against the source layer",
        &caption,
    )?);
    for (key, name) in [("tuned-lens.tuned", "tuned"), ("tuned-lens.tuned-mat", "mat+kl")] {
        let Some(rec) = m.stages.get(key) else { continue };
        let opt = |k: &str| rec.get("options").and_then(|o| o.get(k)).and_then(Value::as_u64);
        let _ = writeln!(
            h,
            "<p><b>{name}</b>: trained {} steps of {} tokens in {} (final loss, summed over layers: {}).</p>",
            opt("steps").map_or("?".into(), |v| v.to_string()),
            opt("tokens_per_step").map_or("?".into(), |v| v.to_string()),
            rec.get("wall_s").and_then(Value::as_f64).map_or("?".into(), fmt_secs),
            fmt_num(rec.get("final_loss").and_then(Value::as_f64), 2)
        );
    }
    let Some(lenses) = p.get("lenses").and_then(Value::as_object) else {
        return Ok(h);
    };
    let series = |lens: &str| -> Vec<Option<f64>> {
        lenses
            .get(lens)
            .and_then(|l| l.get("p@1"))
            .and_then(Value::as_array)
            .map(|a| a.iter().map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let names: Vec<&String> = lenses.keys().collect();
    let last = p.get("layers").and_then(Value::as_u64).unwrap_or(0) as usize;
    h.push_str("<table class=\"data\"><tr><th>layer ℓ</th>");
    for n in &names {
        let _ = write!(h, "<th>P@1 {}</th>", crate::data::io::escape_markup(n));
    }
    let both = lenses.contains_key("mat") && lenses.contains_key("id");
    if both {
        h.push_str("<th>mat − id</th>");
    }
    h.push_str("</tr>\n");
    let cols: Vec<Vec<Option<f64>>> = names.iter().map(|n| series(n)).collect();
    let (mat, id) = (series("mat"), series("id"));
    for l in layer_rows(last) {
        let _ = write!(h, "<tr><td>{l}</td>");
        for c in &cols {
            let _ = write!(h, "<td>{}</td>", fmt_num(c.get(l).copied().flatten(), 3));
        }
        if both {
            let d = mat.get(l).copied().flatten().zip(id.get(l).copied().flatten());
            let _ = write!(
                h,
                "<td>{}</td>",
                d.map_or("—".into(), |(a, b)| format!("{:+.3}", a - b))
            );
        }
        h.push_str("</tr>\n");
    }
    let _ = writeln!(
        h,
        "</table><p class=\"tcap\">Precision@1 of mat and id at every few layers (layer {last} is the model's own output, where \
         every lens scores 1).</p>"
    );
    Ok(h)
}

fn early_exit_section(run: &RunDir, m: &Manifest, figs: &mut Figures) -> Result<String> {
    let mut h = String::from("<h2 id=\"early-exit\">Early exit</h2>\n");
    let Some(e) = read_json(run, "early_exit.json")? else {
        h.push_str(&not_run("Early exit", "early_exit.json", "jumplens early-exit RUN"));
        return Ok(h);
    };
    let masked = m.model.attention == "bidirectional";
    let caption = format!(
        "Each marked point is one confidence threshold λ: an example leaves at the first layer ℓ ≥ 1 where the \
         cast prediction's p<sub>top1</sub> − p<sub>top2</sub> exceeds 0.9 λ + 0.1 exp(−4t/N) (t = {}, N = mean \
         sentence length), and its prediction is the cast top-1 token; an example that never leaves runs all \
         {} blocks. x = mean blocks run per example, y = Precision@1 of the exit prediction against the full \
         model; up and to the left is better. Dashed: every example exits at the same fixed layer. mat casts \
         with A<sub>ℓ→L</sub>, id with the logit lens.",
        if masked {
            "3 for every example, as in the paper for BERT"
        } else {
            "the token's position"
        },
        m.model.n_layers
    );
    h.push_str(&figure(
        figs,
        run,
        "early_exit",
        "Precision@1 against mean blocks run, dynamic and fixed exit, mat and id",
        &caption,
    )?);
    if let Some(saved) = e.get("saved_at").and_then(Value::as_object) {
        // mat and id first, then any other lens early exit scored (affine, tuned, mat+kl).
        let mut names: Vec<String> = vec!["mat".into(), "id".into()];
        for row in saved.values().filter_map(Value::as_object) {
            for k in row.keys() {
                if k != "difference" && !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
        h.push_str("<table class=\"data\"><tr><th>target Precision@1</th>");
        for n in &names {
            let _ = write!(h, "<th>layers saved, {}</th>", crate::data::io::escape_markup(n));
        }
        h.push_str("<th>difference (mat − id)</th></tr>\n");
        for (target, row) in saved {
            let get = |k: &str| row.get(k).and_then(Value::as_f64);
            let diff = get("difference").map(|d| format!("{:+.1} points", 100.0 * d));
            let _ = write!(h, "<tr><td>{}</td>", crate::data::io::escape_markup(target));
            for n in &names {
                let _ = write!(h, "<td>{}</td>", fmt_pct(get(n)));
            }
            let _ = writeln!(h, "<td>{}</td></tr>", diff.unwrap_or_else(|| "—".into()));
        }
        h.push_str(
            "</table><p class=\"tcap\">Share of layers saved (1 − mean blocks run / L) by the cheapest threshold reaching the \
             target Precision@1, interpolated along the sweep; — = not reached. The paper reports, at 0.95 for \
             24-layer models, GPT-2 mat 13.8% vs id 5.9% and BERT mat 20% vs id 14.6%.</p>\n",
        );
    }
    if let Some(f) = e.get("flops") {
        let g = |k: &str| fmt_mflop(f.get(k).and_then(Value::as_f64));
        let _ = write!(
            h,
            "<p><b>FLOPs.</b> Layers saved count blocks only. Each cast tried on the way also costs a readout (final \
             norm and unembedding: {} per example), plus {} for mat's d×d map, against {} per block (estimated \
             from the model's shape).",
            g("per_cast_readout"),
            g("per_map"),
            g("per_block")
        );
        if let Some(at) = f.get("at_p@1_0.95").and_then(Value::as_object) {
            let parts: Vec<String> = at
                .iter()
                .map(|(lens, r)| {
                    let v = |k: &str| r.get(k).and_then(Value::as_f64);
                    let cost = match v("net_saving") {
                        Some(s) if s >= 0.0 => format!("saving {} of the full model's FLOPs", fmt_pct(Some(s))),
                        Some(s) => format!("spending {:.2}× the full model's FLOPs", 1.0 - s),
                        None => "cost unknown".into(),
                    };
                    format!(
                        "{} runs {} blocks and tries {} casts per example, {cost}",
                        crate::data::io::escape_markup(lens),
                        fmt_num(v("mean_layers"), 2),
                        fmt_num(v("mean_casts"), 2),
                    )
                })
                .collect();
            if !parts.is_empty() {
                let _ = write!(
                    h,
                    " At the cheapest threshold reaching Precision@1 ≥ 0.95, {}. Spending more than the full \
                     model means the casts cost more than the blocks they save (typical when the vocabulary is \
                     large next to the blocks).",
                    parts.join("; ")
                );
            }
        }
        h.push_str("</p>\n");
    }
    Ok(h)
}

fn submodules_section(run: &RunDir, figs: &mut Figures) -> Result<String> {
    let mut h = String::from("<h2 id=\"submodules\">Sub-modules replaced by linear maps, and alternation</h2>\n");
    let sub = read_json(run, "submodules.json")?;
    let alt = read_json(run, "alternation.json")?;
    if sub.is_none() && alt.is_none() {
        h.push_str(&not_run(
            "Sub-modules and alternation",
            "submodules.json",
            "jumplens submodules RUN",
        ));
        return Ok(h);
    }
    if let Some(s) = &sub {
        let n = s.get("n_eval").and_then(Value::as_u64).unwrap_or(0);
        let caption = format!(
            "At x = ℓ, blocks 1..ℓ run exactly and every later block runs with one kind of sub-module replaced by \
             a linear map fitted from that sub-module's input to its output on training examples: <b>attn</b> = \
             attention, <b>mlp</b> = the MLP, <b>norms</b> = the block's layer norms. Dashed, for comparison: \
             <b>mat</b> and <b>id</b> jump from h<sub>ℓ</sub> straight to the last layer. Scored against the full \
             model on {n} validation examples; higher Precision@k and lower surprisal are better. A linearised \
             attention acts on each position alone: no information moves between tokens."
        );
        h.push_str(&figure(
            figs,
            run,
            "submodules",
            "Precision and surprisal with sub-modules replaced from layer ℓ on",
            &caption,
        )?);
        let diverged: Vec<&str> = s
            .get("diverged")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(first) = diverged.first() {
            h.push_str(&format!(
                "<p>{} replacement cell(s) diverged: their logits overflow f32, so KL and cross-entropy are not \
                 numbers (null in submodules.json, listed under <code>diverged</code>), e.g. {}.</p>\n",
                diverged.len(),
                first
            ));
        }
    } else {
        h.push_str(&not_run("Sub-modules", "submodules.json", "jumplens submodules RUN"));
    }
    if let Some(a) = &alt {
        let n = a.get("n_eval").and_then(Value::as_u64).unwrap_or(0);
        let caption = format!(
            "Interleaving real blocks with linear jumps, by the number of blocks actually run (x) on {n} validation \
             examples: <b>run a, jump b</b> repeats a real blocks then one fitted jump over b layers; \
             <b>r²-informed</b> picks the jumps with the largest product of r² for each number of blocks run; \
             <b>single jump to L</b> runs k blocks then jumps to the last layer (the mat lens). Higher at equal x \
             is better."
        );
        h.push_str(&figure(
            figs,
            run,
            "alternation",
            "Precision@1 of alternation schedules against executed blocks",
            &caption,
        )?);
    }
    Ok(h)
}

fn peek_section(run: &RunDir, m: &Manifest, lm: Option<&LoadedModel>) -> String {
    let mut h = String::from("<h2 id=\"peek\">What each layer predicts</h2>\n");
    let Some(lm) = lm else {
        h.push_str(
            "<p class=\"note\">Peek grids need the model: regenerate this page with <code>jumplens report \
             --html-only RUN</code> where the run's model file is available.</p>\n",
        );
        return h;
    };
    match peek_grids(run, m, lm) {
        Ok(g) => h.push_str(&g),
        Err(e) => {
            let _ = writeln!(
                h,
                "<p class=\"note\">No peek grids: {}</p>",
                crate::data::io::escape_markup(format!("{e:#}").lines().next().unwrap_or_default())
            );
        }
    }
    h
}

/// Token ids of up to three validation sentences of moderate length, from the val activations'
/// token lists (checked by [`Activations::read_tokens`]; the hidden states are not read).
fn sample_sentences(run: &RunDir, n: usize) -> Result<Vec<Vec<u32>>> {
    let path = crate::data::run::require(&run.activations("val"), "collect")?;
    let tok = Activations::read_tokens(&path)?;
    let sentences: Vec<&[u32]> = (0..tok.len()).map(|i| tok.sentence(i)).collect();
    let mut candidates: Vec<usize> = (0..sentences.len())
        .filter(|&i| (7..=14).contains(&sentences[i].len()))
        .collect();
    if candidates.len() < n {
        candidates = (0..sentences.len()).collect();
        candidates.sort_by_key(|&i| sentences[i].len());
        candidates.truncate(n.max(1) * 4);
        candidates.sort_unstable();
    }
    // Spread over the candidates: first, middle, last, ...
    let mut picked = Vec::new();
    if !candidates.is_empty() {
        for k in 0..n {
            let i = candidates[k * (candidates.len() - 1) / (n - 1).max(1)];
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
    }
    Ok(picked.into_iter().map(|i| sentences[i].to_vec()).collect())
}

fn peek_grids(run: &RunDir, m: &Manifest, lm: &LoadedModel) -> Result<String> {
    let info = lm.model.info();
    if info.n_layers != m.model.n_layers || info.d_model != m.model.d_model {
        bail!("the loaded model is not the run's model");
    }
    // The run's cache: hashing an 8B model's 16 GB again took ~10 s of the page's time.
    let sha = crate::data::io::sha256_path_cached(&lm.path, &run.sha256_cache())?;
    if sha != m.model.sha256 {
        bail!("the loaded model's sha256 differs from the run's");
    }
    // Only the maps to the last layer are needed.
    let maps = if run.maps().exists() {
        let all = Maps::read(&run.maps())?;
        all.check_model(&m.model)?;
        Some(all.into_target(m.model.n_layers))
    } else {
        None
    };
    // The run's tuned lenses (RUN/tuned/, RUN/tuned-mat/), when trained.
    let mut tuned = Vec::new();
    for (dir, name) in [("tuned", "tuned"), ("tuned-mat", "mat+kl")] {
        if run.file(dir).join("params.pt").exists() {
            tuned.push((
                name.to_string(),
                crate::lens::tuned::TunedLens::read_dir(&run.file(dir))?,
            ));
        }
    }
    let tok = lm.tokenizer()?;
    let masked = info.attention == AttentionKind::Bidirectional;
    let mut h = String::new();
    let _ = writeln!(
        h,
        "<p>Three validation sentences read through every layer. Rows = layers (the model's output on top), \
         columns = input tokens; each cell is the lens's top-1 {} at that layer, darker = more probable; hover \
         a cell for the top-5.{}{}</p>",
        if masked {
            "token for that position (the highlighted column is masked)"
        } else {
            "prediction of the next token"
        },
        if maps.is_some() {
            " The mat table reads h<sub>ℓ</sub> through A<sub>ℓ→L</sub>, the id table through the logit lens."
        } else {
            " No maps are fitted yet, so only the logit lens (id) is shown."
        },
        if masked {
            " The maps were fitted at masked positions only, so the mat table is meant to be read in the \
             masked column; elsewhere it is outside what the maps were fitted on."
        } else {
            " Row L is the model's own prediction."
        }
    );
    let sentences = sample_sentences(run, 3)?;
    if sentences.is_empty() {
        bail!("the validation set is empty");
    }
    for ids in sentences {
        let text = tok
            .inner()
            .decode(&ids, true)
            .map_err(|e| anyhow!("cannot decode a validation sentence: {e}"))?;
        let text = text.trim().to_string();
        let mask_word = if masked {
            let enc = tok.encoding(&text)?;
            let words = enc.get_word_ids().iter().flatten().max().map_or(0, |w| w + 1);
            (words > 0).then_some(words as usize / 2)
        } else {
            None
        };
        match peek::peek_with(lm, maps.as_ref(), &tuned, &text, mask_word) {
            Ok(p) => {
                let _ = write!(
                    h,
                    "<p class=\"peek-text\">“{}”{}</p>\n<div class=\"scroll\">{}</div>\n",
                    crate::data::io::escape_markup(&text),
                    p.masked
                        .map(|i| format!(
                            " — token {i} (“{}”) masked",
                            crate::data::io::escape_markup(p.tokens.get(i).map_or("", |s| s.trim()))
                        ))
                        .unwrap_or_default(),
                    peek::render_html_fragment(&p)
                );
            }
            Err(e) => {
                let _ = writeln!(
                    h,
                    "<p class=\"note\">Cannot peek at “{}”: {}</p>",
                    crate::data::io::escape_markup(&text),
                    crate::data::io::escape_markup(&format!("{e:#}"))
                );
            }
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashing_ids_are_renamed_with_their_references() {
        let svg =
            r##"<svg><defs><clipPath id="c"><rect/></clipPath></defs><g clip-path="url(#c)"/><use href="#c"/></svg>"##;
        let ids = svg_ids(svg);
        assert_eq!(ids, vec!["c".to_string()]);
        let p = prefix_ids(svg, &ids, "f2-");
        assert!(p.contains(r#"id="f2-c""#) && p.contains("url(#f2-c)") && p.contains(r##"href="#f2-c""##));
        assert_eq!(
            strip_prolog("<?xml version=\"1.0\"?>\n<!DOCTYPE svg>\n<svg/>"),
            "<svg/>"
        );
    }

    #[test]
    fn png_figures_are_inlined_as_standard_base64() {
        // RFC 4648 test vectors, through the engine the page uses.
        let enc = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        assert_eq!(enc(b""), "");
        assert_eq!(enc(b"f"), "Zg==");
        assert_eq!(enc(b"fo"), "Zm8=");
        assert_eq!(enc(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn layer_rows_keep_the_last_layer() {
        assert_eq!(layer_rows(2), vec![0, 1, 2]);
        assert_eq!(layer_rows(30), vec![0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]);
        assert_eq!(layer_rows(24), vec![0, 3, 6, 9, 12, 15, 18, 21, 24]);
    }
}
