"""Fault injection and hostile input: crashes at chosen points, signals, divergence, two runs on one
folder, write failures, and each class of bad input, through the command line as a user runs it.

Every case asserts the one-line error (no traceback), the exit code, that nothing outside the run's
output folder changed and that no existing file was replaced. Crashes land at named points
(``lib_ti.fileio.fault_point``, through the ``TI_TRAINER_FAULT`` environment variable), never at a
moment picked by timing; signals are sent after the run printed that it saved a step.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from lib_ti.bench.speed import draw_images
from lib_ti.cli import main
from lib_ti.embedding import Embedding
from lib_ti.errors import PREFIX
from lib_ti.fileio import FAULT_ENV
from lib_ti.formats.embeddings import load_embedding, save_embedding
from lib_ti.runfolder import LOCK_FILE, RunLock

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def world(tmp_path, tiny_model):
    """A dataset and a run folder in ``tmp_path``; ``world.args`` trains 4 steps of a tiny SD1 there."""
    data = draw_images(tmp_path / "data", 3, 64)
    return World(tmp_path, tiny_model("sd1"), data)


class World:
    def __init__(self, root: Path, model: Path, data: Path) -> None:
        self.root, self.model, self.data, self.run = root, model, data, root / "run"

    def args(self, *extra, steps: int = 4) -> list[str]:
        return ["train", "--model", str(self.model), "--data", str(self.data), "--name", "tok", "--output-dir",
                str(self.run), "--width", "64", "--height", "64", "--preview-every", "0", "--save-every", "2",
                "--steps", str(steps), "--learning-rate", "0.01", *map(str, extra)]

    def snapshot(self) -> dict[str, tuple[str, int]]:
        """Every file outside the run folder: content hash and mode."""
        return {str(p.relative_to(self.root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
                for p in sorted(self.root.rglob("*")) if p.is_file() and not p.is_relative_to(self.run)}


def cli(capsys, args) -> tuple[int, str, str]:
    """``python -m lib_ti ARGS`` in this process: exit code, stdout, stderr."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str, *, exit_code: int = 2) -> str:
    """The command failed with ``exit_code`` and ended on one ``[TI Trainer]`` line holding ``fragment``."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{PREFIX} ") and fragment in last, err
    return last


# ---------------------------------------------------------------------- bad input, refused before any model work
def _metadata_not_utf8(w: World) -> list[str]:
    (w.data / "metadata.jsonl").write_bytes(b'{"file_name": "00.png", "text": "caf\xe9 secret"}\n')
    return w.args()


def _caption_10mb(w: World) -> list[str]:
    (w.data / "00.txt").write_text("tag, " * 2_000_000)
    return w.args()


def _caption_not_utf8(w: World) -> list[str]:
    (w.data / "00.txt").write_bytes(b"secret \xff\xfe")
    return w.args()


def _yaml_alias_bomb(w: World) -> list[str]:
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (w.root / "bomb.yaml").write_text(f"preview_prompt: [{', '.join(levels)}]\n")  # 9**10 strings if expanded
    return [*w.args(), "--config", w.root / "bomb.yaml"]


def _nested_list(w: World) -> list[str]:
    (w.root / "nested.yaml").write_text("train_encoders: [[clip_l]]\n")
    return [*w.args(), "--config", w.root / "nested.yaml"]


def _yaml_syntax_error(w: World) -> list[str]:
    (w.root / "broken.yaml").write_text("steps: 4\nsecret: [unclosed\n")
    return [*w.args(), "--config", w.root / "broken.yaml"]


def _template_without_name(w: World) -> list[str]:
    (w.root / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return [*w.args(), "--template", w.root / "passwd"]


def _output_is_a_file(w: World) -> list[str]:
    w.run.write_text("not a folder")
    return w.args()


def _output_below_a_file(w: World) -> list[str]:
    (w.root / "afile").write_text("x")
    w.run = w.root / "afile" / "run"
    return w.args()


def _nan_init_from(w: World) -> list[str]:
    vectors = {"clip_l": torch.full((1, 32), float("nan"))}
    torch.save({"emb_params": vectors["clip_l"]}, w.root / "nan.pt")
    return [*w.args(), "--init-from", w.root / "nan.pt"]


BEFORE_MODEL = [
    # (case id, extra args or a setup function, fragment of the one-line error)
    ("device-banana", ["--device", "banana"], "device 'banana' is not a device name"),
    ("device-cuda7", ["--device", "cuda:7"], "device 'cuda:7'"),
    ("output-is-a-file", _output_is_a_file, "it is a file; give a folder"),
    ("output-below-a-file", _output_below_a_file, "is a file, so no folder can be made inside it"),
    ("metadata-not-utf8", _metadata_not_utf8, "line 1 is not UTF-8 text"),
    ("caption-10mb", _caption_10mb, "a caption is one prompt, at most 10000 characters"),
    ("caption-not-utf8", _caption_not_utf8, "is not UTF-8 text (at byte 7)"),
    ("seed-overflow", ["--seed", str(2**64)], f"config seed={2**64} is invalid"),
    ("nested-list", _nested_list, "config train_encoders=[['clip_l']] is invalid: give a list of str"),
    ("width-100000", ["--width", "100000"], "config width=100000 is invalid"),
    ("repeats-1e9", ["--repeats", "1000000000"], "config repeats=1000000000 is invalid"),
    ("batch-1e9", ["--batch-size", "1000000000"], "config batch_size=1000000000 is invalid"),
    ("yaml-alias-bomb", _yaml_alias_bomb, "config preview_prompt=[['x', 'x', 'x', 'x', ...], [[...]"),
    ("yaml-syntax", _yaml_syntax_error, "is not valid YAML (line 3, column 1)"),
    ("lr-empty-pieces", ["--learning-rate", "0.05:10,,"], "has an empty piece (piece 2)"),
    ("name-newline", ["--name", "tok\n"], "config name='tok\\n' is invalid"),
    ("name-con", ["--name", "con"], "Windows reserves it"),
    ("name-nul-ext", ["--name", "NUL.txt"], "Windows reserves it"),
    ("name-lpt1", ["--name", "Lpt1"], "Windows reserves it"),
    ("template-first-line", _template_without_name, "no line contains [name]"),
    ("init-from-nan", _nan_init_from, "holds non-finite values (NaN or infinity) in clip_l"),
]


@pytest.mark.parametrize(("case", "setup", "fragment"), BEFORE_MODEL, ids=[c[0] for c in BEFORE_MODEL])
def test_bad_input_is_one_line_before_the_model_loads(world, capsys, case, setup, fragment):
    args = setup(world) if callable(setup) else [*world.args(), *setup]
    before, run_existed = world.snapshot(), world.run.exists()
    code, _, err = cli(capsys, args)
    last = assert_one_line_error(code, err, fragment)
    assert "loading" not in err  # refused before the model was touched
    assert world.snapshot() == before and world.run.exists() == run_existed  # nothing written anywhere
    assert len(last) < 600 and "secret" not in last and "root:x" not in last  # bounded, never quoting a file


def test_metadata_that_is_not_utf8_is_one_line_in_prepare_and_check(world, capsys):
    _metadata_not_utf8(world)
    before = world.snapshot()
    code, _, err = cli(capsys, ["prepare", "--src", world.data, "--dst", world.root / "out"])
    assert_one_line_error(code, err, "line 1 is not UTF-8 text")
    code, out, _ = cli(capsys, ["check", "--data", world.data, "--name", "tok", "--width", "64", "--height", "64"])
    assert code == 1 and "problem: " in out and "line 1 is not UTF-8 text" in out and "secret" not in out
    assert world.snapshot() == before and not (world.root / "out").exists()


def test_an_image_header_of_30000x30000_is_refused_by_inspect(tmp_path, capsys):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"  # a valid PNG header declaring 30000x30000 RGB, and no pixels
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    code, _, err = cli(capsys, ["inspect", bomb])
    assert_one_line_error(code, err, "far larger than an embedding image", exit_code=1)


def test_train_help_has_no_garbled_percent():
    import argparse
    import io

    from lib_ti.cli.train import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    text = io.StringIO()
    parser._subparsers._group_actions[0].choices["train"].print_help(text)  # type: ignore[union-attr]
    line = next(line for line in text.getvalue().splitlines() if "~45% speed" in line)
    assert "%%" not in line


# ---------------------------------------------------------------------- damaged model files
def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _random_bytes(w: World, tiny_model) -> Path:
    path = w.root / "model.safetensors"
    path.write_bytes(os.urandom(4096))
    return path


def _truncated_single_file(w: World, tiny_model) -> Path:
    folder = _copy_model(tiny_model("sd1", single_file=True).parent, w.root / "single")
    path = folder / "tiny-sd1.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _truncated_unet(w: World, tiny_model) -> Path:
    folder = _copy_model(w.model, w.root / "diffusers")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


@pytest.mark.parametrize("damage", [_random_bytes, _truncated_single_file, _truncated_unet],
                         ids=["random-bytes", "truncated-single-file", "truncated-unet"])
def test_a_damaged_model_is_one_line(world, capsys, tiny_model, damage):
    world.model = damage(world, tiny_model)
    before = world.snapshot()
    code, _, err = cli(capsys, world.args())
    assert_one_line_error(code, err, "could not be loaded")
    assert world.snapshot() == before and not world.run.exists()


# ---------------------------------------------------------------------- nothing replaced unasked
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_an_embedding_of_the_runs_name_is_never_replaced_without_overwrite(world, capsys, suffix):
    world.run.mkdir()  # e.g. the output folder is an embeddings folder
    existing = save_embedding(Embedding("tok", {"clip_l": torch.ones(1, 32)}), world.run / f"tok{suffix}")
    before = existing.read_bytes()
    code, _, err = cli(capsys, world.args())
    assert_one_line_error(code, err, f"an embedding named 'tok' already exists ('{existing}')")
    assert existing.read_bytes() == before and sorted(p.name for p in world.run.iterdir()) == [existing.name]
    code, _, err = cli(capsys, [*world.args(), "--overwrite"])
    assert code == 0, err
    assert load_embedding(world.run / "tok.safetensors").step == 4


def test_training_an_embedding_in_place_continues_it(world, capsys):
    world.run.mkdir()
    existing = save_embedding(Embedding("tok", {"clip_l": torch.ones(1, 32) * 0.1}), world.run / "tok.safetensors")
    code, _, err = cli(capsys, [*world.args(), "--init-from", existing])
    assert code == 0, err
    assert load_embedding(existing).step == 4


# ---------------------------------------------------------------------- divergence
def test_a_diverging_run_saves_nothing_bad_and_resume_starts_at_the_last_good_checkpoint(world, capsys):
    good = [*world.args(steps=15)]
    code, _, err = cli(capsys, [*good, "--learning-rate", "0.05:4, 1e30"])
    last = assert_one_line_error(code, err, "training diverged: after step 5")
    assert f"the last good checkpoint is step 4 ('{world.run / 'checkpoints' / 'tok-4.safetensors'}')" in last
    assert "saved step 6" not in err and not (world.run / "tok.safetensors").exists()
    saved = sorted(p.name for p in (world.run / "checkpoints").iterdir())
    assert saved == ["tok-2.safetensors", "tok-2.state.pt", "tok-4.safetensors", "tok-4.state.pt"]
    for name in saved[::2]:
        vectors = load_embedding(world.run / "checkpoints" / name).vectors["clip_l"]
        assert torch.isfinite(vectors).all() and vectors.norm(dim=1).max() < 10
    code, _, err = cli(capsys, [*good, "--learning-rate", "0.05", "--resume"])
    assert code == 0 and "resumed with learning_rate: '0.05:4, 1e30' -> '0.05'" in err, err
    assert load_embedding(world.run / "tok.safetensors").step == 15


def test_fifteen_steps_at_learning_rate_1e30_end_with_the_reason_and_save_nothing(world, capsys):
    code, _, err = cli(capsys, [*world.args(steps=15), "--learning-rate", "1e30", "--save-every", "0"])
    assert_one_line_error(code, err, "No checkpoint was saved before: start again with a lower learning rate")
    assert not (world.run / "tok.safetensors").exists() and not (world.run / "checkpoints").exists()


# ---------------------------------------------------------------------- one run per folder
def test_a_run_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(world, capsys):
    with RunLock(world.run):  # another run holds the folder
        before = world.snapshot()
        code, _, err = cli(capsys, [*world.args(), "--overwrite"])
        assert_one_line_error(code, err, f"run folder '{world.run}' is in use by another run (pid {os.getpid()}")
        assert world.snapshot() == before and sorted(p.name for p in world.run.iterdir()) == [LOCK_FILE]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a run that crashed: its pid is gone
    (world.run / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"}))
    code, _, err = cli(capsys, world.args())
    assert code == 0 and "removing the stale lock" in err, err
    assert not (world.run / LOCK_FILE).exists()  # released at the end


# ---------------------------------------------------------------------- a planted state file
def test_an_unreadable_state_file_offers_the_previous_checkpoint(world, capsys):
    assert cli(capsys, world.args())[0] == 0
    planted = world.run / "checkpoints" / "tok-4.state.pt"
    planted.write_bytes(pickle.dumps(os.system))  # a pickle that would run code if loaded unrestricted
    code, _, err = cli(capsys, [*world.args(steps=6), "--resume"])
    last = assert_one_line_error(code, err, "cannot be read: it is damaged or was not written by this trainer")
    assert "weights_only" not in err and "previous checkpoint (step 2)" in last and "move tok-4.*" in last


# ---------------------------------------------------------------------- identical runs, identical files
def test_identical_runs_write_byte_identical_files_that_follow_the_umask(world, capsys, tmp_path):
    old = os.umask(0o022)
    try:
        for copy in ("a", "b"):  # the same run twice, in the same folder
            assert cli(capsys, [*world.args(), "--save-format", "safetensors"])[0] == 0
            assert cli(capsys, [*world.args(), "--name", "pt", "--save-format", "pt"])[0] == 0
            world.run.rename(tmp_path / copy)
    finally:
        os.umask(old)
    files = ["tok.safetensors", "checkpoints/tok-2.safetensors", "checkpoints/tok-2.state.pt", "pt.pt",
             "checkpoints/pt-2.pt", "checkpoints/pt-2.state.pt"]
    for name in files:
        a, b = tmp_path / "a" / name, tmp_path / "b" / name
        assert a.read_bytes() == b.read_bytes(), name  # the webui's TI hash of the same embedding is the same
        assert a.stat().st_mode & 0o777 == 0o644, name  # readable by a webui running as another user


# ---------------------------------------------------------------------- crashes at chosen points (subprocesses)
def run_cli(args, *, env=None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib_ti", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          preexec_fn=preexec_fn)


def every_file_loads(run: Path) -> None:
    from lib_ti.checkpoints import load_state

    for path in run.rglob("*"):
        if path.suffix in (".safetensors", ".pt") and not path.name.endswith(".state.pt"):
            load_embedding(path)
        elif path.name.endswith(".state.pt"):
            load_state(path)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """The final vectors of a run nothing interrupts (8 steps, checkpoints every 2, 2 kept)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    w = World(root, tiny_model("sd1"), draw_images(root / "data", 3, 64))
    proc = run_cli([*w.args(steps=8), "--keep-last", "2"])
    assert proc.returncode == 0, proc.stderr
    return load_embedding(w.run / "tok.safetensors").vectors["clip_l"]


KILL_POINTS = [
    ("write tok-4.state.pt", ["tok-2.safetensors", "tok-2.state.pt", "tok-4.safetensors"], 2),
    ("checkpoint tok-4", ["tok-2.safetensors", "tok-2.state.pt", "tok-4.safetensors"], 2),
    ("prune tok-2", ["tok-2.safetensors", "tok-4.safetensors", "tok-4.state.pt", "tok-6.safetensors",
                     "tok-6.state.pt"], 6),
    ("write tok.safetensors", ["tok-6.safetensors", "tok-6.state.pt", "tok-8.safetensors", "tok-8.state.pt"], 8),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "left", "resumed_from"), KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_a_crash_at_any_point_leaves_whole_files_and_resume_repeats_the_run_exactly(
        world, uninterrupted, point, left, resumed_from):
    args = [*world.args(steps=8), "--keep-last", "2"]
    proc = run_cli(args, env={FAULT_ENV: point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in (world.run / "checkpoints").iterdir() if not p.name.startswith(".")) == left
    every_file_loads(world.run)  # nothing half-written: at most a temp file beside its target
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    saves = [int(line.split("saved step ")[1].split(":")[0]) for line in resumed.stderr.splitlines()
             if "saved step " in line]
    assert saves[0] == min(resumed_from + 2, 8)  # continued after the last complete checkpoint
    assert torch.equal(load_embedding(world.run / "tok.safetensors").vectors["clip_l"], uninterrupted)
    names = sorted(p.name for p in world.run.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".tmp")] and LOCK_FILE not in names
    assert sorted(p.name for p in (world.run / "checkpoints").iterdir()) == [  # orphans swept, keep_last kept
        "tok-6.safetensors", "tok-6.state.pt", "tok-8.safetensors", "tok-8.state.pt"]


# ---------------------------------------------------------------------- signals, and a second run meanwhile
def start_run(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lib_ti", *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(proc: subprocess.Popen, marker: str) -> str:
    """Read the run's stderr until ``marker`` appears (the run printed it; no sleeping)."""
    seen = ""
    while marker not in seen:
        char = proc.stderr.read(1)  # type: ignore[union-attr]
        assert char, f"the run ended before {marker!r}: {seen}"
        seen += char
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_exits_128_plus_it(world, signum):
    proc = start_run([*world.args(steps=100000), "--save-every", "1", "--keep-last", "2"])
    wait_for(proc, "saved step 3:")
    if signum == signal.SIGTERM:  # meanwhile a second run on the same folder is refused, its files untouched
        second = run_cli([*world.args(), "--overwrite"])
        assert second.returncode == 2 and "is in use by another run" in second.stderr.strip().splitlines()[-1]
        assert "Traceback" not in second.stderr
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "stopped by request at step" in out and "Traceback" not in err
    final = load_embedding(world.run / "tok.safetensors")
    assert 3 <= final.step < 100000 and (world.run / "checkpoints" / f"tok-{final.step}.state.pt").is_file()
    assert not (world.run / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_naming_the_file(world):
    def limit_file_size() -> None:  # every file above 3000 bytes fails to write (EFBIG), as on a full quota
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))

    before = world.snapshot()
    proc = run_cli(world.args(), preexec_fn=limit_file_size)
    state = world.run / "checkpoints" / "tok-2.state.pt"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"{PREFIX} could not write {str(state)!r}: the file would exceed "
                                                    "this process's file-size limit (ulimit -f); raise the limit")
    assert "Traceback" not in proc.stderr and world.snapshot() == before
    assert not state.exists() and not list(world.run.rglob("*.tmp"))


def test_the_sweep_removes_only_what_interrupted_runs_of_this_name_left(tmp_path):
    from lib_ti.runfolder import sweep

    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = [run / ".tok.safetensors.abcd1234.tmp", run / ".config.yaml.x_y_z_12.tmp",
             checkpoints / ".tok-4.state.pt.k2j3h4g5.tmp", checkpoints / "tok-6.safetensors",  # an orphan
             checkpoints / ".tmpAb3dE9"]  # safetensors' own temp file, as earlier versions of this trainer left
    (checkpoints / ".tmpAb3dE9").write_bytes(struct.pack("<Q", 2) + b"{}")
    kept = [run / ".other.safetensors.abcd1234.tmp", run / "notes.txt", run / ".tmpNotOurs", checkpoints / "tok-4.pt",
            checkpoints / "tok-4.state.pt", checkpoints / "other-6.safetensors"]
    (run / ".tmpNotOurs").write_text("someone else's")
    for path in stale + kept:
        if not path.exists():
            path.write_bytes(b"")
    assert sorted(sweep(run, "tok")) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_check_reports_an_output_folder_below_a_file(world, capsys):
    (world.root / "afile").write_text("x")
    code, out, _ = cli(capsys, ["check", "--data", world.data, "--name", "tok", "--width", "64", "--height", "64",
                                "--output-dir", world.root / "afile" / "run"])
    assert code == 1 and "problem: config output_dir=" in out and "is a file, so no folder can be made" in out
