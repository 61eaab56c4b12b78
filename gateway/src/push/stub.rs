//! A provider that records what it was asked to send: for tests and `herald demo`.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use herald_protocol::PushProviderKind;

use super::{PushOutcome, PushProvider, PushRequest};

#[derive(Clone)]
pub struct StubProvider {
    kind: PushProviderKind,
    sent: Arc<Mutex<Vec<PushRequest>>>,
    script: Arc<Mutex<Vec<PushOutcome>>>,
}

impl StubProvider {
    pub fn new(kind: PushProviderKind) -> Self {
        StubProvider {
            kind,
            sent: Arc::default(),
            script: Arc::default(),
        }
    }

    /// Every request received so far, in order.
    pub fn sent(&self) -> Vec<PushRequest> {
        self.sent.lock().unwrap().clone()
    }

    /// Outcomes to answer with, first in first out; `Delivered` once exhausted.
    pub fn script(&self, outcomes: Vec<PushOutcome>) {
        *self.script.lock().unwrap() = outcomes;
    }
}

#[async_trait]
impl PushProvider for StubProvider {
    fn kind(&self) -> PushProviderKind {
        self.kind
    }

    async fn send(&self, req: &PushRequest) -> PushOutcome {
        self.sent.lock().unwrap().push(req.clone());
        let mut script = self.script.lock().unwrap();
        if script.is_empty() {
            PushOutcome::Delivered
        } else {
            script.remove(0)
        }
    }
}
