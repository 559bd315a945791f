//! The run's access policy, one for both of the coordinator's ports: the gRPC port and the
//! HTTP port of `/metrics` and the live page.
//!
//! The shared run token: workers present it on every call, the coordinator refuses calls
//! without it, so only the run's own workers can join, report or upload checkpoints, and only
//! those who hold it download checkpoints. Every request falls in one [`Access`] class and
//! [`decide`] says whether it passes:
//!
//! | class | gRPC | HTTP | needs the token |
//! | --- | --- | --- | --- |
//! | [`Access::Open`] | health, reflection | `/metrics` (numbers only) | never |
//! | [`Access::Status`] | `GetStatus`, `WatchMetrics` | the live page, its assets, JSON and grids | unless `--open-status` |
//! | [`Access::Secret`] | everything else (join, report, upload) | checkpoint downloads | always |
//!
//! With no token configured everything is open (a laptop run). The token travels as
//! `authorization: Bearer <token>`; HTTP Basic with the token as the password (any user name)
//! is accepted as well, so that a browser can ask for it with its own prompt.

use base64::Engine as _;
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

    /// Whether an incoming request carries this token.
    pub fn admits<T>(&self, req: &Request<T>) -> bool {
        req.metadata().get(HEADER).is_some_and(|v| self.admits_authorization(v.as_bytes()))
    }

    /// Whether an `authorization` value holds this token: `Bearer TOKEN`, or `Basic` with the
    /// token as the password and any user name (what a browser's prompt and `curl -u :TOKEN`
    /// send). The scheme is matched without regard to case (RFC 9110); the secret is compared
    /// in constant time, so the answer's timing tells nothing about how much of a guess was right.
    pub fn admits_authorization(&self, value: &[u8]) -> bool {
        let secret = self.expose_secret().as_bytes();
        let Some(space) = value.iter().position(|&b| b == b' ') else { return false };
        let (scheme, credentials) = (&value[..space], value[space..].trim_ascii());
        if scheme.eq_ignore_ascii_case(b"bearer") {
            return credentials.ct_eq(secret).into();
        }
        if scheme.eq_ignore_ascii_case(b"basic") {
            let Ok(user_pass) = base64::engine::general_purpose::STANDARD.decode(credentials) else { return false };
            // A Basic user name holds no colon (RFC 7617): the password is what follows the first.
            let password = user_pass.iter().position(|&b| b == b':').map(|i| &user_pass[i + 1..]);
            return password.is_some_and(|p| p.ct_eq(secret).into());
        }
        false
    }
}

/// What a request may reach without the token: the class of a gRPC method or an HTTP route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Always open: health checks, reflection, Prometheus's `/metrics` (numbers only).
    Open,
    /// The read-only views of the run (`GetStatus`, `WatchMetrics`; the live page, its assets,
    /// JSON and sample grids): open with `--open-status`, else the token.
    Status,
    /// Taking part in the run (join, report, upload) and downloading its checkpoints (the model
    /// and the optimizer state): always the token.
    Secret,
}

/// Whether a request passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// UNAUTHENTICATED on gRPC, 401 on HTTP.
    Refuse,
}

/// The access policy of both ports: a request of class `access`, that carries the run's token
/// (`right_token`) or not, to a coordinator that has a token (`run_has_token`) or not and opens
/// its status (`open_status`) or not.
pub fn decide(access: Access, run_has_token: bool, right_token: bool, open_status: bool) -> Decision {
    let allowed = match access {
        _ if !run_has_token => true,
        Access::Open => true,
        Access::Status => open_status || right_token,
        Access::Secret => right_token,
    };
    if allowed { Decision::Allow } else { Decision::Refuse }
}

/// What a refused gRPC call is told: written for workers and for operators alike.
pub const REFUSED: &str = "missing or wrong run token: workers take it with --token or --token-file (DCGAN_TOKEN); \
                           operators pass it as grpcurl -H \"authorization: Bearer $DCGAN_TOKEN\" (the coordinator's \
                           --open-status opens GetStatus and WatchMetrics without it)";

/// The coordinator's access policy, for both ports: with a token configured, refuses requests
/// that lack it, except the read-only status views when `open_reads` (`--open-status`:
/// operators' dashboards, grpcurl, the live page) and what is always open (see [`decide`]).
/// As a gRPC interceptor it guards `dcgan.v1.Coordinator` (health and reflection are not behind it).
#[derive(Clone, Debug, Default)]
pub struct RequireToken {
    pub token: Option<Token>,
    pub open_reads: bool,
}

impl RequireToken {
    /// Whether a request of class `access` with this `authorization` value (if any) passes.
    pub fn decide(&self, access: Access, authorization: Option<&[u8]>) -> Decision {
        let right_token = match (&self.token, authorization) {
            (Some(token), Some(value)) => token.admits_authorization(value),
            _ => false,
        };
        decide(access, self.token.is_some(), right_token, self.open_reads)
    }
}

/// The calls that only read the run's state.
const READ_ONLY: [&str; 2] = ["/dcgan.v1.Coordinator/GetStatus", "/dcgan.v1.Coordinator/WatchMetrics"];

/// The request's path (`/package.Service/Method`), put in the request's extensions by a layer
/// of the server: an interceptor sees the metadata but not the URI.
#[derive(Clone, Debug)]
pub struct RpcPath(pub String);

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let read_only = req.extensions().get::<RpcPath>().is_some_and(|p| READ_ONLY.contains(&p.0.as_str()));
        let access = if read_only { Access::Status } else { Access::Secret };
        match self.decide(access, req.metadata().get(HEADER).map(|v| v.as_bytes())) {
            Decision::Allow => Ok(req),
            Decision::Refuse => Err(Status::unauthenticated(REFUSED)),
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

    /// Every cell of the policy's table.
    #[test]
    fn the_policy_table() {
        use Decision::{Allow, Refuse};
        for open_status in [false, true] {
            for right_token in [false, true] {
                for access in [Access::Open, Access::Status, Access::Secret] {
                    // No token configured: everything is open.
                    assert_eq!(decide(access, false, right_token, open_status), Allow);
                }
                assert_eq!(decide(Access::Open, true, right_token, open_status), Allow);
            }
            // The token opens everything.
            assert_eq!(decide(Access::Status, true, true, open_status), Allow);
            assert_eq!(decide(Access::Secret, true, true, open_status), Allow);
            // Checkpoints and joining need it even with --open-status.
            assert_eq!(decide(Access::Secret, true, false, open_status), Refuse);
        }
        assert_eq!(decide(Access::Status, true, false, false), Refuse);
        assert_eq!(decide(Access::Status, true, false, true), Allow);
    }

    #[test]
    fn bearer_and_basic_carry_the_token() {
        let token = Token::new("s3:cret").unwrap();
        let basic = |user_pass: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_pass));
        for ok in ["Bearer s3:cret", "bearer s3:cret", "BEARER  s3:cret", &basic(":s3:cret"), &basic("anyone:s3:cret")]
        {
            assert!(token.admits_authorization(ok.as_bytes()), "{ok} was refused");
        }
        for bad in [
            "",
            "s3:cret",
            "Bearer",
            "Bearer s3:cre",
            "Bearer s3:crett",
            "Bearer s3:cret x",
            "Token s3:cret",
            "Basic",
            "Basic !!!not-base64",
            &basic("s3:cret"), // the user name is what comes before the first colon
            &basic("s3cret"),
            &basic(":wrong"),
            &basic(":"),
        ] {
            assert!(!token.admits_authorization(bad.as_bytes()), "{bad} was admitted");
        }
        let policy = RequireToken { token: Some(token), open_reads: false };
        assert_eq!(policy.decide(Access::Secret, Some(basic("u:s3:cret").as_bytes())), Decision::Allow);
        assert_eq!(policy.decide(Access::Secret, None), Decision::Refuse);
        assert_eq!(policy.decide(Access::Open, None), Decision::Allow);
        assert_eq!(RequireToken::default().decide(Access::Secret, None), Decision::Allow);
    }

    #[test]
    fn unusable_tokens_are_refused() {
        assert!(matches!(Token::new("  "), Err(TokenError::Empty)));
        assert!(matches!(Token::new("a b"), Err(TokenError::NotPrintable)));
        assert!(format!("{:?}", Token::new("abc").unwrap()).contains("redacted"));
    }
}
