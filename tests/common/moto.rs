//! A local FSx endpoint: moto's server (with the lifecycle it lacks, see moto_fsx.py), started
//! once per test binary; it exits when the test binary does (its stdin closes).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

struct Moto {
    _child: Child,
    endpoint: String,
}

/// The endpoint URL of the shared FSx server.
pub fn moto() -> &'static str {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    let m = MOTO.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/moto_fsx.py");
        let log = super::process_dir("moto").join("moto.log");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("moto log"))
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read port");
        let Ok(port) = line.trim().parse::<u16>() else {
            panic!(
                "moto's FSx server did not start (`pip install -r scripts/requirements.txt` installs moto[server]):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Moto { _child: child, endpoint: format!("http://127.0.0.1:{port}") }
    });
    &m.endpoint
}

/// An FSx client of the shared server.
pub fn fsx_client(endpoint: &str) -> aws_sdk_fsx::Client {
    let conf = aws_sdk_fsx::Config::builder()
        .behavior_version(aws_sdk_fsx::config::BehaviorVersion::latest())
        .region(aws_sdk_fsx::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_fsx::config::Credentials::new("test", "test", None, None, "test"))
        .http_client(datastore::aws::http_client())
        .build();
    aws_sdk_fsx::Client::from_conf(conf)
}
