"""Test certificates, made with the openssl command line as the chart's `genCA`/`genSignedCert` make
them: a CA, and leaf certificates it signs with the name as CN and as DNS subjectAltName (gRPC's TLS
checks the SAN), good for both server and client use."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess


@dataclasses.dataclass(frozen=True)
class Leaf:
    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path  # the CA that signed it

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def ca(directory: pathlib.Path, name: str) -> pathlib.Path:
    """A new CA in `directory` (its key beside it as <name>.key); its certificate's path."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={name}", "-days", "2",
    )  # fmt: skip
    return crt


def leaf(ca_crt: pathlib.Path, name: str, *, directory: pathlib.Path | None = None, ip: str = "") -> Leaf:
    """A certificate for `name` (and the address `ip`), signed by the CA `ca_crt` (made by `ca`)."""
    d = directory or ca_crt.parent
    stem = d / f"{name}-by-{ca_crt.stem}"
    key, csr, crt, ext = (stem.with_suffix(s) for s in (".key", ".csr", ".crt", ".ext"))
    san = f"DNS:{name}" + (f",IP:{ip}" if ip else "")
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_crt.with_suffix(".key")),
        "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return Leaf(cert=crt, key=key, ca=ca_crt)
