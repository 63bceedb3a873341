//! The stages of a run folder as one type: each [`Stage`] knows its name in the manifest, the
//! stages whose outputs it reads, the files it writes, the options its manifest record must
//! carry to count as done, and its runner. [`crate::pipeline::report`] drives them in order.

use anyhow::Result;
use serde_json::{json, Value};

use crate::collect;
use crate::data::run::RunDir;
use crate::lens::fit::FitOptions;
use crate::model::LoadedModel;
use crate::pipeline::early_exit::{self, EarlyExitOptions};
use crate::pipeline::fit::{run_fit, Pairs};
use crate::pipeline::predict::{self, PredictOptions};
use crate::pipeline::report::ReportOptions;
use crate::pipeline::submodules::{self, SubmoduleOptions};

/// One stage of the pipeline on a run folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Hidden states of the corpus's sentences (`jumplens collect`).
    Collect,
    /// The least-squares maps (`jumplens fit`).
    Fit,
    /// The maps with an intercept (`jumplens fit --intercept`; not part of the report).
    FitAffine,
    /// r^2 of every map and of the identity (`jumplens r2`).
    R2,
    /// The lenses' predictions against the model's (`jumplens predict`).
    Predict,
    /// Early exit from the predict traces (`jumplens early-exit`).
    EarlyExit,
    /// Sub-modules replaced by maps, and alternation (`jumplens submodules`).
    Submodules,
    /// The self-contained page (`RUN/report.html`).
    Html,
    /// `jumplens tuned-lens RUN` with its defaults (RUN/tuned/); the report runs it only when
    /// asked (`report --tuned-lens`), after fit, and predict then scores `tuned`.
    TunedLens,
}

impl Stage {
    /// The stages `jumplens report` runs, in order, before writing the page.
    pub const REPORT: [Stage; 6] = [
        Stage::Collect,
        Stage::Fit,
        Stage::R2,
        Stage::Predict,
        Stage::EarlyExit,
        Stage::Submodules,
    ];

    /// Its name in the manifest (`stages.<name>`).
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Collect => "collect",
            Stage::Fit => "fit",
            Stage::FitAffine => "fit_affine",
            Stage::R2 => "r2",
            Stage::Predict => "predict",
            Stage::EarlyExit => "early_exit",
            Stage::Submodules => "submodules",
            Stage::Html => "report",
            // The manifest key `run_tuned` records under.
            Stage::TunedLens => "tuned-lens.tuned",
        }
    }

    /// The stages whose outputs it reads (when one of them runs, this one must run again).
    pub fn inputs(self) -> &'static [Stage] {
        match self {
            Stage::Collect => &[],
            Stage::Fit | Stage::FitAffine | Stage::TunedLens => &[Stage::Collect],
            Stage::R2 | Stage::Predict => &[Stage::Fit],
            Stage::EarlyExit => &[Stage::Predict],
            Stage::Submodules => &[Stage::Fit, Stage::R2],
            Stage::Html => &[
                Stage::Collect,
                Stage::Fit,
                Stage::R2,
                Stage::Predict,
                Stage::EarlyExit,
                Stage::Submodules,
            ],
        }
    }

    /// The files it writes, relative to the run folder.
    pub fn outputs(self) -> &'static [&'static str] {
        match self {
            Stage::Collect => &["activations/train.safetensors", "activations/val.safetensors"],
            Stage::Fit => &["maps.safetensors"],
            Stage::FitAffine => &["maps_affine.safetensors"],
            Stage::R2 => &["r2.json", "r2.svg"],
            Stage::Predict => &["predict.json", "predict_traces.safetensors", "predict.svg"],
            Stage::EarlyExit => &["early_exit.json", "early_exit.svg"],
            Stage::Submodules => &[
                "submodules.json",
                "submodules.svg",
                "alternation.json",
                "alternation.svg",
            ],
            Stage::Html => &["report.html"],
            Stage::TunedLens => &["tuned/params.pt", "tuned/config.json", "tuned/lens.safetensors"],
        }
    }

    /// The options its manifest record must carry to count as done with `opts` (collect is
    /// checked against the whole collection options instead).
    /// Stages whose outputs this stage reads when they exist (predict scores RUN/tuned/): when
    /// one of them runs, this stage runs again.
    pub fn optional_inputs(self) -> &'static [Stage] {
        match self {
            Stage::Predict => &[Stage::TunedLens],
            _ => &[],
        }
    }

    pub fn expected_record(self, opts: &ReportOptions) -> Value {
        match self {
            // `pairs` is Auto: all pairs, or to-final above the size limit (fit.rs).
            Stage::Fit => json!({"intercept": false, "ridge": 0.0}),
            Stage::FitAffine => json!({"intercept": true, "ridge": 0.0}),
            Stage::R2 | Stage::Predict => json!({"n_val": opts.n_val}),
            Stage::EarlyExit => json!({"rule": "paper", "measure": "top1-top2"}),
            Stage::Submodules => {
                json!({"n_eval": opts.submodule_eval, "n_train": limit_value(opts.submodule_train)})
            }
            // A lens already in RUN/tuned/ is kept (whatever options trained it).
            Stage::Collect | Stage::Html | Stage::TunedLens => json!({}),
        }
    }

    /// Runs the stage on `run` with the report's options.
    pub fn run(self, run: &RunDir, opts: &ReportOptions, lm: &LoadedModel) -> Result<()> {
        match self {
            Stage::Collect => {
                let stream = report_stream(lm);
                if stream.stats.is_some() && opts.progress {
                    eprintln!(
                        "      all-pairs maps of this model are too large to fit (fit will fit --pairs \
                         to-final): collecting the training split as the to-final statistics on the GPU \
                         (collect --stats-only --pairs to-final) instead of storing its states"
                    );
                }
                collect::collect_stream(lm, &opts.corpus, run, &opts.collect_options(), &stream, opts.progress)?;
            }
            Stage::Fit | Stage::FitAffine => {
                let fit = FitOptions {
                    intercept: self == Stage::FitAffine,
                    progress: opts.progress,
                    ..FitOptions::default()
                };
                let s = run_fit(run, Pairs::Auto, &fit, &opts.device)?;
                if opts.progress {
                    eprintln!("      {} pairs, {:.0} GFLOP/s", s.pairs, s.gflops);
                }
            }
            Stage::R2 => {
                crate::pipeline::r2::run_r2(run, &opts.device)?;
            }
            Stage::Predict => {
                let p = PredictOptions {
                    progress: opts.progress,
                    ..Default::default()
                };
                predict::run_predict(lm, run, &p)?;
            }
            Stage::EarlyExit => {
                early_exit::run_early_exit(run, &EarlyExitOptions::default())?;
            }
            Stage::Submodules => {
                let s = SubmoduleOptions {
                    n_eval: opts.submodule_eval,
                    n_train: opts.submodule_train,
                    batch_tokens: opts.batch_tokens,
                    progress: opts.progress,
                };
                submodules::run_submodules(lm, run, &s)?;
            }
            Stage::Html => {
                crate::render::html::write_report_html(run, Some(lm), &crate::pipeline::report::STAGES)?;
            }
            Stage::TunedLens => {
                let t = crate::pipeline::tuned::TunedOptions {
                    progress: opts.progress,
                    ..Default::default()
                };
                crate::pipeline::tuned::run_tuned(lm, run, &t)?;
            }
        }
        Ok(())
    }
}

/// How the report collects for `lm`: on a GPU, a model whose fit `Pairs::Auto` resolves to the
/// to-final pairs (the all-pairs maps above their size limit, e.g. d = 4096) gets its training
/// split summed into those pairs' statistics on the device, which is what fit reads, instead of
/// stored states written and read back (4.9 GB for the 8B shape at 9,000 sentences); sub-modules
/// replay the training examples they need. Elsewhere the states are stored (on the CPU the
/// float64 sums of d = 4096 would take more memory than the states).
pub(crate) fn report_stream(lm: &LoadedModel) -> collect::StreamOptions {
    let info = lm.model.info();
    let to_final = Pairs::Auto.resolve(info.n_layers + 1, info.d_model).0 == Pairs::ToFinal;
    if to_final && lm.model.device().is_cuda() && lm.model.placement().is_none() {
        collect::StreamOptions {
            stats: Some(crate::data::stats::StatsPairs::ToFinal),
            ..Default::default()
        }
    } else {
        collect::StreamOptions::default()
    }
}

/// `usize::MAX` ("all") as JSON null, anything else as the number.
pub(crate) fn limit_value(n: usize) -> Value {
    if n == usize::MAX {
        Value::Null
    } else {
        json!(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage a stage reads comes before it in the report's order, and the names are the
    /// manifest keys the earlier string-keyed code used.
    #[test]
    fn report_stages_are_in_dependency_order() {
        for (i, s) in Stage::REPORT.iter().enumerate() {
            for dep in s.inputs() {
                let j = Stage::REPORT
                    .iter()
                    .position(|x| x == dep)
                    .expect("a dependency in the report");
                assert!(j < i, "{s:?} reads {dep:?}, which comes later");
            }
        }
        let names: Vec<&str> = Stage::REPORT.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["collect", "fit", "r2", "predict", "early_exit", "submodules"]);
    }

    /// The run folder's list of stage outputs (a folder holding any is a run) is every
    /// stage's outputs but collect's.
    #[test]
    fn run_folder_knows_every_stage_output() {
        let all = [
            Stage::Fit,
            Stage::FitAffine,
            Stage::R2,
            Stage::Predict,
            Stage::EarlyExit,
            Stage::Submodules,
            Stage::Html,
        ];
        let mut outputs: Vec<&str> = all.iter().flat_map(|s| s.outputs().iter().copied()).collect();
        let mut listed = crate::data::run::STAGE_OUTPUTS.to_vec();
        outputs.sort_unstable();
        listed.sort_unstable();
        assert_eq!(outputs, listed);
    }
}
