//! The plugin run as a runtime runs it (environment, stdin, stdout), against an agent socket
//! served by a thread of the test.

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;

use super::*;

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p1"}],"ips":[{"address":"10.1.0.7/24","gateway":"10.1.0.1","interface":0},{"address":"fd00::7/64","interface":0}]}"#;

fn conf(socket: &Path, prev: Option<&str>) -> String {
    let prev = prev
        .map(|p| format!(r#","prevResult":{p}"#))
        .unwrap_or_default();
    format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s","type":"hboned-cni","agentSocket":"{}","timeoutSecs":5{prev}}}"#,
        socket.display()
    )
}

fn env(command: &str, args: &str) -> impl Fn(&str) -> Option<String> {
    let vars: BTreeMap<&str, String> = BTreeMap::from([
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", "c0ffee".to_owned()),
        ("CNI_NETNS", "/var/run/netns/p1".to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_PATH", "/opt/cni/bin".to_owned()),
        ("CNI_ARGS", args.to_owned()),
    ]);
    move |k| vars.get(k).cloned()
}

const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u-1";

/// Runs the plugin; (exit code, stdout as JSON or Null when empty).
fn run(env: impl Fn(&str) -> Option<String>, stdin: &str) -> (i32, serde_json::Value) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = run_plugin(env, stdin.as_bytes(), &mut out, &mut err);
    let out = String::from_utf8(out).unwrap();
    let json = if out.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&out).unwrap()
    };
    (code, json)
}

/// An agent answering each request with `answer`, handing the requests it saw to the test.
fn agent(dir: &Path, answer: Reply) -> (PathBuf, std::sync::mpsc::Receiver<Request>) {
    let path = dir.join("cni.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut line = String::new();
            std::io::BufReader::new(&conn).read_line(&mut line).unwrap();
            let _ = tx.send(serde_json::from_str(&line).unwrap());
            let mut reply = serde_json::to_vec(&answer).unwrap();
            reply.push(b'\n');
            conn.write_all(&reply).unwrap();
        }
    });
    (path, rx)
}

#[test]
fn version_lists_what_it_speaks() {
    let (code, out) = run(env("VERSION", ""), "");
    assert_eq!(code, 0);
    assert_eq!(
        out["supportedVersions"].as_array().unwrap().len(),
        SUPPORTED_VERSIONS.len()
    );
}

#[test]
fn add_asks_the_agent_and_passes_the_previous_result_on() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, seen) = agent(dir.path(), Reply::default());
    let (code, out) = run(env("ADD", K8S_ARGS), &conf(&socket, Some(PREV)));
    assert_eq!(code, 0, "{out}");
    let prev: serde_json::Value = serde_json::from_str(PREV).unwrap();
    assert_eq!(out, prev);
    let request = seen.recv().unwrap();
    assert_eq!(
        request,
        Request {
            command: Command::Add,
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/p1".into(),
            pod_namespace: "demo".into(),
            pod_name: "web-1".into(),
            pod_uid: Some("u-1".into()),
            ips: vec!["10.1.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        }
    );
}

#[test]
fn add_fails_when_the_agent_refuses_or_is_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, _seen) = agent(
        dir.path(),
        Reply {
            error: Some("no proxy is connected".into()),
        },
    );
    let (code, out) = run(env("ADD", K8S_ARGS), &conf(&socket, Some(PREV)));
    assert_eq!((code, out["code"].as_u64()), (1, Some(100)), "{out}");
    assert!(
        out["details"].as_str().unwrap().contains("no proxy"),
        "{out}"
    );

    let absent = dir.path().join("absent.sock");
    let (code, out) = run(env("ADD", K8S_ARGS), &conf(&absent, Some(PREV)));
    assert_eq!((code, out["code"].as_u64()), (1, Some(11)), "{out}");
    assert_eq!(out["cniVersion"], "1.0.0");
    // DEL never fails, even without the agent; STATUS says it is not available.
    let (code, out) = run(env("DEL", K8S_ARGS), &conf(&absent, None));
    assert_eq!((code, out), (0, serde_json::Value::Null));
    let (code, out) = run(env("STATUS", ""), &conf(&absent, None));
    assert_eq!((code, out["code"].as_u64()), (1, Some(50)), "{out}");
}

#[test]
fn what_is_not_a_kubernetes_pod_or_not_chained_is_handled_without_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.sock");
    // No K8S_POD_* arguments: passed through untouched.
    let (code, out) = run(env("ADD", "IgnoreUnknown=1"), &conf(&absent, Some(PREV)));
    assert_eq!(code, 0);
    assert_eq!(out["ips"][0]["address"], "10.1.0.7/24");
    // First in a chain: refused, saying where it belongs.
    let (code, out) = run(env("ADD", K8S_ARGS), &conf(&absent, None));
    assert_eq!((code, out["code"].as_u64()), (1, Some(7)), "{out}");
    // A version it does not speak; a configuration that is not JSON.
    let old = conf(&absent, Some(PREV)).replace("\"1.0.0\",\"name\"", "\"0.2.0\",\"name\"");
    let (code, out) = run(env("ADD", K8S_ARGS), &old);
    assert_eq!((code, out["code"].as_u64()), (1, Some(1)), "{out}");
    let (code, out) = run(env("ADD", K8S_ARGS), "{not json");
    assert_eq!((code, out["code"].as_u64()), (1, Some(6)), "{out}");
    let (code, out) = run(|_| None, "{}");
    assert_eq!((code, out["code"].as_u64()), (1, Some(4)), "{out}");
    // An ADD without CNI_NETNS; a previous result whose address is not one.
    let no_netns = |k: &str| {
        (k != "CNI_NETNS")
            .then(|| env("ADD", K8S_ARGS)(k))
            .flatten()
    };
    let (code, out) = run(no_netns, &conf(&absent, Some(PREV)));
    assert_eq!((code, out["code"].as_u64()), (1, Some(4)), "{out}");
    let bad = PREV.replace("10.1.0.7/24", "10.1.0.999/24");
    let (code, out) = run(env("ADD", K8S_ARGS), &conf(&absent, Some(&bad)));
    assert_eq!((code, out["code"].as_u64()), (1, Some(6)), "{out}");
    // No previous result's addresses at all: the agent is still asked (and refuses a pod it
    // should serve: tests/agent_cni.rs).
    let (code, out) = run(
        env("ADD", K8S_ARGS),
        &conf(&absent, Some(r#"{"cniVersion":"1.0.0"}"#)),
    );
    assert_eq!((code, out["code"].as_u64()), (1, Some(11)), "{out}");
}
