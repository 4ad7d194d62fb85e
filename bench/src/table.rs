//! The suite's one table: rows of figures, their ratios to the peers and the targets.

use crate::stats::Summary;

/// How a figure is shown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    /// Seconds, shown in s, ms or µs.
    Seconds,
    /// Milliseconds, shown as such.
    Millis,
    /// Frames (or steps) per second.
    PerSecond,
    /// Mebibytes.
    MiB,
    /// A plain number.
    Plain,
}

/// A figure with its distribution over rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figure {
    pub summary: Summary,
    pub unit: Unit,
}

impl Figure {
    pub fn new(summary: Summary, unit: Unit) -> Figure {
        Figure { summary, unit }
    }

    /// `median [min-max]` in the unit's scale.
    pub fn show(&self) -> String {
        let s = &self.summary;
        if s.n <= 1 || s.min == s.max {
            return format_value(s.median, self.unit);
        }
        let (scale, suffix) = scale_for(s.median, self.unit);
        let digits = digits_for(s.median * scale);
        format!(
            "{:.*} {suffix} [{:.*}–{:.*}]",
            digits,
            s.median * scale,
            digits,
            s.min * scale,
            digits,
            s.max * scale
        )
    }
}

fn scale_for(value: f64, unit: Unit) -> (f64, &'static str) {
    match unit {
        Unit::Seconds if value.abs() < 1e-3 => (1e6, "µs"),
        Unit::Seconds if value.abs() < 1.0 => (1e3, "ms"),
        Unit::Seconds => (1.0, "s"),
        Unit::Millis => (1.0, "ms"),
        Unit::PerSecond => (1.0, "/s"),
        Unit::MiB => (1.0, "MiB"),
        Unit::Plain => (1.0, ""),
    }
}

fn digits_for(value: f64) -> usize {
    match value.abs() {
        v if v >= 100.0 => 0,
        v if v >= 10.0 => 1,
        _ => 2,
    }
}

/// One value in the unit's scale, three significant figures or so.
pub fn format_value(value: f64, unit: Unit) -> String {
    let (scale, suffix) = scale_for(value, unit);
    let v = value * scale;
    let text = format!("{:.*}", digits_for(v), v);
    if suffix.is_empty() {
        text
    } else {
        format!("{text} {suffix}")
    }
}

/// What the ratio selfclass / peer must be at most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub max_ratio: f64,
}

impl Target {
    pub fn met_by(&self, ratio: &Summary) -> bool {
        ratio.median <= self.max_ratio
    }

    pub fn show(&self) -> String {
        if self.max_ratio < 1.0 {
            format!("≤ {:.2} ({:.0}× faster)", self.max_ratio, 1.0 / self.max_ratio)
        } else {
            format!("≤ {:.2}", self.max_ratio)
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The comparison's number and name, e.g. "1 embedding".
    pub comparison: String,
    pub case: String,
    pub ours: Figure,
    /// The peer's name and figure, when there is one.
    pub peer: Option<(String, Figure)>,
    /// selfclass / peer, per round.
    pub ratio: Option<Summary>,
    pub target: Option<Target>,
}

impl Row {
    /// A row with only a selfclass figure.
    pub fn alone(comparison: &str, case: impl Into<String>, ours: Figure) -> Row {
        Row {
            comparison: comparison.into(),
            case: case.into(),
            ours,
            peer: None,
            ratio: None,
            target: None,
        }
    }

    /// Whether the row has a target and meets it (`None` without a target or ratio).
    pub fn met(&self) -> Option<bool> {
        Some(self.target?.met_by(self.ratio.as_ref()?))
    }
}

const HEADER: [&str; 7] =
    ["comparison", "case", "selfclass", "peer", "ratio selfclass/peer", "target", "met"];

/// The rows as cells, header first.
fn cells(rows: &[Row]) -> Vec<Vec<String>> {
    let mut out = vec![HEADER.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for r in rows {
        let peer =
            r.peer.as_ref().map_or("–".into(), |(name, f)| format!("{name}: {}", f.show()));
        let ratio = r.ratio.map_or("–".into(), |s| {
            if s.n > 1 {
                format!("{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max)
            } else {
                format!("{:.2}", s.median)
            }
        });
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        out.push(vec![
            r.comparison.clone(),
            r.case.clone(),
            r.ours.show(),
            peer,
            ratio,
            r.target.map_or(String::new(), |t| t.show()),
            met.into(),
        ]);
    }
    out
}

/// A Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let cells = cells(rows);
    let mut out = String::new();
    for (i, line) in cells.iter().enumerate() {
        out.push_str("| ");
        out.push_str(&line.iter().map(|c| c.replace('|', "\\|")).collect::<Vec<_>>().join(" | "));
        out.push_str(" |\n");
        if i == 0 {
            out.push_str(&format!("|{}\n", "---|".repeat(line.len())));
        }
    }
    out
}

/// A plain-text table with aligned columns, for the terminal.
pub fn plain(rows: &[Row]) -> String {
    let cells = cells(rows);
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|c| cells.iter().map(|l| l[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in &cells {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(samples: &[f64]) -> Summary {
        Summary::of(samples).expect("samples")
    }

    #[test]
    fn seconds_pick_their_scale() {
        assert_eq!(format_value(0.00045, Unit::Seconds), "450 µs");
        assert_eq!(format_value(0.0269, Unit::Seconds), "26.9 ms");
        assert_eq!(format_value(1.5, Unit::Seconds), "1.50 s");
        assert_eq!(format_value(1823.2, Unit::PerSecond), "1823 /s");
        assert_eq!(format_value(3.0, Unit::Plain), "3.00");
    }

    #[test]
    fn figure_shows_its_range() {
        let f = Figure::new(summary(&[0.0021, 0.0020, 0.0025]), Unit::Seconds);
        assert_eq!(f.show(), "2.10 ms [2.00–2.50]");
    }

    #[test]
    fn targets_are_checked_on_the_median_ratio() {
        let ours = Figure::new(summary(&[1.0, 1.0, 1.0]), Unit::Seconds);
        let peer = Figure::new(summary(&[2.0, 2.0, 2.0]), Unit::Seconds);
        let mut row = Row {
            comparison: "1 embedding".into(),
            case: "batch 1".into(),
            ours,
            peer: Some(("onnxruntime".into(), peer)),
            ratio: Some(summary(&[0.4, 0.5, 1.2])),
            target: Some(Target { max_ratio: 0.5 }),
        };
        assert_eq!(row.met(), Some(true));
        row.target = Some(Target { max_ratio: 0.45 });
        assert_eq!(row.met(), Some(false));
        row.ratio = None;
        assert_eq!(row.met(), None);
    }

    #[test]
    fn markdown_has_a_header_separator_and_one_line_per_row() {
        let rows = vec![Row::alone("4 agent", "fps", Figure::new(summary(&[10.0]), Unit::Plain))];
        let md = markdown(&rows);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("| comparison | case |"));
        assert_eq!(lines[1], "|---|---|---|---|---|---|---|");
        assert!(lines[2].contains("| 4 agent | fps | 10.0 | – |"), "{}", lines[2]);
    }

    #[test]
    fn plain_columns_line_up() {
        let rows = vec![
            Row::alone("a", "short", Figure::new(summary(&[1.0]), Unit::Plain)),
            Row::alone("a", "a longer case", Figure::new(summary(&[2.0]), Unit::Plain)),
        ];
        let text = plain(&rows);
        let starts: Vec<usize> =
            text.lines().map(|l| l.find("1.00").or(l.find("2.00")).unwrap_or(0)).collect();
        assert_eq!(starts[1], starts[2]);
    }

    #[test]
    fn target_text_names_the_speedup() {
        assert_eq!(Target { max_ratio: 0.2 }.show(), "≤ 0.20 (5× faster)");
        assert_eq!(Target { max_ratio: 1.25 }.show(), "≤ 1.25");
    }
}
