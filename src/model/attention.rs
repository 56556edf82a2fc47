//! Multi-head self-attention with `qkv` and `proj` (timm's Attention, qkv bias, no qk-norm).
use super::dual::MaybeDual;
use super::embed::{linear, xavier};
use tch::nn;

/// How softmax(q k^T / sqrt(d)) v is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// matmul - softmax - matmul: every op has a forward-AD rule, so a tangent can flow through.
    Explicit,
    /// libtorch's fused scaled_dot_product_attention: faster, but its flash / memory-efficient /
    /// cuDNN kernels have no forward-AD rule in libtorch 2.11: only where no forward-AD tangent
    /// flows (sampling, guidance, and the primal of a [`super::dual::Dual`] pass).
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
    pub fn forward<V: MaybeDual>(&self, x: &V, kernel: AttentionKernel) -> V {
        // Shapes with the batch left free (-1): a tangent may cover fewer rows than its value.
        let (_, t, d) = x.primal().size3().expect("attention input is (N, T, D)");
        let (heads, head_dim) = (self.heads, d / self.heads);
        // qkv's output is laid out as (3, heads, head_dim).
        let qkv = x.linear(&self.qkv).map(|y| {
            y.reshape([-1, t, 3, heads, head_dim])
                .permute([2, 0, 3, 1, 4])
        });
        // One unbind rather than three selects: its backward stacks the three gradients in
        // one kernel instead of scattering each into a zeroed copy of the whole and adding.
        let parts = qkv.unbind();
        let [q, k, v] = <[V; 3]>::try_from(parts).ok().expect("qkv has 3 parts");
        let scale = (head_dim as f64).powf(-0.5);
        let out = V::attention(&q, &k, &v, scale, kernel == AttentionKernel::Fused);
        out.map(|o| o.transpose(1, 2).reshape([-1, t, d]))
            .linear(&self.proj)
    }
}
