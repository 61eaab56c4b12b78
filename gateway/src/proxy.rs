//! `server.trusted_proxies`: whose `X-Forwarded-For` / `Forwarded` headers are believed.
//!
//! A request whose TCP peer is in one of the CIDRs came through a proxy (a load
//! balancer, nginx) that says who its client was. The client is then the rightmost
//! address of `X-Forwarded-For` (every header line, in order) that is not itself a
//! trusted proxy — each proxy appends the address it saw, so the addresses left of the
//! first untrusted one are whatever the client chose to send. Without
//! `X-Forwarded-For`, the `for=` parameters of `Forwarded` (RFC 7239) are read the same
//! way. A peer outside the CIDRs (the default: none are trusted) is the client, and its
//! headers are ignored, so a client cannot choose its own rate-limit bucket.

use std::fmt;
use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// CIDRs (or single addresses) of the proxies in front of Herald.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses `"10.0.0.0/8"`, `"::1/128"` or a bare address (`"10.1.2.3"`).
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<TrustedProxies, String> {
        let mut nets = Vec::new();
        for item in items {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let net = match item.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => match item.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip.to_canonical()),
                    Err(_) => {
                        return Err(format!(
                            "`{item}` is not a CIDR (e.g. 10.0.0.0/8) or an IP address"
                        ))
                    }
                },
            };
            nets.push(net);
        }
        Ok(TrustedProxies(nets))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let xff: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        if !xff.is_empty() {
            return self.rightmost_untrusted(peer, xff.iter().map(|h| parse_xff_hop(h)));
        }
        let forwarded: Vec<Option<IpAddr>> = headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(forwarded_for)
            .collect();
        if !forwarded.is_empty() {
            return self.rightmost_untrusted(peer, forwarded.into_iter());
        }
        peer
    }

    /// Walks the hops from the right: the first untrusted one is the client. An
    /// unreadable hop stops the walk at the last address known to be true; when every
    /// hop is a trusted proxy, the leftmost is the client.
    fn rightmost_untrusted(
        &self,
        peer: IpAddr,
        hops: impl DoubleEndedIterator<Item = Option<IpAddr>>,
    ) -> IpAddr {
        let mut client = peer;
        for hop in hops.rev() {
            match hop {
                Some(ip) => {
                    client = ip;
                    if !self.contains(ip) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:5678`.
fn parse_xff_hop(hop: &str) -> Option<IpAddr> {
    parse_node(hop.trim())
}

/// The `for=` of one `Forwarded` element (`for=1.2.3.4;proto=https`), if it has one;
/// `Some(None)` when it is there but not an address (`unknown`, `_hidden`).
fn forwarded_for(element: &str) -> Option<Option<IpAddr>> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_node(value.trim().trim_matches('"')))
    })
}

fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    }
    let (ip, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|n| n.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for TrustedProxies {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|n| n.to_string()))
    }
}

/// A list of strings (TOML) or one comma-separated string (the environment:
/// `HERALD_SERVER__TRUSTED_PROXIES=10.0.0.0/8,192.168.1.7`).
impl<'de> Deserialize<'de> for TrustedProxies {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TrustedProxies;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of CIDRs, or one comma-separated string of them")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<TrustedProxies, E> {
                TrustedProxies::parse(v.split(',')).map_err(E::custom)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TrustedProxies, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                TrustedProxies::parse(items.iter().map(String::as_str)).map_err(de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parses_cidrs_addresses_and_refuses_the_rest() {
        let t = TrustedProxies::parse(["10.0.0.0/8", " 192.168.1.7 ", "::1/128", ""]).unwrap();
        assert!(t.contains(ip("10.9.9.9")));
        assert!(t.contains(ip("192.168.1.7")));
        assert!(!t.contains(ip("192.168.1.8")));
        assert!(t.contains(ip("::1")));
        assert!(t.contains(ip("::ffff:10.1.1.1")), "IPv4-mapped IPv6 peers");
        let err = TrustedProxies::parse(["10.0.0.0/8", "lb.internal"]).unwrap_err();
        assert!(err.contains("`lb.internal` is not a CIDR"), "{err}");
        assert!(TrustedProxies::parse(["10.0.0.0/33"]).is_err());
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_send() {
        let t = TrustedProxies::parse(["10.0.0.0/8"]).unwrap();
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(t.client_ip(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        assert_eq!(
            TrustedProxies::default().client_ip(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let t = TrustedProxies::parse(["10.0.0.0/8"]).unwrap();
        let peer = ip("10.0.0.1");
        let cases: &[(&[(&'static str, &str)], &str)] = &[
            (&[("x-forwarded-for", "203.0.113.9")], "203.0.113.9"),
            // The client forged the leftmost hop; the proxies' additions are true.
            (
                &[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.2")],
                "203.0.113.9",
            ),
            (
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-for", "203.0.113.9:4321"),
                ],
                "203.0.113.9",
            ),
            (&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")], "10.0.0.3"),
            (&[("x-forwarded-for", "garbage, 10.0.0.2")], "10.0.0.2"),
            (&[("x-forwarded-for", "[2001:db8::7]:80")], "2001:db8::7"),
            (
                &[(
                    "forwarded",
                    "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https",
                )],
                "2001:db8::7",
            ),
            (
                &[("forwarded", "proto=https;For=203.0.113.9")],
                "203.0.113.9",
            ),
            (&[("forwarded", "for=unknown")], "10.0.0.1"),
            // X-Forwarded-For wins over Forwarded.
            (
                &[
                    ("forwarded", "for=198.51.100.1"),
                    ("x-forwarded-for", "203.0.113.9"),
                ],
                "203.0.113.9",
            ),
            (&[], "10.0.0.1"),
        ];
        for (h, want) in cases {
            assert_eq!(t.client_ip(peer, &headers(h)), ip(want), "{h:?}");
        }
    }

    #[test]
    fn deserializes_a_list_or_a_comma_separated_string() {
        #[derive(Deserialize)]
        struct S {
            p: TrustedProxies,
        }
        let a: S = toml::from_str("p = [\"10.0.0.0/8\", \"127.0.0.1\"]").unwrap();
        let b: S = toml::from_str("p = \"10.0.0.0/8, 127.0.0.1\"").unwrap();
        assert_eq!(a.p, b.p);
        assert_eq!(a.p.to_string(), "10.0.0.0/8,127.0.0.1/32");
        let err = toml::from_str::<S>("p = [\"nope\"]")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`nope` is not a CIDR"), "{err}");
    }
}
