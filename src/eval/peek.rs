//! A look at one text: for every position and layer, the token each lens reads out of that
//! layer's state (like tuned-lens's prediction trajectories) through `mat`, `id` and any tuned
//! lenses given (`tuned`, `mat+kl`), as a terminal table or a
//! self-contained HTML grid.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{anyhow, bail, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

use crate::eval::predict::Lens;
use crate::lens::maps::Maps;
use crate::lens::tuned::TunedLens;
use crate::model::LoadedModel;

/// One cell: the lens's top-5 tokens and probabilities.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub top: Vec<(String, f32)>,
}

/// A peek at one text.
#[derive(Debug, Clone, Serialize)]
pub struct Peek {
    pub text: String,
    /// Input tokens as text.
    pub tokens: Vec<String>,
    /// The masked position (masked LMs).
    pub masked: Option<usize>,
    /// lens -> [layer][position] cells.
    pub lenses: BTreeMap<String, Vec<Vec<Cell>>>,
}

/// Reads every layer of `text` through `mat` (when maps are given) and `id`.
/// `mask_word` masks the first token of that word (0-based, masked LMs).
pub fn peek(lm: &LoadedModel, maps: Option<&Maps>, text: &str, mask_word: Option<usize>) -> Result<Peek> {
    peek_with(lm, maps, &[], text, mask_word)
}

/// [`peek`] with tuned lenses too, each under its name (`tuned`, `mat+kl`); each must fit the
/// model ([`TunedLens::check_model`]).
pub fn peek_with(
    lm: &LoadedModel,
    maps: Option<&Maps>,
    tuned: &[(String, TunedLens)],
    text: &str,
    mask_word: Option<usize>,
) -> Result<Peek> {
    let info = lm.model.info();
    for (_, t) in tuned {
        t.check_model(info.n_layers, info.d_model)?;
    }
    let tok = lm.tokenizer()?;
    let enc = tok.encoding(text)?;
    if enc.get_ids().is_empty() {
        bail!("the text tokenizes to no tokens");
    }
    let mask_position = match mask_word {
        None => None,
        Some(w) => {
            let p = enc.get_word_ids().iter().position(|x| *x == Some(w as u32));
            let n_words = enc.get_word_ids().iter().flatten().max().map_or(0, |m| m + 1);
            Some(p.ok_or_else(|| anyhow!("mask word index {w} is outside the sentence's {n_words} words"))?)
        }
    };
    let st = lm.text_states(text, mask_position)?;
    let device = lm.model.head_device();
    let maps = maps.map(|m| m.to_device(device)).transpose()?;
    let mut lenses: Vec<(String, Lens)> = Vec::new();
    if let Some(m) = &maps {
        lenses.push(("mat".into(), Lens::Maps(m)));
    }
    lenses.push(("id".into(), Lens::Identity));
    let tuned = tuned
        .iter()
        .map(|(name, t)| Ok((name.clone(), t.to_device(device)?)))
        .collect::<Result<Vec<_>>>()?;
    for (name, t) in &tuned {
        lenses.push((name.clone(), Lens::Tuned(t)));
    }
    let (s, _t, _) = st.hidden_states.dims3()?;
    let mut out = BTreeMap::new();
    for (name, lens) in &lenses {
        let mut layers = Vec::with_capacity(s);
        for l in 0..s {
            let h = crate::host::view_to_device(&st.hidden_states.get(l)?, device)?;
            let probs = candle_nn::ops::softmax(&lm.model.readout(&lens.cast(l, s - 1, &h)?)?, D::Minus1)?;
            layers.push(top5(&probs, |id| visible(&tok.decode_one(id)))?);
        }
        out.insert(name.clone(), layers);
    }
    let tokens = st.input_ids.iter().map(|&id| visible(&tok.decode_one(id))).collect();
    Ok(Peek {
        text: text.into(),
        tokens,
        masked: mask_position,
        lenses: out,
    })
}

/// Whitespace tokens drawn as visible marks (a newline as ↵, spaces as ␣), others unchanged.
fn visible(t: &str) -> String {
    if t.trim().is_empty() {
        t.replace('\n', "↵").replace(' ', "␣").replace('\t', "⇥")
    } else {
        t.replace('\n', "↵")
    }
}

fn top5(probs: &Tensor, name: impl Fn(u32) -> String) -> Result<Vec<Cell>> {
    let rows: Vec<Vec<f32>> = probs.to_device(&candle_core::Device::Cpu)?.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.select_nth_unstable_by(4.min(row.len() - 1), |&a, &b| row[b].total_cmp(&row[a]));
            let mut best: Vec<usize> = idx[..5.min(row.len())].to_vec();
            best.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            Cell {
                top: best.into_iter().map(|i| (name(i as u32), row[i])).collect(),
            }
        })
        .collect())
}

fn short(s: &str, width: usize) -> String {
    let clean: String = s.chars().map(|c| if c.is_control() { '·' } else { c }).collect();
    let n = clean.chars().count();
    if n <= width {
        format!("{clean:<width$}")
    } else {
        clean.chars().take(width - 1).chain(std::iter::once('…')).collect()
    }
}

/// A compact terminal table per lens: rows = layers (last first), columns = positions, cells =
/// top-1 token and its probability. For a masked position, the top-5 per layer instead.
pub fn render_terminal(p: &Peek) -> String {
    let mut s = String::new();
    for (name, layers) in &p.lenses {
        let _ = writeln!(s, "== {name} ==");
        if let Some(m) = p.masked {
            let _ = writeln!(s, "top-5 at masked position {m}:");
            for (l, row) in layers.iter().enumerate().rev() {
                let cells: Vec<String> = row[m]
                    .top
                    .iter()
                    .map(|(t, pr)| format!("{} {:.2}", t.trim(), pr))
                    .collect();
                let _ = writeln!(s, "{l:>3}  {}", cells.join(" | "));
            }
            continue;
        }
        let header: Vec<String> = p.tokens.iter().map(|t| short(t.trim(), 10)).collect();
        let _ = writeln!(s, "     {}", header.join(" "));
        for (l, row) in layers.iter().enumerate().rev() {
            let cells: Vec<String> = row
                .iter()
                .map(|c| short(&format!("{}{:.0}", c.top[0].0.trim(), 100.0 * c.top[0].1), 10))
                .collect();
            let _ = writeln!(s, "{l:>3}  {}", cells.join(" "));
        }
    }
    s
}

/// One HTML fragment (a table per lens) with cells coloured by probability and the top-5 on
/// hover; self-contained, to embed in the report or wrap in a page.
pub fn render_html_fragment(p: &Peek) -> String {
    let mut s = String::new();
    for (name, layers) in &p.lenses {
        let _ = write!(
            s,
            "<table class=\"peek\"><caption>{} lens</caption><tr><th>layer</th>",
            crate::data::io::escape_markup(name)
        );
        for (i, t) in p.tokens.iter().enumerate() {
            let mark = if Some(i) == p.masked { " class=\"masked\"" } else { "" };
            let _ = write!(s, "<th{mark}>{}</th>", crate::data::io::escape_markup(t));
        }
        s.push_str("</tr>");
        for (l, row) in layers.iter().enumerate().rev() {
            let _ = write!(s, "<tr><th>{l}</th>");
            for c in row {
                let (top, pr) = &c.top[0];
                let hover: Vec<String> = c.top.iter().map(|(t, q)| format!("{} {:.3}", t, q)).collect();
                // Lightness falls with probability: confident cells are dark blue.
                let light = 97.0 - 55.0 * pr;
                let fg = if *pr > 0.6 { "#fff" } else { "#111" };
                let _ = write!(
                    s,
                    "<td style=\"background:hsl(215,70%,{light:.0}%);color:{fg}\" title=\"{}\">{}</td>",
                    crate::data::io::escape_markup(&hover.join("\n")),
                    crate::data::io::escape_markup(top)
                );
            }
            s.push_str("</tr>");
        }
        s.push_str("</table>");
    }
    s
}

/// CSS for the peek tables.
pub const PEEK_CSS: &str = "table.peek{border-collapse:collapse;font:12px monospace;margin:1em 0}\
table.peek td,table.peek th{border:1px solid #ddd;padding:2px 4px;white-space:pre;max-width:8em;overflow:hidden}\
table.peek caption{font-weight:bold;text-align:left}th.masked{background:#fd8}";

/// A whole self-contained HTML page for `jumplens peek --html`.
pub fn render_html_page(p: &Peek) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>jumplens peek</title><style>body{{font-family:sans-serif}}{PEEK_CSS}</style></head><body><h1>jumplens peek</h1><p>{}</p>{}</body></html>\n",
        crate::data::io::escape_markup(&p.text),
        render_html_fragment(p)
    )
}
