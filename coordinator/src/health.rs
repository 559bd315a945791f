//! GAN health: the ways a GAN run fails quietly, watched by the coordinator.
//!
//! - **D has won**: over the last `d_won_steps` steps, D(G(z)) as G sees it (after D's update)
//!   averages below 0.01 while D(x) averages above 0.9: D tells every fake apart and G stops
//!   making progress. Means over a window, not every step in a row: one noisy step must not
//!   hide a lost run (the default run once ended at D(x) 0.971, D(G(z)) 0.003, loss_G 8 with no
//!   warning; by this rule it is caught at step 105).
//! - **NaN or inf** in a loss or a D output: the run is numerically dead (latched).
//! - **Mode collapse**: the mean pairwise distance of the fixed-noise samples drawn at the end of
//!   an epoch falls below `collapse_fraction` of that of the real samples in `samples/real.png`.
//!   A freshly initialised G makes nearly identical images, so in the first
//!   [`COLLAPSE_GRACE_EPOCHS`] epochs only a *drop* counts (an earlier grid was varied enough).
//!
//! Each turns into a warning in the log (once per onset), a gauge (see [`crate::observability`])
//! and a field of `GetStatus` ([`proto::v1::GanHealth`]).

use std::sync::{Arc, Mutex};

use proto::v1;

use crate::metrics_log::StepRecord;
use crate::step_feed::StepSink;

/// D(x) averaging above this while D(G(z)) averages below [`D_FAKE_LOW`]: D has won.
pub const D_REAL_HIGH: f32 = 0.9;
pub const D_FAKE_LOW: f32 = 0.01;
/// Epochs during which low sample variety counts as collapse only after it had been reached.
pub const COLLAPSE_GRACE_EPOCHS: u64 = 3;

/// The thresholds of the signals.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthConfig {
    pub d_won_steps: u64,
    pub collapse_fraction: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { d_won_steps: 100, collapse_fraction: 0.2 }
    }
}

/// The signals' current state.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub config: HealthConfig,
    /// Steps in a row for which D has won, counted from the start of the first window that
    /// showed it (so `d_won_steps` at the onset).
    pub d_won_streak: u64,
    /// (D(x), D(G(z)) after D's update) of the last `d_won_steps` steps.
    recent: std::collections::VecDeque<(f32, f32)>,
    pub nonfinite_step: Option<u64>,
    pub real_distance: Option<f64>,
    /// (epoch, mean pairwise distance) of the latest fake grid.
    pub fake_distance: Option<(u64, f64)>,
    /// The highest fake/real diversity ratio seen so far.
    pub peak_ratio: f64,
}

impl Health {
    pub fn new(config: HealthConfig) -> Self {
        Self { config, ..Default::default() }
    }

    pub fn d_won(&self) -> bool {
        self.d_won_streak >= self.config.d_won_steps.max(1)
    }

    pub fn nonfinite(&self) -> bool {
        self.nonfinite_step.is_some()
    }

    /// Fake over real mean pairwise distance, once both are known.
    pub fn diversity_ratio(&self) -> Option<f64> {
        match (self.real_distance, self.fake_distance) {
            (Some(r), Some((_, f))) if r > 0.0 => Some(f / r),
            _ => None,
        }
    }

    pub fn mode_collapse(&self) -> bool {
        let late = self.fake_distance.is_some_and(|(epoch, _)| epoch >= COLLAPSE_GRACE_EPOCHS);
        let dropped = self.peak_ratio >= self.config.collapse_fraction;
        (late || dropped) && self.diversity_ratio().is_some_and(|r| r < self.config.collapse_fraction)
    }

    /// Takes an aggregated step; returns the warnings whose condition began at this step.
    pub fn observe_step(&mut self, r: &StepRecord) -> Vec<String> {
        let mut onsets = Vec::new();
        let values = [r.loss_d, r.loss_g, r.d_x, r.d_g_z1, r.d_g_z2];
        if self.nonfinite_step.is_none() && values.iter().any(|v| !v.is_finite()) {
            self.nonfinite_step = Some(r.step);
            onsets.push(format!(
                "non-finite value at step {}: loss_D {} loss_G {} D(x) {} D(G(z)) {}/{}",
                r.step, r.loss_d, r.loss_g, r.d_x, r.d_g_z1, r.d_g_z2
            ));
        }
        let was_won = self.d_won();
        let window = self.config.d_won_steps.max(1) as usize;
        self.recent.push_back((r.d_x, r.d_g_z2));
        while self.recent.len() > window {
            self.recent.pop_front();
        }
        let n = self.recent.len() as f32;
        let (sum_real, sum_fake) = self.recent.iter().fold((0.0f32, 0.0f32), |(a, b), (x, z)| (a + x, b + z));
        let won_now = self.recent.len() == window && sum_real / n > D_REAL_HIGH && sum_fake / n < D_FAKE_LOW;
        self.d_won_streak = match (won_now, self.d_won_streak) {
            (false, _) => 0,
            (true, 0) => window as u64,
            (true, streak) => streak + 1,
        };
        if self.d_won() && !was_won {
            onsets.push(format!(
                "the discriminator has won: over the {} steps up to step {}, D(x) averaged above {D_REAL_HIGH} and D(G(z)) below {D_FAKE_LOW}; G's gradients vanish (try a lower --lr, a smaller --ndf, or more data)",
                self.d_won_streak, r.step
            ));
        }
        onsets
    }

    /// Takes the mean pairwise distance of the fixed-noise grid of `epoch`; returns a warning
    /// when mode collapse begins.
    pub fn observe_samples(&mut self, epoch: u64, distance: f64) -> Option<String> {
        let was = self.mode_collapse();
        self.fake_distance = Some((epoch, distance));
        if let Some(r) = self.diversity_ratio() {
            self.peak_ratio = self.peak_ratio.max(r);
        }
        match (self.mode_collapse() && !was, self.diversity_ratio()) {
            (true, Some(ratio)) => Some(format!(
                "mode collapse: the fixed-noise samples of epoch {epoch} are {:.1}% as varied as the real ones (threshold {:.0}%)",
                ratio * 100.0,
                self.config.collapse_fraction * 100.0
            )),
            _ => None,
        }
    }

    /// The signals as sentences (empty when healthy).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(step) = self.nonfinite_step {
            w.push(format!("non-finite loss or D output since step {step}"));
        }
        if self.d_won() {
            w.push(format!("the discriminator has won for the last {} steps", self.d_won_streak));
        }
        if self.mode_collapse() {
            let ratio = self.diversity_ratio().unwrap_or(0.0);
            w.push(format!("mode collapse: sample diversity {:.1}% of the real samples' diversity", ratio * 100.0));
        }
        w
    }

    pub fn to_proto(&self) -> v1::GanHealth {
        v1::GanHealth {
            d_won: self.d_won(),
            d_won_streak_steps: self.d_won_streak,
            d_won_min_steps: self.config.d_won_steps,
            nonfinite_loss: self.nonfinite(),
            nonfinite_step: self.nonfinite_step.unwrap_or(0),
            mode_collapse: self.mode_collapse(),
            real_pairwise_distance: self.real_distance.unwrap_or(0.0),
            fake_pairwise_distance: self.fake_distance.map_or(0.0, |(_, d)| d),
            samples_epoch: self.fake_distance.map_or(0, |(e, _)| e),
            sample_diversity_ratio: self.diversity_ratio().unwrap_or(0.0),
            collapse_fraction: self.config.collapse_fraction,
            warnings: self.warnings(),
        }
    }
}

/// One generation's [`Health`], shared by the step feed (whose sink it is), the sample
/// renderer (mode collapse) and `GetStatus`. Every change is logged as a warning at its onset
/// and exported to Prometheus.
#[derive(Clone)]
pub struct HealthMonitor(Arc<Mutex<Watched>>);

/// The signals, and since when D has stopped winning (for the all-clear).
struct Watched {
    health: Health,
    not_won_since: Option<u64>,
}

impl HealthMonitor {
    pub fn new(config: HealthConfig) -> Self {
        Self(Arc::new(Mutex::new(Watched { health: Health::new(config), not_won_since: None })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the mean pairwise distance of the real sample grid (mode collapse's yardstick).
    pub fn set_real_distance(&self, distance: f64) {
        let health = &mut self.lock().health;
        health.real_distance = Some(distance);
        crate::observability::record_health(health);
    }

    /// Takes the mean pairwise distance of the fixed-noise grid drawn at the end of `epoch`.
    pub fn observe_samples(&self, epoch: u64, distance: f64) {
        let onset = {
            let health = &mut self.lock().health;
            let onset = health.observe_samples(epoch, distance);
            crate::observability::record_health(health);
            onset
        };
        if let Some(w) = onset {
            tracing::warn!(epoch, "GAN health: {w}");
        }
    }

    /// The signals as `GetStatus` shows them.
    pub fn to_proto(&self) -> v1::GanHealth {
        self.lock().health.to_proto()
    }
}

impl StepSink for HealthMonitor {
    fn take(&mut self, record: &StepRecord) -> anyhow::Result<()> {
        let (onsets, recovered) = {
            let mut watched = self.lock();
            let was_won = watched.health.d_won();
            let onsets = watched.health.observe_step(record);
            crate::observability::record_health(&watched.health);
            // An early win often passes (a young G's images are easy to tell apart): once D has
            // not won for a whole window, say so, so that the warning is not read as the run's
            // verdict. A window, so that a mean hovering at the threshold says it once.
            let window = watched.health.config.d_won_steps.max(1);
            watched.not_won_since = match (watched.health.d_won(), was_won, watched.not_won_since) {
                (true, _, _) => None,
                (false, true, _) => Some(record.step),
                (false, false, since) => since,
            };
            let recovered = watched.not_won_since.is_some_and(|since| record.step >= since + window);
            if recovered {
                watched.not_won_since = None;
            }
            (onsets, recovered)
        };
        for w in onsets {
            tracing::warn!(step = record.step, "GAN health: {w}");
        }
        if recovered {
            tracing::info!(
                step = record.step,
                "GAN health: the discriminator has not won for a while; G is learning again"
            );
        }
        Ok(())
    }
}

/// Mean L2 distance over all pairs of the `n` images in `pixels` (each `pixels.len() / n` long).
pub fn mean_pairwise_distance(pixels: &[f32], n: usize) -> f64 {
    if n < 2 || pixels.len() < n {
        return 0.0;
    }
    let len = pixels.len() / n;
    let images: Vec<&[f32]> = pixels.chunks_exact(len).take(n).collect();
    let mut sum = 0.0f64;
    for i in 0..n {
        for j in i + 1..n {
            let d2: f64 = images[i].iter().zip(images[j]).map(|(a, b)| f64::from(a - b).powi(2)).sum();
            sum += d2.sqrt();
        }
    }
    sum / (n * (n - 1) / 2) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, d_x: f32, d_g_z1: f32, loss_d: f32) -> StepRecord {
        StepRecord { step, d_x, d_g_z1, d_g_z2: d_g_z1, loss_d, loss_g: 1.0, ..Default::default() }
    }

    #[test]
    fn d_won_needs_a_sustained_streak_and_resets() {
        let mut h = Health::new(HealthConfig { d_won_steps: 3, collapse_fraction: 0.2 });
        assert!(h.observe_step(&rec(1, 0.995, 0.005, 0.1)).is_empty());
        assert!(h.observe_step(&rec(2, 0.995, 0.005, 0.1)).is_empty());
        let w = h.observe_step(&rec(3, 0.995, 0.005, 0.1));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(h.d_won() && h.to_proto().d_won);
        // Warned once per onset, not every step.
        assert!(h.observe_step(&rec(4, 0.995, 0.005, 0.1)).is_empty());
        h.observe_step(&rec(5, 0.7, 0.3, 0.1));
        assert!(!h.d_won() && h.d_won_streak == 0);
    }

    /// The run that once escaped the alarm: D(x) around 0.97 (never above 0.99) and D(G(z))
    /// around 0.003 with the odd noisy step.
    #[test]
    fn d_won_is_caught_through_noisy_steps() {
        let mut h = Health::new(HealthConfig { d_won_steps: 20, collapse_fraction: 0.2 });
        let mut onsets = Vec::new();
        for step in 1..=40u64 {
            let (d_x, d_g_z) = if step % 7 == 0 { (0.93, 0.02) } else { (0.971, 0.003) };
            onsets.extend(h.observe_step(&rec(step, d_x, d_g_z, 0.03)));
        }
        assert_eq!(onsets.len(), 1, "{onsets:?}");
        assert!(onsets[0].contains("up to step 20"), "{onsets:?}");
        assert!(h.d_won() && h.d_won_streak == 40);
        // A healthy game (D(G(z)) near 0.3) never trips it.
        let mut fair = Health::new(HealthConfig { d_won_steps: 20, collapse_fraction: 0.2 });
        for step in 1..=100u64 {
            assert!(fair.observe_step(&rec(step, 0.8, 0.25, 0.9)).is_empty());
        }
    }

    #[test]
    fn nonfinite_is_latched_at_its_first_step() {
        let mut h = Health::default();
        assert!(h.observe_step(&rec(1, 0.5, 0.5, 1.0)).is_empty());
        assert_eq!(h.observe_step(&rec(2, 0.5, 0.5, f32::NAN)).len(), 1);
        assert!(h.observe_step(&rec(3, 0.5, 0.5, f32::INFINITY)).is_empty());
        h.observe_step(&rec(4, 0.5, 0.5, 1.0));
        assert_eq!(h.nonfinite_step, Some(2));
        assert!(h.to_proto().nonfinite_loss);
        assert_eq!(h.warnings().len(), 1);
    }

    #[test]
    fn mode_collapse_compares_fake_with_real_diversity() {
        let mut h = Health::default();
        // Three distinct images vs three identical ones.
        let real = [0.0f32, 0.0, 1.0, 0.0, 0.0, 1.0];
        h.real_distance = Some(mean_pairwise_distance(&real, 3));
        let expected = (1.0 + 1.0 + 2f64.sqrt()) / 3.0;
        assert!((h.real_distance.unwrap_or(0.0) - expected).abs() < 1e-9);
        assert!(h.observe_samples(0, mean_pairwise_distance(&real, 3)).is_none());
        assert!(!h.mode_collapse());
        let collapsed = [0.5f32, 0.5, 0.5, 0.5, 0.5, 0.5];
        assert!(h.observe_samples(1, mean_pairwise_distance(&collapsed, 3)).is_some(), "a drop counts at once");
        assert!(h.mode_collapse() && h.to_proto().mode_collapse);
        // A fresh G's low variety is not collapse during the grace epochs, but is after them.
        let mut fresh = Health { real_distance: h.real_distance, ..Default::default() };
        assert!(fresh.observe_samples(0, mean_pairwise_distance(&collapsed, 3)).is_none());
        assert!(!fresh.mode_collapse());
        assert!(fresh.observe_samples(COLLAPSE_GRACE_EPOCHS, mean_pairwise_distance(&collapsed, 3)).is_some());
        assert!(h.mode_collapse() && h.to_proto().mode_collapse);
        assert_eq!(h.to_proto().samples_epoch, 1);
    }

    #[test]
    fn the_monitor_gives_the_all_clear_once_d_has_not_won_for_a_window() {
        use crate::step_feed::StepSink;
        let mut monitor = HealthMonitor::new(HealthConfig { d_won_steps: 4, collapse_fraction: 0.2 });
        let step = |step, d_x, d_g_z2| StepRecord { step, d_x, d_g_z2, ..Default::default() };
        for s in 1..=4 {
            monitor.take(&step(s, 0.99, 0.001)).unwrap();
        }
        assert!(monitor.to_proto().d_won);
        for s in 5..=7 {
            monitor.take(&step(s, 0.5, 0.5)).unwrap();
        }
        assert!(!monitor.to_proto().d_won);
        assert!(monitor.lock().not_won_since.is_some(), "the all-clear waits for a whole window");
        monitor.take(&step(8, 0.5, 0.5)).unwrap();
        monitor.take(&step(9, 0.5, 0.5)).unwrap();
        assert_eq!(monitor.lock().not_won_since, None, "said once");
    }
}
