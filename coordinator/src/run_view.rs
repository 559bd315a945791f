//! What the gRPC service and the live page read of one generation: the state machine
//! ([`Run`]) and the views its outputs keep (health, evaluations, step history, pending grids).

use std::sync::Arc;

use proto::v1;

use crate::evaluation::Evaluations;
use crate::health::HealthMonitor;
use crate::renderer::SampleQueue;
use crate::run::Run;
use crate::step_history::StepHistory;

/// One generation as its readers see it; cheap to clone (shared handles).
#[derive(Clone)]
pub struct RunView {
    pub run: Arc<Run>,
    pub health: HealthMonitor,
    pub evaluations: Evaluations,
    pub history: StepHistory,
    pub samples: SampleQueue,
}

impl RunView {
    /// The run as `GetStatus` shows it.
    pub fn status(&self) -> v1::RunStatus {
        v1::RunStatus {
            health: Some(self.health.to_proto()),
            evaluations: self.evaluations.list(),
            ..self.run.status()
        }
    }
}
