"""`datumflow up --secure`: generated credentials and TLS for the embedded broker.

Under `<home>/secure/` (a 0700 directory, every file 0600):
- `ca.pem`: a private certificate authority made for this state directory (its key is thrown away
  once it has signed the server's certificate);
- `server.pem`, `server-key.pem`: the broker's certificate for 127.0.0.1 / localhost;
- `credentials.json`: the user name and a random password every datumflow process uses;
- `server.conf`: the nats-server `authorization` and `tls` blocks, included by the embedded server's
  config (datumflow.runtime.embedded).

The CLI and the functions find the credentials here (datumflow.runtime.service.resolve), so a
secured state directory needs no flags. Once secured, a state directory stays secured; delete
`<home>/secure` (with datumflow down) to go back.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path

import msgspec

from datumflow.errors import DatumflowError
from datumflow.settings import Settings

USER = "datumflow"


class SecureHome(msgspec.Struct, kw_only=True):
    """Where a secured state directory keeps its credentials and certificates."""

    user: str
    password: str
    ca: str
    cert: str
    key: str
    config: str


def secure_dir(home: Path) -> Path:
    return home / "secure"


def load(home: Path) -> SecureHome | None:
    """The state directory's credentials, or None if it is not secured."""
    path = secure_dir(home) / "credentials.json"
    try:
        return msgspec.json.decode(path.read_bytes(), type=SecureHome)
    except FileNotFoundError:
        return None
    except msgspec.DecodeError as exc:
        raise DatumflowError(
            f"{path} is damaged ({exc}); stop datumflow and delete {secure_dir(home)} to make new"
            " credentials"
        ) from None


def ensure(home: Path) -> SecureHome:
    """The state directory's credentials, made now if it has none."""
    existing = load(home)
    if existing is not None:
        return existing
    directory = secure_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_pem, cert_pem, key_pem = _certificates()
    made = SecureHome(
        user=USER,
        password=secrets.token_urlsafe(32),
        ca=str(directory / "ca.pem"),
        cert=str(directory / "server.pem"),
        key=str(directory / "server-key.pem"),
        config=str(directory / "server.conf"),
    )
    _write_private(Path(made.ca), ca_pem)
    _write_private(Path(made.cert), cert_pem)
    _write_private(Path(made.key), key_pem)
    _write_private(Path(made.config), server_config(made).encode())
    # Written last: its presence means the rest is complete.
    _write_private(directory / "credentials.json", msgspec.json.encode(made))
    return made


def server_config(made: SecureHome) -> str:
    """nats-server config: every client must present the password, over TLS."""
    return "\n".join(
        [
            "authorization {",
            f"  user: {json.dumps(made.user)}",
            f"  password: {json.dumps(made.password)}",
            "  timeout: 5",
            "}",
            "tls {",
            f"  cert_file: {json.dumps(made.cert)}",
            f"  key_file: {json.dumps(made.key)}",
            f"  ca_file: {json.dumps(made.ca)}",
            "  timeout: 5",
            "}",
            "",
        ]
    )


def apply(settings: Settings, made: SecureHome) -> Settings:
    """Settings that connect with the state directory's credentials, unless some are named."""
    if settings.nats_user or settings.nats_token or settings.nats_creds or settings.nats_nkey_seed:
        return settings
    return msgspec.structs.replace(
        settings,
        nats_user=made.user,
        nats_password=made.password,
        nats_tls_ca=settings.nats_tls_ca or made.ca,
    )


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _certificates() -> tuple[bytes, bytes, bytes]:
    """A CA and a server certificate it signed, for 127.0.0.1, ::1 and localhost."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise DatumflowError(
            "datumflow up --secure makes its certificates with the `cryptography` package, which"
            " is not installed: pip install cryptography"
        ) from None
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "datumflow local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        ca.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
