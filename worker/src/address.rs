//! The coordinator's address as people give it: `host:port`, the form the coordinator prints
//! and writes to `RUN_DIR/coordinator.addr`, or a URL with `http://` or `https://`. A bare
//! address speaks TLS when the worker is given a certificate to trust (`--tls-ca`).

use std::fmt;
use std::str::FromStr;

/// Whether the address said how to talk to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
    /// `host:port`: plain unless `--tls-ca` is given.
    Bare,
}

/// A checked coordinator address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorAddress {
    scheme: Scheme,
    /// `host:port`, the host possibly a bracketed IPv6 literal.
    authority: String,
}

/// Why an address was refused; says which forms are accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a coordinator address: {reason}; give host:port (as in RUN_DIR/coordinator.addr), http://host:port or https://host:port"
)]
pub struct AddressError {
    input: String,
    reason: String,
}

impl FromStr for CoordinatorAddress {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| AddressError { input: input.to_string(), reason: reason.to_string() };
        let text = input.trim();
        let (scheme, rest) = match text.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
            Some((s, rest)) if s.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
            Some((s, _)) => return Err(fail(&format!("the scheme {s}:// is not http:// or https://"))),
            None => (Scheme::Bare, text),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(fail("a coordinator address has no path"));
        }
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(fail("the port is missing"));
        };
        if host.is_empty() || host == "[]" {
            return Err(fail("the host is missing"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(fail("an IPv6 host goes in brackets, e.g. [::1]:50051"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(fail(&format!("the port {port:?} is not a number from 1 to 65535"))),
        }
        Ok(Self { scheme, authority: authority.to_string() })
    }
}

impl CoordinatorAddress {
    /// The URL to connect to: https when the address says so, or when it is bare and the
    /// worker has a certificate to trust.
    pub fn url(&self, tls: bool) -> String {
        let https = match self.scheme {
            Scheme::Https => true,
            Scheme::Http => false,
            Scheme::Bare => tls,
        };
        format!("{}://{}", if https { "https" } else { "http" }, self.authority)
    }

    /// Whether the address itself asks for TLS.
    pub fn says_https(&self) -> bool {
        self.scheme == Scheme::Https
    }

    /// Whether the address itself refuses TLS.
    pub fn says_http(&self) -> bool {
        self.scheme == Scheme::Http
    }
}

impl fmt::Display for CoordinatorAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Bare => f.write_str(&self.authority),
            Scheme::Http => write!(f, "http://{}", self.authority),
            Scheme::Https => write!(f, "https://{}", self.authority),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> CoordinatorAddress {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_printed_form_is_accepted() {
        assert_eq!(parse("127.0.0.1:50051").url(false), "http://127.0.0.1:50051");
        assert_eq!(parse("127.0.0.1:50051\n").url(true), "https://127.0.0.1:50051", "a file's newline");
        assert_eq!(parse("http://coordinator:50051").url(true), "http://coordinator:50051");
        assert_eq!(parse("HTTPS://coordinator:50051/").url(false), "https://coordinator:50051");
        assert_eq!(parse("[::1]:50051").url(false), "http://[::1]:50051");
        assert_eq!(parse("dcgan-coordinator.default.svc:50051").to_string(), "dcgan-coordinator.default.svc:50051");
    }

    #[test]
    fn the_rest_is_refused_saying_what_is_accepted() {
        for (bad, why) in [
            ("127.0.0.1", "the port is missing"),
            (":50051", "the host is missing"),
            ("grpc://h:1", "the scheme grpc:// is not"),
            ("h:0", "not a number from 1 to 65535"),
            ("h:port", "not a number from 1 to 65535"),
            ("http://h:1/api", "no path"),
            ("::1:50051", "IPv6 host goes in brackets"),
        ] {
            let e = bad.parse::<CoordinatorAddress>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("give host:port"), "{bad}: {e}");
        }
    }
}
