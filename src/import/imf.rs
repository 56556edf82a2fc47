//! The official improved-MeanFlow code's parameters (flax, Lyy-iiis/imeanflow) under the state-dict
//! keys of its PyTorch inference port (branch `torch`), which are our imfDiT's variable names.
//! A flax path such as `net/shared_blocks_0/attn/q_proj/_flax_linear/kernel` maps by rule:
//!   - a leading `params/` goes; `net` stays (the port's `iMeanFlow.net`);
//!   - module lists `shared_blocks_<i>`, `u_heads_<i>`, `v_heads_<i>` become `<list>.<i>`, and
//!     an embedder's Sequential entry `layers_<k>` becomes `<k>` (flax counts the SiLU as
//!     PyTorch does); the port keeps its wrappers' `_flax_linear` / `_flax_embedding` levels;
//!   - the leaf says the layout: a Dense `kernel` (in, out) -> the transposed `weight`; the patch
//!     convolution's `kernel` HWIO -> OIHW `weight`; an RMSNorm `kernel` (scale) -> `weight`; the
//!     class table's `embedding` -> `weight`; biases, learned tokens and residual gates as they
//!     are.
//!
//! Then the released checkpoints (Hugging Face `Lyy0725/iMF`): [`import`] reads the official
//! training state (`{step, params, ema_params, opt_state}`, saved by the official
//! utils/ckpt_util.py) as the zip that is released, or the folder it unpacks to, and writes our
//! checkpoint layout. An inference checkpoint (`iMF-*-2.zip`) has no v-head blocks, a full one
//! (`-full.zip`) has them and AdamW's moments: told apart by content, not by name.
use super::flax::{self, Layout, Msg};
use super::sit::Moments;
use super::Summary;
use crate::model::imf::{ImfDiT, ImfDiTConfig, PRESETS};
use crate::model::TimeEmbedding;
use crate::rundir::checkpoint::{self, TrainState};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// Module lists of imfDiT (flax `<list>_<i>`, torch `<list>.<i>`).
const BLOCK_LISTS: [&str; 3] = ["shared_blocks", "u_heads", "v_heads"];
/// Parameters that are leaves of the network itself or of a block, kept as they are.
const PLAIN: [(&str, usize); 7] = [
    ("class_tokens", 2),
    ("omega_tokens", 2),
    ("t_min_tokens", 2),
    ("t_max_tokens", 2),
    ("time_tokens", 2),
    ("attn_scale", 1),
    ("mlp_scale", 1),
];
/// RMSNorm modules, whose scale flax names `kernel`.
const NORMS: [&str; 5] = ["norm1", "norm2", "q_norm", "k_norm", "norm"];

/// The key of the official PyTorch port and the layout of flax parameter `path` (joined with
/// '/', relative to the iMeanFlow module: `net/...`, or `params/net/...`) holding an array of
/// `rank` dimensions.
pub fn torch_name(path: &str, rank: usize) -> Result<(String, Layout)> {
    let bad = |why: &str| anyhow!("flax parameter `{path}` ({rank}-D): {why}");
    let mut parts: Vec<&str> = path.split('/').collect();
    if parts.first() == Some(&"params") {
        parts.remove(0);
    }
    if parts.first() != Some(&"net") || parts.len() < 2 {
        return Err(bad(
            "not under `net/` (the iMF network of the official iMeanFlow module)",
        ));
    }
    let (&leaf, modules) = parts.split_last().expect("two parts at least");
    let parent = modules.last().copied().unwrap_or_default();
    let mut names: Vec<String> = Vec::with_capacity(parts.len());
    for m in modules {
        if m.is_empty() {
            return Err(bad("an empty module name"));
        }
        let list = BLOCK_LISTS.iter().find_map(|l| {
            let i = m.strip_prefix(l)?.strip_prefix('_')?;
            index(i).map(|i| format!("{l}.{i}"))
        });
        let layer = m.strip_prefix("layers_").and_then(index);
        names.push(list.or(layer).unwrap_or_else(|| (*m).to_owned()));
    }
    let (name, layout) = match (leaf, rank) {
        ("kernel", 2) if parent == "_flax_linear" => ("weight", Layout::Transpose),
        ("kernel", 4) if parent == "proj" => ("weight", Layout::HwioToOihw),
        ("kernel", 1) if NORMS.contains(&parent) => ("weight", Layout::Same),
        ("bias", 1) => ("bias", Layout::Same),
        ("embedding", 2) if parent == "_flax_embedding" => ("weight", Layout::Same),
        (leaf, r) if PLAIN.contains(&(leaf, r)) => (leaf, Layout::Same),
        _ => {
            return Err(bad(
                "not an imfDiT parameter (expected a Dense, patch-convolution or RMSNorm kernel, a bias, the class table's embedding, learned tokens or a residual gate)",
            ))
        }
    };
    names.push(name.to_owned());
    Ok((names.join("."), layout))
}

/// A decimal index without sign or leading zeros beyond "0".
fn index(s: &str) -> Option<String> {
    let ok =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    ok.then(|| s.to_owned())
}

/// Every (flax path, array) as (torch key, tensor in torch's layout); two paths that map to one
/// key are an error.
pub fn to_state_dict(params: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    flax::renamed(params, torch_name)
}

/// The network shape of a state dict (torch keys), read off its tensors: width, channels and
/// patch from the patch embedding, heads from the q-norm's width (the head size), the trunk and
/// head depths from the block lists, the tokens and classes from their tables, and whether it
/// has a v-head. The input size is no parameter's shape: the presets' 32 (SD-VAE latents of
/// ImageNet 256) until the caller says otherwise. Returns the preset of that shape, if any.
pub fn infer_config(
    state: &[(String, Tensor)],
    what: &str,
) -> Result<(Option<&'static str>, ImfDiTConfig)> {
    let shape = |k: &str| state.iter().find(|(n, _)| n == k).map(|(_, t)| t.size());
    let rows = |k: &str| -> Result<i64> {
        shape(k)
            .and_then(|s| s.first().copied())
            .ok_or_else(|| anyhow!("{what}: no `{k}`, so not an iMF network"))
    };
    let count = |list: &str| {
        let prefix = format!("net.{list}.");
        state
            .iter()
            .filter_map(|(k, _)| {
                k.strip_prefix(&prefix)?
                    .split('.')
                    .next()?
                    .parse::<i64>()
                    .ok()
            })
            .max()
            .map_or(0, |i| i + 1)
    };
    let Some(&[hidden, channels, patch, _]) = shape("net.x_embedder.proj.weight").as_deref() else {
        bail!("{what}: no 4-D `net.x_embedder.proj.weight`, so not an iMF network");
    };
    let head_dim = rows("net.u_heads.0.attn.q_norm.weight")?;
    let (shared, u, v) = (count("shared_blocks"), count("u_heads"), count("v_heads"));
    if v != 0 && v != u {
        bail!(
            "{what}: {u} u-head blocks but {v} v-head blocks (the official heads have equal depth)"
        );
    }
    if head_dim < 1 || hidden % head_dim != 0 {
        bail!("{what}: a q-norm of width {head_dim} does not split the hidden size {hidden} into heads");
    }
    let config = ImfDiTConfig {
        input_size: 32,
        patch_size: patch,
        in_channels: channels,
        hidden_size: hidden,
        depth: shared + u,
        num_heads: hidden / head_dim,
        aux_head_depth: u,
        num_classes: rows("net.y_embedder.embedding_table._flax_embedding.weight")? - 1,
        num_class_tokens: rows("net.class_tokens")?,
        num_time_tokens: rows("net.time_tokens")?,
        num_cfg_tokens: rows("net.omega_tokens")?,
        num_interval_tokens: rows("net.t_min_tokens")?,
        time_embedding: TimeEmbedding::Float32,
        v_head: v > 0,
    };
    config
        .check()
        .with_context(|| format!("{what}: an impossible iMF shape"))?;
    let preset = PRESETS
        .iter()
        .find(|&&(name, ..)| {
            ImfDiTConfig::preset(name).is_some_and(|p| {
                ImfDiTConfig {
                    v_head: config.v_head,
                    ..p
                } == config
            })
        })
        .map(|row| row.0);
    Ok((preset, config))
}

/// Our network's variables holding `state`, checked strictly (names and shapes).
fn load_checked(
    config: &ImfDiTConfig,
    state: &[(String, Tensor)],
    what: &str,
) -> Result<nn::VarStore> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = ImfDiT::new(&vs.root(), config)?;
    crate::model::load_state_dict(&vs, state, "", what)?;
    Ok(vs)
}

/// The network under `key` (`params` or `ema_params`) of a training state, in torch keys.
fn network(state: &Msg, key: &str, what: &str) -> Result<Option<Vec<(String, Tensor)>>> {
    let Some(net) = state.get(key).and_then(|p| p.get("net")) else {
        return Ok(None);
    };
    let params: Vec<(String, Tensor)> = net
        .tensors()
        .into_iter()
        .map(|(k, t)| (format!("net/{k}"), t))
        .collect();
    to_state_dict(&params)
        .with_context(|| format!("{what} [{key}/net]"))
        .map(Some)
}

/// Whether a flax training state holds an iMF network (rather than MeanFlow's SiT).
pub fn looks_like(state: &Msg) -> bool {
    ["params", "ema_params"].iter().any(|k| {
        state
            .get(k)
            .and_then(|p| p.get("net"))
            .is_some_and(|n| n.get("shared_blocks_0").is_some() || n.get("u_heads_0").is_some())
    })
}

/// The trained weights and their EMA in torch keys, each with where it came from: `params/net`
/// and `ema_params/net`, either standing in for a missing other.
type Networks = (
    Vec<(String, Tensor)>,
    &'static str,
    Vec<(String, Tensor)>,
    &'static str,
);

fn networks(state: &Msg, name: &str) -> Result<Networks> {
    let copy = |v: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
        v.iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect()
    };
    Ok(
        match (
            network(state, "params", name)?,
            network(state, "ema_params", name)?,
        ) {
            (Some(m), Some(e)) => (m, "params/net", e, "ema_params/net"),
            (Some(m), None) => (copy(&m), "params/net", m, "params/net (no ema_params)"),
            (None, Some(e)) => (copy(&e), "ema_params/net (no params)", e, "ema_params/net"),
            (None, None) => bail!("{name}: neither params/net nor ema_params/net holds a network"),
        },
    )
}

/// What a training state holds of optax.adamw's state, `(ScaleByAdamState(count, mu, nu),
/// EmptyState, EmptyState)`: the moments as float32 (none if they do not match the network's
/// parameters), the Adam step, the training step, and a line saying which.
fn optimizer(state: &Msg, name: &str) -> (Moments, i64, u64, String) {
    let adam = state.get("opt_state").and_then(|o| o.get("0"));
    let moments = adam.and_then(|a| {
        let tree = |k: &str| network(a, k, name).ok().flatten();
        let (m, v) = (tree("mu")?, tree("nu")?);
        let v: BTreeMap<String, Tensor> = v.into_iter().collect();
        m.into_iter()
            .map(|(k, m)| {
                let v = v.get(&k)?.to_kind(Kind::Float);
                Some((k, m.to_kind(Kind::Float), v))
            })
            .collect::<Option<Vec<_>>>()
    });
    let adam_step = adam.and_then(|a| a.get("count")?.as_int()).unwrap_or(0);
    let steps = state
        .get("step")
        .and_then(Msg::as_int)
        .unwrap_or(adam_step)
        .max(0) as u64;
    match moments {
        Some(m) => {
            let what = format!(
                "AdamW moments of {} parameters at step {adam_step}",
                m.len()
            );
            (m, adam_step, steps, what)
        }
        None => (
            Vec::new(),
            adam_step,
            steps,
            "no optax AdamW state: the checkpoint samples but cannot resume".to_owned(),
        ),
    }
}

/// The official iMF training state `state`, read from `file` of the checkpoint `source` as given
/// (a zip, a folder, or the msgpack file; see [`flax::locate`]) -> our checkpoint at `out`:
/// `params/net` as the model, `ema_params/net` as the EMA, AdamW's `mu` and `nu` as the moments
/// and their `count` as the Adam step (all as float32), checked against the shape inferred from
/// the EMA. `preset`, when given, must name that shape.
pub fn import(
    source: &Path,
    file: &Path,
    state: &Msg,
    preset: Option<&str>,
    out: &Path,
) -> Result<Summary> {
    let name = file.display().to_string();
    let (model, model_from, ema, ema_from) = networks(state, &name)?;
    let (inferred, config) = infer_config(&ema, &format!("{name} [{ema_from}]"))?;
    if let Some(wanted) = preset.filter(|&p| Some(p) != inferred) {
        bail!(
            "{name}: --preset {wanted} does not match the checkpoint, whose network is {}",
            inferred.map_or_else(|| describe(&config), str::to_owned)
        );
    }
    let preset = inferred.map_or_else(|| describe(&config), str::to_owned);
    let model_vs = load_checked(&config, &model, &format!("{name} [{model_from}]"))?;
    let ema_vs = load_checked(&config, &ema, &format!("{name} [{ema_from}]"))?;
    let (moments, adam_step, steps, optimizer) = optimizer(state, &name);
    let variant = if config.v_head {
        "full (with its v-head)"
    } else {
        "inference (no v-head)"
    };
    let tensors = checkpoint::layout(
        &model_vs,
        &ema_vs,
        moments.iter().map(|(k, m, v)| (k.as_str(), m, v)),
    );
    // The release's own hash for a zip or a file; the checkpoint file read, for a folder.
    let hashed = if source.is_dir() { file } else { source };
    let sha256 = crate::files::sha256_file(hashed)?;
    let train_state = TrainState {
        step: steps,
        epoch: 0,
        adam_step,
        seed: 0,
        spec_sha256: format!("imported:{sha256}"),
        wall_s: 0.0,
    };
    let record: BTreeMap<&str, String> = BTreeMap::from([
        ("source", source.display().to_string()),
        ("source_sha256", sha256),
        ("method", "imf".to_owned()),
        ("preset", preset.clone()),
        ("config", serde_json::to_string(&config)?),
        ("variant", variant.to_owned()),
        ("model_from", model_from.to_owned()),
        ("ema_from", ema_from.to_owned()),
        ("optimizer", optimizer.clone()),
        ("steps", steps.to_string()),
    ]);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    checkpoint::write_with_metadata(
        out,
        &tensors,
        &train_state,
        &[("import", serde_json::to_string(&record)?)],
    )?;
    Ok(Summary {
        source: source.to_owned(),
        kind: "official iMF (flax) checkpoint",
        tensors: tensors.len(),
        preset: Some(format!("{preset}, {variant}")),
        details: format!(
            "model from {model_from}, EMA from {ema_from}, step {steps}; optimizer: {optimizer}"
        ),
        out: out.to_owned(),
    })
}

/// "depth 12 (4 + 8), hidden 768, 12 heads, patch 2": a shape no preset has.
fn describe(c: &ImfDiTConfig) -> String {
    format!(
        "iMF depth {} ({} + {}), hidden {}, {} heads, patch {}",
        c.depth,
        c.shared_depth(),
        c.aux_head_depth,
        c.hidden_size,
        c.num_heads,
        c.patch_size
    )
}

/// The network a checkpoint written by [`import`] holds: its shape from the import record, the
/// sinusoids in `time_embedding`.
pub fn config_of(
    metadata: &BTreeMap<String, String>,
    time_embedding: TimeEmbedding,
) -> Result<ImfDiTConfig> {
    let record: serde_json::Value = metadata
        .get("import")
        .and_then(|r| serde_json::from_str(r).ok())
        .ok_or_else(|| {
            anyhow!("the checkpoint has no import record: not written by `mfr import`")
        })?;
    let config = record["config"]
        .as_str()
        .ok_or_else(|| anyhow!("the checkpoint's import record has no iMF network shape"))?;
    let mut config: ImfDiTConfig = serde_json::from_str(config)?;
    config.time_embedding = time_embedding;
    Ok(config)
}

/// Whether a zip member's name is part of a flax or orbax checkpoint.
pub fn is_flax_member(name: &str) -> bool {
    let file = name.rsplit('/').next().unwrap_or(name);
    file == "checkpoint"
        || file == "manifest.ocdbt"
        || file == "_METADATA"
        || file.ends_with(".msgpack")
        || flax::is_checkpoint_folder(Path::new(file))
}
