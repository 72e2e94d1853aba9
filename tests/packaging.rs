//! The install packaging: runs `scripts/check_chart.py`, which lints the Helm chart and renders
//! it with Helm's own engine (PyPI `helm-python-sdk`), validates every rendered object against
//! the Kubernetes API schemas, lints the YAML, checks the semantics the chart must keep (CSI
//! driver fields, privileged node plugin with Bidirectional propagation, RBAC, credentials...)
//! and fails when `manifests/` drifts from the chart (fix: `bash scripts/generate.sh`).
//!
//! The Python packages are required, not optional: without them this test fails and says how to
//! install them (`.ci/run` does: `pip install -r scripts/requirements.txt`).

use std::path::Path;
use std::process::Command;

#[test]
fn chart_lints_renders_validates_and_manifests_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg("scripts/check_chart.py")
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install Python 3, then `pip install -r scripts/requirements.txt`")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/check_chart.py failed ({}):\n{stdout}\n{stderr}\n\
         (missing Python packages? `pip install -r scripts/requirements.txt`; \
         manifests/ out of date? `bash scripts/generate.sh`)",
        out.status
    );
    // A run that checked nothing is not a pass.
    assert!(
        stdout.contains("check_chart:") && stdout.contains(" 0 failed"),
        "unexpected output of scripts/check_chart.py:\n{stdout}\n{stderr}"
    );
}
