//! Writing IP addresses without the formatting machinery: an address is written on every
//! request (a `peer_ip` key, the sidecar's `X-Forwarded-For`), and `Display` for
//! `Ipv4Addr` costs more than the rest of either.

use std::net::IpAddr;

/// Appends `ip` to `out`, exactly as its `Display` writes it.
///
/// ```
/// let mut out = String::from("for=");
/// keyward_core::ip::push_ip(&mut out, "192.0.2.10".parse().unwrap());
/// assert_eq!(out, "for=192.0.2.10");
/// ```
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let mut every_octet = (0..=255u8)
            .map(|o| IpAddr::from([o, 255 - o, o / 2, 9]))
            .collect::<Vec<_>>();
        every_octet.extend(
            [
                "::1",
                "2001:db8::8a2e:370:7334",
                "::ffff:10.0.0.1",
                "0.0.0.0",
            ]
            .map(|ip| ip.parse::<IpAddr>().unwrap()),
        );
        for ip in every_octet {
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }
}
