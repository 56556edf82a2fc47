//! SiT with adaLN-Zero blocks, conditioned on (t, r) through separate time embedders, as MeanFlow
//! trains it. Module paths equal the PyTorch state-dict keys (`blocks.3.attn.qkv.weight`, ...).
use super::attention::{Attention, AttentionKernel};
use super::dual::{Dual, MaybeDual};
use super::embed::{linear, xavier, LabelEmbedder, PatchEmbed, TimestepEmbedder};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Which functions of (t, r) the network embeds (paper Table 1c). Each gets its own embedder:
/// `t_embedder` for t, `h_embedder` for t - r (the official default), `r_embedder` for r.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Conditioning {
    #[serde(rename = "t,r")]
    TR,
    #[serde(rename = "t,t-r")]
    THalf,
    #[serde(rename = "t,r,t-r")]
    TRH,
    #[serde(rename = "t-r")]
    H,
}

impl Conditioning {
    fn embeds_t(self) -> bool {
        !matches!(self, Conditioning::H)
    }
    fn embeds_h(self) -> bool {
        !matches!(self, Conditioning::TR)
    }
    fn embeds_r(self) -> bool {
        matches!(self, Conditioning::TR | Conditioning::TRH)
    }
}

/// The dtype the timestep sinusoid is computed in. Both references compute it in float32 (also
/// in a float64 network); the official code's float64 golden steps computed it in float64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeEmbedding {
    #[default]
    Float32,
    Float64,
}

/// How the time embedders start: as the PyTorch port (t_embedder N(0, 0.02), h_embedder
/// Xavier-uniform) or as the official code (both N(0, 0.02)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderInit {
    #[default]
    Port,
    Official,
}

/// The network's shape. `mlp_ratio` is 4 in every SiT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiTConfig {
    pub input_size: i64,
    pub patch_size: i64,
    pub in_channels: i64,
    pub hidden_size: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub num_classes: i64,
    pub conditioning: Conditioning,
    pub time_embedding: TimeEmbedding,
    pub embedder_init: EmbedderInit,
}

/// (depth, hidden, heads, patch). Paper Table 4 for the SiT-* rows; the small ones are ours, for
/// CPU tests, benchmarks and the digits demo.
pub const PRESETS: &[(&str, i64, i64, i64, i64)] = &[
    ("SiT-B/4", 12, 768, 12, 4),
    ("SiT-B/2", 12, 768, 12, 2),
    ("SiT-M/2", 16, 1024, 16, 2),
    ("SiT-L/2", 24, 1024, 16, 2),
    ("SiT-XL/2", 28, 1152, 16, 2),
    // The network of XL/2, trained for 1000 epochs (Table 4's last row).
    ("SiT-XL/2+", 28, 1152, 16, 2),
    ("tiny/2", 4, 128, 4, 2),
    ("micro/2", 2, 32, 2, 2),
];

impl SiTConfig {
    /// A preset over ImageNet-256 SD-VAE latents (32 x 32 x 4, 1000 classes).
    pub fn preset(name: &str) -> Option<Self> {
        let &(_, depth, hidden_size, num_heads, patch_size) =
            PRESETS.iter().find(|row| row.0 == name)?;
        Some(Self {
            input_size: 32,
            patch_size,
            in_channels: 4,
            hidden_size,
            depth,
            num_heads,
            num_classes: 1000,
            conditioning: Conditioning::THalf,
            time_embedding: TimeEmbedding::Float32,
            embedder_init: EmbedderInit::Port,
        })
    }

    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|row| row.0).collect()
    }

    pub fn grid(&self) -> i64 {
        self.input_size / self.patch_size
    }

    /// The network's parameter count (the fixed position table included), in f64 so that no
    /// shape can overflow it: what memory checks estimate from before building the network.
    pub fn parameters(&self) -> f64 {
        let d = self.hidden_size as f64;
        let patch_out = (self.patch_size * self.patch_size * self.in_channels) as f64;
        let tokens = (self.grid() * self.grid()) as f64;
        let embedders = [
            self.conditioning.embeds_t(),
            self.conditioning.embeds_h(),
            self.conditioning.embeds_r(),
        ]
        .iter()
        .filter(|&&on| on)
        .count() as f64;
        let block = 18.0 * d * d + 15.0 * d;
        patch_out * d
            + d
            + tokens * d
            + embedders * (256.0 * d + d * d + 2.0 * d)
            + (self.num_classes + 1) as f64 * d
            + self.depth as f64 * block
            + 2.0 * d * d
            + 2.0 * d
            + d * patch_out
            + patch_out
    }

    /// The null class of classifier-free guidance: index num_classes.
    pub fn null_class(&self) -> i64 {
        self.num_classes
    }
}

#[derive(Debug)]
struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, hidden: i64) -> Self {
        let inner = 4 * hidden;
        Self {
            fc1: linear(&p / "fc1", hidden, inner, xavier(hidden, inner)),
            fc2: linear(&p / "fc2", inner, hidden, xavier(inner, hidden)),
        }
    }

    fn forward<V: MaybeDual>(&self, x: &V) -> V {
        x.linear(&self.fc1).gelu_tanh().linear(&self.fc2)
    }
}

/// `adaLN_modulation = Sequential(SiLU, Linear)`, zero-initialised (adaLN-Zero): the SiLU is
/// applied once to the conditioning and shared by all blocks.
fn modulation(p: nn::Path, hidden: i64, chunks: i64) -> nn::Linear {
    linear(
        p / "adaLN_modulation" / "1",
        hidden,
        chunks * hidden,
        nn::Init::Const(0.0),
    )
}

#[derive(Debug)]
struct Block {
    attn: Attention,
    mlp: Mlp,
    ada_ln: nn::Linear,
}

impl Block {
    fn new(p: nn::Path, hidden: i64, heads: i64) -> Self {
        Self {
            attn: Attention::new(&p / "attn", hidden, heads),
            mlp: Mlp::new(&p / "mlp", hidden),
            ada_ln: modulation(p, hidden, 6),
        }
    }

    fn forward<V: MaybeDual>(&self, x: &V, c_silu: &V, kernel: AttentionKernel) -> V {
        let m = c_silu.linear(&self.ada_ln).chunk(6);
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let x = x.gated_add(
            gate_msa,
            &self
                .attn
                .forward(&x.normalized().modulate(shift_msa, scale_msa), kernel),
        );
        x.gated_add(
            gate_mlp,
            &self
                .mlp
                .forward(&x.normalized().modulate(shift_mlp, scale_mlp)),
        )
    }
}

#[derive(Debug)]
struct FinalLayer {
    linear: nn::Linear,
    ada_ln: nn::Linear,
}

impl FinalLayer {
    fn new(p: nn::Path, hidden: i64, out: i64) -> Self {
        Self {
            linear: linear(&p / "linear", hidden, out, nn::Init::Const(0.0)),
            ada_ln: modulation(p, hidden, 2),
        }
    }

    fn forward<V: MaybeDual>(&self, x: &V, c_silu: &V) -> V {
        let m = c_silu.linear(&self.ada_ln).chunk(2);
        x.normalized().modulate(&m[0], &m[1]).linear(&self.linear)
    }
}

/// The MeanFlow network u_theta(z, r, t | y).
#[derive(Debug)]
pub struct SiT {
    pub config: SiTConfig,
    x_embedder: PatchEmbed,
    pos_embed: Tensor,
    t_embedder: Option<TimestepEmbedder>,
    h_embedder: Option<TimestepEmbedder>,
    r_embedder: Option<TimestepEmbedder>,
    y_embedder: LabelEmbedder,
    blocks: Vec<Block>,
    final_layer: FinalLayer,
}

impl SiT {
    /// A network initialised for training as the reference does: Xavier-uniform linear layers,
    /// N(0, 0.02) label table and t-embedder, zero adaLN modulations and output layer, so a fresh
    /// network outputs exactly zero.
    pub fn new(p: &nn::Path, config: &SiTConfig) -> Self {
        let c = config;
        let d = c.hidden_size;
        assert!(
            d % c.num_heads == 0,
            "hidden size {d} is not divisible by {} heads",
            c.num_heads
        );
        assert!(
            c.input_size % c.patch_size == 0,
            "input size is not divisible by the patch size"
        );
        let grid = c.grid();
        let mut pos_embed = p.zeros_no_train("pos_embed", &[1, grid * grid, d]);
        tch::no_grad(|| pos_embed.copy_(&super::embed::sincos_pos_embed(d, grid).unsqueeze(0)));
        // The PyTorch port draws t_embedder from N(0, 0.02) and leaves h_embedder (and r)
        // Xavier-uniform; the official code draws both time embedders from N(0, 0.02).
        let kind = match c.time_embedding {
            TimeEmbedding::Float32 => Kind::Float,
            TimeEmbedding::Float64 => Kind::Double,
        };
        let others = match c.embedder_init {
            EmbedderInit::Port => None,
            EmbedderInit::Official => Some(0.02),
        };
        let embedder = |name: &str, on: bool, stdev| {
            on.then(|| TimestepEmbedder::new(p / name, d, stdev, kind))
        };
        Self {
            x_embedder: PatchEmbed::new(p / "x_embedder", c.in_channels, d, c.patch_size),
            pos_embed,
            t_embedder: embedder("t_embedder", c.conditioning.embeds_t(), Some(0.02)),
            h_embedder: embedder("h_embedder", c.conditioning.embeds_h(), others),
            r_embedder: embedder("r_embedder", c.conditioning.embeds_r(), others),
            y_embedder: LabelEmbedder::new(p / "y_embedder", c.num_classes, d),
            blocks: (0..c.depth)
                .map(|i| Block::new(p / "blocks" / i, d, c.num_heads))
                .collect(),
            final_layer: FinalLayer::new(
                p / "final_layer",
                d,
                c.patch_size * c.patch_size * c.in_channels,
            ),
            config: c.clone(),
        }
    }

    /// [`SiT::forward`] in plain ATen ops throughout, so that libtorch's forward-mode AD works
    /// through it (the reference path, `meanflow.jvp = "forward_ad"`).
    pub fn forward_aten(
        &self,
        x: &Tensor,
        t: &Tensor,
        r: &Tensor,
        y: &Tensor,
        kernel: AttentionKernel,
    ) -> Tensor {
        self.run(x, t, r, y, kernel)
    }

    /// u_theta(x, r, t | y): x (N, C, H, W), t and r (N,), y (N,) int64 (num_classes = null).
    /// By the fast path's ops ([`super::dual`]): the numbers of [`SiT::forward_aten`] (bit for
    /// bit in f32 and f64, and under bf16 autocast), less memory traffic under autocast.
    /// Autograd works through it; forward-mode AD does not.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        r: &Tensor,
        y: &Tensor,
        kernel: AttentionKernel,
    ) -> Tensor {
        let c = |v: &Tensor| Dual::constant(v.shallow_clone());
        self.run(&c(x), &c(t), &c(r), y, kernel).primal
    }

    /// u_theta and its directional derivative along the tangents of (x, t, r) in one pass; only
    /// the primal carries autograd history (see [`super::dual`]).
    pub fn forward_dual(
        &self,
        x: &Dual,
        t: &Dual,
        r: &Dual,
        y: &Tensor,
        kernel: AttentionKernel,
    ) -> Dual {
        self.run(x, t, r, y, kernel)
    }

    fn run<V: MaybeDual>(&self, x: &V, t: &V, r: &V, y: &Tensor, kernel: AttentionKernel) -> V {
        // c = emb_t(t) + emb_h(t - r) (+ emb_r(r)) + emb_y(y), summed in the reference's order.
        let h = || t.add(&r.map(|r| -r));
        let parts = [
            self.t_embedder.as_ref().map(|e| e.forward(t)),
            self.h_embedder.as_ref().map(|e| e.forward(&h())),
            self.r_embedder.as_ref().map(|e| e.forward(r)),
            Some(V::constant(self.y_embedder.forward(y))),
        ];
        let c = parts
            .into_iter()
            .flatten()
            .reduce(|sum, e| sum.add(&e))
            .expect("the label embedding is always there");
        let c_silu = c.silu();
        let mut h = self
            .x_embedder
            .forward(x)
            .add(&V::constant(self.pos_embed.shallow_clone()));
        for block in &self.blocks {
            h = block.forward(&h, &c_silu, kernel);
        }
        let (patch, channels) = (self.config.patch_size, self.config.in_channels);
        self.final_layer
            .forward(&h, &c_silu)
            .map(|x| unpatchify(x, patch, channels))
    }
}

/// (N, T, p*p*C) laid out as (h, w, p, q, c) -> (N, C, h*p, w*q).
pub fn unpatchify(x: &Tensor, patch: i64, channels: i64) -> Tensor {
    let (n, t, _) = x.size3().expect("tokens are (N, T, p*p*C)");
    let grid = (t as f64).sqrt() as i64;
    assert_eq!(grid * grid, t, "{t} tokens do not form a square grid");
    x.reshape([n, grid, grid, patch, patch, channels])
        .permute([0, 5, 1, 3, 2, 4])
        .reshape([n, channels, grid * patch, grid * patch])
}

/// The inverse of [`unpatchify`]: (N, C, H, W) -> (N, T, p*p*C).
pub fn patchify(x: &Tensor, patch: i64) -> Tensor {
    let (n, c, h, w) = x.size4().expect("images are (N, C, H, W)");
    x.reshape([n, c, h / patch, patch, w / patch, patch])
        .permute([0, 2, 4, 3, 5, 1])
        .reshape([n, (h / patch) * (w / patch), patch * patch * c])
}
