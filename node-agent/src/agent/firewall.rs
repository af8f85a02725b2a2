//! Firewall rules for the MLX ring's ports, for the groups running now.
//!
//! MLX's ring backend is plain TCP with no authentication: whoever connects
//! to a rank's ring port first while the group forms takes a peer's place,
//! and can then read hidden states and add values into `all_sum`. A rank
//! listens only on its own address from the hostfile (its node's advertised
//! address, never every interface), and only while the group forms; these
//! rules narrow it further to the group's peers.
//!
//! The agent writes each running rank's ring facts into its shard's state
//! directory (`ring-peers.json`, removed when the rank's worker ends), and
//! `tandem-agent firewall-rules` turns every such file into one ruleset:
//! nftables on Linux, a pf anchor on macOS. Loading it is the operator's
//! step (it needs root); docs/agent.md says how, and how to keep it
//! current.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state_dir;

/// The file, in a shard's state directory, that says which ring port this
/// node's rank listens on and who may connect to it.
pub const RING_PEERS_FILE: &str = "ring-peers.json";

/// One rank's ring port and its group's peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RingPeers {
    /// `namespace/shard`, for the rule's comment.
    pub shard: String,
    /// The group's epoch.
    pub epoch: i64,
    /// This node's rank in the group.
    pub rank: i32,
    /// Every rank's ring address (`ip:port`), by rank, this one included.
    pub addresses: Vec<String>,
}

impl RingPeers {
    /// The address this rank listens on, and the other ranks' hosts.
    fn split(&self) -> Result<(SocketAddr, BTreeSet<IpAddr>), String> {
        let parse = |a: &String| {
            a.parse::<SocketAddr>()
                .map_err(|_| format!("{}: `{a}` is not an ip:port address", self.shard))
        };
        let own = usize::try_from(self.rank)
            .ok()
            .and_then(|r| self.addresses.get(r))
            .ok_or_else(|| format!("{}: rank {} has no address", self.shard, self.rank))
            .and_then(parse)?;
        // The other ranks' hosts; this host too when another rank of the
        // group runs on it.
        let mut peers = BTreeSet::new();
        for (i, a) in self.addresses.iter().enumerate() {
            if i64::try_from(i).ok() != Some(i64::from(self.rank)) {
                peers.insert(parse(a)?.ip());
            }
        }
        Ok((own, peers))
    }
}

/// Writes `peers` into the shard's state directory `dir` (replaced, never
/// through a link).
pub fn write(dir: &Path, peers: &RingPeers) -> std::io::Result<PathBuf> {
    let path = dir.join(RING_PEERS_FILE);
    let text = serde_json::to_vec_pretty(peers).map_err(std::io::Error::other)?;
    state_dir::write_file(&path, &text)?;
    Ok(path)
}

/// Every rank's ring facts under the agent's state directory `root`, by
/// shard. Files that cannot be read are reported, not skipped silently.
pub fn collect(root: &Path) -> Result<Vec<RingPeers>, String> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| format!("reading the state directory {}: {e}", root.display()))?;
    let mut all = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path().join(RING_PEERS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => all.push(
                serde_json::from_slice::<RingPeers>(&bytes)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    all.sort_by(|a, b| a.shard.cmp(&b.shard));
    Ok(all)
}

/// The ruleset's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An nftables script: `nft -f FILE` (Linux).
    Nft,
    /// A pf anchor: `pfctl -a tandem-ring -f FILE` (macOS).
    Pf,
}

/// Name of the nftables table and of the pf anchor.
pub const TABLE: &str = "tandem_ring";
/// Name of the pf anchor.
pub const ANCHOR: &str = "tandem-ring";

/// The rules for `groups`: each rank's ring port accepts its peers' hosts
/// and drops everyone else. Loading the output replaces what an earlier
/// output loaded, so it can be rerun whenever groups change.
pub fn render(groups: &[RingPeers], format: Format) -> Result<String, String> {
    let mut out = String::new();
    match format {
        Format::Nft => {
            let _ = writeln!(
                out,
                "# Tandem: MLX ring ports open to their group's peers only.\n\
                 # Load with: nft -f FILE (replaces the table of an earlier run).\n\
                 add table inet {TABLE}\n\
                 flush table inet {TABLE}\n\
                 table inet {TABLE} {{\n  \
                 chain ring_in {{\n    \
                 type filter hook input priority filter; policy accept;"
            );
            for g in groups {
                let (own, peers) = g.split()?;
                let family = if own.is_ipv4() { "ip" } else { "ip6" };
                let _ = writeln!(out, "    # {} epoch {} rank {}", g.shard, g.epoch, g.rank);
                if !peers.is_empty() {
                    let set: Vec<String> = peers.iter().map(IpAddr::to_string).collect();
                    let _ = writeln!(
                        out,
                        "    {family} daddr {} tcp dport {} {family} saddr {{ {} }} accept",
                        own.ip(),
                        own.port(),
                        set.join(", ")
                    );
                }
                let _ = writeln!(
                    out,
                    "    {family} daddr {} tcp dport {} drop",
                    own.ip(),
                    own.port()
                );
            }
            out.push_str("  }\n}\n");
        }
        Format::Pf => {
            let _ = writeln!(
                out,
                "# Tandem: MLX ring ports open to their group's peers only.\n\
                 # Load with: pfctl -a {ANCHOR} -f FILE (pf.conf must have: anchor \"{ANCHOR}\")."
            );
            for g in groups {
                let (own, peers) = g.split()?;
                let _ = writeln!(out, "# {} epoch {} rank {}", g.shard, g.epoch, g.rank);
                if !peers.is_empty() {
                    let set: Vec<String> = peers.iter().map(IpAddr::to_string).collect();
                    let _ = writeln!(
                        out,
                        "pass in quick proto tcp from {{ {} }} to {} port {}",
                        set.join(", "),
                        own.ip(),
                        own.port()
                    );
                }
                let _ = writeln!(
                    out,
                    "block in quick proto tcp to {} port {}",
                    own.ip(),
                    own.port()
                );
            }
        }
    }
    Ok(out)
}

/// Arguments of `tandem-agent firewall-rules`.
#[derive(Debug, clap::Args)]
pub struct FirewallArgs {
    /// The agent's state directory (its `--state-dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Ruleset format.
    #[arg(long, value_enum, default_value = "nft")]
    pub format: Format,
}

/// `tandem-agent firewall-rules`: prints the ruleset for the groups whose
/// ranks run on this node now.
pub fn main(args: FirewallArgs) -> anyhow::Result<()> {
    let groups = collect(&args.state_dir).map_err(anyhow::Error::msg)?;
    print!(
        "{}",
        render(&groups, args.format).map_err(anyhow::Error::msg)?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(rank: i32) -> RingPeers {
        RingPeers {
            shard: "ai/llama-e3-r1".into(),
            epoch: 3,
            rank,
            addresses: vec![
                "10.0.0.1:7000".into(),
                "10.0.0.2:7001".into(),
                "10.0.0.3:7002".into(),
            ],
        }
    }

    #[test]
    fn each_ring_port_admits_its_peers_and_drops_the_rest() {
        let nft = render(&[group(1)], Format::Nft).expect("rules");
        assert!(nft.contains("flush table inet tandem_ring"), "{nft}");
        assert!(nft.contains("# ai/llama-e3-r1 epoch 3 rank 1"), "{nft}");
        assert!(
            nft.contains("ip daddr 10.0.0.2 tcp dport 7001 ip saddr { 10.0.0.1, 10.0.0.3 } accept"),
            "{nft}"
        );
        assert!(
            nft.contains("ip daddr 10.0.0.2 tcp dport 7001 drop"),
            "{nft}"
        );
        let pf = render(&[group(1)], Format::Pf).expect("rules");
        assert!(
            pf.contains(
                "pass in quick proto tcp from { 10.0.0.1, 10.0.0.3 } to 10.0.0.2 port 7001"
            ),
            "{pf}"
        );
        assert!(
            pf.contains("block in quick proto tcp to 10.0.0.2 port 7001"),
            "{pf}"
        );
    }

    #[test]
    fn ipv6_ranks_and_ranks_sharing_a_host() {
        let g = RingPeers {
            shard: "ai/x".into(),
            epoch: 1,
            rank: 0,
            addresses: vec!["[fd00::1]:7000".into(), "[fd00::1]:7001".into()],
        };
        let nft = render(&[g], Format::Nft).expect("rules");
        assert!(
            nft.contains("ip6 daddr fd00::1 tcp dport 7000 ip6 saddr { fd00::1 } accept"),
            "{nft}"
        );
        let bad = RingPeers {
            rank: 5,
            ..group(0)
        };
        let err = render(&[bad], Format::Pf).expect_err("no address for rank 5");
        assert!(err.contains("rank 5 has no address"), "{err}");
    }

    #[test]
    fn the_files_of_running_ranks_are_collected() {
        let root = std::env::temp_dir().join(format!("tandem-firewall-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        state_dir::prepare(&root).expect("state dir");
        let shard = root.join("ai--llama-e3-r1");
        state_dir::prepare(&shard).expect("shard dir");
        std::fs::create_dir_all(root.join("ai--other")).expect("a dir without rules");
        write(&shard, &group(1)).expect("write");
        assert_eq!(collect(&root).expect("collect"), vec![group(1)]);
        std::fs::write(shard.join(RING_PEERS_FILE), b"{").expect("corrupt");
        let err = collect(&root).expect_err("corrupt file");
        assert!(err.contains(RING_PEERS_FILE), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
