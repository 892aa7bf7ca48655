from __future__ import annotations

import re

import pytest

from common.config import ConfigError, DestConfig, SourceConfig, load


def test_defaults_are_secure():
    cfg = load(SourceConfig, None)
    assert cfg.tls.insecure is False
    assert cfg.agent.listen_tcp == ""  # no network control API unless configured (and then TLS)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "dest.toml"
    path.write_text('[agent]\nlisten = "127.0.0.1:1"\n[limits]\nwindow = 4\n')
    cfg = load(DestConfig, path, ["limits.window=16", "tls.insecure=yes", "tls.allowed_peers=a,b"])
    assert cfg.agent.listen == "127.0.0.1:1"
    assert cfg.limits.window == 16
    assert cfg.tls.insecure is True
    assert cfg.tls.allowed_peers == ["a", "b"]


@pytest.mark.parametrize("text,message", [
    ("[agent]\nlisen = 1\n", "unknown key(s) lisen"),
    ("[bogus]\n", "unknown key(s) bogus"),
    ("[limits]\nwindow = 'many'\n", "expected an integer"),
    ("[agent\n", "config file"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "dest.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(DestConfig, path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(DestConfig, tmp_path / "nope.toml")


def test_daemon_exits_2_on_bad_config(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "dest.toml"
    path.write_text("[agent]\nlisen = 1\n")
    proc = subprocess.run([sys.executable, "-m", "dest_agent.main", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "unknown key(s) lisen" in proc.stderr


def test_example_configs_load():
    from pathlib import Path

    from dest_agent.catalog import CatalogSpec

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    source = load(SourceConfig, deploy / "source.toml")
    assert source.tls.server_name == "p2v-dest"
    dest = load(DestConfig, deploy / "dest.toml")
    assert [d.name for d in CatalogSpec.from_dict(dest.catalog).devices] == ["vnet0", "vda"]
