//! The ImageNet path end to end on tiny data: `mfr run` on SD-VAE latents trains, samples
//! through an SD-VAE decoder (the real architecture, random weights) into ADM .npz files, scores
//! them with ADM's five metrics against a reference batch, and renders the report with them.
mod common;
use common::temp_dir;
use meanflow_repro::data::npy;
use meanflow_repro::model::vae::{AutoencoderKl, VaeConfig};
use meanflow_repro::rundir::checkpoint;
use std::path::Path;
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

/// 40 posterior moments (4 mean + 4 std channels, 4 x 4: images of 32 x 32) in the REPA layout.
fn latents(root: &Path) {
    let dir = root.join("vae-sd/00000");
    std::fs::create_dir_all(&dir).unwrap();
    let mut labels = Vec::new();
    for i in 0..40usize {
        let name = format!("img-mean-std-{i:08}.npy");
        let values: Vec<f32> = (0..128)
            .map(|j| {
                if j < 64 {
                    ((i * 13 + j * 5) % 23) as f32 / 4.0 - 2.8
                } else {
                    0.2
                }
            })
            .collect();
        npy::write_f32(&dir.join(&name), &[8, 4, 4], &values).unwrap();
        labels.push(serde_json::json!([format!("00000/{name}"), i % 4]));
    }
    std::fs::write(
        root.join("vae-sd/dataset.json"),
        serde_json::json!({ "labels": labels }).to_string(),
    )
    .unwrap();
}

#[test]
fn a_latent_run_trains_samples_through_the_vae_and_gets_adm_metrics() {
    let root = temp_dir("latent");
    latents(&root.join("data"));
    // The SD-VAE's architecture with random weights, as a diffusers-named safetensors file.
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let _vae = AutoencoderKl::new(&vs.root(), &VaeConfig::sd());
    let vae_file = root.join("vae.safetensors");
    vs.save(&vae_file).unwrap();
    // A reference batch in ADM's format (no stored statistics: they are computed and cached).
    let reference = root.join("ref.npz");
    let images = Tensor::randint(256, [24, 32, 32, 3], (Kind::Uint8, Device::Cpu));
    meanflow_repro::eval::npz::write_images(&reference, &images).unwrap();

    let spec = root.join("latent.toml");
    std::fs::write(
        &spec,
        format!(
            "[experiment]\nname = \"latent\"\ndescription = \"tiny latent pipeline\"\n\
             [model]\npreset = \"micro/2\"\ninput_size = 4\nin_channels = 4\nnum_classes = 4\n\
             [train]\ndata = \"{}\"\nbatch = 8\nepochs = 2\nprecision = \"f32\"\ndevice = \"cpu\"\nlog_every = 1\n\
             [sample]\nschedules = [[1.0, 0.0], [1.0, 0.5, 0.0]]\nnum_samples = 24\nbatch = 8\nvae = \"{}\"\n\
             [eval]\nreference = \"{}\"\nbatch = 12\nsteps = [5]\n\
             [paper]\nrows = [\"table1.default\"]\n",
            root.join("data").display(),
            vae_file.display(),
            reference.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(["run", spec.to_str().unwrap(), "--results"])
        .arg(root.join("results"))
        .env("MFR_CACHE", root.join("cache"))
        .env("MFR_REPORTS", root.join("reports"))
        .env("MFR_DIST", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ADM's printed lines, per schedule.
    assert!(
        stdout.contains("FID:") && stdout.contains("sFID:") && stdout.contains("Recall:"),
        "{stdout}"
    );

    let run = root.join("results/latent/default");
    let npz = run.join("samples/samples-1nfe.npz");
    let mut reader = meanflow_repro::eval::npz::Npz::open(&npz).unwrap();
    let mut arr = reader.images("arr_0").unwrap();
    assert_eq!(arr.len(), 24);
    let first = arr.next_batch(24).unwrap().unwrap();
    assert_eq!(
        first.size(),
        [24, 32, 32, 3],
        "latents 4 x 4 decode to 32 x 32"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("samples/metrics.json")).unwrap())
            .unwrap();
    for nfe in ["1-NFE", "2-NFE"] {
        let adm = &metrics["adm"][nfe];
        for key in ["fid", "sfid", "precision", "recall"] {
            assert!(
                adm[key].as_f64().is_some_and(f64::is_finite),
                "{nfe} {key}: {metrics}"
            );
        }
        assert_eq!(adm["num_samples"], 24);
        assert_eq!(metrics["fid"][nfe], adm["fid"]);
    }
    // eval.steps = [5]: step 5's checkpoint was kept, sampled and scored beside the final one.
    assert!(run
        .join("checkpoints")
        .join(checkpoint::file_name(5))
        .exists());
    assert!(run.join("samples/step-00000005/samples-2nfe.npz").exists());
    let history = metrics["history"].as_array().unwrap();
    let steps: Vec<(u64, &str)> = history
        .iter()
        .map(|h| (h["step"].as_u64().unwrap(), h["nfe"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [(10, "1-NFE"), (10, "2-NFE"), (5, "1-NFE"), (5, "2-NFE")]
    );
    assert!(root.join("reports/latent/plots/fid-by-step.svg").exists());
    let html = std::fs::read_to_string(root.join("reports/latent/index.html")).unwrap();
    // ADM's metrics in the metrics table, and the reference batch's images beside the samples.
    assert!(
        html.contains("Metrics of the final weights") && html.contains("<th>sFID</th>"),
        "{html}"
    );
    assert!(root.join("reports/latent/grids/real-data.png").exists());
    assert!(
        html.contains("table1.default"),
        "the paper row is in the report"
    );
    assert!(root.join("reports/latent/grids/default-1nfe.png").exists());

    // Done stages are skipped on a second run: nothing is recomputed.
    let again = Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(["run", spec.to_str().unwrap(), "--dry-run", "--results"])
        .arg(root.join("results"))
        .env("MFR_CACHE", root.join("cache"))
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&again.stdout);
    for stage in ["train", "sample", "evaluate"] {
        assert!(
            plan.lines()
                .any(|l| l.trim_start().starts_with(stage) && l.contains("done")),
            "{stage} not done: {plan}"
        );
    }
}
