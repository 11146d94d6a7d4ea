//! Names the commit roster is built from (`roster_build_info{commit}`, the first log line),
//! when git can tell; `ROSTER_COMMIT` from the environment wins (image builds without .git).

fn main() {
    println!("cargo:rerun-if-env-changed=ROSTER_COMMIT");
    // Only paths that exist: a missing one would rerun this script on every build.
    for path in [".git/HEAD", ".git/refs/heads"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("ROSTER_COMMIT").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    if let Some(commit) = commit.filter(|c| !c.is_empty()) {
        println!("cargo:rustc-env=ROSTER_COMMIT={commit}");
    }
}
