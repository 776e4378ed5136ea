//! systemd's notify protocol (`Type=notify`): READY=1, RELOADING=1, STOPPING=1, STATUS= and the
//! watchdog, through the `sd-notify` crate (a datagram to `$NOTIFY_SOCKET`, abstract sockets
//! included). Without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends notifications when the process runs under a service manager that asked for them.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
        }
    }

    /// READY=1 with a STATUS= line.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(&one_line(status))]);
    }

    /// RELOADING=1 with the monotonic time, as `Type=notify-reload` wants (READY=1 follows).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(t) => self.send(&[NotifyState::Reloading, t]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(&one_line(status)),
        ]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// How often to send WATCHDOG=1: half of `WATCHDOG_USEC` (when it is meant for this process).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        sd_notify::watchdog_enabled()
            .filter(|d| !d.is_zero())
            .map(|d| (d / 2).max(Duration::from_millis(100)))
    }
}

/// A STATUS= value is one line.
fn one_line(s: &str) -> String {
    let mut t: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    if t.len() > 400 {
        let mut cut = 400;
        while !t.is_char_boundary(cut) {
            cut -= 1;
        }
        t.truncate(cut);
        t.push_str("...");
    }
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_is_one_line() {
        assert_eq!(super::one_line("a\nb"), "a b");
        assert!(super::one_line(&"é".repeat(500)).len() <= 404);
    }
}
