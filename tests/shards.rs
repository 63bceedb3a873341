//! Issue 17: `collect --stats-only`, `collect --shard I/N` and `jumplens merge` through the CLI
//! on the tiny GPT-2 (d = 32, 3 states) with a word tokenizer: N merged shards are the single
//! run (the same sampled tokens and positions, bitwise the same stored states), the maps from
//! statistics equal the maps from stored activations, and r2 / predict / early-exit agree; bad
//! merges and shard options are one-line errors that write nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::read_json;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jumplens"))
}

/// Runs jumplens with `env` added; returns (ok, stderr).
fn run_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(bin());
    c.args(args);
    for k in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "JOB_COMPLETION_INDEX",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run jumplens");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok(args: &[&str]) {
    let (good, err) = run_env(args, &[]);
    assert!(good, "{args:?} failed: {err}");
}

/// Asserts a failure with one error line containing every needle.
fn fails_with(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let (good, err) = run_env(args, env);
    assert!(!good, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line for {args:?}, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "error for {args:?} lacks '{n}': {}", lines[0]);
    }
}

/// The tiny GPT-2 with a 100-word tokenizer and a corpus of 200 distinct 7-word sentences.
fn setup(dir: &Path) -> (String, String) {
    let m = dir.join("m");
    common::tiny_model_with_words("gpt2", &["config.json", "model.safetensors"], &m, 100, false);
    let corpus = dir.join("corpus.txt");
    common::write_word_corpus(&corpus);
    (m.display().to_string(), corpus.display().to_string())
}

/// The collect command line of this test's run: 60 training and 20 validation sentences,
/// every position, parts of 5 sentences (12 + 4 parts, so up to 4 shards).
fn collect_args<'a>(model: &'a str, corpus: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "collect",
        "--quiet",
        model,
        "--corpus",
        corpus,
        "--out",
        out,
        "--train",
        "60",
        "--val",
        "20",
        "--positions",
        "all",
        "--part-sentences",
        "5",
    ];
    a.extend_from_slice(extra);
    a
}

fn tensors(path: &Path) -> safetensors::SafeTensors<'static> {
    let bytes: &'static [u8] = Box::leak(std::fs::read(path).unwrap().into_boxed_slice());
    safetensors::SafeTensors::deserialize(bytes).unwrap()
}

fn f32s(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(st.tensor(name).unwrap().data())
}

/// Every map (and intercept) of `a` within `rel` of `b`'s largest entry plus one float32
/// rounding step: the maps are stored in float32.
fn maps_agree(a: &Path, b: &Path, rel: f64) {
    let (sa, sb) = (tensors(a), tensors(b));
    let mut names = sa.names();
    names.sort();
    let mut nb = sb.names();
    nb.sort();
    assert_eq!(names, nb, "{} and {} hold other maps", a.display(), b.display());
    assert!(!names.is_empty());
    for n in names {
        let (x, y) = (f32s(&sa, n), f32s(&sb, n));
        let m = y.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        for (i, (u, v)) in x.iter().zip(&y).enumerate() {
            let (u, v) = (*u as f64, *v as f64);
            let tol = rel * m + f64::from(f32::EPSILON) * u.abs().max(v.abs());
            assert!(
                (u - v).abs() <= tol,
                "{n}[{i}]: {u} vs {v} ({} vs {})",
                a.display(),
                b.display()
            );
        }
    }
}

/// Every number of two JSON reports within `rel` (relative, with an absolute floor of `rel`),
/// skipping timings and paths.
fn json_agree(a: &Value, b: &Value, rel: f64, at: &str) {
    let skip = |k: &str| k.contains("wall") || k.contains("seconds") || k.ends_with("_s") || k == "path" || k == "run";
    common::json_agree(a, b, rel, at, &skip, false);
}

#[test]
fn merged_shards_are_the_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (single, stats) = (path("single"), path("stats"));
    ok(&collect_args(&model, &corpus, &single, &[]));
    ok(&collect_args(
        &model,
        &corpus,
        &stats,
        &["--stats-only", "--pairs", "all"],
    ));
    // Four shards of each form; shard 2 takes its index from a Slurm job array's environment.
    for k in 0..4 {
        let (store_k, stats_k) = (path(&format!("store{k}")), path(&format!("stats{k}")));
        let shard = format!("{k}/4");
        if k == 2 {
            let env = [
                ("SLURM_ARRAY_TASK_ID", "12"),
                ("SLURM_ARRAY_TASK_MIN", "10"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ];
            for (out, extra) in [(&store_k, vec![]), (&stats_k, vec!["--stats-only", "--pairs", "all"])] {
                let (good, err) = run_env(&collect_args(&model, &corpus, out, &extra), &env);
                assert!(good, "{err}");
            }
        } else {
            ok(&collect_args(&model, &corpus, &store_k, &["--shard", &shard]));
            ok(&collect_args(
                &model,
                &corpus,
                &stats_k,
                &["--stats-only", "--pairs", "all", "--shard", &shard],
            ));
        }
        let man = read_json(&dir.path().join(format!("stats{k}/manifest.json")));
        assert_eq!(man["options"]["shard"]["from"], k);
        assert_eq!(man["options"]["shard"]["count"], 4);
        assert_eq!(man["options"]["stats_only"], "all");
        assert!(!dir
            .path()
            .join(format!("stats{k}/activations/train.safetensors"))
            .exists());
    }
    let shards = |prefix: &str| (0..4).map(|k| path(&format!("{prefix}{k}"))).collect::<Vec<_>>();
    let (merged_store, merged_stats) = (path("merged_store"), path("merged_stats"));
    let mut args = vec!["merge", merged_store.as_str()];
    let store_shards = shards("store");
    args.extend(store_shards.iter().rev().map(|s| s.as_str())); // any order
    ok(&args);
    let stats_shards = shards("stats");
    let mut args = vec!["merge", merged_stats.as_str()];
    args.extend(stats_shards.iter().map(|s| s.as_str()));
    ok(&args);
    // Merging merges: (0, 1) and (2, 3), then the two.
    let (p01, p23, nested) = (path("p01"), path("p23"), path("nested"));
    ok(&["merge", "--partial", &p01, &stats_shards[0], &stats_shards[1]]);
    ok(&["merge", "--partial", &p23, &stats_shards[2], &stats_shards[3]]);
    ok(&["merge", &nested, &p23, &p01]);

    // The same examples: tokens, positions, articles and (the same batches) bitwise the same
    // states, for both splits.
    for split in ["train", "val"] {
        let a = tensors(&dir.path().join(format!("single/activations/{split}.safetensors")));
        let b = tensors(&dir.path().join(format!("merged_store/activations/{split}.safetensors")));
        for name in ["hidden_states", "positions", "tokens", "offsets", "article"] {
            assert_eq!(
                a.tensor(name).unwrap().shape(),
                b.tensor(name).unwrap().shape(),
                "{split} {name}"
            );
            assert!(
                a.tensor(name).unwrap().data() == b.tensor(name).unwrap().data(),
                "{split} {name}"
            );
        }
        let n = a.tensor("positions").unwrap().shape()[0];
        assert!(n > 100, "{split}: {n} examples");
        if split == "val" {
            let c = tensors(&dir.path().join("merged_stats/activations/val.safetensors"));
            assert!(a.tensor("hidden_states").unwrap().data() == c.tensor("hidden_states").unwrap().data());
        }
    }
    // The manifests count the same examples.
    let counts = |run: &str| read_json(&dir.path().join(run).join("manifest.json"))["counts"].clone();
    for run in ["stats", "merged_store", "merged_stats", "nested"] {
        for split in ["train", "val"] {
            assert_eq!(
                counts(run)[split]["examples"],
                counts("single")[split]["examples"],
                "{run} {split}"
            );
            assert_eq!(
                counts(run)[split]["sentences"],
                counts("single")[split]["sentences"],
                "{run} {split}"
            );
        }
        let man = read_json(&dir.path().join(run).join("manifest.json"));
        assert!(man["options"].get("shard").is_none(), "{run}: a whole run has no shard");
    }

    // Streaming statistics = statistics of the stored activations (float64 sums in another
    // order: 1e-12 relative to the block's largest entry).
    let stored = jumplens::data::Activations::read(&dir.path().join("single/activations/train.safetensors")).unwrap();
    let (s, _, d) = stored.hidden_states.dims3().unwrap();
    let mut want = jumplens::data::stats::GramStats::zeros(
        jumplens::data::stats::StatsPairs::All,
        s,
        d,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    want.accumulate(&stored.hidden_states).unwrap();
    for run in ["stats", "merged_stats", "nested"] {
        let got = jumplens::data::stats::GramStats::read(
            &dir.path().join(run).join("activations/train.stats.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(got.n, want.n);
        for l in 0..s {
            for t in 0..s {
                let (x, y) = (got.block(l, t).unwrap().unwrap(), want.block(l, t).unwrap().unwrap());
                let m = y.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (u, v) in x.iter().zip(&y) {
                    assert!((u - v).abs() <= 1e-12 * m, "{run} ({l},{t}): {u} vs {v}");
                }
            }
        }
    }

    // The stages on every form: maps, r2, predict and early exit agree.
    for run in [&single, &stats, &merged_stats, &nested] {
        ok(&["fit", "--quiet", run]);
        ok(&["fit", "--quiet", run, "--intercept", "--pairs", "to-final"]);
        ok(&["r2", run]);
        ok(&["predict", run]);
        ok(&["early-exit", run]);
    }
    let file = |run: &str, f: &str| Path::new(run).join(f);
    for run in [&stats, &merged_stats, &nested] {
        maps_agree(&file(run, "maps.safetensors"), &file(&single, "maps.safetensors"), 1e-9);
        maps_agree(
            &file(run, "maps_affine.safetensors"),
            &file(&single, "maps_affine.safetensors"),
            1e-9,
        );
        let man = read_json(&file(run, "manifest.json"));
        assert_eq!(man["stages"]["fit"]["from"], "statistics");
        for f in ["r2.json", "predict.json", "early_exit.json"] {
            json_agree(&read_json(&file(run, f)), &read_json(&file(&single, f)), 1e-6, f);
        }
    }
    // The merged statistics fit the same maps as the unmerged statistics (to 1e-9).
    maps_agree(
        &file(&merged_stats, "maps.safetensors"),
        &file(&stats, "maps.safetensors"),
        1e-9,
    );
    // The page is written from a statistics run's stages.
    let (good, err) = run_env(&["report", "--html-only", &merged_stats], &[]);
    assert!(good, "{err}");
    assert!(file(&merged_stats, "report.html").exists());

    // Bad merges: one line, nothing written.
    let bad_out = path("bad");
    let other_seed = path("seed1");
    ok(&collect_args(
        &model,
        &corpus,
        &other_seed,
        &["--stats-only", "--pairs", "all", "--shard", "3/4", "--seed", "1"],
    ));
    let other_pairs = path("tofinal");
    ok(&collect_args(
        &model,
        &corpus,
        &other_pairs,
        &["--stats-only", "--pairs", "to-final", "--shard", "3/4"],
    ));
    let st = &stats_shards;
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![&st[0], &st[1], &st[2], &other_seed],
            vec!["seed", "recorded 0, now 1"],
        ),
        (vec![&st[0], &st[1], &st[2], &other_pairs], vec!["stats_only"]),
        (vec![&st[0], &st[1], &st[3]], vec!["shard 2/4 is missing"]),
        (vec![&st[0], &st[1], &st[2]], vec!["shard 3/4 is missing", "--partial"]),
        (
            vec![&st[0], &st[1], &st[1], &st[2], &st[3]],
            vec!["shard 1/4 is given twice"],
        ),
        (vec![&st[0], &st[1], &store_shards[2], &st[3]], vec!["stats_only"]),
        (vec![&single, &st[1]], vec!["not a shard"]),
    ];
    for (inputs, needles) in cases {
        let mut args = vec!["merge", bad_out.as_str()];
        args.extend(inputs);
        fails_with(&args, &[], &needles);
        assert!(!Path::new(&bad_out).exists(), "{args:?} wrote {bad_out}");
    }
    // A shard still incomplete (its validation split not collected yet).
    let incomplete = path("incomplete");
    copy_tree(Path::new(&st[3]), Path::new(&incomplete));
    std::fs::remove_file(Path::new(&incomplete).join("activations/val.safetensors")).unwrap();
    fails_with(
        &["merge", &bad_out, &st[0], &st[1], &st[2], &incomplete],
        &[],
        &["incomplete", "shard 3/4"],
    );
    assert!(!Path::new(&bad_out).exists());
    // Bad shard options.
    let never = path("never");
    for (shard, needle) in [
        ("4/4", "below the number of shards"),
        ("0/0", "at least 1"),
        ("1", "I/N"),
    ] {
        fails_with(
            &collect_args(&model, &corpus, &never, &["--shard", shard]),
            &[],
            &[needle],
        );
    }
    fails_with(
        &collect_args(&model, &corpus, &never, &["--shard", "0/20"]),
        &[],
        &["20 shards but only", "--part-sentences"],
    );
    fails_with(
        &collect_args(&model, &corpus, &never, &[]),
        &[("JOB_COMPLETION_INDEX", "1")],
        &["--shard-count"],
    );
    fails_with(
        &collect_args(&model, &corpus, &never, &["--shard-count", "4"]),
        &[("JOB_COMPLETION_INDEX", "4")],
        &["JOB_COMPLETION_INDEX", "below the number of shards"],
    );
    assert!(!Path::new(&never).exists());
    // A Kubernetes Indexed Job's index with --shard-count gives that shard.
    let k8s = path("k8s");
    let (good, err) = run_env(
        &collect_args(&model, &corpus, &k8s, &["--stats-only", "--shard-count", "4"]),
        &[("JOB_COMPLETION_INDEX", "3")],
    );
    assert!(good, "{err}");
    let man = read_json(&Path::new(&k8s).join("manifest.json"));
    assert_eq!(man["options"]["shard"]["from"], 3);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            copy_tree(&p, &to.join(p.file_name().unwrap()));
        } else {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Stops the single-node Slurm cluster when dropped (also when the test fails).
struct SlurmCluster;

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/cluster.sh");
        Command::new("bash").arg(&script).arg("stop").status().ok();
    }
}

/// Issue 17 item 4: a single-node Slurm cluster (scripts/slurm/cluster.sh, Debian's slurm-wlm
/// and munge) runs `sbatch --array=0-3` of four statistics shards, which take their index from
/// the array's environment; their merge fits the maps of the unsharded run. Skipped with a
/// message when Slurm is not installed (`bash scripts/slurm/cluster.sh install` installs it),
/// unless JUMPLENS_REQUIRE_SLURM=1.
#[test]
fn slurm_job_array_shards_merge_to_the_single_run() {
    let have = Command::new("sh")
        .args(["-c", "command -v sbatch && command -v slurmctld && command -v munged"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("JUMPLENS_REQUIRE_SLURM").as_deref() != Ok("1"),
            "Slurm is not installed and JUMPLENS_REQUIRE_SLURM=1"
        );
        eprintln!("SKIPPED: Slurm is not installed; `bash scripts/slurm/cluster.sh install` installs it (root, apt)");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/cluster.sh");
    let _cluster = SlurmCluster;
    let up = Command::new("bash").arg(&script).arg("start").output().unwrap();
    assert!(
        up.status.success(),
        "starting Slurm failed: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let (model, corpus) = setup(dir.path());
    let d = dir.path().display().to_string();
    let shard_out = format!("{d}/shard$SLURM_ARRAY_TASK_ID");
    let args = collect_args(&model, &corpus, &shard_out, &["--stats-only", "--pairs", "all"]);
    let job = format!(
        "#!/bin/bash\n#SBATCH --array=0-3\n#SBATCH --output={d}/slurm-%A_%a.out\n#SBATCH --cpus-per-task=1\n\
         exec {} {}\n",
        bin().display(),
        args.join(" ")
    );
    let job_path = dir.path().join("shards.sbatch");
    std::fs::write(&job_path, job).unwrap();
    let submitted = Command::new("sbatch")
        .arg("--wait")
        .arg(&job_path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let logs: String = (0..4)
        .filter_map(|k| {
            std::fs::read_dir(dir.path())
                .ok()?
                .flatten()
                .find(|e| e.file_name().to_string_lossy().ends_with(&format!("_{k}.out")))
                .and_then(|e| std::fs::read_to_string(e.path()).ok())
        })
        .collect();
    assert!(
        submitted.status.success(),
        "sbatch --wait failed: {}{}\n{logs}",
        String::from_utf8_lossy(&submitted.stdout),
        String::from_utf8_lossy(&submitted.stderr)
    );
    let shards: Vec<String> = (0..4).map(|k| format!("{d}/shard{k}")).collect();
    for (k, s) in shards.iter().enumerate() {
        let man = read_json(&Path::new(s).join("manifest.json"));
        assert_eq!(
            man["options"]["shard"]["from"], k,
            "{s}: index from SLURM_ARRAY_TASK_ID"
        );
        assert_eq!(man["options"]["shard"]["count"], 4);
    }
    let merged = format!("{d}/merged");
    let mut margs = vec!["merge", merged.as_str()];
    margs.extend(shards.iter().map(|s| s.as_str()));
    ok(&margs);
    let single = format!("{d}/single");
    ok(&collect_args(
        &model,
        &corpus,
        &single,
        &["--stats-only", "--pairs", "all"],
    ));
    for run in [&single, &merged] {
        ok(&["fit", "--quiet", run]);
        ok(&["r2", run]);
    }
    maps_agree(
        &Path::new(&merged).join("maps.safetensors"),
        &Path::new(&single).join("maps.safetensors"),
        1e-9,
    );
    json_agree(
        &read_json(&Path::new(&merged).join("r2.json")),
        &read_json(&Path::new(&single).join("r2.json")),
        1e-6,
        "r2",
    );
}
