//! A per-layer profile of training steps, read off the spans `kernels` opens around each
//! operation (`Net::forward`/`backward` per block, the convolution's weight and data gradients,
//! BatchNorm, activations, the loss, Adam), so the next optimisation is chosen from numbers.
//!
//! Written here rather than taken from a tracing profiler: what is wanted is one table keyed by
//! (network, pass, block, operation) summed over many steps, which none of them prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The phases of `Gan::train_step` that say which network and which pass an operation is in.
const PHASES: [&str; 6] = ["d_forward", "d_backward", "g_forward", "g_backward", "all_reduce", "optimizer"];

/// Where time went: (phase, block, operation).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub phase: String,
    /// The block (layer) index in its network; `None` for whole-network operations.
    pub block: Option<u64>,
    pub op: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct Total {
    pub seconds: f64,
    pub calls: u64,
    /// What the layer is (`conv 3->64 64->32`), from the block span's fields.
    pub layer: String,
}

/// The fields a span was opened with, and the time spent inside it.
#[derive(Default)]
struct SpanData {
    block: Option<u64>,
    layer: Option<String>,
    net: Option<String>,
    entered: Option<Instant>,
    seconds: f64,
}

impl Visit for SpanData {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "block" {
            self.block = Some(value);
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "block" {
            self.block = u64::try_from(value).ok();
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "layer" => self.layer = Some(value.to_string()),
            "net" => self.net = Some(value.to_string()),
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if matches!(field.name(), "layer" | "net") {
            self.record_str(field, format!("{value:?}").trim_matches('"'));
        }
    }
}

/// The layer that sums span times; clone [`Profile::totals`] before installing it.
#[derive(Clone, Default)]
pub struct Profile {
    pub totals: Arc<Mutex<BTreeMap<Key, Total>>>,
}

impl Profile {
    /// A dispatcher feeding this profile. Make it when the steps to profile begin: creating a
    /// dispatcher is what makes `tracing` ask again about spans met before (a warm-up's, cached
    /// as unwatched when nothing listened). Install it with [`run_profiled`].
    pub fn dispatch(&self) -> tracing::Dispatch {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::Dispatch::new(tracing_subscriber::registry().with(self.clone()))
    }
}

/// Runs `step` on `pool`, as the worker runs its steps, seen by `dispatch` when given. A
/// dispatcher set as a thread's default sees only that thread's spans, so it is installed on the
/// pool thread that runs the step, not on the caller's.
pub fn run_profiled<R: Send>(
    pool: &rayon::ThreadPool,
    dispatch: Option<&tracing::Dispatch>,
    step: impl FnOnce() -> R + Send,
) -> R {
    pool.install(|| match dispatch {
        Some(dispatch) => tracing::dispatcher::with_default(dispatch, step),
        None => step(),
    })
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Profile {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut data = SpanData::default();
        attrs.record(&mut data);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(data);
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(d) = ext.get_mut::<SpanData>() else { return };
        d.entered = Some(Instant::now());
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(d) = ext.get_mut::<SpanData>() else { return };
        d.seconds += d.entered.take().map_or(0.0, |t| t.elapsed().as_secs_f64());
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let op = span.metadata().name();
        let (seconds, own_block, own_net) = match span.extensions().get::<SpanData>() {
            Some(d) => (d.seconds, d.block, d.net.clone()),
            None => return,
        };
        // The nearest enclosing block gives the layer; the nearest phase, the network and pass.
        let (mut block, mut layer, mut phase) = (own_block, None, None);
        for ancestor in span.scope().skip(1) {
            let ext = ancestor.extensions();
            let Some(d) = ext.get::<SpanData>() else { continue };
            if block.is_none() {
                block = d.block;
            }
            if layer.is_none() {
                layer = d.layer.clone();
            }
            if PHASES.contains(&ancestor.metadata().name()) {
                phase = Some(ancestor.metadata().name().to_string());
                break;
            }
        }
        let phase = match (PHASES.contains(&op), phase) {
            // A phase span itself: its whole time, to compare the sum of its parts with.
            (true, _) => format!("{op}{}", own_net.map(|n| format!(" ({n})")).unwrap_or_default()),
            (false, Some(p)) => p,
            (false, None) => return,
        };
        if op == "block" {
            return;
        }
        let key = Key { phase, block: if PHASES.contains(&op) { None } else { block }, op };
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let t = totals.entry(key).or_default();
        t.seconds += seconds;
        t.calls += 1;
        if let Some(l) = layer {
            t.layer = l;
        }
    }
}

/// The profile as a table: milliseconds per step for every (phase, block, operation), and each
/// row's share of the step.
pub fn table(totals: &BTreeMap<Key, Total>, steps: usize, step_seconds: f64) -> String {
    let mut out = String::new();
    let per_step = |s: f64| s / steps as f64 * 1e3;
    let _ = writeln!(
        out,
        "{:<22} {:>5} {:<26} {:<22} {:>9} {:>7}",
        "phase", "block", "layer", "operation", "ms/step", "share"
    );
    let mut phases: Vec<&Key> = totals
        .keys()
        .filter(|k| PHASES.iter().any(|p| k.phase.starts_with(p)) && k.block.is_none() && PHASES.contains(&k.op))
        .collect();
    phases.sort_by(|a, b| totals[b].seconds.total_cmp(&totals[a].seconds));
    for (key, t) in totals.iter().filter(|(k, _)| !PHASES.contains(&k.op)) {
        let _ = writeln!(
            out,
            "{:<22} {:>5} {:<26} {:<22} {:>9.2} {:>6.1}%",
            key.phase,
            key.block.map(|b| b.to_string()).unwrap_or_default(),
            t.layer,
            key.op,
            per_step(t.seconds),
            100.0 * t.seconds / steps as f64 / step_seconds
        );
    }
    let _ = writeln!(out, "\nwhole phases (their parts above, plus what no span covers):");
    for key in phases {
        let t = &totals[key];
        let _ = writeln!(
            out,
            "{:<22} {:>9.2} ms/step {:>6.1}%",
            key.phase,
            per_step(t.seconds),
            100.0 * t.seconds / steps as f64 / step_seconds
        );
    }
    let _ = writeln!(out, "step (median wall time)  {:>9.2} ms", step_seconds * 1e3);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::{Gan, ModelConfig, OptimConfig, SingleProcess, Tensor};

    /// A step run on a pool after an unprofiled warm-up, as `step_bench --profile` runs them,
    /// fills the table with every network's convolutions.
    #[test]
    fn a_step_on_the_pool_after_a_warm_up_is_profiled() {
        let cfg = ModelConfig { ndf: 8, ngf: 8, ..ModelConfig::dcgan32_gray() };
        let mut gan = Gan::new(cfg.clone(), OptimConfig::default(), 1).unwrap();
        let batch = 4;
        let real = Tensor::new(vec![batch, 1, 32, 32], vec![0.25; batch * 32 * 32]).unwrap();
        let z = kernels::rng::noise(1, 0, 0, batch, cfg.nz);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let profile = Profile::default();
        run_profiled(&pool, None, || gan.train_step(&real, &z, 1.0, &mut SingleProcess)).unwrap();
        let dispatch = profile.dispatch();
        run_profiled(&pool, Some(&dispatch), || gan.train_step(&real, &z, 1.0, &mut SingleProcess)).unwrap();
        let totals = profile.totals.lock().unwrap();
        for phase in ["d_forward", "d_backward", "g_forward", "g_backward"] {
            assert!(
                totals.keys().any(|k| k.phase == phase && k.block.is_some() && k.op.starts_with("conv_")),
                "no {phase} convolution rows in {:?}",
                totals.keys().collect::<Vec<_>>()
            );
        }
        assert!(table(&totals, 1, 1.0).contains("conv_backward_weight"));
    }
}
