//! A SPIRE agent stand-in: the Delegated Identity API on a Unix socket, minting SVIDs (from
//! a built-in CA) and able to push a rotation. It decides as the real agent does
//! (spiffe/spire `pkg/agent/api/delegatedidentity/v1/service.go`):
//! - the caller is attested from its peer credentials (here the `unix:uid:<uid>` selector)
//!   and must match an entry whose SPIFFE ID is an authorized delegate, else
//!   PermissionDenied "no identity issued" / "caller not configured as an authorized
//!   delegate" (isCallerAuthorized);
//! - a subscription by PID attests that process (here from its network namespace, standing
//!   in for the Kubernetes attestor: `k8s:pod-uid`, `k8s:ns`, `k8s:sa` of the pod whose
//!   namespace it is in); a process that cannot be attested is Internal "workload
//!   attestation failed";
//! - an entry matches a workload when all its selectors are among the workload's; the
//!   stream carries the SVIDs of every matching entry (none: an empty update).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hboned::identity::ca::BuiltinCa;
use hboned::proto::spire::api::agent::delegatedidentity::v1::delegated_identity_server::{
    DelegatedIdentity, DelegatedIdentityServer,
};
use hboned::proto::spire::api::agent::delegatedidentity::v1::*;
use hboned::proto::spire::api::types::{Spiffeid, X509svid};
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

type Svids = mpsc::UnboundedSender<Result<SubscribeToX509sviDsResponse, tonic::Status>>;
/// Open SVID streams by (namespace, service account).
pub type Streams = Arc<Mutex<HashMap<(String, String), Vec<Svids>>>>;

/// The delegate's SPIFFE ID (Cilium parents its entries to `spiffe://<td>/ztunnel`).
pub const DELEGATE: &str = "/ztunnel";

/// A registration entry: these selectors get `/ns/<ns>/sa/<sa>`, or `path` as is.
pub struct Entry {
    pub selectors: Vec<String>,
    pub path: String,
}

pub struct FakeSpire {
    pub ca: Arc<BuiltinCa>,
    pub streams: Streams,
    pub entries: Vec<Entry>,
    /// Pods by the inode of their network namespace: (uid, namespace, service account).
    pub pods: HashMap<u64, (String, String, String)>,
}

/// An entry for pods with these selectors.
pub fn entry(selectors: &[&str], ns: &str, sa: &str) -> Entry {
    Entry {
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        path: format!("/ns/{ns}/sa/{sa}"),
    }
}

/// The entry that makes a caller with this uid the authorized delegate.
pub fn delegate(uid: u32) -> Entry {
    Entry {
        selectors: vec![format!("unix:uid:{uid}")],
        path: DELEGATE.into(),
    }
}

/// A freshly minted SVID response for ns/sa.
pub fn mint(ca: &BuiltinCa, ns: &str, sa: &str) -> SubscribeToX509sviDsResponse {
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.clone().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = ca
        .sign_csr(&csr, SystemTime::now(), Duration::from_secs(3600))
        .unwrap();
    let leaf = rustls_pemfile::certs(&mut chain[0].as_bytes())
        .next()
        .unwrap()
        .unwrap();
    SubscribeToX509sviDsResponse {
        x509_svids: vec![X509svidWithKey {
            x509_svid: Some(X509svid {
                cert_chain: vec![leaf.to_vec()],
                id: Some(Spiffeid {
                    trust_domain: "cluster.local".into(),
                    path: format!("/ns/{ns}/sa/{sa}"),
                }),
                expires_at: 0,
                hint: String::new(),
            }),
            x509_svid_key: key.serialize_der(),
        }],
        federates_with: vec![],
    }
}

impl FakeSpire {
    fn matching(&self, selectors: &[String]) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|e| e.selectors.iter().all(|s| selectors.contains(s)))
            .collect()
    }

    /// isCallerAuthorized: the caller, attested from its peer credentials, must be a
    /// delegate.
    fn authorize<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let uid = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid())
            .ok_or_else(|| tonic::Status::internal("workload attestation failed"))?;
        let entries = self.matching(&[format!("unix:uid:{uid}")]);
        if entries.is_empty() {
            return Err(tonic::Status::permission_denied("no identity issued"));
        }
        if !entries.iter().any(|e| e.path == DELEGATE) {
            return Err(tonic::Status::permission_denied(
                "caller not configured as an authorized delegate",
            ));
        }
        Ok(())
    }

    /// The workload's SVIDs as one stream; rotations pushed to it by (ns, sa).
    fn stream(
        &self,
        selectors: &[String],
    ) -> tonic::Response<UnboundedReceiverStream<Result<SubscribeToX509sviDsResponse, tonic::Status>>>
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut update = SubscribeToX509sviDsResponse::default();
        for e in self.matching(selectors) {
            let Some((ns, sa)) = e
                .path
                .strip_prefix("/ns/")
                .and_then(|p| p.split_once("/sa/"))
            else {
                continue;
            };
            update.x509_svids.extend(mint(&self.ca, ns, sa).x509_svids);
            self.streams
                .lock()
                .unwrap()
                .entry((ns.to_owned(), sa.to_owned()))
                .or_default()
                .push(tx.clone());
        }
        tx.send(Ok(update)).unwrap();
        // Open for the subscriber's lifetime (a clone is kept for pushes when it matched).
        std::mem::forget(tx);
        tonic::Response::new(UnboundedReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl DelegatedIdentity for FakeSpire {
    type SubscribeToX509SVIDsStream =
        UnboundedReceiverStream<Result<SubscribeToX509sviDsResponse, tonic::Status>>;
    type SubscribeToX509SVIDsByPIDStream =
        UnboundedReceiverStream<Result<SubscribeToX509sviDsResponse, tonic::Status>>;
    type SubscribeToX509BundlesStream =
        UnboundedReceiverStream<Result<SubscribeToX509BundlesResponse, tonic::Status>>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: tonic::Request<SubscribeToX509sviDsRequest>,
    ) -> Result<tonic::Response<Self::SubscribeToX509SVIDsStream>, tonic::Status> {
        self.authorize(&request)?;
        let selectors: Vec<String> = request
            .into_inner()
            .selectors
            .iter()
            .map(|s| format!("{}:{}", s.r#type, s.value))
            .collect();
        if selectors.is_empty() {
            return Err(tonic::Status::invalid_argument("no selectors"));
        }
        Ok(self.stream(&selectors))
    }

    async fn subscribe_to_x509svi_ds_by_pid(
        &self,
        request: tonic::Request<SubscribeToX509sviDsByPidRequest>,
    ) -> Result<tonic::Response<Self::SubscribeToX509SVIDsByPIDStream>, tonic::Status> {
        use std::os::unix::fs::MetadataExt;
        self.authorize(&request)?;
        let pid = request.into_inner().pid;
        let attested = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .ok()
            .and_then(|m| self.pods.get(&m.ino()));
        let Some((uid, ns, sa)) = attested else {
            return Err(tonic::Status::internal("workload attestation failed"));
        };
        let selectors = [
            format!("k8s:pod-uid:{uid}"),
            format!("k8s:ns:{ns}"),
            format!("k8s:sa:{sa}"),
        ];
        Ok(self.stream(&selectors))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        request: tonic::Request<SubscribeToX509BundlesRequest>,
    ) -> Result<tonic::Response<Self::SubscribeToX509BundlesStream>, tonic::Status> {
        self.authorize(&request)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let root = rustls_pemfile::certs(&mut self.ca.root_pem().as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let bundles = SubscribeToX509BundlesResponse {
            ca_certificates: [("cluster.local".to_string(), root.to_vec())].into(),
        };
        tx.send(Ok(bundles)).unwrap();
        // Keep the stream open for the subscriber's lifetime.
        std::mem::forget(tx);
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// Serves on `socket` with these entries and pods.
pub async fn start_with(
    socket: &std::path::Path,
    entries: Vec<Entry>,
    pods: HashMap<u64, (String, String, String)>,
) -> (Arc<BuiltinCa>, Streams) {
    let ca = Arc::new(BuiltinCa::generate(SystemTime::now()).unwrap());
    let streams = Arc::new(Mutex::new(HashMap::new()));
    let fake = FakeSpire {
        ca: ca.clone(),
        streams: streams.clone(),
        entries,
        pods,
    };
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(DelegatedIdentityServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
    });
    (ca, streams)
}

/// Serves with this process as the delegate and entries for test/client and test/server
/// by namespace and service account.
pub async fn start(socket: &std::path::Path) -> (Arc<BuiltinCa>, Streams) {
    let entries = vec![
        delegate(nix::unistd::Uid::effective().as_raw()),
        entry(&["k8s:ns:test", "k8s:sa:client"], "test", "client"),
        entry(&["k8s:ns:test", "k8s:sa:server"], "test", "server"),
    ];
    start_with(socket, entries, HashMap::new()).await
}
