"""Registry fault injection (issue 14, defects 3-5 and 9): a publish killed at every step, corrupt and
hostile cards, refusals whose cause went away, read errors, an unreadable CURRENT.

A publish runs in a child process that SIGKILLs itself at one step (no cleanup code runs, as with a
crashed trainer). Whatever it leaves, listing, activation and training go on, `voxloop models check`
names the leftover and `--clean` removes it once its writer is gone, never while one runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY_VERSION
from swap_support import publish_copy
from voxloop.clients.cli import main
from voxloop.core.lm_decoder import DecoderFilesError, decoder_factory_from_card
from voxloop.core.registry import (
    CARD_FILE,
    LEFTOVER_GRACE_S,
    MODEL_FILE,
    ReadFailed,
    Registry,
    RegistryError,
    VerificationError,
    sha256_file,
    validate_version,
    write_card,
)
from voxloop.server.model_admin import list_models
from voxloop.server.registry_check import check_registry
from voxloop.trainer.cycle import child_version_name

# Each step of a publish (and of the activation that follows it), and where the child kills itself.
PUBLISH_STEPS = ("after_lock", "copying_files", "before_card", "after_card", "before_rename", "after_rename",
                 "before_current", "replacing_current", "before_history")

CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from voxloop.core import registry as reg

    root, source, version, step = sys.argv[1:5]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def around(target, name, before, after=None, when=lambda *a, **k: True):
        original = getattr(target, name)
        def wrapped(*args, **kwargs):
            if before and when(*args, **kwargs):
                die()
            result = original(*args, **kwargs)
            if after and when(*args, **kwargs):
                die()
            return result
        setattr(target, name, wrapped)

    is_card = lambda path, *a, **k: Path(path).name == reg.CARD_FILE
    names = lambda file: (lambda path, *a, **k: Path(path).name == file)
    if step == "after_lock":
        around(Path, "mkdir", True, when=lambda path, *a, **k: str(path).endswith(reg.STAGING_SUFFIX))
    elif step == "copying_files":
        around(shutil, "copyfile", False, True)  # after the first file
    elif step in ("before_card", "after_card"):
        around(Path, "write_text", step == "before_card", step == "after_card", when=is_card)
    elif step in ("before_rename", "after_rename"):
        around(os, "rename", step == "before_rename", step == "after_rename")
    elif step == "before_current":
        around(reg, "atomic_write_text", True, when=names(reg.CURRENT_FILE))
    elif step == "replacing_current":  # CURRENT's temporary file written, not yet renamed over it
        around(os, "replace", True, when=lambda source, target: Path(target).name == reg.CURRENT_FILE)
    elif step == "before_history":
        around(reg, "atomic_write_text", True, when=names(reg.HISTORY_FILE))
    elif step == "hold":  # a live publish: blocks while copying until its parent closes stdin
        original = shutil.copyfile
        def slow(*args, **kwargs):
            print("copying", flush=True)
            sys.stdin.read()
            return original(*args, **kwargs)
        shutil.copyfile = slow
    source = Path(source)
    files = {reg.MODEL_FILE: source / reg.MODEL_FILE, "notes/extra.txt": source / reg.CARD_FILE}
    reg.Registry(root).publish(version, files, {"parent_version": "tiny-0001"}, activate=True)
""")


def run_child(registry_root: Path, version: str, step: str, **popen) -> subprocess.Popen:
    source = Registry(registry_root).version_dir(TINY_VERSION)
    return subprocess.Popen([sys.executable, "-c", CHILD, str(registry_root), str(source), version, step], **popen)


def age(path: Path, seconds: float) -> None:
    """Make `path` (and everything below it) look `seconds` old."""
    then = time.time() - seconds
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(item, (then, then), follow_symlinks=False)


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_a_publish_killed_at_any_step_blocks_nothing_and_its_leftovers_are_cleaned(tiny_registry, step, capsys):
    child = run_child(tiny_registry, "tiny-0002", step)
    assert child.wait(60) == -signal.SIGKILL
    registry = Registry(tiny_registry)
    published = step in ("after_rename", "before_current", "replacing_current", "before_history")

    # Listing, activation and training go on.
    assert registry.versions() == ([TINY_VERSION, "tiny-0002"] if published else [TINY_VERSION])
    listing = list_models(registry, TINY_VERSION)
    assert {m.version for m in listing.models} == set(registry.versions())
    assert registry.target_version() == (TINY_VERSION if step != "before_history" else "tiny-0002")
    registry.activate(TINY_VERSION, action="activate")
    if published:
        registry.activate("tiny-0002", action="activate")  # the renamed version is whole
        assert registry.verify("tiny-0002")["files"].keys() == {MODEL_FILE, "notes/extra.txt"}
    child_name = child_version_name(registry, TINY_VERSION, 2)
    publish_copy(tiny_registry, TINY_VERSION, child_name, activate=False)  # the trainer's next publish
    assert child_name in registry.versions()

    # `voxloop models check` names what was left; --clean removes it once its writer is gone.
    leftovers = registry.leftovers()
    kinds = {leftover.kind for leftover in leftovers}
    assert not any(leftover.live for leftover in leftovers)
    if step == "after_lock":
        assert kinds == {"publish_lock"}
    elif step in ("copying_files", "before_card", "after_card", "before_rename"):
        assert kinds == {"staging", "publish_lock"}
    elif step == "after_rename":
        assert kinds == {"publish_lock"}  # its staging directory is the version now
    elif step == "replacing_current":
        assert kinds == {"temporary"} and leftovers[0].path.name.startswith(".CURRENT.")
    else:
        assert kinds == set()
    assert main(["models", "check", "--model-dir", str(tiny_registry), "--json"]) == 0  # too recent to touch
    report = json.loads(capsys.readouterr().out)
    assert {item["path"] for item in report["leftovers"]} == {str(x.path.relative_to(tiny_registry)) for x in leftovers}
    assert main(["models", "check", "--model-dir", str(tiny_registry), "--clean"]) == 0
    capsys.readouterr()
    assert {leftover.path for leftover in registry.leftovers()} == {leftover.path for leftover in leftovers}
    for leftover in leftovers:
        age(leftover.path, 2 * LEFTOVER_GRACE_S)
    assert main(["models", "check", "--model-dir", str(tiny_registry), "--clean"]) == 0
    out = capsys.readouterr().out
    for leftover in leftovers:
        assert f"leftover {leftover.path.relative_to(tiny_registry)}\t{leftover.kind}" in out
    assert out.count(": removed") == len(leftovers)
    assert registry.leftovers() == []
    assert sorted(p.name for p in registry.versions_root.iterdir()) == sorted(registry.versions())


def test_a_running_publish_is_never_cleaned_however_old_it_looks(tiny_registry):
    child = run_child(tiny_registry, "tiny-0003", "hold", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "copying"
        registry = Registry(tiny_registry)
        leftovers = registry.leftovers()
        assert {leftover.kind for leftover in leftovers} == {"staging", "publish_lock"}
        assert all(leftover.live for leftover in leftovers)
        for leftover in leftovers:
            age(leftover.path, 10 * 3600)
        assert registry.clean_leftovers() == []
        assert all(leftover.path.exists() for leftover in leftovers)
    finally:
        child.stdin.close()
    assert child.wait(60) == 0
    assert Registry(tiny_registry).current_version() == "tiny-0003"
    assert Registry(tiny_registry).leftovers() == []


def test_a_version_with_a_broken_card_is_listed_as_refused_and_blocks_nothing(tiny_registry):
    registry = Registry(tiny_registry)
    broken = registry.versions_root / "tiny-broken"
    shutil.copytree(registry.version_dir(TINY_VERSION), broken)
    (broken / CARD_FILE).write_text("{ not json")
    (registry.versions_root / "no-card").mkdir()
    # An older voxloop's staging directory (no lock file), killed after writing its card.
    old_staging = registry.versions_root / ".tiny-0009.k2j3h4"
    shutil.copytree(registry.version_dir(TINY_VERSION), old_staging)

    assert registry.versions() == [TINY_VERSION]
    assert set(registry.broken_versions()) == {"tiny-broken", "no-card"}
    listing = list_models(registry, TINY_VERSION)
    states = {m.version: (m.state, m.refused_reason) for m in listing.models}
    assert states[TINY_VERSION][0] != states["tiny-broken"][0] and states["tiny-broken"][1] == "card"
    publish_copy(tiny_registry, TINY_VERSION, "tiny-0002")  # publishing and activating go on
    assert registry.target_version() == "tiny-0002"
    assert child_version_name(registry, "tiny-0002", 3) == "tiny-0002-c0003"
    with pytest.raises(VerificationError, match="not valid JSON") as raised:
        registry.verify("tiny-broken")
    assert raised.value.reason == "card"
    report = check_registry(registry)
    assert not report.healthy and {v.version for v in report.versions if v.status == "broken"} == {"tiny-broken",
                                                                                                   "no-card"}
    stale = [leftover for leftover in report.leftovers if leftover.path == old_staging]
    assert stale and stale[0].kind == "staging" and not stale[0].removable  # lockless: an hour's grace
    age(old_staging, 2 * 3600)
    assert [leftover.path for leftover in registry.clean_leftovers()] == [old_staging]


# --- card paths (defect 5) ---

def test_card_files_outside_the_version_directory_are_refused_before_they_are_read(tiny_registry, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not for you\n")
    registry = Registry(tiny_registry)
    for name in (f"../../../../../../..{outside}", str(outside), "policy/../../x", "./model.onnx"):
        card_path = registry.version_dir(TINY_VERSION) / CARD_FILE
        card = json.loads(card_path.read_text())
        card["files"] = {**{k: v for k, v in card["files"].items() if k == MODEL_FILE}, name: sha256_file(outside)}
        card_path.write_text(json.dumps(card))
        with pytest.raises(VerificationError, match="leaves the version directory") as raised:
            registry.verify(TINY_VERSION)
        assert raised.value.reason == "card"
    # A symlink inside the version directory pointing out of it.
    (registry.version_dir(TINY_VERSION) / "link.txt").symlink_to(outside)
    card["files"] = {MODEL_FILE: card["files"][MODEL_FILE], "link.txt": sha256_file(outside)}
    card_path.write_text(json.dumps(card))
    with pytest.raises(VerificationError, match="resolves outside"):
        registry.verify(TINY_VERSION)
    with pytest.raises(VerificationError, match="leaves the version directory"):
        registry.publish("tiny-evil", {"../evil.onnx": outside}, {})


def test_decoder_files_must_be_listed_in_the_card_and_inside_the_version(tmp_path):
    version_dir = tmp_path / "v"
    version_dir.mkdir()
    outside = tmp_path / "lm.arpa"
    outside.write_text("\\data\\\n")
    (version_dir / "lexicon.txt").write_text("a a |\n")
    (version_dir / "lm.arpa").write_text("\\data\\\n")
    decoder = {"type": "lexicon-lm", "lexicon": "lexicon.txt", "lm": str(outside)}
    card = {"files": {"lexicon.txt": "0" * 64, "lm.arpa": "0" * 64}, "decoder": decoder}
    with pytest.raises(DecoderFilesError, match="lm file"):
        decoder_factory_from_card(card, version_dir, ("<blank>", " ", "a"), 0.04)
    card["decoder"] = {**decoder, "lm": "lm.arpa", "lexicon": "unlisted.txt"}
    (version_dir / "unlisted.txt").write_text("a a |\n")
    with pytest.raises(DecoderFilesError, match="does not list it"):
        decoder_factory_from_card(card, version_dir, ("<blank>", " ", "a"), 0.04)


# --- refusals whose cause went away (defect 4) ---

def corrupt(path: Path) -> bytes:
    original = path.read_bytes()
    path.write_bytes(original[:-64] + bytes(64))
    return original


def serving_config(registry_root: Path, data_dir: Path):
    from voxloop.server.config import ServerConfig
    return ServerConfig(port=0, metrics_port=0, data_dir=data_dir, model_dir=registry_root,
                        model_watch_interval_s=3600.0)


def test_a_start_refused_for_a_corrupt_file_serves_once_the_file_is_restored(tiny_registry, tmp_path):
    from voxloop.server.app import BackgroundServer
    model = Registry(tiny_registry).version_dir(TINY_VERSION) / MODEL_FILE
    original = corrupt(model)
    with pytest.raises(RegistryError, match=r"none loads: tiny-0001 \(sha256") as raised:
        BackgroundServer(serving_config(tiny_registry, tmp_path / "data"))
    assert "activate --force" not in str(raised.value)  # needs a running server: not the way out here
    assert Registry(tiny_registry).refusal(TINY_VERSION).reason == "sha256"
    model.write_bytes(original)  # restored from a backup
    with BackgroundServer(serving_config(tiny_registry, tmp_path / "data")) as running:
        assert running.server.model.version == TINY_VERSION
    assert Registry(tiny_registry).refusal(TINY_VERSION) is None


def test_a_start_tries_refused_versions_again_when_nothing_else_loads(tiny_registry, tmp_path):
    from voxloop.server.app import BackgroundServer
    Registry(tiny_registry).refuse(TINY_VERSION, "load", "onnxruntime: a fault since fixed")  # files unchanged
    with BackgroundServer(serving_config(tiny_registry, tmp_path / "data")) as running:
        assert running.server.model.version == TINY_VERSION
    assert Registry(tiny_registry).refusal(TINY_VERSION) is None


def test_a_rolled_back_version_stays_refused_whatever_happens_to_its_files(tiny_registry):
    publish_copy(tiny_registry, TINY_VERSION, "tiny-0002")
    registry = Registry(tiny_registry)
    registry.refuse("tiny-0002", "rolled_back", "rolled back to tiny-0001")
    registry.activate(TINY_VERSION, action="rollback")
    age(registry.version_dir("tiny-0002") / MODEL_FILE, 10)  # its files change
    assert "tiny-0002" in registry.standing_refusals()
    assert registry.target_version() == TINY_VERSION


def test_a_read_error_is_retried_and_never_recorded_as_a_refusal(tiny_registry, tmp_path, monkeypatch):
    from voxloop.core import registry as registry_module
    from voxloop.server import watcher as watcher_module
    from voxloop.server.app import load_serving_model
    from voxloop.server.watcher import load_initial
    publish_copy(tiny_registry, TINY_VERSION, "tiny-0002")  # CURRENT
    registry = Registry(tiny_registry)
    config = serving_config(tiny_registry, tmp_path / "data")
    real_sha256 = registry_module.sha256_file
    failures = {"left": 100}

    def flaky(path):
        if "tiny-0002" in str(path) and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(5, "Input/output error")
        return real_sha256(path)

    monkeypatch.setattr(registry_module, "sha256_file", flaky)
    monkeypatch.setattr(watcher_module, "READ_RETRY_WAIT_S", 0.01)
    model = load_initial(registry, lambda v: load_serving_model(registry, config, lambda: 1, v))
    assert model.version == TINY_VERSION  # tiny-0002 unreadable for now: the previous good version serves
    assert registry.refusals() == {}  # not refused: every replica may still serve it
    with pytest.raises(ReadFailed):
        registry.verify("tiny-0002")
    failures["left"] = 1  # the volume recovers after one more error
    model = load_initial(registry, lambda v: load_serving_model(registry, config, lambda: 1, v))
    assert model.version == "tiny-0002" and registry.refusals() == {}


# --- input and log hygiene (defects 8, 9) ---

@pytest.mark.parametrize("bad", ["base-20261125\n", "base\n-1", "", "-x", "a" * 129, "a/b", ".hidden", "x" * 20000])
def test_malformed_version_ids_are_refused_with_a_bounded_message(bad):
    with pytest.raises(RegistryError, match="invalid version id") as raised:
        validate_version(bad)
    assert len(str(raised.value)) < 300


def test_an_unreadable_current_is_logged_once_without_a_traceback(tiny_registry, caplog):
    from voxloop.server.app import BackgroundServer
    with BackgroundServer(serving_config(tiny_registry, tiny_registry.parent / "data")) as running:
        watcher = running.server.watcher
        current = tiny_registry / "CURRENT"
        current.unlink()
        current.mkdir()  # reading it fails (IsADirectoryError) on every poll
        caplog.set_level(logging.INFO, logger="voxloop.server.watcher")
        watcher.interval_s = 0.02
        running.loop.call_soon_threadsafe(watcher.poke)
        time.sleep(0.5)  # ~25 polls
        current.rmdir()
        current.write_text(TINY_VERSION + "\n")
        time.sleep(0.2)
        watcher.interval_s = 3600.0
        assert running.call(asyncio.sleep(0, result=running.server.model.version)) == TINY_VERSION
    records = [r for r in caplog.records if r.name == "voxloop.server.watcher"]
    problems = [r for r in records if r.levelno >= logging.WARNING]
    assert len(problems) == 1 and "cannot read the registry" in problems[0].getMessage()
    assert not any(r.exc_info for r in records)
    assert any("reads again" in r.getMessage() for r in records)


def test_write_card_hashes_every_file_of_a_version_directory_so_the_registry_verifies_it(tmp_path):
    version_dir = tmp_path / "build" / "v-0001"
    (version_dir / "policy").mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(b"graph")
    (version_dir / "policy" / "weights.bin").write_bytes(b"weights")
    card = write_card(version_dir, {"version": "v-0001", "parent_version": None})
    assert set(card["files"]) == {"model.onnx", "policy/weights.bin"}  # card.json itself is not listed
    assert json.loads((version_dir / "card.json").read_text()) == card
    registry = Registry(tmp_path / "registry")
    assert registry.seed_from(version_dir) == "v-0001" and registry.verify("v-0001")["files"] == card["files"]
    (registry.version_dir("v-0001") / "policy" / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(VerificationError, match="sha256"):
        registry.verify("v-0001")
