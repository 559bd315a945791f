//! What the terminal shows: a progress bar (epoch, step, losses, images/s, ETA) when stderr is a
//! terminal and `--quiet` is off, and log lines that print above the bar instead of through it.

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
