"""Test credentials: a CA with server and client certificates, NKEYs, and NATS JWT creds files.

Everything is made here, in the test, with `cryptography` and `nkeys`; nothing is fetched.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path

import msgspec


class Pki(msgspec.Struct, kw_only=True):
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        return cert.public_bytes(pem), key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    server = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    client = leaf("datumflow-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "server.pem": server[0],
        "server-key.pem": server[1],
        "client.pem": client[0],
        "client-key.pem": client[1],
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
        os.chmod(directory / name, 0o600)
    return Pki(
        ca=str(directory / "ca.pem"),
        server_cert=str(directory / "server.pem"),
        server_key=str(directory / "server-key.pem"),
        client_cert=str(directory / "client.pem"),
        client_key=str(directory / "client-key.pem"),
    )


# -- NKEYs and JWTs -----------------------------------------------------------------------------


def new_nkey(kind: str):  # type: ignore[no-untyped-def]
    """A fresh key pair: kind is "operator", "account" or "user"."""
    import nkeys

    prefix = {
        "operator": nkeys.PREFIX_BYTE_OPERATOR,
        "account": nkeys.PREFIX_BYTE_ACCOUNT,
        "user": nkeys.PREFIX_BYTE_USER,
    }[kind]
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(issuer, subject: str, name: str, nats: dict) -> str:  # type: ignore[no-untyped-def]
    claims = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest())
        .decode()
        .rstrip("=")
    )
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def operator_setup(directory: Path) -> tuple[str, str]:
    """(server config for operator mode with one JetStream-enabled account, a user creds file)."""
    operator, account, user = new_nkey("operator"), new_nkey("account"), new_nkey("user")
    system = new_nkey("account")
    system_pub = system.public_key.decode()
    operator_pub = operator.public_key.decode()
    account_pub = account.public_key.decode()
    operator_jwt = jwt(operator, operator_pub, "test-operator", {"type": "operator"})
    unlimited = {
        "subs": -1,
        "conn": -1,
        "leaf": -1,
        "imports": -1,
        "exports": -1,
        "data": -1,
        "payload": -1,
        "wildcards": True,
        "mem_storage": -1,
        "disk_storage": -1,
        "streams": -1,
        "consumer": -1,
    }
    account_jwt = jwt(
        operator,
        account_pub,
        "datumflow",
        {"type": "account", "limits": unlimited, "default_permissions": {"pub": {}, "sub": {}}},
    )
    system_jwt = jwt(operator, system_pub, "SYS", {"type": "account"})
    user_jwt = jwt(
        account,
        user.public_key.decode(),
        "datumflow-user",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    creds = directory / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    os.chmod(creds, 0o600)
    config = "\n".join(
        [
            f"operator: {operator_jwt}",
            f"system_account: {system_pub}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f"  {account_pub}: {account_jwt}",
            f"  {system_pub}: {system_jwt}",
            "}",
        ]
    )
    return config, str(creds)
