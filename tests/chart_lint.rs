//! The Helm chart is lint-clean under `helm lint --strict`. No cluster needed.

mod support;

#[test]
fn helm_lint_strict_is_clean() {
    let chart = support::repo_root().join("charts/sdfleet");
    let out = std::process::Command::new(support::tool("helm"))
        .args(["lint", "--strict"])
        .arg(&chart)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("[WARNING]") && !text.contains("[ERROR]"),
        "{text}"
    );
}
