//! The figures of the stages, built from their reports and drawn by [`crate::render::plot`]:
//! `predict`, `early_exit`, `submodules` and `alternation` (the r^2 heatmaps are
//! [`crate::render::plot::r2_heatmaps`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::eval::early_exit::EarlyExitReport;
use crate::eval::predict::LensMetrics;
use crate::eval::submodules::{AlternationReport, ScheduleResult, SubmoduleReport};
use crate::render::plot::{Panel, Series};

/// Draws `predict.svg`/`.png`: Precision@1/5/10 and surprisal (95% CI band) against the source
/// layer, one line per lens (the paper's Figure 4 layout).
pub fn plot_predict(stem: &Path, title: &str, lenses: &BTreeMap<String, LensMetrics>) -> Result<()> {
    let by_layer = |v: &[f64]| v.iter().enumerate().map(|(l, &y)| (l as f64, y)).collect::<Vec<_>>();
    let series = |f: &dyn Fn(&LensMetrics) -> &[f64], band: bool| -> Vec<Series> {
        lenses
            .iter()
            .map(|(name, m)| Series {
                name: name.clone(),
                points: by_layer(f(m)),
                band: band.then(|| m.surprisal_ci95.iter().map(|c| (c[0], c[1])).collect()),
                dashed: name == "id",
                ..Default::default()
            })
            .collect()
    };
    let panel = |title: &str, y: &str, s: Vec<Series>, range: Option<(f64, f64)>| Panel {
        title: title.into(),
        x_label: "source layer ℓ".into(),
        y_label: y.into(),
        series: s,
        y_range: range,
    };
    let panels = vec![
        panel(
            "Precision@1",
            "Precision@1",
            series(&|m| &m.p_at_1, false),
            Some((0.0, 1.0)),
        ),
        panel(
            "Precision@5",
            "Precision@5",
            series(&|m| &m.p_at_5, false),
            Some((0.0, 1.0)),
        ),
        panel(
            "Precision@10",
            "Precision@10",
            series(&|m| &m.p_at_10, false),
            Some((0.0, 1.0)),
        ),
        panel(
            "Surprisal",
            "-ln p_model(top-1) (nats)",
            series(&|m| &m.surprisal, true),
            None,
        ),
    ];
    crate::render::plot::line_panels(stem, title, &panels)
}

/// Draws `early_exit.svg`/`.png`: Precision@1 against mean blocks run, dynamic (the sweep) and
/// fixed exit, for mat and id.
pub fn plot_early_exit(stem: &Path, title: &str, r: &EarlyExitReport) -> Result<()> {
    let mut series = Vec::new();
    for (name, curve) in &r.curves {
        let mut pts: Vec<(f64, f64)> = curve.iter().map(|p| (p.mean_layers, p.p_at_1)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push(Series {
            name: format!("{name} dynamic"),
            points: pts,
            markers: true,
            colour_key: Some(name.clone()),
            ..Default::default()
        });
    }
    for (name, fixed) in &r.fixed {
        let pts = fixed.iter().enumerate().skip(1).map(|(l, &p)| (l as f64, p)).collect();
        series.push(Series {
            name: format!("{name} fixed"),
            points: pts,
            dashed: true,
            colour_key: Some(name.clone()),
            ..Default::default()
        });
    }
    let panel = Panel {
        title: "Precision@1 vs layers run".into(),
        x_label: "mean blocks run".into(),
        y_label: "Precision@1".into(),
        series,
        y_range: Some((0.0, 1.0)),
    };
    crate::render::plot::line_panels(stem, title, &[panel])
}

/// Draws `submodules.svg`/`.png`: Precision@1/10 and surprisal against the layer replacement
/// starts at, one line per variant (and mat, id).
pub fn plot_submodules(stem: &Path, arch: &str, r: &SubmoduleReport) -> Result<()> {
    let series = |f: &dyn Fn(&LensMetrics) -> &Vec<f64>| -> Vec<Series> {
        r.variants
            .iter()
            .map(|(name, m)| Series {
                name: name.clone(),
                points: f(m).iter().enumerate().map(|(l, &y)| (l as f64, y)).collect(),
                dashed: name == "id" || name == "mat",
                ..Default::default()
            })
            .collect()
    };
    let panels = vec![
        Panel {
            title: "Precision@1".into(),
            x_label: "layer ℓ (replaced from here on)".into(),
            y_label: "Precision@1".into(),
            series: series(&|m| &m.p_at_1),
            y_range: Some((0.0, 1.0)),
        },
        Panel {
            title: "Precision@10".into(),
            x_label: "layer ℓ".into(),
            y_label: "Precision@10".into(),
            series: series(&|m| &m.p_at_10),
            y_range: Some((0.0, 1.0)),
        },
        Panel {
            title: "Surprisal".into(),
            x_label: "layer ℓ".into(),
            y_label: "nats".into(),
            series: series(&|m| &m.surprisal),
            y_range: None,
        },
    ];
    crate::render::plot::line_panels(
        stem,
        &format!(
            "{arch} — sub-modules replaced by linear maps from layer ℓ on ({} examples)",
            r.n_eval
        ),
        &panels,
    )
}

/// Draws `alternation.svg`/`.png`: Precision@1 against executed blocks for the single jump, the
/// r^2-informed and the periodic schedules.
pub fn plot_alternation(stem: &Path, arch: &str, r: &AlternationReport) -> Result<()> {
    let pts = |v: &[ScheduleResult]| {
        let mut p: Vec<(f64, f64)> = v.iter().map(|s| (s.executed_blocks as f64, s.p_at_1)).collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let panel = Panel {
        title: "Precision@1 at equal executed blocks".into(),
        x_label: "executed blocks".into(),
        y_label: "Precision@1".into(),
        series: vec![
            Series {
                name: "single jump to L".into(),
                points: pts(&r.single_jump),
                dashed: true,
                ..Default::default()
            },
            Series {
                name: "r²-informed".into(),
                points: pts(&r.r2_informed),
                markers: true,
                ..Default::default()
            },
            Series {
                name: "run a, jump b".into(),
                points: pts(&r.periodic),
                markers: true,
                ..Default::default()
            },
        ],
        y_range: Some((0.0, 1.0)),
    };
    crate::render::plot::line_panels(stem, &format!("{arch} — alternating blocks and linear jumps"), &[panel])
}
