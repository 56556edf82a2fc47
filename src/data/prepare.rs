//! `mfr prepare-imagenet TRAIN_DIR OUT_DIR`: ImageNet's class folders -> the latent layout the
//! trainer reads (latents.rs). Each image gets ADM's centre crop to `size` (guided-diffusion's
//! center_crop_arr: box-filter halving while the short side is at least twice the target, a
//! bicubic resize of the short side to the target, the centre square), is encoded by the SD-VAE,
//! and its posterior (mean, std) is stored as one (8, size/8, size/8) float32 .npy. Labels follow
//! the sorted class-folder order (torchvision's ImageFolder, as ADM and REPA use). Every file is
//! written through a temporary name and skipped when present, so an interrupted run continues;
//! dataset.json is written last.
use super::npy;
use crate::model::vae::AutoencoderKl;
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub struct Options {
    /// Side of the square crop (256 for ImageNet 256).
    pub size: u32,
    pub batch: usize,
    pub device: Device,
    /// Only the first N images (in label order): trials and tests.
    pub limit: Option<usize>,
    /// Leave unreadable files out (listing them) instead of stopping at the first.
    pub skip_bad: bool,
}

/// The largest crop side: ADM's sizes are 64 to 512, and the evaluator reads images up to this.
pub const MAX_SIZE: u32 = 4096;

/// Pixels an image may have, checked from its header before it is decoded, and that ADM's crop
/// may resize it to: 8192 x 8192 (192 MiB of RGB, per decoding thread), beyond any ImageNet
/// photo.
pub const MAX_PIXELS: u64 = 1 << 26;

/// The crop side: a positive multiple of 8, since the SD-VAE halves it three times.
pub fn check_size(size: u32) -> Result<()> {
    if size == 0 || !size.is_multiple_of(8) || size > MAX_SIZE {
        bail!(
            "--size {size}: the crop side must be a multiple of 8 (the SD-VAE downsamples by 8) from 8 to {MAX_SIZE}, e.g. 256"
        );
    }
    Ok(())
}

/// Images decoded (and encoded) at once.
pub fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 {
        bail!("--batch 0: images are decoded and encoded in batches of at least 1, e.g. 64");
    }
    Ok(())
}

impl Options {
    /// The size and batch, checked before any work starts.
    pub fn check(&self) -> Result<()> {
        check_size(self.size)?;
        check_batch(self.batch)
    }
}

/// (relative file name in vae-sd/, label) of global index `idx`, as the REPA layout names it.
fn latent_name(idx: usize) -> String {
    let id = format!("{idx:08}");
    format!("{}/img-mean-std-{id}.npy", &id[..5])
}

const IMAGE_EXTENSIONS: [&str; 5] = ["jpeg", "jpg", "png", "JPEG", "JPG"];

/// Every image under `train`'s class folders, sorted, with the class index of its folder.
pub fn list_images(train: &Path) -> Result<Vec<(PathBuf, i64)>> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(train)
        .with_context(|| format!("{}: cannot read the ImageNet train folder", train.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{}: no class folders (expected train/n01440764/*.JPEG ...)",
            train.display()
        );
    }
    let mut out = Vec::new();
    for (label, dir) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e == *x))
            })
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|f| (f, label as i64)));
    }
    Ok(out)
}

/// The two resampling filters of ADM's crop, as PIL defines them.
#[derive(Clone, Copy)]
enum Filter {
    Box,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            Filter::Bicubic => {
                // Keys' cubic with a = -0.5.
                let (a, x) = (-0.5, x.abs());
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

/// PIL's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's taps for resampling `n_in` pixels to `n_out`: (first input pixel, fixed-point weights).
fn taps(n_in: usize, n_out: usize, filter: Filter) -> Vec<(usize, Vec<i64>)> {
    let scale = n_in as f64 / n_out as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..n_out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let w: Vec<f64> = (lo..hi)
                .map(|i| filter.weight((i as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = w.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i64
                    } else {
                        (0.5 + k * one) as i64
                    }
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

/// One separable pass: `lines` lines of `n_in` RGB pixels into `n_out` pixels each, along rows
/// (horizontal) or along columns (vertical) of a row-major image.
fn pass(
    src: &[u8],
    n_in: usize,
    n_out: usize,
    lines: usize,
    filter: Filter,
    along_rows: bool,
) -> Vec<u8> {
    let taps = taps(n_in, n_out, filter);
    let mut out = vec![0u8; n_out * lines * 3];
    // Pixel index of (position along the axis, line) in the source and the output.
    let at = |pos: usize, line: usize, n: usize| {
        if along_rows {
            line * n + pos
        } else {
            pos * lines + line
        }
    };
    for line in 0..lines {
        for (o, (first, weights)) in taps.iter().enumerate() {
            for c in 0..3 {
                let acc: i64 = weights
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * i64::from(src[at(first + k, line, n_in) * 3 + c]))
                    .sum::<i64>()
                    + (1 << (PRECISION_BITS - 1));
                out[at(o, line, n_out) * 3 + c] = (acc >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// PIL's `Image.resize((w, h), filter)` for 8-bit RGB: the horizontal pass, then the vertical
/// one, each in PIL's fixed point with rounding to 8 bits in between; bit-exact with Pillow.
fn resize(img: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let mut data = img.as_raw().clone();
    if w as usize != w0 {
        data = pass(&data, w0, w as usize, h0, filter, true);
    }
    if h as usize != h0 {
        data = pass(&data, h0, h as usize, w as usize, filter, false);
    }
    RgbImage::from_raw(w, h, data).expect("the buffer has w * h * 3 bytes")
}

/// ADM's centre crop of `img` to `size` x `size`. The short side is resized to `size`, so a
/// long thin image grows by its aspect ratio: one that would grow past [`MAX_PIXELS`] (a
/// 100000 x 1 strip would become 25.6M x 256) is refused before anything is allocated.
pub fn center_crop(mut img: RgbImage, size: u32) -> Result<RgbImage> {
    check_size(size)?;
    let (w0, h0) = img.dimensions();
    if w0 == 0 || h0 == 0 {
        bail!("a {w0} x {h0} image has no pixels");
    }
    while img.width().min(img.height()) >= 2 * size {
        img = resize(&img, img.width() / 2, img.height() / 2, Filter::Box);
    }
    let scale = size as f64 / img.width().min(img.height()) as f64;
    let (w, h) = (
        // Python's round(): ties to even.
        (img.width() as f64 * scale).round_ties_even(),
        (img.height() as f64 * scale).round_ties_even(),
    );
    if w * h > MAX_PIXELS as f64 {
        bail!(
            "a {w0} x {h0} image: its short side resized to {size} makes it {w} x {h}, more than {MAX_PIXELS} pixels; leave out such a strip"
        );
    }
    let (w, h) = (w as u32, h as u32);
    let img = resize(&img, w, h, Filter::Bicubic);
    Ok(image::imageops::crop_imm(&img, (w - size) / 2, (h - size) / 2, size, size).to_image())
}

/// Pillow's CMYK -> RGB (libImaging/Convert.c, cmyk2rgb): each channel is
/// (255 - k) - (255 - k) * c / 255, the product rounded as its MULDIV255 rounds.
pub fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    cmyk.chunks_exact(4)
        .flat_map(|p| {
            let nk = 255 - u32::from(p[3]);
            [0, 1, 2].map(|i| (nk - muldiv255(u32::from(p[i]), nk)) as u8)
        })
        .collect()
}

/// An image file's pixels as Pillow's `Image.open(f).convert("RGB")` gives them, which is what
/// ADM's crop starts from: the format told by the content, not the name (ImageNet's train set
/// has a PNG named .JPEG), CMYK JPEGs (22 in ImageNet) through Pillow's CMYK arithmetic (the
/// decoder undoes Adobe's inversion as libjpeg's Pillow does), grey ones replicated to RGB.
/// Each image's size is read from its header and checked against [`MAX_PIXELS`] before a pixel
/// is decoded.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let format = image::guess_format(bytes).context("not an image format this reads")?;
    if format != image::ImageFormat::Jpeg {
        let reader = || image::io::Reader::with_format(std::io::Cursor::new(bytes), format);
        let (w, h) = reader().into_dimensions()?;
        check_pixels(w, h)?;
        return Ok(reader().decode()?.to_rgb8());
    }
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder.read_info()?;
    let info = decoder.info().context("a JPEG without a frame header")?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    check_pixels(w, h)?;
    let pixels = decoder.decode()?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        jpeg_decoder::PixelFormat::CMYK32 => cmyk_to_rgb(&pixels),
        jpeg_decoder::PixelFormat::L16 => {
            bail!("a 16-bit greyscale JPEG, which ImageNet has none of")
        }
    };
    RgbImage::from_raw(w, h, rgb).context("a JPEG whose pixels do not fill its size")
}

fn check_pixels(w: u32, h: u32) -> Result<()> {
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        bail!("{w} x {h} pixels, more than the {MAX_PIXELS} an image may have here; downscale it");
    }
    Ok(())
}

/// The largest image file read: a photo within [`MAX_PIXELS`] is far smaller.
const MAX_IMAGE_FILE: u64 = 1 << 30;

/// An image file's RGB pixels ([`decode_rgb`]), the file a regular one.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = crate::readfile::read(path, MAX_IMAGE_FILE)?;
    decode_rgb(&bytes).with_context(|| format!("{}: not a readable image", path.display()))
}

fn load_crop(path: &Path, size: u32) -> Result<RgbImage> {
    center_crop(read_rgb(path)?, size).with_context(|| format!("{}", path.display()))
}

/// Encodes every image of `train` not yet in `out`, then writes out/vae-sd/dataset.json.
/// What a prepare run did: images encoded here and in total, files left out, and where the time
/// went (decoding runs on the CPU's cores while the encoder works on the batch before).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Images in the dataset (dataset.json lists them).
    pub images: usize,
    /// Images encoded by this call.
    pub encoded: usize,
    /// Unreadable files left out (`skip_bad`), with why.
    pub skipped: Vec<(PathBuf, String)>,
    /// Seconds spent decoding and cropping (summed over batches, all threads together).
    pub decode_s: f64,
    /// Seconds the encoder spent (waiting included for nothing: decoding overlaps it).
    pub encode_s: f64,
    pub threads: usize,
}

/// A batch decoded and cropped: the global indices, their crops, and files that failed.
type Decoded = (Vec<usize>, Vec<RgbImage>, Vec<(usize, anyhow::Error)>, f64);

/// Decodes and crops `chunk` on `threads` threads, keeping each failure beside its index.
fn decode_chunk(chunk: &[usize], images: &[(PathBuf, i64)], size: u32, threads: usize) -> Decoded {
    let started = std::time::Instant::now();
    let per = chunk.len().div_ceil(threads).max(1);
    let results: Vec<(usize, Result<RgbImage>)> = std::thread::scope(|s| {
        let handles: Vec<_> = chunk
            .chunks(per)
            .map(|part| {
                let handle = s.spawn(move || {
                    part.iter()
                        .map(|&i| (i, load_crop(&images[i].0, size)))
                        .collect::<Vec<_>>()
                });
                (part, handle)
            })
            .collect();
        // A decoder that panicked fails its part's files, rather than losing them unnamed.
        handles
            .into_iter()
            .flat_map(|(part, h)| {
                h.join().unwrap_or_else(|_| {
                    part.iter()
                        .map(|&i| {
                            let e = anyhow::anyhow!(
                                "{}: the image decoder failed on this file or one beside it",
                                images[i].0.display()
                            );
                            (i, Err(e))
                        })
                        .collect()
                })
            })
            .collect()
    });
    let (mut kept, mut crops, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for (i, r) in results {
        match r {
            Ok(c) => {
                kept.push(i);
                crops.push(c);
            }
            Err(e) => failed.push((i, e)),
        }
    }
    (kept, crops, failed, started.elapsed().as_secs_f64())
}

/// Encodes every image of `train` not yet in `out`, then writes out/vae-sd/dataset.json. An
/// unreadable file stops the run, naming it, or with `skip_bad` is left out and listed.
pub fn prepare(train: &Path, out: &Path, vae: &AutoencoderKl, opts: &Options) -> Result<Prepared> {
    opts.check()?;
    let mut images = list_images(train)?;
    if let Some(n) = opts.limit {
        images.truncate(n);
    }
    let root = out.join("vae-sd");
    let todo: Vec<usize> = (0..images.len())
        .filter(|&i| !root.join(latent_name(i)).exists())
        .collect();
    let bar = Progress::new("encode", images.len() as u64, "images");
    bar.start_at((images.len() - todo.len()) as u64);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut done = Prepared {
        images: 0,
        encoded: 0,
        skipped: Vec::new(),
        decode_s: 0.0,
        encode_s: 0.0,
        threads,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Decoded>(1);
    std::thread::scope(|s| -> Result<()> {
        let images = &images;
        let todo = &todo;
        // Decoding runs one batch ahead of the encoder.
        s.spawn(move || {
            for chunk in todo.chunks(opts.batch) {
                if tx
                    .send(decode_chunk(chunk, images, opts.size, threads))
                    .is_err()
                {
                    return;
                }
            }
        });
        for (kept, crops, failed, seconds) in rx {
            done.decode_s += seconds;
            crate::signals::check(|| {
                format!("after {} of {} images", bar.position(), images.len())
            })?;
            for (i, e) in failed {
                if !opts.skip_bad {
                    return Err(
                        e.context("stopping (pass --skip-bad to leave unreadable files out)")
                    );
                }
                eprintln!("skipping {e:#}");
                done.skipped.push((images[i].0.clone(), format!("{e:#}")));
                bar.inc(1);
            }
            if kept.is_empty() {
                continue;
            }
            let started = std::time::Instant::now();
            encode_batch(vae, &crops, &kept, &root, opts)?;
            done.encode_s += started.elapsed().as_secs_f64();
            done.encoded += kept.len();
            bar.inc(kept.len() as u64);
        }
        Ok(())
    })?;
    bar.finish();
    let labels: Vec<serde_json::Value> = images
        .iter()
        .enumerate()
        .filter(|(i, _)| root.join(latent_name(*i)).exists())
        .map(|(i, (_, label))| serde_json::json!([latent_name(i), label]))
        .collect();
    done.images = labels.len();
    let index = root.join("dataset.json");
    let text = serde_json::json!({ "labels": labels }).to_string();
    crate::files::write_atomic(&index, text.as_bytes())?;
    Ok(done)
}

/// Decoding and cropping alone, timed: what bounds `prepare` on a machine whose GPU encodes
/// faster than its CPU decodes (`mfr bench prepare`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeBench {
    pub images: usize,
    pub unreadable: usize,
    pub threads: usize,
    pub seconds: f64,
    pub img_per_s: f64,
    /// Hours for ImageNet's 1,281,167 training images at this rate on this machine.
    pub imagenet_hours: f64,
}

/// Decodes and crops the first `limit` images of `train` on every core, `batch` at a time.
pub fn decode_bench(train: &Path, size: u32, limit: usize, batch: usize) -> Result<DecodeBench> {
    check_size(size)?;
    check_batch(batch)?;
    let mut images = list_images(train)?;
    images.truncate(limit);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = std::time::Instant::now();
    let mut unreadable = 0;
    let all: Vec<usize> = (0..images.len()).collect();
    for chunk in all.chunks(batch) {
        unreadable += decode_chunk(chunk, &images, size, threads).2.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    let img_per_s = images.len() as f64 / seconds.max(1e-9);
    Ok(DecodeBench {
        images: images.len(),
        unreadable,
        threads,
        seconds,
        img_per_s,
        imagenet_hours: 1_281_167.0 / img_per_s.max(1e-9) / 3600.0,
    })
}

/// Encodes a batch of crops and writes each image's (mean, std) under its global index.
fn encode_batch(
    vae: &AutoencoderKl,
    crops: &[RgbImage],
    indices: &[usize],
    root: &Path,
    opts: &Options,
) -> Result<()> {
    let side = opts.size as i64;
    let bytes: Vec<u8> = crops
        .iter()
        .flat_map(|c| c.as_raw().iter().copied())
        .collect();
    let x = Tensor::from_slice(&bytes)
        .view([crops.len() as i64, side, side, 3])
        .to_device(opts.device)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0;
    let (mean, std) = tch::no_grad(|| vae.encode(&x));
    let moments = Tensor::cat(&[mean, std], 1)
        .to_kind(Kind::Float)
        .to_device(Device::Cpu)
        .contiguous();
    let shape: Vec<usize> = moments.size()[1..].iter().map(|&d| d as usize).collect();
    for (k, &i) in indices.iter().enumerate() {
        let values = Vec::<f32>::try_from(moments.get(k as i64).reshape([-1]))?;
        let file = root.join(latent_name(i));
        let dir = file.parent().expect("a folder");
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        npy::write_f32(&file, &shape, &values)?;
    }
    Ok(())
}
