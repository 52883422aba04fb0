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
                    "{} objects, {}{}",
                    progress.objects.load(Ordering::Relaxed),
                    super::output::human_bytes(bytes),
                    volumes_message(&progress.volumes)
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

/// "; volumes 1/3, 120 MiB of 1.2 GiB" while movers run.
fn volumes_message(volumes: &crate::mover::MoverProgress) -> String {
    let total = volumes.volumes_total.load(Ordering::Relaxed);
    if total == 0 {
        return String::new();
    }
    let (done, of) = volumes.bytes();
    format!(
        "; volumes {}/{total}, {} of {}",
        volumes.volumes_done.load(Ordering::Relaxed),
        super::output::human_bytes(done),
        super::output::human_bytes(of)
    )
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
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} objects{msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                shown.set_length(progress.total.load(Ordering::Relaxed) as u64);
                shown.set_position(progress.done.load(Ordering::Relaxed) as u64);
                shown.set_message(volumes_message(&progress.volumes));
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
        if std::env::var_os(crate::mover::PROGRESS_ENV).is_some() {
            return Self::lines(progress);
        }
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

    /// In a mover Pod: a progress line on stderr every second, which the
    /// CLI that started the Pod reads from its log.
    fn lines(progress: Arc<crate::volume::VolumeProgress>) -> Self {
        let ticker = tokio::spawn(async move {
            loop {
                eprintln!("{}", crate::mover::progress_line(&progress));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        VolumeBar {
            bar: ProgressBar::hidden(),
            ticker,
        }
    }

    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}
