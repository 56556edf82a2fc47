//! `mfr check` (what `make reproduce-b4` runs first): on a machine without what a spec needs,
//! one error lists every missing thing with the command that provides it.
use std::process::Command;

#[test]
fn the_b4_check_lists_everything_missing_with_its_command() {
    let root = env!("CARGO_MANIFEST_DIR");
    let cache = std::env::temp_dir().join(format!("mfr-check-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args([
            "check",
            "experiments/b4.toml",
            "--set",
            "train.data=/nonexistent/latents",
        ])
        .current_dir(root)
        .env("MFR_CACHE", &cache)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("experiments/b4.toml cannot run here; missing:"),
        "{err}"
    );
    assert!(err.contains("mfr prepare-imagenet"), "latents: {err}");
    assert!(err.contains("mfr fetch sd-vae-ft-ema"), "VAE: {err}");
    assert!(
        err.contains("mfr fetch VIRTUAL_imagenet256_labeled"),
        "reference: {err}"
    );
    if !tch::Cuda::is_available() {
        assert!(err.contains("CUDA device"), "GPU: {err}");
    }
}

#[test]
fn the_check_of_the_public_checkpoint_spec_names_the_import() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args([
            "check",
            "experiments/b4-public.toml",
            "--set",
            "model.weights=/nonexistent/b4.safetensors",
        ])
        .current_dir(root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("mfr import CHECKPOINT --out /nonexistent/b4.safetensors"),
        "{err}"
    );
    assert!(
        !err.contains("prepare-imagenet"),
        "given weights need no latents: {err}"
    );
}
