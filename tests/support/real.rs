//! Real control-plane components for the tests, built from the Go module proxy at the versions
//! pinned in `tests/real/*/go.mod` (each component its own module, so their dependency graphs
//! never meet): `go build -trimpath` into `target/real-bin` when the program is missing or older
//! than its module's files, under a file lock so parallel test binaries build each program
//! once (scripts/real-control-planes builds them the same way first). Go's own build cache
//! makes later builds on the same machine a link step. Where Go is missing the tests that need
//! a component are skipped with a note; on CI (`CI` set) that is a failure instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Where the built programs go.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .join("real-bin")
}

/// The Go modules of the real components, in the repository.
fn module_dir(module: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/real")
        .join(module)
}

/// Whether Go is on this machine; on CI it must be.
pub(crate) fn have_go() -> bool {
    let found = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "the real control-plane tests need Go on CI"
        );
        eprintln!(
            "skipped: needs Go (the real control-plane components are built from the Go module proxy)"
        );
    }
    found
}

/// `package` of module `module` (a directory under tests/real), built as `name`; its path.
/// Panics with go's output when the build fails.
pub(crate) fn go_program(module: &str, package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let dir = bin_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    // One build at a time across test processes: flock on a file beside the programs.
    let lock = std::fs::File::create(dir.join(".lock")).unwrap();
    let guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking {}: {e}", dir.display()));
    if is_fresh(&out, &module_dir(module)) {
        built.insert(name.to_owned(), out.clone());
        return out;
    }
    let status = Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(&out)
        .arg(package)
        .current_dir(module_dir(module))
        .output()
        .unwrap_or_else(|e| panic!("running go build: {e}"));
    drop(guard);
    assert!(
        status.status.success(),
        "go build {package} (tests/real/{module}) failed:\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    built.insert(name.to_owned(), out.clone());
    out
}

/// Whether `program` exists and is newer than every file of the module in `dir`.
fn is_fresh(program: &Path, dir: &Path) -> bool {
    /// The newest modification time below `path` (the epoch for what cannot be read).
    fn newest(path: &Path) -> std::time::SystemTime {
        let epoch = std::time::SystemTime::UNIX_EPOCH;
        let Ok(meta) = std::fs::metadata(path) else {
            return epoch;
        };
        if !meta.is_dir() {
            return meta.modified().unwrap_or(epoch);
        }
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| newest(&entry.path()))
            .max()
            .unwrap_or(epoch)
    }
    std::fs::metadata(program)
        .and_then(|m| m.modified())
        .is_ok_and(|built| built > newest(dir))
}

/// A real component's driver process (tests/real/*/cmd/*) that takes commands on stdin and
/// answers one line each on stdout; killed when dropped.
pub(crate) struct Driver {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    replies: std::io::BufReader<std::process::ChildStdout>,
}

impl Driver {
    /// Starts `command` with piped stdin and stdout, its stderr into `log`.
    pub(crate) fn start(mut command: Command, log: &Path) -> Driver {
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let replies = std::io::BufReader::new(child.stdout.take().unwrap());
        Driver {
            child,
            stdin,
            replies,
        }
    }

    /// The next line it printed, trimmed.
    pub(crate) fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.replies.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    /// Sends one command; its answer.
    pub(crate) fn command(&mut self, line: &str) -> String {
        use std::io::Write;
        writeln!(self.stdin, "{line}").unwrap();
        self.line()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
