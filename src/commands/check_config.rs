//! `roster check-config`: validates the config, the registrations it names and the files
//! roster will use, without starting anything. `serve` runs the same checks first, all but
//! the agents file's contents ([`check_all`]).
//!
//! Each problem is one line naming the key and the fix.

use std::path::Path;

use crate::config::Config;
use crate::registration::{self, RegistrationError};
use crate::sources::{self, SourceError};

/// What the checks found: the problems, and how roster is registered when it is.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    /// e.g. "a pushed and an acting-only registration".
    pub registered_as: Option<&'static str>,
}

/// Runs every check on a loaded (so already validated) config.
pub fn check(config: &Config) -> Report {
    let mut report = Report::default();
    let appservice = &config.appservice;
    if appservice.url.is_none() && appservice.listen.ip().is_unspecified() {
        report.problems.push(format!(
            "appservice.url: not set while appservice.listen is {}, which the homeserver cannot reach; set it to how the homeserver reaches roster, e.g. http://roster:9009",
            appservice.listen
        ));
    }
    match registration::read_unchecked(config) {
        Ok(registrations) => {
            for (path, message) in registration::check(config, &registrations) {
                report.problems.push(format!(
                    "{}: {}: {message}",
                    key_of(config, &path),
                    path.display()
                ));
            }
            for path in std::iter::once(appservice.registration.clone()).chain(
                registrations
                    .acting
                    .as_ref()
                    .map(|_| appservice.acting_registration_path()),
            ) {
                if let Some(problem) = world_readable(&path) {
                    report
                        .problems
                        .push(format!("{}: {problem}", key_of(config, &path)));
                }
            }
            report.registered_as = Some(registrations.describe());
        }
        Err(error) => {
            let key = match &error {
                RegistrationError::Read { path, .. }
                | RegistrationError::Parse { path, .. }
                | RegistrationError::Invalid { path, .. } => key_of(config, path),
                _ => "appservice.registration",
            };
            report.problems.push(format!("{key}: {error}"));
        }
    }
    if let Some(problem) = store_directory(&config.store.path) {
        report.problems.push(format!("store.path: {problem}"));
    }
    if let Some(file) = &config.agents.file
        && let Err(error) = std::fs::metadata(file)
    {
        report.problems.push(format!(
            "agents.file: cannot read {}: {error}; write the agents list there (YAML: - {{id, name}}) or unset the key",
            file.display()
        ));
    }
    report
}

/// `roster check-config`: everything [`check`] finds, and an `agents.file` that serve's
/// source would refuse. `serve` starts with such a file (its polls report the error and
/// the lifecycle consumer still runs), but it provisions no agent from it, so the
/// operator's check says so first.
pub fn check_all(config: &Config) -> Report {
    let mut report = check(config);
    let Some(file) = &config.agents.file else {
        return report;
    };
    if report
        .problems
        .iter()
        .any(|p| p.starts_with("agents.file: "))
    {
        return report;
    }
    match sources::read_agents_file(file) {
        Ok(_) => {}
        Err(SourceError::FileUnreadable { reason, .. }) => report.problems.push(format!(
            "agents.file: cannot read {}: {reason}; write the agents list there (YAML: - {{id, name}}) or unset the key",
            file.display()
        )),
        Err(error) => report.problems.push(format!(
            "agents.file: {}; fix the file (a YAML list of {{id, name}}): serve lists no agent from it until then",
            error.to_string().replace(['\n', '\r'], " ")
        )),
    }
    report
}

fn key_of(config: &Config, path: &Path) -> &'static str {
    if path == config.appservice.acting_registration_path() {
        "appservice.acting_registration"
    } else {
        "appservice.registration"
    }
}

/// A registration holds tokens: every user reading it is a problem (group-readable is
/// allowed, as Kubernetes mounts Secrets).
fn world_readable(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Some(format!(
                "{} is readable by every user (mode {mode:o}) and holds the appservice tokens; chmod 600 it",
                path.display()
            ));
        }
    }
    None
}

/// The store file and its directory must be writable, or creatable.
fn store_directory(store: &Path) -> Option<String> {
    if store.exists() {
        return std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(store)
            .err()
            .map(|e| {
                format!(
                    "cannot open {} to read and write: {e}; check its owner and mode",
                    store.display()
                )
            });
    }
    let mut dir = store.parent().filter(|d| !d.as_os_str().is_empty());
    while let Some(candidate) = dir {
        if candidate.exists() {
            break;
        }
        dir = candidate.parent().filter(|d| !d.as_os_str().is_empty());
    }
    let dir = dir.unwrap_or(Path::new("."));
    let probe = dir.join(format!(".roster-check-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) => Some(format!(
            "cannot create files in {} (for {}): {e}; make the directory writable by roster's user",
            dir.display(),
            store.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path, extra: &str) -> Config {
        Config::from_yaml(&format!(
            "homeserver: {{server_name: ex.org}}\nappservice: {{registration: {}{extra}}}\nstore: {{path: {}}}",
            dir.join("registration.yaml").display(),
            dir.join("state/roster.db").display()
        ))
        .unwrap()
    }

    fn write_pair(config: &Config) {
        let pair = registration::generate(config).unwrap();
        registration::write_pair(
            &config.appservice.registration,
            &config.appservice.acting_registration_path(),
            &pair,
            true,
        )
        .unwrap();
    }

    #[test]
    fn should_pass_a_fresh_config_and_its_registrations() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "");
        write_pair(&config);
        let report = check(&config);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            report.registered_as,
            Some("a pushed and an acting-only registration")
        );
    }

    /// Each trap, with the key and the fix in one line.
    #[test]
    fn should_name_the_key_and_the_fix_for_each_trap() {
        let dir = tempfile::tempdir().unwrap();
        let good = config(dir.path(), "");
        let missing = check(&good);
        assert!(
            missing.problems[0].starts_with("appservice.registration: ")
                && missing.problems[0].contains("roster registration"),
            "{:?}",
            missing.problems
        );
        write_pair(&good);
        std::fs::set_permissions(
            &good.appservice.registration,
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let readable = check(&good);
        assert!(
            readable
                .problems
                .iter()
                .any(|p| p.starts_with("appservice.registration: ") && p.contains("chmod 600")),
            "{:?}",
            readable.problems
        );
        // A registration made for another config (another bot, another URL).
        let other = config(
            dir.path(),
            ", bot_localpart: other, url: 'http://roster:9009'",
        );
        let mismatched = check(&other);
        for needle in ["sender_localpart", "appservice.url"] {
            assert!(
                mismatched.problems.iter().any(|p| p.contains(needle)),
                "{needle}: {:?}",
                mismatched.problems
            );
        }
        // Listening everywhere without saying how the homeserver gets there.
        let everywhere = config(dir.path(), ", listen: '0.0.0.0:9009'");
        assert!(
            check(&everywhere)
                .problems
                .iter()
                .any(|p| p.starts_with("appservice.url: ") && p.contains("0.0.0.0")),
        );
        for problem in mismatched.problems.iter().chain(&readable.problems) {
            assert!(!problem.contains('\n'), "one line: {problem}");
        }
    }

    /// An agents file serve would refuse at every poll (so it provisions nothing) is a
    /// problem here, not only a missing one.
    #[test]
    fn should_find_an_agents_file_serve_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents.yaml");
        let with_agents = config(dir.path(), "");
        write_pair(&with_agents);
        let with_agents = Config::from_yaml(&format!(
            "homeserver: {{server_name: ex.org}}\nappservice: {{registration: {}}}\nstore: {{path: {}}}\nagents: {{file: {}}}",
            with_agents.appservice.registration.display(),
            with_agents.store.path.display(),
            agents.display()
        ))
        .unwrap();
        let agents_problems = |text: Option<&str>| -> Vec<String> {
            let _ = std::fs::remove_file(&agents);
            let _ = std::fs::remove_dir(&agents);
            match text {
                Some(text) => std::fs::write(&agents, text).unwrap(),
                None => std::fs::create_dir(&agents).unwrap(),
            }
            check_all(&with_agents)
                .problems
                .into_iter()
                .filter(|p| p.starts_with("agents.file: "))
                .collect()
        };
        assert!(agents_problems(Some("- {id: agent-1, name: One}\n")).is_empty());
        assert!(agents_problems(Some("[]\n")).is_empty());
        for (text, needle) in [
            (
                Some("- {id: agent-1, name: One}\n- {id: agent-2\n"),
                "not a YAML list",
            ),
            (
                Some("agents:\n  - {id: agent-1, name: One}\n"),
                "not a list",
            ),
            (
                Some("- {id: agent-1, name: One}\n- {id: agent-1, name: Two}\n"),
                "unique",
            ),
            (Some(""), "empty"),
            (None, "agents.yaml"),
        ] {
            let problems = agents_problems(text);
            assert_eq!(problems.len(), 1, "{text:?}: {problems:?}");
            assert!(
                problems[0].contains(needle) && problems[0].contains("agents.yaml"),
                "{text:?}: {problems:?}"
            );
            assert!(!problems[0].contains('\n'), "one line: {problems:?}");
        }
    }

    #[test]
    fn should_find_a_store_directory_roster_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the store's directory should be: nobody, root included, can create
        // the store there.
        let blocker = dir.path().join("not-a-directory");
        std::fs::write(&blocker, "").unwrap();
        let problem = store_directory(&blocker.join("roster.db")).expect("a problem");
        assert!(
            problem.contains("writable") && problem.contains("not-a-directory"),
            "{problem}"
        );
        assert_eq!(store_directory(&dir.path().join("new/roster.db")), None);
    }
}
