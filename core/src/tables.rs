//! The `tables` option: a comma-separated include list of `schema.table`
//! patterns where either part may be `*`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Any,
    Exact(String),
}

impl Part {
    fn matches(&self, name: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Exact(s) => s == name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFilter {
    patterns: Vec<(Part, Part)>,
}

impl TableFilter {
    /// Parses `public.*, audit.events, *.settings`. Names are compared as
    /// stored in the catalog (no quoting, case-sensitive).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for raw in text.split(',') {
            let entry = raw.trim();
            let (schema, table) = entry
                .split_once('.')
                .ok_or_else(|| format!("entry \"{entry}\" is not of the form schema.table"))?;
            let part = |s: &str| -> Result<Part, String> {
                match s {
                    "*" => Ok(Part::Any),
                    "" => Err(format!("entry \"{entry}\" has an empty name")),
                    s if s.contains('.') || s.contains('*') => {
                        Err(format!("entry \"{entry}\" is not of the form schema.table"))
                    }
                    s => Ok(Part::Exact(s.to_string())),
                }
            };
            patterns.push((part(schema)?, part(table)?));
        }
        Ok(TableFilter { patterns })
    }

    pub fn matches(&self, schema: &str, table: &str) -> bool {
        self.patterns.iter().any(|(s, t)| s.matches(schema) && t.matches(table))
    }
}

impl fmt::Display for TableFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (s, t)) in self.patterns.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            for (j, p) in [s, t].into_iter().enumerate() {
                if j > 0 {
                    f.write_str(".")?;
                }
                match p {
                    Part::Any => f.write_str("*")?,
                    Part::Exact(name) => f.write_str(name)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let f = TableFilter::parse("public.*, audit.events ,*.settings").unwrap_or_else(|e| panic!("{e}"));
        assert!(f.matches("public", "anything"));
        assert!(f.matches("audit", "events"));
        assert!(!f.matches("audit", "other"));
        assert!(f.matches("x", "settings"));
        assert!(!f.matches("x", "Settings"));
        assert_eq!(f.to_string(), "public.*,audit.events,*.settings");
        assert!(TableFilter::parse("*.*").is_ok_and(|f| f.matches("a", "b")));
    }

    #[test]
    fn malformed_entries() {
        for bad in ["", "t", "a.b.c", ".t", "s.", "a.b,,c.d", "pub*.t", "a.b*"] {
            assert!(TableFilter::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
