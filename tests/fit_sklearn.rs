//! `jumplens::lens::fit` and `jumplens::lens::r2` against scikit-learn (tests/fixtures/lstsq, see its
//! README): `LinearRegression(fit_intercept=False / True)` coefficients, intercepts,
//! predictions and `r2_score` on five least-squares cases, including three rank-deficient ones
//! where the answer is the minimum-norm solution.
//!
//! # Tolerances (derived, not tuned)
//!
//! * The maps are stored as float32, so even an exact solve differs from scikit-learn's float64
//!   `coef_` by up to half an ulp: `2^-24 |coef_ij|` (6e-8 relative). Solvers in float64 differ
//!   among themselves by 1e-15..5e-13 of the largest coefficient (README). Float64 path:
//!   `|A_ij - coef_ij| <= 1e-7 |coef_ij| + 1e-9 max|coef|`.
//! * Predictions and intercepts use the float32-stored A, so their error is bounded by the
//!   same relative rounding applied to every term: `1e-7 sum_k |coef_ik x_k| + 1e-9 scale`.
//! * r^2 is compared with a bound computed from the prediction tolerance: for each column,
//!   `|dSSE_c| <= 2 sqrt(SSE_c) |e_c| + |e_c|^2` with `|e_c|` the norm of the allowed prediction
//!   errors, divided by `SST_c` and averaged; plus 1e-12. The identity r^2 does not depend on
//!   the fit: 1e-12 relative.
//! * Float32 Gram path (forced): the Gram's entries carry float32 rounding (~1e-7 relative,
//!   times a small growth factor), so coefficients are accurate to about
//!   `cond(scaled Gram) * 1e-6`; the well-conditioned cases have a scaled condition below 1e3, so
//!   `1e-3 max|coef|` on coefficients and predictions, and `1e-4` on r^2. Rank-deficient cases
//!   must be detected and recomputed in float64, and then meet the float64 tolerances.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use jumplens::lens::fit::{fit_all_pairs, FitOptions, FitReport, GramPrecision};
use jumplens::lens::maps::Maps;
use jumplens::lens::r2::{r2_all_pairs, r2_all_pairs_with, r2_score, R2Options};

const CASES: [(&str, usize); 5] = [
    ("well", 16),
    ("outlier", 20),
    ("rank_deficient_n_lt_d", 12),
    ("duplicated_rows", 10),
    ("collinear_cols", 12),
];

struct Case {
    name: String,
    rank: usize,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    coef: Vec<Vec<f64>>,
    coef_intercept: Vec<Vec<f64>>,
    intercept: Vec<f64>,
    pred_val: Vec<Vec<f64>>,
    r2_val: f64,
    r2_val_id: f64,
}

fn fixtures() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lstsq/cases.safetensors");
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture file");
    let get = |c: &str, k: &str| t.get(&format!("{c}.{k}")).expect(k).clone();
    let m64 = |x: Tensor| x.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let v64 = |x: Tensor| x.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    CASES
        .iter()
        .map(|&(c, rank)| Case {
            name: c.to_string(),
            rank,
            x_train: get(c, "x_train"),
            y_train: get(c, "y_train"),
            x_val: get(c, "x_val"),
            y_val: get(c, "y_val"),
            coef: m64(get(c, "coef")),
            coef_intercept: m64(get(c, "coef_intercept")),
            intercept: v64(get(c, "intercept")),
            pred_val: m64(get(c, "pred_val")),
            r2_val: v64(get(c, "r2_val"))[0],
            r2_val_id: v64(get(c, "r2_val_id"))[0],
        })
        .collect()
}

fn stack(x: &Tensor, y: &Tensor) -> Tensor {
    Tensor::stack(&[x, y], 0).unwrap()
}

fn fit(case: &Case, intercept: bool, precision: GramPrecision) -> (Maps, FitReport) {
    let opts = FitOptions {
        intercept,
        precision,
        ..FitOptions::default()
    };
    fit_all_pairs(&stack(&case.x_train, &case.y_train), &[(0, 1)], &opts).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn max_abs(m: &[Vec<f64>]) -> f64 {
    m.iter().flatten().fold(0f64, |a, &b| a.max(b.abs()))
}

/// Checks |a - b| <= rel |b| + abs_frac * max|b| entrywise.
fn check_close(what: &str, a: &[Vec<f64>], b: &[Vec<f64>], rel: f64, abs_frac: f64) {
    let m = max_abs(b);
    let mut worst = 0f64;
    for (ra, rb) in a.iter().zip(b) {
        for (&x, &y) in ra.iter().zip(rb) {
            let tol = rel * y.abs() + abs_frac * m;
            worst = worst.max((x - y).abs() / tol);
        }
    }
    assert!(worst <= 1.0, "{what}: error {worst:.3} x tolerance");
}

/// Prediction tolerance per entry: rel * sum_k |coef_ik x_jk| + abs_frac * max|pred|.
fn pred_tol(coef: &[Vec<f64>], x: &[Vec<f64>], pred: &[Vec<f64>], rel: f64, abs_frac: f64) -> Vec<Vec<f64>> {
    let m = max_abs(pred);
    x.iter()
        .map(|xr| {
            coef.iter()
                .map(|cr| rel * cr.iter().zip(xr).map(|(c, v)| (c * v).abs()).sum::<f64>() + abs_frac * m)
                .collect()
        })
        .collect()
}

/// Bound on |r2(pred + e) - r2(pred)| when |e_jc| <= tol_jc.
fn r2_tol(y: &[Vec<f64>], pred: &[Vec<f64>], tol: &[Vec<f64>]) -> f64 {
    let (n, d) = (y.len(), y[0].len());
    let mut total = 0.0;
    for c in 0..d {
        let mean = y.iter().map(|r| r[c]).sum::<f64>() / n as f64;
        let sst: f64 = y.iter().map(|r| (r[c] - mean).powi(2)).sum();
        let sse: f64 = y.iter().zip(pred).map(|(r, p)| (r[c] - p[c]).powi(2)).sum();
        let e: f64 = tol.iter().map(|t| t[c] * t[c]).sum::<f64>().sqrt();
        total += (2.0 * sse.sqrt() * e + e * e) / sst;
    }
    total / d as f64 + 1e-12
}

fn predict(maps: &Maps, x: &Tensor) -> Vec<Vec<f64>> {
    rows(&maps.predict(0, 1, &x.to_dtype(DType::F64).unwrap()).unwrap())
}

#[test]
fn coef_and_predictions_match_sklearn_f64() {
    for case in fixtures() {
        let (maps, report) = fit(&case, false, GramPrecision::Auto);
        assert_eq!(report.stats.precision, GramPrecision::F64, "{}", case.name);
        let a = rows(&maps.get(0, 1).unwrap().a);
        check_close(&format!("{} coef", case.name), &a, &case.coef, 1e-7, 1e-9);

        let x = rows(&case.x_val);
        let tol = pred_tol(&case.coef, &x, &case.pred_val, 1e-7, 1e-9);
        let pred = predict(&maps, &case.x_val);
        for (i, (pr, rr)) in pred.iter().zip(&case.pred_val).enumerate() {
            for (c, (&p, &r)) in pr.iter().zip(rr).enumerate() {
                assert!((p - r).abs() <= tol[i][c], "{} pred[{i}][{c}]: {p} vs {r}", case.name);
            }
        }

        let diag = &report.layers[0];
        let d = a.len();
        assert_eq!(diag.rank, case.rank, "{} rank", case.name);
        assert_eq!(diag.pseudo_inverse, case.rank < d, "{} pseudo-inverse", case.name);
        if case.rank < d {
            let expected = format!(
                "layer 0: Gram matrix is singular (rank {} of {d}); using the minimum-norm solution",
                case.rank
            );
            assert!(
                report.warnings.contains(&expected),
                "{}: {:?}",
                case.name,
                report.warnings
            );
        } else {
            assert!(report.warnings.is_empty(), "{}: {:?}", case.name, report.warnings);
        }
    }
}

#[test]
fn intercept_matches_sklearn_f64() {
    for case in fixtures() {
        let (maps, _) = fit(&case, true, GramPrecision::Auto);
        let p = maps.get(0, 1).unwrap();
        let a = rows(&p.a);
        check_close(
            &format!("{} coef_intercept", case.name),
            &a,
            &case.coef_intercept,
            1e-7,
            1e-9,
        );
        let b = p
            .intercept
            .as_ref()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // b = mean(y) - A mean(x): the error of A propagates through mean(x).
        let x = rows(&case.x_train);
        let n = x.len() as f64;
        let mx: Vec<f64> = (0..x[0].len())
            .map(|k| x.iter().map(|r| r[k]).sum::<f64>() / n)
            .collect();
        let bmax = case.intercept.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (&got, &want)) in b.iter().zip(&case.intercept).enumerate() {
            let prop: f64 = case.coef_intercept[i].iter().zip(&mx).map(|(c, m)| (c * m).abs()).sum();
            // +1 ulp of f32 for the stored intercept itself.
            let tol = 1e-7 * (prop + want.abs()) + 1e-9 * bmax;
            assert!(
                (got - want).abs() <= tol,
                "{} intercept[{i}]: {got} vs {want} (tol {tol:e})",
                case.name
            );
        }
    }
}

#[test]
fn r2_matches_sklearn() {
    for case in fixtures() {
        let (maps, _) = fit(&case, false, GramPrecision::Auto);
        let table = r2_all_pairs(&stack(&case.x_val, &case.y_val), &maps).unwrap();
        let x = rows(&case.x_val);
        let y = rows(&case.y_val);
        let tol = r2_tol(
            &y,
            &case.pred_val,
            &pred_tol(&case.coef, &x, &case.pred_val, 1e-7, 1e-9),
        );
        let mat = table.mat[0][1].unwrap();
        assert!(
            (mat - case.r2_val).abs() <= tol,
            "{} r2 {mat} vs {} (tol {tol:e})",
            case.name,
            case.r2_val
        );
        let id = table.id[0][1].unwrap();
        assert!(
            (id - case.r2_val_id).abs() <= 1e-12 * case.r2_val_id.abs().max(1.0),
            "{} r2 id {id} vs {}",
            case.name,
            case.r2_val_id
        );
        assert!(table.mat[1][0].is_none() && table.mat[0][0].is_none() && table.id[1][1].is_none());
        // The float32 prediction path gives the same within float32 rounding of the GEMM.
        let opts = R2Options {
            precision: GramPrecision::F32,
            ..R2Options::default()
        };
        let t32 = r2_all_pairs_with(&stack(&case.x_val, &case.y_val), &maps, &opts).unwrap();
        let m32 = t32.mat[0][1].unwrap();
        assert!(
            (m32 - case.r2_val).abs() <= 10.0 * tol + 1e-5,
            "{} f32 r2 {m32} vs {}",
            case.name,
            case.r2_val
        );
        // The stand-alone helper on scikit-learn's own predictions.
        let pv = Tensor::new(case.pred_val.clone(), &Device::Cpu).unwrap();
        let r = r2_score(&case.y_val, &pv).unwrap();
        assert!(
            (r - case.r2_val).abs() <= 1e-12,
            "{} r2_score {r} vs {}",
            case.name,
            case.r2_val
        );
    }
}

#[test]
fn float32_gram_path() {
    for case in fixtures() {
        let (maps, report) = fit(&case, false, GramPrecision::F32);
        assert_eq!(report.stats.precision, GramPrecision::F32);
        let a = rows(&maps.get(0, 1).unwrap().a);
        let d = a.len();
        let diag = &report.layers[0];
        if case.rank < d {
            // Detected, recomputed in float64, minimum-norm: float64 tolerances.
            assert!(diag.recomputed_f64 && diag.pseudo_inverse, "{}: {diag:?}", case.name);
            assert_eq!(diag.rank, case.rank);
            check_close(&format!("{} coef (f32 path)", case.name), &a, &case.coef, 1e-7, 1e-9);
        } else {
            check_close(&format!("{} coef (f32 path)", case.name), &a, &case.coef, 0.0, 1e-3);
        }
        let x = rows(&case.x_val);
        let pred = predict(&maps, &case.x_val);
        let tol = pred_tol(&case.coef, &x, &case.pred_val, 1e-3, 1e-9);
        for (i, (pr, rr)) in pred.iter().zip(&case.pred_val).enumerate() {
            for (c, (&p, &r)) in pr.iter().zip(rr).enumerate() {
                assert!(
                    (p - r).abs() <= tol[i][c],
                    "{} f32 pred[{i}][{c}]: {p} vs {r}",
                    case.name
                );
            }
        }
        let table = r2_all_pairs(&stack(&case.x_val, &case.y_val), &maps).unwrap();
        let r = table.mat[0][1].unwrap();
        assert!(
            (r - case.r2_val).abs() <= 1e-4,
            "{} f32 r2 {r} vs {}",
            case.name,
            case.r2_val
        );
    }
}
