//! imfDiT, the improved-MeanFlow network (Geng et al. 2025, "Improved Mean Flows"; official
//! models/imfDiT.py): in-context conditioning instead of adaLN. Class, guidance-scale, interval
//! and time embeddings are added to learned tokens prepended to the patch tokens; no absolute
//! position embedding, 1-D RoPE over the whole sequence; RMSNorm, per-head QK-RMSNorm, SwiGLU,
//! per-channel residual gates; a shared trunk, then a u-head (the average velocity) and a
//! v-head (the instantaneous velocity, an auxiliary of training; inference checkpoints lack it).
//!
//! Module paths equal the state-dict keys of the official PyTorch inference port (branch `torch`
//! of Lyy-iiis/imeanflow), whose `iMeanFlow` keeps this network as `net`: `net.x_embedder.proj.
//! weight`, `net.shared_blocks.0.attn.q_proj._flax_linear.weight`, ... (the `_flax_linear` /
//! `_flax_embedding` levels are the port's wrappers). The network is conditioned on h = t - r,
//! never on t itself (the official forward takes t and ignores it).
//!
//! The forward is written once over [`ImfOps`] (a [`MaybeDual`]): with plain tensors it is the
//! network in ATen ops (forward-mode AD runs through it with the explicit attention kernel);
//! with [`Dual`] values it carries du/dt beside u by hand-written tangent rules, so both of
//! MeanFlow's JVP methods work for iMF (tests/imf_net.rs checks one against the other).
//!
//! Precision: the sinusoids of the four scalar embedders are computed in the dtype
//! [`TimeEmbedding`] names (float32 as the official code; float64 for its float64 golden steps);
//! the RoPE table is computed once in float64 and cast on use to the dtype the rotation runs in
//! (the network's, float32 for half types, as the official code rotates in float32); RMSNorms run
//! in the network's dtype (float32 for half inputs). Under bf16 autocast the linear layers and
//! attention run in bf16, everything else in float32.
pub mod ops;

pub use ops::ImfOps;

use super::attention::AttentionKernel;
use super::dual::Dual;
use super::embed::{PatchEmbed, FREQUENCY_DIM};
use super::sit::{unpatchify, TimeEmbedding};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// RMSNorm epsilon of every norm (official `RMSNorm.eps`).
pub const RMS_NORM_EPS: f64 = 1e-6;
/// RoPE base (official `precompute_rope_freqs`).
pub const ROPE_THETA: f64 = 10000.0;
/// Init constants of the official imfDiT: learned tokens and embedders ~ N(0, c^2 / D), block
/// linear layers ~ N(0, 0.32^2 / fan_in).
const TOKEN_INIT: f64 = 1.0;
const EMBEDDING_INIT: f64 = 1.0;
const BLOCK_INIT: f64 = 0.32;

/// The network's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImfDiTConfig {
    pub input_size: i64,
    pub patch_size: i64,
    pub in_channels: i64,
    pub hidden_size: i64,
    /// Blocks in all: the shared trunk has depth - aux_head_depth, each head aux_head_depth.
    pub depth: i64,
    pub num_heads: i64,
    pub aux_head_depth: i64,
    pub num_classes: i64,
    pub num_class_tokens: i64,
    pub num_time_tokens: i64,
    pub num_cfg_tokens: i64,
    /// Tokens of t_min, and as many of t_max.
    pub num_interval_tokens: i64,
    pub time_embedding: TimeEmbedding,
    /// Whether the v-head's blocks exist (training); inference checkpoints have none. The
    /// v-head's final layer exists either way, as in the official inference network.
    pub v_head: bool,
}

/// (name, depth, hidden, heads, patch, aux_head_depth). The iMF-* rows are the official
/// models/imfDiT.py presets imfDiT_{B,M,L,XL}_2 (iMF paper Table 4); every one has 8/4/4/2
/// class/time/cfg/interval tokens and SwiGLU hidden int(8/3 D) (the imfDiT defaults). The small
/// ones are ours, for CPU tests and the digits demo.
pub const PRESETS: &[(&str, i64, i64, i64, i64, i64)] = &[
    ("iMF-B/2", 12, 768, 12, 2, 8),
    ("iMF-M/2", 24, 768, 12, 2, 8),
    ("iMF-L/2", 32, 1024, 16, 2, 8),
    ("iMF-XL/2", 48, 1024, 16, 2, 8),
    ("iMF-tiny/2", 4, 128, 4, 2, 2),
    ("iMF-micro/2", 2, 32, 2, 2, 1),
];

impl ImfDiTConfig {
    /// A preset over ImageNet-256 SD-VAE latents (32 x 32 x 4, 1000 classes), with its v-head.
    pub fn preset(name: &str) -> Option<Self> {
        let &(_, depth, hidden_size, num_heads, patch_size, aux_head_depth) =
            PRESETS.iter().find(|row| row.0 == name)?;
        Some(Self {
            input_size: 32,
            patch_size,
            in_channels: 4,
            hidden_size,
            depth,
            num_heads,
            aux_head_depth,
            num_classes: 1000,
            num_class_tokens: 8,
            num_time_tokens: 4,
            num_cfg_tokens: 4,
            num_interval_tokens: 2,
            time_embedding: TimeEmbedding::Float32,
            v_head: true,
        })
    }

    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|row| row.0).collect()
    }

    /// Why this shape cannot be built, if it cannot (checked before any allocation).
    pub fn check(&self) -> Result<()> {
        let positive = [
            ("input_size", self.input_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("num_classes", self.num_classes),
        ];
        for (name, v) in positive {
            if v < 1 {
                bail!("the iMF network's {name} must be positive, got {v}");
            }
        }
        if self.aux_head_depth < 1 || self.aux_head_depth > self.depth {
            bail!(
                "the iMF network's heads have aux_head_depth {} blocks of its depth {}: it must be between 1 and the depth",
                self.aux_head_depth,
                self.depth
            );
        }
        if self.input_size % self.patch_size != 0 {
            bail!(
                "the iMF network's input size {} is not a multiple of its patch size {}",
                self.input_size,
                self.patch_size
            );
        }
        if self.hidden_size % self.num_heads != 0 || self.head_dim() % 2 != 0 {
            bail!(
                "the iMF network's hidden size {} must split into {} heads of an even size (RoPE rotates pairs)",
                self.hidden_size,
                self.num_heads
            );
        }
        let tokens = [
            self.num_class_tokens,
            self.num_time_tokens,
            self.num_cfg_tokens,
            self.num_interval_tokens,
        ];
        if tokens.iter().any(|&n| n < 1) {
            bail!("the iMF network needs at least one token of each conditioning group, got class/time/cfg/interval {tokens:?}");
        }
        Ok(())
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    /// SwiGLU's hidden width, int(D * 8/3) as the official `int(hidden_size * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> i64 {
        (self.hidden_size as f64 * (8.0 / 3.0)) as i64
    }

    pub fn shared_depth(&self) -> i64 {
        self.depth - self.aux_head_depth
    }

    pub fn grid(&self) -> i64 {
        self.input_size / self.patch_size
    }

    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }

    /// The conditioning tokens before the patches: class, cfg, t_min, t_max, time.
    pub fn prefix_tokens(&self) -> i64 {
        self.num_class_tokens
            + self.num_cfg_tokens
            + 2 * self.num_interval_tokens
            + self.num_time_tokens
    }

    pub fn total_tokens(&self) -> i64 {
        self.prefix_tokens() + self.num_patches()
    }

    /// The null class of classifier-free guidance: index num_classes.
    pub fn null_class(&self) -> i64 {
        self.num_classes
    }

    /// The parameter count, in f64 so no shape overflows it (memory estimates before building).
    pub fn parameters(&self) -> f64 {
        let d = self.hidden_size as f64;
        let out = (self.patch_size * self.patch_size * self.in_channels) as f64;
        let hm = self.mlp_hidden() as f64;
        let block = 4.0 * d * d + 3.0 * d * hm + 4.0 * d + 2.0 * self.head_dim() as f64;
        let blocks = self.shared_depth() + self.aux_head_depth * (1 + self.v_head as i64);
        out * d
            + d
            + 4.0 * (FREQUENCY_DIM as f64 * d + d * d + 2.0 * d)
            + (self.num_classes + 1) as f64 * d
            + self.prefix_tokens() as f64 * d
            + blocks as f64 * block
            + 2.0 * (d + d * out + out)
    }
}

/// `TorchLinear`: a Dense at `<p>._flax_linear`, weights ~ N(0, std^2) (zero when None),
/// biases zero.
fn flax_linear(p: nn::Path, fan_in: i64, fan_out: i64, std: Option<f64>, bias: bool) -> nn::Linear {
    let ws_init = match std {
        Some(stdev) => nn::Init::Randn { mean: 0.0, stdev },
        None => nn::Init::Const(0.0),
    };
    let config = nn::LinearConfig {
        ws_init,
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(p / "_flax_linear", fan_in, fan_out, config)
}

/// Scaled-variance init of a TorchLinear: N(0, (c / sqrt(fan_in))^2).
fn scaled(c: f64, fan_in: i64) -> Option<f64> {
    Some(c / (fan_in as f64).sqrt())
}

fn rms_weight(p: &nn::Path, dim: i64) -> Tensor {
    p.var("weight", &[dim], nn::Init::Const(1.0))
}

/// `Linear(256 -> D) - SiLU - Linear(D -> D)` over [cos(s f), sin(s f)] of a scalar s.
#[derive(Debug)]
struct ScalarEmbedder {
    fc0: nn::Linear,
    fc2: nn::Linear,
    kind: Kind,
}

impl ScalarEmbedder {
    fn new(p: nn::Path, hidden: i64, kind: Kind) -> Self {
        let mlp = p / "mlp";
        Self {
            fc0: flax_linear(
                &mlp / "0",
                FREQUENCY_DIM,
                hidden,
                scaled(EMBEDDING_INIT, FREQUENCY_DIM),
                true,
            ),
            fc2: flax_linear(
                &mlp / "2",
                hidden,
                hidden,
                scaled(EMBEDDING_INIT, hidden),
                true,
            ),
            kind,
        }
    }

    fn forward<V: ImfOps>(&self, s: &V) -> V {
        s.sinusoid(FREQUENCY_DIM, self.kind)
            .linear(&self.fc0)
            .silu()
            .linear(&self.fc2)
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    heads: i64,
}

impl Attention {
    fn new(p: nn::Path, hidden: i64, heads: i64) -> Self {
        let proj =
            |name: &str| flax_linear(&p / name, hidden, hidden, scaled(BLOCK_INIT, hidden), false);
        let head_dim = hidden / heads;
        Self {
            q_proj: proj("q_proj"),
            k_proj: proj("k_proj"),
            v_proj: proj("v_proj"),
            out_proj: proj("out_proj"),
            q_norm: rms_weight(&(&p / "q_norm"), head_dim),
            k_norm: rms_weight(&(&p / "k_norm"), head_dim),
            heads,
        }
    }

    /// (N, T, D) -> (N, T, D): q, k RMS-normalised per head, rotated, full attention.
    fn forward<V: ImfOps>(&self, x: &V, rope: &(Tensor, Tensor), kernel: AttentionKernel) -> V {
        // Shapes with the batch left free (-1): a tangent may cover fewer rows than its value.
        let (_, t, d) = x.primal().size3().expect("attention input is (N, T, D)");
        let (heads, head_dim) = (self.heads, d / self.heads);
        let split = |y: &Tensor| y.reshape([-1, t, heads, head_dim]);
        let (cos, sin) = rope;
        // (N, T, heads, hd) -> (N, heads, T, hd) after the norm and the rotation.
        let qk = |proj: &nn::Linear, norm: &Tensor| {
            x.linear(proj)
                .map(split)
                .rms_norm(norm, RMS_NORM_EPS)
                .map(|y| ops::rotate(y, cos, sin).transpose(1, 2))
        };
        let q = qk(&self.q_proj, &self.q_norm);
        let k = qk(&self.k_proj, &self.k_norm);
        let v = x.linear(&self.v_proj).map(|y| split(y).transpose(1, 2));
        let scale = (head_dim as f64).powf(-0.5);
        let out = V::attention(&q, &k, &v, scale, kernel == AttentionKernel::Fused);
        out.map(|o| o.transpose(1, 2).reshape([-1, t, d]))
            .linear(&self.out_proj)
    }
}

#[derive(Debug)]
struct SwiGlu {
    w1: nn::Linear,
    w2: nn::Linear,
    w3: nn::Linear,
}

impl SwiGlu {
    fn new(p: nn::Path, hidden: i64, inner: i64) -> Self {
        Self {
            w1: flax_linear(&p / "w1", hidden, inner, scaled(BLOCK_INIT, hidden), false),
            w2: flax_linear(&p / "w2", inner, hidden, scaled(BLOCK_INIT, inner), false),
            w3: flax_linear(&p / "w3", hidden, inner, scaled(BLOCK_INIT, hidden), false),
        }
    }

    fn forward<V: ImfOps>(&self, x: &V) -> V {
        x.linear(&self.w1)
            .silu()
            .mul(&x.linear(&self.w3))
            .linear(&self.w2)
    }
}

/// x + attn(norm1 x) * attn_scale; x + mlp(norm2 x) * mlp_scale (gates zero-initialised).
#[derive(Debug)]
struct Block {
    norm1: Tensor,
    attn: Attention,
    norm2: Tensor,
    mlp: SwiGlu,
    attn_scale: Tensor,
    mlp_scale: Tensor,
}

impl Block {
    fn new(p: nn::Path, c: &ImfDiTConfig) -> Self {
        let d = c.hidden_size;
        Self {
            norm1: rms_weight(&(&p / "norm1"), d),
            attn: Attention::new(&p / "attn", d, c.num_heads),
            norm2: rms_weight(&(&p / "norm2"), d),
            mlp: SwiGlu::new(&p / "mlp", d, c.mlp_hidden()),
            attn_scale: p.var("attn_scale", &[d], nn::Init::Const(0.0)),
            mlp_scale: p.var("mlp_scale", &[d], nn::Init::Const(0.0)),
        }
    }

    fn forward<V: ImfOps>(&self, x: &V, rope: &(Tensor, Tensor), kernel: AttentionKernel) -> V {
        let attn = self
            .attn
            .forward(&x.rms_norm(&self.norm1, RMS_NORM_EPS), rope, kernel);
        let x = x.add(&attn.scaled(&self.attn_scale));
        let mlp = self.mlp.forward(&x.rms_norm(&self.norm2, RMS_NORM_EPS));
        x.add(&mlp.scaled(&self.mlp_scale))
    }
}

/// RMSNorm then a zero-initialised Linear D -> p*p*C.
#[derive(Debug)]
struct FinalLayer {
    norm: Tensor,
    linear: nn::Linear,
}

impl FinalLayer {
    fn new(p: nn::Path, hidden: i64, out: i64) -> Self {
        Self {
            norm: rms_weight(&(&p / "norm"), hidden),
            linear: flax_linear(&p / "linear", hidden, out, None, true),
        }
    }

    fn forward<V: ImfOps>(&self, x: &V) -> V {
        x.rms_norm(&self.norm, RMS_NORM_EPS).linear(&self.linear)
    }
}

/// What the network is conditioned on besides the image and h: per-sample (N,) guidance scale
/// omega, interval [t_min, t_max] and class labels (int64, num_classes = null). None carries a
/// tangent (the JVP is along z and h only).
pub struct Conditions<'a> {
    pub omega: &'a Tensor,
    pub t_min: &'a Tensor,
    pub t_max: &'a Tensor,
    pub y: &'a Tensor,
}

/// Which outputs a call computes: the heads share the trunk, so asking for one saves the other's
/// blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    U,
    V,
    Both,
}

/// The improved-MeanFlow network (u, v)(z, h, omega, t_min, t_max | y).
#[derive(Debug)]
pub struct ImfDiT {
    pub config: ImfDiTConfig,
    x_embedder: PatchEmbed,
    h_embedder: ScalarEmbedder,
    omega_embedder: ScalarEmbedder,
    cfg_t_start_embedder: ScalarEmbedder,
    cfg_t_end_embedder: ScalarEmbedder,
    y_embedding: Tensor,
    class_tokens: Tensor,
    omega_tokens: Tensor,
    t_min_tokens: Tensor,
    t_max_tokens: Tensor,
    time_tokens: Tensor,
    shared_blocks: Vec<Block>,
    u_heads: Vec<Block>,
    v_heads: Vec<Block>,
    u_final_layer: FinalLayer,
    v_final_layer: FinalLayer,
    /// cos and sin of the RoPE angles, (total_tokens, head_dim / 2), float64.
    rope: (Tensor, Tensor),
}

impl ImfDiT {
    /// The network under `p / "net"` (so its variables are named as the official port's state
    /// dict), initialised as the official code does: scaled-variance normal linear layers and
    /// tokens, Xavier-uniform patch embedding, zero biases, gates and final layers (a fresh
    /// network outputs exactly zero), unit RMSNorm scales. Err: a shape [`ImfDiTConfig::check`]
    /// refuses.
    pub fn new(p: &nn::Path, config: &ImfDiTConfig) -> Result<Self> {
        config.check()?;
        let c = config;
        let p = p / "net";
        let d = c.hidden_size;
        let kind = match c.time_embedding {
            TimeEmbedding::Float32 => Kind::Float,
            TimeEmbedding::Float64 => Kind::Double,
        };
        let embedder = |name: &str| ScalarEmbedder::new(&p / name, d, kind);
        let token_init = nn::Init::Randn {
            mean: 0.0,
            stdev: TOKEN_INIT / (d as f64).sqrt(),
        };
        let tokens = |name: &str, n: i64| p.var(name, &[n, d], token_init);
        let blocks = |name: &str, n: i64| -> Vec<Block> {
            (0..n).map(|i| Block::new(&p / name / i, c)).collect()
        };
        let out = c.patch_size * c.patch_size * c.in_channels;
        let y_init = nn::Init::Randn {
            mean: 0.0,
            stdev: EMBEDDING_INIT / (d as f64).sqrt(),
        };
        Ok(Self {
            x_embedder: PatchEmbed::new(&p / "x_embedder", c.in_channels, d, c.patch_size),
            h_embedder: embedder("h_embedder"),
            omega_embedder: embedder("omega_embedder"),
            cfg_t_start_embedder: embedder("cfg_t_start_embedder"),
            cfg_t_end_embedder: embedder("cfg_t_end_embedder"),
            y_embedding: (&p / "y_embedder" / "embedding_table" / "_flax_embedding").var(
                "weight",
                &[c.num_classes + 1, d],
                y_init,
            ),
            class_tokens: tokens("class_tokens", c.num_class_tokens),
            omega_tokens: tokens("omega_tokens", c.num_cfg_tokens),
            t_min_tokens: tokens("t_min_tokens", c.num_interval_tokens),
            t_max_tokens: tokens("t_max_tokens", c.num_interval_tokens),
            time_tokens: tokens("time_tokens", c.num_time_tokens),
            shared_blocks: blocks("shared_blocks", c.shared_depth()),
            u_heads: blocks("u_heads", c.aux_head_depth),
            v_heads: blocks("v_heads", if c.v_head { c.aux_head_depth } else { 0 }),
            u_final_layer: FinalLayer::new(&p / "u_final_layer", d, out),
            v_final_layer: FinalLayer::new(&p / "v_final_layer", d, out),
            rope: ops::rope_table(c.head_dim(), c.total_tokens(), ROPE_THETA),
            config: c.clone(),
        })
    }

    /// The RoPE table the network uses, (cos, sin), each (total_tokens, head_dim / 2), float64.
    pub fn rope_table(&self) -> &(Tensor, Tensor) {
        &self.rope
    }

    /// u and v (None without a v-head) of x (N, C, H, W) at h = t - r (N,).
    pub fn forward(
        &self,
        x: &Tensor,
        h: &Tensor,
        cond: &Conditions,
        heads: Heads,
        kernel: AttentionKernel,
    ) -> (Option<Tensor>, Option<Tensor>) {
        self.run(x, h, cond, heads, kernel)
    }

    /// u with its directional derivative along the tangents of (x, h), and v (without tangent;
    /// None without a v-head), in one pass. Only the primals carry autograd history.
    pub fn forward_dual(
        &self,
        x: &Dual,
        h: &Dual,
        cond: &Conditions,
        heads: Heads,
        kernel: AttentionKernel,
    ) -> (Option<Dual>, Option<Tensor>) {
        let (u, v) = self.run(x, h, cond, heads, kernel);
        (u, v.map(|v| v.primal))
    }

    /// The token sequence [class, omega, t_min, t_max, time, patches], (N, T, D).
    fn sequence<V: ImfOps>(&self, x: &V, h: &V, cond: &Conditions) -> V {
        let c = V::constant;
        // Each group: its learned tokens plus its embedding, broadcast over the group.
        let group = |tokens: &Tensor, emb: V| {
            let n = tokens.size()[0];
            emb.map(|e| e.unsqueeze(1).expand([-1, n, -1], false))
                .add(&c(tokens.shallow_clone()))
        };
        let y = Tensor::embedding(&self.y_embedding, cond.y, -1, false, false);
        let omega = 1.0 - cond.omega.reciprocal();
        let parts = [
            group(&self.class_tokens, c(y)),
            group(&self.omega_tokens, self.omega_embedder.forward(&c(omega))),
            group(
                &self.t_min_tokens,
                self.cfg_t_start_embedder
                    .forward(&c(cond.t_min.shallow_clone())),
            ),
            group(
                &self.t_max_tokens,
                self.cfg_t_end_embedder
                    .forward(&c(cond.t_max.shallow_clone())),
            ),
            group(&self.time_tokens, self.h_embedder.forward(h)),
            self.x_embedder.forward(x),
        ];
        V::cat(&parts, 1)
    }

    fn run<V: ImfOps>(
        &self,
        x: &V,
        h: &V,
        cond: &Conditions,
        heads: Heads,
        kernel: AttentionKernel,
    ) -> (Option<V>, Option<V>) {
        let mut trunk = self.sequence(x, h, cond);
        // Angles depend on the position only: the table's first T rows serve any input up to
        // the configured size.
        let tokens = trunk.primal().size()[1];
        let rows = self.rope.0.size()[0];
        assert!(
            tokens <= rows,
            "an input of {tokens} tokens is larger than the iMF network's configured {rows}"
        );
        let device = x.primal().device();
        let rope = (
            self.rope.0.narrow(0, 0, tokens).to_device(device),
            self.rope.1.narrow(0, 0, tokens).to_device(device),
        );
        for block in &self.shared_blocks {
            trunk = block.forward(&trunk, &rope, kernel);
        }
        let c = &self.config;
        let prefix = c.prefix_tokens();
        let patches = tokens - prefix;
        let (patch, channels) = (c.patch_size, c.in_channels);
        let head = |mut seq: V, blocks: &[Block], last: &FinalLayer| {
            for block in blocks {
                seq = block.forward(&seq, &rope, kernel);
            }
            last.forward(&seq.map(|s| s.narrow(1, prefix, patches)))
                .map(|o| unpatchify(o, patch, channels))
        };
        let want_v = matches!(heads, Heads::V | Heads::Both) && c.v_head;
        // The v-head is never differentiated along the tangent: it gets the trunk's primal.
        let v = want_v.then(|| {
            head(
                V::constant(trunk.primal().shallow_clone()),
                &self.v_heads,
                &self.v_final_layer,
            )
        });
        let u = matches!(heads, Heads::U | Heads::Both)
            .then(|| head(trunk, &self.u_heads, &self.u_final_layer));
        (u, v)
    }
}
