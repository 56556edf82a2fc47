//! `mfr prepare-imagenet`: ADM's centre crop against PIL (the library ADM crops with), the
//! latent layout the trainer reads, and a resumed run that only encodes what is missing.
mod common;
use common::{run_python, temp_dir};
use meanflow_repro::data::latents::Latents;
use meanflow_repro::data::prepare::{center_crop, prepare, Options};
use meanflow_repro::data::Dataset;
use meanflow_repro::model::vae::{AutoencoderKl, VaeConfig};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

/// A photo that ships with scikit-learn (427 x 640), converted to PNG by PIL so both sides
/// start from the same pixels (JPEG decoders differ in their last bits).
fn photo(dir: &Path) -> PathBuf {
    let jpg = meanflow_repro::paths::package_file("sklearn/datasets/images/china.jpg")
        .expect("scikit-learn's sample photos (make setup)");
    let png = dir.join("china.png");
    let status = std::process::Command::new(python())
        .args([
            "-c",
            "import sys; from PIL import Image; Image.open(sys.argv[1]).convert('RGB').save(sys.argv[2])",
            jpg.to_str().unwrap(),
            png.to_str().unwrap(),
        ])
        .status()
        .expect("the project's .venv python (make setup)");
    assert!(status.success());
    png
}

#[test]
fn the_centre_crop_matches_pil_box_halving_then_bicubic() {
    let dir = temp_dir("crop");
    let png = photo(&dir);
    for size in [256u32, 64] {
        let raw = dir.join(format!("pil-{size}.raw"));
        // ADM's recipe in PIL: halve with BOX while the short side >= 2 * size, BICUBIC-resize
        // the short side to size (rounding the other), take the centre square.
        let script = "import sys; import numpy as np; from PIL import Image
im = Image.open(sys.argv[1]).convert('RGB'); s = int(sys.argv[2])
while min(im.size) >= 2 * s:
    im = im.resize((im.size[0] // 2, im.size[1] // 2), resample=Image.BOX)
k = s / min(im.size)
im = im.resize((round(im.size[0] * k), round(im.size[1] * k)), resample=Image.BICUBIC)
a = np.asarray(im); y = (a.shape[0] - s) // 2; x = (a.shape[1] - s) // 2
open(sys.argv[3], 'wb').write(np.ascontiguousarray(a[y:y + s, x:x + s]).tobytes())";
        let status = std::process::Command::new(python())
            .args([
                "-c",
                script,
                png.to_str().unwrap(),
                &size.to_string(),
                raw.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let pil = std::fs::read(&raw).unwrap();
        let ours = center_crop(image::open(&png).unwrap().to_rgb8(), size)
            .unwrap()
            .into_raw();
        assert_eq!(ours.len(), pil.len());
        let diffs: Vec<i32> = ours
            .iter()
            .zip(&pil)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        let max = *diffs.iter().max().unwrap();
        // Our resampler follows Pillow's fixed-point arithmetic, so the crop is bit-exact.
        assert_eq!(max, 0, "size {size}: mean |diff| {mean}, max {max}");
    }
}

fn tiny_tree(root: &Path) {
    for (class, sizes) in [
        ("n0002", [(70u32, 50u32), (40, 90)]),
        ("n0001", [(64, 64), (100, 33)]),
    ] {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, (w, h)) in sizes.into_iter().enumerate() {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 3 + y) as u8, (y * 5) as u8, ((x * y) % 251) as u8])
            });
            img.save(dir.join(format!("img{i}.png"))).unwrap();
        }
    }
}

#[test]
fn latents_land_in_the_trainer_layout_and_a_resumed_run_encodes_only_what_is_missing() {
    let dir = temp_dir("layout");
    tiny_tree(&dir.join("train"));
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKl::new(&vs.root(), &VaeConfig::tiny());
    let opts = Options {
        size: 32,
        batch: 3,
        device: Device::Cpu,
        limit: None,
        skip_bad: false,
    };
    let out = dir.join("latents");
    assert_eq!(
        prepare(&dir.join("train"), &out, &vae, &opts)
            .unwrap()
            .images,
        4
    );

    let ds = Latents::open(&out).unwrap();
    assert_eq!(ds.len(), 4);
    assert_eq!(ds.stored_shape(), [8, 4, 4]);
    let mut stored = vec![0f32; 8 * 16];
    // Sorted class folders: n0001 is class 0; its second image is global index 1.
    assert_eq!(ds.read(1, &mut stored).unwrap(), 0);
    assert_eq!(ds.read(2, &mut stored.clone()).unwrap(), 1);
    let crop = center_crop(
        image::open(dir.join("train/n0001/img1.png"))
            .unwrap()
            .to_rgb8(),
        32,
    )
    .unwrap();
    let x = Tensor::from_slice(crop.as_raw())
        .view([1, 32, 32, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0;
    let (mean, std) = vae.encode(&x);
    let expected = Vec::<f32>::try_from(Tensor::cat(&[mean, std], 1).reshape([-1])).unwrap();
    // The same network on the same crop, encoded in a batch of 3 against a batch of 1. The
    // convolution kernels oneDNN picks depend on the batch and on the CPU (AVX2 or AVX-512,
    // Intel or AMD) and sum in other orders: float32 rounding (~6e-8 per operation) compounded
    // over the encoder's ~30 layers. One element moved by 2.5e-5 relative on an AMD EPYC, so
    // the check is norm-wise (a few elements near zero cannot dominate it): 1e-5 is ~10x what
    // reordering gives on either vendor, and a real difference (crop, scale, channel order)
    // moves the latents by more than 1e-2.
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let diff: Vec<f32> = stored.iter().zip(&expected).map(|(a, b)| a - b).collect();
    let relative = norm(&diff) / norm(&expected);
    println!("stored latents vs a direct encode: {relative:.2e} relative (norm-wise)");
    assert!(
        relative < 1e-5,
        "stored latents differ from a direct encode by {relative:.3e}"
    );

    // Interrupted after three images: the fourth file and the index are missing.
    let last = out.join("vae-sd/00000/img-mean-std-00000003.npy");
    let before = std::fs::read(&last).unwrap();
    let first = out.join("vae-sd/00000/img-mean-std-00000000.npy");
    let first_time = std::fs::metadata(&first).unwrap().modified().unwrap();
    std::fs::remove_file(&last).unwrap();
    std::fs::remove_file(out.join("vae-sd/dataset.json")).unwrap();
    assert_eq!(
        prepare(&dir.join("train"), &out, &vae, &opts)
            .unwrap()
            .images,
        4
    );
    assert_eq!(std::fs::read(&last).unwrap(), before);
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        first_time
    );
    assert_eq!(Latents::open(&out).unwrap().len(), 4);
}

#[test]
fn a_folder_without_classes_is_named() {
    let dir = temp_dir("empty");
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKl::new(&vs.root(), &VaeConfig::tiny());
    let opts = Options {
        size: 32,
        batch: 3,
        device: Device::Cpu,
        limit: None,
        skip_bad: false,
    };
    let err = prepare(&dir, &dir.join("out"), &vae, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no class folders"), "{err}");
}

#[test]
fn pillows_cmyk_arithmetic_is_ours_to_the_last_bit() {
    let dir = temp_dir("cmyk-formula");
    let (cmyk, rgb) = (dir.join("cmyk.raw"), dir.join("rgb.raw"));
    // Every (c, k) pair with m and y spread: Pillow's Image.convert("RGB") of raw CMYK pixels.
    run_python(
        "import sys, numpy as np; from PIL import Image
c, k = np.meshgrid(np.arange(256), np.arange(256)); n = c.size
px = np.stack([c.ravel(), (c.ravel() * 7) % 256, (k.ravel() * 13) % 256, k.ravel()], 1).astype(np.uint8)
open(sys.argv[1], 'wb').write(px.tobytes())
im = Image.frombytes('CMYK', (256, 256), px.tobytes()).convert('RGB')
open(sys.argv[2], 'wb').write(np.asarray(im).tobytes())",
        &[&cmyk, &rgb],
    );
    let ours = meanflow_repro::data::prepare::cmyk_to_rgb(&std::fs::read(&cmyk).unwrap());
    assert_eq!(ours, std::fs::read(&rgb).unwrap());
}

#[test]
fn cmyk_grey_and_misnamed_files_decode_as_pillow_converts_them() {
    let dir = temp_dir("decode-kinds");
    let png = photo(&dir);
    // What ImageNet's train set holds besides RGB JPEGs: CMYK JPEGs (Pillow writes Adobe's
    // inverted CMYK, as Photoshop does), greyscale JPEGs, and a PNG named .JPEG; beside each,
    // Pillow's Image.open(f).convert("RGB") as raw bytes.
    run_python(
        "import sys, numpy as np; from PIL import Image
im = Image.open(sys.argv[1]).convert('RGB').resize((96, 64))
d = sys.argv[2]
im.convert('CMYK').save(d + '/cmyk.JPEG', quality=95)
im.convert('L').save(d + '/grey.JPEG', quality=95)
im.save(d + '/png.JPEG', format='PNG')
im.save(d + '/rgb.JPEG', quality=95)
for name in ['cmyk', 'grey', 'png', 'rgb']:
    open(d + '/' + name + '.rgb', 'wb').write(np.asarray(Image.open(d + '/' + name + '.JPEG').convert('RGB')).tobytes())",
        &[png.as_path(), &dir],
    );
    for name in ["cmyk", "grey", "png", "rgb"] {
        let bytes = std::fs::read(dir.join(format!("{name}.JPEG"))).unwrap();
        let ours = meanflow_repro::data::prepare::decode_rgb(&bytes).unwrap();
        let theirs = std::fs::read(dir.join(format!("{name}.rgb"))).unwrap();
        assert_eq!((ours.width(), ours.height()), (96, 64), "{name}");
        // JPEG decoders round their inverse DCT differently (libjpeg-turbo's islow in Pillow,
        // stb_image's in jpeg-decoder): a level or two per channel, never more; the PNG is exact.
        let worst = ours
            .as_raw()
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        let bound = if name == "png" { 0 } else { 3 };
        println!("{name}: largest difference from Pillow {worst} levels");
        assert!(
            worst <= bound,
            "{name}: {worst} levels from Pillow's pixels"
        );
    }
}
