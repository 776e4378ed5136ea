//! Processes: /proc, process trees, stale postmaster locks.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Fields after the `(comm)` of /proc/PID/stat: [state, ppid, ...].
pub(super) fn proc_stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

pub(super) fn proc_comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

pub(super) fn proc_start_time(pid: i32) -> Option<u64> {
    // field 22 of stat = index 19 after the comm
    proc_stat_fields(pid)?.get(19)?.parse().ok()
}

/// Exists and is neither a zombie nor dead (a SIGKILLed postmaster may stay a zombie when
/// nobody reaps it).
/// The process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match proc_stat_fields(pid) {
        Some(f) => !matches!(f.first().map(String::as_str), Some("Z") | Some("X") | None),
        None => false,
    }
}

pub(super) fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() {
                if let Some(f) = proc_stat_fields(p) {
                    if f.get(1).and_then(|s| s.parse::<i32>().ok()) == Some(pid) {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

/// SIGKILLs a postmaster and its children (stopped first, so it cannot fork meanwhile), and
/// waits until they are all gone or zombies.
pub(super) fn kill_tree(pm: i32) {
    unsafe { libc::kill(pm, libc::SIGSTOP) };
    let kids = children_of(pm);
    unsafe { libc::kill(pm, libc::SIGKILL) };
    for &k in &kids {
        unsafe { libc::kill(k, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::iter::once(pm)
        .chain(kids.iter().copied())
        .any(pid_alive)
    {
        assert!(
            Instant::now() < deadline,
            "processes of postmaster {pm} did not die after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(super) fn read_postmaster_pid(pgdata: &Path) -> Option<i32> {
    let s = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    s.lines().next()?.trim().parse().ok()
}

/// Removes postmaster.pid and the socket lock file if their process is gone.
pub(super) fn clear_stale_locks(pgdata: &Path, socket_dir: &Path, port: u16) {
    for f in [
        pgdata.join("postmaster.pid"),
        socket_dir.join(format!(".s.PGSQL.{port}.lock")),
    ] {
        let Ok(s) = fs::read_to_string(&f) else {
            continue;
        };
        let pid = s
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .trim_start_matches('-')
            .parse::<i32>();
        if pid.map(|p| !pid_alive(p)).unwrap_or(true) {
            let _ = fs::remove_file(&f);
        }
    }
}

/// Kills the background prefetch worker of the wal-fetch cache `cache`, if one runs (its pid is
/// in `.worker.lock`; only a process whose command line says `--prefetch-worker`, never a pid
/// reused since), and waits until it is gone (10 s at most).
pub fn stop_prefetch_worker(cache: &Path) {
    let Some(pid) = fs::read_to_string(cache.join(".worker.lock"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&p| pid_alive(p))
    else {
        return;
    };
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("--prefetch-worker") {
        return;
    }
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
