//! The sample stage: a grid per schedule (a column per class), then every schedule's sample
//! batch as an .npz, from the final weights and from each checkpoint of `eval.steps`. Rank 0
//! loads the weights and hands them to the other ranks; batch b is sampled by rank b mod N
//! (from its own seed, as one process would), and rank 0 assembles the .npz.
//!
//! Images come from seeded noise, the method's few-step sampler ([`crate::method::Generator`]:
//! MeanFlow's, or iMF's at the spec's guidance) and the decoder. Batch b draws its noise from seed mix(sample.seed, 1 + b) and takes labels
//! (i mod num_classes) for its global indices i, so any batch can be regenerated alone and the
//! classes are balanced. [`Sampler::write_parts`] writes a sample batch's parts
//! ([`crate::rundir::samples`]), redrawing any that is missing or damaged.
use super::{plan, Run};
use crate::data;
use crate::dist::World;
use crate::method::{Generator, Method};
use crate::model::vae::{self, decode_latents, DecodePrecision};
use crate::progress::Progress;
use crate::rundir::checkpoint;
use crate::rundir::samples::SampleParts;
use crate::spec::{Precision, SampleLabels, SamplePrecision, Spec};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// What sampling needs to know, from a validated spec.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleConfig {
    pub in_channels: i64,
    pub input_size: i64,
    pub num_classes: i64,
    /// The network runs under bf16 autocast.
    pub bf16: bool,
    /// The dtype of the noise (the network's input dtype).
    pub input_kind: Kind,
    pub seed: u64,
    /// Images per batch (and per part file).
    pub batch: i64,
    pub num_samples: i64,
    /// Labels drawn uniformly (from the seed, index by index) rather than balanced.
    pub random_labels: bool,
}

impl SampleConfig {
    pub fn of(spec: &Spec) -> SampleConfig {
        let m = &spec.model;
        SampleConfig {
            in_channels: m.in_channels,
            input_size: m.input_size,
            num_classes: m.num_classes,
            bf16: spec.sample.precision == SamplePrecision::Bf16,
            input_kind: crate::train::input_kind(spec.train.precision),
            random_labels: spec.sample.labels == SampleLabels::Random,
            seed: spec.sample.seed,
            batch: spec.sample.batch,
            num_samples: spec.sample.num_samples,
        }
    }
}

/// The sampling network's precision: float64 where the run trained in it (the CPU checks),
/// otherwise float32 with TF32 off, whatever `train.precision` says: `sample.precision` alone
/// decides (bf16 is autocast over these float32 weights).
fn network_precision(spec: &Spec) -> Precision {
    match spec.train.precision {
        Precision::F64 => Precision::F64,
        _ => Precision::F32,
    }
}

/// What turns the network's output into uint8 NHWC images.
pub enum Decoder {
    /// The data is pixels in [-1, 1] (the demo's digits): 1 channel is repeated to RGB.
    Pixels,
    /// The data is SD-VAE latents times 0.18215; the VAE's shape is its weights'.
    Vae(Box<vae::AutoencoderKl>, tch::nn::VarStore, vae::VaeConfig),
}

impl Decoder {
    /// The SD-VAE named by `sample.vae` (an asset name, fetched into the cache, or a path).
    pub fn vae(name: &str, device: Device) -> Result<Decoder> {
        let path = plan::vae_weights(name)?;
        let (vs, net, cfg) = crate::import::vae::load_as_stored(&path, device)
            .with_context(|| format!("loading the SD-VAE from {}", path.display()))?;
        Ok(Decoder::Vae(Box::new(net), vs, cfg))
    }

    /// The side of the images made from latents of side `latent`.
    pub fn image_side(&self, latent: i64) -> i64 {
        match self {
            Decoder::Pixels => latent,
            Decoder::Vae(_, _, cfg) => latent * cfg.downscale(),
        }
    }

    pub fn images(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Decoder::Pixels => Ok(data::pixels_to_u8(x)),
            Decoder::Vae(net, ..) => decode_latents(net, x, DecodePrecision::Tf32),
        }
    }
}

/// The class labels of global sample indices start..start + n: balanced over the classes
/// (index mod classes), or drawn uniformly, each from (seed, index) alone so that any batch
/// can be drawn again by itself.
pub fn class_labels(start: i64, n: i64, classes: i64, random: Option<u64>) -> Vec<i64> {
    (start..start + n)
        .map(|i| match random {
            None => i % classes,
            Some(seed) => (data::mix(seed, i as u64) % classes as u64) as i64,
        })
        .collect()
}

/// Balanced labels on `device` (sample grids: a column per class).
pub fn labels(start: i64, n: i64, classes: i64, device: Device) -> Tensor {
    Tensor::from_slice(&class_labels(start, n, classes, None)).to_device(device)
}

/// A network, the decoder of its outputs and the device they run on: what makes images.
pub struct Sampler<'a> {
    pub cfg: &'a SampleConfig,
    /// The network with its method's sampler.
    pub net: Generator<'a>,
    pub decoder: &'a Decoder,
    pub device: Device,
}

impl Sampler<'_> {
    fn noise(&self, seed: u64, n: i64) -> Tensor {
        tch::manual_seed(seed as i64);
        let c = self.cfg;
        Tensor::randn(
            [n, c.in_channels, c.input_size, c.input_size],
            (c.input_kind, self.device),
        )
    }

    /// The labels' own seed when they are drawn (apart from the noise's).
    fn label_seed(&self) -> Option<u64> {
        self.cfg
            .random_labels
            .then(|| data::mix(self.cfg.seed, u64::MAX - 1))
    }

    /// Batch `b` of the sample batch (`n` images), uint8 NHWC: its noise is a function of the
    /// seed and b only, its labels of the seed and its indices.
    pub fn batch(&self, schedule: &[f64], b: u64, n: i64) -> Result<Tensor> {
        let noise = self.noise(data::mix(self.cfg.seed, 1 + b), n);
        let start = b as i64 * self.cfg.batch;
        let y = class_labels(start, n, self.cfg.num_classes, self.label_seed());
        let y = Tensor::from_slice(&y).to_device(self.device);
        self.generate(schedule, &noise, &y)
    }

    /// `per_class` images of each of the first `classes` classes, class = index mod classes,
    /// from noise of its own seed: the same for every schedule, so grids compare image for image.
    pub fn grid(&self, schedule: &[f64], classes: i64, per_class: i64) -> Result<Tensor> {
        let n = classes * per_class;
        let noise = self.noise(data::mix(self.cfg.seed, 0), n);
        self.generate(schedule, &noise, &labels(0, n, classes, self.device))
    }

    fn generate(&self, schedule: &[f64], noise: &Tensor, y: &Tensor) -> Result<Tensor> {
        let x = crate::device::autocast_bf16(self.device, self.cfg.bf16, || {
            self.net.sample(noise, y, schedule)
        })?;
        self.decoder.images(&x)
    }

    /// The part files of the sample batch at `npz`.
    pub fn parts(&self, npz: &Path) -> SampleParts {
        let side = self.decoder.image_side(self.cfg.input_size) as usize;
        SampleParts::new(npz, self.cfg.num_samples, self.cfg.batch, [side, side, 3])
    }

    /// Every sample's class label, in order.
    pub fn all_labels(&self) -> Vec<i64> {
        class_labels(
            0,
            self.cfg.num_samples,
            self.cfg.num_classes,
            self.label_seed(),
        )
    }

    /// The `num_samples` samples for `schedule` as an ADM .npz at `path`, resuming from the
    /// part files of an interrupted call. Returns the number of images.
    pub fn write_npz(&self, schedule: &[f64], path: &Path) -> Result<usize> {
        self.write_parts(schedule, path, 0, 1)?;
        self.parts(path).assemble(&self.all_labels())
    }

    /// The part files of the batches b with b mod `ranks` = `rank` (all of them alone) that are
    /// missing or damaged: the ranks of a data-parallel job share the sample batch this way,
    /// then one assembles it.
    pub fn write_parts(
        &self,
        schedule: &[f64],
        path: &Path,
        rank: usize,
        ranks: usize,
    ) -> Result<()> {
        let parts = self.parts(path);
        let mine: Vec<i64> = (0..parts.batches())
            .filter(|b| *b as usize % ranks == rank)
            .collect();
        let todo = parts.missing(mine.iter().copied());
        let images: u64 = mine.iter().map(|&b| parts.size(b) as u64).sum();
        let label = format!("{}-NFE samples", schedule.len() - 1);
        let bar = match rank {
            0 => Progress::new(&label, images, "images"),
            _ => Progress::hidden(),
        };
        bar.start_at(
            mine.iter()
                .filter(|b| !todo.contains(b))
                .map(|&b| parts.size(b) as u64)
                .sum(),
        );
        let total = todo.len();
        for (i, b) in todo.into_iter().enumerate() {
            crate::signals::check(|| {
                format!(
                    "after {i} of {total} {}-NFE sample batches",
                    schedule.len() - 1
                )
            })?;
            let images = self.batch(schedule, b as u64, parts.size(b))?;
            parts.write(b, &images)?;
            bar.inc(parts.size(b) as u64);
        }
        bar.finish();
        Ok(())
    }
}

/// The weights to sample: the final ones (step None) and each intermediate checkpoint's. Rank
/// 0 alone reads the checkpoints; the others learn the steps (and hold no paths).
fn targets(run: &Run, world: &World) -> Result<Vec<(Option<u64>, Option<PathBuf>)>> {
    let main = world.is_main();
    let steps = match main {
        true => plan::intermediate(run),
        false => Vec::new(),
    };
    let shared = world.share(
        &std::iter::once(steps.len() as i64)
            .chain(steps.iter().map(|(s, _)| *s as i64))
            .chain(std::iter::repeat_n(
                0,
                run.spec.eval.steps.len() - steps.len(),
            ))
            .collect::<Vec<_>>(),
        "the steps to sample",
    )?;
    let count = shared[0] as usize;
    let mut targets = vec![(None, plan::weights(run).filter(|_| main))];
    for (i, step) in shared[1..=count].iter().enumerate() {
        targets.push((Some(*step as u64), steps.get(i).map(|(_, p)| p.clone())));
    }
    Ok(targets)
}

/// The EMA weights of the checkpoint at `path` into `vs`, but for those the method does not
/// sample with (iMF's v-head: the network is built without it, and inference checkpoints lack
/// it).
fn load_ema(vs: &tch::nn::VarStore, path: &Path, method: &Method) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = checkpoint::read_tensors(path)?
        .into_iter()
        .filter(|(k, _)| {
            !k.strip_prefix(checkpoint::EMA)
                .is_some_and(|n| method.unused_for_sampling(n))
        })
        .collect();
    crate::model::load_state_dict(vs, &tensors, checkpoint::EMA, &path.display().to_string())
}

/// Rows of a pixel-space grid (images per class), and how much each pixel is enlarged.
pub const GRID_ROWS_PIXELS: i64 = 10;
pub const ZOOM_PIXELS: u32 = 6;

pub fn stage(run: &Run, world: &World) -> Result<()> {
    let spec = run.spec;
    let main = world.is_main();
    let device = world.device(crate::device::parse(&spec.train.device)?);
    tch::manual_seed(data::mix(spec.train.seed, u64::MAX) as i64);
    let method = spec.method().for_sampling();
    let (vs, net) = crate::train::method_network(&method, network_precision(spec), device, 1.0)?;
    let load = |path: Option<&Path>| -> Result<()> {
        if main {
            let path = path.context("no finished training to sample from")?;
            load_ema(&vs, path, &method)?;
        }
        if let Some(group) = world.group() {
            let weights: Vec<tch::Tensor> = crate::model::sorted_variables(&vs)
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            group.broadcast(&weights, 0, "rank 0's EMA weights")?;
        }
        Ok(())
    };
    let pixels = data::is_pixels(&spec.train.data);
    let decoder = match pixels {
        true => Decoder::Pixels,
        false => Decoder::vae(&spec.sample.vae, device)?,
    };
    let cfg = SampleConfig::of(spec);
    let sampler = Sampler {
        cfg: &cfg,
        net: method.generator(&net)?,
        decoder: &decoder,
        device,
    };
    let targets = targets(run, world)?;
    for (step, path) in &targets {
        load(path.as_deref())?;
        if main && step.is_none() {
            std::fs::create_dir_all(run.dir.samples())
                .with_context(|| format!("{}: cannot create", run.dir.samples().display()))?;
            let classes = spec.model.num_classes.min(10);
            let (per_class, zoom) = match pixels {
                true => (GRID_ROWS_PIXELS, ZOOM_PIXELS),
                false => (4, 1),
            };
            for schedule in &spec.sample.schedules {
                let images = sampler.grid(schedule, classes, per_class)?;
                let path = run.dir.grid(schedule.len() - 1);
                crate::report::sample_grid(&images, classes, zoom, &path)?;
                println!("  grid: {}", path.display());
            }
        }
        for schedule in &spec.sample.schedules {
            let npz = run.dir.samples_npz(*step, schedule.len() - 1);
            sampler.write_parts(schedule, &npz, world.rank, world.size)?;
        }
        world.barrier("every rank's sample batches")?;
        if main {
            for schedule in &spec.sample.schedules {
                let parts = sampler.parts(&run.dir.samples_npz(*step, schedule.len() - 1));
                let n = parts.assemble(&sampler.all_labels())?;
                println!("  samples: {} ({n} images)", parts.npz().display());
            }
        }
    }
    if main {
        let weights = targets[0].1.as_ref().expect("checked when loading");
        run.dir
            .write_sample_inputs(&plan::sample_inputs(spec, weights))?;
    }
    Ok(())
}
