//! The layout rule of docs/architecture.md, checked on the source: data flows one way, so no
//! module imports from a later stage of the pipeline (a `crate::<module>` path in a module of an
//! earlier stage fails this test).

use std::path::{Path, PathBuf};

/// The top-level modules in pipeline order; the shared infrastructure (rank 0) may be used by all.
const ORDER: &[(&str, usize)] = &[
    ("cancel", 0),
    ("device", 0),
    ("error", 0),
    ("host", 0),
    ("interrupt", 0),
    ("progress", 0),
    ("data", 1),
    ("tokenizer", 2),
    ("model", 3),
    ("collect", 4),
    ("lens", 5),
    ("eval", 6),
    ("render", 7),
    ("pipeline", 8),
    ("bench", 9),
    ("cli", 10),
];

fn rank(module: &str) -> Option<usize> {
    ORDER.iter().find(|(m, _)| *m == module).map(|&(_, r)| r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_from_a_later_stage() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let top = top.trim_end_matches(".rs");
        if top == "lib" || top == "main" {
            continue;
        }
        let own = rank(top).unwrap_or_else(|| panic!("{}: module '{top}' is not in ORDER", rel.display()));
        let text = std::fs::read_to_string(f).unwrap();
        for (i, _) in text.match_indices("crate::") {
            let used: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(r) = rank(&used) {
                checked += 1;
                if r > own {
                    violations.push(format!("{}: imports crate::{used}", rel.display()));
                }
            }
        }
    }
    assert!(
        checked > 50,
        "found only {checked} crate:: paths; is the source where expected?"
    );
    assert!(
        violations.is_empty(),
        "imports from a later stage:\n{}",
        violations.join("\n")
    );
}
