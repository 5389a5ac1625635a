//! Plain-text layouts: column tables (`list`) and aligned `label: value`
//! lists (`info`, `pool status`), and the scripting options that shape
//! them (`-H`, `-o FIELD,...`, `--bytes`) as `zfs list` and `lvs` have.

use crate::error::{CliError, CliResult, EXIT_USAGE};

/// How a table is printed: for people (aligned, with a header, sizes like
/// 1.5G) or for scripts.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OutputArgs {
    /// For scripts: no header, fields separated by one tab
    #[arg(short = 'H', long = "no-headings")]
    pub scripted: bool,
    /// Fields to print, in this order, separated by commas (e.g.
    /// name,size,mapped; 'used' is taken for mapped, as zfs names it); an
    /// unknown field's error lists them all
    #[arg(
        short = 'o',
        long = "fields",
        value_name = "FIELD,...",
        value_delimiter = ','
    )]
    pub fields: Option<Vec<String>>,
    /// Exact figures: sizes in bytes and times in seconds since the epoch
    /// instead of 1.5G and dates
    #[arg(long)]
    pub bytes: bool,
}

impl OutputArgs {
    /// A size as this output shows it.
    pub fn size(&self, bytes: u64) -> String {
        if self.bytes {
            bytes.to_string()
        } else {
            crate::human::size(bytes)
        }
    }

    /// A time (seconds since the epoch) as this output shows it.
    pub fn time(&self, unix: u64) -> String {
        if self.bytes {
            unix.to_string()
        } else {
            crate::human::utc(unix)
        }
    }

    /// The columns to print, as indexes into `ids`: the `-o` list, or all.
    /// An unknown field is a usage error naming the valid ones.
    pub fn select(&self, ids: &[String]) -> CliResult<Vec<usize>> {
        let Some(wanted) = &self.fields else {
            return Ok((0..ids.len()).collect());
        };
        wanted
            .iter()
            .map(|w| {
                let mut w = w.trim().to_ascii_lowercase();
                // zfs calls the mapped space "used".
                if w == "used" && !ids.iter().any(|id| id == "used") {
                    w = "mapped".to_string();
                }
                ids.iter().position(|id| *id == w).ok_or_else(|| {
                    CliError::new(format!("unknown field '{w}' (fields: {})", ids.join(", ")))
                        .with_code(EXIT_USAGE)
                })
            })
            .collect()
    }
}

/// The field name of a column header for `-o`: "USE%" is use_pct, "LAST
/// CHANGE" last_change.
pub fn field_id(header: &str) -> String {
    header
        .to_ascii_lowercase()
        .replace('%', "_pct")
        .replace(' ', "_")
}

/// A table whose columns are as wide as their widest cell. Numeric columns
/// are right-aligned so figures line up.
pub struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns as `(header, right_aligned)`.
    pub fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            headers: columns.iter().map(|c| c.0).collect(),
            right: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Rendered as `out` asks: only the `-o` columns, and with `-H` no
    /// header and one tab between fields (cells must then hold no tab or
    /// newline; names cannot).
    pub fn render_as(&self, out: &OutputArgs) -> CliResult<String> {
        let ids: Vec<String> = self.headers.iter().map(|h| field_id(h)).collect();
        let cols = out.select(&ids)?;
        let pick = |r: &Vec<String>| -> Vec<String> {
            cols.iter()
                .map(|&c| r.get(c).cloned().unwrap_or_default())
                .collect()
        };
        if out.scripted {
            let mut s = String::new();
            for r in &self.rows {
                s.push_str(&pick(r).join("\t"));
                s.push('\n');
            }
            return Ok(s);
        }
        let mut t = Table {
            headers: cols.iter().map(|&c| self.headers[c]).collect(),
            right: cols.iter().map(|&c| self.right[c]).collect(),
            rows: Vec::new(),
        };
        for r in &self.rows {
            t.row(pick(r));
        }
        Ok(t.render())
    }

    pub fn render(&self) -> String {
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let all: Vec<&Vec<String>> = std::iter::once(&header).chain(&self.rows).collect();
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|c| {
                all.iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in all {
            let mut line = String::new();
            for (c, width) in widths.iter().enumerate() {
                let cell = row.get(c).map_or("", String::as_str);
                let pad = width - cell.chars().count();
                if c > 0 {
                    line.push_str("  ");
                }
                if self.right[c] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `label: value` lines with the values starting in one column.
pub fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in rows {
        let label = format!("{label}:");
        out.push_str(&format!("{label:<w$} {value}\n", w = width + 1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&[("NAME", false), ("SIZE", true)]);
        t.row(vec!["a".into(), "1.5G".into()]);
        t.row(vec!["longer".into(), "12G".into()]);
        assert_eq!(t.render(), "NAME    SIZE\na       1.5G\nlonger   12G\n");
    }

    #[test]
    fn scripted_and_selected_columns() {
        let mut t = Table::new(&[("NAME", false), ("SIZE", true), ("USE%", true)]);
        t.row(vec!["a".into(), "1.5G".into(), "1%".into()]);
        let out = OutputArgs {
            scripted: true,
            fields: Some(vec!["use_pct".into(), "name".into()]),
            bytes: false,
        };
        assert_eq!(t.render_as(&out).unwrap(), "1%\ta\n");
        let bad = OutputArgs {
            fields: Some(vec!["nope".into()]),
            ..OutputArgs::default()
        };
        let e = t.render_as(&bad).unwrap_err();
        assert!(e.message.contains("name, size, use_pct"), "{}", e.message);
        assert_eq!(e.code, EXIT_USAGE);
        let mut t = Table::new(&[("NAME", false), ("MAPPED", true)]);
        t.row(vec!["a".into(), "4096".into()]);
        let used = OutputArgs {
            scripted: true,
            fields: Some(vec!["used".into()]),
            bytes: true,
        };
        assert_eq!(t.render_as(&used).unwrap(), "4096\n");
    }

    #[test]
    fn aligns_fields() {
        let f = fields(&[("a", "1".into()), ("long", "2".into())]);
        assert_eq!(f, "a:    1\nlong: 2\n");
    }
}
