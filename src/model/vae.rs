//! The Stable Diffusion VAE (diffusers' `AutoencoderKL` with the SD config) in tch, for inference.
//! Module paths are the diffusers safetensors names (`decoder.up_blocks.0.resnets.2.conv1.weight`,
//! `encoder.mid_block.attentions.0.to_q.bias`, `post_quant_conv.weight`, ...), so the public
//! files stabilityai/sd-vae-ft-ema and sd-vae-ft-mse load by name; their mid-block attentions may
//! use the names diffusers had before its attention refactor (see [`modern_attention_names`]).
//!
//! The pieces, as diffusers builds them for this config:
//! - ResnetBlock2D: GroupNorm - SiLU - conv3x3 - GroupNorm - SiLU - conv3x3, plus the input
//!   (through a 1x1 `conv_shortcut` when the channel count changes); no time embedding, output
//!   scale 1, dropout 0.
//! - mid block: resnet, single-head self-attention over the h*w positions (GroupNorm first,
//!   residual added), resnet.
//! - encoder: conv_in, per level `layers_per_block` resnets then (except at the last level) a
//!   stride-2 conv on the input padded by one zero row and column at the bottom and right; mid
//!   block; GroupNorm - SiLU - conv_out to 2 * latent channels (mean and log-variance).
//! - decoder: conv_in, mid block, per level (widest first) `layers_per_block + 1` resnets then
//!   (except at the last level) nearest 2x upsampling and a conv3x3; GroupNorm - SiLU - conv_out.
//! - `quant_conv` (1x1, after the encoder) and `post_quant_conv` (1x1, before the decoder).
//!
//! Every GroupNorm has eps 1e-6 (hard-coded in diffusers' Encoder and Decoder).
//! `encode` and `decode` run under `no_grad`: the VAE is never trained here.
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};

/// Latents the diffusion model sees are the VAE's latents times this (SD's `scaling_factor`).
pub const SCALING_FACTOR: f64 = 0.18215;

/// diffusers' Encoder and Decoder hard-code it for every GroupNorm.
const EPS: f64 = 1e-6;

/// The architecture of an `AutoencoderKL` (the diffusers config fields that change shapes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub latent_channels: i64,
    /// Channels per level, narrowest (full resolution) first; 2^(levels - 1) is the downscale.
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub norm_num_groups: i64,
}

impl VaeConfig {
    /// The config.json of stabilityai/sd-vae-ft-ema and sd-vae-ft-mse (SD 1.x's VAE): 8x downscale.
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
        }
    }

    /// The same structure (four levels, 8x downscale, channel changes that need shortcut convs,
    /// two channels per norm group) at a size the tests can run in float64 in milliseconds.
    pub fn tiny() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![8, 16, 32, 32],
            layers_per_block: 1,
            norm_num_groups: 4,
        }
    }

    /// Side of an image over side of its latent.
    pub fn downscale(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn conv(p: nn::Path, cin: i64, cout: i64, kernel: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, kernel, config)
}

fn group_norm(p: nn::Path, groups: i64, channels: i64) -> nn::GroupNorm {
    let config = nn::GroupNormConfig {
        eps: EPS,
        ..Default::default()
    };
    nn::group_norm(p, groups, channels, config)
}

#[derive(Debug)]
struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    fn new(p: nn::Path, cin: i64, cout: i64, groups: i64) -> Self {
        Self {
            norm1: group_norm(&p / "norm1", groups, cin),
            conv1: conv(&p / "conv1", cin, cout, 3, 1, 1),
            norm2: group_norm(&p / "norm2", groups, cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1, 1),
            conv_shortcut: (cin != cout).then(|| conv(&p / "conv_shortcut", cin, cout, 1, 1, 0)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.norm1).silu().apply(&self.conv1);
        let h = h.apply(&self.norm2).silu().apply(&self.conv2);
        match &self.conv_shortcut {
            Some(c) => x.apply(c) + h,
            None => x + h,
        }
    }
}

/// diffusers' `Attention` as the VAE's mid block builds it: one head of width C, GroupNorm on the
/// input, residual connection, output scale 1.
#[derive(Debug)]
struct SelfAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl SelfAttention {
    fn new(p: nn::Path, channels: i64, groups: i64) -> Self {
        let linear = |name: &str| nn::linear(&p / name, channels, channels, Default::default());
        Self {
            group_norm: group_norm(&p / "group_norm", groups, channels),
            to_q: linear("to_q"),
            to_k: linear("to_k"),
            to_v: linear("to_v"),
            to_out: nn::linear(&p / "to_out" / 0, channels, channels, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, c, h, w) = x.size4().expect("attention input is (N, C, H, W)");
        // GroupNorm over (C, H, W) reduces the same elements as diffusers' over (C, H*W).
        let tokens = x
            .apply(&self.group_norm)
            .reshape([n, c, h * w])
            .transpose(1, 2);
        // (N, 1 head, T, C): the fused kernel picks flash / memory-efficient / math by itself.
        let heads = |l: &nn::Linear| tokens.apply(l).unsqueeze(1);
        let out = Tensor::scaled_dot_product_attention(
            &heads(&self.to_q),
            &heads(&self.to_k),
            &heads(&self.to_v),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let out = out.squeeze_dim(1).apply(&self.to_out);
        out.transpose(1, 2).reshape([n, c, h, w]) + x
    }
}

#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: SelfAttention,
}

impl MidBlock {
    fn new(p: nn::Path, channels: i64, groups: i64) -> Self {
        let resnet = |i: i64| ResnetBlock::new(&p / "resnets" / i, channels, channels, groups);
        Self {
            resnets: [resnet(0), resnet(1)],
            attention: SelfAttention::new(&p / "attentions" / 0, channels, groups),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.resnets[0].forward(x);
        let x = self.attention.forward(&x);
        self.resnets[1].forward(&x)
    }
}

/// A level of the encoder (`DownEncoderBlock2D`) or the decoder (`UpDecoderBlock2D`).
#[derive(Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    /// The level's resampling conv: stride 2 after padding (encoder), or after 2x upsampling.
    resample: Option<nn::Conv2D>,
}

impl Level {
    fn new(p: nn::Path, cin: i64, cout: i64, layers: i64, groups: i64, resample: &str) -> Self {
        let resnets = (0..layers)
            .map(|i| {
                let input = if i == 0 { cin } else { cout };
                ResnetBlock::new(&p / "resnets" / i, input, cout, groups)
            })
            .collect();
        let resample = match resample {
            "downsamplers" => Some(conv(&p / resample / 0 / "conv", cout, cout, 3, 2, 0)),
            "upsamplers" => Some(conv(&p / resample / 0 / "conv", cout, cout, 3, 1, 1)),
            _ => None,
        };
        Self { resnets, resample }
    }

    fn resnets(&self, x: &Tensor) -> Tensor {
        self.resnets
            .iter()
            .fold(x.shallow_clone(), |x, r| r.forward(&x))
    }

    fn down(&self, x: &Tensor) -> Tensor {
        let x = self.resnets(x);
        match &self.resample {
            // diffusers' Downsample2D with padding 0: one zero column right, one zero row below.
            Some(c) => x.constant_pad_nd([0, 1, 0, 1]).apply(c),
            None => x,
        }
    }

    fn up(&self, x: &Tensor) -> Tensor {
        let x = self.resnets(x);
        match &self.resample {
            Some(c) => {
                let (_, _, h, w) = x.size4().expect("decoder activations are (N, C, H, W)");
                x.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0).apply(c)
            }
            None => x,
        }
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<Level>,
    mid_block: MidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let last = *ch.last().expect("at least one level");
        let down_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &cout)| {
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                let resample = if i + 1 < ch.len() { "downsamplers" } else { "" };
                let path = &p / "down_blocks" / i;
                Level::new(path, cin, cout, cfg.layers_per_block, g, resample)
            })
            .collect();
        Self {
            conv_in: conv(&p / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(&p / "mid_block", last, g),
            conv_norm_out: group_norm(&p / "conv_norm_out", g, last),
            conv_out: conv(&p / "conv_out", last, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self
            .down_blocks
            .iter()
            .fold(x.apply(&self.conv_in), |x, b| b.down(&x));
        self.mid_block
            .forward(&x)
            .apply(&self.conv_norm_out)
            .silu()
            .apply(&self.conv_out)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: MidBlock,
    up_blocks: Vec<Level>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let ch: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let up_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &cout)| {
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                let resample = if i + 1 < ch.len() { "upsamplers" } else { "" };
                let path = &p / "up_blocks" / i;
                Level::new(path, cin, cout, cfg.layers_per_block + 1, g, resample)
            })
            .collect();
        let first = *ch.last().expect("at least one level");
        Self {
            conv_in: conv(&p / "conv_in", cfg.latent_channels, ch[0], 3, 1, 1),
            mid_block: MidBlock::new(&p / "mid_block", ch[0], g),
            up_blocks,
            conv_norm_out: group_norm(&p / "conv_norm_out", g, first),
            conv_out: conv(&p / "conv_out", first, cfg.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let x = self.mid_block.forward(&z.apply(&self.conv_in));
        self.up_blocks
            .iter()
            .fold(x, |x, b| b.up(&x))
            .apply(&self.conv_norm_out)
            .silu()
            .apply(&self.conv_out)
    }
}

/// diffusers' `AutoencoderKL` (quant_conv and post_quant_conv present, mid-block attention on).
#[derive(Debug)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: nn::Conv2D,
    post_quant_conv: nn::Conv2D,
    latent_channels: i64,
}

impl AutoencoderKl {
    /// The network with tch's default initialisation (load weights before use, or time it).
    pub fn new(p: &nn::Path, cfg: &VaeConfig) -> Self {
        let l = cfg.latent_channels;
        Self {
            encoder: Encoder::new(p / "encoder", cfg),
            decoder: Decoder::new(p / "decoder", cfg),
            quant_conv: conv(p / "quant_conv", 2 * l, 2 * l, 1, 1, 0),
            post_quant_conv: conv(p / "post_quant_conv", l, l, 1, 1, 0),
            latent_channels: l,
        }
    }

    /// Latents as the VAE produces them (NOT multiplied by [`SCALING_FACTOR`]: divide the
    /// diffusion model's output by it first), (N, 4, h, w) -> images (N, 3, 8h, 8w), roughly in
    /// [-1, 1], in the weights' dtype. The input is cast to that dtype; runs under `no_grad`.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let z = z.to_kind(self.post_quant_conv.ws.kind());
            self.decoder.forward(&z.apply(&self.post_quant_conv))
        })
    }

    /// Images in [-1, 1], (N, 3, H, W) with H, W multiples of 8 -> (mean, std) of the diagonal
    /// Gaussian posterior over latents, each (N, 4, H/8, W/8), with std = exp(logvar / 2) and
    /// logvar clamped to [-30, 20] as diffusers does. Cast and `no_grad` as in [`Self::decode`].
    pub fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let x = x.to_kind(self.quant_conv.ws.kind());
            let moments = self.encoder.forward(&x).apply(&self.quant_conv);
            let mean = moments.narrow(1, 0, self.latent_channels);
            let logvar = moments.narrow(1, self.latent_channels, self.latent_channels);
            let std = (logvar.clamp(-30.0, 20.0) * 0.5).exp();
            (mean, std)
        })
    }
}

/// The mid-block attention parameter names of diffusers' old `AttentionBlock`, which files saved
/// before its attention refactor (such as sd-vae-ft-ema / sd-vae-ft-mse) still carry, and their
/// current names; diffusers renames them the same way on load (`_fix_state_dict_keys_on_load`).
const LEGACY_ATTENTION: [(&str, &str); 4] = [
    ("query", "to_q"),
    ("key", "to_k"),
    ("value", "to_v"),
    ("proj_attn", "to_out.0"),
];

/// A diffusers state dict with its attention parameters under today's names: `...attentions.N.query`
/// (`key`, `value`, `proj_attn`) become `to_q` (`to_k`, `to_v`, `to_out.0`), and projection weights
/// stored as 1x1 convolutions, (C, C, 1, 1), become the (C, C) matrices they are. Other names pass
/// through untouched (strictness is left to the loader); a name present in both spellings is an error.
pub fn modern_attention_names(tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, tensor) in tensors {
        let (name, projection) = match attention_parameter(&name) {
            Some((block, leaf, param)) => {
                let leaf = LEGACY_ATTENTION
                    .iter()
                    .find(|(old, _)| *old == leaf)
                    .map_or(leaf, |(_, new)| new);
                let is_projection = leaf != "group_norm";
                (format!("{block}.{leaf}.{param}"), is_projection)
            }
            None => (name, false),
        };
        let size = tensor.size();
        let tensor = if projection && size.len() == 4 && size[2..] == [1, 1] {
            tensor.reshape([size[0], size[1]])
        } else {
            tensor
        };
        if out.contains_key(&name) {
            bail!("{name} is in the file under both its old and its new attention name");
        }
        out.insert(name, tensor);
    }
    Ok(out.into_iter().collect())
}

/// `(block, leaf, param)` of a name `<block>.<leaf>.<param>` whose block ends in `attentions.<i>`.
fn attention_parameter(name: &str) -> Option<(&str, &str, &str)> {
    let (rest, param) = name.rsplit_once('.')?;
    // `to_out.0` has a dot of its own.
    let (block, leaf) = match rest.strip_suffix(".to_out.0") {
        Some(block) => (block, "to_out.0"),
        None => rest.rsplit_once('.')?,
    };
    let (parent, index) = block.rsplit_once('.')?;
    let in_attention = (parent == "attentions" || parent.ends_with(".attentions"))
        && index.bytes().all(|b| b.is_ascii_digit());
    in_attention.then_some((block, leaf, param))
}

/// Images in [-1, 1] (N, 3, H, W), any float dtype -> uint8 (N, H, W, 3) on the same device, as
/// the REPA / MeanFlow-PyTorch sample scripts (and DiT's before them) write their .npz:
/// `clamp(127.5 * x + 128, 0, 255)` then a cast to uint8, which truncates, so that is
/// round-half-up of 127.5 * (x + 1). ADM's own sampler writes `((x + 1) * 127.5).clamp(0, 255)`
/// cast to uint8, i.e. floor: half a level darker on average; we follow the PyTorch port, whose
/// numbers the paper's comparison rests on. NaN maps to whatever the cast makes of it.
pub fn to_uint8_nhwc(images: &Tensor) -> Tensor {
    (images.to_kind(Kind::Float) * 127.5 + 128.0)
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
}

/// How the SD-VAE decodes on CUDA (on a CPU it is always float32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodePrecision {
    /// float32 throughout.
    F32,
    /// float32 with TF32 matrix products and convolutions: how both references decode (the
    /// PyTorch port's `--tf32` default and PyTorch's cuDNN default; XLA's default precision),
    /// and so how the sample stage decodes.
    Tf32,
    /// bf16 autocast.
    Bf16,
}

/// SD-VAE latents (times 0.18215) as uint8 NHWC images.
pub fn decode_latents(
    net: &AutoencoderKl,
    x: &Tensor,
    precision: DecodePrecision,
) -> anyhow::Result<Tensor> {
    let decode = || {
        let images =
            crate::device::autocast_bf16(x.device(), precision == DecodePrecision::Bf16, || {
                Ok(tch::no_grad(|| {
                    net.decode(&(x.to_kind(Kind::Float) / SCALING_FACTOR))
                }))
            })?;
        Ok(to_uint8_nhwc(&images))
    };
    match x.device() {
        Device::Cuda(_) => crate::device::with_tf32(precision == DecodePrecision::Tf32, decode),
        _ => decode(),
    }
}
