"""Makes the Secrets the Kubernetes base reads but does not ship (`make k8s-secrets`):

- loramesh-gateway-auth: `jwks.json` (the public half of a new RSA key) and `api-keys`
  (one new X-Key per line);
- loramesh-nats-users: one password per NATS user of services/common/nats_auth.py, read by
  the NATS pods (nats.conf's $LORAMESH_NATS_PASSWORD_<USER>) and by each service;
- loramesh-webhook: LORAMESH_WEBHOOK_SECRET, the key of the training webhooks' signature;
- loramesh-nats-tls: a certificate for the NATS pods from a new CA (tls.crt, tls.key,
  ca.crt), used by the nats-tls component only.

They go to OUT (default var/k8s-secrets, which git ignores) as secrets.yaml, beside the
private key (jwt-private.pem, to sign more tokens), a bearer token signed with it
(operator-token.txt) and the API keys (api-keys). Apply with
`kubectl apply -n loramesh -f var/k8s-secrets/secrets.yaml`; keep the folder out of version
control. An existing OUT is left alone unless --force (which replaces every secret).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import secrets
import sys
import time
from pathlib import Path

import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from services.common import nats_auth  # noqa: E402

NAMESPACE = "loramesh"
KEY_ID = "loramesh-1"


def secret(name: str, data: dict[str, str], kind: str = "Opaque") -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": kind,
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "loramesh"}},
            "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}}


def _pem(obj) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def nats_certificates(namespace: str = NAMESPACE, extra_names: tuple[str, ...] = (),
                      days: int = 825) -> dict[str, str]:
    """A new CA and a server certificate for the NATS Service and each of its pods (and
    `extra_names`: host names or IP addresses): tls.crt, tls.key and ca.crt."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loramesh NATS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = [f"{prefix}nats{suffix}" for prefix in ("", "*.")
             for suffix in ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local")]
    alt_names = []
    for name in [*names, *extra_names]:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return {"tls.crt": _pem(cert), "tls.key": _pem(key), "ca.crt": _pem(ca)}


def make(out: Path, *, subject: str, token_days: float, issuer: str | None, audience: str | None,
         api_keys: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())) | {"kid": KEY_ID, "alg": "RS256",
                                                                             "use": "sig"}
    claims = {"sub": subject, "iat": int(time.time()), "exp": int(time.time() + token_days * 86400)}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KEY_ID})
    keys = [secrets.token_urlsafe(32) for _ in range(api_keys)]
    objects = [
        secret("loramesh-gateway-auth", {"jwks.json": json.dumps({"keys": [jwk]}, indent=2) + "\n",
                                         "api-keys": "".join(k + "\n" for k in keys)}),
        secret("loramesh-nats-users", {user.name: nats_auth.new_password() for user in nats_auth.USERS}),
        secret("loramesh-webhook", {"LORAMESH_WEBHOOK_SECRET": secrets.token_hex(32)}),
        secret("loramesh-nats-tls", nats_certificates(), kind="kubernetes.io/tls"),
    ]
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files = {"secrets.yaml": yaml.safe_dump_all(objects, sort_keys=False), "jwt-private.pem": private.decode(),
             "operator-token.txt": token + "\n", "api-keys": "".join(k + "\n" for k in keys)}
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        path.chmod(0o600)
    return objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "k8s-secrets")
    parser.add_argument("--force", action="store_true", help="replace the secrets in an existing OUT")
    parser.add_argument("--subject", default="operator", help="the token's sub (the owner of its training tasks)")
    parser.add_argument("--token-days", type=float, default=30.0, help="days until the token expires")
    parser.add_argument("--issuer", help="the token's iss (match LORAMESH_JWT_ISSUER)")
    parser.add_argument("--audience", help="the token's aud (one of LORAMESH_JWT_AUDIENCES)")
    parser.add_argument("--api-keys", type=int, default=1, help="how many X-Key values to make")
    args = parser.parse_args(argv)
    if args.token_days <= 0 or args.api_keys < 1:
        parser.error("--token-days must be positive and --api-keys at least 1")
    if (args.out / "secrets.yaml").exists() and not args.force:
        parser.error(f"{args.out} already holds secrets; pass --force to replace them all")
    make(args.out, subject=args.subject, token_days=args.token_days, issuer=args.issuer,
         audience=args.audience, api_keys=args.api_keys)
    print(f"wrote {args.out}/secrets.yaml (apply: kubectl apply -n {NAMESPACE} -f {args.out}/secrets.yaml),\n"
          f"  jwt-private.pem, operator-token.txt (Authorization: Bearer ...) and api-keys (X-Key)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
