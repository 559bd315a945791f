//! The shared run token: workers present it on every call, the coordinator refuses calls
//! without it, so only the run's own workers can join, report or upload checkpoints.
//!
//! The token travels as `authorization: Bearer <token>` metadata. Health and reflection stay
//! open (probes and grpcurl need them); every `dcgan.v1.Coordinator` call is checked, except the
//! two read-only ones (`GetStatus`, `WatchMetrics`) when the operator opens them.

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// The metadata key the token travels under.
pub const HEADER: &str = "authorization";

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    #[error("the token must be printable ASCII with no spaces")]
    NotPrintable,
}

/// Why the token given on the command line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenSourceError {
    #[error("--token (DCGAN_TOKEN): {0}")]
    Inline(TokenError),
    #[error("--token-file {}: cannot read it: {source}", .path.display())]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("--token-file {}: {source}", .path.display())]
    Bad { path: std::path::PathBuf, source: TokenError },
}

/// The token from `--token` or `--token-file` (a file holding the secret, e.g. a mounted
/// Kubernetes Secret, so that it is in no environment and no command line), if either is given.
pub fn token_from(inline: Option<&str>, file: Option<&std::path::Path>) -> Result<Option<Token>, TokenSourceError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenSourceError::Read { path: path.to_path_buf(), source })?;
        return Token::new(&text)
            .map(Some)
            .map_err(|source| TokenSourceError::Bad { path: path.to_path_buf(), source });
    }
    inline.map(Token::new).transpose().map_err(TokenSourceError::Inline)
}

/// A run token, checked once so that every later use is infallible.
#[derive(Clone)]
pub struct Token {
    bearer: MetadataValue<Ascii>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    pub fn new(secret: &str) -> Result<Self, TokenError> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(TokenError::Empty);
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable);
        }
        let bearer = format!("Bearer {secret}").parse().map_err(|_| TokenError::NotPrintable)?;
        Ok(Self { bearer })
    }

    /// The secret itself, for handing to a child process's environment (never for logs).
    pub fn expose_secret(&self) -> &str {
        self.bearer.to_str().unwrap_or_default().trim_start_matches("Bearer ")
    }

    /// Stamps the token on an outgoing request.
    pub fn stamp<T>(&self, req: &mut Request<T>) {
        req.metadata_mut().insert(HEADER, self.bearer.clone());
    }

    /// Whether an incoming request carries this token (compared in constant time, so the
    /// answer's timing tells nothing about how much of a guess was right).
    pub fn admits<T>(&self, req: &Request<T>) -> bool {
        req.metadata().get(HEADER).is_some_and(|v| v.as_bytes().ct_eq(self.bearer.as_bytes()).into())
    }
}

/// The coordinator's interceptor: with a token configured, refuses calls that lack it, except
/// the read-only status calls when `open_reads` (operators' dashboards and grpcurl).
#[derive(Clone, Debug, Default)]
pub struct RequireToken {
    pub token: Option<Token>,
    pub open_reads: bool,
}

/// The calls that only read the run's state.
const READ_ONLY: [&str; 2] = ["/dcgan.v1.Coordinator/GetStatus", "/dcgan.v1.Coordinator/WatchMetrics"];

/// The request's path (`/package.Service/Method`), put in the request's extensions by a layer
/// of the server: an interceptor sees the metadata but not the URI.
#[derive(Clone, Debug)]
pub struct RpcPath(pub String);

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let read_only = || req.extensions().get::<RpcPath>().is_some_and(|p| READ_ONLY.contains(&p.0.as_str()));
        match &self.token {
            Some(token) if !(token.admits(&req) || (self.open_reads && read_only())) => Err(Status::unauthenticated(
                "missing or wrong run token: start the worker with the coordinator's --token or --token-file",
            )),
            _ => Ok(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn only_the_right_token_is_admitted() {
        let token = Token::new("s3cret").unwrap();
        let mut check = RequireToken { token: Some(token.clone()), open_reads: false };
        let mut ok = Request::new(());
        token.stamp(&mut ok);
        assert!(check.call(ok).is_ok());
        assert_eq!(check.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut wrong = Request::new(());
        Token::new("s3cres").unwrap().stamp(&mut wrong);
        assert_eq!(check.call(wrong).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(RequireToken::default().call(Request::new(())).is_ok(), "no token configured: open");
        assert_eq!(token.expose_secret(), "s3cret");

        // Open reads: the status calls pass without the token, nothing else does.
        let mut open = RequireToken { token: Some(token), open_reads: true };
        let call = |path: &str| {
            let mut r = Request::new(());
            r.extensions_mut().insert(RpcPath(path.into()));
            r
        };
        assert!(open.call(call("/dcgan.v1.Coordinator/GetStatus")).is_ok());
        assert!(open.call(call("/dcgan.v1.Coordinator/WatchMetrics")).is_ok());
        assert!(open.call(call("/dcgan.v1.Coordinator/Join")).is_err());
        assert!(open.call(Request::new(())).is_err(), "no path: no exception");
    }

    #[test]
    fn unusable_tokens_are_refused() {
        assert!(matches!(Token::new("  "), Err(TokenError::Empty)));
        assert!(matches!(Token::new("a b"), Err(TokenError::NotPrintable)));
        assert!(format!("{:?}", Token::new("abc").unwrap()).contains("redacted"));
    }
}
