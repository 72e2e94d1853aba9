//! S3 POST forms (browser-based uploads with a SigV4-signed POST policy).
//!
//! A POST form lets whoever holds it upload objects to one bucket, with keys that satisfy the
//! policy's conditions, until the policy expires, without any credentials of their own. S3
//! checks the signature (HMAC-SHA256 of the base64 policy with the SigV4 signing key of the
//! signer's secret, date, region and `s3`) and every condition; a form field that no condition
//! names is refused. That is what lets the operator hand a user the right to write exactly one
//! datastore's `objects/` prefix, and nothing else (see `operator::uploads`).
//!
//! Invariants:
//! - The policy names the bucket (`eq`), the key (`starts-with` a prefix that ends in `/`, or
//!   `eq` one key), a `content-length-range`, and `eq` conditions for the algorithm, credential,
//!   date and (temporary credentials) the security token, as SigV4 requires. No other field may
//!   appear in a form built from it.
//! - The signature is computed here from the policy bytes that go into the form; the fields
//!   are derived from the same values, so the form and its policy cannot disagree.
//! - Secrets never leave this module except as the signature; `Debug` of the inputs redacts.
//!
//! POST uploads are single requests: S3 caps them at 5 GiB per object.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use super::s3::StaticCredentials;

/// The largest object S3 accepts in one POST (and one PUT).
pub const MAX_POST_OBJECT: u64 = 5 << 30;
/// SigV4's algorithm name.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Which keys a form may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRule {
    /// Any key that starts with this (which ends in `/`, so a sibling prefix never matches).
    Prefix(String),
    /// Exactly this key.
    Exact(String),
}

/// What a form allows.
#[derive(Debug, Clone)]
pub struct FormPolicy {
    pub bucket: String,
    pub key: KeyRule,
    /// Largest object, in bytes.
    pub max_bytes: u64,
    /// When the form stops working.
    pub expires: SystemTime,
}

/// A signed form: POST `url` as multipart/form-data with `fields` (plus the `key` field for
/// prefix forms), then the object as the last part, named `file`. The bucket is the URL's (S3
/// checks the policy's bucket condition against it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostForm {
    pub url: String,
    pub fields: BTreeMap<String, String>,
}

/// The field a client fills in with the object key.
pub const KEY_FIELD: &str = "key";

fn amz_date(t: SystemTime) -> String {
    DateTime::<Utc>::from(t)
        .format("%Y%m%dT%H%M%SZ")
        .to_string()
}

fn short_date(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).format("%Y%m%d").to_string()
}

fn expiration(t: SystemTime) -> String {
    DateTime::<Utc>::from(t)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// The policy document (JSON) of `policy`, signed by `credential` at `date`.
pub fn policy_document(
    policy: &FormPolicy,
    credential: &str,
    date: &str,
    token: Option<&str>,
) -> String {
    let key = match &policy.key {
        KeyRule::Prefix(p) => serde_json::json!(["starts-with", "$key", p]),
        KeyRule::Exact(k) => serde_json::json!(["eq", "$key", k]),
    };
    let mut conditions = vec![
        serde_json::json!(["eq", "$bucket", policy.bucket]),
        key,
        serde_json::json!(["content-length-range", 0, policy.max_bytes]),
        serde_json::json!(["eq", "$x-amz-algorithm", ALGORITHM]),
        serde_json::json!(["eq", "$x-amz-credential", credential]),
        serde_json::json!(["eq", "$x-amz-date", date]),
    ];
    if let Some(t) = token {
        conditions.push(serde_json::json!(["eq", "$x-amz-security-token", t]));
    }
    serde_json::json!({ "expiration": expiration(policy.expires), "conditions": conditions })
        .to_string()
}

/// The SigV4 signature of a base64 policy: HMAC-SHA256 with the signing key of `secret` for
/// the day of `at`, `region` and service `s3`, hex.
pub fn sign_policy(policy_b64: &str, secret: &str, at: SystemTime, region: &str) -> String {
    let key = aws_sigv4::sign::v4::generate_signing_key(secret, at, region, "s3");
    aws_sigv4::sign::v4::calculate_signature(key, policy_b64.as_bytes())
}

/// Builds the signed form for `policy` at `url`, signed at `now`.
pub fn build(
    url: &str,
    policy: &FormPolicy,
    creds: &StaticCredentials,
    region: &str,
    now: SystemTime,
) -> PostForm {
    let date = amz_date(now);
    let credential = format!(
        "{}/{}/{region}/s3/aws4_request",
        creds.access_key_id,
        short_date(now)
    );
    let token = creds.session_token.as_deref();
    let doc = policy_document(policy, &credential, &date, token);
    let b64 = aws_smithy_types::base64::encode(doc.as_bytes());
    let signature = sign_policy(&b64, &creds.secret_access_key, now, region);
    let mut fields = BTreeMap::from([
        ("x-amz-algorithm".to_owned(), ALGORITHM.to_owned()),
        ("x-amz-credential".to_owned(), credential),
        ("x-amz-date".to_owned(), date),
        ("policy".to_owned(), b64),
        ("x-amz-signature".to_owned(), signature),
    ]);
    if let KeyRule::Exact(k) = &policy.key {
        fields.insert(KEY_FIELD.to_owned(), k.clone());
    }
    if let Some(t) = token {
        fields.insert("x-amz-security-token".to_owned(), t.to_owned());
    }
    PostForm {
        url: url.to_owned(),
        fields,
    }
}

/// The POST URL of `bucket`: path-style on a custom endpoint, virtual-hosted on AWS (path-style
/// there for bucket names with dots, which TLS wildcards do not cover).
pub fn bucket_url(endpoint: Option<&str>, region: &str, bucket: &str) -> String {
    match endpoint {
        Some(ep) => format!("{}/{bucket}", ep.trim_end_matches('/')),
        None if bucket.contains('.') => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        None => format!("https://{bucket}.s3.{region}.amazonaws.com/"),
    }
}

/// `now + ttl`, rounded down to a whole second (the form's and the status's expiry agree).
pub fn expiry(now: SystemTime, ttl: Duration) -> SystemTime {
    let t = now + ttl;
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's worked example ("Example: Browser-Based Upload using HTTP POST (Using AWS
    /// Signature Version 4)", S3 API reference): its exact base64 policy, example secret, date
    /// and region give this signature.
    #[test]
    fn signature_matches_the_aws_documentation_example() {
        const POLICY: &str = "eyAiZXhwaXJhdGlvbiI6ICIyMDE1LTEyLTMwVDEyOjAwOjAwLjAwMFoiLA0KICAiY29uZGl0aW9ucyI6IFsNCiAgICB7ImJ1Y2tldCI6ICJzaWd2NGV4YW1wbGVidWNrZXQifSwNCiAgICBbInN0YXJ0cy13aXRoIiwgIiRrZXkiLCAidXNlci91c2VyMS8iXSwNCiAgICB7ImFjbCI6ICJwdWJsaWMtcmVhZCJ9LA0KICAgIHsic3VjY2Vzc19hY3Rpb25fcmVkaXJlY3QiOiAiaHR0cDovL3NpZ3Y0ZXhhbXBsZWJ1Y2tldC5zMy5hbWF6b25hd3MuY29tL3N1Y2Nlc3NmdWxfdXBsb2FkLmh0bWwifSwNCiAgICBbInN0YXJ0cy13aXRoIiwgIiRDb250ZW50LVR5cGUiLCAiaW1hZ2UvIl0sDQogICAgeyJ4LWFtei1tZXRhLXV1aWQiOiAiMTQzNjUxMjM2NTEyNzQifSwNCiAgICB7IngtYW16LXNlcnZlci1zaWRlLWVuY3J5cHRpb24iOiAiQUVTMjU2In0sDQogICAgWyJzdGFydHMtd2l0aCIsICIkeC1hbXotbWV0YS10YWciLCAiIl0sDQoNCiAgICB7IngtYW16LWNyZWRlbnRpYWwiOiAiQUtJQUlPU0ZPRE5ON0VYQU1QTEUvMjAxNTEyMjkvdXMtZWFzdC0xL3MzL2F3czRfcmVxdWVzdCJ9LA0KICAgIHsieC1hbXotYWxnb3JpdGhtIjogIkFXUzQtSE1BQy1TSEEyNTYifSwNCiAgICB7IngtYW16LWRhdGUiOiAiMjAxNTEyMjlUMDAwMDAwWiIgfQ0KICBdDQp9";
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_451_347_200); // 2015-12-29T00:00:00Z
        let sig = sign_policy(
            POLICY,
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            at,
            "us-east-1",
        );
        assert_eq!(
            sig,
            "8afdbf4008c03f22c2cd3cdb72e4afbb1f6a588f3255ac628749a66d7f09699e"
        );
    }

    fn creds(token: Option<&str>) -> StaticCredentials {
        StaticCredentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: token.map(str::to_owned),
        }
    }

    #[test]
    fn prefix_form_scopes_the_key_and_signs_its_own_policy() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_451_347_200);
        let policy = FormPolicy {
            bucket: "b".into(),
            key: KeyRule::Prefix("p/namespaces/x/datastores/d/objects/".into()),
            max_bytes: MAX_POST_OBJECT,
            expires: expiry(now, Duration::from_secs(3600)),
        };
        let form = build(
            "http://127.0.0.1:9000/b",
            &policy,
            &creds(Some("tok")),
            "us-east-1",
            now,
        );
        assert!(
            !form.fields.contains_key(KEY_FIELD),
            "the client names each object"
        );
        assert_eq!(
            form.fields["x-amz-credential"],
            "AKIAIOSFODNN7EXAMPLE/20151229/us-east-1/s3/aws4_request"
        );
        assert_eq!(form.fields["x-amz-date"], "20151229T000000Z");
        assert_eq!(form.fields["x-amz-security-token"], "tok");
        let doc = aws_smithy_types::base64::decode(&form.fields["policy"]).expect("base64");
        let doc: serde_json::Value = serde_json::from_slice(&doc).expect("json");
        assert_eq!(doc["expiration"], "2015-12-29T01:00:00.000Z");
        let conditions = doc["conditions"].as_array().expect("conditions");
        for want in [
            serde_json::json!(["eq", "$bucket", "b"]),
            serde_json::json!([
                "starts-with",
                "$key",
                "p/namespaces/x/datastores/d/objects/"
            ]),
            serde_json::json!(["content-length-range", 0, MAX_POST_OBJECT]),
            serde_json::json!(["eq", "$x-amz-security-token", "tok"]),
            serde_json::json!(["eq", "$x-amz-credential", form.fields["x-amz-credential"]]),
        ] {
            assert!(conditions.contains(&want), "{want} missing from {doc}");
        }
        // Every field but the signature and policy is covered by a condition.
        for name in form
            .fields
            .keys()
            .filter(|n| !matches!(n.as_str(), "policy" | "x-amz-signature"))
        {
            assert!(
                conditions.iter().any(|c| c[1] == format!("${name}")),
                "{name} not in the policy"
            );
        }
        assert_eq!(
            form.fields["x-amz-signature"],
            sign_policy(
                &form.fields["policy"],
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                now,
                "us-east-1"
            )
        );
        assert_ne!(
            form.fields["x-amz-signature"],
            sign_policy(&form.fields["policy"], "another secret", now, "us-east-1")
        );
    }

    #[test]
    fn exact_form_fills_the_key() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let policy = FormPolicy {
            bucket: "b".into(),
            key: KeyRule::Exact("k/manifest".into()),
            max_bytes: 10,
            expires: now,
        };
        let form = build("u", &policy, &creds(None), "eu-west-1", now);
        assert_eq!(form.fields[KEY_FIELD], "k/manifest");
        assert!(!form.fields.contains_key("x-amz-security-token"));
        let doc = String::from_utf8(
            aws_smithy_types::base64::decode(&form.fields["policy"]).expect("b64"),
        )
        .expect("utf8");
        assert!(doc.contains(r#"["eq","$key","k/manifest"]"#), "{doc}");
    }

    #[test]
    fn urls() {
        assert_eq!(
            bucket_url(Some("http://127.0.0.1:9000/"), "us-east-1", "b"),
            "http://127.0.0.1:9000/b"
        );
        assert_eq!(
            bucket_url(None, "eu-west-1", "b"),
            "https://b.s3.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            bucket_url(None, "eu-west-1", "a.b"),
            "https://s3.eu-west-1.amazonaws.com/a.b"
        );
    }
}
