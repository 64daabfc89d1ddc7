"""Development credentials for a Flower deployment, made with ``cryptography``.

``make_certs(DIR, nodes=N)`` writes::

    DIR/ca.crt, DIR/ca.key            a self-signed CA (10 days; development only)
    DIR/server.pem, DIR/server.key    the SuperLink's TLS certificate (127.0.0.1, localhost)
    DIR/node_<i>, DIR/node_<i>.pub    SuperNode i's authentication key pair (OpenSSH, EC P-384)

Flower flags: SuperLink ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
server.key --enable-supernode-auth``; SuperNode ``--root-certificates ca.crt
--auth-supernode-private-key node_<i>``; register each ``node_<i>.pub`` with
``flwr supernode register``. Never use these files outside development.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class DevCerts:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    def node_key(self, i: int) -> Path:
        return self.dir / f"node_{i}"

    def node_pub(self, i: int) -> Path:
        return self.dir / f"node_{i}.pub"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certs(out: str | Path, nodes: int = 2, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
               days: int = 10) -> DevCerts:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("fedblend dev CA")).issuer_name(_name("fedblend dev CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
        .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    certs = DevCerts(d)
    _write(certs.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(d / "ca.key", _pem_key(ca_key), private=True)
    _write(certs.server_cert, srv.public_bytes(serialization.Encoding.PEM))
    _write(certs.server_key, _pem_key(srv_key), private=True)
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(certs.node_key(i), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ), private=True)
        _write(certs.node_pub(i), key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ))
    return certs
