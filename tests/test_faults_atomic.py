"""Faults a new user hit, for real: a SIGKILLed merge or prepare, readers racing a folder swap, and the
temp folders killed runs leave behind (a killed 7B merge leaves a whole model in `.NAME.tmp-*`)."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunerag.common as common
from tunerag.common import remove_stale_temps, replace_folder, temp_folder

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def kill_when(proc: subprocess.Popen, parent: Path, moment, timeout: float = 300) -> bool:
    """SIGKILL `proc` as soon as `moment(parent, names)` is true for the entries it added to `parent`;
    polls in a tight loop once the command has made its temp folder (coarsely before). False if the
    command ended first."""
    before = set(os.listdir(parent))  # leftovers of earlier killed runs are not this run's moments
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        names = [n for n in os.listdir(parent) if n not in before]
        if moment(parent, names):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if not any(".tmp-" in n for n in names):
            time.sleep(0.01)
    proc.kill()
    proc.wait()
    return False


def temps(parent: Path, kind: str = "") -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(".") and f".{kind}" in n)


# --- replace_folder ----------------------------------------------------------------------------


def version_folder(target: Path, n: int) -> Path:
    new = temp_folder(target)
    for name in ("a.txt", "b.txt"):
        (new / name).write_text(str(n))
    return new


def test_replace_folder_swaps_whole_folders(tmp_path):
    target = tmp_path / "out"
    replace_folder(version_folder(target, 1), target)  # no target yet: a plain rename
    replace_folder(version_folder(target, 2), target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "2", "b.txt": "2"}
    assert os.listdir(tmp_path) == ["out"]  # the old folder and the temp folders are gone


def test_replace_folder_without_renameat2_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_exchange", lambda a, b: False)  # macOS, old kernels, some filesystems
    target = tmp_path / "out"
    replace_folder(version_folder(target, 1), target)
    replace_folder(version_folder(target, 2), target)
    assert (target / "b.txt").read_text() == "2" and os.listdir(tmp_path) == ["out"]


READER = """
import os, sys, time
target, seconds = sys.argv[1], float(sys.argv[2])
seen = misses = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    seen += 1
    if not (os.path.isfile(os.path.join(target, "a.txt")) and os.path.isfile(os.path.join(target, "b.txt"))):
        misses += 1
print(seen, misses)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the one-step swap is Linux's renameat2")
def test_a_concurrent_reader_never_sees_the_folder_missing(tmp_path):
    """Another process checks the folder in a tight loop for 2 s while this one keeps replacing it.
    With two renames instead of the exchange, the reader finds it missing thousands of times."""
    target = tmp_path / "out"
    replace_folder(version_folder(target, 0), target)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), "2"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # the reader is looping
    n = 0
    while reader.poll() is None:
        n += 1
        replace_folder(version_folder(target, n), target)
    seen, misses = map(int, reader.communicate(timeout=60)[0].split())
    assert n > 50 and seen > 1000 and misses == 0
    assert (target / "a.txt").read_text() == str(n) and os.listdir(tmp_path) == ["out"]


# --- stale temp folders ------------------------------------------------------------------------


def test_only_temp_folders_of_dead_processes_on_this_host_are_removed(tmp_path, caplog):
    target = tmp_path / "merged"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = common._host()
    folders = {
        "live": tmp_path / f".merged.tmp-{sleeper.pid}@{host}.abc",
        "mine": tmp_path / f".merged.tmp-{os.getpid()}@{host}.def",
        "other_host": tmp_path / f".merged.tmp-{sleeper.pid}@not-{host}.ghi",
        "other_target": tmp_path / f".merged2.tmp-{sleeper.pid}@{host}.jkl",
        "no_pid": tmp_path / ".merged.tmp-xyz",  # named by an older tunerag: its owner cannot be told
    }
    for folder in folders.values():
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    try:
        assert remove_stale_temps(target) == []  # the sleeper is alive
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        caplog.set_level(logging.INFO, logger="tunerag.common")
        assert remove_stale_temps(target) == [folders["live"]]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert {k for k, f in folders.items() if f.exists()} == {"mine", "other_host", "other_target", "no_pid"}
    notes = [r.getMessage() for r in caplog.records if "killed runs" in r.getMessage()]
    assert len(notes) == 1 and folders["live"].name in notes[0] and "\n" not in notes[0]


def test_a_killed_prepare_leaves_a_temp_folder_that_the_next_run_removes(tmp_path, sample_doc, caplog):
    from embeddings.config import PrepareConfig
    from embeddings.prepare import main

    out = tmp_path / "pairs"
    proc = start(["embeddings.prepare", str(sample_doc), "--generator", "ict", "--out", str(out)], tmp_path / "log")
    assert kill_when(proc, tmp_path, lambda parent, names: any(n.startswith(".pairs.tmp-") for n in names))
    left = temps(tmp_path, "pairs.tmp-")
    assert proc.returncode == -signal.SIGKILL and len(left) == 1 and f"-{proc.pid}@" in left[0]
    assert not out.exists()
    caplog.set_level(logging.INFO)
    main(PrepareConfig(docs=[sample_doc], out=out, generator="ict"))
    assert temps(tmp_path) == [] and sorted(os.listdir(out)) == ["heldout.json", "prepare_stats.json", "train.json", "val.json"]
    assert any("killed runs" in r.getMessage() and left[0] in r.getMessage() for r in caplog.records)


# --- a killed merge ------------------------------------------------------------------------------


def model_state(folder: Path, old_files: dict[str, int]) -> str:
    """'old' or 'new' when `folder` is a complete, loadable model; fails otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert folder.is_dir(), f"{folder} is missing: no model at --out"
    AutoModelForCausalLM.from_pretrained(folder)  # config and every weight read back
    AutoTokenizer.from_pretrained(folder)
    if (folder / "merge_info.json").is_file():
        return "new"
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == old_files
    return "old"


def in_temp(pattern: str, name: str):
    def moment(parent, names):
        return any(n.startswith(pattern) and (parent / n / name).exists() for n in names)
    return moment


MOMENTS = {
    # while the new model is being written: --out must still be the old one
    "writing the new model": (in_temp(".merged.tmp-", "model.safetensors"), {"old"}),
    # written whole, being reloaded and verified
    "verifying the new model": (in_temp(".merged.tmp-", "tokenizer_config.json"), {"old"}),
}

# The swap lasts microseconds: polling missed it on a loaded CI machine ("the merge finished before it
# could be killed"). So there the merge SIGKILLs itself, as it starts deleting the old model it moved aside.
KILLED_AT_THE_SWAP = """
import os, runpy, shutil, signal, sys
rmtree = shutil.rmtree
def rmtree_or_die(path, *args, **kwargs):
    if ".merged.old-" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree_or_die
sys.argv[0] = "llm_finetune.merge"
runpy.run_module("llm_finetune.merge", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_killed_merge_always_leaves_a_whole_model_and_its_temps_are_removed(tiny_qlora_run, tiny_mistral,
                                                                             tmp_path, caplog):
    from llm_finetune.config import MergeConfig
    from llm_finetune.merge import main

    out = tmp_path / "merged"
    shutil.copytree(tiny_mistral, out)  # the previous model at --out
    old_files = {p.name: p.stat().st_size for p in out.iterdir()}
    merge_args = ["--adapter", str(tiny_qlora_run), "--out", str(out), "--overwrite"]
    killed = []
    for label, (moment, allowed) in [*MOMENTS.items(), ("moving the old model aside", (None, {"old", "new"}))]:
        if moment is None:
            proc = subprocess.Popen([sys.executable, "-c", KILLED_AT_THE_SWAP, *merge_args], cwd=REPO, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=(tmp_path / "merge.log").open("w"))
            assert proc.wait(timeout=300) == -signal.SIGKILL, f"{label}: the merge was not killed: " + \
                (tmp_path / "merge.log").read_text()[-2000:]
        else:
            proc = start(["llm_finetune.merge", *merge_args], tmp_path / "merge.log")
            assert kill_when(proc, tmp_path, moment), f"{label}: the merge finished before it could be killed: " + \
                (tmp_path / "merge.log").read_text()[-2000:]
        state = model_state(out, old_files)
        assert state in allowed, f"killed while {label}: --out holds the {state} model"
        killed.append(proc.pid)
        if state == "new":  # put the old model back, so the next moment replaces a different one again
            shutil.rmtree(out)
            shutil.copytree(tiny_mistral, out)
    left = temps(tmp_path, "merged.")  # what the last killed merge left (each run removes the ones before it)
    assert left and all(f"-{killed[-1]}@" in n for n in left)

    caplog.set_level(logging.INFO)
    main(MergeConfig(adapter=str(tiny_qlora_run), out=str(out), overwrite=True))
    assert model_state(out, old_files) == "new"
    assert temps(tmp_path) == []
    note = [r.getMessage() for r in caplog.records if "killed runs" in r.getMessage()]
    assert len(note) == 1 and left[0] in note[0]
