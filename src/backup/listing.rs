//! `walagent backups`: the archive's backups as a table for people or JSON for scripts.

use serde_json::json;

use crate::archive::catalog::Listed;

/// `1.5 GiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn seconds_between(a: &str, b: &str) -> Option<f64> {
    let a = chrono::DateTime::parse_from_rfc3339(a).ok()?;
    let b = chrono::DateTime::parse_from_rfc3339(b).ok()?;
    Some((b - a).num_milliseconds() as f64 / 1000.0)
}

/// A fixed-width table, oldest first; incomplete backups are listed as such (never usable).
pub fn render_table(list: &[Listed]) -> String {
    let header = [
        "ID",
        "STATUS",
        "STARTED (UTC)",
        "TOOK",
        "TLI",
        "START LSN",
        "END LSN",
        "DATA",
        "STORED",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for l in list {
        rows.push(match l {
            Listed::Complete(i) => vec![
                i.id.clone(),
                "complete".into(),
                i.start_time
                    .get(..19)
                    .unwrap_or(&i.start_time)
                    .replace('T', " "),
                seconds_between(&i.start_time, &i.stop_time)
                    .map(|s| format!("{s:.0}s"))
                    .unwrap_or_default(),
                i.timeline.to_string(),
                i.start_lsn.to_string(),
                i.end_lsn.to_string(),
                human_bytes(i.data_bytes),
                human_bytes(i.stored_bytes),
            ],
            Listed::Incomplete { id, bytes, .. } => vec![
                id.clone(),
                "incomplete".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                human_bytes(*bytes),
            ],
            Listed::Unreadable { id, .. } => vec![
                id.clone(),
                "unreadable".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        });
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    let incomplete = list
        .iter()
        .filter(|l| !matches!(l, Listed::Complete(_)))
        .count();
    if incomplete > 0 {
        out.push_str(&format!(
            "\n{incomplete} backup(s) are incomplete (interrupted or still running) or unreadable; restore never uses them.\n"
        ));
    }
    out
}

/// A JSON array, oldest first: complete backups are their backup.json plus `"status": "complete"`.
pub fn render_json(list: &[Listed]) -> String {
    let items: Vec<serde_json::Value> = list
        .iter()
        .map(|l| match l {
            Listed::Complete(i) => {
                let mut v = serde_json::to_value(i).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("status".into(), json!("complete"));
                }
                v
            }
            Listed::Incomplete { id, objects, bytes } => {
                json!({"id": id, "status": "incomplete", "objects": objects, "stored_bytes": bytes})
            }
            Listed::Unreadable { id, detail } => {
                json!({"id": id, "status": "unreadable", "detail": detail})
            }
        })
        .collect();
    serde_json::to_string_pretty(&items).unwrap_or_else(|_| "[]".into()) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn table_and_json() {
        let list = vec![Listed::Incomplete {
            id: "20261121T000000Z".into(),
            objects: 1,
            bytes: 10,
        }];
        let t = render_table(&list);
        assert!(t.starts_with("ID"), "{t}");
        assert!(t.contains("20261121T000000Z  incomplete"), "{t}");
        assert!(t.contains("restore never uses them"));
        let j: serde_json::Value = serde_json::from_str(&render_json(&list)).unwrap();
        assert_eq!(j[0]["status"], "incomplete");
    }
}
