//! The HTTP client behind every outbound request (the remote judge, `bench serve`).
//!
//! reqwest is built with rustls but without a crypto provider of its own: the provider is
//! *ring*, which `hf-hub`'s `ureq` already builds, so the C build of a second one
//! (aws-lc) is not compiled. reqwest panics when it builds a TLS client and no
//! provider is installed, so every client comes from [`client_builder`], which installs
//! ring first.

use std::sync::Once;

/// A reqwest builder with the process-wide rustls provider (ring) installed. Installing is
/// idempotent; a provider installed earlier by the embedding program is kept.
pub fn client_builder() -> reqwest::ClientBuilder {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err means another provider is already the default: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

#[cfg(test)]
mod tests {
    #[test]
    fn builds_a_tls_client_twice() {
        assert!(super::client_builder().build().is_ok());
        assert!(super::client_builder().https_only(true).build().is_ok());
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
