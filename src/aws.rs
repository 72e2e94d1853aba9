//! The HTTP client of every AWS SDK client in this crate (S3 stores, FSx).
//!
//! The SDKs' default client brings its own TLS crypto library (aws-lc-rs, a large C build);
//! kube's client already uses rustls with ring. Handing the SDKs a client on that same stack
//! leaves one crypto library to build, audit and configure. Everything else (connection pool,
//! timeouts from the SDK config, proxies) is the SDK's own client builder.

use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::http::SharedHttpClient;

/// An HTTPS (and plain HTTP) client for `aws_config::ConfigLoader::http_client`.
pub fn http_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}
