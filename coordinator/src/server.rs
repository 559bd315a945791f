//! The gRPC face of the run: the `dcgan.v1.Coordinator` service, server reflection (v1 and
//! v1alpha, since grpcurl still asks for v1alpha) and the standard health service.
//!
//! Handlers are thin: they check who is asking, turn messages into calls on [`Run`], and map
//! refusals to gRPC statuses. Anything slow (reading or writing checkpoints, gathering pixels)
//! runs on the blocking pool so the runtime's threads keep answering heartbeats.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use proto::framing::{CheckpointAssembler, CheckpointChunks, FramingError, checkpoint_header};
use proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use proto::v1::{self, checkpoint_chunk};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::checkpoint_store::StoreError;
use crate::metrics_log::RankReport;
use crate::renderer::GridRequest;
use crate::run::{Run, RunError, to_proto_metrics};
use crate::run_view::RunView;

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Steps of shard data in flight per stream: enough to hide the network behind a training step,
/// few enough that a worker never buffers much.
const SHARD_STEPS_IN_FLIGHT: usize = 2;

impl From<RunError> for Status {
    fn from(e: RunError) -> Self {
        let msg = e.to_string();
        match e {
            RunError::MissingId | RunError::BadRank { .. } | RunError::Invalid(_) => Status::invalid_argument(msg),
            RunError::UnknownRun { .. } => Status::not_found(msg),
            RunError::StaleGeneration { .. } | RunError::NotJoined(_) | RunError::Formed => {
                Status::failed_precondition(msg)
            }
            RunError::RankTaken(_) => Status::already_exists(msg),
            RunError::WorldFull(_) => Status::resource_exhausted(msg),
            RunError::Over(_) => Status::aborted(msg),
            RunError::GenerationOver(_) => Status::unavailable(msg),
        }
    }
}

fn framing_status(e: FramingError) -> Status {
    match e {
        FramingError::DigestMismatch { .. } | FramingError::Truncated { .. } => Status::data_loss(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Missing(_) => Status::not_found(e.to_string()),
        StoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
        StoreError::BadName(_) => Status::invalid_argument(e.to_string()),
        StoreError::Io(_) => Status::internal(e.to_string()),
    }
}

/// The `dcgan.v1.Coordinator` service of one generation.
#[derive(Clone)]
pub struct CoordinatorService {
    run: Arc<Run>,
    view: RunView,
}

impl CoordinatorService {
    pub fn new(view: RunView) -> Self {
        Self { run: Arc::clone(&view.run), view }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, request: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        let mut response = Response::new(self.run.join(request.get_ref())?);
        if let Some(cx) = self.run.trace_context.get() {
            *response.metadata_mut() = cx.clone();
        }
        Ok(response)
    }

    async fn rendezvous(
        &self,
        request: Request<v1::RendezvousRequest>,
    ) -> Result<Response<v1::RendezvousResponse>, Status> {
        let req = request.into_inner();
        let rank = self.run.check(req.id.as_ref())?;
        record_who(rank, None);
        self.run.set_ring_address(rank, &req.ring_address, &req.nccl_id)?;
        let (ring_addresses, session, nccl_id) = self.run.ring().await?;
        Ok(Response::new(v1::RendezvousResponse { ring_addresses, session, nccl_id }))
    }

    type GetShardStream = RpcStream<v1::ShardChunk>;

    async fn get_shard(&self, request: Request<v1::GetShardRequest>) -> Result<Response<Self::GetShardStream>, Status> {
        let req = request.into_inner();
        let rank = self.run.check(req.id.as_ref())?;
        record_who(rank, None);
        self.run.shards.check(req.epoch, req.from_step_in_epoch).map_err(|e| Status::out_of_range(e.to_string()))?;
        let (tx, rx) = mpsc::channel(SHARD_STEPS_IN_FLIGHT);
        let run = Arc::clone(&self.run);
        // Gathering and encoding pixels is CPU work: keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            let shards = &run.shards;
            let order = shards.order(req.epoch);
            for step in req.from_step_in_epoch..shards.steps_per_epoch() {
                if run.phase().is_over() {
                    let _ = tx.blocking_send(Err(Status::aborted("the run is over")));
                    return;
                }
                let chunks = match shards.step_chunks(&order, req.epoch, step, rank) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!("cannot read the samples of epoch {} step {step}: {e}", req.epoch);
                        let _ = tx.blocking_send(Err(Status::internal(format!("cannot read the samples: {e}"))));
                        return;
                    }
                };
                tracing::debug!(rank, epoch = req.epoch, step, indices = ?shards.indices(&order, step, rank), "serving shard step");
                for chunk in chunks {
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return; // The worker hung up.
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_step(
        &self,
        request: Request<v1::ReportStepRequest>,
    ) -> Result<Response<v1::ReportStepResponse>, Status> {
        let r = request.into_inner();
        let rank = self.run.check(r.id.as_ref())?;
        record_who(rank, Some(r.step));
        let report = RankReport {
            rank,
            step: r.step,
            epoch: r.epoch,
            local_batch: r.local_batch,
            loss_d: r.loss_d,
            loss_g: r.loss_g,
            d_x: r.d_x,
            d_g_z1: r.d_g_z1,
            d_g_z2: r.d_g_z2,
            data_seconds: r.data_seconds,
            compute_seconds: r.compute_seconds,
            all_reduce_seconds: r.all_reduce_seconds,
            step_seconds: r.step_seconds,
            checksum: r.has_checksum.then_some(r.parameter_checksum),
        };
        let carry_on = self.run.report(report)?;
        let (reason, stop_requested) = match self.run.phase() {
            crate::run::Phase::Failed(r) => (r, false),
            crate::run::Phase::Stopping(r) => (r, true),
            _ => (String::new(), false),
        };
        Ok(Response::new(v1::ReportStepResponse { continue_training: carry_on, reason, stop_requested }))
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<v1::CheckpointChunk>>,
    ) -> Result<Response<v1::UploadCheckpointResponse>, Status> {
        let mut stream = request.into_inner();
        let mut assembler = CheckpointAssembler::new();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty checkpoint upload"))?;
        match &first.chunk {
            Some(checkpoint_chunk::Chunk::Header(h)) => {
                let rank = self.run.check(h.id.as_ref())?;
                record_who(rank, Some(h.step));
                self.run.check_upload(rank, h.step)?;
            }
            _ => return Err(framing_status(FramingError::MissingHeader)),
        }
        assembler.push(first).map_err(framing_status)?;
        while let Some(chunk) = stream.message().await? {
            assembler.push(chunk).map_err(framing_status)?;
        }
        let (header, files) = assembler.finish().map_err(framing_status)?;
        let store = self.run.store.clone();
        let step = header.step;
        let (stored, all, files) = tokio::task::spawn_blocking(move || {
            let stored = store.store(step, &files)?;
            let all = store.list()?;
            Ok::<_, StoreError>((stored, all, files))
        })
        .await
        .map_err(|e| Status::internal(format!("checkpoint writer panicked: {e}")))?
        .map_err(|e| {
            // The run directory cannot take the checkpoint (full disk, permissions): no new
            // generation would get past that, so the run ends with this cause before the
            // uploading rank fails and its peers report only a broken ring.
            if let StoreError::Io(io) = &e {
                self.run.fail(format!("cannot store the checkpoint of step {step}: {io}"));
            }
            store_status(e)
        })?;
        crate::observability::record_checkpoint(stored.step, stored.total_size);
        let infos = all.iter().map(|c| c.info(self.run.config.steps_per_epoch)).collect();
        if let Some(names) = self.run.checkpoint_stored(&header, &stored, infos) {
            let (epoch, is_final) = (header.epoch, header.r#final);
            self.view.samples.request(GridRequest { step: stored.step, epoch, is_final, names, files });
        }
        Ok(Response::new(v1::UploadCheckpointResponse { path: stored.relative_dir() }))
    }

    type DownloadCheckpointStream = RpcStream<v1::CheckpointChunk>;

    async fn download_checkpoint(
        &self,
        request: Request<v1::DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        let req = request.into_inner();
        self.run.check(req.id.as_ref())?;
        let store = self.run.store.clone();
        let files = tokio::task::spawn_blocking(move || store.read(req.step))
            .await
            .map_err(|e| Status::internal(format!("checkpoint reader panicked: {e}")))?
            .map_err(store_status)?;
        let mut header = checkpoint_header(&files);
        header.step = req.step;
        header.epoch = req.step / self.run.config.steps_per_epoch.max(1);
        let chunks = CheckpointChunks::new(header, files);
        let (tx, rx) = mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            for c in chunks {
                if tx.blocking_send(Ok(c)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let rank = self.run.check(req.id.as_ref())?;
        record_who(rank, None);
        let state = self.run.heartbeat(rank, req.step);
        Ok(Response::new(v1::HeartbeatResponse { state: state as i32 }))
    }

    async fn finish(&self, request: Request<v1::FinishRequest>) -> Result<Response<v1::FinishResponse>, Status> {
        let req = request.into_inner();
        let rank = self.run.check(req.id.as_ref())?;
        record_who(rank, None);
        self.run.finish(rank, &req);
        Ok(Response::new(v1::FinishResponse {}))
    }

    async fn get_status(&self, _request: Request<v1::GetStatusRequest>) -> Result<Response<v1::RunStatus>, Status> {
        Ok(Response::new(self.view.status()))
    }

    type WatchMetricsStream = RpcStream<v1::StepMetrics>;

    async fn watch_metrics(
        &self,
        _request: Request<v1::WatchMetricsRequest>,
    ) -> Result<Response<Self::WatchMetricsStream>, Status> {
        let mut metrics = self.run.subscribe_metrics();
        let mut phase = self.run.watch_phase();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = metrics.recv() => match m {
                        Ok(r) => if tx.send(Ok(to_proto_metrics(&r))).await.is_err() { return },
                        // A slow watcher skips steps rather than holding the run back.
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    changed = phase.changed() => {
                        if changed.is_err() || phase.borrow().is_over() {
                            // Deliver what was already aggregated, then end the stream.
                            while let Ok(r) = metrics.try_recv() {
                                if tx.send(Ok(to_proto_metrics(&r))).await.is_err() { return }
                            }
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Fills the current RPC span's `rank` (and `step`) fields.
fn record_who(rank: usize, step: Option<u64>) {
    let span = tracing::Span::current();
    span.record("rank", rank);
    if let Some(step) = step {
        span.record("step", step);
    }
}

/// Why the server could not be built or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the generation on `listener` until `shutdown` resolves.
pub async fn serve(
    view: RunView,
    listener: TcpListener,
    auth: proto::auth::RequireToken,
    tls: Option<tonic::transport::Identity>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (run_id, generation) = (view.run.config.run_id.clone(), view.run.config.generation);
    let service = CoordinatorServer::new(CoordinatorService::new(view))
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
    let service = tonic::service::interceptor::InterceptedService::new(service, auth);
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = tls {
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    builder
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        // One span per RPC; the handlers fill in who asked (rank) and about which step.
        .trace_fn(move |req| {
            let span = tracing::info_span!(
                "rpc",
                method = %req.uri().path(),
                run_id = %run_id,
                generation,
                rank = tracing::field::Empty,
                step = tracing::field::Empty,
            );
            dcgan_process::telemetry::adopt_context(&span, req.headers());
            span
        })
        // The interceptor's exception for read-only calls needs the path (see `RpcPath`).
        .layer(tower::util::MapRequestLayer::new(|mut req: tonic::codegen::http::Request<tonic::body::Body>| {
            let path = proto::auth::RpcPath(req.uri().path().to_string());
            req.extensions_mut().insert(path);
            req
        }))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proto::v1::coordinator_client::CoordinatorClient;

    use super::*;
    use crate::evaluation::Evaluations;
    use crate::health::{HealthConfig, HealthMonitor};
    use crate::renderer::SampleQueue;
    use crate::step_history::StepHistory;

    /// Serves a fresh 2-rank generation on a real port of this machine, as the binary does.
    async fn start_server() -> (SocketAddr, Arc<Run>, tokio::sync::oneshot::Sender<()>, tempfile::TempDir) {
        let (run, _queue, tmp) = crate::run::tests::generation(2, 4);
        let (samples, _requests) = SampleQueue::channel();
        let view = RunView {
            run: Arc::clone(&run),
            health: HealthMonitor::new(HealthConfig::default()),
            evaluations: Evaluations::default(),
            history: StepHistory::default(),
            samples,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let auth = proto::auth::RequireToken { token: None, open_reads: false };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(view, listener, auth, None, async {
            let _ = stopped.await;
        }));
        (addr, run, stop, tmp)
    }

    #[tokio::test]
    async fn workers_join_and_are_refused_over_a_real_socket() {
        let (addr, run, stop, _tmp) = start_server().await;
        let mut client = CoordinatorClient::connect(format!("http://{addr}")).await.unwrap();
        let join = |rank: i32| v1::JoinRequest {
            hostname: "test".into(),
            pid: 7,
            device: Some(v1::ComputeDevice::cpu()),
            threads: 1,
            requested_rank: rank,
        };
        let joined = client.join(join(1)).await.unwrap().into_inner();
        assert_eq!(joined.id.as_ref().map(|id| id.rank), Some(1));
        assert_eq!(joined.world_size, 2);
        assert_eq!(joined.config.map(|c| c.total_steps), Some(4));
        // The same rank again: ALREADY_EXISTS, with the reason.
        let taken = client.join(join(1)).await.unwrap_err();
        assert_eq!(taken.code(), tonic::Code::AlreadyExists, "{taken:?}");
        // A worker of another run: NOT_FOUND.
        let id = Some(v1::WorkerId { run_id: "other".into(), generation: 1, rank: 0 });
        let stranger = client.heartbeat(v1::HeartbeatRequest { id, step: 0 }).await.unwrap_err();
        assert_eq!(stranger.code(), tonic::Code::NotFound, "{stranger:?}");
        // GetStatus sees the joined worker.
        let status = client.get_status(v1::GetStatusRequest {}).await.unwrap().into_inner();
        assert_eq!((status.run_id.as_str(), status.workers.len()), ("run-1", 1));
        assert!(status.health.is_some(), "the health view fills the status");
        // The run's end reaches a heartbeat.
        run.fail("test over");
        let beat = client.heartbeat(v1::HeartbeatRequest { id: joined.id, step: 0 }).await.unwrap().into_inner();
        assert_eq!(beat.state, v1::RunState::Failed as i32);
        let _ = stop.send(());
    }
}
