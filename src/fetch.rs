//! Fetches the `http(s)://` images roster uses as avatars (identity profiles and
//! `agents.avatar`), bounded in time and size and checked to be an image by its bytes, so
//! a slow, huge or wrong answer costs a bounded wait and is reported, never uploaded.

use std::time::Duration;

/// The URL without credentials (`user:password@`), query or fragment, which may carry
/// signatures or tokens: what may be logged.
pub fn redact_url(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    // The authority runs from after `://` to the next `/`; credentials end at its last `@`.
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

/// An avatar fetched and checked to be an image.
pub struct Avatar {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub filename: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the avatar server answered HTTP {0}")]
    Status(u16),
    #[error("the avatar is larger than lifecycle.avatar_max_bytes ({max} bytes)")]
    TooLarge { max: usize },
    #[error(
        "the avatar is not a PNG, JPEG, GIF, WebP or AVIF image (content type {content_type:?})"
    )]
    NotAnImage { content_type: String },
    #[error("the avatar server did not answer within {0:?} (lifecycle.avatar_fetch_timeout)")]
    Timeout(Duration),
    #[error("cannot fetch the avatar: {0}")]
    Http(String),
}

/// Fetches `http(s)://` avatars with a timeout and a size limit.
pub struct AvatarFetcher {
    http: reqwest::Client,
    max_bytes: usize,
    timeout: Duration,
}

impl AvatarFetcher {
    pub fn new(timeout: Duration, max_bytes: usize) -> AvatarFetcher {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("roster/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a TLS backend is compiled in");
        AvatarFetcher {
            http,
            max_bytes,
            timeout,
        }
    }

    pub async fn fetch(&self, url: &str) -> Result<Avatar, FetchError> {
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                FetchError::Timeout(self.timeout)
            } else {
                FetchError::Http(crate::error_chain(&e.without_url()))
            }
        };
        let mut response = self.http.get(url).send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let too_large = FetchError::TooLarge {
            max: self.max_bytes,
        };
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(too_large);
        }
        let declared = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if bytes.len() + chunk.len() > self.max_bytes {
                return Err(too_large);
            }
            bytes.extend_from_slice(&chunk);
        }
        // The bytes decide; a declared type that is not an image is refused as well.
        let declared_ok = declared.is_empty()
            || declared.starts_with("image/")
            || declared.starts_with("application/octet-stream");
        let content_type =
            sniff_image(&bytes)
                .filter(|_| declared_ok)
                .ok_or(FetchError::NotAnImage {
                    content_type: declared,
                })?;
        let filename = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.path_segments()?.next_back().map(str::to_owned))
            .filter(|name| !name.is_empty());
        Ok(Avatar {
            bytes,
            content_type,
            filename,
        })
    }
}

/// The image type `bytes` start with, for the formats Matrix clients render.
fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.len() >= 12
        && &bytes[4..8] == b"ftyp"
        && (&bytes[8..12] == b"avif" || &bytes[8..12] == b"avis")
    {
        Some("image/avif")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_recognise_images_by_their_bytes() {
        assert_eq!(sniff_image(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(sniff_image(b"\xff\xd8\xff\xe0"), Some("image/jpeg"));
        assert_eq!(sniff_image(b"GIF89a..."), Some("image/gif"));
        assert_eq!(sniff_image(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff_image(b"\0\0\0\x1cftypavif"), Some("image/avif"));
        assert_eq!(sniff_image(b"<svg xmlns=...>"), None);
        assert_eq!(sniff_image(b"<html>"), None);
        assert_eq!(sniff_image(b""), None);
    }

    #[test]
    fn should_drop_credentials_query_and_fragment_from_logged_urls() {
        assert_eq!(
            redact_url("https://cdn.example/a.png?sig=secret#x"),
            "https://cdn.example/a.png"
        );
        assert_eq!(redact_url("http://h/a.png"), "http://h/a.png");
        assert_eq!(
            redact_url("https://user:pa@ss@cdn.example:8443/a@b.png?x"),
            "https://cdn.example:8443/a@b.png"
        );
        assert_eq!(
            redact_url("https://token@cdn.example"),
            "https://cdn.example"
        );
    }
}
