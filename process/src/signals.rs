//! SIGTERM (how Kubernetes stops a pod) and Ctrl-C (SIGINT): the first asks for a clean stop,
//! a second ends the process at once. The coordinator and the worker listen with
//! [`StopSignals`], and each acts on them its own way.

/// The signals that ask for a stop, listened to from when this is made: a signal that arrives
/// before is handled by its default action (the process ends).
pub struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT; returns its name.
    pub async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
