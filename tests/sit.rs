//! SiT shapes and invariants, and strict loading by state-dict name.
mod common;

use common::{random_network, rel_err, small_config};
use meanflow_repro::model::sit::{patchify, unpatchify};
use meanflow_repro::model::{load_state_dict, AttentionKernel, Conditioning, SiT, SiTConfig};
use tch::{nn, Device, Kind, Tensor};

fn inputs(b: i64, kind: Kind) -> (Tensor, Tensor, Tensor, Tensor) {
    let opts = (kind, Device::Cpu);
    (
        Tensor::randn([b, 3, 8, 8], opts),
        Tensor::rand([b], opts),
        Tensor::rand([b], opts) * 0.5,
        Tensor::from_slice(&[1i64, 5, 0][..b as usize]),
    )
}

#[test]
fn unpatchify_inverts_patchify() {
    let x = Tensor::randn([2, 3, 8, 12], (Kind::Double, Device::Cpu)).narrow(3, 0, 8);
    let tokens = patchify(&x, 2);
    assert_eq!(tokens.size(), [2, 16, 12]);
    assert!(unpatchify(&tokens, 2, 3).equal(&x));
}

#[test]
fn unpatchify_lays_tokens_out_as_h_w_p_q_c() {
    // Token (row 0, col 1) of a 2x2 grid, patch 2, 1 channel: its values land at x[0, 0, 0..2, 2..4].
    let tokens = Tensor::arange(16, (Kind::Double, Device::Cpu)).view([1, 4, 4]);
    let img = unpatchify(&tokens, 2, 1);
    let block: Vec<f64> = Vec::try_from(
        img.get(0)
            .get(0)
            .narrow(0, 0, 2)
            .narrow(1, 2, 2)
            .reshape([-1]),
    )
    .unwrap();
    assert_eq!(block, vec![4.0, 5.0, 6.0, 7.0]);
}

#[test]
fn a_fresh_network_outputs_zeros() {
    let config = small_config(Conditioning::THalf);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = SiT::new(&vs.root(), &config);
    let (x, t, r, y) = inputs(3, Kind::Float);
    let out = net.forward_aten(&x, &t, &r, &y, AttentionKernel::Explicit);
    assert_eq!(out.size(), x.size());
    assert_eq!(out.abs().max().double_value(&[]), 0.0);
    // ...while the parts that are not zero-initialised are not zero.
    let qkv = &vs.variables()["blocks.0.attn.qkv.weight"];
    assert!(qkv.abs().max().double_value(&[]) > 0.0);
}

#[test]
fn fused_and_explicit_attention_agree() {
    let config = small_config(Conditioning::THalf);
    let (_vs, net) = random_network(&config, 3);
    let (x, t, r, y) = inputs(3, Kind::Double);
    let explicit = net.forward_aten(&x, &t, &r, &y, AttentionKernel::Explicit);
    let fused = net.forward_aten(&x, &t, &r, &y, AttentionKernel::Fused);
    assert!(rel_err(&fused, &explicit) < 1e-12);
}

#[test]
fn float32_and_bfloat16_track_float64() {
    let config = small_config(Conditioning::THalf);
    let (mut vs, net) = random_network(&config, 5);
    let (x, t, r, y) = inputs(3, Kind::Double);
    let reference = net.forward_aten(&x, &t, &r, &y, AttentionKernel::Explicit);
    // float32 arithmetic lands far under 1e-4; bf16's 8-bit mantissa near 1e-2.
    for (kind, tolerance) in [(Kind::Float, 1e-4), (Kind::BFloat16, 5e-2)] {
        vs.set_kind(kind);
        let out = net.forward_aten(
            &x.to_kind(kind),
            &t.to_kind(kind),
            &r.to_kind(kind),
            &y,
            AttentionKernel::Explicit,
        );
        assert_eq!(out.kind(), kind);
        let err = rel_err(&out, &reference);
        assert!(err < tolerance, "{kind:?}: relative error {err:.3e}");
    }
}

#[test]
fn state_dict_names_follow_the_pytorch_keys() {
    let config = SiTConfig {
        depth: 1,
        ..small_config(Conditioning::THalf)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = SiT::new(&vs.root(), &config);
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    let expected = [
        "blocks.0.adaLN_modulation.1.bias",
        "blocks.0.adaLN_modulation.1.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.0.mlp.fc2.weight",
        "final_layer.adaLN_modulation.1.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.linear.bias",
        "final_layer.linear.weight",
        "h_embedder.mlp.0.bias",
        "h_embedder.mlp.0.weight",
        "h_embedder.mlp.2.bias",
        "h_embedder.mlp.2.weight",
        "pos_embed",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "t_embedder.mlp.2.weight",
        "x_embedder.proj.bias",
        "x_embedder.proj.weight",
        "y_embedder.embedding_table.weight",
    ];
    assert_eq!(names, expected);
}

#[test]
fn loading_refuses_missing_extra_and_misshaped_keys() {
    let config = small_config(Conditioning::THalf);
    let (src_vs, _) = random_network(&config, 1);
    let good: Vec<(String, Tensor)> = src_vs.variables().into_iter().collect();
    let target = nn::VarStore::new(Device::Cpu);
    let net = SiT::new(&target.root(), &config);
    load_state_dict(&target, &good, "", "good.safetensors").unwrap();
    let (x, t, r, y) = inputs(3, Kind::Float);
    assert!(
        net.forward_aten(&x, &t, &r, &y, AttentionKernel::Fused)
            .abs()
            .max()
            .double_value(&[])
            > 0.0
    );

    let without = |name: &str| {
        good.iter()
            .filter(|(k, _)| k != name)
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect::<Vec<_>>()
    };
    let err = load_state_dict(&target, &without("blocks.1.mlp.fc2.bias"), "", "a.pth")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.pth") && err.contains("missing keys: blocks.1.mlp.fc2.bias"),
        "{err}"
    );

    let mut extra = without("");
    extra.push((
        "blocks.9.attn.qkv.weight".to_owned(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let err = load_state_dict(&target, &extra, "", "b.pth")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected keys: blocks.9.attn.qkv.weight"),
        "{err}"
    );

    let mut misshaped = without("final_layer.linear.bias");
    misshaped.push((
        "final_layer.linear.bias".to_owned(),
        Tensor::zeros([5], (Kind::Float, Device::Cpu)),
    ));
    let err = load_state_dict(&target, &misshaped, "", "c.pth")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "wrong shapes: final_layer.linear.bias is [5] in the file, [12] in the network"
        ),
        "{err}"
    );
}
