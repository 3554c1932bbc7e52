"""Checkpoints verify before any worker starts: meta.json records every rank file's size and
sha256, a bad file is named in one line, and --resume falls back to the newest good one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualpipe_mhc.cluster import checkpoint
from dualpipe_mhc.cluster.checkpoint import CheckpointError
from dualpipe_mhc.config import dump_config, load_config

CFG = dump_config(load_config(None, ["pipeline.ranks=2", "pipeline.microbatches=4"]))


def _save(root: Path, step: int, ranks: int = 2, cfg=CFG) -> Path:
    d = checkpoint.step_dir(root, step)
    d.mkdir(parents=True)
    files = []
    for r in range(ranks):
        f = d / f"rank{r}.pt"
        f.write_bytes(bytes([r, step]) * 1000)
        files.append(str(f))
    return checkpoint.commit(root, step, cfg, files)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = [
    # (how the newest checkpoint is broken, the file the message names, what it says)
    (lambda d: (d / "meta.json").write_text(""), "meta.json", "is empty"),
    (lambda d: (d / "meta.json").write_text("{\"step\": 3,"), "meta.json", "is not valid JSON"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"step": 3, "data_position": 4, "config": CFG})),
     "meta.json", "records no file sizes or checksums"),
    (lambda d: _truncate(d / "rank0.pt"), "rank0.pt", "is 100 bytes, meta.json recorded 2000"),
    (lambda d: (d / "rank1.pt").unlink(), "rank1.pt", "is missing"),
    (lambda d: _flip(d / "rank1.pt"), "rank1.pt", "does not match its sha256"),
]
IDS = ["empty-meta", "bad-json", "old-meta", "truncated-rank", "missing-rank", "flipped-byte"]


def test_commit_records_size_and_sha256(tmp_path):
    d = _save(tmp_path, 3)
    meta = checkpoint.verify(d)
    assert meta["format"] == checkpoint.FORMAT and meta["data_position"] == 4
    assert set(meta["files"]) == {"rank0.pt", "rank1.pt"}
    assert meta["files"]["rank0.pt"]["bytes"] == 2000 and len(meta["files"]["rank0.pt"]["sha256"]) == 64


@pytest.mark.parametrize("corrupt, name, says", CORRUPTIONS, ids=IDS)
def test_corrupt_checkpoint_names_the_file(tmp_path, corrupt, name, says):
    d = _save(tmp_path, 3)
    corrupt(d)
    with pytest.raises(CheckpointError) as info:
        checkpoint.verify(d)
    message = str(info.value)
    assert "\n" not in message and str(d / name) in message and says in message, message
    # with nothing older to fall back to, resume refuses in one line, naming the same file
    with pytest.raises(CheckpointError) as info:
        checkpoint.find_latest(tmp_path, CFG)
    message = str(info.value)
    assert "\n" not in message and "no checkpoint under" in message and str(d / name) in message


@pytest.mark.parametrize("corrupt, name, says", CORRUPTIONS, ids=IDS)
def test_resume_falls_back_to_the_newest_good_checkpoint(tmp_path, corrupt, name, says):
    _save(tmp_path, 1)
    good = _save(tmp_path, 3)
    corrupt(_save(tmp_path, 5))
    point = checkpoint.find_latest(tmp_path, CFG)
    assert point.path == good and point.data_position == 4
    assert len(point.skipped) == 1 and point.skipped[0].startswith("step_000005: ") and says in point.skipped[0]
    line = point.describe()
    assert "\n" not in line and f"resuming from checkpoint {good} at step 4" in line and "skipped" in line


def test_unfinished_save_is_skipped_quietly_and_other_config_refused(tmp_path):
    good = _save(tmp_path, 3)
    (tmp_path / "step_000005").mkdir()  # killed while saving: no meta.json
    point = checkpoint.find_latest(tmp_path, CFG)
    assert point.path == good and point.skipped == []
    other = dump_config(load_config(None, ["model.width=128"]))
    with pytest.raises(CheckpointError, match=r"different model config \(width\)"):
        checkpoint.find_latest(tmp_path, other)


@pytest.mark.parametrize("corrupt, name, says", CORRUPTIONS[:2] + CORRUPTIONS[3:4], ids=IDS[:2] + IDS[3:4])
def test_run_resume_from_corrupt_checkpoint_is_one_line_before_ray(tmp_path, corrupt, name, says, capsys, monkeypatch):
    from dualpipe_mhc import cli

    def forbidden(*a, **k):
        raise AssertionError("Ray must not start for a checkpoint that does not verify")

    monkeypatch.setattr("dualpipe_mhc.cluster.runtime.connect", forbidden)
    cfg = load_config("tiny")
    root = tmp_path / "ckpt"
    d = _save(root, 3, cfg.pipeline.ranks, dump_config(cfg))
    corrupt(d)
    code = cli.main(["run", "--resume", "--set", f"run.checkpoint_dir={root}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert str(d / name) in err and says in err


@pytest.mark.ray
def test_resume_skips_a_truncated_checkpoint_and_says_so(pipeline2, tmp_path):
    from conftest import small_config

    from dualpipe_mhc.cluster.train import train

    ckpt = str(tmp_path / "ckpt")
    notes: list[str] = []
    first = train(small_config("dualpipev", 2, 4, steps=4, checkpoint_every=2, checkpoint_dir=ckpt),
                  pipe=pipeline2, on_note=notes.append)
    assert len(first.checkpoints) == 2
    assert [n.split(" after ")[0] for n in notes] == [f"saved checkpoint {c}" for c in first.checkpoints]
    _truncate(Path(first.checkpoints[1]) / "rank0.pt")
    notes.clear()
    resumed = train(small_config("dualpipev", 2, 4, steps=4, checkpoint_dir=ckpt), resume=True,
                    pipe=pipeline2, on_note=notes.append)
    assert resumed.start_step == 2 and resumed.resumed_from == first.checkpoints[0]
    assert [r.step for r in resumed.results] == [2, 3]
    assert len(notes) == 1 and "step_000003: " in notes[0] and "rank0.pt is 100 bytes" in notes[0]
