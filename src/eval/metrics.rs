//! The metrics' arithmetic, on feature matrices (N, D).
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

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

/// Whether a mean and covariance hold only finite numbers (LAPACK's eigensolver fails, a panic in
/// tch, on NaN).
fn finite(s: &Stats) -> bool {
    s.mu.isfinite().all().int64_value(&[]) == 1 && s.sigma.isfinite().all().int64_value(&[]) == 1
}

const NOT_FINITE: &str = "the feature statistics are not finite: the features hold NaN or inf (are the Inception weights right?)";

/// A reference's statistics with what every FID against it shares: R = sqrt(sigma_r), one d x d
/// eigendecomposition (seconds at d = 2048 on a CPU) taken once instead of once per FID.
///
/// tr(sqrtm(sigma_r S)) is the trace of the square root of R S R, a symmetric positive
/// semi-definite matrix with the same spectrum: symmetric eigensolvers in float64, always real.
pub struct Reference {
    mu: Tensor,
    root: Tensor,
    trace: f64,
}

impl Reference {
    pub fn new(stats: &Stats) -> Result<Self> {
        if !finite(stats) {
            bail!("{NOT_FINITE}");
        }
        let sigma = stats.sigma.to_kind(Kind::Double);
        let (w, v) = sigma.linalg_eigh("L");
        Ok(Self {
            mu: stats.mu.to_kind(Kind::Double),
            root: (&v * w.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&v.transpose(0, 1)),
            trace: sigma.trace().double_value(&[]),
        })
    }

    pub fn to_device(&self, device: Device) -> Self {
        Self {
            mu: self.mu.to_device(device),
            root: self.root.to_device(device),
            trace: self.trace,
        }
    }

    fn dim(&self) -> i64 {
        self.mu.size()[0]
    }

    /// FID against another side's statistics.
    pub fn distance(&self, other: &Stats) -> Result<f64> {
        if other.mu.size() != [self.dim()] {
            bail!(
                "statistics of different dimensions: {:?} and {:?}",
                self.mu.size(),
                other.mu.size()
            );
        }
        if !finite(other) {
            bail!("{NOT_FINITE}");
        }
        let sigma = other.sigma.to_kind(Kind::Double);
        let m = self.root.matmul(&sigma).matmul(&self.root);
        Ok(self.total(
            &other.mu.to_kind(Kind::Double),
            sigma.trace().double_value(&[]),
            trace_sqrt(&m),
        ))
    }

    /// FID of a sample's features (n, d) against the reference: through the n x n eigenproblem
    /// when n <= d, else through the sample's covariance (fewer operations than projecting).
    pub fn fid(&self, features: &Tensor) -> Result<f64> {
        match features.size2()? {
            (n, d) if n > d => self.distance(&Stats::of(features)?),
            _ => self.project(features)?.fid(None),
        }
    }

    /// The sample's features beside their product with R, for its FID or any draw's.
    pub fn project(&self, features: &Tensor) -> Result<Projected<'_>> {
        let x = features.to_kind(Kind::Double).to_device(self.root.device());
        let (n, d) = x.size2()?;
        if d != self.dim() {
            bail!(
                "features of width {d} against statistics of width {}",
                self.dim()
            );
        }
        if n < 2 {
            bail!("statistics need at least 2 samples, got {n}");
        }
        if x.isfinite().all().int64_value(&[]) != 1 {
            bail!("{NOT_FINITE}");
        }
        let y = x.matmul(&self.root);
        Ok(Projected {
            reference: self,
            x,
            y,
        })
    }

    fn total(&self, mu: &Tensor, trace_s: f64, trace_sqrt: f64) -> f64 {
        let diff = mu - &self.mu;
        diff.dot(&diff).double_value(&[]) + self.trace + trace_s - 2.0 * trace_sqrt
    }
}

/// A sample's features X (n, d) and Y = X R. A draw of rows has R S R = A^T A with
/// A = (Y - mean Y) / sqrt(n - 1) over the drawn rows, so tr sqrt(R S R) needs no d x d product:
/// with fewer rows than features (a small-sample FID) it is the trace of the square root of the
/// n x n matrix A A^T, which has the same nonzero eigenvalues.
pub struct Projected<'a> {
    reference: &'a Reference,
    x: Tensor,
    y: Tensor,
}

impl Projected<'_> {
    /// FID of the rows `rows` (a draw, repeats allowed), or of every row.
    pub fn fid(&self, rows: Option<&Tensor>) -> Result<f64> {
        let pick = |t: &Tensor| rows.map_or_else(|| t.shallow_clone(), |i| t.index_select(0, i));
        let (x, y) = (pick(&self.x), pick(&self.y));
        let (n, d) = x.size2()?;
        let mu = x.mean_dim(0, false, None::<Kind>);
        let trace_s = (&x - &mu).square().sum(Kind::Double).double_value(&[]) / (n - 1) as f64;
        let a = (&y - y.mean_dim(0, true, None::<Kind>)) / ((n - 1) as f64).sqrt();
        let gram = if n <= d {
            a.matmul(&a.transpose(0, 1))
        } else {
            a.transpose(0, 1).matmul(&a)
        };
        let fid = self.reference.total(&mu, trace_s, trace_sqrt(&gram));
        if !fid.is_finite() {
            bail!("the Frechet distance is not finite (non-finite features?)");
        }
        Ok(fid)
    }
}

/// The sum of the square roots of a symmetric positive semi-definite matrix's eigenvalues (made
/// exactly symmetric first; rounding's negative eigenvalues count as zero).
fn trace_sqrt(m: &Tensor) -> f64 {
    ((m + m.transpose(0, 1)) / 2.0)
        .linalg_eigvalsh("L")
        .clamp_min(0.0)
        .sqrt()
        .sum(Kind::Double)
        .double_value(&[])
}

/// FID = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)). As ADM does when the square
/// root is not finite, it is retried with 1e-6 added to both diagonals.
pub fn frechet_distance(a: &Stats, b: &Stats) -> Result<f64> {
    let fid = Reference::new(a)?.distance(b)?;
    if fid.is_finite() {
        return Ok(fid);
    }
    let eye = Tensor::eye(a.sigma.size()[0], (Kind::Double, a.sigma.device())) * 1e-6;
    let nudged = |s: &Stats| Stats {
        mu: s.mu.shallow_clone(),
        sigma: &s.sigma + &eye,
    };
    let fid = Reference::new(&nudged(a))?.distance(&nudged(b))?;
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

/// The neighbours of ADM's precision and recall (its ManifoldEstimator's k).
pub const NEIGHBOURS: i64 = 3;

/// The fewest samples every metric can be computed on: each point needs its k-th neighbour
/// besides itself for precision and recall (FID needs 2).
pub const MIN_SAMPLES: i64 = NEIGHBOURS + 1;

/// Improved precision and recall (Kynkaanniemi et al.) with k nearest neighbours, as ADM's
/// ManifoldEstimator: precision = share of samples inside the reference manifold, recall = share
/// of references inside the sample manifold. Computed in the features' dtype.
pub fn precision_recall(reference: &Tensor, samples: &Tensor, k: i64) -> Result<(f64, f64)> {
    for (what, set) in [("reference", reference), ("sample", samples)] {
        let n = set.size()[0];
        if n < k + 1 {
            bail!("precision and recall with k = {k} need at least {} images in each set; the {what} set has {n}", k + 1);
        }
    }
    let (r_radii, s_radii) = (radii(reference, k), radii(samples, k));
    Ok((
        coverage(samples, reference, &r_radii),
        coverage(reference, samples, &s_radii),
    ))
}
