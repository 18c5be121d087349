"""Signing keys of simulated institutions (the zk layer's Ed25519 keys), created beside the run.

In a deployment every institution makes its own key and registers the public half ahead of the run; a
simulation plays every institution, so it creates ``institution-<i>.key`` (0600) and ``institution-<i>.pub.pem``
under ``<run dir>/keys``, which is also the server's key registry. Existing keys are kept (resume).
"""

from __future__ import annotations

from pathlib import Path

from finlora.zk.signing import PUBLIC_SUFFIX, generate_key, save_private_key, save_public_key


def provision_simulation_keys(keys_dir: Path, num_institutions: int) -> Path:
    keys_dir.mkdir(parents=True, exist_ok=True)
    for pid in range(num_institutions):
        name = f"institution-{pid}"
        if not (keys_dir / f"{name}.key").exists():
            key = generate_key()
            save_private_key(key, keys_dir / f"{name}.key")
            save_public_key(key, keys_dir / f"{name}{PUBLIC_SUFFIX}")
    return keys_dir
