//! The metrics' arithmetic, on feature matrices (N, D).
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Mean and unbiased covariance of activations, in float64 (float32 statistics give wrong FIDs).
pub struct Stats {
    pub mu: Tensor,
    pub sigma: Tensor,
}

impl Stats {
    pub fn of(acts: &Tensor) -> Result<Self> {
        let acts = acts.to_kind(Kind::Double);
        let n = acts.size()[0];
        if n < 2 {
            bail!("statistics need at least 2 samples, got {n}");
        }
        let mu = acts.mean_dim(0, false, None::<Kind>);
        let centred = &acts - &mu;
        let sigma = centred.transpose(0, 1).matmul(&centred) / (n - 1) as f64;
        Ok(Self { mu, sigma })
    }
}

/// tr(sqrtm(s1 s2)) as the sum of the square roots of the eigenvalues of sqrt(s1) s2 sqrt(s1), a
/// symmetric positive semi-definite matrix with the same spectrum as s1 s2: two symmetric
/// eigendecompositions in float64, always real.
fn trace_sqrt_product(s1: &Tensor, s2: &Tensor) -> f64 {
    let (w, v) = s1.linalg_eigh("L");
    let root = (&v * w.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&v.transpose(0, 1));
    let m = root.matmul(s2).matmul(&root);
    let m = (&m + m.transpose(0, 1)) / 2.0;
    m.linalg_eigvalsh("L")
        .clamp_min(0.0)
        .sqrt()
        .sum(Kind::Double)
        .double_value(&[])
}

/// FID = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)). As ADM does when the square
/// root is not finite, it is retried with 1e-6 added to both diagonals.
pub fn frechet_distance(a: &Stats, b: &Stats) -> Result<f64> {
    if a.mu.size() != b.mu.size() {
        bail!(
            "statistics of different dimensions: {:?} and {:?}",
            a.mu.size(),
            b.mu.size()
        );
    }
    // LAPACK's eigensolver fails (a panic in tch) on NaN: say what is wrong instead.
    let finite = |s: &Stats| {
        s.mu.isfinite().all().int64_value(&[]) == 1
            && s.sigma.isfinite().all().int64_value(&[]) == 1
    };
    if !finite(a) || !finite(b) {
        bail!("the feature statistics are not finite: the features hold NaN or inf (are the Inception weights right?)");
    }
    let diff = &a.mu - &b.mu;
    let base = diff.dot(&diff).double_value(&[])
        + a.sigma.trace().double_value(&[])
        + b.sigma.trace().double_value(&[]);
    let mut covmean = trace_sqrt_product(&a.sigma, &b.sigma);
    if !covmean.is_finite() {
        let eye = Tensor::eye(a.sigma.size()[0], (Kind::Double, a.sigma.device())) * 1e-6;
        covmean = trace_sqrt_product(&(&a.sigma + &eye), &(&b.sigma + &eye));
    }
    let fid = base - 2.0 * covmean;
    if !fid.is_finite() {
        bail!("the Frechet distance is not finite (non-finite statistics?)");
    }
    Ok(fid)
}

/// Inception Score of classifier logits (N, C): softmax in float64, splits of `split` samples
/// taken in order, exp(mean KL(p(y|x) || p(y))) per split; (mean, std) over the splits.
pub fn inception_score(logits: &Tensor, split: i64) -> (f64, f64) {
    let p = logits.to_kind(Kind::Double).softmax(1, None::<Kind>);
    let n = p.size()[0];
    let scores: Vec<f64> = (0..n)
        .step_by(split as usize)
        .map(|start| {
            let part = p.narrow(0, start, split.min(n - start));
            let py = part.mean_dim(0, true, None::<Kind>);
            let kl = (&part * (part.log() - py.log())).sum_dim_intlist(1, false, None::<Kind>);
            kl.mean(None::<Kind>).exp().double_value(&[])
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / scores.len() as f64;
    (mean, var.sqrt())
}

/// Rows at a time when forming pairwise distances (10K x 50K would not fit at once).
const ROWS: i64 = 1024;

/// Squared L2 distances (rows of a) x (rows of b).
fn squared_distances(a: &Tensor, b: &Tensor) -> Tensor {
    let (na, nb) = (
        a.square().sum_dim_intlist(1, true, None::<Kind>),
        b.square().sum_dim_intlist(1, false, None::<Kind>),
    );
    let cross: Tensor = a.matmul(&b.transpose(0, 1)) * 2.0;
    (na + nb.unsqueeze(0) - cross).clamp_min(0.0)
}

/// Each point's squared distance to its k-th nearest neighbour in its own set (itself excluded).
fn radii(points: &Tensor, k: i64) -> Tensor {
    let n = points.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(ROWS as usize)
        .map(|s| {
            squared_distances(&points.narrow(0, s, ROWS.min(n - s)), points)
                .kthvalue(k + 1, 1, false)
                .0
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// Share of `queries` inside at least one ball (centre, radius) of the manifold.
fn coverage(queries: &Tensor, centres: &Tensor, radii: &Tensor) -> f64 {
    let n = queries.size()[0];
    let inside: i64 = (0..n)
        .step_by(ROWS as usize)
        .map(|s| {
            let d = squared_distances(&queries.narrow(0, s, ROWS.min(n - s)), centres);
            d.le_tensor(&radii.unsqueeze(0))
                .any_dim(1, false)
                .sum(Kind::Int64)
                .int64_value(&[])
        })
        .sum();
    inside as f64 / n as f64
}

/// Improved precision and recall (Kynkaanniemi et al.) with k nearest neighbours, as ADM's
/// ManifoldEstimator: precision = share of samples inside the reference manifold, recall = share
/// of references inside the sample manifold. Computed in the features' dtype.
pub fn precision_recall(reference: &Tensor, samples: &Tensor, k: i64) -> (f64, f64) {
    let (r_radii, s_radii) = (radii(reference, k), radii(samples, k));
    (
        coverage(samples, reference, &r_radii),
        coverage(reference, samples, &s_radii),
    )
}
