//! One way for a restore to say how it is getting on: a CLI renders the
//! events as a progress bar, a controller turns them into status, Events
//! and metrics. The restore never writes to a terminal itself.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Action;
use crate::model::ObjectRef;

/// What happened.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// The plan is made: this many objects will be written or checked.
    Planned { objects: usize },
    /// A wave starts.
    Wave { index: usize, objects: usize },
    /// One object is done (written, left as it was, or failed).
    Object {
        object: &'a ObjectRef,
        action: Action,
        failed: bool,
    },
}

/// Receives a restore's events, from any task.
pub trait Observer: Send + Sync {
    fn event(&self, event: Event<'_>);

    /// Where the mover Pods that fill claims report their progress, if
    /// anywhere.
    fn mover_progress(&self) -> Option<std::sync::Arc<crate::mover::MoverProgress>> {
        None
    }
}

/// Ignores every event.
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: Event<'_>) {}
}

/// Counters a progress display can poll.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicUsize,
    pub done: AtomicUsize,
    pub failed: AtomicUsize,
    /// Volume data restored by mover Pods.
    pub volumes: std::sync::Arc<crate::mover::MoverProgress>,
}

impl Observer for Progress {
    fn event(&self, event: Event<'_>) {
        match event {
            Event::Planned { objects } => self.total.store(objects, Ordering::Relaxed),
            Event::Wave { .. } => {}
            Event::Object { failed, .. } => {
                self.done.fetch_add(1, Ordering::Relaxed);
                if failed {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn mover_progress(&self) -> Option<std::sync::Arc<crate::mover::MoverProgress>> {
        Some(self.volumes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_objects_and_failures() {
        let progress = Progress::default();
        let object = ObjectRef {
            group: String::new(),
            version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some("a".into()),
            name: "c".into(),
        };
        progress.event(Event::Planned { objects: 2 });
        progress.event(Event::Object {
            object: &object,
            action: Action::Create,
            failed: false,
        });
        progress.event(Event::Object {
            object: &object,
            action: Action::Update,
            failed: true,
        });
        assert_eq!(progress.total.load(Ordering::Relaxed), 2);
        assert_eq!(progress.done.load(Ordering::Relaxed), 2);
        assert_eq!(progress.failed.load(Ordering::Relaxed), 1);
    }
}
