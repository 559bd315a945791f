//! The shared run token: workers present it on every call, the coordinator refuses calls
//! without it, so only the run's own workers can join, report or upload checkpoints.
//!
//! The token travels as `authorization: Bearer <token>` metadata. Health and reflection stay
//! open (probes and grpcurl need them); every `dcgan.v1.Coordinator` call is checked.

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

/// The coordinator's interceptor: with a token configured, refuses calls that lack it.
#[derive(Clone, Debug, Default)]
pub struct RequireToken(pub Option<Token>);

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match &self.0 {
            Some(token) if !token.admits(&req) => Err(Status::unauthenticated(
                "missing or wrong run token: start the worker with the coordinator's --token (DCGAN_TOKEN)",
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
        let mut check = RequireToken(Some(token.clone()));
        let mut ok = Request::new(());
        token.stamp(&mut ok);
        assert!(check.call(ok).is_ok());
        assert_eq!(check.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut wrong = Request::new(());
        Token::new("s3cres").unwrap().stamp(&mut wrong);
        assert_eq!(check.call(wrong).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(RequireToken(None).call(Request::new(())).is_ok(), "no token configured: open");
    }

    #[test]
    fn unusable_tokens_are_refused() {
        assert!(matches!(Token::new("  "), Err(TokenError::Empty)));
        assert!(matches!(Token::new("a b"), Err(TokenError::NotPrintable)));
        assert!(format!("{:?}", Token::new("abc").unwrap()).contains("redacted"));
    }
}
