//! The all-reduce itself over two ready links: the reduce-scatter then all-gather steps of
//! [`crate::plan`]'s schedule, frame by frame, with a writer thread so that sending and receiving
//! overlap, and the frame-buffer pool that keeps steady-state training from allocating. The
//! order of the additions here is what makes the result bit-identical on every rank.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::links::Links;
use super::wire::{Frame, FrameHeader, frame_bytes, read_header, read_payload, write_frame};
use crate::error::{Op, RingError};
use crate::plan::{chunk_range, recv_chunk, segments, send_chunk};

/// Frame buffers kept between calls (see the end of [`run_ring`]).
const MAX_POOLED_FRAMES: usize = 64;

/// Who failed first inside one all-reduce (so the root cause is reported, not its echo).
const NO_FAILURE: u8 = 0;
const MAIN_FAILED: u8 = 1;
const WRITER_FAILED: u8 = 2;

/// What one all-reduce call runs with, besides the links, the buffer pool and the data.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallParams {
    pub(super) rank: usize,
    pub(super) world: usize,
    /// The call's number, carried by every frame so that ranks out of step are caught.
    pub(super) op_seq: u64,
    /// Floats per frame.
    pub(super) segment_elems: usize,
    /// Only for the error messages: the links' timeouts are already set.
    pub(super) io_timeout: Duration,
}

/// Takes a frame buffer of exactly `len` floats, reusing one when possible. The contents are
/// garbage: every caller overwrites them.
fn take_buf(pool: &mut Vec<Vec<f32>>, returned: &mpsc::Receiver<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut v = returned.try_recv().ok().or_else(|| pool.pop()).unwrap_or_default();
    // Only a length change touches memory; frames are mostly the same size.
    v.resize(len, 0.0);
    v
}

/// One all-reduce over the links. Returns the bytes sent and received.
///
/// The calling thread receives and reduces; a scoped writer thread sends, fed through an
/// unbounded channel. Sending and receiving must run concurrently or every rank could block in
/// `write` with nobody reading. The channel is unbounded for the same reason: a bounded one could
/// block the reader, which is what drains the left neighbour. Its depth is at most one chunk.
pub(super) fn run_ring(
    links: &Links,
    params: CallParams,
    pool: &mut Vec<Vec<f32>>,
    buf: &mut [f32],
) -> Result<(u64, u64), RingError> {
    let CallParams { rank, world, op_seq, segment_elems: seg, io_timeout } = params;
    let len = buf.len();
    let steps = 2 * (world - 1);
    let failed = AtomicU8::new(NO_FAILURE);
    let (to_writer, frames) = mpsc::channel::<Frame>();
    let (give_back, returned) = mpsc::channel::<Vec<f32>>();
    let header = |step: usize, segment: usize, floats: usize| FrameHeader {
        op_seq,
        total_len: len as u64,
        // world <= MAX_WORLD and frames <= 4 GiB are checked at setup, so step and payload fit;
        // a segment index past u32 (a buffer of 2^32 frames) would wrap identically on both ends.
        step: step as u32,
        segment: segment as u32,
        payload_bytes: (floats * 4) as u32,
    };
    // Shutting both sockets down makes the other thread and both neighbours fail at once.
    let bail = |who: u8| {
        let first = failed.compare_exchange(NO_FAILURE, who, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        links.shut_down();
        first
    };

    let (main_result, writer_result) = thread::scope(|s| {
        let writer = s.spawn(|| -> Result<u64, RingError> {
            let mut sent = 0u64;
            for frame in frames {
                if let Err(e) = write_frame(&links.right, &frame) {
                    bail(WRITER_FAILED);
                    return Err(RingError::io(rank, Op::Send, links.right_peer, e, io_timeout));
                }
                sent += frame.wire_bytes();
                // The reader may be gone already; the buffer is then simply dropped.
                let _ = give_back.send(frame.into_buffer());
            }
            Ok(sent)
        });

        let mut main = || -> Result<u64, RingError> {
            let send = |frame: Frame| {
                // Only after the writer failed; its own error is the one reported.
                to_writer
                    .send(frame)
                    .map_err(|_| RingError::Internal { rank, detail: "the sending thread stopped early".into() })
            };
            // Step 0: our own chunk goes out as it is.
            for (k, r) in segments(chunk_range(len, world, send_chunk(rank, world, 0)), seg).enumerate() {
                let mut v = take_buf(pool, &returned, r.len());
                v.copy_from_slice(&buf[r]);
                send(Frame::new(&header(0, k, v.len()), v))?;
            }
            let mut received = 0u64;
            let mut left = &links.left;
            let recv_err = |e: io::Error| RingError::io(rank, Op::Receive, links.left_peer, e, io_timeout);
            for step in 0..steps {
                let reduce = step < world - 1;
                let chunk = chunk_range(len, world, recv_chunk(rank, world, step));
                for (k, r) in segments(chunk, seg).enumerate() {
                    let hdr = read_header(&mut left).map_err(recv_err)?;
                    header(step, k, r.len()).check(&hdr).map_err(|detail| RingError::Desync {
                        rank,
                        peer: links.left_peer,
                        detail,
                    })?;
                    let mut v = take_buf(pool, &returned, r.len());
                    read_payload(&mut left, &mut v).map_err(recv_err)?;
                    received += frame_bytes(v.len());
                    let dst = &mut buf[r];
                    if reduce {
                        // Partial sum from the left plus ours: the order is fixed by the ring.
                        for (d, x) in dst.iter_mut().zip(v.iter_mut()) {
                            *x += *d;
                            *d = *x;
                        }
                    } else {
                        // All-gather: adopt the finished bits verbatim.
                        dst.copy_from_slice(&v);
                    }
                    if step + 1 < steps {
                        // What we just received is what we forward next step, so the frame
                        // buffer goes straight to the writer without another copy.
                        send(Frame::new(&header(step + 1, k, v.len()), v))?;
                    } else {
                        pool.push(v);
                    }
                }
            }
            Ok(received)
        };
        let main_result = main();
        if main_result.is_err() {
            bail(MAIN_FAILED);
        }
        drop(to_writer);
        let writer_result = writer
            .join()
            .unwrap_or_else(|_| Err(RingError::Internal { rank, detail: "the sending thread panicked".into() }));
        (main_result, writer_result)
    });
    pool.extend(returned.try_iter());
    // Enough buffers for the frames in flight of a large call (16 MiB with the default segment
    // size), so that steady-state training neither allocates nor zero-fills them again.
    pool.truncate(MAX_POOLED_FRAMES);
    match (main_result, writer_result) {
        (Ok(received), Ok(sent)) => Ok((sent, received)),
        (Err(m), Err(w)) => Err(if failed.load(Ordering::SeqCst) == WRITER_FAILED { w } else { m }),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
    }
}
