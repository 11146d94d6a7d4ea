//! Fetches the `http(s)://` images roster uses as avatars (identity profiles and
//! `agents.avatar`), bounded in time and size and checked to be an image by its bytes, so
//! a slow, huge or wrong answer costs a bounded wait and is reported, never uploaded.
//!
//! Identity avatars are URLs anyone with a Nova profile chooses, so by default they may not
//! point inside the network roster runs in (loopback, private, link-local, cloud metadata):
//! host names are resolved by roster and only public addresses are connected to, address
//! literals are checked before the request and at every redirect.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
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
    #[error(
        "the avatar's host {host} is a private, loopback or link-local address; set \
         lifecycle.avatar_allow_private: true if avatars are served from inside the network"
    )]
    PrivateAddress { host: String },
    #[error("cannot fetch the avatar: {0}")]
    Http(String),
}

/// Which addresses a fetcher may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Any address: for URLs the operator configured.
    Any,
    /// Only public addresses: for URLs users choose.
    PublicOnly,
}

/// A host that is, or resolves only to, addresses roster may not fetch from.
#[derive(Debug, thiserror::Error)]
#[error("{host} is not a public address")]
struct Refused {
    host: String,
}

/// Whether `ip` is an address on the public internet: not loopback, private, shared
/// (carrier-grade NAT), link-local (cloud metadata lives there), multicast, reserved or
/// unspecified; IPv6 addresses that embed an IPv4 one are judged by it.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                is_public_v4(Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            if s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001 {
                return false; // local-use NAT64 (RFC 8215): to whatever the network says
            }
            if s[0] == 0x0064 && s[1] == 0xff9b {
                return embedded(s[6], s[7]); // NAT64
            }
            if s[0] == 0x2002 {
                return embedded(s[1], s[2]); // 6to4
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || s[..6] == [0; 6] // IPv4-compatible (deprecated)
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] & 0xfff0) == 0x3ff0 // documentation (RFC 9637)
                || s[..4] == [0x0100, 0, 0, 0] // discard-only
                || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0)) // benchmarking
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (b & 0xc0) == 64) // shared address space (carrier-grade NAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking
        || a >= 240) // reserved
}

/// Refuses `url` when its host is an address literal that is not public. Host names are
/// checked when they are resolved ([`PublicResolver`]).
fn check_literal(url: &reqwest::Url) -> Result<(), Refused> {
    // The URL parser has already normalised address literals (`0x7f.1` is `127.0.0.1`).
    let host = url.host_str().unwrap_or_default();
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    if is_public(ip) {
        Ok(())
    } else {
        Err(Refused {
            host: ip.to_string(),
        })
    }
}

/// Refuses `url` when its host is an address literal that is not public, or one of the
/// `proxies`: their hosts are exempt from the resolver's check only so that roster can
/// reach them, and a URL naming one can go there directly (an `http://` URL while only
/// `HTTPS_PROXY` is set, a host in `NO_PROXY`).
fn check_target(url: &reqwest::Url, proxies: &[String]) -> Result<(), Refused> {
    check_literal(url)?;
    let host = url.host_str().unwrap_or_default();
    if proxies.iter().any(|p| p.eq_ignore_ascii_case(host)) {
        return Err(Refused {
            host: format!("{host} (a configured proxy)"),
        });
    }
    Ok(())
}

/// Resolves host names to their public addresses only. The proxies reqwest takes from the
/// environment are exempt: they are the operator's, and behind one the proxy resolves the
/// avatar's host, so it is the proxy that must refuse private targets.
struct PublicResolver {
    proxies: Arc<[String]>,
}

/// The hosts of the proxies reqwest takes from the environment, lower-cased.
fn proxy_hosts_from_environment() -> Vec<String> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .filter_map(|name| std::env::var(name).ok())
    .filter_map(|value| {
        // reqwest takes `host:port` without a scheme as http://.
        let value = if value.contains("://") {
            value
        } else {
            format!("http://{value}")
        };
        reqwest::Url::parse(&value)
            .ok()?
            .host_str()
            .map(str::to_ascii_lowercase)
    })
    .collect()
}

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let exempt = self.proxies.iter().any(|p| p.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| exempt || is_public(a.ip()))
                .collect();
            if public.is_empty() {
                return Err(Box::new(Refused { host }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Redirects followed before giving up, as browsers and reqwest's default do far more of.
const MAX_REDIRECTS: usize = 3;

/// Fetches `http(s)://` avatars with a timeout and a size limit.
pub struct AvatarFetcher {
    http: reqwest::Client,
    max_bytes: usize,
    timeout: Duration,
    reach: Reach,
    /// Hosts of the proxies reqwest uses: never an avatar's host (see [`check_target`]).
    proxies: Arc<[String]>,
}

/// The refusal somewhere in `error`'s causes (from the resolver or the redirect policy).
fn find_refused(error: &reqwest::Error) -> Option<&Refused> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = cause {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        cause = e.source();
    }
    None
}

impl AvatarFetcher {
    pub fn new(timeout: Duration, max_bytes: usize, reach: Reach) -> AvatarFetcher {
        AvatarFetcher::with_proxies(timeout, max_bytes, reach, proxy_hosts_from_environment())
    }

    /// A fetcher that takes `proxies` (host names) for the proxies reqwest uses.
    fn with_proxies(
        timeout: Duration,
        max_bytes: usize,
        reach: Reach,
        proxies: Vec<String>,
    ) -> AvatarFetcher {
        let proxies: Arc<[String]> = proxies.into();
        let allowed = proxies.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            // `previous` holds the first URL too, which is not a redirect.
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            if reach == Reach::PublicOnly
                && let Err(refused) = check_target(attempt.url(), &allowed)
            {
                return attempt.error(refused);
            }
            attempt.follow()
        });
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(redirects)
            .user_agent(concat!("roster/", env!("CARGO_PKG_VERSION")));
        if reach == Reach::PublicOnly {
            builder = builder.dns_resolver(Arc::new(PublicResolver {
                proxies: proxies.clone(),
            }));
        }
        let http = builder.build().expect("a TLS backend is compiled in");
        AvatarFetcher {
            http,
            max_bytes,
            timeout,
            reach,
            proxies,
        }
    }

    pub async fn fetch(&self, url: &str) -> Result<Avatar, FetchError> {
        let transport = |e: reqwest::Error| {
            if let Some(refused) = find_refused(&e) {
                FetchError::PrivateAddress {
                    host: refused.host.clone(),
                }
            } else if e.is_timeout() {
                FetchError::Timeout(self.timeout)
            } else {
                FetchError::Http(crate::error_chain(&e.without_url()))
            }
        };
        let parsed =
            reqwest::Url::parse(url).map_err(|e| FetchError::Http(format!("not a URL: {e}")))?;
        if self.reach == Reach::PublicOnly {
            check_target(&parsed, &self.proxies)
                .map_err(|refused| FetchError::PrivateAddress { host: refused.host })?;
        }
        let mut response = self.http.get(parsed).send().await.map_err(transport)?;
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
        // The bytes decide; a declared type that is not an image is refused as well (media
        // types are case-insensitive).
        let media_type = declared.trim_start().to_ascii_lowercase();
        let declared_ok = media_type.is_empty()
            || media_type.starts_with("image/")
            || media_type.starts_with("application/octet-stream");
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

    #[test]
    fn should_tell_public_addresses_from_inside_ones() {
        for inside in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "2001:db8::1",
            "64:ff9b:1::a00:1",
            "64:ff9b:1:a00:0:100:101:101",
            "100::1",
            "2001:2::1",
            "3fff::1",
        ] {
            assert!(
                !is_public(inside.parse().unwrap()),
                "{inside} is not public"
            );
        }
        for public in [
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::101:101",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public} is public");
        }
    }

    #[test]
    fn should_refuse_address_literals_that_are_not_public() {
        for url in [
            "http://127.0.0.1/a.png",
            "http://[::1]:8080/a.png",
            "http://0x7f.1/a.png",
            "http://2130706433/a.png",
            "http://169.254.169.254/latest/meta-data",
            "https://[::ffff:10.0.0.1]/a.png",
        ] {
            let parsed = reqwest::Url::parse(url).unwrap();
            assert!(check_literal(&parsed).is_err(), "{url} is refused");
        }
        for url in ["https://1.1.1.1/a.png", "https://cdn.example/a.png"] {
            let parsed = reqwest::Url::parse(url).unwrap();
            assert!(
                check_literal(&parsed).is_ok(),
                "{url} is left to the resolver"
            );
        }
    }

    /// Serves a PNG at `/a.png` on 127.0.0.1; returns the port and a count of requests.
    async fn serve_image_on_loopback() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let app = axum::Router::new().route(
            "/a.png",
            axum::routing::get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async {
                    (
                        [("content-type", "image/png")],
                        b"\x89PNG\r\n\x1a\n....".as_slice(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (port, served)
    }

    /// The proxy's own host is exempt from the check only to reach the proxy: an avatar
    /// URL naming it (an `http://` one while only `HTTPS_PROXY` is set, or a host in
    /// `NO_PROXY`, goes there directly) is refused like any inside address, at the first
    /// request and at a redirect.
    #[tokio::test]
    async fn should_refuse_an_avatar_on_the_proxys_own_host() {
        use std::sync::atomic::Ordering;
        let (port, served) = serve_image_on_loopback().await;

        // No proxy is configured for reqwest here: the request would go straight there.
        let guarded = AvatarFetcher::with_proxies(
            Duration::from_secs(30),
            1024,
            Reach::PublicOnly,
            vec!["localhost".into()],
        );
        match guarded
            .fetch(&format!("http://LocalHost:{port}/a.png"))
            .await
        {
            Err(FetchError::PrivateAddress { host }) => {
                assert!(host.contains("localhost"), "{host}")
            }
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("fetched from the proxy's host"),
        }
        assert_eq!(served.load(Ordering::SeqCst), 0, "nothing reached it");
    }

    /// An image served on loopback: refused to a public-only fetcher whether named by
    /// address or by a name that resolves there, and fetched by one that may reach it.
    #[tokio::test]
    async fn should_fetch_from_inside_addresses_only_when_allowed() {
        use std::sync::atomic::Ordering;
        let (port, served) = serve_image_on_loopback().await;
        let timeout = Duration::from_secs(30);

        let guarded = AvatarFetcher::new(timeout, 1024, Reach::PublicOnly);
        for url in [
            format!("http://127.0.0.1:{port}/a.png"),
            format!("http://localhost:{port}/a.png"),
        ] {
            match guarded.fetch(&url).await {
                Err(FetchError::PrivateAddress { host }) => {
                    assert!(host == "127.0.0.1" || host == "localhost", "{host}");
                }
                Err(other) => panic!("{url}: refused for another reason: {other}"),
                Ok(_) => panic!("{url}: fetched from loopback"),
            }
        }
        assert_eq!(
            served.load(Ordering::SeqCst),
            0,
            "no request reached the server"
        );

        let open = AvatarFetcher::new(timeout, 1024, Reach::Any);
        let avatar = open
            .fetch(&format!("http://localhost:{port}/a.png"))
            .await
            .unwrap();
        assert_eq!(avatar.content_type, "image/png");
        assert_eq!(served.load(Ordering::SeqCst), 1);
    }

    /// Media types are case-insensitive (RFC 9110): `Image/PNG` declares an image, and
    /// `Text/HTML` does not.
    #[tokio::test]
    async fn should_read_the_declared_type_whatever_its_case() {
        let app = axum::Router::new().route(
            "/{declared}",
            axum::routing::get(
                |axum::extract::Path(declared): axum::extract::Path<String>| async move {
                    (
                        [("content-type", declared.replace('_', "/"))],
                        b"\x89PNG\r\n\x1a\n....".as_slice(),
                    )
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let fetcher = AvatarFetcher::new(Duration::from_secs(30), 1024, Reach::Any);
        let avatar = fetcher.fetch(&format!("http://{addr}/Image_PNG")).await;
        assert_eq!(avatar.unwrap().content_type, "image/png");
        let html = fetcher.fetch(&format!("http://{addr}/Text_HTML")).await;
        assert!(matches!(html, Err(FetchError::NotAnImage { .. })));
    }
}
