//! The `jumplens` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};

use crate::collect::{self, CollectOptions, Positions};
use crate::data::run::RunDir;
use crate::eval::peek;
use crate::lens::fit::{FitOptions, GramPrecision};
use crate::model::load_model;
use crate::pipeline::early_exit::{self, EarlyExitOptions, Measure, Rule};
use crate::pipeline::predict::{self, PredictOptions};
use crate::pipeline::report::{self, ReportOptions};
use crate::pipeline::submodules::{self, SubmoduleOptions};
use crate::pipeline::{self, Pairs};

#[derive(Parser)]
#[command(name = "jumplens", version, about = "Linear shortcuts through transformer layers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where to compute: cpu, or cuda[:N] (builds with the `cuda` feature).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, sizes, weight storage and tokenizer of a model.
    Inspect {
        /// A Hugging Face folder, a .gguf file, or a hub id in the local cache.
        model: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the model's tokenizer as a Hugging Face tokenizer.json (e.g. the one a
        /// GGUF file carries in its metadata).
        #[arg(long)]
        save_tokenizer: Option<PathBuf>,
    },
    /// Hidden states h_0..h_L and logits of one text, written as safetensors.
    HiddenStates {
        model: String,
        #[arg(long)]
        text: String,
        #[arg(long)]
        out: PathBuf,
        /// Replace the token at this position by [MASK] (masked LMs).
        #[arg(long)]
        mask_position: Option<usize>,
    },
    /// Sample sentences from a corpus and store hidden states at sampled positions.
    Collect {
        model: String,
        /// Plain text (one sentence per line), JSONL, the Wikipedia summaries JSON, or a .cor
        /// news file (one article per line).
        #[arg(long)]
        corpus: PathBuf,
        /// Run folder to create (or resume).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 9000)]
        train: usize,
        #[arg(long, default_value_t = 3000)]
        val: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Positions per sentence: a number k (random, distinct) or "all".
        #[arg(long, default_value = "1")]
        positions: String,
        /// JSONL field with the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Padded tokens per forward batch (0 = 1024 on the CPU, 16384 on a GPU).
        #[arg(long, default_value_t = 0)]
        batch_tokens: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Fit a linear map for every layer pair by least squares (the paper's OLS by default).
    Fit {
        run: PathBuf,
        /// all (every l < l') or to-final (l -> L only).
        #[arg(long, default_value = "all")]
        pairs: String,
        /// Fit an intercept too (written to maps_affine.safetensors; predict's `affine` lens).
        #[arg(long)]
        intercept: bool,
        /// Ridge penalty (0 = ordinary least squares).
        #[arg(long, default_value_t = 0.0)]
        ridge: f64,
        /// Gram precision on the CPU: auto (float32 with float64 recomputation of
        /// ill-conditioned layers; float64 for small problems), f32 or f64. GPUs always use f64.
        #[arg(long, default_value = "auto")]
        precision: String,
        /// float32 Gram blocks whose (equilibrated) condition number exceeds this are recomputed
        /// in float64 (CPU; `inf` never recomputes).
        #[arg(long, default_value_t = crate::lens::fit::F32_GRAM_MAX_COND)]
        f32_max_cond: f64,
        #[command(flatten)]
        common: Common,
    },
    /// r^2 of mat and id for every fitted pair on the validation set, and the heatmaps.
    R2 { run: PathBuf },
    /// Sub-modules replaced by fitted linear maps from every layer on; alternation schedules.
    Submodules {
        run: PathBuf,
        #[arg(long)]
        model: Option<String>,
        /// Validation examples to score on.
        #[arg(long, default_value_t = 300)]
        n_eval: usize,
        /// Training examples to fit the sub-module maps on (default 3000: five per input dimension of
        /// SmolLM2; all would re-run the model over the whole training set).
        #[arg(long)]
        n_train: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Timings for the benchmark scripts (scripts/bench.sh, scripts/device_bench.sh): forward
    /// throughput, collection, or the all-pairs fit on synthetic states.
    Bench {
        /// forward, collect or fit
        what: String,
        /// The model (forward, collect).
        model: Option<String>,
        /// fit: number of states, examples and width of the synthetic problem.
        #[arg(long, default_value_t = 31)]
        states: usize,
        #[arg(long, default_value_t = 9000)]
        n: usize,
        #[arg(long, default_value_t = 576)]
        d: usize,
        /// forward: batch size and sequence length of the random inputs.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 24)]
        seq: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// forward: write the inputs here (safetensors `ids`) for the reference.
        #[arg(long)]
        ids_out: Option<PathBuf>,
        /// collect: the activations file whose examples to re-collect.
        #[arg(long)]
        activations: Option<PathBuf>,
    },
    /// Precision@k, surprisal, KL and cross-entropy of every lens at every layer.
    Predict {
        run: PathBuf,
        /// Maps of another run (cross-corpus evaluation).
        #[arg(long)]
        maps: Option<PathBuf>,
        /// Model to use instead of the one recorded in the run's manifest.
        #[arg(long)]
        model: Option<String>,
        /// Examples per readout batch (0 = 128 on the CPU, 1024 on a GPU).
        #[arg(long, default_value_t = 0)]
        batch: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Early-exit threshold sweep, fixed exits and layers saved at target Precision@1.
    EarlyExit {
        run: PathBuf,
        /// Threshold rule: paper or calm.
        #[arg(long, default_value = "paper")]
        rule: String,
        /// Confidence measure: top1-top2, max-prob or cosine.
        #[arg(long, default_value = "top1-top2")]
        measure: String,
    },
    /// The whole study (collect, fit, r², predict, early exit, sub-modules) and RUN/report.html.
    ///
    /// Stages already done with the same options are skipped; an interrupted run resumes.
    Report {
        /// Model [default: assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, under $JUMPLENS_ASSETS
        /// if set].
        model: Option<String>,
        /// Corpus [default: assets/wiki/summaries_en-us.json].
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Run folder [default: runs/<model-stem>-<corpus-stem>, plus -quick].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Small sizes (1200/300 sentences, sub-modules on 40 examples): about 4 minutes for SmolLM2-135M
        /// on 2 CPU cores.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Only rewrite RUN/report.html from an existing run folder.
        #[arg(long, value_name = "RUN", conflicts_with_all = ["model", "corpus", "out", "quick"])]
        html_only: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// What every layer predicts for one text, under mat and id.
    Peek {
        model: String,
        /// Fitted maps (RUN/maps.safetensors); without them only the logit lens is shown.
        #[arg(long)]
        maps: Option<PathBuf>,
        #[arg(long)]
        text: String,
        /// Write a self-contained HTML grid here too.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Masked LMs: mask this word (0-based) and show the top-5 there per layer.
        #[arg(long)]
        mask: Option<usize>,
    },
}

#[derive(clap::Args)]
struct Common {
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").lines().next().unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = crate::device::parse(&cli.device)?;
    match cli.command {
        Command::Inspect {
            model,
            json,
            save_tokenizer,
        } => {
            let lm = load_model(&model, &device)?;
            if let Some(path) = save_tokenizer {
                let text = lm
                    .tokenizer()?
                    .inner()
                    .to_string(false)
                    .map_err(|e| anyhow::anyhow!("{}: cannot serialise the tokenizer: {e}", path.display()))?;
                crate::data::io::write_atomic(&path, text.as_bytes())?;
            }
            let s = lm.summary();
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let i = &s.info;
                println!("path          {}", s.path);
                println!("format        {}", s.format);
                println!("architecture  {}", i.arch);
                println!("layers        {}", i.n_layers);
                println!("hidden size   {}", i.d_model);
                println!("heads         {} (key/value heads {})", i.n_heads, i.n_kv_heads);
                println!("vocabulary    {}", i.vocab_size);
                println!("attention     {:?}", i.attention);
                println!("LM head       {}", if i.has_lm_head { "yes" } else { "no" });
                println!("context       {}", i.max_positions);
                println!("parameters    {}", i.n_params);
                println!("storage       {}", s.storage);
                println!("tokenizer     {}", s.tokenizer);
            }
        }
        Command::HiddenStates {
            model,
            text,
            out,
            mask_position,
        } => {
            let lm = load_model(&model, &device)?;
            let st = lm.text_states(&text, mask_position)?;
            let ids: Vec<i64> = st.input_ids.iter().map(|&x| x as i64).collect();
            let n = ids.len();
            let mut tensors = vec![
                ("input_ids".to_string(), Tensor::from_vec(ids, n, &Device::Cpu)?),
                ("hidden_states".to_string(), st.hidden_states.to_dtype(DType::F32)?),
            ];
            if let Some(l) = st.logits {
                tensors.push(("logits".to_string(), l));
            }
            crate::data::io::write_safetensors(&out, &tensors, None)?;
            eprintln!(
                "wrote {} ({} tokens, {} layers)",
                out.display(),
                n,
                lm.model.info().n_layers
            );
        }
        Command::Collect {
            model,
            corpus,
            out,
            train,
            val,
            seed,
            positions,
            text_field,
            batch_tokens,
            common,
        } => {
            let positions = match positions.as_str() {
                "all" => Positions::All,
                k => Positions::Random {
                    k: k.parse()
                        .map_err(|_| anyhow::anyhow!("--positions takes a number or 'all', not '{k}'"))?,
                },
            };
            let opts = CollectOptions {
                n_train: train,
                n_val: val,
                seed,
                positions,
                text_field,
                batch_tokens,
            };
            let lm = load_model(&model, &device)?;
            let m = collect::collect(&lm, &corpus, &RunDir::new(&out), &opts, !common.quiet)?;
            for (split, c) in &m.counts {
                eprintln!("{split}: {c}");
            }
        }
        Command::Fit {
            run,
            pairs,
            intercept,
            ridge,
            precision,
            f32_max_cond,
            common,
        } => {
            let precision = match precision.as_str() {
                "auto" => GramPrecision::Auto,
                "f32" => GramPrecision::F32,
                "f64" => GramPrecision::F64,
                other => anyhow::bail!("--precision takes auto, f32 or f64, not '{other}'"),
            };
            let pairs = match pairs.as_str() {
                "all" => Pairs::All,
                "to-final" => Pairs::ToFinal,
                other => anyhow::bail!("--pairs takes all or to-final, not '{other}'"),
            };
            let opts = FitOptions {
                intercept,
                ridge,
                precision,
                f32_max_cond,
                progress: !common.quiet,
                ..Default::default()
            };
            let s = pipeline::run_fit(&RunDir::new(&run), pairs, &opts, &device)?;
            eprintln!(
                "fitted {} pairs in {:.1} s ({:.0} GFLOP/s) -> {}",
                s.pairs, s.seconds, s.gflops, s.path
            );
        }
        Command::R2 { run } => {
            let r = pipeline::run_r2(&RunDir::new(&run), &device)?;
            let last = r.layers;
            println!("layer  r2(mat, l->L)  r2(id, l->L)");
            for l in 0..last {
                let f = |v: Option<f64>| v.map_or("—".into(), |x| format!("{x:.3}"));
                println!("{l:>5}  {:>13}  {:>12}", f(r.mat[l][last]), f(r.id[l][last]));
            }
        }
        Command::Submodules {
            run,
            model,
            n_eval,
            n_train,
            common,
        } => {
            let run = RunDir::new(&run);
            let lm = run_model(&run, model, &device)?;
            let opts = SubmoduleOptions {
                n_eval,
                n_train: n_train.unwrap_or(3000),
                progress: !common.quiet,
                ..Default::default()
            };
            let (s, _) = submodules::run_submodules(&lm, &run, &opts)?;
            println!(
                "layer  {}",
                s.variants
                    .keys()
                    .map(|k| format!("{k:>7}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            for l in 0..=s.layers {
                let row: Vec<String> = s.variants.values().map(|m| format!("{:>7.3}", m.p_at_1[l])).collect();
                println!("{l:>5}  {}", row.join(" "));
            }
        }
        Command::Bench {
            what,
            model,
            batch,
            seq,
            iters,
            ids_out,
            activations,
            states,
            n,
            d,
        } => {
            if what == "fit" {
                let t = crate::bench::fit_synthetic(&device, states, n, d)?;
                println!("{}", serde_json::to_string(&t)?);
                return Ok(());
            }
            let model = model.ok_or_else(|| anyhow::anyhow!("bench {what} needs a model"))?;
            let lm = load_model(&model, &device)?;
            let t = match what.as_str() {
                "forward" => {
                    let ids = crate::bench::random_ids(lm.model.info().vocab_size, batch, seq, 0);
                    if let Some(p) = ids_out {
                        crate::bench::write_ids(&p, &ids)?;
                    }
                    crate::bench::forward(&lm, &ids, iters)?
                }
                "collect" => {
                    let path = activations.ok_or_else(|| anyhow::anyhow!("bench collect needs --activations"))?;
                    let act = crate::data::Activations::read(&path)?;
                    crate::bench::collect_split(&lm, &act, 1024)?.0
                }
                other => anyhow::bail!("bench takes forward, collect or fit, not '{other}'"),
            };
            println!("{}", serde_json::to_string(&t)?);
        }
        Command::Predict {
            run,
            maps,
            model,
            batch,
            common,
        } => {
            let run = RunDir::new(&run);
            let lm = run_model(&run, model, &device)?;
            let opts = PredictOptions {
                maps,
                batch,
                progress: !common.quiet,
            };
            let r = predict::run_predict(&lm, &run, &opts)?;
            println!(
                "layer  {}",
                r.lenses
                    .keys()
                    .map(|k| format!("{k:>8} p@1"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            for l in 0..=r.layers {
                let row: Vec<String> = r.lenses.values().map(|m| format!("{:>12.3}", m.p_at_1[l])).collect();
                println!("{l:>5}  {}", row.join(" "));
            }
        }
        Command::EarlyExit { run, rule, measure } => {
            let rule = match rule.as_str() {
                "paper" => Rule::Paper,
                "calm" => Rule::Calm,
                other => anyhow::bail!("--rule takes paper or calm, not '{other}'"),
            };
            let measure = match measure.as_str() {
                "top1-top2" => Measure::Top1Top2,
                "max-prob" => Measure::MaxProb,
                "cosine" => Measure::Cosine,
                other => anyhow::bail!("--measure takes top1-top2, max-prob or cosine, not '{other}'"),
            };
            let opts = EarlyExitOptions {
                rule,
                measure,
                ..Default::default()
            };
            let r = early_exit::run_early_exit(&RunDir::new(&run), &opts)?;
            println!("target  {:>10} {:>10} {:>10}", "mat saved", "id saved", "difference");
            let f = |v: Option<&Option<f64>>| {
                v.copied()
                    .flatten()
                    .map_or("—".to_string(), |x| format!("{:.1}%", 100.0 * x))
            };
            for (t, row) in &r.saved_at {
                println!(
                    "{t:>6}  {:>10} {:>10} {:>10}",
                    f(row.get("mat")),
                    f(row.get("id")),
                    f(row.get("difference"))
                );
            }
        }
        Command::Report {
            model,
            corpus,
            out,
            quick,
            seed,
            html_only,
            common,
        } => {
            if let Some(run) = html_only {
                let run = RunDir::new(run);
                let m = run.read_manifest()?;
                // The model is only needed for the peek grids: without it the page has none.
                let lm = match load_model(&m.model.path, &device) {
                    Ok(lm) => Some(lm),
                    Err(e) => {
                        eprintln!("warning: no peek grids ({e:#})");
                        None
                    }
                };
                let path = report::write_report_html(&run, lm.as_ref())?;
                eprintln!("wrote {}", path.display());
                return Ok(());
            }
            let (model, corpus) = report::resolve_assets(model, corpus)?;
            let out = out.unwrap_or_else(|| report::default_out(&model, &corpus, quick));
            let mut opts = ReportOptions::new(model, corpus, out, quick);
            opts.seed = seed;
            opts.progress = !common.quiet;
            opts.device = device.clone();
            let started = std::time::Instant::now();
            let path = report::run_report(&opts)?;
            let m = RunDir::new(&opts.out).read_manifest()?;
            for (stage, t) in report::stage_wall_times(&m) {
                eprintln!("{stage:>12}  {}", t.map_or("—".into(), |s| format!("{s:.1} s")));
            }
            eprintln!("{:>12}  {:.1} s", "this call", started.elapsed().as_secs_f64());
            println!("{}", path.display());
        }
        Command::Peek {
            model,
            maps,
            text,
            html,
            mask,
        } => {
            let lm = load_model(&model, &device)?;
            let maps = maps.map(|p| crate::lens::maps::Maps::read(&p)).transpose()?;
            if let Some(m) = &maps {
                m.check_model_info(lm.model.info())?;
            }
            let p = peek::peek(&lm, maps.as_ref(), &text, mask)?;
            print!("{}", peek::render_terminal(&p));
            if let Some(path) = html {
                crate::data::io::write_atomic(&path, peek::render_html_page(&p).as_bytes())?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

/// The model given on the command line, else the one recorded in the run's manifest.
fn run_model(run: &RunDir, model: Option<String>, device: &Device) -> Result<crate::model::LoadedModel> {
    let model = match model {
        Some(m) => m,
        None => run.read_manifest()?.model.path,
    };
    load_model(&model, device)
}
