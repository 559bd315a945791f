//! Ring all-reduce on loopback: `world` ranks as threads of this process, one `TcpRing` each.
//!
//! Prints, per buffer size, the median time of one all-reduce (the slowest rank's time in each
//! iteration), the algorithm bandwidth (`size / time`), the bus bandwidth (`algbw * 2 (w-1) / w`,
//! as nccl-tests defines it) and, for scale, a plain memcpy of the same buffer measured in the
//! same run. On loopback every byte is copied by the kernel too, so the ring competes with itself
//! for the same cores and memory bandwidth: compare shapes, not absolute link speeds.
//!
//! `cargo run --release -p allreduce --bin ring_bench -- --world 2 --mib 16 --iters 20`

use std::net::{SocketAddr, TcpListener};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use allreduce::{RingOptions, TcpRing, bus_bandwidth_factor};
use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Benchmark the TCP ring all-reduce on loopback")]
struct Args {
    /// Number of ranks (threads, each with its own sockets).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Largest buffer, in MiB of f32.
    #[arg(long, default_value_t = 16)]
    mib: usize,
    /// Smallest buffer, in KiB; sizes grow by 4x up to --mib.
    #[arg(long, default_value_t = 4)]
    min_kib: usize,
    /// Timed iterations per size (the median is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed iterations per size before timing.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Frame size of the ring, in KiB.
    #[arg(long, default_value_t = 256)]
    segment_kib: usize,
    /// Set SO_SNDBUF/SO_RCVBUF to this many KiB (default: leave them to the kernel).
    #[arg(long)]
    sockbuf_kib: Option<usize>,
}

fn sizes(args: &Args) -> Vec<usize> {
    let max = args.mib * 1024 * 1024;
    let mut out = Vec::new();
    let mut b = (args.min_kib * 1024).max(4);
    while b < max {
        out.push(b);
        b *= 4;
    }
    out.push(max);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Median seconds of copying a buffer of `bytes` into another (both touched beforehand).
fn memcpy_seconds(bytes: usize, iters: usize) -> f64 {
    let src = vec![1.0f32; bytes / 4];
    let mut dst = vec![0.0f32; bytes / 4];
    dst.copy_from_slice(&src);
    let times = (0..iters)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.world == 0 || args.iters == 0 || args.mib == 0 {
        bail!("--world, --iters and --mib must be positive");
    }
    let sizes = sizes(&args);
    let memcpy: Vec<f64> = sizes.iter().map(|&b| memcpy_seconds(b, args.iters)).collect();

    let listeners = (0..args.world)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding loopback listeners")?;
    let addrs = listeners.iter().map(TcpListener::local_addr).collect::<Result<Vec<SocketAddr>, _>>()?;
    let options = RingOptions {
        segment_bytes: args.segment_kib * 1024,
        socket_buffer_bytes: args.sockbuf_kib.map(|k| k * 1024),
        ..RingOptions::default()
    };
    let barrier = Barrier::new(args.world);

    // times[rank][size][iter]
    let times: Vec<Vec<Vec<f64>>> = thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, sizes, barrier, options, args) = (&addrs, &sizes, &barrier, options.clone(), &args);
                s.spawn(move || -> Result<Vec<Vec<f64>>> {
                    let mut ring = TcpRing::connect_with(rank, addrs, l, 0xbe9c, Duration::from_secs(30), options)?;
                    let mut per_size = Vec::new();
                    for &bytes in sizes {
                        let mut buf = vec![1.0f32 / (rank + 1) as f32; bytes / 4];
                        for _ in 0..args.warmup {
                            ring.all_reduce_sum(&mut buf)?;
                        }
                        let mut t = Vec::with_capacity(args.iters);
                        for _ in 0..args.iters {
                            barrier.wait();
                            let start = Instant::now();
                            ring.all_reduce_sum(&mut buf)?;
                            t.push(start.elapsed().as_secs_f64());
                        }
                        per_size.push(t);
                    }
                    Ok(per_size)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank thread panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;

    let factor = bus_bandwidth_factor(args.world);
    println!(
        "ring all-reduce on loopback: world {}, {} iters (+{} warm-up), segment {} KiB, socket buffers {}",
        args.world,
        args.iters,
        args.warmup,
        args.segment_kib,
        args.sockbuf_kib.map_or("kernel auto-tuned".to_string(), |k| format!("{k} KiB")),
    );
    println!(
        "{:>12} {:>12} {:>14} {:>14} {:>16}",
        "size (B)", "time (us)", "algbw (GB/s)", "busbw (GB/s)", "memcpy (GB/s)"
    );
    for (i, &bytes) in sizes.iter().enumerate() {
        // An all-reduce lasts until its slowest rank is done.
        let slowest: Vec<f64> =
            (0..args.iters).map(|it| times.iter().map(|rank| rank[i][it]).fold(0.0, f64::max)).collect();
        let t = median(slowest);
        let algbw = bytes as f64 / t / 1e9;
        println!(
            "{:>12} {:>12.1} {:>14.3} {:>14.3} {:>16.3}",
            bytes,
            t * 1e6,
            algbw,
            algbw * factor,
            bytes as f64 / memcpy[i] / 1e9
        );
    }
    Ok(())
}
