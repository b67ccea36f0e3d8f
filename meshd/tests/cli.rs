//! The command lines as an operator meets them: versions with the git revision, meshctl's
//! shell completions and man page, and `meshctl version` without a meshd to ask.
use std::process::Command;

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect(bin);
    assert!(
        out.status.success(),
        "{bin} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

#[test]
fn versions_name_the_release_and_the_revision() {
    let v = run(MESHD, &["--version"]);
    assert!(
        v.starts_with(&format!("meshd {} (", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    // A checkout's revision: 12 hex digits (or "unknown" in a source tree without git).
    let rev = v.trim().rsplit_once('(').unwrap().1.trim_end_matches(')');
    let hex = rev.split('-').next().unwrap();
    assert!(
        rev == "unknown" || (hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit())),
        "{v}"
    );
    let c = run(MESHCTL, &["--version"]);
    assert_eq!(
        c.replace("meshctl", "meshd"),
        v,
        "both built from one revision"
    );
    let out = run(MESHCTL, &["--socket", "/nonexistent/meshd.sock", "version"]);
    assert!(
        out.starts_with(&format!("meshctl {}", meshd::VERSION)),
        "{out}"
    );
    assert!(out.contains("meshd   not reachable"), "{out}");
}

#[test]
fn meshctl_has_completions_and_a_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let c = run(MESHCTL, &["completions", shell]);
        assert!(
            c.contains("meshctl") && c.contains("service") && c.contains("routes"),
            "{shell}: {c}"
        );
    }
    let man = run(MESHCTL, &["man"]);
    assert!(man.contains(".TH meshctl 1"), "{man}");
    assert!(man.contains("Inspect meshd"), "{man}");
    let bad = Command::new(MESHCTL)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success(), "an unknown shell is refused");
}
