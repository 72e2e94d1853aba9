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
//! `NONE`), `DEL <id>`, `LIST` (`OK` and one id per line).

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept, bind, connect, listen, recvmsg, sendmsg, socket,
};

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

/// A client of the holder at a socket path.
#[derive(Debug, Clone)]
pub struct HolderClient {
    path: PathBuf,
}

impl HolderClient {
    pub fn new(path: &Path) -> HolderClient {
        HolderClient {
            path: path.to_path_buf(),
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

    /// Hands a copy of `fd` to the holder under `id` (replacing an earlier one).
    pub fn put(&self, id: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.call(&format!("PUT {id}"), Some(fd)).map(|_| ())
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

    /// Makes sure a holder serves the socket: if none answers, starts `exe fd-holder --socket
    /// PATH` as a detached process (its own session, so it outlives this one) and waits for it.
    pub fn ensure_running(&self, exe: &Path) -> std::io::Result<()> {
        if self.ping() {
            return Ok(());
        }
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("fd-holder").arg("--socket").arg(&self.path);
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
        for _ in 0..100 {
            if self.ping() {
                // Reap it in the background if it ever exits while we live.
                std::thread::spawn(move || child.wait());
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        Err(std::io::Error::other(format!(
            "fd holder did not start on {}",
            self.path.display()
        )))
    }
}

/// Serves the holder protocol on `path` until the process is killed.
pub fn serve(path: &Path) -> std::io::Result<()> {
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
    tracing::info!(socket = %path.display(), "fd holder serving");
    let mut held: HashMap<String, OwnedFd> = HashMap::new();
    loop {
        let conn = match accept(sock.as_raw_fd()) {
            Ok(fd) => {
                // SAFETY: accept returned a new descriptor that we now own.
                unsafe { OwnedFd::from_raw_fd(fd) }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io_err(e)),
        };
        if let Err(e) = handle(&conn, &mut held) {
            tracing::warn!(error = %e, "fd holder request failed");
        }
    }
}

fn handle(conn: &OwnedFd, held: &mut HashMap<String, OwnedFd>) -> std::io::Result<()> {
    let (req, fd) = recv(conn.as_fd())?;
    let (verb, id) = req.split_once(' ').unwrap_or((req.as_str(), ""));
    let valid_id = !id.is_empty() && id.len() <= 1024 && !id.contains('\n');
    match (verb, fd) {
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
    }
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
        std::thread::spawn(move || serve(&server_sock));
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
}
