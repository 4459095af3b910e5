//! `hboned-cni`: the chained CNI plugin of Kubernetes mode (see `hboned::cni`). The container
//! runtime runs it from its CNI bin directory, where `hboned agent` installs it.

fn main() {
    let code = hboned::cni::run_plugin(
        |name| std::env::var(name).ok(),
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        std::io::stderr().lock(),
    );
    std::process::exit(code);
}
