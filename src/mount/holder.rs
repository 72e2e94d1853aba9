//! The FUSE descriptor holder: a tiny process that keeps a copy of every FUSE connection's
//! /dev/fuse descriptor, so that the kernel keeps the connections (and every pod's mount)
//! alive while the node plugin restarts.
//!
//! The kernel tears a FUSE connection down when the last descriptor on it is closed. The node
//! plugin hands each new descriptor to the holder (`PUT`); after a crash, the restarted plugin
//! takes them back (`GET`) and serves the same connections again, asking the kernel to resend
//! requests the dead process had read but not answered. In Kubernetes the holder runs as its
//! own container of the node pod (it must not share the plugin container's lifetime); outside
//! Kubernetes the plugin starts it as a detached process.
//!
//! Protocol: one request per connection on a SOCK_SEQPACKET Unix socket (owner-only): `PING`,
//! `PUT <id>` (with the descriptor as SCM_RIGHTS), `GET <id>` (answered `OK` with a copy, or
//! `NONE`), `DEL <id>`, `LIST` (`OK` and one id per line), and `ATTACH`: answered `OK`, the
//! connection then stays open for as long as the driver lives (its presence).
//!
//! Lifetime: a holder started by the plugin itself (`--exit-when-idle`) must not outlive its
//! purpose, yet must never drop a descriptor. It exits only when it holds no descriptor *and*
//! either no driver has been attached for the grace period or its socket path no longer leads
//! to it (the state directory was deleted, or another holder took the path): nobody could
//! hand it anything again. While it holds a descriptor it stays, attached or not: that is the
//! restart window, in which the next plugin process must find it. A plugin that got `OK` to
//! `ATTACH` is sure the holder stays while it lives (no race with an idle exit). The holder
//! run as its own container (no `--exit-when-idle`) never exits on its own: its container
//! would be restarted, and with it every mount it keeps.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept, bind, connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

const MAX_MSG: usize = 64 * 1024;

fn io_err(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

fn send(fd: BorrowedFd<'_>, text: &str, pass: Option<RawFd>) -> std::io::Result<()> {
    let iov = [IoSlice::new(text.as_bytes())];
    let fds;
    let cmsgs: Vec<ControlMessage<'_>> = match pass {
        Some(f) => {
            fds = [f];
            vec![ControlMessage::ScmRights(&fds)]
        }
        None => Vec::new(),
    };
    sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).map_err(io_err)?;
    Ok(())
}

fn recv(fd: BorrowedFd<'_>) -> std::io::Result<(String, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, received) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io_err)?;
        let mut received = None;
        for c in msg.cmsgs().map_err(io_err)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for (i, f) in fds.into_iter().enumerate() {
                    // SAFETY: the kernel just installed this descriptor in our table for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    if i == 0 && received.is_none() {
                        received = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, received)
    };
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), received))
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io_err)
}

/// How a plugin starts its own holder when none answers.
#[derive(Debug, Clone)]
struct Spawn {
    exe: PathBuf,
    idle_exit: Duration,
}

/// A client of the holder at a socket path. Clones share the presence connection (`ATTACH`)
/// and how to start a holder.
#[derive(Debug, Clone)]
pub struct HolderClient {
    path: PathBuf,
    presence: Arc<Mutex<Option<OwnedFd>>>,
    spawn: Arc<Mutex<Option<Spawn>>>,
}

impl HolderClient {
    pub fn new(path: &Path) -> HolderClient {
        HolderClient {
            path: path.to_path_buf(),
            presence: Arc::default(),
            spawn: Arc::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn call(
        &self,
        request: &str,
        pass: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<(String, Option<OwnedFd>)> {
        let sock = seqpacket()?;
        let addr = UnixAddr::new(&self.path).map_err(io_err)?;
        connect(sock.as_raw_fd(), &addr).map_err(io_err)?;
        send(sock.as_fd(), request, pass.map(|f| f.as_raw_fd()))?;
        let (reply, fd) = recv(sock.as_fd())?;
        if let Some(msg) = reply.strip_prefix("ERR ") {
            return Err(std::io::Error::other(format!("fd holder: {msg}")));
        }
        Ok((reply, fd))
    }

    /// Whether a holder answers on the socket.
    pub fn ping(&self) -> bool {
        matches!(self.call("PING", None), Ok((r, _)) if r == "OK")
    }

    /// Hands a copy of `fd` to the holder under `id` (replacing an earlier one). When this
    /// plugin started the holder and it is gone (killed), a new one is started first.
    pub fn put(&self, id: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        match self.call(&format!("PUT {id}"), Some(fd)) {
            Ok(_) => Ok(()),
            Err(e) => {
                let spawn = self.spawn.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(spawn) = spawn else {
                    return Err(e);
                };
                tracing::warn!(error = %e, "fd holder unreachable: starting a new one");
                self.ensure_running(&spawn.exe, spawn.idle_exit)?;
                self.call(&format!("PUT {id}"), Some(fd)).map(|_| ())
            }
        }
    }

    /// A copy of the descriptor held under `id`, if any (the holder keeps its own).
    pub fn get(&self, id: &str) -> std::io::Result<Option<OwnedFd>> {
        let (reply, fd) = self.call(&format!("GET {id}"), None)?;
        match reply.as_str() {
            "OK" => Ok(fd),
            _ => Ok(None),
        }
    }

    /// Drops the descriptor held under `id`.
    pub fn delete(&self, id: &str) -> std::io::Result<()> {
        self.call(&format!("DEL {id}"), None).map(|_| ())
    }

    /// Ids of the held descriptors.
    pub fn list(&self) -> std::io::Result<Vec<String>> {
        let (reply, _) = self.call("LIST", None)?;
        Ok(reply.lines().skip(1).map(str::to_owned).collect())
    }

    /// Registers this process as a live driver: the holder answers `OK` and keeps the
    /// connection; it counts as attached until this process exits (the kernel closes the
    /// connection then). Returns false if a holder answers but does not know `ATTACH` (an
    /// older one, which never exits on its own anyway).
    pub fn attach(&self) -> std::io::Result<bool> {
        let sock = seqpacket()?;
        let addr = UnixAddr::new(&self.path).map_err(io_err)?;
        connect(sock.as_raw_fd(), &addr).map_err(io_err)?;
        send(sock.as_fd(), "ATTACH", None)?;
        let (reply, _) = recv(sock.as_fd())?;
        match reply.as_str() {
            "OK" => {
                *self.presence.lock().unwrap_or_else(|p| p.into_inner()) = Some(sock);
                Ok(true)
            }
            "" => Err(std::io::Error::other("fd holder closed the connection")),
            _ => Ok(false),
        }
    }

    /// Makes sure a holder serves the socket and this process is attached to it: if none
    /// answers, starts `exe fd-holder --socket PATH --exit-when-idle GRACE` as a detached
    /// process (its own session, so that it outlives this one) and waits for it. That holder
    /// exits once it holds no descriptor and no driver has been attached for `idle_exit`.
    pub fn ensure_running(&self, exe: &Path, idle_exit: Duration) -> std::io::Result<()> {
        *self.spawn.lock().unwrap_or_else(|p| p.into_inner()) = Some(Spawn {
            exe: exe.to_path_buf(),
            idle_exit,
        });
        // A holder that is exiting at this very moment fails the attach: start a new one.
        if self.attach().is_ok() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("fd-holder").arg("--socket").arg(&self.path);
        cmd.arg("--exit-when-idle")
            .arg(humantime::format_duration(idle_exit).to_string());
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: setsid is async-signal-safe and only affects the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.attach().is_ok_and(|attached| attached) {
                // Reap it in the background if it ever exits while we live.
                std::thread::spawn(move || child.wait());
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Lost a race with another starting holder, which serves the path now.
                if self.attach().is_ok_and(|attached| attached) {
                    return Ok(());
                }
                return Err(std::io::Error::other(format!(
                    "fd holder on {} exited at once ({status})",
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(std::io::Error::other(format!(
            "fd holder did not start on {}",
            self.path.display()
        )))
    }
}

/// When a holder goes away on its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct HolderOptions {
    /// Exit once no descriptor is held and no driver has been attached for this long, or
    /// the socket path no longer leads here (`None`: never exit on its own).
    pub exit_when_idle: Option<Duration>,
}

/// How often an idle-exiting holder looks at its socket path.
const TICK: Duration = Duration::from_millis(250);
/// A connected client has this long to send its request (the loop serves one at a time).
const REQUEST_TIMEOUT_MS: i64 = 5_000;

/// The (device, inode) of the socket file at `path`, if any.
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Serves the holder protocol on `path` until the process is killed or, with
/// `exit_when_idle`, until it holds nothing and nobody could hand it anything again.
pub fn serve(path: &Path, opts: HolderOptions) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if HolderClient::new(path).ping() {
        return Err(std::io::Error::other(format!(
            "another fd holder serves {}",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    let sock = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(io_err)?;
    bind(sock.as_raw_fd(), &addr).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listen(&sock, Backlog::new(64).map_err(io_err)?).map_err(io_err)?;
    let ours = socket_identity(path);
    tracing::info!(socket = %path.display(), exit_when_idle = ?opts.exit_when_idle, "fd holder serving");
    let mut held: HashMap<String, OwnedFd> = HashMap::new();
    // Connections of live drivers (ATTACH); one goes when its process does.
    let mut attached: Vec<OwnedFd> = Vec::new();
    let mut busy_at = Instant::now();
    let mut warned_gone = false;
    loop {
        let timeout = match opts.exit_when_idle {
            Some(_) => PollTimeout::try_from(TICK).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let (listener_ready, hung_up) = {
            let mut fds = Vec::with_capacity(attached.len() + 1);
            fds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
            fds.extend(attached.iter().map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)));
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io_err(e)),
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let hung_up: Vec<usize> = fds[1..]
                .iter()
                .enumerate()
                .filter(|(_, f)| ready(f))
                .map(|(i, _)| i)
                .collect();
            (ready(&fds[0]), hung_up)
        };
        // An attached driver never sends more: readable means closed (or misbehaving).
        for i in hung_up.into_iter().rev() {
            attached.swap_remove(i);
            tracing::info!(attached = attached.len(), "a driver went away");
        }
        if listener_ready {
            busy_at = Instant::now();
            match accept(sock.as_raw_fd()) {
                Ok(fd) => {
                    // SAFETY: accept returned a new descriptor that we now own.
                    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
                    let timeout = TimeVal::milliseconds(REQUEST_TIMEOUT_MS);
                    let _ = setsockopt(&conn, sockopt::ReceiveTimeout, &timeout);
                    match handle(&conn, &mut held) {
                        Ok(Keep::Attach) => {
                            attached.push(conn);
                            tracing::info!(attached = attached.len(), "a driver attached");
                        }
                        Ok(Keep::No) => {}
                        Err(e) => tracing::warn!(error = %e, "fd holder request failed"),
                    }
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        let Some(grace) = opts.exit_when_idle else {
            continue;
        };
        let gone = socket_identity(path) != ours;
        if !held.is_empty() {
            // Never drop a connection: the pods' mounts depend on it.
            if gone && !warned_gone {
                tracing::warn!(socket = %path.display(), held = held.len(), "the socket path is gone; keeping the held FUSE descriptors");
                warned_gone = true;
            }
            busy_at = Instant::now();
            continue;
        }
        if gone {
            tracing::info!(socket = %path.display(), "no descriptor held and the socket path is gone: exiting");
            return Ok(());
        }
        if !attached.is_empty() {
            busy_at = Instant::now();
        } else if busy_at.elapsed() >= grace {
            tracing::info!(?grace, "no descriptor held and no driver attached: exiting");
            if socket_identity(path) == ours {
                let _ = std::fs::remove_file(path);
            }
            return Ok(());
        }
    }
}

/// Whether a connection stays open after its request.
enum Keep {
    No,
    Attach,
}

fn handle(conn: &OwnedFd, held: &mut HashMap<String, OwnedFd>) -> std::io::Result<Keep> {
    let (req, fd) = recv(conn.as_fd())?;
    let (verb, id) = req.split_once(' ').unwrap_or((req.as_str(), ""));
    let valid_id = !id.is_empty() && id.len() <= 1024 && !id.contains('\n');
    if verb == "ATTACH" {
        send(conn.as_fd(), "OK", None)?;
        return Ok(Keep::Attach);
    }
    let reply = match (verb, fd) {
        ("PING", _) => send(conn.as_fd(), "OK", None),
        ("PUT", Some(fd)) if valid_id => {
            tracing::info!(id, "holding FUSE descriptor");
            held.insert(id.to_owned(), fd);
            send(conn.as_fd(), "OK", None)
        }
        ("GET", _) if valid_id => match held.get(id) {
            Some(fd) => send(conn.as_fd(), "OK", Some(fd.as_raw_fd())),
            None => send(conn.as_fd(), "NONE", None),
        },
        ("DEL", _) if valid_id => {
            if held.remove(id).is_some() {
                tracing::info!(id, "released FUSE descriptor");
            }
            send(conn.as_fd(), "OK", None)
        }
        ("LIST", _) => {
            let mut ids: Vec<&String> = held.keys().collect();
            ids.sort();
            let body = std::iter::once("OK")
                .chain(ids.iter().map(|s| s.as_str()))
                .collect::<Vec<_>>()
                .join("\n");
            send(conn.as_fd(), &body, None)
        }
        _ => send(conn.as_fd(), "ERR bad request", None),
    };
    reply.map(|()| Keep::No)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn holds_and_returns_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("holder.sock");
        let server_sock = sock.clone();
        std::thread::spawn(move || serve(&server_sock, HolderOptions::default()));
        let client = HolderClient::new(&sock);
        for _ in 0..100 {
            if client.ping() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(client.ping());
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"held bytes").unwrap();
        client.put("vol-1", f.as_fd()).unwrap();
        drop(f);
        assert_eq!(client.list().unwrap(), vec!["vol-1".to_string()]);
        let back = client.get("vol-1").unwrap().expect("held");
        let mut file = std::fs::File::from(back);
        file.rewind().unwrap();
        let mut s = String::new();
        file.read_to_string(&mut s).unwrap();
        assert_eq!(s, "held bytes");
        assert!(client.get("other").unwrap().is_none());
        client.delete("vol-1").unwrap();
        assert!(client.list().unwrap().is_empty());
        assert!(client.call("PUT no-fd", None).is_err());
        assert!(client.call("BOGUS", None).is_err());
    }

    /// Starts an idle-exiting holder in a thread; the receiver gets its result when it exits.
    fn idle_holder(
        sock: &Path,
        grace: Duration,
    ) -> std::sync::mpsc::Receiver<std::io::Result<()>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = sock.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(serve(&path, HolderOptions { exit_when_idle: Some(grace) }));
        });
        let client = HolderClient::new(sock);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !client.ping() {
            assert!(Instant::now() < deadline, "holder did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        rx
    }

    /// Asserts the holder is still running after `window` (nothing to poll for: it must not
    /// happen during the whole window).
    fn stays(rx: &std::sync::mpsc::Receiver<std::io::Result<()>>, window: Duration, why: &str) {
        match rx.recv_timeout(window) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            other => panic!("the holder exited {why}: {other:?}"),
        }
    }

    #[test]
    fn idle_holder_exits_without_descriptors_or_drivers() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("holder.sock");
        let grace = Duration::from_millis(200);
        let rx = idle_holder(&sock, grace);
        // An attached driver keeps it, however long.
        let driver = HolderClient::new(&sock);
        assert!(driver.attach().unwrap());
        stays(&rx, grace * 5, "while a driver was attached");
        // The driver goes: after the grace period, so does the holder, with its socket.
        drop(driver);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the idle holder did not exit")
            .expect("clean exit");
        assert!(!sock.exists(), "an exiting holder removes its socket");
    }

    #[test]
    fn idle_holder_never_drops_a_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("holder.sock");
        let grace = Duration::from_millis(200);
        let rx = idle_holder(&sock, grace);
        let client = HolderClient::new(&sock);
        let f = tempfile::tempfile().unwrap();
        client.put("vol-1", f.as_fd()).unwrap();
        // No driver, and then not even its socket path: it holds a descriptor, so it stays.
        stays(&rx, grace * 5, "while holding a descriptor and no driver");
        let moved = dir.path().join("moved.sock");
        std::fs::rename(&sock, &moved).unwrap();
        stays(&rx, grace * 5, "while holding a descriptor, its socket path gone");
        // Released: nothing held and the path is gone: it exits without waiting for the grace.
        HolderClient::new(&moved).delete("vol-1").unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the holder did not exit once it held nothing")
            .expect("clean exit");
    }

    #[test]
    fn socket_path_removed_ends_an_empty_holder_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("state").join("holder.sock");
        let rx = idle_holder(&sock, Duration::from_secs(3600));
        let driver = HolderClient::new(&sock);
        assert!(driver.attach().unwrap());
        std::fs::remove_dir_all(dir.path().join("state")).unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the holder outlived its socket directory")
            .expect("clean exit");
    }
}
