"""The Hub-protocol test server (tests/hub_server.py) against the real huggingface_hub client."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import httpx2
import pytest
from hub_server import HubServer, git_blob_sha1, point_client_at, running_hub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _http

README = """---
library_name: lightning-peft
tags: [lightning-peft, lora]
base_model: x
---
# An adapter

Made for the test.
"""


def safetensors_bytes(values: list[float]) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, 4 * len(values)]}})
    header_bytes = header.encode() + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + struct.pack(f"<{len(values)}f", *values)


def make_entry(folder: Path, values: list[float], readme: str = README) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(readme)
    (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes(values))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "values": values}))
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running server, the client pointed at it, and every request checked to stay on 127.0.0.1."""
    outside: list[str] = []

    def stay_local(request: httpx2.Request) -> None:
        if request.url.host != "127.0.0.1":
            outside.append(str(request.url))
            raise AssertionError(f"request left 127.0.0.1: {request.method} {request.url}")

    previous = _http._GLOBAL_CLIENT_FACTORY

    def factory() -> httpx2.Client:
        client = previous()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks["request"], stay_local], "response": hooks["response"]}
        return client

    with running_hub(tmp_path / "server") as server:
        point_client_at(server, monkeypatch, tmp_path / "hf_home")
        _http.set_client_factory(factory)
        try:
            yield server
        finally:
            _http.set_client_factory(previous)
        assert server.errors == [], server.errors[0]
    assert outside == []


def api_for(server: HubServer, token: str | bool | None = None) -> HfApi:
    return HfApi(endpoint=server.url, token=server.token if token is None else token)


def test_whoami_and_create_repo(hub) -> None:
    api = api_for(hub)
    assert api.whoami()["name"] == hub.user
    with pytest.raises(HfHubHTTPError) as err:
        api_for(hub, "hf_wrong").whoami()
    assert err.value.response.status_code == 401

    url = api.create_repo(f"{hub.user}/fresh", repo_type="model")
    assert url == f"{hub.url}/{hub.user}/fresh" and url.repo_id == f"{hub.user}/fresh"
    assert api.create_repo(f"{hub.user}/fresh", exist_ok=True).repo_id == f"{hub.user}/fresh"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(f"{hub.user}/fresh")
    assert err.value.response.status_code == 409
    info = api.model_info(f"{hub.user}/fresh")  # a new repo holds an initial commit with .gitattributes
    assert [s.rfilename for s in info.siblings] == [".gitattributes"] and len(info.sha) == 40


def test_upload_info_download_and_revisions(hub, tmp_path) -> None:
    api = api_for(hub)
    repo_id = f"{hub.user}/adapter"
    api.create_repo(repo_id, exist_ok=True)
    folder = make_entry(tmp_path / "entry", [1.0, 2.0])
    (folder / "nested").mkdir()
    (folder / "nested" / "metrics.json").write_text('{"val_loss": 0.25}')

    n_commits = hub.requests.count(("POST", f"/api/models/{repo_id}/commit/main"))
    first = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="first publish").oid
    assert hub.requests.count(("POST", f"/api/models/{repo_id}/commit/main")) == n_commits + 1  # ONE commit
    assert len(first) == 40 and first == hub.head(repo_id)

    info = api.model_info(repo_id, files_metadata=True)
    assert info.sha == first and info.id == repo_id and info.author == hub.user and not info.private
    sizes = {s.rfilename: s.size for s in info.siblings}
    uploaded = ["README.md", "adapter_config.json", "adapter_model.safetensors", "nested/metrics.json"]
    assert sorted(sizes) == sorted([".gitattributes", *uploaded])
    assert sizes["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").stat().st_size
    blob = {s.rfilename: s.blob_id for s in info.siblings}["adapter_config.json"]
    assert blob == git_blob_sha1((folder / "adapter_config.json").read_bytes())
    assert info.card_data.library_name == "lightning-peft" and info.card_data.base_model == "x"
    assert info.card_data.tags == ["lightning-peft", "lora"] and info.library_name == "lightning-peft"
    assert {"lightning-peft", "lora", "base_model:x", "base_model:adapter:x"} <= set(info.tags)
    assert info.last_modified is not None and info.downloads == 0 and info.likes == 0

    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *uploaded])
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree(repo_id)}
    assert ("RepoFolder", "nested") in top and ("RepoFile", "nested/metrics.json") not in top
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="nested")] == ["nested/metrics.json"]

    cache = tmp_path / "cache"
    snapshot = Path(snapshot_download(repo_id, cache_dir=cache, endpoint=hub.url, token=hub.token))
    assert snapshot.name == first
    for rel in uploaded:
        assert (snapshot / rel).read_bytes() == (folder / rel).read_bytes(), rel
    local = tmp_path / "local"
    snapshot_download(repo_id, local_dir=local, cache_dir=cache, endpoint=hub.url, token=hub.token)
    assert (local / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()

    # a second upload is a second commit; the first sha still serves the old bytes
    old_config = (folder / "adapter_config.json").read_bytes()
    make_entry(folder, [3.0, 4.0, 5.0])
    second = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="second publish").oid
    assert second != first and api.model_info(repo_id).sha == second
    assert api.model_info(repo_id, revision=first).sha == first
    commits = api.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits[:2]] == [second, first] and commits[0].title == "second publish"
    assert commits[-1].title == "initial commit"

    old = Path(snapshot_download(repo_id, revision=first, cache_dir=tmp_path / "cache2", endpoint=hub.url))
    assert (old / "adapter_config.json").read_bytes() == old_config
    new = Path(snapshot_download(repo_id, cache_dir=tmp_path / "cache2", endpoint=hub.url))
    assert (
        new.name == second
        and (new / "adapter_config.json").read_bytes() == (folder / "adapter_config.json").read_bytes()
    )
    single = hf_hub_download(
        repo_id, "adapter_config.json", revision=first, cache_dir=tmp_path / "c3", endpoint=hub.url
    )
    assert Path(single).read_bytes() == old_config

    # upload_file goes through create_commit (README validation, preupload, commit); unchanged files are skipped
    third = api.upload_file(path_or_fileobj=b"note\n", path_in_repo="NOTES.txt", repo_id=repo_id, commit_message="3")
    assert third.oid not in (first, second) and "NOTES.txt" in api.list_repo_files(repo_id)
    same = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="nothing changed")
    assert same.oid == third.oid == hub.head(repo_id)


def test_upload_folder_without_xet_is_one_create_commit(hub, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the plain create_commit path
    api = api_for(hub)
    repo_id = f"{hub.user}/plain"
    api.create_repo(repo_id)
    before = len(hub.requests)
    sha = api.upload_folder(repo_id=repo_id, folder_path=make_entry(tmp_path / "e", [0.5]), commit_message="m").oid
    posts = [path for method, path in hub.requests[before:] if method == "POST"]
    # the client validates the README twice on this path (collecting the folder, then in create_commit)
    assert posts[0] == "/api/validate-yaml"
    assert [p for p in posts if p != "/api/validate-yaml"] == [
        f"/api/models/{repo_id}/preupload/main",
        f"/api/models/{repo_id}/commit/main",
    ]
    assert api.model_info(repo_id).sha == sha


def test_list_models_filters(hub, tmp_path) -> None:
    api = api_for(hub)
    cards = {
        f"{hub.user}/alpha-lora": README,
        f"{hub.user}/beta-adalora": README.replace("lora]", "adalora]"),
        "someone/gamma-lora": README,
        f"{hub.user}/untagged": "# no card data\n",
    }
    for i, (repo_id, card) in enumerate(cards.items()):
        api.create_repo(repo_id)
        api.upload_folder(
            repo_id=repo_id, folder_path=make_entry(tmp_path / str(i), [float(i)], card), commit_message="p"
        )
    api.create_repo(f"{hub.user}/secret-lora", private=True)
    api.upload_folder(
        repo_id=f"{hub.user}/secret-lora", folder_path=make_entry(tmp_path / "s", [9.0]), commit_message="p"
    )

    def ids(client: HfApi = api, **kwargs) -> list[str]:
        return sorted(m.id for m in client.list_models(**kwargs))

    tagged = sorted(
        [f"{hub.user}/alpha-lora", f"{hub.user}/beta-adalora", f"{hub.user}/secret-lora", "someone/gamma-lora"]
    )
    assert ids(filter="lightning-peft") == tagged
    assert ids(filter=["lightning-peft", "lora"]) == sorted(
        [f"{hub.user}/alpha-lora", f"{hub.user}/secret-lora", "someone/gamma-lora"]
    )
    assert ids(filter="lightning-peft", author="someone") == ["someone/gamma-lora"]
    assert ids(filter="lightning-peft", search="ADALORA") == [f"{hub.user}/beta-adalora"]
    assert ids(search="nothing-like-this") == []
    assert len(ids(filter="lightning-peft", limit=2)) == 2
    assert ids(anonymous := api_for(hub, False), filter="lightning-peft") == [t for t in tagged if "secret" not in t]
    (row,) = api.list_models(author="someone", cardData=True)
    assert row.sha == api.model_info("someone/gamma-lora").sha and "lora" in row.tags and row.private is False
    assert row.card_data.base_model == "x" and row.last_modified is not None
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(f"{hub.user}/secret-lora")


def test_errors_map_to_client_exceptions(hub, tmp_path) -> None:
    api = api_for(hub)
    repo_id = f"{hub.user}/errs"
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=make_entry(tmp_path / "e", [1.0]), commit_message="p")
    cache = tmp_path / "cache"

    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{hub.user}/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub.user}/missing", "README.md", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(f"{hub.user}/missing", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "README.md", revision="no-such-branch", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="no-folder"))

    # writes without (or with a wrong) token are refused, and nothing changes
    head = hub.head(repo_id)
    for client in (api_for(hub, False), api_for(hub, "hf_wrong")):
        with pytest.raises(HfHubHTTPError) as err:
            client.create_repo(f"{hub.user}/intruder", exist_ok=True)
        assert err.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as err:
            client.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, commit_message="x")
        assert err.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as err:
            client.delete_repo(repo_id)
        assert err.value.response.status_code == 401
    assert hub.head(repo_id) == head and f"{hub.user}/intruder" not in hub.repo_ids()


def test_private_repo_needs_the_token(hub, tmp_path) -> None:
    api = api_for(hub)
    repo_id = f"{hub.user}/private"
    api.create_repo(repo_id, private=True)
    api.upload_folder(repo_id=repo_id, folder_path=make_entry(tmp_path / "e", [1.0]), commit_message="p")
    assert api.model_info(repo_id).private is True
    path = hf_hub_download(repo_id, "README.md", cache_dir=tmp_path / "c", endpoint=hub.url, token=hub.token)
    assert Path(path).read_text() == README
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "README.md", cache_dir=tmp_path / "c2", endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api_for(hub, False).model_info(repo_id)


def test_delete_repo(hub) -> None:
    api = api_for(hub)
    repo_id = f"{hub.user}/doomed"
    api.create_repo(repo_id)
    api.delete_repo(repo_id)
    assert repo_id not in hub.repo_ids()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


def test_module_level_functions_use_the_patched_endpoint(hub, tmp_path) -> None:
    import huggingface_hub

    api_for(hub).create_repo(f"{hub.user}/module-level")
    info = huggingface_hub.model_info(f"{hub.user}/module-level", token=hub.token)
    assert info.id == f"{hub.user}/module-level"
    path = huggingface_hub.hf_hub_download(f"{hub.user}/module-level", ".gitattributes", cache_dir=tmp_path / "c")
    assert "safetensors" in Path(path).read_text()
    assert HfApi().endpoint == hub.url == constants.ENDPOINT


def test_stop_refuses_connections_and_restart_keeps_repos(tmp_path, monkeypatch) -> None:
    with running_hub(tmp_path / "server") as server:
        point_client_at(server, monkeypatch, tmp_path / "hf_home")
        api = api_for(server)
        api.create_repo(f"{server.user}/kept")
    with pytest.raises(httpx2.ConnectError):
        api.model_info(f"{server.user}/kept")
    again = HubServer(tmp_path / "server")
    try:
        assert again.start().startswith("http://127.0.0.1:")
        assert HfApi(endpoint=again.url, token=again.token).model_info(f"{again.user}/kept").sha == server.head(
            f"{server.user}/kept"
        )
    finally:
        again.stop()
    assert ("POST", "/api/repos/create") in server.requests and not server.errors


def test_deletions_ranges_and_the_yaml_fallback(hub, tmp_path) -> None:
    from hub_server import _simple_yaml, parse_front_matter

    api = api_for(hub)
    repo_id = f"{hub.user}/edits"
    api.create_repo(repo_id)
    folder = make_entry(tmp_path / "e", [1.0, 2.0])
    (folder / "logs").mkdir()
    (folder / "logs" / "a.txt").write_text("a")
    first = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="p").oid
    api.delete_file("adapter_config.json", repo_id=repo_id)
    api.delete_folder("logs", repo_id=repo_id)
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "README.md", "adapter_model.safetensors"]
    assert "logs/a.txt" in api.list_repo_files(repo_id, revision=first)
    with pytest.raises(EntryNotFoundError):
        api.delete_file("adapter_config.json", repo_id=repo_id)

    url = f"{hub.url}/{repo_id}/resolve/{first}/adapter_config.json"
    data = (folder / "adapter_config.json").read_bytes()
    head = httpx2.head(url)
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == first
    assert head.headers["ETag"] == f'"{git_blob_sha1(data)}"' and int(head.headers["Content-Length"]) == len(data)
    part = httpx2.get(url, headers={"Range": "bytes=2-5"})
    assert part.status_code == 206 and part.content == data[2:6]
    assert part.headers["Content-Range"] == f"bytes 2-5/{len(data)}"
    missing = httpx2.get(f"{hub.url}/{repo_id}/resolve/main/adapter_config.json")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"

    front = README.split("---")[1]
    assert (
        _simple_yaml(front)
        == parse_front_matter(README)
        == {
            "library_name": "lightning-peft",
            "tags": ["lightning-peft", "lora"],
            "base_model": "x",
        }
    )
    assert _simple_yaml("tags:\n  - a\n  - 'b'\nr: 4\nok: true\n") == {"tags": ["a", "b"], "r": 4, "ok": True}
    assert parse_front_matter("# no front matter") is None
