//! The SiT's input embeddings: patches, fixed 2-D sin-cos positions, scalar times, class labels.
use super::dual::MaybeDual;
use tch::{nn, Kind, Tensor};

/// Xavier-uniform bound for a (fan_out, fan_in) matrix: the init of every SiT linear layer.
pub(crate) fn xavier(fan_in: i64, fan_out: i64) -> nn::Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

pub(crate) fn linear(p: nn::Path, fan_in: i64, fan_out: i64, ws_init: nn::Init) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init,
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p, fan_in, fan_out, config)
}

/// `x_embedder.proj`: a conv with kernel = stride = patch, then tokens in row-major order.
#[derive(Debug)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch: i64,
}

impl PatchEmbed {
    pub fn new(p: nn::Path, in_channels: i64, hidden: i64, patch: i64) -> Self {
        let p = p / "proj";
        let fan_in = in_channels * patch * patch;
        // Initialised like a linear layer over the flattened patch, as the reference does.
        let weight = p.var(
            "weight",
            &[hidden, in_channels, patch, patch],
            xavier(fan_in, hidden),
        );
        let bias = p.var("bias", &[hidden], nn::Init::Const(0.0));
        Self {
            weight,
            bias,
            patch,
        }
    }

    /// (N, C, H, W) -> (N, T, D).
    pub fn forward<V: MaybeDual>(&self, x: &V) -> V {
        x.patch_conv(&self.weight, &self.bias, self.patch)
            .map(|t| t.flatten(2, 3).transpose(1, 2))
    }
}

/// The fixed (T, D) sin-cos table of MAE: the first half of the channels encodes a token's
/// column, the second half its row, each as [sin(pos w), cos(pos w)] with w_i = 10000^(-i/(D/4)).
/// The reference stores it as a float32 parameter, so the table is rounded through float32
/// whatever the network's dtype: a float64 port agrees with it only if it does the same.
pub fn sincos_pos_embed(hidden: i64, grid: i64) -> Tensor {
    assert!(
        hidden % 4 == 0,
        "hidden size {hidden} is not divisible by 4"
    );
    let quarter = hidden / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut table = Vec::with_capacity((grid * grid * hidden) as usize);
    for row in 0..grid {
        for col in 0..grid {
            for pos in [col as f64, row as f64] {
                table.extend(omega.iter().map(|w| (pos * w).sin()));
                table.extend(omega.iter().map(|w| (pos * w).cos()));
            }
        }
    }
    Tensor::from_slice(&table)
        .view([grid * grid, hidden])
        .to_kind(Kind::Float)
}

/// `Linear(256 -> D) - SiLU - Linear(D -> D)` over a sinusoidal embedding of a scalar time
/// (raw t in [0, 1], no x1000 scaling), the sinusoid computed in `kind`.
#[derive(Debug)]
pub struct TimestepEmbedder {
    fc0: nn::Linear,
    fc2: nn::Linear,
    kind: Kind,
}

pub const FREQUENCY_DIM: i64 = 256;

impl TimestepEmbedder {
    /// Weights from N(0, `stdev`), or Xavier-uniform where `stdev` is None.
    pub fn new(p: nn::Path, hidden: i64, stdev: Option<f64>, kind: Kind) -> Self {
        let mlp = p / "mlp";
        let init = |fan_in, fan_out| match stdev {
            Some(stdev) => nn::Init::Randn { mean: 0.0, stdev },
            None => xavier(fan_in, fan_out),
        };
        Self {
            fc0: linear(
                &mlp / "0",
                FREQUENCY_DIM,
                hidden,
                init(FREQUENCY_DIM, hidden),
            ),
            fc2: linear(&mlp / "2", hidden, hidden, init(hidden, hidden)),
            kind,
        }
    }

    pub fn forward<V: MaybeDual>(&self, t: &V) -> V {
        t.sinusoid(FREQUENCY_DIM, self.kind)
            .linear(&self.fc0)
            .silu()
            .linear(&self.fc2)
    }
}

/// `y_embedder.embedding_table`: num_classes + 1 rows, the last one the null class of CFG.
#[derive(Debug)]
pub struct LabelEmbedder {
    table: Tensor,
}

impl LabelEmbedder {
    pub fn new(p: nn::Path, num_classes: i64, hidden: i64) -> Self {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Self {
            table: (p / "embedding_table").var("weight", &[num_classes + 1, hidden], init),
        }
    }

    pub fn forward(&self, labels: &Tensor) -> Tensor {
        Tensor::embedding(&self.table, labels, -1, false, false)
    }
}
