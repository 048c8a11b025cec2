"""The project's Ansible modules: haproxy_server against a fake runtime API, fleet_manifest on this machine."""

import importlib.util
import json
import os
import shutil
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HAPROXY_MODULE = ROOT / "playbooks/roles/lb_member/library/haproxy_server.py"
STATE_HEADER = ("# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
                "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
                "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord")


class FakeHaproxy(socketserver.ThreadingTCPServer):
    """Answers `show servers state`, `show stat` and `set server ... state` like HAProxy 2.x."""

    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHaproxy.Handler)
        self.admin = {"dgx-a1": 0, "dgx-a2": 0}
        self.sessions = {"dgx-a1": 0, "dgx-a2": 0}
        self.commands: list[str] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            srv = self.server
            line = self.rfile.readline().decode().strip()
            srv.commands.append(line)
            words = line.split()
            if line.startswith("show servers state"):
                if words[-1] != "v3-hall":
                    answer = f"Can't find backend '{words[-1]}'.\n"
                else:
                    rows = [f"3 v3-hall {i} {name} 127.0.0.1 2 {bits} 1 1 5 6 3 4 6 0 0 0 - 4410{i} -"
                            for i, (name, bits) in enumerate(srv.admin.items(), 1)]
                    answer = "1\n" + STATE_HEADER + "\n" + "\n".join(rows) + "\n\n"
            elif line == "show stat":
                rows = []
                for name, bits in srv.admin.items():
                    status = "MAINT" if bits & 1 else "DRAIN" if bits & 8 else "UP"
                    rows.append(f"v3-hall,{name},0,0,{srv.sessions[name]},3,,10,{status}")
                answer = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,status\n" + "\n".join(rows) + "\n\n"
            elif words[:2] == ["set", "server"]:
                server, state = words[2].split("/")[1], words[-1]
                srv.admin[server] = {"ready": 0, "drain": 8, "maint": 1}[state]
                answer = "\n"
            else:
                answer = "Unknown command.\n"
            self.wfile.write(answer.encode())


@pytest.fixture
def haproxy():
    server = FakeHaproxy()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def module():
    spec = importlib.util.spec_from_file_location("haproxy_server", HAPROXY_MODULE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_haproxy_state_is_read_from_the_admin_bits(haproxy, module):
    api = f"127.0.0.1:{haproxy.server_address[1]}"
    assert module.admin_state(api, "v3-hall", "dgx-a1") == "ready"
    haproxy.admin["dgx-a1"] = 8
    assert module.admin_state(api, "v3-hall", "dgx-a1") == "drain"
    haproxy.admin["dgx-a1"] = 1 | 8
    assert module.admin_state(api, "v3-hall", "dgx-a1") == "maint"
    assert module.server_stats(api, "v3-hall", "dgx-a2")["status"] == "UP"
    with pytest.raises(module.RuntimeApiError, match="no backend 'other'"):
        module.admin_state(api, "other", "dgx-a1")
    with pytest.raises(module.RuntimeApiError, match="no server 'dgx-a9'"):
        module.admin_state(api, "v3-hall", "dgx-a9")
    with pytest.raises(module.RuntimeApiError, match="cannot reach"):
        module.command("127.0.0.1:1", "show stat", timeout=1)


class UnixHaproxy(socketserver.ThreadingUnixStreamServer):
    """The same runtime API on a UNIX socket (`stats socket /run/haproxy/admin.sock level admin`)."""

    def __init__(self, path: Path):
        super().__init__(str(path), FakeHaproxy.Handler)
        self.admin = {"dgx-a1": 0, "dgx-a2": 0}
        self.sessions = {"dgx-a1": 0, "dgx-a2": 0}
        self.commands: list[str] = []


@pytest.mark.parametrize("prefix", ["", "unix:"])
def test_haproxy_module_speaks_to_a_unix_socket(tmp_path, prefix):
    sock = tmp_path / "admin.sock"
    server = UnixHaproxy(sock)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = {"api": f"{prefix}{sock}", "backend": "v3-hall", "server": "dgx-a2", "state": "drain", "timeout": 5}
        result = _run_module(HAPROXY_MODULE, "haproxy_server", args)
        assert result["changed"] and result["previous"] == "ready", result
        assert "set server v3-hall/dgx-a2 state drain" in server.commands
    finally:
        server.shutdown()
        server.server_close()


def _run_module(module_path: Path, name: str, args: dict) -> dict:
    """Run an Ansible module file as Ansible does (JSON args on stdin) and return its JSON result."""
    proc = subprocess.run([sys.executable, str(module_path)], input=json.dumps({"ANSIBLE_MODULE_ARGS": args}),
                          capture_output=True, text=True)
    return json.loads(proc.stdout)


def test_haproxy_drain_then_enable_changes_once(haproxy):
    args = {"api": f"127.0.0.1:{haproxy.server_address[1]}", "backend": "v3-hall", "server": "dgx-a1",
            "wait_drained": True, "timeout": 5}
    first = _run_module(HAPROXY_MODULE, "haproxy_server", {**args, "state": "drain"})
    assert first["changed"] and first["previous"] == "ready" and first["status"] == "DRAIN"
    assert "set server v3-hall/dgx-a1 state drain" in haproxy.commands
    assert not _run_module(HAPROXY_MODULE, "haproxy_server", {**args, "state": "drain"})["changed"]
    back = _run_module(HAPROXY_MODULE, "haproxy_server", {**args, "state": "ready", "wait_drained": False,
                                                          "wait_up": True})
    assert back["changed"] and back["previous"] == "drain" and back["status"] == "UP"


def test_haproxy_drain_waits_for_sessions_and_fails_naming_them(haproxy):
    haproxy.sessions["dgx-a2"] = 3
    result = _run_module(HAPROXY_MODULE, "haproxy_server", {
        "api": f"127.0.0.1:{haproxy.server_address[1]}", "backend": "v3-hall", "server": "dgx-a2",
        "state": "drain", "wait_drained": True, "timeout": 1})
    assert result["failed"] and result["msg"] == "v3-hall/dgx-a2: 3 session(s) still open after 1s"


@pytest.mark.skipif(not shutil.which("dpkg-query"), reason="needs dpkg")
def test_fleet_manifest_records_dpkg_state_and_changes_only_when_it_differs(tmp_path):
    path = tmp_path / "fleet/bundle.json"
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
           "ANSIBLE_STDOUT_CALLBACK": "json"}

    def run(args: str) -> dict:
        proc = subprocess.run([str(BIN / "ansible"), "localhost", "-c", "local", "-m", "fleet_manifest", "-a", args,
                               "-e", f"ansible_python_interpreter={sys.executable}"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        return json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]

    first = run(f"path={path} component=base packages=dpkg data='{{\"version\": \"1\"}}'")
    assert first["changed"], first
    recorded = json.loads(path.read_text())["components"]["base"]
    assert recorded["version"] == "1" and set(recorded["packages"]["dpkg"]) == {"version", "held"}
    assert not run(f"path={path} component=base packages=dpkg data='{{\"version\": \"1\"}}'")["changed"]
    run(f"path={path} component=other")
    stamped = run(f"path={path} release=2026-10 components=base")
    assert stamped["changed"] and json.loads(path.read_text())["release"] == "2026-10"
    assert set(json.loads(path.read_text())["components"]) == {"base"}
    missing = run(f"path={path} component=x packages=no-such-package-here")
    assert missing["failed"] and "no-such-package-here" in missing["msg"]


def test_fleet_manifest_stamps_the_digest_beside_the_release(tmp_path):
    """The converge's last task: release and content digest together; a second stamp with the same ones is
    no change, another digest is, and a release stamped without one drops the old digest."""
    path = tmp_path / "bundle.json"
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
           "ANSIBLE_STDOUT_CALLBACK": "json"}

    def run(args: str) -> dict:
        proc = subprocess.run([str(BIN / "ansible"), "localhost", "-c", "local", "-m", "fleet_manifest", "-a", args,
                               "-e", f"ansible_python_interpreter={sys.executable}"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        return json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]

    one, two = "a" * 64, "0123456789abcdef" * 4
    first = run(f"path={path} release=2026-11 digest={one} components=[]")
    assert first["changed"], first
    assert json.loads(path.read_text()) == {"format": 1, "release": "2026-11", "digest": one, "components": {}}
    written = path.stat().st_mtime_ns
    again = run(f"path={path} release=2026-11 digest={one} components=[]")
    assert not again["changed"] and path.stat().st_mtime_ns == written
    other = run(f"path={path} release=2026-11 digest={two}")
    assert other["changed"] and json.loads(path.read_text())["digest"] == two
    assert "digest" in other["diff"]["before"] and two in other["diff"]["after"]
    undigested = run(f"path={path} release=2026-10")
    assert undigested["changed"] and "digest" not in json.loads(path.read_text())
    bad = run(f"path={path} release=2026-11 digest=sha256:{one}")
    assert bad["failed"] and "64 lowercase hex digits" in bad["msg"]
    alone = run(f"path={path} component=x digest={one}")
    assert alone["failed"] and "release" in alone["msg"]
    assert json.loads(path.read_text())["release"] == "2026-10"  # a refused call writes nothing
