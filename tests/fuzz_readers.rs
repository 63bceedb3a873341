//! Mutation fuzzing of every reader of untrusted files, on the stable toolchain: GGUF (candle's
//! parser, jumplens's metadata translation and tokenizer building), a model folder's
//! safetensors / config.json / tokenizer.json, corpora, and the run folder's activations, maps
//! and manifest. Seeds are the tiny fixtures and assets; mutations are truncation, bit flips,
//! random bytes, and 4/8-byte fields set to huge values (the header and tensor-count lengths of
//! the formats). Each input runs under `catch_unwind`: a panic is a failure, and so are an input
//! that takes longer than [`SLOW`] and a single allocation larger than [`MAX_ALLOC`] (counted by
//! this binary's allocator: a reader must bound what it allocates by what the file holds).
//!
//! `replay_and_short_fuzz` (CI, seconds) replays `tests/fixtures/fuzz/<target>/*` and a few
//! hundred fixed-seed mutations per target; `fuzz_for_a_while` (ignored; `scripts/fuzz.sh`)
//! mutates for `JUMPLENS_FUZZ_SECS` seconds per target and saves each failing input under
//! `JUMPLENS_FUZZ_OUT` (default `target/fuzz-findings`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The largest single allocation a reader may make on a fuzzed input (the seeds need far less).
const MAX_ALLOC: usize = 1 << 30;
/// An input taking longer than this counts as a hang.
const SLOW: Duration = Duration::from_secs(10);

/// Counts the largest single allocation; refuses (so the process aborts, leaving the input in
/// `last-input`) anything above 16 GiB, which would otherwise take the machine down.
struct Tracking;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        if l.size() > 16 << 30 {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        if l.size() > 16 << 30 {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        if new > 16 << 30 {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
}
#[global_allocator]
static ALLOC: Tracking = Tracking;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One fuzz target: its seeds and how to feed it one input (written to `file`).
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    /// The file name the input is written to (the reader may look at the extension).
    file_name: &'static str,
    /// Files copied beside the input (a model folder's other files).
    beside: Vec<PathBuf>,
    read: fn(&Path),
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A small activations file and a maps file as the stages write them.
fn run_seeds(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    use candle_core::{Device, Tensor};
    let cpu = Device::Cpu;
    let h: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32 * 0.5).collect();
    let act = vec![
        (
            "hidden_states".to_string(),
            Tensor::from_vec(h, (2, 3, 4), &cpu).unwrap(),
        ),
        ("positions".to_string(), Tensor::new(&[0i64, 1, 1], &cpu).unwrap()),
        ("tokens".to_string(), Tensor::new(&[5i64, 6, 7, 8, 9, 1], &cpu).unwrap()),
        ("offsets".to_string(), Tensor::new(&[0i64, 2, 4, 6], &cpu).unwrap()),
    ];
    let a = dir.join("a.safetensors");
    jumplens::data::io::write_safetensors(&a, &act, None).unwrap();
    let m: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let maps = vec![("mat.0.1".to_string(), Tensor::from_vec(m, (4, 4), &cpu).unwrap())];
    let meta = [("n_layers", "1"), ("d_model", "4"), ("model_sha256", "00")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mp = dir.join("m.safetensors");
    jumplens::data::io::write_safetensors(&mp, &maps, Some(meta)).unwrap();
    (bytes(&a), bytes(&mp))
}

/// The header of the SmolLM2 GGUF asset (everything before the tensor data), when present.
fn gguf_seed() -> Option<Vec<u8>> {
    let p = root().join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut f = std::fs::File::open(&p).ok()?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).ok()?;
    let all = std::fs::read(&p).ok()?;
    Some(all[..content.tensor_data_offset as usize].to_vec())
}

fn targets(scratch: &Path) -> Vec<Target> {
    let tiny = root().join("tests/fixtures/tiny");
    let (act, maps) = run_seeds(scratch);
    let manifest = br#"{"tool":"jumplens","version":"0.1.0","model":{"path":"/m","sha256":"ab","arch":"gpt2","n_layers":2,"d_model":4,"vocab_size":10,"attention":"causal","block_params":10},"corpus":{"path":"/c","sha256":"cd","format":"lines","articles":3},"seed":0,"options":{"n_train":1,"n_val":1},"counts":{"train":{"examples":1}},"stages":{"fit":{"wall_s":1.0}}}"#.to_vec();
    let wiki = br#"{"A": {"title": "A", "extract": "One sentence. Two sentences here."}, "B": {"extract": "Third."}}"#
        .to_vec();
    let gpt2 = tiny.join("gpt2");
    let others = |skip: &str| -> Vec<PathBuf> {
        std::fs::read_dir(&gpt2)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != skip)
            .collect()
    };
    let word_tokenizer = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"w0":0,"w1":1,"w2":2},"unk_token":"w0"}}"#.to_vec();
    let load_dir = |p: &Path| {
        let _ = jumplens::model::load::load_model(p.parent().unwrap().to_str().unwrap(), &candle_core::Device::Cpu)
            .and_then(|lm| lm.encode("w1 w2").map(|_| ()));
    };
    let mut t = vec![
        Target {
            name: "safetensors",
            seeds: vec![bytes(&gpt2.join("model.safetensors")), act.clone()],
            file_name: "x.safetensors",
            beside: vec![],
            read: |p| {
                let _ = jumplens::data::io::read_safetensors(p);
            },
        },
        Target {
            name: "activations",
            seeds: vec![act],
            file_name: "val.safetensors",
            beside: vec![],
            read: |p| {
                let _ = jumplens::data::Activations::read(p);
                let _ = jumplens::data::Activations::read_tokens(p);
            },
        },
        Target {
            name: "maps",
            seeds: vec![maps],
            file_name: "maps.safetensors",
            beside: vec![],
            read: |p| {
                let _ = jumplens::lens::maps::Maps::read(p);
            },
        },
        Target {
            name: "manifest",
            seeds: vec![manifest],
            file_name: "manifest.json",
            beside: vec![],
            read: |p| {
                let _ = jumplens::data::RunDir::new(p.parent().unwrap()).read_manifest();
            },
        },
        Target {
            name: "corpus_json",
            seeds: vec![wiki],
            file_name: "c.json",
            beside: vec![],
            read: |p| {
                let _ = jumplens::data::corpus::read_corpus(p, "text");
            },
        },
        Target {
            name: "corpus_jsonl",
            seeds: vec![b"{\"text\": \"Hello there. General.\"}\n{\"text\": \"x\"}\n".to_vec()],
            file_name: "c.jsonl",
            beside: vec![],
            read: |p| {
                let _ = jumplens::data::corpus::read_corpus(p, "text");
            },
        },
        Target {
            name: "config_json",
            seeds: vec![bytes(&gpt2.join("config.json"))],
            file_name: "config.json",
            beside: others("config.json"),
            read: load_dir,
        },
        Target {
            name: "model_safetensors",
            seeds: vec![bytes(&gpt2.join("model.safetensors"))],
            file_name: "model.safetensors",
            beside: others("model.safetensors"),
            read: load_dir,
        },
        Target {
            name: "tokenizer_json",
            seeds: vec![word_tokenizer],
            file_name: "tokenizer.json",
            beside: others("tokenizer.json"),
            read: load_dir,
        },
    ];
    // The tuned lens's `params.pt` reader (a zip with a pickle that must never execute anything):
    // seeded with the lens the peer package saved.
    t.push(Target {
        name: "params_pt",
        seeds: vec![bytes(&root().join("tests/fixtures/tuned/llama_peer/params.pt"))],
        file_name: "params.pt",
        beside: vec![],
        read: |p| {
            let _ = jumplens::data::torch_pickle::read_state_dict(p);
        },
    });
    if let Some(g) = gguf_seed() {
        t.push(Target {
            name: "gguf",
            seeds: vec![g],
            file_name: "m.gguf",
            beside: vec![],
            read: |p| {
                if let Ok(mut f) = std::fs::File::open(p) {
                    if let Ok(c) = candle_core::quantized::gguf_file::Content::read(&mut f) {
                        let _ = jumplens::tokenizer::gguf::tokenizer_from_gguf(&c);
                    }
                }
                let _ = jumplens::model::load::load_model(p.to_str().unwrap(), &candle_core::Device::Cpu);
            },
        });
    }
    t
}

/// One mutation of `seed`: truncation, bit flips, random bytes, or a length-like field set huge.
fn mutate(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    if v.is_empty() {
        return vec![rng.random()];
    }
    // Headers hold the lengths and counts: aim there more often than not.
    let pos = |rng: &mut ChaCha8Rng, len: usize| {
        if rng.random_bool(0.7) {
            rng.random_range(0..len.min(4096))
        } else {
            rng.random_range(0..len)
        }
    };
    for _ in 0..rng.random_range(1..=3) {
        match rng.random_range(0..6) {
            0 => {
                let n = rng.random_range(0..v.len());
                v.truncate(n);
            }
            1 => {
                let i = pos(rng, v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            2 => {
                let i = pos(rng, v.len());
                v[i] = rng.random();
            }
            3 | 4 => {
                let huge: [u64; 6] = [1 << 60, 1 << 40, u64::MAX, 1 << 32, u32::MAX as u64, 1 << 31];
                let x = huge[rng.random_range(0..huge.len())];
                let width = if rng.random_bool(0.5) { 8 } else { 4 };
                let i = pos(rng, v.len());
                for (k, b) in x.to_le_bytes()[..width].iter().enumerate() {
                    if i + k < v.len() {
                        v[i + k] = *b;
                    }
                }
            }
            _ => {
                // Replace a digit run (JSON numbers, including the safetensors header's
                // offsets and shapes) with a huge number.
                if let Some(i) = (0..v.len())
                    .map(|_| pos(rng, v.len()))
                    .take(16)
                    .find(|&i| v[i].is_ascii_digit())
                {
                    let j = (i..v.len()).find(|&j| !v[j].is_ascii_digit()).unwrap_or(v.len());
                    let big = [
                        "1152921504606846976",
                        "18446744073709551615",
                        "4294967296",
                        "99999999999",
                    ];
                    v.splice(i..j, big[rng.random_range(0..big.len())].bytes());
                }
            }
        }
        if v.is_empty() {
            break;
        }
    }
    v
}

/// The message of the last caught panic.
static LAST_PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

#[derive(Default, Debug)]
struct Tally {
    executions: usize,
    panics: usize,
    slow: usize,
    huge_allocations: usize,
}

/// Runs `input` through `target` in `dir`; returns what went wrong, if anything.
fn exec(target: &Target, dir: &Path, input: &[u8], tally: &mut Tally) -> Option<String> {
    let file = dir.join(target.file_name);
    std::fs::write(&file, input).unwrap();
    std::fs::write(dir.join("last-input"), input).ok();
    LARGEST.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.read)(&file)));
    tally.executions += 1;
    let largest = LARGEST.load(Ordering::Relaxed);
    if result.is_err() {
        tally.panics += 1;
        return Some(format!(
            "panic: {}",
            LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default()
        ));
    }
    if started.elapsed() > SLOW {
        tally.slow += 1;
        return Some(format!("took {:?}", started.elapsed()));
    }
    if largest > MAX_ALLOC.max(input.len() * 64) {
        tally.huge_allocations += 1;
        return Some(format!(
            "allocated {largest} bytes at once for a {}-byte input",
            input.len()
        ));
    }
    None
}

/// Fuzzes every target: `per_target` mutations or `budget` of time each, whichever ends first.
fn fuzz(per_target: usize, budget: Duration, seed: u64, save: Option<&Path>) -> Vec<String> {
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = vec![];
    // The panic message of a caught panic would flood the output: count them instead.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut m) = LAST_PANIC.lock() {
            *m = info.to_string().lines().collect::<Vec<_>>().join(" ");
        }
    }));
    // JUMPLENS_FUZZ_ONLY=a,b: only these targets (scripts/fuzz.sh's optional third argument).
    let only: Option<Vec<String>> = std::env::var("JUMPLENS_FUZZ_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    for target in targets(scratch.path()) {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == target.name)) {
            continue;
        }
        let dir = scratch.path().join(target.name);
        std::fs::create_dir_all(&dir).unwrap();
        for b in &target.beside {
            std::fs::copy(b, dir.join(b.file_name().unwrap())).unwrap();
        }
        let mut tally = Tally::default();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut inputs: Vec<Vec<u8>> = target.seeds.clone();
        let replay = root().join("tests/fixtures/fuzz").join(target.name);
        if let Ok(d) = std::fs::read_dir(&replay) {
            let mut files: Vec<PathBuf> = d.flatten().map(|e| e.path()).collect();
            files.sort();
            inputs.extend(files.iter().map(|p| bytes(p)));
        }
        let started = Instant::now();
        let mut k = 0;
        loop {
            let input = if k < inputs.len() {
                inputs[k].clone()
            } else {
                if k - inputs.len() >= per_target || started.elapsed() > budget {
                    break;
                }
                let s = &target.seeds[rng.random_range(0..target.seeds.len())];
                mutate(s, &mut rng)
            };
            k += 1;
            if let Some(why) = exec(&target, &dir, &input, &mut tally) {
                let name = format!("{}-{:016x}", target.name, fxhash(&input));
                if let Some(out) = save {
                    std::fs::create_dir_all(out.join(target.name)).ok();
                    std::fs::write(out.join(target.name).join(&name), &input).ok();
                }
                failures.push(format!("{}: {why} ({name})", target.name));
            }
        }
        eprintln!(
            "fuzz {:18} {:7} executions in {:6.1} s: {} panics, {} slow, {} huge allocations",
            target.name,
            tally.executions,
            started.elapsed().as_secs_f64(),
            tally.panics,
            tally.slow,
            tally.huge_allocations
        );
    }
    std::panic::set_hook(hook);
    failures
}

/// A stable name for a saved input.
fn fxhash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

/// CI: the saved interesting inputs and 150 fixed-seed mutations per target, no failure.
#[test]
fn replay_and_short_fuzz() {
    let out = root().join("target/fuzz-findings");
    let failures = fuzz(150, Duration::from_secs(8), 19, Some(&out));
    assert!(
        failures.is_empty(),
        "{} failing inputs (saved under {}):\n{}",
        failures.len(),
        out.display(),
        failures.join("\n")
    );
}

/// `scripts/fuzz.sh`: JUMPLENS_FUZZ_SECS per target (default 60), seed JUMPLENS_FUZZ_SEED.
#[test]
#[ignore]
fn fuzz_for_a_while() {
    let secs: u64 = std::env::var("JUMPLENS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("JUMPLENS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let out = std::env::var("JUMPLENS_FUZZ_OUT").map_or_else(|_| root().join("target/fuzz-findings"), PathBuf::from);
    let failures = fuzz(usize::MAX, Duration::from_secs(secs), seed, Some(&out));
    assert!(
        failures.is_empty(),
        "{} failing inputs (saved under {}):\n{}",
        failures.len(),
        out.display(),
        failures.join("\n")
    );
}
