from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.tls import issue_cert
from tests.netns import can_use_netns


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory) -> Path:
    """A CA with agent and p2vctl certificates, plus a rogue CA with a look-alike certificate."""
    out = tmp_path_factory.mktemp("tls")
    for name in ("p2v-source", "p2v-dest", "p2vctl"):
        issue_cert(out, name)
    issue_cert(out / "rogue", "p2v-source")
    return out


@pytest.fixture
def needs_netns() -> None:
    if not can_use_netns():
        pytest.skip("needs root and iproute2 for network namespaces")


def dest_config(tmp: Path, tls_dir: Path, listen: str) -> Path:
    cfg = tmp / "dest.toml"
    cfg.write_text(f"""
[agent]
listen = "{listen}"
state_dir = "{tmp / 'dest-state'}"
[tls]
ca = "{tls_dir / 'ca.pem'}"
cert = "{tls_dir / 'p2v-dest.pem'}"
key = "{tls_dir / 'p2v-dest.key'}"
allowed_peers = ["p2v-source"]
server_name = "p2v-source"
[limits]
max_batch_bytes = 1048576
window = 8
""")
    return cfg


def source_config(tmp: Path, tls_dir: Path, memory: str) -> Path:
    cfg = tmp / "source.toml"
    cfg.write_text(f"""
[agent]
listen_unix = "{tmp / 'source.sock'}"
state_dir = "{tmp / 'source-state'}"
memory_source = "{memory}"
[tls]
ca = "{tls_dir / 'ca.pem'}"
cert = "{tls_dir / 'p2v-source.pem'}"
key = "{tls_dir / 'p2v-source.key'}"
server_name = "p2v-dest"
allowed_peers = ["p2v-dest", "p2vctl"]
""")
    return cfg


@pytest.fixture
def short_tmp():
    """Unix socket paths must stay short (108 bytes): pytest's tmp_path can be too long."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="p2vt-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
