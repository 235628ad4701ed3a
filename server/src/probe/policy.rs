//! Which addresses health probes may connect to.
//!
//! A `register` token chooses the endpoint its persistent instance is probed
//! at, and any `read` token sees the verdict. Without a policy the daemon
//! would connect anywhere on a client's behalf — cloud metadata services,
//! its own listener, etcd — and report what it found: a port scanner and
//! status oracle from the daemon's network position.
//!
//! The policy is checked on the addresses a target *resolves to*, at every
//! probe (a name that resolves to an allowed address today may not
//! tomorrow), and on literal IP endpoints at registration, where a denied
//! one is refused with the setting to change.
//!
//! Order of the rules, first match wins:
//! 1. the daemon's own listener and its etcd endpoints: always denied;
//! 2. `probes.allow` networks: allowed;
//! 3. `probes.deny` networks, link-local (169.254/16, fe80::/10, which
//!    hold the cloud metadata services), unspecified, multicast and
//!    broadcast addresses: denied;
//! 4. loopback and private networks (127/8, ::1, 10/8, 172.16/12,
//!    192.168/16, 100.64/10, fc00::/7): allowed unless
//!    `probes.deny_private = true` (developer machines run everything on
//!    loopback; the Helm chart turns it on);
//! 5. everything else: allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::Deserialize;

/// An IP network in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or a single
/// address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    prefix: u8,
}

impl Network {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        Self {
            base: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Self {
        let [a, b, c, d, e, f, g, h] = segments;
        Self {
            base: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    /// Whether `ip` is inside this network (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.base, ip) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(base) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(base), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(base) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let base: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { base, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Always denied unless listed in `probes.allow`: link-local (the cloud
/// metadata services live there), unspecified, multicast, broadcast.
const DENIED_BY_DEFAULT: &[Network] = &[
    Network::v4(169, 254, 0, 0, 16),
    Network::v4(0, 0, 0, 0, 8),
    Network::v4(224, 0, 0, 0, 4),
    Network::v4(255, 255, 255, 255, 32),
    Network::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    Network::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
    Network::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
    // AWS's IPv6 metadata endpoint (fd00:ec2::254), inside fc00::/7.
    Network::v6([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254], 128),
];

/// Loopback and private networks: allowed unless `probes.deny_private`.
const PRIVATE: &[Network] = &[
    Network::v4(127, 0, 0, 0, 8),
    Network::v4(10, 0, 0, 0, 8),
    Network::v4(172, 16, 0, 0, 12),
    Network::v4(192, 168, 0, 0, 16),
    Network::v4(100, 64, 0, 0, 10),
    Network::v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
    Network::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
];

/// The `[probes]` table of the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbesFile {
    /// Networks probes may always reach (beats every deny but the daemon's
    /// own listener and etcd).
    pub allow: Option<Vec<String>>,
    /// Networks probes may never reach, on top of the defaults.
    pub deny: Option<Vec<String>>,
    /// Deny loopback and private networks too.
    pub deny_private: Option<bool>,
}

/// Where probes may connect (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbePolicy {
    /// `probes.allow`.
    pub allow: Vec<Network>,
    /// `probes.deny`.
    pub deny: Vec<Network>,
    /// `probes.deny_private`.
    pub deny_private: bool,
    /// The daemon's own listener and etcd endpoints.
    own: Vec<SocketAddr>,
    /// Ports of the daemon's own listeners bound to every address: denied
    /// on any loopback or private address.
    own_ports: Vec<u16>,
}

/// Why a probe may not connect to an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The address is the daemon's own listener or an etcd endpoint.
    #[error(
        "{0} is stratad's own listener or one of its etcd endpoints; probes never connect there"
    )]
    Own(SocketAddr),
    /// The address is in a denied network.
    #[error(
        "{addr} is in {network}, which health probes may not reach (probes.allow lists networks \
         they may)"
    )]
    Network {
        /// The address.
        addr: SocketAddr,
        /// The network that denies it.
        network: Network,
    },
    /// The address is loopback or private and `probes.deny_private` is on.
    #[error(
        "{addr} is a loopback or private address and probes.deny_private is on (probes.allow \
         lists networks probes may reach)"
    )]
    Private {
        /// The address.
        addr: SocketAddr,
    },
}

impl ProbePolicy {
    /// The policy of the `[probes]` tables of the sources, later ones
    /// winning; errors name the setting and its source.
    pub(crate) fn from_layers(
        layers: &[(ProbesFile, String)],
    ) -> Result<Self, crate::settings_error::SettingsError> {
        let mut out = Self::default();
        let networks = |setting: &'static str, source: &str, list: &[String]| {
            list.iter()
                .map(|n| {
                    n.parse::<Network>().map_err(|message| {
                        crate::settings_error::SettingsError::Invalid {
                            setting,
                            source_name: source.to_owned(),
                            message,
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        for (layer, source) in layers {
            if let Some(list) = &layer.allow {
                out.allow = networks("probes.allow", source, list)?;
            }
            if let Some(list) = &layer.deny {
                out.deny = networks("probes.deny", source, list)?;
            }
            if let Some(v) = layer.deny_private {
                out.deny_private = v;
            }
        }
        Ok(out)
    }

    /// Also denies `addr`, one of the daemon's own listeners or etcd
    /// endpoints. A listener on every address (`0.0.0.0:7070`) denies its
    /// port on every loopback and private address.
    pub fn deny_own(&mut self, addr: SocketAddr) {
        if addr.ip().is_unspecified() {
            self.own_ports.push(addr.port());
        } else {
            self.own
                .push(SocketAddr::new(canonical(addr.ip()), addr.port()));
        }
    }

    /// Whether a probe may connect to `addr`.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Denied> {
        let ip = canonical(addr.ip());
        let private = PRIVATE.iter().any(|n| n.contains(ip));
        if self.own.contains(&SocketAddr::new(ip, addr.port()))
            || (private && self.own_ports.contains(&addr.port()))
        {
            return Err(Denied::Own(addr));
        }
        if self.allow.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        if let Some(network) = self
            .deny
            .iter()
            .chain(DENIED_BY_DEFAULT)
            .find(|n| n.contains(ip))
        {
            return Err(Denied::Network {
                addr,
                network: *network,
            });
        }
        if private && self.deny_private {
            return Err(Denied::Private { addr });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let n: Network = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped");
        let one: Network = "fd00::1".parse().unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("example.com".parse::<Network>().is_err());
    }

    /// The threat model's "SSRF through probes" (docs/security.md): metadata, link-local and the
    /// daemon's own addresses are denied by default; loopback and private
    /// networks are allowed until `deny_private`.
    #[test]
    fn defaults_deny_metadata_and_own_addresses_finding_4() {
        let mut policy = ProbePolicy::default();
        policy.deny_own(addr("127.0.0.1:7070"));
        policy.deny_own(addr("127.0.0.1:2379"));
        assert!(matches!(
            policy.check(addr("169.254.169.254:80")),
            Err(Denied::Network { .. })
        ));
        assert!(policy.check(addr("[fe80::1]:80")).is_err());
        assert!(policy.check(addr("[fd00:ec2::254]:80")).is_err());
        assert!(policy.check(addr("[::ffff:169.254.169.254]:80")).is_err());
        assert!(policy.check(addr("0.0.0.0:80")).is_err());
        assert_eq!(
            policy.check(addr("127.0.0.1:7070")),
            Err(Denied::Own(addr("127.0.0.1:7070")))
        );
        assert!(policy.check(addr("127.0.0.1:2379")).is_err());
        assert_eq!(policy.check(addr("127.0.0.1:8080")), Ok(()));
        assert_eq!(policy.check(addr("10.0.0.7:7000")), Ok(()));
        assert_eq!(policy.check(addr("203.0.113.9:7000")), Ok(()));

        policy.deny_private = true;
        assert!(matches!(
            policy.check(addr("10.0.0.7:7000")),
            Err(Denied::Private { .. })
        ));
        assert!(policy.check(addr("[::1]:8080")).is_err());
        policy.allow = vec!["10.0.0.0/24".parse().unwrap()];
        assert_eq!(policy.check(addr("10.0.0.7:7000")), Ok(()));
        assert!(policy.check(addr("10.0.1.7:7000")).is_err());
        // The allow list never opens the daemon's own listener.
        policy.allow.push("127.0.0.0/8".parse().unwrap());
        assert!(policy.check(addr("127.0.0.1:7070")).is_err());
        // Nor does it matter for a listener on every address: its port is
        // denied on loopback.
        let mut wildcard = ProbePolicy::default();
        wildcard.deny_own(addr("0.0.0.0:7070"));
        assert!(wildcard.check(addr("127.0.0.1:7070")).is_err());
        assert_eq!(wildcard.check(addr("127.0.0.1:7071")), Ok(()));
    }
}
