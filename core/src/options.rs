//! Output plugin options, parsed once when decoding starts.
//!
//! Unknown, duplicate and malformed options are errors naming the option,
//! as pgoutput does.

use crate::tables::TableFilter;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Binary,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub format: Format,
    pub include_transaction: bool,
    pub include_old: bool,
    pub include_messages: bool,
    pub tables: Option<TableFilter>,
    /// Only tables tracked in `changerelay.tracked_tables` (and that table
    /// itself), annotated with their label and row identifier.
    pub tracked: bool,
    /// Values larger than this many bytes (as stored) are left out and shown
    /// as an omitted marker; `None`: the server's `changerelay.max_value_size`.
    pub max_value_size: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            format: Format::Json,
            include_transaction: true,
            include_old: true,
            include_messages: true,
            tables: None,
            tracked: false,
            max_value_size: None,
        }
    }
}

/// Every option this plugin knows, for error hints.
pub const KNOWN_OPTIONS: &[&str] = &[
    "format",
    "include_transaction",
    "include_old",
    "include_messages",
    "tables",
    "max_value_size",
];

/// Largest `max_value_size` accepted: a value can not be larger than 1 GB.
pub const MAX_VALUE_SIZE_LIMIT: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    pub option: String,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OptionError {}

impl Options {
    /// Parses `(name, value)` pairs as given to the slot. A value of `None`
    /// (`pg_recvlogical -o include_old`) means true for boolean options.
    pub fn parse<'a, I>(pairs: I) -> Result<Options, OptionError>
    where
        I: IntoIterator<Item = (&'a str, Option<&'a str>)>,
    {
        let mut opts = Options::default();
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name) {
                return Err(OptionError {
                    option: name.to_string(),
                    message: format!("conflicting or redundant options: option \"{name}\" given more than once"),
                    hint: "Give each option at most once.".into(),
                });
            }
            seen.push(name);
            match name {
                "format" => {
                    opts.format = match value {
                        Some("json") => Format::Json,
                        Some("binary") => Format::Binary,
                        other => return Err(bad_value(name, other, "json or binary")),
                    }
                }
                "include_transaction" => opts.include_transaction = parse_bool(name, value)?,
                "include_old" => opts.include_old = parse_bool(name, value)?,
                "include_messages" => opts.include_messages = parse_bool(name, value)?,
                "tracked" => opts.tracked = parse_bool(name, value)?,
                "max_value_size" => {
                    let expected = "a number of bytes from 1 to 1073741824";
                    let n = value
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .filter(|n| (1..=MAX_VALUE_SIZE_LIMIT).contains(n))
                        .ok_or_else(|| bad_value(name, value, expected))?;
                    opts.max_value_size = Some(n);
                }
                "tables" => {
                    let text = value.ok_or_else(|| bad_value(name, None, "a list such as public.*,audit.events"))?;
                    let filter = TableFilter::parse(text).map_err(|why| OptionError {
                        option: name.to_string(),
                        message: format!("invalid value for option \"tables\": {why}"),
                        hint: "Use a comma-separated list of schema.table, where either part may be *.".into(),
                    })?;
                    opts.tables = Some(filter);
                }
                _ => {
                    return Err(OptionError {
                        option: name.to_string(),
                        message: format!("option \"{name}\" is not recognized by pg_changerelay"),
                        hint: format!("Valid options are: {}.", KNOWN_OPTIONS.join(", ")),
                    })
                }
            }
        }
        Ok(opts)
    }
}

fn bad_value(name: &str, value: Option<&str>, expected: &str) -> OptionError {
    let shown = match value {
        Some(v) => format!("\"{v}\""),
        None => "no value".into(),
    };
    OptionError {
        option: name.to_string(),
        message: format!("invalid value {shown} for option \"{name}\""),
        hint: format!("Option \"{name}\" takes {expected}."),
    }
}

/// Accepts what Postgres' parse_bool accepts.
fn parse_bool(name: &str, value: Option<&str>) -> Result<bool, OptionError> {
    let Some(v) = value else { return Ok(true) };
    match v.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "on" | "yes" | "y" | "1" => Ok(true),
        "f" | "false" | "off" | "no" | "n" | "0" => Ok(false),
        _ => Err(bad_value(name, Some(v), "a boolean (true or false)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let o = Options::parse([]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o, Options::default());
        assert_eq!(o.format, Format::Json);
        assert!(o.include_transaction && o.include_old && o.include_messages && o.tables.is_none());
    }

    #[test]
    fn parses_every_option() {
        let o = Options::parse([
            ("format", Some("binary")),
            ("include_transaction", Some("off")),
            ("include_old", Some("0")),
            ("include_messages", None),
            ("tables", Some("public.*")),
            ("tracked", Some("yes")),
            ("max_value_size", Some("4096")),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.format, Format::Binary);
        assert!(!o.include_transaction && !o.include_old && o.include_messages);
        assert!(o.tables.is_some_and(|t| t.matches("public", "x")));
        assert!(o.tracked);
        assert_eq!(o.max_value_size, Some(4096));
    }

    /// Options given, and the option the error must name.
    type Case<'a> = (&'a [(&'a str, Option<&'a str>)], &'a str);

    #[test]
    fn errors_name_the_option() {
        let cases: &[Case<'_>] = &[
            (&[("fromat", Some("json"))], "fromat"),
            (&[("format", Some("xml"))], "format"),
            (&[("format", None)], "format"),
            (&[("include_old", Some("maybe"))], "include_old"),
            (&[("tables", Some("nodot"))], "tables"),
            (&[("tables", None)], "tables"),
            (&[("max_value_size", Some("0"))], "max_value_size"),
            (&[("max_value_size", Some("2GB"))], "max_value_size"),
            (&[("max_value_size", None)], "max_value_size"),
            (
                &[("include_old", Some("true")), ("include_old", Some("false"))],
                "include_old",
            ),
        ];
        for (pairs, option) in cases {
            let err = Options::parse(pairs.iter().copied()).err();
            let err = err.unwrap_or_else(|| panic!("{pairs:?} should fail"));
            assert_eq!(err.option, *option);
            assert!(err.message.contains(option), "{}", err.message);
            assert!(!err.hint.is_empty());
        }
    }
}
