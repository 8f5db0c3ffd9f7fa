"""The region's signing key: every ledger entry is signed by it, so nobody without the key
(the coordinator, or anyone who can only rewrite files) can forge, re-chain or re-sign a
region's privacy record.

The key is Ed25519 and lives in the region's state folder: `signing.key` (private, mode 0600,
never leaves the region) and `signing.pub` (the public half, hex). The public half travels with
every update, the coordinator records it in each claim, and a privacy officer pins it
(`fedrec privacy status` prints it; `fedrec audit --key REGION=HEX` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrec.atomic import atomic_file, write_failed
from fedrec.errors import FedrecError

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def public_hex(self) -> str:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw).hex()

    def sign(self, message: bytes) -> str:
        return self.private.sign(message).hex()

    @classmethod
    def load_or_create(cls, state_dir: str | Path) -> "SigningKey":
        """The region's key, created on its first spend (the public half written beside it)."""
        folder = Path(state_dir)
        private_path = folder / PRIVATE_KEY_FILE
        if private_path.exists():
            try:
                key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
            except (ValueError, TypeError, OSError) as exc:
                raise FedrecError(f"{private_path}: not a readable Ed25519 private key ({exc})",
                                  hint="Restore the region's key from its backup; without it the region "
                                       "cannot sign further spends.") from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise FedrecError(f"{private_path}: not an Ed25519 key")
            return cls(key)
        key = cls(Ed25519PrivateKey.generate())
        pem = key.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(folder / PUBLIC_KEY_FILE) as handle:
                handle.write(key.public_hex + "\n")
            with atomic_file(private_path, "wb") as handle:     # created mode 0600 (mkstemp)
                handle.write(pem)
        except OSError as exc:
            raise write_failed(private_path, exc) from exc
        return key


def verify_signature(public_hex: str, message: bytes, signature_hex: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def read_public_key(state_dir: str | Path) -> str | None:
    """The public half kept in a region's state folder, if there is one."""
    path = Path(state_dir) / PUBLIC_KEY_FILE
    try:
        return path.read_text().strip() if path.is_file() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise FedrecError(f"{path}: unreadable ({exc})") from exc
