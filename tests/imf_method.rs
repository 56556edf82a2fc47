//! `method = "imf"`: the iMF experiments resolve, keys of the other method are refused, and a
//! tiny iMF run goes through `mfr run` (train, sample at the spec's guidance, decode, score),
//! its samples equal to what src/imf/sampler.rs makes from the run's EMA weights.
mod common;
use common::temp_dir;
use meanflow_repro::data::{self, npy};
use meanflow_repro::imf::{self, LatentNorm, SamplingGuidance};
use meanflow_repro::method::Method;
use meanflow_repro::model::vae::{self, AutoencoderKl, DecodePrecision, VaeConfig};
use meanflow_repro::model::{load_state_dict, ImfDiT};
use meanflow_repro::rundir::checkpoint;
use meanflow_repro::spec::{self, Spec};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

fn experiment(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("experiments/{name}.toml"))
}

fn guidance(omega: f64, t_min: f64, t_max: f64) -> SamplingGuidance {
    SamplingGuidance {
        omega,
        t_min,
        t_max,
    }
}

#[test]
fn the_four_imf_experiments_resolve_with_the_official_settings() {
    let b2 = guidance(8.0, 0.4, 0.65);
    let ml = guidance(10.5, 0.4, 0.6);
    let cases = [
        ("imf-b2", "iMF-B/2", 12, vec![(1, b2)]),
        ("imf-m2", "iMF-M/2", 24, vec![(1, ml)]),
        ("imf-l2", "iMF-L/2", 32, vec![(1, ml)]),
        (
            "imf-xl2",
            "iMF-XL/2",
            48,
            vec![
                (1, guidance(8.0, 0.42, 0.62)),
                (2, guidance(4.0, 0.36, 0.64)),
            ],
        ),
        ("imf-b2-public", "iMF-B/2", 12, vec![(1, b2)]),
    ];
    for (name, preset, depth, want) in cases {
        let s = Spec::load(&experiment(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.method, spec::Method::Imf, "{name}");
        assert_eq!(s.model.preset.as_deref(), Some(preset));
        let Method::Imf {
            model,
            objective,
            guidance,
            latents,
        } = s.method()
        else {
            panic!("{name}: not an iMF method");
        };
        assert_eq!((model.depth, model.aux_head_depth), (depth, 8), "{name}");
        assert_eq!(objective, imf::ImfConfig::official(), "{name}");
        assert_eq!(guidance, want, "{name}");
        assert_eq!(latents, LatentNorm::PerChannel, "{name}");
        // The resolved text reads back to the same spec, without a [meanflow] section.
        let text = s.to_toml();
        assert!(!text.contains("[meanflow]"), "{name}: {text}");
        assert_eq!(Spec::parse(&text, name).unwrap(), s, "{name}");
    }
}

const IMF: &str =
    "method = \"imf\"\n[experiment]\nname = \"x\"\n[model]\npreset = \"iMF-micro/2\"\n";
const MEANFLOW: &str = "[experiment]\nname = \"x\"\n[model]\npreset = \"micro/2\"\n";

fn refused(src: &str) -> String {
    Spec::parse(src, "t.toml").unwrap_err().to_string()
}

#[test]
fn keys_of_the_other_method_are_refused_with_the_key() {
    let e = refused(&format!("{IMF}[meanflow]\nomega = 2.0\n"));
    assert!(
        e.contains("`meanflow.omega`") && e.contains("method = \"imf\""),
        "{e}"
    );
    let e = refused(&format!("{IMF}embedder_init = \"official\"\n"));
    assert!(e.contains("`model.embedder_init`"), "{e}");
    let e = refused(&format!("{MEANFLOW}[imf]\ns_max = 3.0\n"));
    assert!(
        e.contains("`imf`") && e.contains("method = \\\"imf\\\"") || e.contains("method = \"imf\""),
        "{e}"
    );
    // Presets belong to their method.
    let e =
        refused("method = \"imf\"\n[experiment]\nname = \"x\"\n[model]\npreset = \"SiT-B/2\"\n");
    assert!(e.contains("`model.preset`") && e.contains("iMF-B/2"), "{e}");
    let e = refused("[experiment]\nname = \"x\"\n[model]\npreset = \"iMF-B/2\"\n");
    assert!(e.contains("`model.preset`") && e.contains("SiT-B/4"), "{e}");
}

#[test]
fn an_unknown_method_is_refused_with_the_list() {
    let e = refused(&MEANFLOW.replace("[experiment]", "method = \"alpha\"\n[experiment]"));
    assert!(
        e.contains("alpha") && e.contains("meanflow") && e.contains("imf"),
        "{e}"
    );
}

#[test]
fn imf_settings_are_checked() {
    // One guidance per schedule, or one for all.
    let two = format!("{IMF}[imf]\nguidance = [{{ omega = 2.0, t_min = 0.0, t_max = 1.0 }}, {{ omega = 3.0, t_min = 0.0, t_max = 1.0 }}, {{ omega = 3.0, t_min = 0.0, t_max = 1.0 }}]\n");
    assert!(refused(&two).contains("`imf.guidance`"));
    let low = format!("{IMF}[imf]\nguidance = [{{ omega = 0.5, t_min = 0.0, t_max = 1.0 }}]\n");
    assert!(refused(&low).contains(">= 1"));
    let typo = format!("{IMF}[imf]\nguidance = [{{ omega = 2.0, tmin = 0.0, t_max = 1.0 }}]\n");
    assert!(refused(&typo).contains("tmin"));
    assert!(refused(&format!("{IMF}[imf]\ns_max = -1.0\n")).contains("`imf.s_max`"));
    let one = Spec::parse(
        &format!("{IMF}[imf]\nguidance = [{{ omega = 2.0, t_min = 0.1, t_max = 0.9 }}]\n"),
        "t",
    )
    .unwrap();
    let Method::Imf { guidance: g, .. } = one.method() else {
        panic!("iMF")
    };
    assert_eq!(
        g,
        vec![(1, guidance(2.0, 0.1, 0.9)), (2, guidance(2.0, 0.1, 0.9))]
    );
}

#[test]
fn a_method_sweep_makes_a_run_of_each_method() {
    let src = "[experiment]\nname = \"x\"\n[model]\ndepth = 2\nhidden_size = 32\nnum_heads = 2\npatch_size = 2\n[sweep]\nmethod = [\"meanflow\", \"imf\"]\n";
    let s = Spec::parse(src, "t").unwrap();
    let points = s.points("t").unwrap();
    let names: Vec<&str> = points.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["method=meanflow", "method=imf"]);
    assert!(matches!(points[0].1.method(), Method::MeanFlow { .. }));
    let Method::Imf { model, .. } = points[1].1.method() else {
        panic!("the second point is iMF")
    };
    // Without a preset the heads take half the blocks, as iMF-micro/2 and iMF-tiny/2 do.
    assert_eq!((model.depth, model.aux_head_depth), (2, 1));
}

/// 40 posterior moments (4 + 4 channels, 4 x 4) in the REPA layout, labels in 0..4.
fn latents(root: &Path) {
    let dir = root.join("vae-sd/00000");
    std::fs::create_dir_all(&dir).unwrap();
    let mut labels = Vec::new();
    for i in 0..40usize {
        let name = format!("img-mean-std-{i:08}.npy");
        let values: Vec<f32> = (0..128)
            .map(|j| match j < 64 {
                true => ((i * 13 + j * 5) % 23) as f32 / 4.0 - 2.8,
                false => 0.2,
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

/// The EMA network of a checkpoint as src/imf/sampler.rs takes it (no v-head).
fn ema_network(spec: &Spec, path: &Path) -> (nn::VarStore, ImfDiT) {
    let mut config = spec.imf_model_config();
    config.v_head = false;
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ImfDiT::new(&vs.root(), &config).unwrap();
    let ema: Vec<(String, Tensor)> = checkpoint::read_tensors(path)
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("ema.")?.to_owned(), t)))
        .filter(|(k, _)| !k.starts_with("net.v_heads."))
        .collect();
    load_state_dict(&vs, &ema, "", "the run's EMA").unwrap();
    (vs, net)
}

/// Latent data, an SD-VAE (random weights) and a reference batch under `root`; the decoder.
fn inputs(root: &Path) -> AutoencoderKl {
    latents(&root.join("data"));
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let vae_net = AutoencoderKl::new(&vs.root(), &VaeConfig::sd());
    vs.save(root.join("vae.safetensors")).unwrap();
    let images = Tensor::randint(256, [24, 32, 32, 3], (Kind::Uint8, Device::Cpu));
    meanflow_repro::eval::npz::write_images(&root.join("ref.npz"), &images).unwrap();
    vae_net
}

/// An iMF-micro/2 spec over [`inputs`], sampling 1-NFE at omega 3 on [0.2, 0.8] and 2-NFE at
/// 1.5 on [0, 1]; `extra` goes into [model].
fn write_spec(root: &Path, name: &str, extra: &str) -> PathBuf {
    let file = root.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "method = \"imf\"\n[experiment]\nname = \"{name}\"\n\
             [model]\npreset = \"iMF-micro/2\"\ninput_size = 4\nin_channels = 4\nnum_classes = 4\n{extra}\n\
             [imf]\nguidance = [{{ omega = 3.0, t_min = 0.2, t_max = 0.8 }}, {{ omega = 1.5, t_min = 0.0, t_max = 1.0 }}]\n\
             [train]\ndata = \"{}\"\nbatch = 8\nepochs = 2\nlr = 1e-2\nprecision = \"f32\"\ndevice = \"cpu\"\nlog_every = 1\n\
             [sample]\nschedules = [[1.0, 0.0], [1.0, 0.5, 0.0]]\nnum_samples = 24\nbatch = 8\nvae = \"{}\"\n\
             [eval]\nreference = \"{}\"\nbatch = 12\n",
            root.join("data").display(),
            root.join("vae.safetensors").display(),
            root.join("ref.npz").display()
        ),
    )
    .unwrap();
    file
}

/// `mfr run` of `spec` under `root`; its run directory (with the metrics checked finite).
fn mfr_run(root: &Path, spec: &Path, name: &str) -> PathBuf {
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
    let run = root.join("results").join(name).join("default");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("samples/metrics.json")).unwrap())
            .unwrap();
    for nfe in ["1-NFE", "2-NFE"] {
        assert!(
            metrics["fid"][nfe].as_f64().is_some_and(f64::is_finite),
            "{metrics}"
        );
    }
    run
}

/// The schedules of [`write_spec`] with their guidance and sample files.
fn schedules() -> [(Vec<f64>, SamplingGuidance, &'static str); 2] {
    [
        (vec![1.0, 0.0], guidance(3.0, 0.2, 0.8), "samples-1nfe.npz"),
        (
            vec![1.0, 0.5, 0.0],
            guidance(1.5, 0.0, 1.0),
            "samples-2nfe.npz",
        ),
    ]
}

/// Batch 0 of a schedule again, outside the pipeline: the noise of seed mix(sample.seed, 1),
/// labels 0..8 mod 4, src/imf/sampler.rs at `g`, the official latent denormalisation, the
/// decoder.
fn batch_zero(
    spec: &Spec,
    net: &ImfDiT,
    vae_net: &AutoencoderKl,
    schedule: &[f64],
    g: &SamplingGuidance,
) -> Tensor {
    tch::manual_seed(data::mix(spec.sample.seed, 1) as i64);
    let e = Tensor::randn([8, 4, 4, 4], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 0, 1, 2, 3]);
    let z = imf::sample(net, &e, &y, schedule, g).unwrap();
    let latents = LatentNorm::PerChannel.from_network(&z);
    vae::decode_latents(vae_net, &latents, DecodePrecision::Tf32).unwrap()
}

fn piped_batch_zero(run: &Path, file: &str) -> Tensor {
    let mut npz = meanflow_repro::eval::npz::Npz::open(&run.join("samples").join(file)).unwrap();
    let mut images = npz.images("arr_0").unwrap();
    images.next_batch(8).unwrap().unwrap()
}

#[test]
fn a_tiny_imf_run_trains_samples_and_is_scored_through_mfr_run() {
    let _turn = common::serial();
    let root = temp_dir("imf-run");
    let vae_net = inputs(&root);
    let spec_file = write_spec(&root, "imf", "");
    let run = mfr_run(&root, &spec_file, "imf");
    let stats = std::fs::read_to_string(run.join("stats.jsonl")).unwrap();
    assert_eq!(
        stats.lines().count(),
        10,
        "5 steps an epoch, 2 epochs: {stats}"
    );
    // The pipeline's samples are the iMF sampler's on the run's final EMA weights.
    let spec = Spec::load(&spec_file).unwrap();
    let weights = checkpoint::list(&run.join("checkpoints")).pop().unwrap().1;
    let (_vs, net) = ema_network(&spec, &weights);
    for (schedule, g, file) in schedules() {
        let ours = batch_zero(&spec, &net, &vae_net, &schedule, &g);
        assert!(piped_batch_zero(&run, file).equal(&ours), "{file} differs");
    }
}

#[test]
fn the_sample_stage_draws_at_the_specs_guidance_from_given_weights() {
    let _turn = common::serial();
    let root = temp_dir("imf-weights");
    let vae_net = inputs(&root);
    // Random weights everywhere (a fresh imfDiT outputs exactly zero, and 10 steps from there
    // leave the conditioning paths too weak to tell one guidance from another), v-head included:
    // the sample stage leaves the v-head out.
    let spec_file = write_spec(&root, "given", "weights = \"WEIGHTS\"");
    let weights = root.join("random.safetensors");
    let text = std::fs::read_to_string(&spec_file).unwrap();
    std::fs::write(
        &spec_file,
        text.replace("WEIGHTS", weights.to_str().unwrap()),
    )
    .unwrap();
    let spec = Spec::load(&spec_file).unwrap();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = ImfDiT::new(&vs.root(), &spec.imf_model_config()).unwrap();
    let tensors: Vec<(String, Tensor)> = tch::no_grad(|| {
        meanflow_repro::model::sorted_variables(&vs)
            .into_iter()
            .map(|(k, v)| (format!("ema.{k}"), &v + v.randn_like() * 0.2))
            .collect()
    });
    assert!(tensors
        .iter()
        .any(|(k, _)| k.starts_with("ema.net.v_heads.")));
    let state = checkpoint::TrainState {
        step: 0,
        epoch: 0,
        adam_step: 0,
        seed: 0,
        spec_sha256: String::new(),
        wall_s: 0.0,
    };
    checkpoint::write(&weights, &tensors, &state).unwrap();
    let run = mfr_run(&root, &spec_file, "given");
    let (_vs, net) = ema_network(&spec, &weights);
    for (schedule, g, file) in schedules() {
        let piped = piped_batch_zero(&run, file);
        let ours = batch_zero(&spec, &net, &vae_net, &schedule, &g);
        assert!(piped.equal(&ours), "{file} differs from the sampler's");
        // At another omega, or another interval, the images differ: the guidance the pipeline
        // drew at is the spec's.
        for other in [
            guidance(g.omega + 2.0, g.t_min, g.t_max),
            guidance(g.omega, g.t_min, g.t_max / 2.0),
        ] {
            let moved = batch_zero(&spec, &net, &vae_net, &schedule, &other);
            assert!(
                !piped.equal(&moved),
                "{file}: {other:?} draws the same images"
            );
        }
    }
}
