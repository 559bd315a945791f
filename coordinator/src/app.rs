//! One coordinator invocation from start to exit, as wiring: check and open everything
//! ([`crate::preflight`]), run generations until one ends the run ([`crate::generation`]),
//! say how it ended, and linger for the dashboards if asked.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use tokio::net::TcpListener;

use crate::checkpoint_store::CheckpointStore;
use crate::config::RunConfig;
use crate::flags::{Cli, Explicit};
use crate::generation::{EXIT_GRACE, Ending, Generation, GenerationEnd, GenerationPlan, Next, RunContext, next_after};
use crate::observability;
use crate::preflight::{Prepared, prepare};
use crate::progress::Progress;
use crate::resume::resume_point;
use crate::run::{Phase, Run};
use crate::run_dir::write_atomic;

/// How long a new generation retries its busy gRPC port.
const REBIND_PATIENCE: Duration = Duration::from_secs(10);

pub use dcgan_process::startup::Ended;

/// Runs the coordinator; `Ok` when the run completed or stopped cleanly.
pub async fn run(cli: Cli, explicit: Explicit, progress: Progress) -> anyhow::Result<Ended> {
    let Prepared { ctx, config, resume_from, listener, mut signals } = prepare(cli, explicit, progress).await?;

    // One generation per pass: a worker's failure ends one, and up to --max-restarts times the
    // next starts from the latest checkpoint with every worker launched (or joined) anew.
    let mut plan = GenerationPlan { world: config.workers, config, resume_from, restarts: 0 };
    let mut listener = Some(listener);
    let last = loop {
        let listener = match listener.take() {
            Some(l) => l,
            // The same address again, so external workers find the new generation where they left.
            None => bind_again(ctx.addr).await?,
        };
        let mut generation = Generation::start(&ctx, &plan, listener).await?;
        let outcome = generation.watch(&ctx, &mut signals).await;
        let end = generation.teardown(&ctx, outcome).await?;
        let Phase::Failed(reason) = &end.outcome else { break end };
        let next = next_after(&Ending::of(&end.outcome, &end.run), plan.restarts, ctx.cli.max_restarts);
        plan = match next {
            Next::Finish => break end,
            Next::Regroup { world } => {
                println!("{reason}; generation {} with {world} workers", plan.config.generation + 1);
                next_generation(&ctx, plan, world, 0)?
            }
            Next::Restart => {
                let plan = next_generation(&ctx, plan, ctx.cli.workers, 1)?;
                let from = plan.resume_from.map_or("the start".to_string(), |s| format!("the checkpoint of step {s}"));
                println!(
                    "{reason}; restart {} of {} (--max-restarts): generation {} from {from}",
                    plan.restarts, ctx.cli.max_restarts, plan.config.generation
                );
                tracing::warn!(
                    restarts = plan.restarts,
                    generation = plan.config.generation,
                    from = plan.resume_from.unwrap_or(0),
                    "restarting: {reason}"
                );
                plan
            }
        };
    };

    // The summary comes when the run ends, before any lingering.
    let ended = report_outcome(&last.outcome, &last.run, &ctx.store, &plan.config, ctx.dir.root());
    linger(&ctx, last, &mut signals).await;
    ended
}

/// The plan of the generation after `plan`'s failed: from the latest usable checkpoint, with
/// `world` ranks, `spent` more restarts.
fn next_generation(ctx: &RunContext, plan: GenerationPlan, world: u32, spent: u32) -> anyhow::Result<GenerationPlan> {
    let mut config = plan.config;
    config.generation += 1;
    let resume_from = resume_point(&ctx.store, &config, true)?;
    observability::record_restart(config.generation);
    Ok(GenerationPlan { config, resume_from, world, restarts: plan.restarts + spent })
}

/// `--metrics-linger N`: the live page and the metrics stay up N seconds in all after the last
/// generation ended (the workers' too); a signal ends it early.
async fn linger(ctx: &RunContext, last: GenerationEnd, signals: &mut dcgan_process::signals::StopSignals) {
    let linger_until = last.at + Duration::from_secs(ctx.cli.metrics_linger);
    let mut cut_short = false;
    if ctx.metrics_addr.is_some() && tokio::time::Instant::now() < linger_until {
        let left = linger_until - tokio::time::Instant::now();
        println!(
            "serving the live page and metrics for {} s more (--metrics-linger; Ctrl-C to exit now)",
            left.as_secs()
        );
        tokio::select! {
            _ = tokio::time::sleep_until(linger_until) => {}
            name = signals.next() => {
                println!("{name}: not lingering any longer");
                cut_short = true;
            }
        }
    }
    if let Some(workers) = last.lingering_workers {
        if cut_short {
            workers.kill_all();
        }
        workers
            .wait_all(EXIT_GRACE, async {
                signals.next().await;
            })
            .await;
    }
}

/// Says how the run ended (the summary line, or how to resume it) and turns the outcome into
/// the run's result.
fn report_outcome(
    outcome: &Phase,
    run: &Run,
    store: &CheckpointStore,
    config: &RunConfig,
    root: &std::path::Path,
) -> anyhow::Result<Ended> {
    match outcome {
        Phase::Completed => {
            let latest = run.latest();
            write_atomic(&root.join("COMPLETE"), format!("{}\n", config.total_steps).as_bytes())?;
            match latest {
                Some(r) => println!(
                    "run completed: {} steps, loss_D {:.4} loss_G {:.4} D(x) {:.3} D(G(z)) {:.3}/{:.3}; results in {}",
                    r.step,
                    r.loss_d,
                    r.loss_g,
                    r.d_x,
                    r.d_g_z1,
                    r.d_g_z2,
                    root.display()
                ),
                None => println!("run completed; results in {}", root.display()),
            }
            Ok(Ended::Completed)
        }
        Phase::Stopped { step, reason } => {
            let from = match store.latest()? {
                Some(c) => format!("its checkpoint of step {} is in {}", c.step, c.dir.display()),
                None => "it has no checkpoint yet".to_string(),
            };
            println!(
                "run stopped after step {step} of {} ({reason}); {from}; continue it with: coordinator --resume --run-dir {}",
                config.total_steps,
                root.display()
            );
            Ok(Ended::Stopped)
        }
        Phase::Failed(reason) => bail!("run failed: {reason}"),
        other => bail!("run stopped in state {other:?}"),
    }
}

/// Binds the gRPC port again for the next generation. The last generation's listener has
/// been dropped, but its socket may take a moment to leave the kernel's table under load: a
/// busy port is retried for a few seconds before the run gives up.
async fn bind_again(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + REBIND_PATIENCE;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot listen on {addr} again"))),
        }
    }
}
