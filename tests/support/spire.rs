//! The real SPIRE (server and agent v1.13.3, tests/real/spire) for the tests: a server on
//! 127.0.0.1 with a SQLite datastore and join-token node attestation, and per node an agent
//! with the unix workload attestor whose admin socket serves the Delegated Identity API to
//! hboned. Registration goes through `spire-server entry create`, the way Cilium's operator
//! registers one entry per service account (cilium `operator/auth/spire/client.go`,
//! ZtunnelSpireEntryConfig: `spiffe://<td>/ns/<ns>/sa/<sa>`, parent `spiffe://<td>/ztunnel`,
//! selectors `k8s:ns:<ns>` and `k8s:sa:<sa>`); hboned's own entry, `spiffe://<td>/ztunnel`, is
//! the agents' authorized delegate. Every process is killed on drop; its log is kept for the
//! failure message.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::real::go_program;

/// The SPIFFE ID path of hboned's own entry, the agents' authorized delegate (Cilium's).
pub(crate) const DELEGATE: &str = "/ztunnel";
/// The node alias every agent's join token maps to (the parent of the delegate's entry).
pub(crate) const NODES: &str = "/nodes";

fn server_bin() -> PathBuf {
    go_program(
        "spire",
        "github.com/spiffe/spire/cmd/spire-server",
        "spire-server",
    )
}

fn agent_bin() -> PathBuf {
    go_program(
        "spire",
        "github.com/spiffe/spire/cmd/spire-agent",
        "spire-agent",
    )
}

/// A free TCP port on 127.0.0.1 (bound and released; the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 100 ms for up to `secs`; panics naming `what` (and `log`) otherwise.
fn wait_for(secs: u64, what: &str, log: &Path, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {secs} s; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

/// A running SPIRE server.
pub(crate) struct Server {
    child: Child,
    pub dir: PathBuf,
    pub port: u16,
    pub trust_domain: String,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// A server for `trust_domain` with its data under `dir`; returns once it is healthy.
    /// SVIDs live `svid_ttl` (a Go duration) unless their entry says otherwise.
    pub(crate) fn start(dir: &Path, trust_domain: &str, svid_ttl: &str) -> Server {
        let dir = dir.join("spire-server");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = free_port();
        let socket = dir.join("api.sock");
        let config = dir.join("server.conf");
        std::fs::write(
            &config,
            format!(
                r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{socket}"
  trust_domain = "{trust_domain}"
  data_dir = "{data}"
  log_level = "DEBUG"
  ca_ttl = "24h"
  default_x509_svid_ttl = "{svid_ttl}"
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{data}/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
}}
"#,
                socket = socket.display(),
                data = dir.join("data").display(),
            ),
        )
        .unwrap();
        let log = dir.join("server.log");
        let child = spawn(
            &server_bin(),
            &["run", "-config", config.to_str().unwrap()],
            &log,
        );
        let server = Server {
            child,
            dir,
            port,
            trust_domain: trust_domain.to_owned(),
            socket,
            log,
        };
        wait_for(60, "the SPIRE server became healthy", &server.log, || {
            server.try_cli(&["healthcheck"]).is_ok()
        });
        server
    }

    /// `spire-server <args> -socketPath <ours>`: its stdout, or its stderr as the error.
    pub(crate) fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(server_bin())
            .args(args)
            .arg("-socketPath")
            .arg(&self.socket)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Like [`Server::try_cli`], panicking on failure.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("spire-server {}: {e}", args.join(" ")))
    }

    pub(crate) fn id(&self, path: &str) -> String {
        format!("spiffe://{}{path}", self.trust_domain)
    }

    /// A one-time join token for an agent, its node aliased as [`NODES`].
    pub(crate) fn join_token(&self) -> String {
        let out = self.cli(&["token", "generate", "-spiffeID", &self.id(NODES)]);
        out.trim()
            .strip_prefix("Token: ")
            .unwrap_or_else(|| panic!("unexpected token output {out:?}"))
            .to_owned()
    }

    /// Creates an entry; returns its id. `ttl`: the X.509-SVID lifetime in seconds (0: the
    /// server's default).
    pub(crate) fn create_entry(
        &self,
        path: &str,
        parent: &str,
        selectors: &[&str],
        ttl: u32,
    ) -> String {
        let (id, parent) = (self.id(path), self.id(parent));
        let ttl = ttl.to_string();
        let mut args = vec![
            "entry",
            "create",
            "-output",
            "json",
            "-spiffeID",
            &id,
            "-parentID",
            &parent,
        ];
        if ttl != "0" {
            args.extend(["-x509SVIDTTL", &ttl]);
        }
        for s in selectors {
            args.extend(["-selector", s]);
        }
        let out = self.cli(&args);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        json["results"][0]["entry"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no entry id in {out}"))
            .to_owned()
    }

    /// The entry of hboned's own process (uid `uid`), the authorized delegate.
    pub(crate) fn delegate_entry(&self, uid: u32) -> String {
        self.create_entry(DELEGATE, NODES, &[&format!("unix:uid:{uid}")], 0)
    }

    /// The entry Cilium's operator registers for a service account.
    pub(crate) fn service_account_entry(&self, ns: &str, sa: &str, ttl: u32) -> String {
        self.create_entry(
            &format!("/ns/{ns}/sa/{sa}"),
            DELEGATE,
            &[&format!("k8s:ns:{ns}"), &format!("k8s:sa:{sa}")],
            ttl,
        )
    }

    pub(crate) fn delete_entry(&self, id: &str) {
        self.cli(&["entry", "delete", "-entryID", id]);
    }

    /// The trust bundle (PEM), as agents bootstrap from it.
    pub(crate) fn bundle(&self) -> String {
        self.cli(&["bundle", "show"])
    }

    /// Rotates the X.509 authority: prepares a new one, activates it, then taints and revokes
    /// the old one, so new SVIDs chain to the new root and the old root leaves the bundle.
    /// Returns (old, new) authority ids.
    pub(crate) fn rotate_authority(&self) -> (String, String) {
        let show = |s: &Self| -> serde_json::Value {
            serde_json::from_str(&s.cli(&["localauthority", "x509", "show", "-output", "json"]))
                .unwrap()
        };
        let old = show(self)["active"]["authority_id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.cli(&["localauthority", "x509", "prepare"]);
        let new = show(self)["prepared"]["authority_id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.cli(&["localauthority", "x509", "activate", "-authorityID", &new]);
        (old, new)
    }

    /// Taints and revokes an authority (after [`Server::rotate_authority`]).
    pub(crate) fn retire_authority(&self, id: &str) {
        self.cli(&["localauthority", "x509", "taint", "-authorityID", id]);
        self.cli(&["localauthority", "x509", "revoke", "-authorityID", id]);
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A running SPIRE agent of one node.
pub(crate) struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// The Delegated Identity API (hboned's `certificates.spireSocket`).
    pub admin_socket: PathBuf,
    /// The Workload API.
    pub socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Agent {
    /// An agent named `name`, attested by a fresh join token, trusting `delegates` (SPIFFE ID
    /// paths) on its admin socket; returns once healthy.
    pub(crate) fn start(server: &Server, name: &str, delegates: &[&str]) -> Agent {
        let dir = server
            .dir
            .parent()
            .unwrap()
            .join(format!("spire-agent-{name}"));
        // The admin socket must not share a directory with the Workload API socket.
        for sub in ["data", "public", "admin"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let bundle = dir.join("bootstrap.pem");
        std::fs::write(&bundle, server.bundle()).unwrap();
        let delegates: Vec<String> = delegates
            .iter()
            .map(|d| format!("{:?}", server.id(d)))
            .collect();
        let (socket, admin_socket) = (dir.join("public/api.sock"), dir.join("admin/admin.sock"));
        let config = dir.join("agent.conf");
        std::fs::write(
            &config,
            format!(
                r#"agent {{
  data_dir = "{data}"
  log_level = "DEBUG"
  server_address = "127.0.0.1"
  server_port = "{port}"
  socket_path = "{socket}"
  admin_socket_path = "{admin}"
  trust_domain = "{td}"
  trust_bundle_path = "{bundle}"
  join_token = "{token}"
  authorized_delegates = [{delegates}]
  experimental {{
    sync_interval = "1s"
  }}
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "disk" {{
    plugin_data {{
      directory = "{data}"
    }}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"#,
                data = dir.join("data").display(),
                port = server.port,
                socket = socket.display(),
                admin = admin_socket.display(),
                td = server.trust_domain,
                bundle = bundle.display(),
                token = server.join_token(),
                delegates = delegates.join(", "),
            ),
        )
        .unwrap();
        let mut agent = Agent {
            child: None,
            log: dir.join("agent.log"),
            dir,
            config,
            admin_socket,
            socket,
        };
        agent.run();
        agent
    }

    fn run(&mut self) {
        // Appends: a restart keeps the first run's lines for the failure message.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(agent_bin())
            .args(["run", "-config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let socket = self.socket.clone();
        wait_for(60, "the SPIRE agent became healthy", &self.log, || {
            Command::new(agent_bin())
                .args(["healthcheck", "-socketPath"])
                .arg(&socket)
                .output()
                .is_ok_and(|o| o.status.success())
        });
    }

    /// Kills the agent (its admin socket goes away with it).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again from its data directory (its own SVID and key, kept on disk: a
    /// join token is good for one attestation only).
    pub(crate) fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Waits until the agent holds an SVID for SPIFFE ID path `path` that this process (uid 0)
    /// can fetch over the Workload API: the delegate's entry has reached the agent.
    pub(crate) fn wait_for_own_svid(&self, server: &Server, path: &str) {
        let want = server.id(path);
        let socket = self.socket.clone();
        wait_for(60, &format!("the agent issued {want}"), &self.log, || {
            Command::new(agent_bin())
                .args(["api", "fetch", "x509", "-socketPath"])
                .arg(&socket)
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&want))
        });
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}
