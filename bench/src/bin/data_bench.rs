//! Images/s one worker's data path delivers from a prepared data set, on one thread: the
//! worker's own access pattern (`data::epoch_order` for the epoch, `data::rank_batch` for each
//! step, `PreparedSet::gather` into an f32 batch in [-1, 1]) with no training around it.
//!
//! Pass `p` reads epoch `p`'s batches of rank `--rank` (as a run's epochs do). The first pass is
//! cold-ish: the shards are read through the page cache, and the program reports how much of
//! the set was resident before it (with `--evict`, the set's pages are first dropped from the
//! cache with `posix_fadvise(DONTNEED)`, which needs no root, so the first pass starts from
//! disk). The later passes are warm. Prints a human line on stderr and one JSON line on stdout.
//!
//! `cargo run --release -p dcgan-bench --bin data_bench -- --dir /data/prepared --world 2 --batch 64`

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use data::PreparedSet;

#[derive(Parser, Debug)]
#[command(about = "Times one worker's reads of a prepared data set (epoch order, rank batches, gather to f32)")]
struct Args {
    /// A prepared directory (made by `dcgan prepare`).
    #[arg(long)]
    dir: PathBuf,
    /// Ranks in the run; this process reads rank `--rank`'s part of every step.
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// Global batch (split across the ranks as a run splits it).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Steps per pass (default: a whole epoch).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// The run's seed (the coordinator's default is 999).
    #[arg(long, default_value_t = 999)]
    seed: u64,
    /// Passes: the first is the cold-ish one, the rest are warm.
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Steps per timing window; the warm figure is the median of the warm passes' windows.
    #[arg(long, default_value_t = 50)]
    window: usize,
    /// Drop the set's pages from the page cache before the first pass (posix_fadvise DONTNEED).
    #[arg(long)]
    evict: bool,
    /// A new Vec<f32> for every step, as the worker's loader does (it sends each batch away),
    /// instead of one reused buffer.
    #[arg(long)]
    fresh_vec: bool,
    /// Ask the disk for the samples of this many steps ahead (`will_need`), as the worker does
    /// (4); 0: no read-ahead.
    #[arg(long, default_value_t = 4)]
    read_ahead: usize,
}

/// The shard files of `set`.
fn shard_paths(set: &PreparedSet) -> Vec<PathBuf> {
    set.manifest().shards.iter().map(|s| set.dir().join(&s.file)).collect()
}

/// Fraction of `paths`' pages now in the page cache (mincore over a read-only mapping).
fn resident_fraction(paths: &[PathBuf]) -> Result<f64> {
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let (mut resident, mut total) = (0usize, 0usize);
    for path in paths {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = usize::try_from(file.metadata()?.len())?;
        if len == 0 {
            continue;
        }
        let pages = len.div_ceil(page);
        // SAFETY: a private read-only mapping of a file we hold open, unmapped before return; the
        // vector has one byte per page, as mincore writes.
        unsafe {
            let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0);
            ensure!(addr != libc::MAP_FAILED, "mmap {}: {}", path.display(), std::io::Error::last_os_error());
            let mut vec = vec![0u8; pages];
            let rc = libc::mincore(addr, len, vec.as_mut_ptr());
            let err = std::io::Error::last_os_error();
            libc::munmap(addr, len);
            ensure!(rc == 0, "mincore {}: {err}", path.display());
            resident += vec.iter().filter(|&&b| b & 1 == 1).count();
        }
        total += pages;
    }
    Ok(if total == 0 { 0.0 } else { resident as f64 / total as f64 })
}

/// Asks the kernel to drop `paths`' clean pages from the page cache.
fn evict(paths: &[PathBuf]) -> Result<()> {
    for path in paths {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(rc == 0, "posix_fadvise {}: error {rc}", path.display());
    }
    Ok(())
}

/// The first CPU's `model name`, with its family and model numbers where the name is generic
/// (VMs often say just "Intel(R) Xeon(R) Processor").
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| "unknown".into());
    match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{name} (family {f} model {m})"),
        _ => name,
    }
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// (steal, total) jiffies of all CPUs, from /proc/stat.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    Some((*fields.get(7)?, fields.iter().take(8).sum()))
}

/// One pass: epoch `epoch`'s first `steps` steps for this rank. Returns each step's time and
/// images.
fn pass(
    set: &PreparedSet,
    args: &Args,
    steps: usize,
    epoch: u64,
    out: &mut Vec<f32>,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let order = data::epoch_order(args.seed, epoch, set.len());
    let mut times = Vec::with_capacity(steps);
    let mut images = Vec::with_capacity(steps);
    let mut checksum = 0.0f32;
    for step in 0..steps {
        let t = Instant::now();
        let indices = data::rank_batch(&order, step, args.batch, args.world, args.rank);
        if args.read_ahead > 0 {
            let ahead = if step == 0 { 0..=args.read_ahead } else { args.read_ahead..=args.read_ahead };
            for k in ahead.filter(|k| step + k < steps) {
                set.will_need(data::rank_batch(&order, step + k, args.batch, args.world, args.rank));
            }
        }
        if args.fresh_vec {
            *out = Vec::new();
        }
        set.gather(indices, out).with_context(|| format!("step {step} of epoch {epoch}"))?;
        times.push(t.elapsed().as_secs_f64());
        images.push(indices.len());
        // Keep the batch observably used.
        checksum += out.first().copied().unwrap_or(0.0);
    }
    std::hint::black_box(checksum);
    Ok((times, images))
}

/// Images/s of each window of `window` steps (a last partial window of at least half a window
/// counts too).
fn window_rates(times: &[f64], images_per_step: &[usize], window: usize) -> Vec<f64> {
    times
        .chunks(window)
        .zip(images_per_step.chunks(window))
        .filter(|(t, _)| t.len() * 2 >= window)
        .map(|(t, n)| n.iter().sum::<usize>() as f64 / t.iter().sum::<f64>())
        .collect()
}

/// The raw bytes alone (`read_bytes` into a u8 buffer, no f32 conversion), one warm pass.
fn bytes_only_rate(set: &PreparedSet, args: &Args, steps: usize, epoch: u64) -> Result<f64> {
    let order = data::epoch_order(args.seed, epoch, set.len());
    let mut buf = vec![0u8; set.sample_len()];
    let mut images = 0usize;
    let mut sum = 0u64;
    let t = Instant::now();
    for step in 0..steps {
        for &i in data::rank_batch(&order, step, args.batch, args.world, args.rank) {
            set.read_bytes(i as usize, &mut buf)?;
            sum += u64::from(buf[0]);
            images += 1;
        }
    }
    std::hint::black_box(sum);
    Ok(images as f64 / t.elapsed().as_secs_f64())
}

fn utc_date(unix: u64) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (unix / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let secs = unix % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.world >= 1 && args.rank < args.world, "--rank {} is outside a world of {}", args.rank, args.world);
    ensure!(args.batch >= args.world, "--batch {} is smaller than --world {}", args.batch, args.world);
    ensure!(args.passes >= 2, "--passes must be at least 2 (a cold-ish pass and a warm one)");
    ensure!(args.window >= 1, "--window must be at least 1");
    let set = PreparedSet::open(Path::new(&args.dir)).with_context(|| format!("opening {}", args.dir.display()))?;
    let per_epoch = data::steps_per_epoch(set.len(), args.batch)?;
    let steps = args.steps.unwrap_or(per_epoch);
    ensure!((1..=per_epoch).contains(&steps), "--steps must be 1..={per_epoch} (one epoch of this set)");
    let paths = shard_paths(&set);
    let set_bytes = set.len() as u64 * set.manifest().sample_bytes();

    let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let load_before = loadavg();
    let ticks_before = cpu_ticks();
    if args.evict {
        evict(&paths)?;
    }
    let resident_before = resident_fraction(&paths)?;

    let mut out = Vec::new();
    let mut passes = Vec::new();
    for p in 0..args.passes {
        let t = Instant::now();
        let (times, per_step) = pass(&set, &args, steps, p as u64, &mut out)?;
        let wall = t.elapsed().as_secs_f64();
        let images = per_step.iter().sum::<usize>();
        passes.push((times, per_step, images, wall));
    }
    let resident_after = resident_fraction(&paths)?;
    let bytes_only = bytes_only_rate(&set, &args, steps, args.passes as u64)?;
    let ticks_after = cpu_ticks();
    let load_after = loadavg();

    let pass_rates: Vec<f64> = passes.iter().map(|(_, _, images, wall)| *images as f64 / wall).collect();
    let mut warm_windows: Vec<f64> =
        passes[1..].iter().flat_map(|(t, n, _, _)| window_rates(t, n, args.window)).collect();
    let mut cold_windows = window_rates(&passes[0].0, &passes[0].1, args.window);
    let warm_median = dcgan_bench::median(&mut warm_windows);
    let cold_median_window = dcgan_bench::median(&mut cold_windows);
    let mut warm_steps: Vec<f64> = passes[1..].iter().flat_map(|(t, _, _, _)| t.iter().copied()).collect();
    let warm_step_median_ms = dcgan_bench::median(&mut warm_steps) * 1e3;
    let local_batch = passes[0].2 as f64 / steps as f64;
    let steal = match (ticks_before, ticks_after) {
        (Some((s0, t0)), Some((s1, t1))) if t1 > t0 => Some((s1 - s0) as f64 / (t1 - t0) as f64),
        _ => None,
    };
    let goal = 20_000.0;
    let cpu = cpu_model();

    let json = serde_json::json!({
        "program": "data_bench",
        "date_utc": utc_date(started),
        "dir": args.dir.display().to_string(),
        "samples": set.len(),
        "image_size": set.image_size(),
        "channels": set.nc(),
        "set_mib": set_bytes as f64 / (1 << 20) as f64,
        "shards": paths.len(),
        "world": args.world,
        "rank": args.rank,
        "global_batch": args.batch,
        "local_batch_mean": local_batch,
        "seed": args.seed,
        "steps_per_pass": steps,
        "passes": args.passes,
        "window_steps": args.window,
        "fresh_vec_per_step": args.fresh_vec,
        "evicted_first": args.evict,
        "page_cache_resident_before": resident_before,
        "page_cache_resident_after": resident_after,
        "cold_pass_images_per_sec": pass_rates[0],
        "cold_pass_window_median_images_per_sec": cold_median_window,
        "warm_pass_images_per_sec": &pass_rates[1..],
        "warm_window_median_images_per_sec": warm_median,
        "warm_step_median_ms": warm_step_median_ms,
        "bytes_only_images_per_sec": bytes_only,
        "goal_images_per_sec": goal,
        "goal_met": warm_median >= goal,
        "peak_rss_mib": dcgan_bench::peak_rss_mib(),
        "cpu_model": cpu,
        "cpus": cpu_count(),
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": load_after,
        "cpu_steal_fraction": steal,
    });
    eprintln!(
        "data_bench {} ({} x {}x{}x{}, {:.0} MiB): world {} rank {} batch {} ({:.1}/rank), {} steps/pass; \
         first pass {} ({:.0}% of the set cached before it): {:.0} img/s; warm: median {:.0} img/s over {} windows \
         of {} steps (passes {}); bytes only {:.0} img/s; goal {:.0} img/s {}; peak RSS {:.1} MiB; {} ({} CPUs), \
         load {:.2} -> {:.2}",
        args.dir.display(),
        set.len(),
        set.nc(),
        set.image_size(),
        set.image_size(),
        set_bytes as f64 / (1 << 20) as f64,
        args.world,
        args.rank,
        args.batch,
        local_batch,
        steps,
        if args.evict { "cold (evicted)" } else { "cold-ish" },
        resident_before * 100.0,
        pass_rates[0],
        warm_median,
        warm_windows.len(),
        args.window,
        pass_rates[1..].iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
        bytes_only,
        goal,
        if warm_median >= goal { "met" } else { "NOT met" },
        dcgan_bench::peak_rss_mib().unwrap_or(f64::NAN),
        cpu,
        cpu_count(),
        load_before.unwrap_or(f64::NAN),
        load_after.unwrap_or(f64::NAN),
    );
    println!("{json}");
    Ok(())
}
