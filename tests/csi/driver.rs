//! Runs the real `datastore csi` binary and talks to it over its Unix socket, as kubelet and
//! the external-provisioner do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use datastore::csi::pb;
use datastore::csi::pb::controller_client::ControllerClient;
use datastore::csi::pb::identity_client::IdentityClient;
use datastore::csi::pb::node_client::NodeClient;
use datastore::store::Store;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use tonic::transport::Channel;

use crate::common::*;

/// A running driver (controller and node in one process) with its directories.
pub struct Driver {
    pub dir: tempfile::TempDir,
    pub store_url: String,
    pub bucket: String,
    pub store: Store,
    /// More command-line arguments of the plugin.
    pub extra: Vec<String>,
    child: Option<Child>,
}

impl Driver {
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }
    pub fn kubelet(&self) -> PathBuf {
        self.dir.path().join("kubelet")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn holder_socket(&self) -> PathBuf {
        self.dir.path().join("holder.sock")
    }

    /// Starts a driver on a new bucket of the shared S3 server.
    pub fn start() -> Driver {
        Driver::start_with(&[])
    }

    /// Starts a driver with more arguments.
    pub fn start_with(extra: &[&str]) -> Driver {
        init_logging();
        let (store, bucket) = s3_store();
        let dir = tempfile::Builder::new()
            .prefix("csi")
            .tempdir()
            .expect("tempdir");
        Driver::launch(dir, store, format!("s3://{bucket}/pfx"), bucket, extra)
    }

    /// Starts a driver whose mounter fails when told to ([`Driver::fail_next`]), with more
    /// arguments.
    pub fn start_faulty(extra: &[&str]) -> Driver {
        init_logging();
        let (store, bucket) = s3_store();
        let dir = tempfile::Builder::new()
            .prefix("csi")
            .tempdir()
            .expect("tempdir");
        let faults = dir.path().join("faults").display().to_string();
        let mut extra = extra.to_vec();
        extra.extend(["--inject-mount-faults", &faults]);
        Driver::launch(dir, store, format!("s3://{bucket}/pfx"), bucket, &extra)
    }

    /// Makes the next `n` calls of `op` of the plugin's mounter fail (a driver started with
    /// [`Driver::start_faulty`]; the instruction survives a restart of the plugin).
    pub fn fail_next(&self, op: datastore::mount::faulty::MountOp, n: u32) {
        datastore::mount::faulty::FaultyMounter::fail_next(&self.dir.path().join("faults"), op, n)
            .expect("arm the failure-injecting mounter");
    }

    /// Failures of `op` still due.
    pub fn failures_due(&self, op: datastore::mount::faulty::MountOp) -> u32 {
        datastore::mount::faulty::FaultyMounter::pending(&self.dir.path().join("faults"), op)
    }

    /// Files in a subdirectory of the state directory (`volumes`, `manifests`).
    pub fn state_files(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.state_dir().join(sub))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Starts a driver whose store is a local directory (inside its own directory).
    pub fn start_local(extra: &[&str]) -> Driver {
        init_logging();
        let dir = tempfile::Builder::new()
            .prefix("csi")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("store");
        std::fs::create_dir_all(&root).expect("store dir");
        let store = local_store(&root);
        let url = root.display().to_string();
        Driver::launch(dir, store, url, String::new(), extra)
    }

    fn launch(
        dir: tempfile::TempDir,
        store: Store,
        store_url: String,
        bucket: String,
        extra: &[&str],
    ) -> Driver {
        std::fs::create_dir_all(dir.path().join("kubelet")).expect("kubelet dir");
        let mut d = Driver {
            dir,
            store_url,
            bucket,
            store,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        d.spawn();
        d
    }

    /// (Re)starts the plugin process and waits for its socket.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("driver.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_datastore"))
            .arg("csi")
            .args(["--endpoint", &format!("unix://{}", self.socket().display())])
            .args(["--mode", "all", "--node-id", "node-a"])
            .args([
                "--store",
                &self.store_url,
                "--s3-endpoint",
                &server().endpoint(),
            ])
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--kubelet-dir")
            .arg(self.kubelet())
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .arg("--fd-holder-socket")
            .arg(self.holder_socket())
            .args(["--read-timeout", "10s"])
            .args(&self.extra)
            .envs(test_s3_env())
            .env("DATASTORE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn driver");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                break;
            }
            if let Some(c) = self.child.as_mut() {
                assert!(
                    c.try_wait().expect("wait").is_none(),
                    "driver exited; log:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "driver socket did not appear; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// kill -9 of the plugin process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(rt().block_on(channel(&self.socket())))
    }
    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(rt().block_on(channel(&self.socket())))
    }
    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(rt().block_on(channel(&self.socket())))
    }

    /// Creates datastore `name` of namespace `ns` (in `<store>/namespaces/<ns>`, where pods'
    /// inline volumes and PVC-named datastores live).
    pub fn create_namespaced_datastore(&self, ns: &str, name: &str, files: &[(&str, Vec<u8>)]) -> u64 {
        let url = datastore::store::namespaces::namespace_store(self.store.url(), ns);
        let store = rt()
            .block_on(Store::open(&url, s3_options(server(), fast_timeouts())))
            .expect("namespace store");
        Self::upload(&store, name, files)
    }

    /// Creates datastore `name` in the driver's store from `files` (path, bytes).
    pub fn create_datastore(&self, name: &str, files: &[(&str, Vec<u8>)]) -> u64 {
        Self::upload(&self.store, name, files)
    }

    fn upload(store: &Store, name: &str, files: &[(&str, Vec<u8>)]) -> u64 {
        let src = tempfile::tempdir().expect("tempdir");
        for (p, data) in files {
            write_file(&src.path().join(p), data, 0o644);
        }
        Self::upload_dir(store, name, src.path())
    }

    /// Creates datastore `name` in the driver's store from the directory `src` as it is.
    pub fn create_datastore_from(&self, name: &str, src: &Path) -> u64 {
        Self::upload_dir(&self.store, name, src)
    }

    fn upload_dir(store: &Store, name: &str, src: &Path) -> u64 {
        rt().block_on(create_from_dir(
            store,
            name,
            src,
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("create datastore")
        .version
    }

    /// A path under the kubelet directory.
    pub fn kpath(&self, rel: &str) -> String {
        self.kubelet().join(rel).display().to_string()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill9();
        kill_matching(&self.holder_socket().display().to_string());
        // Unmount whatever this driver left under its directory (failed tests).
        let dir = self.dir.path().to_path_buf();
        for m in datastore::mount::mounts()
            .unwrap_or_default()
            .into_iter()
            .rev()
        {
            if m.mount_point.starts_with(&dir) {
                let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// NodeStageVolume of `id` at `staging`, read-only mount access.
pub fn stage_req(
    id: &str,
    staging: &str,
    ctx: &std::collections::HashMap<String, String>,
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(ro_cap()),
        volume_context: ctx.clone(),
        ..Default::default()
    }
}

/// NodePublishVolume of `id` from `staging` to `target`.
pub fn publish_req(
    id: &str,
    staging: &str,
    target: &str,
    ctx: &std::collections::HashMap<String, String>,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(ro_cap()),
        readonly: false,
        volume_context: ctx.clone(),
        ..Default::default()
    }
}

/// A gRPC channel over a Unix socket.
pub async fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::1]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("connect to the CSI socket")
}

/// Live (not zombie) `datastore fd-holder` processes serving `socket`.
pub fn holder_pids(socket: &Path) -> Vec<i32> {
    let needle = socket.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        // `datastore fd-holder --socket PATH ...` (the plugin's own command line names the
        // socket too, after --fd-holder-socket).
        if args.get(1).is_some_and(|a| a == "fd-holder") && args.contains(&needle) && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Kills every process whose command line contains `needle`.
pub fn kill_matching(needle: &str) {
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && pid != std::process::id() as i32 {
            // SAFETY: sending a signal to a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

pub fn ro_cap() -> pb::VolumeCapability {
    cap(pb::volume_capability::access_mode::Mode::MultiNodeReaderOnly)
}

pub fn cap(mode: pb::volume_capability::access_mode::Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Asserts a gRPC result failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: tonic::Code) {
    match r {
        Err(s) if s.code() == code => {}
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Our FUSE mounts below `dir` (staging mounts and their binds).
pub fn our_mounts(dir: &Path) -> Vec<datastore::mount::MountEntry> {
    datastore::mount::mounts()
        .expect("mountinfo")
        .into_iter()
        .filter(|m| m.fs_type == "fuse.datastore" && m.mount_point.starts_with(dir))
        .collect()
}

/// Aborts the FUSE connection of our (only) FUSE mount below `dir` through the kernel's control
/// filesystem: the mount and its binds then answer ENOTCONN.
pub fn abort_fuse_connection(dir: &Path) {
    let fusectl = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(fusectl)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        let _ = nix::mount::mount(
            Some("fusectl"),
            fusectl,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let m = our_mounts(dir).into_iter().next().expect("mount");
    let minor = m.device.split(':').nth(1).expect("minor");
    std::fs::write(fusectl.join(minor).join("abort"), "1").expect("abort the connection");
}

/// Open file descriptors and threads of a process.
pub fn fds_and_threads(pid: u32) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    (fds, threads)
}
