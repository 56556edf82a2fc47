//! `mfr`: argument parsing and dispatch only.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use meanflow_repro::{bench, device, spec::Precision, spec::Spec};
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
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment spec (train, sample, evaluate, report).
    Run {
        spec: PathBuf,
        /// Print the resolved spec, its sha256 and the plan, and stop.
        #[arg(long)]
        dry_run: bool,
    },
    /// Time a component on random data and report JSON.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// MeanFlow training steps (loss, JVP, backward, AdamW) on random latents.
    Train {
        #[arg(long, default_value = "SiT-B/4")]
        model: String,
        #[arg(long, default_value_t = 256)]
        batch: i64,
        #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
        precision: PrecisionArg,
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value_t = 4)]
        warmup: usize,
        #[arg(long, default_value_t = 15)]
        steps: usize,
        #[arg(long, default_value_t = 3.0)]
        omega: f64,
        #[arg(long, default_value_t = 0.0)]
        kappa: f64,
        /// Gradient-norm clip (the PyTorch port's 1.0; 0 disables).
        #[arg(long, default_value_t = 1.0)]
        grad_clip: f64,
        /// Also write the result to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Bf16,
    F32,
    Tf32,
    F64,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Tf32 => Precision::Tf32,
            PrecisionArg::F64 => Precision::F64,
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { spec, dry_run } => {
            let resolved = Spec::load(&spec)?;
            println!(
                "# {} (sha256 {})\n{}",
                spec.display(),
                resolved.sha256(),
                resolved.to_toml()
            );
            if !dry_run {
                bail!("training is not implemented yet: only `mfr run SPEC --dry-run` works in this version");
            }
            Ok(())
        }
        Command::Bench {
            what:
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
                    json,
                },
        } => {
            let b = bench::TrainBench {
                model,
                batch,
                precision: precision.into(),
                device: device::parse(&device)?,
                warmup,
                steps,
                omega,
                kappa,
                grad_clip,
            };
            let result = serde_json::to_string_pretty(&bench::train(&b)?)?;
            println!("{result}");
            if let Some(path) = json {
                std::fs::write(&path, result + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}
