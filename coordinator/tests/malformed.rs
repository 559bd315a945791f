//! Requests a worker should never send, sent to a real coordinator over a real socket: each gets
//! a gRPC error status naming what is wrong, and the server keeps serving (the run goes on).

mod common;

use common::*;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{self, WorkerId, checkpoint_chunk::Chunk};
use std::time::Duration;

use tonic::Code;

fn join(rank: i32) -> v1::JoinRequest {
    v1::JoinRequest {
        hostname: "test".into(),
        pid: 1,
        device: Some(v1::ComputeDevice::cpu()),
        threads: 1,
        requested_rank: rank,
    }
}

fn report(id: &WorkerId, step: u64) -> v1::ReportStepRequest {
    v1::ReportStepRequest { id: Some(id.clone()), step, epoch: 0, local_batch: 12, ..Default::default() }
}

/// An upload of one file whose declared size is `declared`, then data chunks at `(offset, len)`.
fn upload(id: &WorkerId, declared: u64, chunks: &[(u64, usize)]) -> Vec<v1::CheckpointChunk> {
    let header = v1::CheckpointHeader {
        id: Some(id.clone()),
        step: 1,
        epoch: 0,
        end_of_epoch: false,
        r#final: false,
        files: vec![v1::CheckpointFileInfo { name: "state.json".into(), size: declared, sha256: "00".repeat(32) }],
        total_size: declared,
    };
    let mut out = vec![v1::CheckpointChunk { chunk: Some(Chunk::Header(header)) }];
    for &(offset, len) in chunks {
        let data = v1::CheckpointData { file_index: 0, offset, data: vec![b'x'; len] };
        out.push(v1::CheckpointChunk { chunk: Some(Chunk::Data(data)) });
    }
    out
}

/// The error of a refused call: its code must be `code`; returns its message.
fn expect<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) -> String {
    let e = r.expect_err(what);
    assert_eq!(e.code(), code, "{what}: {e}");
    e.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_out_of_order_requests_get_errors_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let args = with_flags(small_run(2, &run_dir), &["--data-limit", "48", "--external-workers", "--epochs", "1"]);
    let coordinator = Running::start(&args, &run_dir);
    let mut c = CoordinatorClient::connect(coordinator.url()).await.expect("connect");

    // Oversized: one message past the 16 MiB limit set on purpose (proto::MAX_MESSAGE_BYTES).
    let mut huge = join(-1);
    huge.hostname = "h".repeat(proto::MAX_MESSAGE_BYTES + 1);
    let e = c.join(huge).await.expect_err("an oversized join");
    assert!(matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange | Code::Internal), "{e}");

    // Joins: a rank out of range, then both ranks, then a duplicate and one too many.
    expect(c.join(join(7)).await, Code::InvalidArgument, "rank 7 of 2");
    let id0 = c.join(join(0)).await.expect("rank 0 joins").into_inner().id.expect("id");
    let msg = expect(c.join(join(0)).await, Code::AlreadyExists, "a duplicate join of rank 0");
    assert!(msg.contains("rank 0"), "{msg}");
    let id1 = c.join(join(-1)).await.expect("rank 1 joins").into_inner().id.expect("id");
    assert_eq!(id1.rank, 1);
    expect(c.join(join(-1)).await, Code::ResourceExhausted, "a third worker in a world of 2");

    // Identity: another run, another generation, a rank that is not in the world.
    let mut other = id1.clone();
    other.run_id = "someone-else".into();
    expect(c.heartbeat(v1::HeartbeatRequest { id: Some(other), step: 0 }).await, Code::NotFound, "another run");
    let mut old = id1.clone();
    old.generation += 5;
    expect(c.heartbeat(v1::HeartbeatRequest { id: Some(old), step: 0 }).await, Code::FailedPrecondition, "stale");
    let mut outside = id1.clone();
    outside.rank = 9;
    let shard = v1::GetShardRequest { id: Some(outside), epoch: 0, from_step_in_epoch: 0 };
    expect(c.get_shard(shard).await.map(|_| ()), Code::InvalidArgument, "a shard for rank 9 of 2");
    expect(c.heartbeat(v1::HeartbeatRequest { id: None, step: 0 }).await, Code::InvalidArgument, "no id");

    // Rendezvous: an NCCL id from a rank other than 0, or of the wrong size, or no address.
    let rdv = |id: &WorkerId, addr: &str, nccl: Vec<u8>| v1::RendezvousRequest {
        id: Some(id.clone()),
        ring_address: addr.into(),
        nccl_id: nccl,
    };
    expect(c.rendezvous(rdv(&id1, "127.0.0.1:1", vec![1; 128])).await, Code::InvalidArgument, "rank 1's NCCL id");
    expect(c.rendezvous(rdv(&id0, "127.0.0.1:1", vec![1; 5])).await, Code::InvalidArgument, "a 5-byte NCCL id");
    expect(c.rendezvous(rdv(&id0, "", Vec::new())).await, Code::InvalidArgument, "an empty ring address");
    let (mut c0, mut c1) = (c.clone(), c.clone());
    let (r0, r1) = tokio::join!(
        c0.rendezvous(rdv(&id0, "127.0.0.1:1", Vec::new())),
        c1.rendezvous(rdv(&id1, "127.0.0.1:2", Vec::new()))
    );
    r0.expect("rank 0 meets");
    r1.expect("rank 1 meets");

    // Reports out of order: a step from the future, then one step twice.
    let msg = expect(c.report_step(report(&id0, 40)).await, Code::InvalidArgument, "step 40 of 4");
    assert!(msg.contains("step 40"), "{msg}");
    c.report_step(report(&id0, 1)).await.expect("step 1 from rank 0");
    let msg = expect(c.report_step(report(&id0, 1)).await, Code::InvalidArgument, "step 1 twice");
    assert!(msg.contains("twice"), "{msg}");

    // Uploads: from rank 1, data before the header, a chunk past the declared size.
    let stream = tokio_stream::iter(upload(&id1, 4, &[(0, 4)]));
    expect(c.upload_checkpoint(stream).await, Code::InvalidArgument, "an upload from rank 1");
    let mut headless = upload(&id0, 4, &[(0, 4)]);
    headless.remove(0);
    expect(c.upload_checkpoint(tokio_stream::iter(headless)).await, Code::InvalidArgument, "data before a header");
    let past = tokio_stream::iter(upload(&id0, 10, &[(0, 8), (8, 10)]));
    let msg = expect(c.upload_checkpoint(past).await, Code::InvalidArgument, "a chunk past the declared size");
    assert!(msg.contains("larger than its declared 10 bytes"), "{msg}");
    let reordered = tokio_stream::iter(upload(&id0, 10, &[(4, 4), (0, 4)]));
    let msg = expect(c.upload_checkpoint(reordered).await, Code::InvalidArgument, "chunks out of order");
    assert!(msg.contains("out of order"), "{msg}");
    assert!(checkpoint_steps(&run_dir).is_empty(), "nothing half-written was stored");

    // Still serving, still running: the status answers and the run has not failed.
    let status = c.get_status(v1::GetStatusRequest {}).await.expect("status after all that").into_inner();
    assert_eq!(status.state, v1::RunState::Running as i32, "{status:?}");
    assert_eq!(status.workers.len(), 2);
}

/// An external GPU worker joining a run it cannot train (sync-BN over several ranks) is refused
/// at once with the reason, and the run fails once, clearly, without spending a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_worker_that_cannot_train_the_run_fails_it_at_join_without_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run_dir = tmp.path().join("run");
    let flags = ["--data-limit", "48", "--external-workers", "--sync-bn", "--max-restarts", "3"];
    let args = with_flags(small_run(2, &run_dir), &flags);
    let mut coordinator = Running::start(&args, &run_dir);
    let mut c = CoordinatorClient::connect(coordinator.url()).await.expect("connect");
    let mut gpu = join(-1);
    gpu.device = Some(v1::ComputeDevice::cuda(0));
    let message = expect(c.join(gpu).await, Code::Aborted, "a GPU worker in a sync-BN run of 2");
    assert!(message.contains("--sync-bn is not implemented on GPUs and this run has 2 ranks"), "{message}");
    let f = coordinator.child.take().map(|child| wait_output(child, Duration::from_secs(120))).expect("child");
    assert_eq!(f.status.code(), Some(1), "a failed run exits 1:\n{}{}", f.stdout, f.stderr);
    let all = format!("{}{}", f.stdout, f.stderr);
    assert!(all.contains("rank 0 (host test) cannot train this run: --sync-bn is not implemented on GPUs"), "{all}");
    assert!(!all.contains("(--max-restarts)"), "no restart was spent:\n{all}");
}
