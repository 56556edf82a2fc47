//! Rank 0's end of `mfr run`: the runs side by side, runs.json, the report, blocked stages.
use super::Options;
use crate::rundir::{write_index, ExperimentIndex, Metrics};
use crate::spec::Spec;
use anyhow::{bail, Result};
use std::path::Path;

pub fn summarise(
    spec: &Spec,
    spec_path: &Path,
    opts: &Options,
    exp_dir: &Path,
    blocked: &[String],
) -> Result<()> {
    if opts.dry_run {
        println!("\n(dry run: nothing was run)");
        return Ok(());
    }
    // Every run of the experiment, not only this process's: array tasks each run one point, and
    // the index and the report show all that exist. One summary is written at a time.
    let _lock = crate::files::Lock::acquire(
        &exp_dir.join("lock"),
        exp_dir,
        "mfr run (summary)",
        crate::files::Contention::Wait,
    )?;
    let runs = crate::rundir::runs_of(exp_dir)?;
    let evaluated: Vec<(String, Metrics)> = runs
        .iter()
        .map(|dir| Ok(dir.read_metrics()?.map(|m| (dir.name(), m))))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    print_fids(&evaluated);
    let index = ExperimentIndex {
        experiment: spec.experiment.name.clone(),
        spec: spec_path.display().to_string(),
        runs: runs
            .iter()
            .map(|d| (d.name(), d.path().display().to_string()))
            .collect(),
        fid: evaluated
            .iter()
            .map(|(k, m)| (k.clone(), m.fid.clone()))
            .collect(),
    };
    write_index(exp_dir, &index)?;
    println!("\nresults: {}", exp_dir.display());
    if let Some(root) = &opts.reports {
        let out = crate::report::render::report(exp_dir, root)?;
        println!("report: {}", out.join("index.html").display());
    }
    if !blocked.is_empty() {
        bail!("some stages could not run:\n  {}", blocked.join("\n  "));
    }
    Ok(())
}

/// The runs' FIDs side by side (the sweep's table: paper Table 1a in the demo's case), each
/// with its 95% interval.
fn print_fids(evaluated: &[(String, Metrics)]) {
    let Some((_, first)) = evaluated.first() else {
        return;
    };
    let columns: Vec<&String> = first.fid.keys().collect();
    let against = match &first.reference {
        None => format!(
            "{} training images; small-sample, not FID-50K",
            first.num_reference
        ),
        Some(r) => r.rsplit('/').next().unwrap_or(r).to_owned(),
    };
    println!(
        "\nFID ({} samples per run vs {against}; [95% interval])",
        first.num_samples
    );
    // "34.96 [33.10, 37.20]" and room between columns, kept when a cell is wider (a FID of
    // six digits from an untrained network).
    let header: String = columns.iter().map(|c| format!(" {c:>24}")).collect();
    println!("  {:<32}{header}", "run");
    for (name, m) in evaluated {
        let cells: String = columns
            .iter()
            .map(|c| {
                let fid = m.fid.get(*c).copied().unwrap_or(f64::NAN);
                let cell = match m.fid_interval.get(*c) {
                    Some(i) => format!("{fid:.2} {i}"),
                    None => format!("{fid:.2}"),
                };
                format!(" {cell:>24}")
            })
            .collect();
        println!("  {name:<32}{cells}");
    }
}
