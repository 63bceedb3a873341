//! The report page in a real browser: a tiny run (the 2-layer BERT MLM asset on a generated
//! corpus) goes through every stage via `run_report`, and headless Chromium loads the page.
//! Checked: every figure is there, laid out with a real size and drawn content; the page loads
//! nothing from outside itself; no console message or error. A full-page screenshot is kept at
//! `target/test-artifacts/report.png` (with the page beside it) for a human to look at.
//!
//! Needs the `bert_mlm` asset (`scripts/fetch_assets.sh bert_mlm`) and Chromium
//! (`apt-get install chromium`, or `JUMPLENS_CHROMIUM=/path/to/chrome`). Without them the test
//! is skipped with a message, unless JUMPLENS_REQUIRE_ASSETS=1 (`scripts/test.sh`, CI), which
//! makes either a failure (see tests/common).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jumplens::pipeline::report::{run_report, ReportOptions};

mod common;
use common::{asset, missing};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("JUMPLENS_CHROMIUM").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
        return missing(&format!("JUMPLENS_CHROMIUM={} is not a file", p.display()));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    missing("Chromium is not installed (apt-get install chromium, or set JUMPLENS_CHROMIUM)")
}

/// About 300 varied English sentences, one per line (each line is its own article).
fn write_corpus(path: &Path) {
    let subjects = [
        "The old farmer",
        "A young scientist",
        "My grandmother",
        "The city council",
        "Our neighbour's dog",
        "The small company",
        "A famous painter",
        "The river authority",
        "The new teacher",
        "Every student",
        "The government",
        "A quiet musician",
        "The children",
        "The captain of the ship",
        "An experienced doctor",
        "The local baker",
        "A group of tourists",
    ];
    let verbs = [
        "built",
        "discovered",
        "painted",
        "visited",
        "sold",
        "described",
        "repaired",
        "wrote about",
        "carried",
        "protected",
        "measured",
        "forgot",
        "celebrated",
        "studied",
        "opened",
        "photographed",
        "explained",
        "borrowed",
        "cleaned",
    ];
    let objects = [
        "a wooden bridge",
        "the ancient temple",
        "a strange comet",
        "the northern valley",
        "several old books",
        "a red bicycle",
        "the local museum",
        "a new hospital",
        "the mountain village",
        "three letters",
        "the broken clock",
        "a small garden",
        "the royal palace",
        "an empty warehouse",
        "the winter festival",
        "a map of the coast",
        "the first railway",
        "two stone towers",
        "the school library",
        "a famous recipe",
        "the old lighthouse",
        "a rare flower",
        "the town square",
    ];
    let endings = [
        "last summer.",
        "in 1887.",
        "after the storm.",
        "before the war began.",
        "with great care.",
        "near the harbour.",
        "during the night.",
        "for the first time.",
        "without any help.",
        "in the early morning.",
        "at the end of the year.",
        "because it was necessary.",
        "while everyone watched.",
        "despite the heavy rain.",
        "on a cold Tuesday.",
        "and then went home.",
        "so that others could learn.",
        "before anyone noticed.",
        "in less than a week.",
        "as the newspapers reported.",
        "with the help of friends.",
        "to the surprise of the town.",
        "in the spring of 1954.",
        "but nobody believed it.",
        "every single day.",
        "long ago.",
        "in a hurry.",
        "under a clear sky.",
        "once again.",
    ];
    let mut lines = Vec::new();
    for i in 0..300usize {
        // Coprime strides spread the combinations; every line differs in at least one part.
        let s = subjects[i % subjects.len()];
        let v = verbs[(i * 7 + i / 19) % verbs.len()];
        let o = objects[(i * 5 + i / 23) % objects.len()];
        let e = endings[(i * 11 + i / 29) % endings.len()];
        lines.push(format!("{s} {v} {o} {e}"));
    }
    lines.sort();
    lines.dedup();
    assert!(lines.len() >= 290, "{} distinct sentences", lines.len());
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Runs Chromium headless on `page` with `extra` flags; returns (stdout, stderr).
fn run_chromium(chrome: &Path, page: &Path, extra: &[String], work: &Path, tag: &str) -> (String, String) {
    let profile = tempfile::tempdir_in(work).unwrap();
    let out_path = work.join(format!("{tag}.stdout"));
    let err_path = work.join(format!("{tag}.stderr"));
    let mut child = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("cannot start Chromium");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "Chromium failed ({status}):\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
            break;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("Chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (
        std::fs::read_to_string(&out_path).unwrap(),
        std::fs::read_to_string(&err_path).unwrap(),
    )
}

/// Console messages Chromium logged (`...:CONSOLE...` lines), and uncaught errors.
fn console_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .collect()
}

/// Records load errors from the start, and after load the laid-out size and content of every
/// figure, into a <pre id="jl-probe"> that --dump-dom shows.
const PROBE_HEAD: &str = "<script>window.__jlErrors=[];window.addEventListener('error',function(e){\
window.__jlErrors.push(String(e.message||(e.target&&e.target.outerHTML)||'error'))},true);</script>";
const PROBE_TAIL: &str = "<script>(function(){\
var figs=[].map.call(document.querySelectorAll('figure'),function(f){\
var g=f.querySelector('svg,img');if(!g){return {kind:'none',w:0,h:0,children:0,drawn:0}}\
var r=g.getBoundingClientRect();\
var drawn=g.tagName.toLowerCase()==='svg'?g.querySelectorAll('rect,path,polyline,line,circle,text').length:(g.naturalWidth>0?1:0);\
return {kind:g.tagName.toLowerCase(),w:r.width,h:r.height,children:g.childElementCount,drawn:drawn}});\
var p=document.createElement('pre');p.id='jl-probe';\
p.textContent=JSON.stringify({figures:figs,svgs:document.querySelectorAll('svg').length,\
errors:window.__jlErrors,height:Math.ceil(document.documentElement.scrollHeight),\
width:document.documentElement.scrollWidth,peek:document.querySelectorAll('table.peek').length,\
peekCells:document.querySelectorAll('table.peek td').length});\
document.body.appendChild(p);})();</script>";

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(model) = asset("bert_mlm") else {
        return;
    };
    let Some(chrome) = chromium() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let corpus = work.path().join("sentences.txt");
    write_corpus(&corpus);

    // A tiny run through every stage.
    let started = Instant::now();
    let mut opts = ReportOptions::new(model.display().to_string(), &corpus, work.path().join("run"), true);
    opts.n_train = 200;
    opts.n_val = 80;
    opts.submodule_eval = 20;
    opts.submodule_train = 100;
    opts.progress = false;
    let page = run_report(&opts).unwrap();
    eprintln!("run_report: {:.1} s", started.elapsed().as_secs_f64());

    // Every stage recorded its wall time.
    let m = jumplens::data::run::RunDir::new(&opts.out).read_manifest().unwrap();
    for (stage, t) in jumplens::pipeline::report::stage_wall_times(&m) {
        assert!(t.is_some_and(|t| t >= 0.0), "no wall time for {stage}");
    }
    // A second call finds everything up to date and only rewrites the page.
    let again = Instant::now();
    run_report(&opts).unwrap();
    let m2 = jumplens::data::run::RunDir::new(&opts.out).read_manifest().unwrap();
    assert_eq!(
        m.stages.get("predict").and_then(|r| r.get("wall_s")),
        m2.stages.get("predict").and_then(|r| r.get("wall_s")),
        "predict ran again on an up-to-date run"
    );
    eprintln!(
        "second run_report (all skipped): {:.1} s",
        again.elapsed().as_secs_f64()
    );
    // Other sub-module sizes: only that stage runs again, and its record says so.
    let mut other = opts.clone();
    other.submodule_eval = 12;
    run_report(&other).unwrap();
    let m3 = jumplens::data::run::RunDir::new(&opts.out).read_manifest().unwrap();
    let rec = |m: &jumplens::data::run::Manifest, s: &str, k: &str| m.stages.get(s).and_then(|r| r.get(k)).cloned();
    assert_eq!(rec(&m3, "predict", "wall_s"), rec(&m, "predict", "wall_s"));
    assert_ne!(rec(&m3, "submodules", "wall_s"), rec(&m, "submodules", "wall_s"));
    assert_eq!(rec(&m3, "submodules", "n_eval"), Some(serde_json::json!(12)));
    // Back to the first sizes for the page checked below.
    run_report(&opts).unwrap();
    let html = std::fs::read_to_string(&page).unwrap();

    // Self-contained: nothing to fetch, no script of its own.
    let lower = html.to_lowercase();
    for bad in [
        "<script",
        "<link",
        "<iframe",
        "@import",
        "@font-face",
        "src=\"http",
        "href=\"http",
        "url(http",
        "src=\"//",
        "src=\"file:",
    ] {
        assert!(!lower.contains(bad), "report.html contains {bad:?}");
    }
    assert!(!html.contains("not run yet"), "a section is missing");
    assert!(!html.contains("is missing (neither"), "a figure file is missing");
    for heading in [
        "id=\"r2\"",
        "id=\"predict\"",
        "id=\"early-exit\"",
        "id=\"submodules\"",
        "id=\"peek\"",
    ] {
        assert!(html.contains(heading), "no section {heading}");
    }
    assert!(html.contains("layers saved, mat"), "no layers-saved table");
    assert!(html.contains("P@1 mat"), "no P@1 table");

    // Load it with the probe and read the layout back.
    let probe_page = work.path().join("probe.html");
    let probed = html.replacen("<head>", &format!("<head>{PROBE_HEAD}"), 1).replacen(
        "</body>",
        &format!("{PROBE_TAIL}</body>"),
        1,
    );
    std::fs::write(&probe_page, probed).unwrap();
    let (dom, _) = run_chromium(
        &chrome,
        &probe_page,
        &["--window-size=1100,900".into(), "--dump-dom".into()],
        work.path(),
        "probe",
    );
    let json = dom
        .split("<pre id=\"jl-probe\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| panic!("no probe output in the dumped DOM:\n{}", &dom[..dom.len().min(2000)]))
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let probe: serde_json::Value = serde_json::from_str(&json).unwrap();
    eprintln!("probe: {probe}");
    let figures = probe["figures"].as_array().unwrap();
    // r², predict, early exit, sub-modules, alternation.
    assert_eq!(figures.len(), 5, "figures: {figures:?}");
    for (i, f) in figures.iter().enumerate() {
        let num = |k: &str| f[k].as_f64().unwrap_or(0.0);
        assert_eq!(f["kind"], "svg", "figure {i} is not an inline SVG: {f}");
        assert!(
            num("w") >= 300.0 && num("h") >= 200.0,
            "figure {i} is laid out too small: {f}"
        );
        assert!(
            num("children") >= 5.0 && num("drawn") >= 20.0,
            "figure {i} is (nearly) empty: {f}"
        );
    }
    assert_eq!(
        probe["svgs"].as_u64(),
        Some(5),
        "SVGs outside the figures (or nested documents)"
    );
    assert_eq!(
        probe["errors"].as_array().map(Vec::len),
        Some(0),
        "errors while loading: {}",
        probe["errors"]
    );
    // Three sentences, a mat and an id table each.
    assert_eq!(probe["peek"].as_u64(), Some(6), "peek tables");
    assert!(
        probe["peekCells"].as_u64().unwrap_or(0) >= 6 * 3 * 5,
        "peek tables are too small"
    );
    // The page fits its 1000 px column (wide peek tables scroll inside their own box).
    assert!(
        probe["width"].as_u64().unwrap_or(0) <= 1100,
        "the page scrolls sideways: {probe}"
    );

    // The page itself (no probe): no console message at all, and a full-page screenshot.
    let height = probe["height"].as_u64().unwrap().clamp(800, 30_000);
    let shot = artifacts().join("report.png");
    std::fs::remove_file(&shot).ok();
    let (_, stderr) = run_chromium(
        &chrome,
        &page,
        &[
            format!("--window-size=1100,{height}"),
            format!("--screenshot={}", shot.display()),
        ],
        work.path(),
        "shot",
    );
    let console = console_lines(&stderr);
    assert!(console.is_empty(), "console messages:\n{}", console.join("\n"));
    std::fs::copy(&page, artifacts().join("report.html")).unwrap();
    let png = resvg::tiny_skia::Pixmap::load_png(&shot).expect("the screenshot is a PNG");
    assert_eq!((png.width(), png.height() as u64), (1100, height));
    // Not blank: a good share of pixels is neither white nor the page background.
    let inked = png
        .pixels()
        .iter()
        .filter(|p| {
            let (r, g, b) = (p.red(), p.green(), p.blue());
            r.min(g).min(b) < 200
        })
        .count();
    let share = inked as f64 / png.pixels().len() as f64;
    eprintln!(
        "screenshot {} ({}x{}, {:.1}% inked)",
        shot.display(),
        png.width(),
        png.height(),
        100.0 * share
    );
    assert!(
        share > 0.01,
        "the screenshot is nearly blank ({:.2}% inked)",
        100.0 * share
    );
}
