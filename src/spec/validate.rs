//! A spec's second layer: the preset filled in, then every value checked, so that the runtime
//! configs built from it (`Spec::train_config`, ...) hold nothing that would fail later or
//! silently change results. An error names the key.
use super::Spec;
use crate::meanflow::sampler;
use crate::model::SiTConfig;

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
    /// Fills the model's shape from its preset; a field set in the file wins over the preset.
    pub(super) fn resolve(&mut self) -> Checked {
        let m = &mut self.model;
        if let Some(name) = &m.preset {
            let Some(p) = SiTConfig::preset(name) else {
                return fail(
                    "model.preset",
                    format!(
                        "unknown preset `{name}`, expected one of {}",
                        SiTConfig::preset_names().join(", ")
                    ),
                );
            };
            m.depth.get_or_insert(p.depth);
            m.hidden_size.get_or_insert(p.hidden_size);
            m.num_heads.get_or_insert(p.num_heads);
            m.patch_size.get_or_insert(p.patch_size);
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
        self.validate_model()?;
        self.validate_meanflow()?;
        self.validate_train()?;
        self.validate_sample()
    }

    /// The network's shape.
    fn validate_model(&self) -> Checked {
        let c = self.model_config();
        for (key, v) in [
            ("model.depth", c.depth),
            ("model.hidden_size", c.hidden_size),
            ("model.num_heads", c.num_heads),
            ("model.patch_size", c.patch_size),
            ("model.input_size", c.input_size),
            ("model.in_channels", c.in_channels),
            ("model.num_classes", c.num_classes),
        ] {
            require(v > 0, key, &format!("expected a positive integer, got {v}"))?;
        }
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
        )?;
        Ok(())
    }

    /// The objective's settings.
    fn validate_meanflow(&self) -> Checked {
        let m = &self.meanflow;
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        require(
            m.p_std > 0.0,
            "meanflow.P_std",
            "expected a positive number",
        )?;
        require(
            m.p_mean.is_finite(),
            "meanflow.P_mean",
            "expected a finite number",
        )?;
        require(
            unit(m.data_proportion),
            "meanflow.data_proportion",
            "expected a fraction in [0, 1]",
        )?;
        require(
            m.omega > 0.0 && m.omega.is_finite(),
            "meanflow.omega",
            "expected a positive number (1.0 = no guidance)",
        )?;
        require(
            (0.0..1.0).contains(&m.kappa),
            "meanflow.kappa",
            "expected a number in [0, 1)",
        )?;
        require(
            unit(m.t_start),
            "meanflow.t_start",
            "expected a time in [0, 1]",
        )?;
        require(unit(m.t_end), "meanflow.t_end", "expected a time in [0, 1]")?;
        require(
            m.t_start <= m.t_end,
            "meanflow.t_end",
            "must not be below meanflow.t_start",
        )?;
        require(m.norm_p >= 0.0, "meanflow.norm_p", "expected a number >= 0")?;
        require(
            m.norm_eps > 0.0,
            "meanflow.norm_eps",
            "expected a positive number",
        )?;
        require(
            (0.0..1.0).contains(&m.class_dropout),
            "meanflow.class_dropout",
            "expected a probability in [0, 1)",
        )?;
        Ok(())
    }

    /// The training loop's settings.
    fn validate_train(&self) -> Checked {
        let t = &self.train;
        require(t.batch > 0, "train.batch", "expected a positive integer")?;
        require(t.epochs > 0, "train.epochs", "expected a positive integer")?;
        require(t.lr > 0.0, "train.lr", "expected a positive number")?;
        require(
            t.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "train.betas",
            "expected two numbers in [0, 1)",
        )?;
        require(
            t.weight_decay >= 0.0,
            "train.weight_decay",
            "expected a number >= 0",
        )?;
        require(
            t.warmup_steps >= 0,
            "train.warmup_steps",
            "expected an integer >= 0",
        )?;
        require(
            t.grad_clip >= 0.0,
            "train.grad_clip",
            "expected a number >= 0 (0 disables clipping)",
        )?;
        require(
            (0.0..1.0).contains(&t.ema_decay),
            "train.ema_decay",
            "expected a number in [0, 1)",
        )?;
        require(
            t.grad_accumulation > 0 && t.batch % t.grad_accumulation == 0,
            "train.grad_accumulation",
            "expected a positive integer that divides train.batch",
        )?;
        require(
            t.log_every > 0,
            "train.log_every",
            "expected a positive integer",
        )?;
        require(
            t.checkpoint_every > 0,
            "train.checkpoint_every",
            "expected a positive integer",
        )?;
        require(
            t.keep_checkpoints > 0,
            "train.keep_checkpoints",
            "expected a positive integer",
        )?;
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
        for schedule in &s.schedules {
            if let Err(e) = sampler::check_schedule(schedule) {
                return fail("sample.schedules", e.to_string());
            }
        }
        require(
            s.num_samples > 0,
            "sample.num_samples",
            "expected a positive integer",
        )?;
        require(s.batch > 0, "sample.batch", "expected a positive integer")?;
        require(
            self.eval.batch > 0,
            "eval.batch",
            "expected a positive integer",
        )?;
        require(
            self.paper.tolerance > 0.0,
            "paper.tolerance",
            "expected a positive number",
        )?;
        Ok(())
    }
}
