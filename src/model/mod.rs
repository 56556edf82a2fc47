//! Networks. They know tensors and names, never files: weights come in as (name, tensor) pairs.
pub mod attention;
pub mod dual;
pub mod embed;
pub mod imf;
pub mod inception;
pub mod sit;
pub mod vae;

pub use attention::AttentionKernel;
pub use dual::{Dual, MaybeDual};
pub use imf::{ImfDiT, ImfDiTConfig};
pub use sit::{Conditioning, EmbedderInit, SiT, SiTConfig, TimeEmbedding};

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::{nn::VarStore, Tensor};

/// A store's variables sorted by name: the order of checkpoints, broadcasts and the optimizer.
pub fn sorted_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Copies a state dict into `vs` by name. Only tensors whose name starts with `prefix` are
/// considered (the prefix is stripped); a missing, extra or mis-shaped key is an error naming
/// every offender, so a checkpoint never loads half-way. Values are cast to each variable's dtype.
pub fn load_state_dict(
    vs: &VarStore,
    tensors: &[(String, Tensor)],
    prefix: &str,
    source: &str,
) -> Result<()> {
    let given: BTreeMap<&str, &Tensor> = tensors
        .iter()
        .filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n, t)))
        .collect();
    let vars = vs.variables();
    let mut missing: Vec<&String> = vars
        .keys()
        .filter(|k| !given.contains_key(k.as_str()))
        .collect();
    missing.sort();
    let extra: Vec<&&str> = given.keys().filter(|k| !vars.contains_key(**k)).collect();
    let mismatched: Vec<String> = vars
        .iter()
        .filter_map(|(k, v)| {
            let t = given.get(k.as_str())?;
            (t.size() != v.size()).then(|| {
                format!(
                    "{k} is {:?} in the file, {:?} in the network",
                    t.size(),
                    v.size()
                )
            })
        })
        .collect();
    if !missing.is_empty() || !extra.is_empty() || !mismatched.is_empty() {
        let mut msg = format!("{source} does not match the network");
        if !missing.is_empty() {
            msg += &format!("; missing keys: {}", join(&missing));
        }
        if !extra.is_empty() {
            msg += &format!("; unexpected keys: {}", join(&extra));
        }
        if !mismatched.is_empty() {
            msg += &format!("; wrong shapes: {}", mismatched.join(", "));
        }
        bail!("{msg}");
    }
    tch::no_grad(|| {
        for (k, mut v) in vars {
            let src = given[k.as_str()];
            v.copy_(&src.to_kind(v.kind()).to_device(v.device()));
        }
    });
    Ok(())
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<String> = items.iter().take(SHOWN).map(|x| x.to_string()).collect();
    if items.len() > SHOWN {
        s.push(format!("... ({} in all)", items.len()));
    }
    s.join(", ")
}
