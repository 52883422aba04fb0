//! Progress bars on a terminal (stderr); nothing when stderr is not one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::backup::Progress;

/// Renders a backup's live counters until finished.
pub struct BackupBar {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl BackupBar {
    pub fn start(progress: Arc<Progress>) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(8));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} collections  {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                shown.set_length(progress.collections_total.load(Ordering::Relaxed) as u64);
                shown.set_position(progress.collections_done.load(Ordering::Relaxed) as u64);
                let bytes = progress.bytes.load(Ordering::Relaxed);
                shown.set_message(format!(
                    "{} objects, {}",
                    progress.objects.load(Ordering::Relaxed),
                    super::output::human_bytes(bytes)
                ));
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
        });
        BackupBar { bar, ticker }
    }

    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Renders a restore's progress until finished.
pub struct RestoreBar {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl RestoreBar {
    pub fn start(progress: Arc<crate::restore::Progress>) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(8));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} objects",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                shown.set_length(progress.total.load(Ordering::Relaxed) as u64);
                shown.set_position(progress.done.load(Ordering::Relaxed) as u64);
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
        });
        RestoreBar { bar, ticker }
    }

    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Renders a volume backup's or restore's bytes until finished.
pub struct VolumeBar {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl VolumeBar {
    pub fn start(progress: Arc<crate::volume::VolumeProgress>) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(8));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec}  {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                shown.set_length(progress.bytes_total.load(Ordering::Relaxed));
                shown.set_position(progress.bytes_done.load(Ordering::Relaxed));
                shown.set_message(format!(
                    "{} files",
                    progress.files_done.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
        });
        VolumeBar { bar, ticker }
    }

    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}
