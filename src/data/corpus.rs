//! Text in, sentences out: reading a corpus, splitting prose into sentences and drawing the
//! paper's train/validation samples from disjoint articles.
//!
//! Formats are recognised from the file: the Wikipedia summaries JSON (an object title ->
//! {extract, ...}), JSONL (one record per article, text under `--text-field`), or plain text
//! (one sentence per line, each line its own article). Prose is split with Unicode sentence
//! boundaries (UAX #29, the `unicode-segmentation` crate).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use unicode_segmentation::UnicodeSegmentation;

/// One article: its title (or line number) and its sentences in order.
#[derive(Debug, Clone)]
pub struct Article {
    pub title: String,
    pub sentences: Vec<String>,
}

/// What kind of file a corpus is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CorpusFormat {
    /// A JSON object title -> {"extract": ...} (the Wikipedia summaries asset).
    WikiSummaries,
    /// One JSON record per line, text under a field.
    Jsonl,
    /// One sentence per line.
    Lines,
    /// One article per line, split into sentences (the Lee news corpus, `.cor`).
    ArticleLines,
}

/// Reads a corpus file into articles.
pub fn read_corpus(path: &Path, text_field: &str) -> Result<(CorpusFormat, Vec<Article>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read corpus", path.display()))?;
    let trimmed = text.trim_start();
    let (format, articles) = if trimmed.starts_with('{') && path.extension().is_some_and(|e| e == "json") {
        (CorpusFormat::WikiSummaries, wiki_summaries(&text, path)?)
    } else if trimmed.starts_with('{') {
        (CorpusFormat::Jsonl, jsonl(&text, text_field, path)?)
    } else if path.extension().is_some_and(|e| e == "cor") {
        let articles = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| Article {
                title: format!("line {}", i + 1),
                sentences: split_sentences(l),
            })
            .collect();
        (CorpusFormat::ArticleLines, articles)
    } else {
        let articles = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| Article {
                title: format!("line {}", i + 1),
                sentences: vec![l.trim().to_string()],
            })
            .collect();
        (CorpusFormat::Lines, articles)
    };
    let articles: Vec<Article> = articles.into_iter().filter(|a| !a.sentences.is_empty()).collect();
    if articles.is_empty() {
        bail!("{}: the corpus has no text", path.display());
    }
    Ok((format, articles))
}

fn wiki_summaries(text: &str, path: &Path) -> Result<Vec<Article>> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow!("{}: not valid JSON ({e})", path.display()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("{}: expected a JSON object title -> summary", path.display()))?;
    let mut articles = Vec::with_capacity(obj.len());
    for (title, entry) in obj {
        let extract = entry
            .get("extract")
            .and_then(|e| e.as_str())
            .or_else(|| entry.as_str())
            .unwrap_or("");
        articles.push(Article {
            title: title.clone(),
            sentences: split_sentences(extract),
        });
    }
    // JSON object order is the file's; sort so that sampling does not depend on the parser.
    articles.sort_by(|a, b| a.title.cmp(&b.title));
    Ok(articles)
}

fn jsonl(text: &str, field: &str, path: &Path) -> Result<Vec<Article>> {
    let mut articles = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}:{}: not valid JSON ({e})", path.display(), i + 1))?;
        let t = v.get(field).and_then(|t| t.as_str()).ok_or_else(|| {
            anyhow!(
                "{}:{}: no string field '{field}' (use --text-field)",
                path.display(),
                i + 1
            )
        })?;
        articles.push(Article {
            title: format!("line {}", i + 1),
            sentences: split_sentences(t),
        });
    }
    Ok(articles)
}

/// Splits prose into sentences (UAX #29 boundaries), dropping fragments without letters.
pub fn split_sentences(text: &str) -> Vec<String> {
    text.unicode_sentences()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| s.split_whitespace().count() >= 3 && s.chars().any(|c| c.is_alphabetic()))
        .collect()
}

/// A sentence drawn for an experiment, with the article it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledSentence {
    pub article: usize,
    pub text: String,
}

/// Draws `n_train` and `n_val` sentences from disjoint sets of articles, seeded.
///
/// Articles are shuffled and split in proportion to the requested counts; within each side,
/// sentences are taken one per article in turn (a random sentence of each article, then a second
/// one, ...), as the paper takes one sentence per article when there are enough articles.
/// `accept` filters sentences (e.g. by token length); the error says how many were found.
pub fn sample_sentences(
    articles: &[Article],
    n_train: usize,
    n_val: usize,
    seed: u64,
    mut accept: impl FnMut(&str) -> bool,
) -> Result<(Vec<SampledSentence>, Vec<SampledSentence>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..articles.len()).collect();
    order.shuffle(&mut rng);
    let total = (n_train + n_val).max(1);
    let n_val_articles = if n_val == 0 {
        0
    } else {
        ((articles.len() as f64 * n_val as f64 / total as f64).round() as usize)
            .clamp(1, articles.len().saturating_sub(1).max(1))
    };
    let (val_articles, train_articles) = order.split_at(n_val_articles);
    let train = draw(articles, train_articles, n_train, &mut rng, &mut accept, "training")?;
    let val = draw(articles, val_articles, n_val, &mut rng, &mut accept, "validation")?;
    Ok((train, val))
}

fn draw(
    articles: &[Article],
    chosen: &[usize],
    n: usize,
    rng: &mut ChaCha8Rng,
    accept: &mut impl FnMut(&str) -> bool,
    side: &str,
) -> Result<Vec<SampledSentence>> {
    // Every article's sentences in a seeded random order; then one per article per round.
    let mut queues: Vec<(usize, std::collections::VecDeque<&String>)> = chosen
        .iter()
        .map(|&a| {
            let mut s: Vec<&String> = articles[a].sentences.iter().collect();
            s.shuffle(rng);
            (a, s.into())
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n && queues.iter().any(|(_, q)| !q.is_empty()) {
        for (a, queue) in queues.iter_mut() {
            if out.len() >= n {
                break;
            }
            // A rejected sentence is replaced by the next one of the same article.
            while let Some(s) = queue.pop_front() {
                if accept(s) {
                    out.push(SampledSentence {
                        article: *a,
                        text: s.to_string(),
                    });
                    break;
                }
            }
        }
    }
    if out.len() < n {
        bail!(
            "the corpus has only {} usable {side} sentences in {} articles, {} were asked for",
            out.len(),
            chosen.len(),
            n
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<Article> {
        (0..40)
            .map(|a| Article {
                title: format!("a{a}"),
                sentences: (0..3).map(|s| format!("Article {a} says thing number {s}.")).collect(),
            })
            .collect()
    }

    #[test]
    fn splits_prose_into_sentences() {
        let s = split_sentences("The cat sat on the mat. It was happy!  Was it? Yes it was, really.");
        assert_eq!(
            s,
            vec!["The cat sat on the mat.", "It was happy!", "Yes it was, really."]
        );
    }

    #[test]
    fn train_and_val_come_from_disjoint_articles_and_are_seeded() {
        let arts = corpus();
        let (tr, va) = sample_sentences(&arts, 60, 20, 7, |_| true).unwrap();
        assert_eq!((tr.len(), va.len()), (60, 20));
        let tr_a: std::collections::HashSet<_> = tr.iter().map(|s| s.article).collect();
        assert!(va.iter().all(|s| !tr_a.contains(&s.article)));
        let again = sample_sentences(&arts, 60, 20, 7, |_| true).unwrap();
        assert_eq!(again.0, tr);
        let other = sample_sentences(&arts, 60, 20, 8, |_| true).unwrap();
        assert_ne!(other.0, tr);
    }

    #[test]
    fn too_few_sentences_is_an_error_with_the_count() {
        let arts = corpus();
        let err = sample_sentences(&arts, 200, 10, 0, |_| true).unwrap_err().to_string();
        assert!(err.contains("only"), "{err}");
    }
}
