//! What the terminal shows: a progress bar (epoch, step, losses, images/s, ETA) when stderr is a
//! terminal and `--quiet` is off, and log lines that print above the bar instead of through it.
//! Without a terminal (output redirected, a container's log), a [`StepLine`] every
//! `--log-every` steps says the same, as the PyTorch example's per-iteration line does.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::fmt::MakeWriter;

use crate::metrics_log::StepRecord;

/// The bar, shared with the log writer so log lines suspend it while they print.
#[derive(Clone, Default)]
pub struct Progress {
    bar: Arc<Mutex<Option<ProgressBar>>>,
}

impl Progress {
    /// Whether a bar would be drawn: stderr is a terminal and the user did not ask for quiet.
    pub fn wanted(quiet: bool) -> bool {
        !quiet && std::io::stderr().is_terminal()
    }

    /// Shows a bar for steps `start..total`.
    pub fn start(&self, start: u64, total: u64, epochs: u32) {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30.cyan/blue}] {pos}/{len} steps {msg} ({elapsed} < {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("epoch 1/{epochs}"));
        bar.set_position(start);
        // The ETA counts only this generation's steps.
        bar.reset_eta();
        *self.lock() = Some(bar);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the bar to an aggregated step.
    pub fn update(&self, r: &StepRecord, epochs: u32) {
        if let Some(bar) = self.lock().as_ref() {
            bar.set_position(r.step);
            bar.set_prefix(format!("epoch {}/{epochs}", r.epoch + 1));
            bar.set_message(format!(
                "loss_D {:.3} loss_G {:.3} D(x) {:.2} D(G(z)) {:.2}/{:.2} {:.0} img/s",
                r.loss_d, r.loss_g, r.d_x, r.d_g_z1, r.d_g_z2, r.images_per_sec
            ));
        }
    }

    /// Removes the bar (at the end, before the summary is printed).
    pub fn finish(&self) {
        if let Some(bar) = self.lock().take() {
            bar.finish_and_clear();
        }
    }

    /// A `MakeWriter` for tracing that prints log lines above the bar.
    pub fn log_writer(&self) -> LogWriter {
        LogWriter { progress: self.clone() }
    }
}

/// The periodic training line for logs without a progress bar: "step 150/256 epoch 2/2
/// loss_D ... ETA 0:41", the ETA from this generation's pace.
#[derive(Debug)]
pub struct StepLine {
    total: u64,
    epochs: u64,
    every: u64,
    /// The first step this generation saw, and when.
    start: Option<(u64, std::time::Instant)>,
}

impl StepLine {
    /// A line every `every` steps (never for 0) of a run of `total` steps in `epochs` epochs.
    pub fn new(total: u64, epochs: u64, every: u64) -> Self {
        Self { total, epochs: epochs.max(1), every, start: None }
    }

    /// The line for step `r`, if one is due (every `every` steps, and the last step).
    pub fn observe(&mut self, r: &StepRecord, now: std::time::Instant) -> Option<String> {
        let (first, at) = *self.start.get_or_insert((r.step, now));
        let due = self.every > 0 && (r.step % self.every == 0 || r.step == self.total);
        if !due {
            return None;
        }
        let done = r.step.saturating_sub(first);
        let eta = (done > 0).then(|| {
            let per_step = now.duration_since(at).as_secs_f64() / done as f64;
            per_step * self.total.saturating_sub(r.step) as f64
        });
        Some(format!(
            "step {}/{} epoch {}/{} loss_D {:.4} loss_G {:.4} D(x) {:.3} D(G(z)) {:.3}/{:.3} {:.0} img/s ETA {}",
            r.step,
            self.total,
            (r.epoch + 1).min(self.epochs),
            self.epochs,
            r.loss_d,
            r.loss_g,
            r.d_x,
            r.d_g_z1,
            r.d_g_z2,
            r.images_per_sec,
            eta.map_or("?".to_string(), clock),
        ))
    }
}

/// Seconds as `H:MM:SS` (or `M:SS` under an hour).
fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s / 3600 {
        0 => format!("{}:{:02}", s / 60, s % 60),
        h => format!("{h}:{:02}:{:02}", s / 60 % 60, s % 60),
    }
}

/// Writes log lines to stderr, suspending the progress bar while it does.
#[derive(Clone)]
pub struct LogWriter {
    progress: Progress,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = self.progress.lock().clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn rec(step: u64, epoch: u64) -> StepRecord {
        StepRecord {
            step,
            epoch,
            loss_d: 1.25,
            loss_g: 2.5,
            d_x: 0.75,
            d_g_z1: 0.25,
            d_g_z2: 0.125,
            images_per_sec: 412.0,
            ..Default::default()
        }
    }

    #[test]
    fn a_line_every_n_steps_and_at_the_last_with_an_eta() {
        let t0 = Instant::now();
        let mut line = StepLine::new(256, 2, 50);
        assert_eq!(line.observe(&rec(1, 0), t0), None);
        assert_eq!(line.observe(&rec(49, 0), t0 + Duration::from_secs(48)), None);
        // 50 steps done 49 s after step 1 at 1 s a step: 206 steps left.
        let l = line.observe(&rec(50, 0), t0 + Duration::from_secs(49)).expect("due");
        assert_eq!(
            l,
            "step 50/256 epoch 1/2 loss_D 1.2500 loss_G 2.5000 D(x) 0.750 D(G(z)) 0.250/0.125 412 img/s ETA 3:26"
        );
        let last = line.observe(&rec(256, 1), t0 + Duration::from_secs(255)).expect("the last step");
        assert!(last.starts_with("step 256/256 epoch 2/2") && last.ends_with("ETA 0:00"), "{last}");
        assert_eq!(StepLine::new(256, 2, 0).observe(&rec(50, 0), t0), None, "0: never");
    }

    #[test]
    fn clock_reads_as_minutes_or_hours() {
        assert_eq!(clock(41.0), "0:41");
        assert_eq!(clock(3725.0), "1:02:05");
    }
}
