//! Named pause points inside repository operations (taking a lock, a prune's
//! phases, writing an index). Tests arm a point to stop an operation exactly
//! there, run another operation, and let the first continue: interleavings
//! are forced, never timed. In other builds a pause point does nothing.

/// The pause points of one repository handle.
#[derive(Debug, Default)]
pub(crate) struct PausePoints {
    #[cfg(test)]
    gates: std::sync::Mutex<std::collections::HashMap<&'static str, Gate>>,
}

#[cfg(test)]
#[derive(Debug)]
struct Gate {
    reached: tokio::sync::oneshot::Sender<()>,
    resume: tokio::sync::oneshot::Receiver<()>,
}

/// An armed pause point, from the test's side.
#[cfg(test)]
pub(crate) struct Armed {
    pub reached: tokio::sync::oneshot::Receiver<()>,
    pub resume: tokio::sync::oneshot::Sender<()>,
}

impl PausePoints {
    /// Stops here if a test armed `point`, until the test resumes it. A point
    /// stops once per arming.
    pub(crate) async fn at(&self, point: &'static str) {
        #[cfg(test)]
        {
            let gate = self.gates.lock().expect("pause points").remove(point);
            if let Some(gate) = gate {
                let _ = gate.reached.send(());
                let _ = gate.resume.await;
            }
        }
        #[cfg(not(test))]
        let _ = point;
    }

    /// Arms `point`: the next operation that reaches it stops there.
    #[cfg(test)]
    pub(crate) fn arm(&self, point: &'static str) -> Armed {
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let (resume_tx, resume_rx) = tokio::sync::oneshot::channel();
        self.gates.lock().expect("pause points").insert(
            point,
            Gate {
                reached: reached_tx,
                resume: resume_rx,
            },
        );
        Armed {
            reached: reached_rx,
            resume: resume_tx,
        }
    }
}
