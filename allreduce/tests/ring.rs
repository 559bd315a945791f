//! The ring over real sockets on 127.0.0.1, one thread per rank.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use allreduce::{FRAME_HEADER_BYTES, HandshakeMismatch, RingError, RingOptions, TcpRing, bytes_sent_per_all_reduce};
use kernels::Collective;

const SESSION: u64 = 0x5eed_0001;
const SETUP: Duration = Duration::from_secs(10);

fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

/// Runs `body(rank, ring-or-error)` on one thread per rank and collects what each returns.
fn with_ranks<T: Send>(
    world: usize,
    session: impl Fn(usize) -> u64 + Sync,
    options: RingOptions,
    body: impl Fn(usize, Result<TcpRing, RingError>) -> T + Sync,
) -> Vec<T> {
    let (ls, addrs) = listeners(world);
    thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, session, body, options) = (&addrs, &session, &body, options.clone());
                s.spawn(move || {
                    let ring = TcpRing::connect_with(rank, addrs, l, session(rank), SETUP, options);
                    body(rank, ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Deterministic values in [-1, 1) that differ per rank and element (a cheap integer hash).
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let mut x = (i as u64) ^ ((rank as u64 + 1) << 40);
            x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 31;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

const LENS: [usize; 5] = [0, 1, 3, 1000, 1_000_003];

fn check_sums(world: usize, options: RingOptions) {
    let results = with_ranks(
        world,
        |_| SESSION,
        options,
        |rank, ring| {
            let mut ring = ring.unwrap();
            let mut outs = Vec::new();
            for len in LENS {
                let mut buf = input(rank, len);
                let before = ring.stats();
                ring.all_reduce_sum(&mut buf).unwrap();
                let after = ring.stats();
                let payload = bytes_sent_per_all_reduce(len, world, rank);
                let sent = after.bytes_sent - before.bytes_sent;
                let headers = sent - payload;
                assert_eq!(headers % FRAME_HEADER_BYTES as u64, 0);
                assert!(headers >= 2 * (world as u64 - 1) * FRAME_HEADER_BYTES as u64 || world == 1);
                outs.push(buf);
            }
            assert_eq!(ring.stats().all_reduces, LENS.len() as u64);
            outs
        },
    );
    for (i, len) in LENS.into_iter().enumerate() {
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
        for j in 0..len {
            let exact: f64 = inputs.iter().map(|v| f64::from(v[j])).sum();
            let got = results[0][i][j];
            assert!((f64::from(got) - exact).abs() <= 1e-5, "world {world} len {len} element {j}: {got} vs {exact}");
        }
        for (rank, r) in results.iter().enumerate().skip(1) {
            let same = r[i].iter().zip(&results[0][i]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "world {world} len {len}: rank {rank} differs from rank 0");
        }
    }
}

#[test]
fn sums_match_serial_and_are_bit_identical() {
    for world in 1..=4 {
        check_sums(world, RingOptions::default());
    }
}

#[test]
fn tiny_segments_pipeline_correctly() {
    // 64-byte frames: many segments per chunk even for the short buffers.
    let options = RingOptions { segment_bytes: 64, ..RingOptions::default() };
    check_sums(3, options);
}

#[test]
fn explicit_socket_buffers_work() {
    let options = RingOptions { socket_buffer_bytes: Some(1 << 20), ..RingOptions::default() };
    check_sums(2, options);
}

#[test]
fn mean_through_the_collective_trait() {
    let out = with_ranks(
        3,
        |_| SESSION,
        RingOptions::default(),
        |rank, ring| {
            let mut ring = ring.unwrap();
            let c: &mut dyn Collective = &mut ring;
            assert_eq!((c.rank(), c.world_size()), (rank, 3));
            let mut buf = vec![rank as f32; 10];
            c.all_reduce_mean(&mut buf).unwrap();
            buf
        },
    );
    for buf in out {
        assert!(buf.iter().all(|&v| v == 1.0));
    }
}

#[test]
fn wrong_session_is_refused() {
    let options = RingOptions::default();
    let start = Instant::now();
    let (ls, addrs) = listeners(3);
    let results: Vec<_> = thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, options) = (&addrs, options.clone());
                let session = if rank == 1 { SESSION + 1 } else { SESSION };
                s.spawn(move || TcpRing::connect_with(rank, addrs, l, session, Duration::from_secs(2), options))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Everyone gives up around the 2 s connect timeout; generous bound for a loaded machine.
    assert!(start.elapsed() < Duration::from_secs(15));
    let errors: Vec<RingError> = results.into_iter().map(|r| r.unwrap_err()).collect();
    // Rank 1 connects to rank 2 and sees the foreign session itself.
    assert!(
        matches!(errors[1], RingError::Handshake { mismatch: HandshakeMismatch::Session { .. }, .. }),
        "{}",
        errors[1]
    );
    // Rank 0 connects to the odd one out: refused, or (if rank 1 has already given up and closed
    // its listener) never answered.
    assert!(matches!(errors[0], RingError::Handshake { .. } | RingError::Connect { .. }), "{}", errors[0]);
    // Rank 2 turned rank 1 away and kept waiting for a proper left neighbour, saying why; or,
    // on a loaded machine, rank 0 gave up (refused by rank 1) and closed its listener before
    // rank 2 reached it, so rank 2's own connect failed first.
    let msg = errors[2].to_string();
    match errors[2] {
        RingError::AcceptTimeout { .. } => assert!(msg.contains("session"), "{msg}"),
        RingError::Connect { .. } => {}
        _ => panic!("unexpected error on rank 2: {msg}"),
    }
}

#[test]
fn stray_connection_is_turned_away() {
    let (ls, addrs) = listeners(2);
    // Something that is not a ring peer knocks on rank 0's port first.
    let mut stray = TcpStream::connect(addrs[0]).unwrap();
    stray.write_all(&[b'x'; 32]).unwrap();
    let results: Vec<_> = thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addrs = &addrs;
                s.spawn(move || {
                    let mut ring = TcpRing::connect(rank, addrs, l, SESSION, SETUP).unwrap();
                    let mut buf = vec![1.0f32; 5];
                    ring.all_reduce_sum(&mut buf).unwrap();
                    buf
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|b| b == &vec![2.0f32; 5]));
}

#[test]
fn late_peer_is_waited_for() {
    let (mut ls, addrs) = listeners(3);
    // Rank 2 is not listening yet: its neighbour's connects are refused and must be retried.
    drop(ls.pop());
    let out: Vec<Vec<f32>> = thread::scope(|s| {
        let mut handles = Vec::new();
        for (rank, l) in ls.into_iter().enumerate() {
            let addrs = &addrs;
            handles.push(s.spawn(move || {
                let mut ring = TcpRing::connect(rank, addrs, l, SESSION, SETUP).unwrap();
                let mut buf = vec![1.0f32; 7];
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            }));
        }
        let addrs = &addrs;
        handles.push(s.spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let l = TcpListener::bind(addrs[2]).unwrap();
            let mut ring = TcpRing::connect(2, addrs, l, SESSION, SETUP).unwrap();
            let mut buf = vec![1.0f32; 7];
            ring.all_reduce_sum(&mut buf).unwrap();
            buf
        }));
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(out.iter().all(|b| b == &vec![3.0f32; 7]));
}

#[test]
fn peer_that_dies_mid_operation_fails_the_others_fast() {
    // A long I/O timeout: the others must notice through the closed sockets, not by waiting.
    let options = RingOptions { io_timeout: Duration::from_secs(30), ..RingOptions::default() };
    let start = Instant::now();
    let results = with_ranks(
        3,
        |_| SESSION,
        options,
        |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf = vec![1.0f32; 4_000_000];
            ring.all_reduce_sum(&mut buf).unwrap();
            if rank == 2 {
                // Dies while the others are inside the second all-reduce.
                thread::sleep(Duration::from_millis(200));
                drop(ring);
                return None;
            }
            let err = ring.all_reduce_sum(&mut buf).unwrap_err();
            let again = ring.all_reduce_sum(&mut buf).unwrap_err();
            assert!(matches!(again, RingError::Poisoned { .. }), "{again}");
            Some((err.to_string(), start.elapsed()))
        },
    );
    for (msg, elapsed) in results.into_iter().flatten() {
        // Far below the 60 s I/O timeout: the failure travelled, nobody waited it out.
        assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}: {msg}");
        assert!(msg.contains("closed the connection") || msg.contains("failed"), "{msg}");
    }
}

#[test]
fn stuck_peer_times_out_instead_of_hanging() {
    let io_timeout = Duration::from_millis(300);
    let options = RingOptions { io_timeout, ..RingOptions::default() };
    let results = with_ranks(
        3,
        |_| SESSION,
        options,
        |rank, ring| {
            let mut ring = ring.unwrap();
            if rank == 2 {
                // Alive (sockets open) but never joins the collective, for far longer than the
                // 300 ms I/O timeout: the others must give up on their own, not when it leaves.
                thread::sleep(Duration::from_secs(10));
                return None;
            }
            let start = Instant::now();
            let err = ring.all_reduce_sum(&mut [1.0f32; 1000]).unwrap_err();
            Some((err, start.elapsed()))
        },
    );
    let errors: Vec<_> = results.into_iter().flatten().collect();
    assert_eq!(errors.len(), 2);
    for (err, elapsed) in &errors {
        assert!(*elapsed < Duration::from_secs(8), "took {elapsed:?}: {err}");
    }
    // Rank 0 reads from the stuck rank 2 and times out; rank 1 hears about it from rank 0.
    assert!(matches!(errors[0].0, RingError::Timeout { .. }), "{}", errors[0].0);
    assert!(errors[0].0.to_string().contains("rank 2"), "{}", errors[0].0);
}

#[test]
fn different_lengths_are_reported_not_mixed() {
    let results = with_ranks(
        2,
        |_| SESSION,
        RingOptions::default(),
        |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf = vec![1.0f32; 100 + rank];
            ring.all_reduce_sum(&mut buf).unwrap_err()
        },
    );
    let msgs: Vec<String> = results.iter().map(ToString::to_string).collect();
    assert!(msgs.iter().any(|m| m.contains("same length")), "{msgs:?}");
}

#[test]
fn single_rank_is_identity_without_sockets() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut ring = TcpRing::connect(0, &[addr], l, SESSION, SETUP).unwrap();
    let mut buf = vec![1.5f32, -2.0];
    ring.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, vec![1.5, -2.0]);
    // The listener was dropped: nobody is listening there any more.
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn bad_setup_is_rejected() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let err = TcpRing::connect(2, &[addr, addr], l, SESSION, SETUP).unwrap_err();
    assert!(matches!(err, RingError::InvalidSetup(_)), "{err}");
}
