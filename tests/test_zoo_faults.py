"""The zoo under faults: nothing lost, one clear line within seconds, nothing half-written left behind.

Network faults are real sockets on 127.0.0.1: a closed port (bound, then closed: connections are
refused) and a stalled server (a listening socket that never accepts: the kernel completes the
handshake, nobody ever answers). Disk faults are a real tiny tmpfs or a read-only mount where this
process may mount (root with CAP_SYS_ADMIN); everywhere, a simulated full disk: :class:`DiskBudget`
lets ``os.write``/``os.sendfile`` (what ``shutil.copyfile`` and ``tempfile`` write with) write for real
into files under one folder until a byte budget is spent, then fail with ``ENOSPC`` mid-file, and a
read-only folder is ``chmod 555`` (non-root) or makes ``os.mkdir``/``os.open`` fail with ``EROFS``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hub_server import point_client_at, running_hub
from lightning.pytorch.callbacks import Callback
from lit_helpers import FamilyModule, quiet_trainer
from safetensors.torch import load_file, save_file
from test_zoo_local import trained as adapted
from tiny_models import FAMILIES, forward

from lightning_peft import LoRA, ZooPublisher, zoo
from lightning_peft.adapters import AdapterMismatchError, LoRAConfig, adapter_layers, load_adapter
from lightning_peft.zoo import EntryError, HubError, HubZoo, LocalZoo
from lightning_peft.zoo.cli import main as zoo_cli

TIMES: dict[str, float] = {}  # time-to-error of each network case, printed at the end (pytest -s)


def trained(seed: int = 0) -> tuple[torch.nn.Module, LoRAConfig]:
    """The tiny MLP of ``seed`` with non-identity LoRA adapters on its ``fc1``/``fc2`` layers."""
    return adapted("mlp", seed, LoRAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], init="nonzero"))


def built(tmp_path: Path, picture_bytes: int = 0) -> Path:
    """A valid entry folder (with a large picture when asked, to overflow a small file system)."""
    model, config = trained()
    pictures = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    if picture_bytes:
        picture = tmp_path / "big.png"
        picture.write_bytes(os.urandom(picture_bytes))
        pictures.append(picture)
    folder = tmp_path / "built"
    zoo.build_entry(folder, model, config, "e", pictures=pictures)
    return folder


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --- network faults -------------------------------------------------------------------------------------------


@pytest.fixture
def online(monkeypatch, tmp_path) -> Callable[[str], None]:
    """Point the Hub client at a URL on 127.0.0.1 (offline mode off, caches in tmp_path), for this test only."""
    return lambda url: point_client_at(SimpleNamespace(url=url), monkeypatch, tmp_path / "hf_home")


@pytest.fixture
def closed_url(online) -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    online(f"http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def stalled_url(online) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections complete in the backlog; nothing is ever read or answered
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    online(url)
    yield url
    sock.close()


def fails_fast(case: str, call: Callable[[], object], limit: float = 5.0) -> HubError:
    start = time.monotonic()
    with pytest.raises(HubError) as info:
        call()
    TIMES[case] = elapsed = time.monotonic() - start
    assert elapsed < limit, f"{case}: {elapsed:.1f} s"
    one_line(str(info.value))
    return info.value


def publish_one(hub: HubZoo) -> str:
    model, config = trained()
    return zoo.publish(model, "e", config, zoo=hub)


OPS: dict[str, Callable[[HubZoo], object]] = {
    "search": lambda hub: zoo.search("x", zoo=hub),
    "list": lambda hub: hub.list(),
    "publish": publish_one,
    "rm": lambda hub: hub.rm("e"),
    "load": lambda hub: zoo.load(FAMILIES["mlp"](seed=0), "e", zoo=hub),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", sorted(OPS))
def test_a_closed_port_is_one_hub_error_at_once(op: str, closed_url, tmp_path) -> None:
    hub = HubZoo(namespace="tester", endpoint=closed_url, token="hf_x", cache_dir=tmp_path / "cache")  # default timeout
    err = fails_fast(f"closed port, {op}", lambda: OPS[op](hub), limit=3.0)
    assert closed_url in str(err) and "cannot be reached" in str(err) and "HF_ENDPOINT" in str(err)
    assert isinstance(err, zoo.HubUnreachableError)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", sorted(OPS))
def test_a_stalled_hub_times_out(op: str, stalled_url, tmp_path) -> None:
    hub = HubZoo(namespace="tester", endpoint=stalled_url, token="hf_x", cache_dir=tmp_path / "cache", timeout=1)
    err = fails_fast(f"stalled, {op}", lambda: OPS[op](hub))
    assert stalled_url in str(err) and "did not answer within 1 s" in str(err)
    assert "LIGHTNING_PEFT_HUB_TIMEOUT" in str(err)


@pytest.fixture
def half_stalled_url(online) -> Iterator[str]:
    """A server that answers ``HEAD /`` (the zoo's first request) and then never answers anything else."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            release.wait(30)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    online(url)
    yield url
    release.set()
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["load", "publish", "search"])
def test_a_hub_that_stalls_after_its_first_answer_fails_fast_too(op: str, half_stalled_url, tmp_path) -> None:
    hub = HubZoo(namespace="tester", endpoint=half_stalled_url, token="hf_x", cache_dir=tmp_path / "cache", timeout=1)
    err = fails_fast(f"stalls after answering, {op}", lambda: OPS[op](hub))  # not 1 + 2 + 4 + 8 + 8 s of retries
    assert half_stalled_url in str(err)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["closed", "stalled"])
def test_cli_hub_list_is_one_line_and_exit_2(fault: str, request, capsys, monkeypatch) -> None:
    url = request.getfixturevalue(f"{fault}_url")
    monkeypatch.setenv("LIGHTNING_PEFT_HUB_TIMEOUT", "1")  # the environment variable sets the timeout
    start = time.monotonic()
    code = zoo_cli(["list", "--hub", "--namespace", "tester", "--endpoint", url])
    TIMES[f"{fault}, cli list --hub"] = elapsed = time.monotonic() - start
    assert code == 2 and elapsed < 5
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: the Hub at " + url)


def test_timeouts_are_configurable(monkeypatch) -> None:
    assert HubZoo(endpoint="http://127.0.0.1:1").timeout == zoo.hub.DEFAULT_TIMEOUT
    monkeypatch.setenv("LIGHTNING_PEFT_HUB_TIMEOUT", "2.5")
    assert HubZoo(endpoint="http://127.0.0.1:1").timeout == 2.5
    assert HubZoo(endpoint="http://127.0.0.1:1", timeout=7).timeout == 7
    monkeypatch.setenv("LIGHTNING_PEFT_HUB_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LIGHTNING_PEFT_HUB_TIMEOUT"):
        HubZoo(endpoint="http://127.0.0.1:1")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with running_hub(tmp_path / "server") as server:
        point_client_at(server, monkeypatch, tmp_path / "hf_home", implicit_token=True)
        monkeypatch.setenv("HF_TOKEN", server.token)
        yield server
        assert not server.errors, server.errors


def test_a_tampered_cached_file_is_evicted_so_a_retry_downloads_it_again(hub, tmp_path) -> None:
    remote = HubZoo(namespace=hub.user, endpoint=hub.url, token=hub.token, cache_dir=tmp_path / "cache")
    model, config = trained()
    zoo.publish(model, "t", config, zoo=remote)
    path = remote.download("t")
    with open(path / "adapter_model.safetensors", "r+b") as f:  # through the cache's link: the blob itself
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(EntryError, match="sha256"):
        remote.download("t")
    fresh = FAMILIES["mlp"](seed=0).eval()
    zoo.load(fresh, "t", zoo=remote)  # the retry fetched a clean copy
    torch.testing.assert_close(forward("mlp", fresh), forward("mlp", model))


# --- the adapter files ------------------------------------------------------------------------------------------


def test_integer_lora_tensors_are_refused(tmp_path) -> None:
    model, config = trained()
    folder = tmp_path / "adapter"
    zoo.build_entry(folder, model, config, "i")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.ones_like(tensors[key], dtype=torch.int32)  # the right shape, not a float
    save_file(tensors, weights)
    fresh = FAMILIES["mlp"](seed=0)
    with pytest.raises(AdapterMismatchError, match=rf"{key}.*dtype torch.int32"):
        load_adapter(fresh, folder)
    assert not list(adapter_layers(fresh))  # left as it came
    injected, _ = trained(seed=3)
    before = {k: v.clone() for k, v in injected.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="floating point"):
        load_adapter(injected, folder)
    assert all(torch.equal(v, before[k]) for k, v in injected.state_dict().items())


@pytest.mark.parametrize("file", ["adapter_config.json", "lightning_peft.json"])
def test_corrupt_json_names_the_file(file: str, tmp_path, capsys) -> None:
    folder = built(tmp_path)
    (folder / file).write_text('{"peft_type": "LORA", ')  # cut short
    with pytest.raises(ValueError) as info:
        load_adapter(FAMILIES["mlp"](seed=0), folder) if file == "adapter_config.json" else zoo.read_manifest(folder)
    assert not isinstance(info.value, json.JSONDecodeError)
    assert str(folder / file) in str(info.value) and "corrupt" in str(info.value)
    root = tmp_path / "zoo"
    assert zoo_cli(["push", str(folder), "c", "--root", str(root)]) == 2
    assert file in one_line(capsys.readouterr().err)


# --- the command line -------------------------------------------------------------------------------------------


def test_push_of_a_missing_folder_says_it_does_not_exist(tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-folder"
    assert zoo_cli(["push", str(missing), "x", "--root", str(tmp_path / "zoo")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"the folder {missing} does not exist" in line and "lightning_peft.json" not in line


def test_download_to_an_existing_file_is_one_line(tmp_path, capsys) -> None:
    local = LocalZoo(tmp_path / "zoo")
    local.publish(built(tmp_path), "d")
    target = tmp_path / "a-file"
    target.write_text("mine")
    assert zoo_cli(["download", "d", "--to", str(target), "--root", str(local.root)]) == 2
    assert "is a file" in one_line(capsys.readouterr().err)
    assert target.read_text() == "mine"


def test_zoo_subcommand_does_not_import_the_training_stack(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.argv = ["lightning-peft", "zoo", "list", "--root", {str(tmp_path / "zoo")!r}]
        from lightning_peft.cli import main
        try:
            main()
        except SystemExit as done:
            code = done.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] == "lightning" or m == "lightning_peft.callbacks")
        print("EXIT", code, "HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert "EXIT 0 HEAVY []" in out, out[-2000:]


# --- disk faults ------------------------------------------------------------------------------------------------


class DiskBudget:
    """A full disk under ``folder``: writes to its files succeed, for real, until ``budget`` bytes, then ``ENOSPC``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path, budget: int) -> None:
        self.folder, self.left, self.monkeypatch = str(folder), budget, monkeypatch
        self.real_write, self.real_sendfile = os.write, os.sendfile
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "sendfile", self.sendfile)

    def counts(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.folder + os.sep)
        except OSError:
            return True  # no /proc: every write counts

    def spend(self, fd: int, want: int) -> int:
        if not self.counts(fd):
            return want
        if self.left <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return min(want, self.left)

    def write(self, fd: int, data: bytes) -> int:
        n = self.spend(fd, len(data))
        done = self.real_write(fd, bytes(data)[:n])
        if self.counts(fd):
            self.left -= done
        return done

    def sendfile(self, out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        n = self.spend(out_fd, count)
        done = self.real_sendfile(out_fd, in_fd, offset, n)
        if self.counts(out_fd):
            self.left -= done
        return done

    def free(self) -> None:
        self.left = 1 << 62


@contextlib.contextmanager
def mounted(folder: Path, options: str) -> Iterator[bool]:
    """A tmpfs with ``options`` at ``folder`` if this process may mount one (yields False if not)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(params=["simulated", "tmpfs"])
def full_disk(request, tmp_path, monkeypatch) -> Iterator[Path]:
    """A folder on a file system with 64 KiB free (an entry with a 200 KiB picture does not fit)."""
    folder = tmp_path / "small"
    if request.param == "simulated":
        folder.mkdir()
        DiskBudget(monkeypatch, folder, 64 << 10)
        yield folder
        return
    with mounted(folder, "size=64k") as ok:
        if not ok:
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the simulated case runs")
        yield folder


class ReadOnly:
    """A folder that turns read-only on :meth:`seal`: a tmpfs remounted ``ro``, ``chmod 555`` or simulated EROFS."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch, is_mount: bool) -> None:
        self.folder, self.monkeypatch, self.is_mount = folder, monkeypatch, is_mount

    def refuse(self, *paths: object) -> None:
        for path in paths:
            if os.path.abspath(str(path)).startswith(str(self.folder) + os.sep):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def seal(self) -> None:
        if self.is_mount:
            subprocess.run(["mount", "-o", "remount,ro", str(self.folder)], check=True, capture_output=True)
        elif os.geteuid() != 0:
            for folder in [self.folder, *(p for p in self.folder.rglob("*") if p.is_dir())]:
                folder.chmod(0o555)
        else:  # root without mounts: permissions do not bind root, so the write calls refuse
            real = {name: getattr(os, name) for name in ("mkdir", "open", "replace", "rename")}

            def mkdir(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
                self.refuse(path)
                return real["mkdir"](path, *args, **kwargs)

            def open_(path, flags, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
                if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    self.refuse(path)
                return real["open"](path, flags, *args, **kwargs)

            def move(name: str) -> Callable[..., None]:
                def moved(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
                    self.refuse(src, dst)
                    return real[name](src, dst, *args, **kwargs)

                return moved

            for name, fake in (
                ("mkdir", mkdir),
                ("open", open_),
                ("replace", move("replace")),
                ("rename", move("rename")),
            ):
                self.monkeypatch.setattr(os, name, fake)

    def unseal(self) -> None:
        if not self.is_mount and os.geteuid() != 0:
            for folder in [self.folder, *(p for p in self.folder.rglob("*") if p.is_dir())]:
                folder.chmod(0o755)


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Iterator[ReadOnly]:
    with mounted(tmp_path / "ro", "size=1m") as is_mount:
        folder = ReadOnly(tmp_path / "ro", monkeypatch, is_mount)
        yield folder
        folder.unseal()


def test_publish_on_a_full_disk_leaves_nothing_and_says_so(full_disk, tmp_path) -> None:
    entry = built(tmp_path, picture_bytes=200 << 10)
    local = LocalZoo(full_disk / "zoo")
    with pytest.raises(OSError) as info:
        local.publish(entry, "k")
    line = one_line(str(info.value))
    assert line.startswith("no space left on ") and "while writing entry 'k'" in line and len(line) < 300
    assert isinstance(info.value, zoo.StorageError) and info.value.errno == errno.ENOSPC
    assert not (full_disk / "zoo").exists()  # no revisions/ skeleton, no hidden temporary


def test_a_full_disk_keeps_the_earlier_revision(full_disk, tmp_path, monkeypatch) -> None:
    local = LocalZoo(full_disk / "zoo")
    first = local.publish(built(tmp_path / "a"), "k")
    with pytest.raises(OSError, match="no space left"):
        local.publish(built(tmp_path / "b", picture_bytes=200 << 10), "k")
    assert local.revisions("k") == [first] and local.info("k").revision == first
    assert sorted(p.name for p in (full_disk / "zoo" / "k" / "revisions").iterdir()) == [first]


def test_cli_on_a_full_disk_is_one_line_and_exit_2(full_disk, tmp_path, capsys) -> None:
    entry = built(tmp_path, picture_bytes=200 << 10)
    assert zoo_cli(["push", str(entry), "k", "--root", str(full_disk / "zoo")]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: no space left on ")


@pytest.mark.parametrize("command", ["push", "rm"])
def test_cli_on_a_read_only_zoo_is_one_line_and_exit_2(command: str, read_only, tmp_path, capsys) -> None:
    entry, root = built(tmp_path), read_only.folder / "zoo"
    LocalZoo(root).publish(entry, "k")
    read_only.seal()
    args = ["push", str(entry), "k2"] if command == "push" else ["rm", "k", "--yes"]
    assert zoo_cli([*args, "--root", str(root)]) == 2
    line = one_line(capsys.readouterr().err)
    assert re.search(r"is read-only, so (writing|deleting) entry 'k2?'|no permission for", line), line
    assert [e.name for e in LocalZoo(root).list()] == ["k"]


# --- killed publishers ------------------------------------------------------------------------------------------


def publisher_process(root: Path, entry: Path, then: str) -> subprocess.Popen:
    """A process publishing ``entry`` that, after its first file, ``then``: ``"die"`` (SIGKILL) or ``"hang"``."""
    script = textwrap.dedent(f"""
        import os, shutil, signal, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from lightning_peft.zoo import LocalZoo
        real = shutil.copyfile
        count = [0]
        def copy(src, dst, *a, **k):
            count[0] += 1
            if count[0] == 2:
                if {then!r} == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                print("copying", flush=True)
                time.sleep(600)
            return real(src, dst, *a, **k)
        shutil.copyfile = copy
        sys.stdin.readline()  # imported: wait for the go
        LocalZoo({str(root)!r}).publish({str(entry)!r}, "k")
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def go(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def temporaries(root: Path) -> list[Path]:
    return sorted((root / "k" / "revisions").glob(".publish-*"))


def test_temporaries_of_killed_publishers_are_removed_and_live_ones_kept(tmp_path) -> None:
    root = tmp_path / "zoo"
    entries = [built(tmp_path / name) for name in ("dead", "live", "next")]
    dead = publisher_process(root, entries[0], "die")
    live = publisher_process(root, entries[1], "hang")  # both import at once; they publish one after the other
    try:
        go(live)
        assert live.stdout is not None and live.stdout.readline().strip() == "copying"  # mid-copy, alive
        go(dead)  # its publish sees the live writer's temporary and keeps it
        assert dead.wait(timeout=120) == -signal.SIGKILL
        left = temporaries(root)
        assert len(left) == 2  # the killed one's and the live one's
        local = LocalZoo(root)
        local.publish(entries[2], "k")
        kept = temporaries(root)
        assert len(kept) == 1 and kept[0] in left  # the dead writer's copy is gone, the live writer's is not
        live.kill()
        live.wait(timeout=30)
        local.publish(entries[2], "k")
        assert temporaries(root) == []
    finally:
        for proc in (dead, live):
            if proc.poll() is None:
                proc.kill()


def test_only_temporaries_whose_writer_is_certainly_gone_are_removed(tmp_path) -> None:
    from lightning_peft.zoo import local as local_module

    prefix = local_module._publish_prefix()  # this process: alive
    host, pid, started, boot = prefix[len(".publish-") :].rstrip("~").split("~")
    assert not local_module._writer_gone(prefix + "x")
    assert local_module._writer_gone(f".publish-{host}~{pid}~{int(started) + 1}~{boot}~x")  # pid reused later
    assert local_module._writer_gone(f".publish-{host}~{pid}~{started}~{'f' * 12}~x")  # another boot
    assert not local_module._writer_gone(f".publish-other-host~1~1~{boot}~x")  # cannot tell: kept
    assert not local_module._writer_gone(".publish-abc123")  # an older version's name: kept


# --- ZooPublisher: never lose the result, check before training -------------------------------------------------


class Spy(Callback):
    """Records whether training started; runs ``at_fit_end`` (before the callbacks after it)."""

    def __init__(self, at_fit_end: Callable[[], None] | None = None) -> None:
        self.trained, self.at_fit_end = False, at_fit_end

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.trained = True

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.at_fit_end is not None:
            self.at_fit_end()


def fit(tmp_path: Path, publisher: ZooPublisher, spy: Spy) -> None:
    callbacks = [LoRA(r=2), spy, publisher]
    quiet_trainer(max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path / "run", callbacks=callbacks).fit(
        FamilyModule("vit", n_batches=2)
    )


def test_publisher_validates_a_hub_name_at_construction() -> None:
    with pytest.raises(ValueError, match="invalid Hub repo name 'bad name!'"):
        ZooPublisher(name="bad name!", zoo="hub")
    with pytest.raises(ValueError, match="invalid Hub repo name"):
        ZooPublisher(name="a/b/c", zoo="hub")


def test_publisher_keeps_the_result_when_the_hub_goes_away(hub, tmp_path, monkeypatch, capsys) -> None:
    publisher = ZooPublisher(name="vit-lora", zoo="hub", namespace=hub.user, endpoint=hub.url, timeout=2)
    spy = Spy(at_fit_end=hub.stop)  # reachable at setup, gone when the publish starts
    url = hub.url
    start = time.monotonic()
    with pytest.raises(zoo.PublishError) as info:
        fit(tmp_path, publisher, spy)
    TIMES["hub gone at fit end, ZooPublisher"] = time.monotonic() - start
    message = one_line(str(info.value))
    folder = info.value.folder
    assert folder is not None and folder.parent == tmp_path / "run" / "zoo-entries"
    assert f"lightning-peft zoo push {folder} vit-lora --hub" in message and url in message
    assert (folder / "adapter_model.safetensors").is_file() and zoo.verify_files(folder)["method"] == "lora"
    with running_hub(tmp_path / "server") as again:  # the same repos, a new port
        point_client_at(again, monkeypatch, tmp_path / "hf_home", implicit_token=True)
        args = ["--hub", "--namespace", hub.user, "--endpoint", again.url]
        assert zoo_cli(["push", str(folder), "vit-lora", *args]) == 0
        assert again.repo_ids() == [f"{hub.user}/vit-lora"]


@pytest.mark.parametrize("keep_entry", [False, True])
def test_a_published_entry_leaves_no_copy_behind_unless_kept(keep_entry: bool, tmp_path) -> None:
    publisher = ZooPublisher(name="vit-lora", root=str(tmp_path / "zoo"), keep_entry=keep_entry)
    fit(tmp_path, publisher, Spy())
    assert [e.name for e in LocalZoo(tmp_path / "zoo").list()] == ["vit-lora"]
    entries = tmp_path / "run" / "zoo-entries"
    assert publisher.kept == (entries / "vit-lora" if keep_entry else None)
    assert (entries / "vit-lora" / "lightning_peft.json").is_file() if keep_entry else not entries.exists()


def test_publisher_keeps_the_result_when_the_disk_fills_up(tmp_path, monkeypatch) -> None:
    root = tmp_path / "zoo"
    disk: list[DiskBudget] = []
    publisher = ZooPublisher(name="vit-lora", root=str(root))
    with pytest.raises(zoo.PublishError, match="no space left on .* while writing entry 'vit-lora'") as info:
        fit(tmp_path, publisher, Spy(at_fit_end=lambda: disk.append(DiskBudget(monkeypatch, root, 0))))
    folder = info.value.folder
    assert folder is not None and zoo.verify_files(folder)
    assert LocalZoo(root).list() == [] and not list(root.rglob("*"))  # nothing half-written in the zoo
    disk[0].free()
    assert LocalZoo(root).publish(folder, "vit-lora")


def test_publisher_offline_by_choice_trains_then_keeps_the_result(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    spy = Spy()
    with pytest.raises(zoo.PublishError, match="zoo push") as info:
        fit(tmp_path, ZooPublisher(name="org/vit-lora", zoo="hub"), spy)
    assert spy.trained and info.value.folder is not None and (info.value.folder / "lightning_peft.json").is_file()


@pytest.mark.timeout(60)
def test_publisher_checks_an_unreachable_hub_before_training(closed_url, tmp_path) -> None:
    spy = Spy()
    start = time.monotonic()
    with pytest.raises(HubError, match="cannot be reached"):
        fit(tmp_path, ZooPublisher(name="vit-lora", zoo="hub", namespace="tester", endpoint=closed_url), spy)
    TIMES["closed port, ZooPublisher setup"] = elapsed = time.monotonic() - start
    assert not spy.trained and elapsed < 5


@pytest.mark.parametrize("where", ["root", "entry_dir"])
def test_publisher_checks_a_read_only_folder_before_training(where: str, read_only, tmp_path) -> None:
    spy = Spy()
    read_only.seal()
    folder = str(read_only.folder / where)
    kwargs = {"root": folder} if where == "root" else {"entry_dir": folder}
    with pytest.raises(OSError, match="read-only|no permission"):
        fit(tmp_path, ZooPublisher(name="vit-lora", **kwargs), spy)
    assert not spy.trained


@pytest.mark.slow
@pytest.mark.parametrize("case", ["setup", "publish"])
def test_under_ddp_every_rank_raises_the_same_error_and_none_hangs(case: str, tmp_path) -> None:
    """``setup``: the Hub is a closed port, refused before training; ``publish``: rank 0's publish fails at the end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).parent / "scripts" / "ddp_zoo_faults.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), case], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1]
    if case == "setup":
        assert got[0]["error"] == "HubUnreachableError" and got[0]["step"] == 0
    else:
        assert got[0]["error"] == "PublishError" and got[0]["step"] > 0
        assert zoo.verify_files(tmp_path / "zoo-entries" / "ddp-vit")["method"] == "lora"


def test_zzz_print_times() -> None:
    """Not a check: prints the time-to-error of every network case above (run with -s)."""
    for case, seconds in sorted(TIMES.items()):
        print(f"time-to-error {case}: {seconds:.2f} s")
