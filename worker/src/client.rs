//! The worker's side of the protocol: a client that stamps its identity on every request, and
//! the checkpoint transfers in both directions.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dcgan_process::telemetry::TraceContext;
use proto::framing::{CheckpointAssembler, CheckpointChunks, checkpoint_header};
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{self, WorkerId};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::address::CoordinatorAddress;

/// The generated client over a channel whose requests carry the caller's trace context.
pub type RawClient = CoordinatorClient<InterceptedService<Channel, TraceContext>>;

/// A client of the coordinator, for a worker that has joined.
#[derive(Clone)]
pub struct Client {
    inner: RawClient,
    pub id: WorkerId,
}

/// How to check the coordinator's certificate on an `https://` address.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    /// PEM of the CA (or the self-signed certificate) to trust.
    pub ca_pem: Option<Vec<u8>>,
    /// The name the certificate must be valid for, when not the URL's host.
    pub domain: Option<String>,
}

/// Connects to `address`, retrying until `timeout`: workers may start before the coordinator listens.
pub async fn connect(
    address: &CoordinatorAddress,
    timeout: Duration,
    token: Option<proto::auth::Token>,
    tls: &Tls,
) -> anyhow::Result<RawClient> {
    if address.says_http() && tls.ca_pem.is_some() {
        bail!("--tls-ca is given but --coordinator {address} is http://: use https:// or host:port");
    }
    let url = address.url(tls.ca_pem.is_some());
    let mut endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--coordinator {address}: not a URL tonic takes ({url})"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let ca = tls
            .ca_pem
            .as_ref()
            .with_context(|| format!("--coordinator {url} is https: give the certificate to trust with --tls-ca"))?;
        let mut config =
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
        if let Some(d) = &tls.domain {
            config = config.domain_name(d.clone());
        }
        endpoint = endpoint.tls_config(config).context("TLS settings (--tls-ca, --tls-domain)")?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(CoordinatorClient::with_interceptor(ch, TraceContext::with_token(token))
                    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES));
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("coordinator not reachable yet: {e:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                // The transport error's sources say why (refused, a certificate not trusted...).
                let why = std::iter::successors(std::error::Error::source(&e), |s| s.source())
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(": ");
                bail!("cannot reach the coordinator at {url} within {} s: {e}: {why}", timeout.as_secs())
            }
        }
    }
}

impl Client {
    pub fn new(inner: RawClient, id: WorkerId) -> Self {
        Self { inner, id }
    }

    pub fn raw(&self) -> RawClient {
        self.inner.clone()
    }

    /// Hands over this rank's ring address (and, from rank 0 of a GPU run, the NCCL id); answers
    /// when every rank has.
    pub async fn rendezvous(&self, ring_address: String, nccl_id: Vec<u8>) -> anyhow::Result<v1::RendezvousResponse> {
        let req = v1::RendezvousRequest { id: Some(self.id.clone()), ring_address, nccl_id };
        Ok(self.raw().rendezvous(req).await.context("rendezvous")?.into_inner())
    }

    pub async fn shard(&self, epoch: u64, from_step_in_epoch: u64) -> anyhow::Result<tonic::Streaming<v1::ShardChunk>> {
        let req = v1::GetShardRequest { id: Some(self.id.clone()), epoch, from_step_in_epoch };
        Ok(self.raw().get_shard(req).await.with_context(|| format!("shard of epoch {epoch}"))?.into_inner())
    }

    pub async fn report(&self, mut req: v1::ReportStepRequest) -> anyhow::Result<v1::ReportStepResponse> {
        req.id = Some(self.id.clone());
        let step = req.step;
        Ok(self.raw().report_step(req).await.with_context(|| format!("report of step {step}"))?.into_inner())
    }

    pub async fn heartbeat(&self, step: u64) -> Result<v1::RunState, tonic::Status> {
        let req = v1::HeartbeatRequest { id: Some(self.id.clone()), step };
        let resp = self.raw().heartbeat(req).await?.into_inner();
        Ok(v1::RunState::try_from(resp.state).unwrap_or(v1::RunState::Unspecified))
    }

    pub async fn finish(&self, ending: Ending) -> anyhow::Result<()> {
        let mut req = v1::FinishRequest { id: Some(self.id.clone()), ..Default::default() };
        match ending {
            Ending::Completed { final_step, checksum } => {
                (req.ok, req.final_step, req.parameter_checksum) = (true, final_step, checksum);
            }
            Ending::Stopped { final_step, checksum, reason } => {
                (req.ok, req.final_step, req.parameter_checksum) = (true, final_step, checksum);
                (req.stopped, req.stop_reason) = (true, reason);
            }
            Ending::Failed(error) => req.error = error,
        }
        self.raw().finish(req).await.context("finish")?;
        Ok(())
    }

    /// Streams a checkpoint to the coordinator: the header with every file's size and sha256,
    /// then the bytes in bounded chunks.
    pub async fn upload_checkpoint(&self, upload: Upload) -> anyhow::Result<String> {
        let mut header = checkpoint_header(&upload.files);
        header.id = Some(self.id.clone());
        header.step = upload.step;
        header.epoch = upload.epoch;
        header.end_of_epoch = upload.end_of_epoch;
        header.r#final = upload.is_final;
        let chunks = CheckpointChunks::new(header, upload.files);
        let resp = self
            .raw()
            .upload_checkpoint(tokio_stream::iter(chunks))
            .await
            .with_context(|| format!("upload of the checkpoint of step {}", upload.step))?;
        Ok(resp.into_inner().path)
    }

    /// Fetches the checkpoint of `step`, checking every file's size and sha256.
    pub async fn download_checkpoint(&self, step: u64) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let req = v1::DownloadCheckpointRequest { id: Some(self.id.clone()), step };
        let mut stream = self
            .raw()
            .download_checkpoint(req)
            .await
            .with_context(|| format!("download of the checkpoint of step {step}"))?
            .into_inner();
        let mut assembler = CheckpointAssembler::new();
        while let Some(chunk) = stream.message().await.context("checkpoint download")? {
            assembler.push(chunk).context("checkpoint download")?;
        }
        let (_, files) = assembler.finish().context("checkpoint download")?;
        Ok(files)
    }
}

/// A checkpoint rank 0 hands to the uploader.
pub struct Upload {
    pub step: u64,
    pub epoch: u64,
    pub end_of_epoch: bool,
    pub is_final: bool,
    pub files: Vec<(String, Vec<u8>)>,
}

/// How a worker's part of the run ended, as told to the coordinator.
#[derive(Debug, Clone)]
pub enum Ending {
    /// Every step done; `checksum` is the final model's fingerprint.
    Completed {
        final_step: u64,
        checksum: u64,
    },
    /// A clean stop after `final_step` (whose checkpoint rank 0 uploaded).
    Stopped {
        final_step: u64,
        checksum: u64,
        reason: String,
    },
    Failed(String),
}
