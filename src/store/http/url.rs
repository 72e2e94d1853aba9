//! The URL of an HTTP source: what is requested, what is shown, and the file name it gives.
//!
//! The shown form (messages, logs, `version.json`) drops the query and the fragment: query
//! strings carry signatures and tokens (pre-signed URLs). Credentials in the authority
//! (`user:pass@host`) are refused rather than silently sent or shown: headers carry those.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use http::Uri;

use super::HttpError;
use crate::store::names;

/// File name of a one-file datastore whose URL ends without a usable name (`https://host/`).
pub const FALLBACK_NAME: &str = "download";

/// A parsed http(s) URL.
#[derive(Debug, Clone)]
pub struct Target {
    /// What is requested (query included, fragment dropped).
    pub uri: Uri,
    /// `scheme://host[:port]/path`: safe to show and to record.
    pub shown: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, HttpError> {
        let url = url.trim();
        let without_fragment = url.split_once('#').map_or(url, |(u, _)| u);
        let bad = |message: &str| HttpError::BadUrl {
            url: shown_prefix(without_fragment),
            message: message.to_owned(),
        };
        let uri: Uri = without_fragment
            .parse()
            .map_err(|_| bad("not a valid URL"))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(bad("only http:// and https:// URLs are supported")),
        }
        let Some(authority) = uri.authority() else {
            return Err(bad("the host is missing"));
        };
        if authority.as_str().contains('@') {
            return Err(bad(
                "credentials in the URL are not supported; send them in a header (Authorization)",
            ));
        }
        let shown = format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or("https"),
            authority.as_str(),
            uri.path()
        );
        Ok(Target { uri, shown })
    }

    /// The last path segment, percent-decoded, if it is a valid file name; else
    /// [`FALLBACK_NAME`].
    pub fn file_name(&self) -> Vec<u8> {
        let last = self.uri.path().rsplit('/').next().unwrap_or("");
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(last).collect();
        match names::validate_component(OsStr::from_bytes(&decoded)) {
            Ok(()) => decoded,
            Err(e) => {
                if !decoded.is_empty() {
                    tracing::warn!(url = %self.shown, reason = %e, "the URL's last segment is no file name; using {FALLBACK_NAME:?}");
                }
                FALLBACK_NAME.as_bytes().to_vec()
            }
        }
    }
}

/// A URL that did not parse, shown without anything after '?' or '@'.
fn shown_prefix(url: &str) -> String {
    let no_query = url.split_once('?').map_or(url, |(u, _)| u);
    match no_query.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((auth, path)) => {
                let host = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
                format!("{scheme}://{host}/{path}")
            }
            None => format!(
                "{scheme}://{}",
                rest.rsplit_once('@').map_or(rest, |(_, h)| h)
            ),
        },
        None => no_query.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_form_drops_query_and_fragment() {
        let t = Target::parse("https://h.example:8443/a/b%20c.tar.gz?X-Sig=secret#frag").unwrap();
        assert_eq!(t.shown, "https://h.example:8443/a/b%20c.tar.gz");
        assert_eq!(t.uri.query(), Some("X-Sig=secret"));
        assert_eq!(t.file_name(), b"b c.tar.gz");
    }

    #[test]
    fn file_names_fall_back() {
        for (url, name) in [
            ("http://h/", FALLBACK_NAME),
            ("http://h", FALLBACK_NAME),
            ("http://h/x/..", FALLBACK_NAME),
            ("http://h/a%00b", FALLBACK_NAME),
            ("http://h/a%2Fb", FALLBACK_NAME),
            ("http://h/d/%C3%A9t%C3%A9.csv", "été.csv"),
        ] {
            let t = Target::parse(url).unwrap();
            assert_eq!(String::from_utf8_lossy(&t.file_name()), name, "{url}");
        }
    }

    #[test]
    fn refused_urls_hide_secrets() {
        for url in [
            "ftp://h/x",
            "https://user:pw@h/x?tok=1",
            "not a url",
            "/local/path",
        ] {
            let e = Target::parse(url).unwrap_err().to_string();
            assert!(!e.contains("pw") && !e.contains("tok"), "{e}");
        }
    }
}
