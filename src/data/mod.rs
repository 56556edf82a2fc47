//! Training data: datasets, the per-epoch order, and a loader that assembles batches in
//! background threads so the device never waits on files.
pub mod digits;
pub mod latents;
pub mod npy;
pub mod prepare;

use anyhow::{bail, Result};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::{Kind, Tensor};

/// SD-VAE latent scale (no bias), as the paper and both public implementations use.
pub const LATENT_SCALE: f64 = 0.18215;

pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Shape of one stored sample: (C, H, W), or (2C, H, W) of posterior moments.
    fn stored_shape(&self) -> [i64; 3];
    fn num_classes(&self) -> i64;
    /// Copies sample `index` into `out` and returns its class.
    fn read(&self, index: usize, out: &mut [f32]) -> Result<i64>;
    /// Whether samples are VAE posterior moments (mean, std) to be sampled each step.
    fn is_posterior(&self) -> bool;
}

/// Whether `data` names pixel data (the bundled digits) rather than SD-VAE latents; decides how
/// samples become images without opening the data.
pub fn is_pixels(data: &str) -> bool {
    data == "digits"
}

/// Pixel-space samples in [-1, 1], (N, 1 or 3, H, W), as uint8 RGB NHWC.
pub fn pixels_to_u8(images: &Tensor) -> Tensor {
    let rgb = if images.size()[1] == 1 {
        images.repeat([1, 3, 1, 1])
    } else {
        images.shallow_clone()
    };
    ((rgb.to_kind(Kind::Float).clamp(-1.0, 1.0) + 1.0) * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
}

/// The file the digits are read from (reports give its hash).
pub fn digits_file() -> Result<std::path::PathBuf> {
    digits::locate()
}

/// `digits` is the bundled demo data; anything else is a directory in the REPA latent layout.
pub fn open(data: &str) -> Result<Arc<dyn Dataset>> {
    let ds: Arc<dyn Dataset> = match data {
        "digits" => Arc::new(digits::Digits::open()?),
        dir => Arc::new(latents::Latents::open(Path::new(dir))?),
    };
    if ds.is_empty() {
        bail!("{data}: the dataset is empty");
    }
    Ok(ds)
}

/// The model input from a batch of stored samples: the samples themselves, or a posterior draw
/// (mean + std * eps) * 0.18215 from torch's generator (so a step's seed fixes it).
pub fn model_input(ds: &dyn Dataset, stored: &Tensor) -> Tensor {
    let n = stored.size()[0];
    model_input_rows(
        ds,
        stored,
        &Tensor::arange(n, (Kind::Int64, stored.device())),
        n,
    )
}

/// [`model_input`] for a process that holds rows `rows` of a step's batch of `global` samples
/// (data parallelism): eps is drawn for the whole global batch and this process keeps its rows,
/// so N processes draw what one process would.
pub fn model_input_rows(ds: &dyn Dataset, stored: &Tensor, rows: &Tensor, global: i64) -> Tensor {
    if !ds.is_posterior() {
        return stored.shallow_clone();
    }
    let halves = stored.chunk(2, 1);
    let mut shape = halves[0].size();
    let local = shape[0];
    shape[0] = global;
    let eps = Tensor::randn(shape, (halves[0].kind(), halves[0].device()));
    let eps = if global == local {
        eps
    } else {
        eps.index_select(0, &rows.to_device(eps.device()))
    };
    (&halves[0] + &halves[1] * eps) * LATENT_SCALE
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit value mixed from a seed and a counter, for per-step and per-epoch seeds.
pub fn mix(seed: u64, counter: u64) -> u64 {
    let mut s = seed ^ splitmix64(&mut counter.clone());
    splitmix64(&mut s)
}

/// The order of epoch `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch), independent of
/// torch so that the data order is reproducible from the checkpointed step alone.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = mix(seed, epoch);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

pub struct Batch {
    pub step: u64,
    pub x: Tensor,
    pub labels: Tensor,
}

/// Batches for steps start, start + 1, ... (each epoch drops its last partial batch), built by
/// `workers` threads; worker w builds the steps congruent to w and hands them over in order.
pub struct Loader {
    receivers: Vec<Receiver<Result<Batch>>>,
    next: u64,
    _workers: Vec<JoinHandle<()>>,
}

impl Loader {
    pub fn steps_per_epoch(ds: &dyn Dataset, batch: usize) -> u64 {
        (ds.len() / batch) as u64
    }

    pub fn new(
        ds: Arc<dyn Dataset>,
        batch: usize,
        seed: u64,
        start: u64,
        workers: usize,
    ) -> Result<Self> {
        Self::with_rows(ds, batch, (0..batch).collect(), seed, start, workers)
    }

    /// Batches of only the rows `rows` (indices into each step's batch of `batch` samples, in
    /// the order given): one data-parallel process's share of the global batch.
    pub fn with_rows(
        ds: Arc<dyn Dataset>,
        batch: usize,
        rows: Vec<usize>,
        seed: u64,
        start: u64,
        workers: usize,
    ) -> Result<Self> {
        if let Some(r) = rows.iter().find(|&&r| r >= batch) {
            bail!("row {r} of a batch of {batch}");
        }
        let rows = Arc::new(rows);
        let per_epoch = Self::steps_per_epoch(ds.as_ref(), batch);
        if per_epoch == 0 {
            bail!(
                "the dataset has {} samples, fewer than one batch of {batch}",
                ds.len()
            );
        }
        let workers = workers.max(1) as u64;
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for w in 0..workers {
            let (tx, rx) = sync_channel(2);
            let ds = ds.clone();
            let rows = rows.clone();
            // The first step this worker owns at or after `start`.
            let first = start + (w + workers - start % workers) % workers;
            handles.push(std::thread::spawn(move || {
                let [c, h, wd] = ds.stored_shape();
                let size = (c * h * wd) as usize;
                let mut order = (u64::MAX, Vec::new());
                let mut step = first;
                loop {
                    let epoch = step / per_epoch;
                    if order.0 != epoch {
                        order = (epoch, epoch_order(ds.len(), seed, epoch));
                    }
                    let at = ((step % per_epoch) as usize) * batch;
                    let n = rows.len();
                    let mut values = vec![0f32; n * size];
                    let mut labels = Vec::with_capacity(n);
                    let built = rows
                        .iter()
                        .map(|&r| order.1[at + r])
                        .zip(values.chunks_exact_mut(size))
                        .try_for_each(|(i, out)| ds.read(i, out).map(|l| labels.push(l)))
                        .map(|()| Batch {
                            step,
                            x: Tensor::from_slice(&values).view([n as i64, c, h, wd]),
                            labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
                        });
                    let failed = built.is_err();
                    if tx.send(built).is_err() || failed {
                        return;
                    }
                    step += workers;
                }
            }));
            receivers.push(rx);
        }
        Ok(Self {
            receivers,
            next: start,
            _workers: handles,
        })
    }

    /// The next batch in step order.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let rx = &self.receivers[(self.next % self.receivers.len() as u64) as usize];
        let batch = rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the data loader stopped"))??;
        debug_assert_eq!(batch.step, self.next);
        self.next += 1;
        Ok(batch)
    }
}
