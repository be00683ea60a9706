//! `blkrep replication measure`: the figures of a group's deliveries over a window,
//! from the running primary (see `shipper::measure`), as text or JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use shipper::measure::Measurement;

use crate::control::{self, ControlRequest};
use crate::status::{human_bytes, human_duration, human_lag};

/// Asks the primary on `socket` for `group`'s figures over the last `since` and
/// prints them.
pub fn run(socket: &Path, group: &str, since: Duration, json: bool) -> anyhow::Result<()> {
    let request = ControlRequest::Measure {
        group: group.to_string(),
        since_secs: since.as_secs().max(1),
    };
    let figures: Measurement =
        control::call_typed(socket, control::PRIMARY, &request, Duration::from_secs(30))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        print!("{}", render(group, since, &figures));
    }
    Ok(())
}

/// The figures for people, one per line.
fn render(group: &str, since: Duration, figures: &Measurement) -> String {
    let mut text = String::new();
    let none = || "-".to_string();
    let mut line = |name: &str, value: String| {
        let _ = writeln!(text, "{name:<24}{value}");
    };
    line("Group", group.to_string());
    let mut window = format!("last {}", human_duration(since.as_secs()));
    if let Some(from) = figures
        .history_from_unix_ms
        .filter(|from| *from > figures.since_unix_ms)
    {
        let known = figures.until_unix_ms.saturating_sub(from) / 1000;
        let _ = write!(
            window,
            " (history covers only the last {})",
            human_duration(known)
        );
    }
    line("Window", window);
    line("Successful cycles", figures.successes.to_string());
    line("Failed attempts", figures.failures.to_string());
    line("Missed intervals", figures.missed_intervals.to_string());
    line(
        "Average transfer size",
        figures.avg_transfer_bytes.map_or_else(none, human_bytes),
    );
    line(
        "Maximum transfer size",
        figures.max_transfer_bytes.map_or_else(none, human_bytes),
    );
    line(
        "Average transfer time",
        figures.avg_transfer_ms.map_or_else(none, human_lag),
    );
    line(
        "Achieved RPO p50 / p99",
        match (figures.rpo_p50_ms, figures.rpo_p99_ms) {
            (Some(p50), Some(p99)) => format!("{} / {}", human_lag(p50), human_lag(p99)),
            _ => none(),
        },
    );
    line("Data delivered", human_bytes(figures.data_bytes));
    line("Bytes sent", human_bytes(figures.network_bytes));
    line(
        "Compression ratio",
        figures
            .compression_ratio
            .map_or_else(none, |ratio| format!("{ratio:.2}")),
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_every_figure_and_dashes_what_is_unknown() {
        let figures = Measurement {
            since_unix_ms: 1_000_000,
            until_unix_ms: 4_600_000,
            history_from_unix_ms: Some(4_000_000),
            successes: 3,
            failures: 1,
            missed_intervals: 2,
            avg_transfer_bytes: Some(2 << 20),
            max_transfer_bytes: Some(4 << 20),
            avg_transfer_ms: Some(1500),
            rpo_p50_ms: Some(30_000),
            rpo_p99_ms: Some(95_000),
            rpo_max_ms: Some(95_000),
            data_bytes: 6 << 20,
            network_bytes: 3 << 20,
            compression_ratio: Some(2.0),
        };
        let text = render("vm1", Duration::from_secs(3600), &figures);
        for expected in [
            "Group                   vm1",
            "last 1h00m (history covers only the last 10m00s)",
            "Successful cycles       3",
            "Failed attempts         1",
            "Missed intervals        2",
            "Average transfer time   1.5s",
            "Achieved RPO p50 / p99  30.0s / 1m35s",
            "Compression ratio       2.00",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
        let empty = render("vm1", Duration::from_secs(60), &Measurement::default());
        assert!(empty.contains("Average transfer size   -"), "{empty}");
        assert!(empty.contains("Compression ratio       -"), "{empty}");
    }
}
