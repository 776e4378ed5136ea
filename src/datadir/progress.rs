//! The progress bar of `backup` and `seed-standby` (terminal only): bytes, rate, ETA.

use crate::protocol::replication::BackupHeader;

/// A progress bar on stderr (terminal only): bytes, rate, ETA.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(crate) fn new(enabled: bool, header: &BackupHeader) -> Progress {
        let total: u64 = header.tablespaces.iter().filter_map(|t| t.size).sum();
        Self::with_total(enabled, total)
    }

    /// A bar to `total` bytes (a spinner when 0).
    pub(crate) fn with_total(enabled: bool, total: u64) -> Progress {
        if !enabled {
            return Progress { bar: None };
        }
        let bar = if total > 0 {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {bytes} {binary_bytes_per_sec}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b
        };
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
        Progress { bar: Some(bar) }
    }

    pub(crate) fn add(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub(crate) fn set(&self, n: u64) {
        if let Some(b) = &self.bar {
            if n > b.position() {
                b.set_position(n);
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
