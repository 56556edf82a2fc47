//! Multi-head self-attention with `qkv` and `proj` (timm's Attention, qkv bias, no qk-norm).
use super::embed::{linear, xavier};
use tch::{nn, nn::Module, Tensor};

/// How softmax(q k^T / sqrt(d)) v is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// matmul - softmax - matmul: every op has a forward-AD rule, so a tangent can flow through.
    Explicit,
    /// libtorch's fused scaled_dot_product_attention: faster, but its flash / memory-efficient /
    /// cuDNN kernels have no forward-AD rule in libtorch 2.11. Only where no tangent flows.
    Fused,
}

#[derive(Debug)]
pub struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
}

impl Attention {
    pub fn new(p: nn::Path, hidden: i64, heads: i64) -> Self {
        Self {
            qkv: linear(&p / "qkv", hidden, 3 * hidden, xavier(hidden, 3 * hidden)),
            proj: linear(&p / "proj", hidden, hidden, xavier(hidden, hidden)),
            heads,
        }
    }

    /// (N, T, D) -> (N, T, D).
    pub fn forward(&self, x: &Tensor, kernel: AttentionKernel) -> Tensor {
        let (n, t, d) = x.size3().expect("attention input is (N, T, D)");
        let head_dim = d / self.heads;
        // qkv's output is laid out as (3, heads, head_dim).
        let qkv = self
            .qkv
            .forward(x)
            .reshape([n, t, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let scale = (head_dim as f64).powf(-0.5);
        let out = match kernel {
            AttentionKernel::Explicit => (q * scale)
                .matmul(&k.transpose(-2, -1))
                .softmax(-1, None::<tch::Kind>)
                .matmul(&v),
            AttentionKernel::Fused => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                scale,
                false,
            ),
        };
        self.proj.forward(&out.transpose(1, 2).reshape([n, t, d]))
    }
}
