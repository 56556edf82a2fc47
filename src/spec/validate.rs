//! A spec's second layer: the preset filled in, then every value checked, so that the runtime
//! configs built from it (`Spec::train_config`, ...) hold nothing that would fail later or
//! silently change results. An error names the key.
use super::schema::{MeanFlowSection, Method};
use super::Spec;
use crate::meanflow::sampler;
use crate::model::{ImfDiTConfig, SiTConfig};

pub(super) type Checked = Result<(), (String, String)>;

fn fail(key: &str, msg: impl Into<String>) -> Checked {
    Err((key.to_owned(), msg.into()))
}

fn require(ok: bool, key: &str, msg: &str) -> Checked {
    if ok {
        Ok(())
    } else {
        fail(key, msg)
    }
}

impl Spec {
    /// Fills the model's shape from its preset (one of the method's own) and the iMF section
    /// from its defaults; a field set in the file wins over the preset.
    pub(super) fn resolve(&mut self) -> Checked {
        match (self.method, &self.imf) {
            (Method::Imf, None) => self.imf = Some(Default::default()),
            (Method::MeanFlow, Some(_)) => {
                return fail(
                    "imf",
                    "improved-MeanFlow settings in a MeanFlow spec: set `method = \"imf\"` at the top of the file (MeanFlow is the default), or remove the [imf] section",
                )
            }
            _ => {}
        }
        let m = &mut self.model;
        if let Some(name) = &m.preset {
            let (shape, names) = match self.method {
                Method::MeanFlow => (
                    SiTConfig::preset(name)
                        .map(|p| [p.depth, p.hidden_size, p.num_heads, p.patch_size]),
                    SiTConfig::preset_names(),
                ),
                Method::Imf => (
                    ImfDiTConfig::preset(name)
                        .map(|p| [p.depth, p.hidden_size, p.num_heads, p.patch_size]),
                    ImfDiTConfig::preset_names(),
                ),
            };
            let Some([depth, hidden_size, num_heads, patch_size]) = shape else {
                let method = toml::Value::try_from(self.method).unwrap_or_else(|_| "?".into());
                return fail(
                    "model.preset",
                    format!(
                        "unknown preset `{name}` for method = {method}, expected one of {}",
                        names.join(", ")
                    ),
                );
            };
            m.depth.get_or_insert(depth);
            m.hidden_size.get_or_insert(hidden_size);
            m.num_heads.get_or_insert(num_heads);
            m.patch_size.get_or_insert(patch_size);
        }
        for (key, v) in [
            ("depth", m.depth),
            ("hidden_size", m.hidden_size),
            ("num_heads", m.num_heads),
            ("patch_size", m.patch_size),
        ] {
            if v.is_none() {
                return fail(
                    &format!("model.{key}"),
                    "missing: set it or name a `preset`",
                );
            }
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Checked {
        self.validate_experiment()?;
        self.validate_model()?;
        match self.method {
            Method::MeanFlow => self.validate_meanflow()?,
            Method::Imf => self.validate_imf()?,
        }
        self.validate_train()?;
        self.validate_sample()
    }

    /// The name is a folder of results/ and reports/: one plain path component.
    fn validate_experiment(&self) -> Checked {
        let name = &self.experiment.name;
        let plain = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        require(
            plain && !name.is_empty() && name.len() <= 100 && !name.starts_with('.'),
            "experiment.name",
            "expected a plain folder name (letters, digits, '.', '_', '-'; not starting with '.')",
        )
    }

    /// The network's shape. The bounds keep every size computed from it far from overflow;
    /// whether a device can hold the network is checked when it is built.
    fn validate_model(&self) -> Checked {
        if self.method == Method::Imf {
            return self.validate_imf_model();
        }
        let c = self.model_config();
        shape_in_bounds([
            c.depth,
            c.hidden_size,
            c.num_heads,
            c.patch_size,
            c.input_size,
            c.in_channels,
            c.num_classes,
        ])?;
        require(
            c.hidden_size % c.num_heads == 0,
            "model.num_heads",
            "must divide model.hidden_size",
        )?;
        require(
            c.hidden_size % 4 == 0,
            "model.hidden_size",
            "must be a multiple of 4 (2-D sin-cos positions)",
        )?;
        require(
            c.input_size % c.patch_size == 0,
            "model.patch_size",
            "must divide model.input_size",
        )
    }

    /// The iMF network's shape: the same bounds, and what imfDiT itself refuses.
    fn validate_imf_model(&self) -> Checked {
        let c = self.imf_model_config();
        shape_in_bounds([
            c.depth,
            c.hidden_size,
            c.num_heads,
            c.patch_size,
            c.input_size,
            c.in_channels,
            c.num_classes,
        ])?;
        if self.model.embedder_init != crate::model::EmbedderInit::default() {
            return fail(
                "model.embedder_init",
                "a SiT setting, but method = \"imf\" trains imfDiT (whose init is the official one): remove it",
            );
        }
        c.check().or_else(|e| fail("model", e.to_string()))
    }

    /// Improved MeanFlow's objective and sampling guidance; MeanFlow's section left alone.
    fn validate_imf(&self) -> Checked {
        let defaults = toml::Value::try_from(MeanFlowSection::default()).expect("TOML");
        let given = toml::Value::try_from(&self.meanflow).expect("TOML");
        if let (Some(d), Some(g)) = (defaults.as_table(), given.as_table()) {
            if let Some((key, _)) = g.iter().find(|(k, v)| d.get(*k) != Some(v)) {
                return fail(
                    &format!("meanflow.{key}"),
                    "a MeanFlow setting, but method = \"imf\": remove it (the iMF objective's settings are in [imf])",
                );
            }
        }
        let m = self.imf_section();
        number("imf.P_mean", m.p_mean, f64::MIN, f64::MAX)?;
        positive("imf.P_std", m.p_std)?;
        number("imf.data_proportion", m.data_proportion, 0.0, 1.0)?;
        // p(omega) ∝ omega^-beta: the official code uses 1; far beyond [0, 4] the inverse CDF
        // overflows.
        number("imf.cfg_beta", m.cfg_beta, 0.0, 4.0)?;
        positive("imf.s_max", m.s_max)?;
        below_one("imf.class_dropout", m.class_dropout)?;
        number("imf.norm_p", m.norm_p, 0.0, 4.0)?;
        positive("imf.norm_eps", m.norm_eps)?;
        let schedules = self.sample.schedules.len();
        require(
            m.guidance.len() == 1 || m.guidance.len() == schedules,
            "imf.guidance",
            &format!(
                "expected one entry for every schedule or one per schedule ({schedules}), got {}",
                m.guidance.len()
            ),
        )?;
        if m.latents == crate::imf::LatentNorm::PerChannel
            && !crate::data::is_pixels(&self.train.data)
        {
            require(
                self.model.in_channels == 4,
                "imf.latents",
                "\"per_channel\" normalises the 4 channels of SD-VAE latents: set it to \"none\" for other data",
            )?;
        }
        for g in &m.guidance {
            if let Err(e) = g.check() {
                return fail("imf.guidance", e.to_string());
            }
        }
        Ok(())
    }

    /// The objective's settings.
    fn validate_meanflow(&self) -> Checked {
        let m = &self.meanflow;
        number("meanflow.P_mean", m.p_mean, f64::MIN, f64::MAX)?;
        positive("meanflow.P_std", m.p_std)?;
        number("meanflow.data_proportion", m.data_proportion, 0.0, 1.0)?;
        positive("meanflow.omega", m.omega)?;
        below_one("meanflow.kappa", m.kappa)?;
        number("meanflow.t_start", m.t_start, 0.0, 1.0)?;
        number("meanflow.t_end", m.t_end, 0.0, 1.0)?;
        require(
            m.t_start <= m.t_end,
            "meanflow.t_end",
            "must not be below meanflow.t_start",
        )?;
        // The paper's Table 1 tries p in [0, 2]; far beyond it (l + eps)^p overflows and the
        // weighted loss is 0.
        number("meanflow.norm_p", m.norm_p, 0.0, 4.0)?;
        positive("meanflow.norm_eps", m.norm_eps)?;
        below_one("meanflow.class_dropout", m.class_dropout)
    }

    /// The training loop's settings.
    fn validate_train(&self) -> Checked {
        let t = &self.train;
        count("train.batch", t.batch, 1, 1 << 24)?;
        // Bounded so that steps per epoch x epochs cannot overflow (checked again at the start).
        count("train.epochs", t.epochs, 1, 1_000_000)?;
        positive("train.lr", t.lr)?;
        require(
            t.betas.len() == 2,
            "train.betas",
            &format!("expected two numbers (beta1, beta2), got {}", t.betas.len()),
        )?;
        for &b in &t.betas {
            below_one("train.betas", b)?;
        }
        number("train.weight_decay", t.weight_decay, 0.0, f64::MAX)?;
        count("train.warmup_steps", t.warmup_steps, 0, 1 << 40)?;
        number("train.grad_clip", t.grad_clip, 0.0, f64::MAX)?;
        below_one("train.ema_decay", t.ema_decay)?;
        count("train.grad_accumulation", t.grad_accumulation, 1, t.batch)?;
        require(
            t.batch % t.grad_accumulation == 0,
            "train.grad_accumulation",
            "must divide train.batch (the micro-batches are equal)",
        )?;
        count("train.log_every", t.log_every, 1, i64::MAX)?;
        count("train.checkpoint_every", t.checkpoint_every, 1, i64::MAX)?;
        count("train.keep_checkpoints", t.keep_checkpoints, 1, 1 << 20)?;
        if let Err(e) = crate::device::parse_name(&t.device) {
            return fail("train.device", e.to_string());
        }
        Ok(())
    }

    /// Sampling, evaluation and the paper comparison.
    fn validate_sample(&self) -> Checked {
        let s = &self.sample;
        require(
            !s.schedules.is_empty(),
            "sample.schedules",
            "expected at least one schedule, e.g. [[1.0, 0.0]]",
        )?;
        let mut steps = std::collections::BTreeSet::new();
        for schedule in &s.schedules {
            if let Err(e) = sampler::check_schedule(schedule) {
                return fail("sample.schedules", e.to_string());
            }
            // Samples are filed by their number of steps.
            require(
                steps.insert(schedule.len()),
                "sample.schedules",
                &format!(
                    "two schedules take {} steps: give each number of steps one schedule",
                    schedule.len() - 1
                ),
            )?;
        }
        // Every metric the evaluate stage computes must be defined on the samples.
        count(
            "sample.num_samples",
            s.num_samples,
            crate::eval::MIN_SAMPLES,
            100_000_000,
        )?;
        count("sample.batch", s.batch, 1, 1 << 20)?;
        require(
            !s.vae.is_empty(),
            "sample.vae",
            "expected an asset name or a file",
        )?;
        count("eval.batch", self.eval.batch, 1, 1 << 20)?;
        crate::eval::bootstrap::check_resamples(self.eval.bootstrap)
            .map_err(|e| ("eval.bootstrap".to_owned(), e))?;
        positive("paper.tolerance", self.paper.tolerance)
    }
}

/// An integer in [min, max].
fn count(key: &str, v: i64, min: i64, max: i64) -> Checked {
    require(
        (min..=max).contains(&v),
        key,
        &match (min, max) {
            (_, i64::MAX) => format!("expected an integer >= {min}, got {v}"),
            _ => format!("expected an integer in [{min}, {max}], got {v}"),
        },
    )
}

/// A finite number in [min, max].
fn number(key: &str, v: f64, min: f64, max: f64) -> Checked {
    let range = match (min, max) {
        (f64::MIN, f64::MAX) => "a finite number".to_owned(),
        (_, f64::MAX) => format!("a finite number >= {min}"),
        _ => format!("a number in [{min}, {max}]"),
    };
    require(
        v.is_finite() && (min..=max).contains(&v),
        key,
        &format!("expected {range}, got {v}"),
    )
}

/// A finite number > 0.
fn positive(key: &str, v: f64) -> Checked {
    require(
        v.is_finite() && v > 0.0,
        key,
        &format!("expected a finite positive number, got {v}"),
    )
}

/// A number in [0, 1).
fn below_one(key: &str, v: f64) -> Checked {
    require(
        (0.0..1.0).contains(&v),
        key,
        &format!("expected a number in [0, 1), got {v}"),
    )
}

/// Either network's (depth, hidden_size, num_heads, patch_size, input_size, in_channels,
/// num_classes) within the bounds that keep a crafted spec from asking for absurd allocations.
fn shape_in_bounds(shape: [i64; 7]) -> Checked {
    let bounds = [
        ("model.depth", 1024),
        ("model.hidden_size", 65_536),
        ("model.num_heads", 1024),
        ("model.patch_size", 64),
        ("model.input_size", 4096),
        ("model.in_channels", 1024),
        ("model.num_classes", 1 << 24),
    ];
    for ((key, max), v) in bounds.into_iter().zip(shape) {
        count(key, v, 1, max)?;
    }
    Ok(())
}
