"""The Hub: the real huggingface_hub client against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import loramerge as lm
from conftest import save_adapter, tiny_llama
from hub_server import READ, WRITE, HubServer
from loramerge.cli.main import main
from loramerge.formats.hub_download import hub_path
from loramerge.formats.shards import CheckpointReader

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server() -> Iterator[HubServer]:
    hub = HubServer().start()
    yield hub
    hub.stop()


@pytest.fixture(autouse=True)
def isolated_hub_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: HubServer) -> None:
    """A fresh cache, no stored token, online, classic LFS uploads (no Xet), the test server as endpoint."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    # what HF_ENDPOINT set before the import gives (huggingface-hub 1.x builds URLs from these)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    server.state.regular_only = False
    server.state.fail_lfs_oids.clear()
    server.state.drop_lfs_oids.clear()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-local")
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    base.save_pretrained(root / "base")
    adapter_dir = save_adapter(
        base, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}, root / "adapter"
    )
    lm.merge_checkpoint(root / "base", adapter_dir, root / "merged", max_shard_size="40KB", progress=False)
    return {"base": root / "base", "adapter": adapter_dir, "merged": root / "merged", "root": root}


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_push_merged_checkpoint_then_download_into_a_fresh_cache(
    server: HubServer, local: dict[str, Path], tmp_path: Path
) -> None:
    report = lm.verify_checkpoint(local["base"], local["adapter"], local["merged"], progress=False)
    info = lm.push_to_hub(local["merged"], "alice/merged-llama", token=WRITE, report=report, base_model="org/base")
    assert info.commit_url.startswith(server.endpoint + "/alice/merged-llama/commit/")
    repo = server.state.repos["alice/merged-llama"]
    assert repo.private
    shards = sorted(p.name for p in local["merged"].glob("*.safetensors"))
    assert len(shards) >= 2
    assert len(server.state.lfs_puts) >= len(shards)  # the weights went through the LFS path

    downloaded = hub_path("alice/merged-llama", token=WRITE)
    assert str(downloaded).startswith(str(tmp_path / "hf-cache"))
    got = _files(downloaded)
    for name, data in _files(local["merged"]).items():
        if name not in ("loramerge.json", "README.md"):  # the push writes these two
            assert got[name] == data, name
    card = got["README.md"].decode()
    assert card.startswith("---\nbase_model: org/base\nbase_model_relation: merge\nlibrary_name: transformers\n")
    assert "- loramerge\n- lora\n" in card and "Verification: **PASSED**" in card
    receipt = json.loads(got["loramerge.json"])
    assert receipt["report"]["passed"] is True and receipt["probe"]["width"] == 8
    assert receipt["lineage"] == lm.lineage(local["merged"]) and len(receipt["lineage"]) == 1
    assert set(receipt["tensors"]) == set(CheckpointReader(local["merged"]).names)

    # private: without a token the repo does not exist for the client
    with pytest.raises(lm.HubError, match="not found.*private"):
        hub_path("alice/merged-llama", cache_dir=tmp_path / "other-cache")


def test_verify_hub_confirms_the_pushed_model_and_catches_a_changed_one(
    server: HubServer, local: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = lm.load_base(local["merged"])
    lm.push_to_hub(model, "alice/from-memory", token=WRITE, adapters=["alice/my-adapter"])
    check = lm.verify_hub("alice/from-memory", token=WRITE)
    assert check.passed and check.tensors_checked > 10 and check.probe_error <= check.probe_limit

    monkeypatch.setenv("HF_TOKEN", WRITE)  # the CLI takes the token from the environment
    assert main(["verify", "--hub", "alice/from-memory"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and WRITE not in out

    # someone replaces a shard with other weights: the hashes no longer match
    from safetensors.torch import load_file, save_file

    repo = server.state.repos["alice/from-memory"]
    files = dict(repo.commits[repo.branches["main"]])
    shard = next(p for p in files if p.endswith(".safetensors"))
    tensors = load_file(local["merged"] / shard) if (local["merged"] / shard).exists() else None
    tmp = local["root"] / "tampered.safetensors"
    original = hub_path("alice/from-memory", token=WRITE) / shard
    tensors = load_file(original)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, tmp, metadata={"format": "pt"})
    files[shard] = type(files[shard])(tmp.read_bytes(), True)
    repo.commits["f" * 40] = files
    repo.branches["main"] = "f" * 40
    bad = lm.verify_hub("alice/from-memory", token=WRITE)
    assert not bad.passed and name in bad.mismatched
    assert main(["verify", "--hub", "alice/from-memory"]) == 1


def test_push_adapter_over_the_regular_path_and_load_it_back(server: HubServer, local: dict[str, Path]) -> None:
    server.state.regular_only = True  # every file travels base64 in the commit
    lm.push_to_hub(local["adapter"], "alice/adapter", token=WRITE, private=False, base_model="org/tiny-llama")
    assert not server.state.repos["alice/adapter"].private
    assert (
        server.files("alice/adapter")["adapter_model.safetensors"]
        == (local["adapter"] / "adapter_model.safetensors").read_bytes()
    )
    card = server.files("alice/adapter")["README.md"].decode()
    assert card.startswith("---\nbase_model: org/tiny-llama\nbase_model_relation: adapter\nlibrary_name: peft\n")
    assert "not verified by loramerge" in card

    remote = lm.load_adapter("alice/adapter")  # public: no token needed
    mine = lm.load_adapter(local["adapter"])
    assert remote.modules.keys() == mine.modules.keys()
    for name, mod in mine.modules.items():
        assert torch.equal(remote.modules[name].update.lora_B, mod.update.lora_B)


def test_load_base_and_merge_checkpoint_straight_from_repo_ids(
    server: HubServer, local: dict[str, Path], tmp_path: Path
) -> None:
    lm.push_to_hub(local["base"], "alice/base", token=WRITE, probe=False)
    lm.push_to_hub(local["adapter"], "alice/adapter-2", token=WRITE)
    base = lm.load_base("alice/base", token=WRITE)
    assert torch.equal(base.model.embed_tokens.weight, lm.load_base(local["base"]).model.embed_tokens.weight)
    report = lm.merge_checkpoint("alice/base", "alice/adapter-2", tmp_path / "merged", token=WRITE, progress=False)
    assert report.passed
    for name in _files(local["merged"]):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            continue
        assert (tmp_path / "merged" / name).exists(), name
    ours = CheckpointReader(tmp_path / "merged")
    theirs = CheckpointReader(local["merged"])
    for name in theirs.names:
        assert torch.equal(ours.get(name), theirs.get(name)), name
    # only what is needed was downloaded: no pickle weights even when the repo has them
    assert not any(p.suffix == ".bin" for p in Path(tmp_path / "hf-cache").rglob("*"))

    with pytest.raises(lm.HubError, match="no revision 'nope'"):
        lm.load_base("alice/base", token=WRITE, revision="nope")
    with pytest.raises(lm.HubError, match="not found"):
        lm.load_adapter("alice/does-not-exist", token=WRITE)


def test_push_to_a_branch_and_as_a_pull_request(server: HubServer, local: dict[str, Path]) -> None:
    lm.push_to_hub(local["adapter"], "alice/branchy", token=WRITE)
    main_sha = server.state.repos["alice/branchy"].branches["main"]
    lm.push_to_hub(local["adapter"], "alice/branchy", token=WRITE, revision="dev", commit_message="to dev")
    repo = server.state.repos["alice/branchy"]
    assert "dev" in repo.branches and repo.branches["main"] == main_sha
    assert lm.load_adapter("alice/branchy", token=WRITE, revision="dev").modules

    info = lm.push_to_hub(local["merged"], "alice/branchy", token=WRITE, create_pr=True, probe=False)
    assert info.pr_url is not None and "refs/pr/1" in repo.branches
    assert repo.branches["main"] == main_sha  # the PR did not touch main
    assert "model.safetensors.index.json" in server.files("alice/branchy", "refs/pr/1")


def test_token_errors_and_the_token_never_leaks(
    server: HubServer, local: dict[str, Path], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(lm.HubError, match=r"rejected the token \(401\)") as bad:
        lm.push_to_hub(local["adapter"], "alice/x", token="hf_wrong_token_000")
    assert "hf_wrong_token_000" not in str(bad.value)
    with pytest.raises(lm.HubError, match=r"no permission.*\(403\)") as forbidden:
        lm.push_to_hub(local["adapter"], "bob/x", token=READ)
    assert READ not in str(forbidden.value)
    lm.push_to_hub(local["adapter"], "alice/secret", token=WRITE)
    text = caplog.text + capsys.readouterr().out
    for data in server.files("alice/secret").values():
        assert WRITE.encode() not in data
    assert WRITE not in text and READ not in text


def test_interrupted_push_resumes_without_resending(server: HubServer, local: dict[str, Path]) -> None:
    shards = sorted(local["merged"].glob("*.safetensors"))
    victim = hashlib.sha256(shards[-1].read_bytes()).hexdigest()
    server.state.fail_lfs_oids.add(victim)
    before = len(server.state.lfs_puts)
    with pytest.raises(lm.HubError, match=r"server failed \(500\).*run the same call again"):
        lm.push_to_hub(local["merged"], "alice/resume", token=WRITE, probe=False)
    assert server.files("alice/resume").keys() == {".gitattributes"}  # nothing was committed
    first = server.state.lfs_puts[before:]
    assert victim not in first and first  # the others arrived

    server.state.fail_lfs_oids.clear()
    lm.push_to_hub(local["merged"], "alice/resume", token=WRITE, probe=False)
    second = server.state.lfs_puts[before + len(first) :]
    assert second == [victim]  # only the missing object was sent again
    for shard in shards:
        assert server.files("alice/resume")[shard.name] == shard.read_bytes()


def test_cli_push(
    server: HubServer, local: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITE)
    assert main(["push", str(local["adapter"]), "alice/cli-adapter", "--public", "--revision", "v1"]) == 0
    out = capsys.readouterr().out
    assert "pushed" in out and WRITE not in out
    repo = server.state.repos["alice/cli-adapter"]
    assert not repo.private and "v1" in repo.branches
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    assert main(["push", str(local["adapter"]), "alice/cli-adapter"]) == 2
    assert "401" in capsys.readouterr().err
    assert main(["push", str(local["root"] / "nothing-here"), "alice/cli-adapter"]) == 2


def test_a_mistyped_local_path_says_both_what_it_is_not(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(lm.HubError, match="'checkpoints/adaptr' is not a local directory.*could not be reached"):
        lm.load_adapter("checkpoints/adaptr")


def test_an_unreachable_hub_is_a_clear_error(local: dict[str, Path]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(lm.HubError, match="could not connect to the Hub"):
        lm.push_to_hub(local["adapter"], "alice/x", token=WRITE, endpoint=f"http://127.0.0.1:{port}")


def test_push_uploads_only_the_checkpoint_never_links_out_or_subdirectories(
    server: HubServer, local: dict[str, Path], tmp_path: Path
) -> None:
    import os
    import shutil

    folder = tmp_path / "merged"
    shutil.copytree(local["merged"], folder)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "credentials.txt").write_text("aws_secret_access_key=...")
    os.symlink(tmp_path / "secrets", folder / "logs")
    os.symlink(tmp_path / "secrets" / "credentials.txt", folder / "LICENSE")
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(b"state")
    (folder / "train.log").write_text("local paths and user names")
    lm.push_to_hub(folder, "alice/clean-push", token=WRITE, probe=False)
    repo = server.state.repos["alice/clean-push"]
    pushed = set(repo.commits[repo.branches["main"]])
    assert not {n for n in pushed if n.startswith(("logs", "checkpoint-500", "LICENSE", "train.log"))}, pushed
    assert {"config.json", "loramerge.json", "README.md", "model.safetensors.index.json"} <= pushed


def test_a_hub_repo_whose_index_names_a_local_file_is_refused(server: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    from loramerge.errors import UnsafePathError

    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16).eval()
    base.save_pretrained(tmp_path / "hostile", max_shard_size="40KB")
    adapter = save_adapter(base, {"r": 4, "target_modules": ["q_proj"]}, tmp_path / "adapter")
    local_secret = tmp_path / "victim.safetensors"
    index_path = tmp_path / "hostile" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "hostile" / first).rename(local_secret)
    index["weight_map"] = {k: (str(local_secret) if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    api = HfApi(endpoint=server.endpoint, token=WRITE)  # uploaded by someone else's client, as is
    api.create_repo("mallory/hostile", private=False, exist_ok=True)
    api.upload_folder(folder_path=str(tmp_path / "hostile"), repo_id="mallory/hostile")
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        lm.merge_checkpoint("mallory/hostile", adapter, tmp_path / "out", token=WRITE, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsafePathError):  # and push refuses to publish such a directory
        lm.push_to_hub(tmp_path / "hostile", "alice/republish", token=WRITE, probe=False)


def test_pushed_records_carry_no_local_absolute_paths(
    server: HubServer, local: dict[str, Path], tmp_path: Path
) -> None:
    lm.push_to_hub(local["merged"], "alice/private-paths", token=WRITE, probe=False)
    downloaded = hub_path("alice/private-paths", token=WRITE)
    home = str(local["root"])
    for path in downloaded.iterdir():
        data = path.read_bytes()
        assert home.encode() not in data, f"{path.name} carries the local path {home}"
    record = json.loads((downloaded / "loramerge.json").read_text())
    assert record["lineage"][-1]["adapter"]["source"] == local["adapter"].name


def test_a_connection_dropped_mid_upload_is_a_hub_error(
    server: HubServer, local: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = sorted(local["merged"].glob("*.safetensors"))
    victim = hashlib.sha256(shards[0].read_bytes()).hexdigest()
    server.state.drop_lfs_oids.add(victim)
    with pytest.raises(lm.HubError, match="failed|connect"):
        lm.push_to_hub(local["merged"], "alice/dropped", token=WRITE, probe=False)
    assert server.files("alice/dropped").keys() <= {".gitattributes"}  # nothing was committed
    server.state.drop_lfs_oids.clear()
    lm.push_to_hub(local["merged"], "alice/dropped", token=WRITE, probe=False)
    assert server.files("alice/dropped")[shards[0].name] == shards[0].read_bytes()


def test_verify_hub_with_a_malformed_record_is_a_hub_error(server: HubServer, local: dict[str, Path]) -> None:
    lm.push_to_hub(local["merged"], "alice/bad-record", token=WRITE, probe=False)
    repo = server.state.repos["alice/bad-record"]
    files = dict(repo.commits[repo.branches["main"]])
    record = json.loads(files["loramerge.json"].data)
    record["tensors"] = {"model.embed_tokens.weight": ["not", "a", "digest"]}
    files["loramerge.json"] = type(files["loramerge.json"])(json.dumps(record).encode(), False)
    repo.commits["e" * 40] = files
    repo.branches["main"] = "e" * 40
    with pytest.raises(lm.HubError, match="'tensors' entry.*corrupt"):
        lm.verify_hub("alice/bad-record", token=WRITE)
