//! Secret strings and URL redaction: the only ways a credential may be printed are `***`.

use std::fmt;

/// A credential. `Debug` and `Display` print `***`; the value is reachable only through
/// [`Secret::expose`], so a stray `{:?}` cannot leak it into a log line or an error.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The credential itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replaces the password of every `scheme://user:password@host` in `text` with `***`.
///
/// Works on text that is not a valid URL (a half-typed broker URL, several `;`-joined sentinel
/// URLs, an error message quoting a URL), which is why it scans instead of parsing.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The URL ends at whitespace, `;` or a quote. Its authority normally ends at the first
        // `/`, `?` or `#`, but an unencoded secret may contain those: when an `@` follows within
        // the URL, everything before the last such `@` is treated as user info (over-redacting a
        // path that contains `@` is harmless; leaking a secret is not).
        let url_end = tail
            .find(|c: char| matches!(c, ';' | '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        let end = match tail[..url_end].rfind('@') {
            Some(at) => tail[at..url_end]
                .find(['/', '?', '#'])
                .map_or(url_end, |i| at + i),
            None => tail[..url_end].find(['/', '?', '#']).unwrap_or(url_end),
        };
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    // A lone user part may be an SQS access key secret pair split differently;
                    // a user name alone is not a secret.
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// How a broker URL given by a user (one URL, or a `;`-joined list) is quoted in an error.
///
/// Unlike [`redact_urls`], which must find URLs inside free text, this knows the whole input is
/// the URL, so it can be strict: everything before the last `@` is replaced by `***`, except a
/// leading scheme with its `:` and the slashes after it. A password may hold any character,
/// unencoded `;`, `/`, `\`, `@` or quotes included, and none of it can survive; the host (of the
/// last URL of a list) stays, which is what a person needs to recognise the broker.
///
/// The scheme is found without requiring `://`: WHATWG parsers (the `url` crate) read
/// `http:\\u:pw@h`, `http:/u:pw@h` and `http:u:pw@h` as `http://u:pw@h`, so the user info may
/// follow any spelling of the separator, or none.
pub fn redact_url(raw: &str) -> String {
    match raw.rfind('@') {
        // `scheme_prefix` stops at the first `@`, so it never reaches past `at`.
        Some(at) => format!("{}***{}", &raw[..scheme_prefix(raw)], &raw[at..]),
        // No `@`, no user info: a URL parser finds no credentials either.
        None => redact_urls(raw),
    }
}

/// The length of the part of a user-given URL that cannot hold a credential: leading blanks and
/// control characters (which URL parsers strip), then, when present, a scheme, its `:` and the
/// slashes, backslashes, tabs and newlines after it. 0 when `raw` does not start with a scheme.
fn scheme_prefix(raw: &str) -> usize {
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i] <= b' ' {
        i += 1;
    }
    if i == b.len() || !b[i].is_ascii_alphabetic() {
        return 0;
    }
    while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'+' | b'-' | b'.')) {
        i += 1;
    }
    if i == b.len() || b[i] != b':' {
        return 0;
    }
    i += 1;
    while i < b.len() && matches!(b[i], b'/' | b'\\' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Whether a metadata value may hold a URL with credentials: it has `://`, or the shape of user
/// info, a `:` before an `@` (`http:u:pw@h` is a URL with a password to a WHATWG parser, and
/// `u:pw@h` or `:\\:pw@h` one with a mangled or missing scheme).
fn looks_like_url(value: &str) -> bool {
    value.contains("://") || value.rfind('@').is_some_and(|at| value[..at].contains(':'))
}

/// How any metadata value is quoted in an error: a value that holds a URL is redacted as a user
/// URL ([`redact_url`]: someone put a broker URL under the wrong key), and long values are cut
/// to 120 characters.
pub fn shown(value: &str) -> String {
    const MAX: usize = 120;
    let mut out = if looks_like_url(value) {
        redact_url(value)
    } else {
        value.to_string()
    };
    if out.len() > MAX {
        let mut end = MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

/// The first character of a user-given URL that a WHATWG parser (the `url` crate) reads unlike a
/// person or Python's `urllib`: `\` (a `/` in http(s) URLs, so it ends the user info and moves
/// a password into the path) and control characters (tabs and newlines are dropped). URLs that
/// are used as given (`managementUrl`, `awsEndpoint`) are refused with one; `raw` is trimmed.
pub fn misread_char(raw: &str) -> Option<char> {
    raw.trim().chars().find(|c| *c == '\\' || c.is_control())
}

/// Whether a parsed user-given URL has an `@` after its host (in the path, query or fragment).
/// Parsers end the user info at the first `/`, `?` or `#` (and `\` in http(s) URLs) and take
/// the host after the last `@` before it, so such an `@` means a user name or password held one
/// of those unencoded (or the host was left out, as in `amqp:///u:pw@h`): the rest of the
/// password is now a path, vhost, query or fragment, shown and sent as one. Refused; a real `@`
/// there can be written `%40`.
pub fn at_after_host(url: &url::Url) -> bool {
    url[url::Position::BeforePath..].contains('@')
}

/// What a refusal by [`at_after_host`] says.
pub const AT_AFTER_HOST: &str = "an `@` after the host: percent-encode `/`, `?`, `#` and `\\` in the user name and password (%2F, %3F, %23, %5C), and an `@` in a path as %40";

/// A percent-encoded part of a broker URL (user name, password, path), decoded as kombu decodes
/// it: invalid UTF-8 is replaced, never refused.
pub fn decode(part: &str) -> String {
    percent_encoding::percent_decode_str(part)
        .decode_utf8_lossy()
        .into_owned()
}

/// Redacts URL passwords in `text` (see [`redact_urls`]) and every occurrence of `secret`: for
/// error text from client libraries, which may quote a credential outside a URL.
pub fn scrub(text: &str, secret: Option<&Secret>) -> String {
    let text = redact_urls(text);
    match secret {
        Some(s) if !s.expose().is_empty() => text.replace(s.expose(), "***"),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_url_loses_everything_up_to_its_last_at() {
        assert_eq!(redact_url("redis://:p;w@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(
            redact_url("sentinel://:a@h1;sentinel://:a@h2:26379"),
            "sentinel://***@h2:26379"
        );
        assert_eq!(
            redact_url("redis://`:pw@localhost"),
            "redis://***@localhost"
        );
        assert_eq!(redact_url("sqs://AKIA:a/b+c@"), "sqs://***@");
        assert_eq!(
            redact_url("redis://localhost:6379/0"),
            "redis://localhost:6379/0"
        );
    }

    #[test]
    fn a_user_url_loses_its_user_info_however_the_separator_is_spelled() {
        // WHATWG parsers read all of these as `http://u:pw@h` (or, with `\` inside the user
        // info, move the password into the path): nothing before the last `@` but the scheme.
        for (raw, want) in [
            (r"http://=\;:PwSecret1@localhost", "http://***@localhost"),
            (r"http:\\u:PwSecret1@h", r"http:\\***@h"),
            (r"http:/\u:PwSecret1@h", r"http:/\***@h"),
            ("http:u:PwSecret1@h", "http:***@h"),
            ("http:///u:PwSecret1@h", "http:///***@h"),
            ("amqp:u:PwSecret1@h", "amqp:***@h"),
            ("\thttp://u:PwSecret1@h", "\thttp://***@h"),
            ("ht\ttp://u:PwSecret1@h", "***@h"),
            ("u:PwSecret1@h", "u:***@h"),
            (":PwSecret1@h", "***@h"),
            ("http://u:a/PwSecret1@b@h/x", "http://***@h/x"),
            ("http://u:PwSecret1%40@h", "http://***@h"),
        ] {
            assert_eq!(redact_url(raw), want, "{raw:?}");
        }
        assert_eq!(redact_url("http:h:1/p%40q"), "http:h:1/p%40q");
    }

    #[test]
    fn misread_characters_are_found() {
        assert_eq!(misread_char(r"http://=\;:pw@localhost"), Some('\\'));
        assert_eq!(misread_char("http://u:p\tw@h"), Some('\t'));
        assert_eq!(misread_char("http://h\n.example"), Some('\n'));
        assert_eq!(misread_char(" http://u:p%5Cw@h/ \n"), None);
    }

    #[test]
    fn shown_values_are_redacted_and_short() {
        assert_eq!(shown(r"http:\\u:PwSecret1@h"), r"http:\\***@h");
        assert_eq!(shown("http:u:PwSecret1@h"), "http:***@h");
        assert_eq!(shown("celery@worker1"), "celery@worker1");
        assert_eq!(shown(r":\\:PwSecret1@h"), "***@h");
        assert_eq!(shown("u:PwSecret1@h"), "u:***@h");
        assert_eq!(shown("amqp://u:p;w@h"), "amqp://***@h");
        assert_eq!(shown("10"), "10");
        assert_eq!(shown(&"x".repeat(500)).len(), 123);
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_urls("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_urls("redis://:p%40ss@h/1"), "redis://:***@h/1");
        assert_eq!(
            redact_urls("sentinel://:pw@a:26379;sentinel://:pw@b:26379"),
            "sentinel://:***@a:26379;sentinel://:***@b:26379"
        );
        assert_eq!(
            redact_urls("bad url \"amqp://guest:guest@x\" here"),
            "bad url \"amqp://guest:***@x\" here"
        );
        assert_eq!(redact_urls("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_urls("no url"), "no url");
    }

    #[test]
    fn redacts_unencoded_secrets_with_slashes() {
        assert_eq!(redact_urls("sqs://KEY:top/sec+ret@"), "sqs://KEY:***@");
        assert_eq!(
            redact_urls("sqs://KEY:a/b@host:1/x"),
            "sqs://KEY:***@host:1/x"
        );
    }

    #[test]
    fn scrub_removes_bare_secrets_too() {
        let s = Secret::new("hunter2");
        assert_eq!(
            scrub("auth hunter2 failed for redis://:hunter2@h", Some(&s)),
            "auth *** failed for redis://:***@h"
        );
        assert_eq!(scrub("x", Some(&Secret::new(""))), "x");
        assert_eq!(scrub("redis://:p@h", None), "redis://:***@h");
    }

    #[test]
    fn redacts_passwords_containing_at_signs() {
        assert_eq!(redact_urls("redis://:a@b@host/0"), "redis://:***@host/0");
    }
}
