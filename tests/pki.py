"""Certificates made at test time with trustme: a CA, a server certificate, client ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pki:
    """PEM files in ``directory``: ``ca`` signs the server's and the clients' certificates."""

    directory: Path
    ca: trustme.CA
    ca_file: str
    #: Certificate chain and key of ``localhost`` / ``127.0.0.1``, in one file.
    server_pem: str

    def client(self, identity: str, *, ca: trustme.CA | None = None) -> tuple[str, str]:
        """``(cert, key)`` files of a client certificate naming ``identity`` (an email SAN
        when it has an ``@``, else a DNS SAN), signed by this CA or ``ca``."""
        issued = (ca or self.ca).issue_cert(identity)
        cert = self.directory / f"client-{identity}.pem"
        key = self.directory / f"client-{identity}.key"
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        return str(cert), str(key)

    def renew_server(self, ca: trustme.CA) -> None:
        """Replace the server's certificate file with one ``ca`` signed (a renewal)."""
        issued = ca.issue_cert("localhost", "127.0.0.1")
        issued.private_key_and_cert_chain_pem.write_to_path(self.server_pem)


def make_pki(directory: Path) -> Pki:
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    server = directory / "server.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(server)
    return Pki(directory, ca, str(ca_file), str(server))
