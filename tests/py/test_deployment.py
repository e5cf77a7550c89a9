"""Deployment as written works: the key rule (gateway, check-config, postinst, docs), keygen's
advice, the package's docs, and the reference backend's stdin, log limits, bind warning and
unconnected-gateway errors. Against the real binary; the service user is played by `nobody`
(group `nogroup`) through setpriv, as `sudo -u zgate` would on a Pi.
"""

import grp
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from conftest import GW_ID, REPO, ZGATE_BIN, Gateway, free_port, make_config, wait_until

SERVICE_USER = "nobody"
SERVICE_GROUP = "nogroup"
SECURITY_DOC = "/usr/share/doc/zgate/security.md"


def zgate(*args, as_service=False, timeout=30):
    cmd = [ZGATE_BIN, *args]
    if as_service:
        cmd = [*service_prefix(), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def service_prefix():
    return ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_GROUP}", "--clear-groups"]


def needs_root_and_setpriv():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to play the service user")
    try:
        pwd.getpwnam(SERVICE_USER)
        grp.getgrnam(SERVICE_GROUP)
    except KeyError:
        pytest.skip(f"no user {SERVICE_USER} / group {SERVICE_GROUP}")


def keygen(prefix, *extra):
    r = zgate("keygen", "--out", str(prefix), *extra)
    assert r.returncode == 0, r.stderr
    return Path(f"{prefix}.key"), Path(f"{prefix}.pub"), r.stdout


@pytest.fixture
def etc():
    """A world-traversable directory standing in for /etc/zgate (pytest's tmp_path is 0700,
    which the service user could not enter)."""
    d = Path(tempfile.mkdtemp(prefix="zgate-etc-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def chown(path, user, group):
    os.chown(path, pwd.getpwnam(user).pw_uid if user else -1,
             grp.getgrnam(group).gr_gid if group else -1)


def curve_config(base, endpoint, key, server_pub, gateway_id=GW_ID):
    return make_config(base, endpoint, stats_interval_s=None, outbox_max=None,
                       shutdown_flush_ms=200, inputs=(), outputs=(("relay1", 27, 0, 2000),),
                       gateway_id=gateway_id,
                       backend=[f'server_public_key = "{server_pub}"',
                                f'secret_key_file = "{key}"'])


def service_dirs(base):
    """data and sim directories the service user may write."""
    for d in ("data", "sim"):
        (base / d).mkdir(exist_ok=True)
        chown(base / d, SERVICE_USER, SERVICE_GROUP)


# ------------------------------------------------------------------------ the key rule


def test_service_user_runs_with_root_group_0640_key(etc, backends):
    """The package's layout, root:<service group> 0640, is what the service accepts: it
    passes check-config as the service user and the gateway handshakes with it."""
    needs_root_and_setpriv()
    server_key, server_pub, _ = keygen(etc / "server")
    allow = etc / "allow"
    allow.mkdir()
    key, pub, _ = keygen(etc / "gateway", "--id", GW_ID)
    shutil.copy(pub, allow / f"{GW_ID}.pub")
    chown(key, "root", SERVICE_GROUP)
    os.chmod(key, 0o640)
    service_dirs(etc)
    port = free_port()
    cfg_text = curve_config(etc, f"tcp://127.0.0.1:{port}", key, server_pub.read_text().strip())
    cfg = etc / "z.toml"
    cfg.write_text(cfg_text)
    os.chmod(cfg, 0o644)
    r = zgate("check-config", str(cfg), as_service=True)
    assert (r.returncode, r.stdout) == (0, f"{cfg}: ok\n"), r.stderr

    be = backends(f"tcp://127.0.0.1:{port}", ["--secret-key", str(server_key), "--allow",
                                               str(allow)])
    gw = Gateway(etc, cfg_text, "svc", exe=[*service_prefix(), ZGATE_BIN])
    try:
        hello, _ = be.expect("hello", timeout=15)
        assert hello["gateway"] == GW_ID and hello["security"] == "curve"
        gw.assert_alive()
    finally:
        gw.kill()


@pytest.mark.parametrize("mode,owner,group,why", [
    (0o644, "root", SERVICE_GROUP, "has mode 0644"),
    (0o604, "root", SERVICE_GROUP, "has mode 0604"),
    (0o660, "root", SERVICE_GROUP, "has mode 0660"),
    (0o640, "root", "users", "readable by group users"),
    (0o600, "daemon", SERVICE_GROUP, "owned by daemon"),
    (0o600, "root", "root", "permission denied"),
])
def test_service_user_refuses_keys_outside_the_rule(etc, mode, owner, group, why):
    needs_root_and_setpriv()
    key, _, _ = keygen(etc / "gateway")
    service_dirs(etc)
    chown(key, owner, group)
    os.chmod(key, mode)
    cfg = etc / "z.toml"
    cfg.write_text(curve_config(etc, "tcp://127.0.0.1:5555", key, "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"))
    os.chmod(cfg, 0o644)
    for args in (["check-config", str(cfg)], ["run", "--config", str(cfg)]):
        r = zgate(*args, as_service=True, timeout=10)
        assert r.returncode != 0, (args, r.stdout)
        assert str(key) in r.stderr and why in r.stderr, r.stderr
        # The fix is the rule itself: owner root, the service's group, 0640.
        assert f"chown root:{SERVICE_GROUP} {key} && chmod 0640 {key}" in r.stderr, r.stderr
        assert SECURITY_DOC in r.stderr, r.stderr


def test_service_user_is_told_when_a_directory_hides_the_key(etc):
    needs_root_and_setpriv()
    hidden = etc / "private"
    hidden.mkdir(mode=0o700)
    key, _, _ = keygen(hidden / "gateway")
    chown(key, "root", SERVICE_GROUP)
    os.chmod(key, 0o640)
    cfg = etc / "z.toml"
    cfg.write_text(curve_config(etc, "tcp://127.0.0.1:5555", key,
                                "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"))
    os.chmod(cfg, 0o644)
    r = zgate("check-config", str(cfg), as_service=True)
    assert r.returncode == 2, r.stdout
    assert f"cannot reach secret key file {key}: permission denied on a directory" in r.stderr, \
        r.stderr
    os.chmod(hidden, 0o755)
    assert zgate("check-config", str(cfg), as_service=True).returncode == 0


def test_check_config_loads_the_key_file(tmp_path):
    key, _, _ = keygen(tmp_path / "gateway")
    cfg = tmp_path / "z.toml"
    cfg.write_text(curve_config(tmp_path, "tcp://127.0.0.1:5555", key,
                                "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"))
    r = zgate("check-config", str(cfg))
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{cfg}: ok\n", "")
    # Group-readable by this process's own group: the same rule as for the service.
    os.chmod(key, 0o640)
    assert zgate("check-config", str(cfg)).returncode == 0

    def refused(needle):
        r = zgate("check-config", str(cfg))
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stdout == ""
        assert r.stderr.startswith(f"{cfg}: key backend.secret_key_file: "), r.stderr
        assert str(key) in r.stderr and needle in r.stderr, r.stderr

    os.chmod(key, 0o644)
    refused("has mode 0644")
    os.chmod(key, 0o600)
    key.write_text("this is not a key\n")
    refused("40 Z85 characters")
    key.unlink()
    refused("No such file")


# ------------------------------------------------------------------------ postinst


def postinst_key_block():
    """The key-rule lines of the package's postinst, between its marker comments."""
    text = (REPO / "deploy" / "debian" / "postinst").read_text()
    m = re.search(r"^\s*# key rule: begin\n(.*?)^\s*# key rule: end\n", text, re.S | re.M)
    assert m, "postinst has no '# key rule: begin' ... '# key rule: end' block"
    return m.group(1)


def test_postinst_key_rule_gives_keys_the_service_accepts(etc):
    """The postinst's key lines (run on a stand-in for /etc/zgate, with the service's group)
    turn a root:root 0600 key (what `sudo zgate keygen` writes) and a 0644 one into keys the
    service user passes check-config with, and leave .pub files alone."""
    needs_root_and_setpriv()
    block = postinst_key_block()
    assert "/etc/zgate" in block or "$ZGATE_ETC" in block
    key, pub, _ = keygen(etc / "gateway")
    other, _, _ = keygen(etc / "other")
    os.chmod(other, 0o644)
    pub_mode = stat.S_IMODE(pub.stat().st_mode)
    script = f'ZGATE_ETC="{etc}"\nZGATE_GROUP="{SERVICE_GROUP}"\n' + block
    r = subprocess.run(["sh", "-euc", script], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    for k in (key, other):
        st = k.stat()
        assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)) == \
            (0, SERVICE_GROUP, 0o640), k
        cfg = etc / f"{k.stem}.toml"
        cfg.write_text(curve_config(etc, "tcp://127.0.0.1:5555", k,
                                    "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"))
        os.chmod(cfg, 0o644)
        r = zgate("check-config", str(cfg), as_service=True)
        assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(pub.stat().st_mode) == pub_mode


# ------------------------------------------------------------------------ keygen


def test_keygen_prints_the_allow_list_file_name(tmp_path):
    _, pub, out = keygen(tmp_path / "gateway", "--id", "gw-07")
    assert f"public key: {pub}\n" in out
    assert "saved as gw-07.pub in the backend's allow list directory" in out, out
    cfg = tmp_path / "z.toml"
    cfg.write_text(make_config(tmp_path, "tcp://127.0.0.1:5555", gateway_id="gw-cfg"))
    _, _, out = keygen(tmp_path / "second", "--config", str(cfg))
    assert "saved as gw-cfg.pub" in out, out
    _, _, out = keygen(tmp_path / "third")
    assert "saved as <gateway-id>.pub" in out and "--id" in out, out
    r = zgate("keygen", "--out", str(tmp_path / "fourth"), "--id", "a/b")
    assert r.returncode != 0 and "--id" in r.stderr
    assert not (tmp_path / "fourth.key").exists()


# ------------------------------------------------------------------------ package and docs


def deb_assets():
    meta = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["metadata"]["deb"]
    return meta, {dest: src for src, dest, _mode in meta["assets"]}


def test_package_ships_the_docs():
    meta, assets = deb_assets()
    for doc in ["README.md", *(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]:
        dest = f"usr/share/doc/zgate/{Path(doc).name}"
        src = assets.get(dest) or assets.get("usr/share/doc/zgate/")
        assert src is not None, f"{doc} is not installed as /{dest}"
        assert list(REPO.glob(src)) and (REPO / doc) in [p.resolve() for p in REPO.glob(src)], \
            (doc, src)
    # deploy/deb-metadata.toml documents the same block.
    documented = tomllib.loads((REPO / "deploy" / "deb-metadata.toml").read_text())
    assert documented["package"]["metadata"]["deb"] == meta


def test_docs_and_config_agree_on_one_key_name_and_rule():
    files = ["README.md", "docs/deploy.md", "docs/security.md", "src/config_template.toml",
             "deploy/zgate.toml"]
    for f in files:
        text = (REPO / f).read_text()
        assert "gw-01.key" not in text, f
        assert "chmod 600" not in text and "chmod 0600" not in text, f
    for f in ("README.md", "docs/security.md", "src/config_template.toml", "deploy/zgate.toml",
              "docs/deploy.md"):
        assert "/etc/zgate/gateway.key" in (REPO / f).read_text(), f
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert "insecure = true" in deploy
    assert "chown root:zgate /etc/zgate/gateway.key" in deploy and "0640" in deploy
    assert "<gateway-id>.pub" in deploy or "gw-01.pub" in deploy
    assert "when your zgate version supports it" not in (REPO / "deploy" / "zgate.toml").read_text()


def test_error_messages_name_the_installed_security_doc(tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text(make_config(tmp_path, "tcp://192.0.2.1:5555"))
    r = zgate("check-config", str(cfg))
    assert r.returncode == 2 and SECURITY_DOC in r.stderr, r.stderr


# ------------------------------------------------------------------------ reference backend


def gateway_config(tmp_path, endpoint):
    return make_config(tmp_path, endpoint, stats_interval_s=None, inputs=(),
                       outputs=(("relay1", 27, 0, 2000), ("relay2", 22, 0, 2000)))


def test_backend_sends_every_piped_command_at_once(tmp_path, gateways, backends):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    be = backends(endpoint)
    gateways(gateway_config(tmp_path, endpoint))
    be.expect("hello", timeout=10)
    cmds = [{"id": f"p-{i}", "target": t, "action": "toggle"}
            for i, t in enumerate(("relay1", "relay2", "relay1"), 1)]
    data = "".join(json.dumps({"gateway": GW_ID, "command": c}) + "\n" for c in cmds)
    be.proc.stdin.write(data.encode())  # one write: the three lines arrive together
    be.proc.stdin.flush()
    for c in cmds:
        reply, _ = be.expect("reply", lambda d, i=c["id"]: d.get("id") == i, timeout=5)
        assert reply["ok"] is True, reply


def test_backend_reports_a_command_for_a_gateway_that_is_not_connected(tmp_path, backends):
    be = backends(f"tcp://127.0.0.1:{free_port()}")
    wait_until(lambda: "backend listening" in be.log(), 5, "backend listening", interval=0.05)
    be.command("gw-absent", {"id": "x-1", "target": "relay1", "action": "toggle"})
    err, _ = be.expect("error", timeout=5)
    assert err["gateway"] == "gw-absent"
    assert err["error"] == 'command "x-1" not sent: gateway gw-absent is not connected', err
    wait_until(lambda: "not connected" in be.log(), 5, "the error in the log", interval=0.05)


def test_backend_warns_when_binding_plaintext_beyond_loopback(backends):
    wide = backends(f"tcp://0.0.0.0:{free_port()}", name="wide")
    local = backends(f"tcp://127.0.0.1:{free_port()}", name="local")
    for b in (wide, local):
        wait_until(lambda b=b: "backend listening" in b.log(), 5, "backend listening",
                   interval=0.05)
    assert "INSECURE" in wide.log() and "--secret-key" in wide.log(), wide.log()
    assert "INSECURE" not in local.log(), local.log()


def test_backend_log_limits_are_per_kind(tmp_path, gateways, backends):
    """A gateway with a wrong server key retrying several times a second uses up the limit
    of handshake failures; an impersonation attempt right after is still logged."""
    keys = tmp_path / "keys"
    allow = tmp_path / "allow"
    keys.mkdir()
    allow.mkdir()
    server_key, _, _ = keygen(keys / "backend")
    _, wrong_pub, _ = keygen(keys / "other-server")
    alpha_key, alpha_pub, _ = keygen(keys / "gw-alpha")
    shutil.copy(alpha_pub, allow / "gw-alpha.pub")
    port = free_port()
    be = backends(f"tcp://127.0.0.1:{port}", ["--secret-key", str(server_key), "--allow",
                                               str(allow)])
    wait_until(lambda: "backend listening" in be.log(), 5, "backend listening", interval=0.05)
    endpoint = f"tcp://127.0.0.1:{port}"
    gateways(curve_config(tmp_path, endpoint, alpha_key, wrong_pub.read_text().strip(),
                          gateway_id="gw-wrongkey"), name="wrongkey")
    wait_until(lambda: be.log().count("handshake failed") >= 10, 30,
               "10 handshake failures logged", interval=0.05)
    # More failures happen (suppressed now); the limit of that kind is used up.
    time.sleep(1.0)
    assert be.log().count("handshake failed") == 10, be.log()
    gw2 = tmp_path / "imp"
    gw2.mkdir()
    gateways(curve_config(gw2, endpoint, alpha_key, Path(keys / "backend.pub").read_text().strip(),
                          gateway_id="gw-beta"), name="impersonator")
    wait_until(lambda: "impersonation" in be.log(), 10, "the impersonation logged",
               interval=0.05)
    assert 'routing id "gw-beta"' in be.log()


def test_host_package_passes_check_deb(tmp_path):
    """The .deb as cargo-deb builds it from this tree (host architecture, from the debug
    binary: `make check-deploy` does the same for the ARM packages) ships the docs and a
    postinst whose key rule deploy/check-deb runs."""
    if subprocess.run(["cargo", "deb", "--version"], capture_output=True).returncode != 0:
        pytest.skip("cargo-deb is not installed (deploy/setup-deb installs it)")
    if not (REPO / "target" / "debug" / "zgate").exists():
        pytest.skip("no debug build in target/")
    deb = tmp_path / "zgate_host.deb"
    r = subprocess.run(["cargo", "deb", "--no-build", "--profile", "dev", "-o", str(deb)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True).stdout.strip()
    r = subprocess.run([str(REPO / "deploy" / "check-deb"), str(deb), arch],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for needle in ("/usr/share/doc/zgate/security.md", "/usr/share/doc/zgate/protocol.md",
                   "postinst key rule: a.key -> 0640"):
        assert needle in r.stdout, r.stdout
