"""A local FSx endpoint for the integration tests: moto's FSx server, plus the two things its
model lacks, added here and nowhere else:

- a lifecycle: moto's file systems have no Lifecycle field; here a file system is CREATING when
  created and on its first describe, then AVAILABLE (real FSx takes minutes for this);
- a MountName in the Lustre configuration (real FSx generates one), and the import path where
  FSx reports it (moto echoes the request's LustreConfiguration as it came).

Prints the port on stdout, then serves until stdin closes (the test process ends).
"""

import socket
import sys

from moto.fsx import models
from moto.server import ThreadedMotoServer

_to_dict = models.FileSystem.to_dict


def to_dict(self):
    d = _to_dict(self)
    views = getattr(self, "_views", 0)
    self._views = views + 1
    d["Lifecycle"] = "CREATING" if views < 2 else "AVAILABLE"
    lustre = dict(d.get("LustreConfiguration") or {})
    lustre.setdefault("MountName", self.file_system_id.replace("fs-", "")[:8])
    if "ImportPath" in lustre:
        lustre["DataRepositoryConfiguration"] = {"ImportPath": lustre.pop("ImportPath"), "Lifecycle": "AVAILABLE"}
    d["LustreConfiguration"] = lustre
    return d


models.FileSystem.to_dict = to_dict


def main():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
