//! The filter `POST /logging?level=` accepts: a comma-separated list of directives, each a
//! level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or `target=level` with a Rust
//! module path as the target. Anything else (a typo, an empty value, kilobytes of garbage) is
//! refused before it reaches the logger: `EnvFilter` would take a bare word as a target name
//! and silently turn every other log line off.

/// The longest filter accepted.
pub(crate) const MAX_LEN: usize = 1024;

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Why a filter was refused; the admin page answers 400 with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FilterError {
    #[error("the filter is empty")]
    Empty,
    #[error("the filter is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("bad percent-encoding")]
    Encoding,
    #[error("{0:?} is not a level (trace, debug, info, warn, error, off) or target=level")]
    Directive(String),
}

/// Decodes and checks a `level=` query value; returns the filter to install.
pub(crate) fn parse(raw: &str) -> Result<String, FilterError> {
    if raw.len() > 3 * MAX_LEN {
        return Err(FilterError::TooLong);
    }
    let filter = percent_decode(raw)?;
    if filter.len() > MAX_LEN {
        return Err(FilterError::TooLong);
    }
    if filter.trim().is_empty() {
        return Err(FilterError::Empty);
    }
    for directive in filter.split(',') {
        let directive = directive.trim();
        let ok = match directive.split_once('=') {
            Some((target, level)) => is_target(target) && is_level(level),
            None => is_level(directive),
        };
        if !ok {
            return Err(FilterError::Directive(directive.to_owned()));
        }
    }
    Ok(filter)
}

fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s))
}

/// A module path: `hboned`, `hboned::xds`, `h2`, `access`.
fn is_target(s: &str) -> bool {
    !s.is_empty()
        && s.split("::").all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

/// `base` with the directives of `level` applied over it: each one replaces the directive of
/// the same target in `base` (a bare level: the default level), in place; new targets are
/// appended. Both are filters `parse` accepted (or empty).
pub(crate) fn merge(base: &str, level: &str) -> String {
    let target = |d: &str| d.split_once('=').map_or("", |(t, _)| t).to_owned();
    let mut directives: Vec<String> = base
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect();
    for new in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match directives.iter_mut().find(|d| target(d) == target(new)) {
            Some(old) => *old = new.to_owned(),
            None => directives.push(new.to_owned()),
        }
    }
    directives.join(",")
}

/// `%XX` escapes and `+` as a space, as a query string carries them.
fn percent_decode(s: &str) -> Result<String, FilterError> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next(), bytes.next()];
                let [Some(h), Some(l)] = hex else {
                    return Err(FilterError::Encoding);
                };
                let digit = |c: u8| (c as char).to_digit(16);
                let (Some(h), Some(l)) = (digit(h), digit(l)) else {
                    return Err(FilterError::Encoding);
                };
                out.push((h * 16 + l) as u8);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| FilterError::Encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_replaces_the_same_target_and_appends_new_ones() {
        assert_eq!(merge("info", "debug"), "debug");
        assert_eq!(
            merge("info,h2=warn", "hboned=debug"),
            "info,h2=warn,hboned=debug"
        );
        assert_eq!(merge("info,h2=warn", "h2=off,error"), "error,h2=off");
        assert_eq!(merge("info", ""), "info");
        assert_eq!(merge("", "access=debug"), "access=debug");
    }

    #[test]
    fn good_filters_pass_and_bad_ones_say_why() {
        for ok in [
            "info",
            "debug",
            "hboned=debug,info",
            "hboned::xds=trace",
            "h2=off,warn",
            "hboned%3Ddebug%2Cinfo",
            "INFO",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(parse("hboned%3Ddebug").unwrap(), "hboned=debug");
        let long = "x".repeat(60 * 1024);
        let rows: [(&str, FilterError); 9] = [
            ("", FilterError::Empty),
            ("  ", FilterError::Empty),
            ("inf", FilterError::Directive("inf".into())),
            ("hboned=loud", FilterError::Directive("hboned=loud".into())),
            ("=debug", FilterError::Directive("=debug".into())),
            ("info,", FilterError::Directive(String::new())),
            (
                "hboned[span]=debug",
                FilterError::Directive("hboned[span]=debug".into()),
            ),
            ("%zz", FilterError::Encoding),
            (long.as_str(), FilterError::TooLong),
        ];
        for (bad, why) in rows {
            assert_eq!(parse(bad), Err(why), "{bad:.40}");
        }
    }
}
