//! The `jumplens` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};

use jumplens::collect::{self, CollectOptions, Positions};
use jumplens::model::load_model;
use jumplens::run::RunDir;

#[derive(Parser)]
#[command(name = "jumplens", version, about = "Linear shortcuts through transformer layers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// Padded tokens per forward batch.
        #[arg(long, default_value_t = 1024)]
        batch_tokens: usize,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(clap::Args)]
struct Common {
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
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
    let device = Device::Cpu;
    match cli.command {
        Command::Inspect { model, json } => {
            let lm = load_model(&model, &device)?;
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
            jumplens::io::write_safetensors(&out, &tensors, None)?;
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
    }
    Ok(())
}
