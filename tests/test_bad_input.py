"""Bad input, a different run to resume, interrupts: a clear one-line error (or the stated safe
behaviour), the model folder and the calibration data untouched, nothing half-written at the output.

The cases are the rows of the table in docs/troubleshooting.md: `test_the_docs_list_every_case`
holds the two to the same ids and messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file
from sharded_helpers import ENV, REPO

from gptq_fsdp.cli import main
from gptq_fsdp.io.output import OutputLock

DOCS = REPO / "docs" / "troubleshooting.md"


@dataclass
class Scene:
    """A model folder and calibration text of the test's own (so that their hashes mean something),
    the output path, and the command's arguments."""

    root: Path
    model: Path
    data: Path
    out: Path

    def args(self, *extra: str, model: Path | None = None, dataset: Path | None = None, output=None) -> list[str]:
        return [
            "quantize", str(model or self.model), "--dataset", str(dataset or self.data),
            "--output", str(self.out if output is None else output),
            "--num-samples", "4", "--max-seq-length", "32", "--batch-size", "2", "--group-size", "32", *extra,
        ]  # fmt: skip

    def weights(self) -> Path:
        return self.model / "model.safetensors"

    def edit_weights(self, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
        tensors = load_file(self.weights())
        change(tensors)
        save_file(tensors, self.weights(), metadata={"format": "pt"})

    def interrupted_run(self, *extra: str) -> Path:
        """A run stopped at layer 1 by a NaN (layer 0's state kept for --resume); its state folder."""
        os.environ["GPTQ_FSDP_FAULT"] = "nan:layer=1"
        try:
            assert run(self.args(*extra)) == 1
        finally:
            del os.environ["GPTQ_FSDP_FAULT"]
        state = Path(f"{self.out}.gptq_state")
        assert sorted(p.name for p in state.iterdir()) == ["rank00000-layer00000.pt", "run.json"]
        return state


def run(argv: list[str]) -> int:
    """main() in this process: its exit code (what it prints, the test's capsys and caplog hold)."""
    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        digest.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def scene(tmp_path, tiny_llama_dir, austen) -> Scene:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    data = tmp_path / "calib.txt"
    data.write_text((austen / "emma.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return Scene(tmp_path, model, data, tmp_path / "out")


# ----------------------------------------------------------------------------------------------- cases
# id -> (prepare(scene) -> argv, exit code, message on stderr, what stands at the output afterwards:
# None = nothing, "checkpoint" = a finished checkpoint).


def _other_model(s: Scene) -> Path:
    return make_tiny_model("llama", s.root / "other", s.model, seed=1)


def _nan_in(name: str) -> Callable[[Scene], list[str]]:
    def prepare(s: Scene) -> list[str]:
        s.edit_weights(lambda t: t[name].view(-1).__setitem__(0, float("nan")))
        return s.args()

    return prepare


def _data(content: bytes | str, suffix: str = ".txt") -> Callable[[Scene], list[str]]:
    def prepare(s: Scene) -> list[str]:
        path = s.root / f"data{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        s.data = path
        return s.args()

    return prepare


def _truncated_weights(s: Scene) -> list[str]:
    size = s.weights().stat().st_size
    with open(s.weights(), "r+b") as f:
        f.truncate(size // 2)
    return s.args()


def _garbled_header(s: Scene) -> list[str]:
    with open(s.weights(), "r+b") as f:
        f.write(b"\xff" * 8)
    return s.args()


_locks: list[OutputLock] = []  # taken by a case's preparation, released once the case has run


def _locked(s: Scene) -> list[str]:
    """Another run holds the output's lock (released once the case has run)."""
    lock = OutputLock(s.out)
    lock.acquire()
    _locks.append(lock)
    return s.args()


def _corrupt_state(s: Scene) -> list[str]:
    state = s.interrupted_run() / "rank00000-layer00000.pt"
    state.write_bytes(state.read_bytes()[:100])
    return s.args("--resume")


def _leftovers(s: Scene) -> list[str]:
    """An interrupted --overwrite save left the old checkpoint aside and a half-written new one."""
    old = s.root / ".out.old-12345"
    old.mkdir()
    (old / "config.json").write_text("{}")
    tmp = s.root / ".out.tmp-abcd"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    return s.args()


def _output_dot(s: Scene) -> list[str]:
    s.out = s.root / "empty"
    s.out.mkdir()
    os.chdir(s.out)
    return s.args(output=".")


CASES: dict[str, tuple[Callable[[Scene], list[str]], int, str, str | None]] = {
    # the input is never touched
    "output-is-the-model": (lambda s: s.args("--overwrite", output=s.model), 2, "is the model folder", None),
    "output-holds-the-model": (lambda s: s.args("--overwrite", output=s.root), 2, "holds the model folder", None),
    "output-inside-the-model": (lambda s: s.args(output=s.model / "q"), 2, "lies inside the model folder", None),
    "output-is-the-data": (lambda s: s.args("--overwrite", output=s.data), 2, "is the calibration data", None),
    # resume refuses another run's state
    "resume-other-weights": (lambda s: (s.interrupted_run(), s.args("--resume", model=_other_model(s)))[1], 2,
                             "differs in model weights", None),
    "resume-other-dtype": (lambda s: (s.interrupted_run(), s.args("--resume", "--dtype", "bfloat16"))[1], 2,
                           "torch.float32) -> ", None),
    "resume-other-scheme": (lambda s: (s.interrupted_run(), s.args("--resume", "--group-size", "16"))[1], 2,
                            "differs in quantization scheme", None),
    "resume-corrupt-state": (_corrupt_state, 2, "is unreadable", None),
    "fresh-run-replaces-old-state": (lambda s: (s.interrupted_run("--group-size", "16"), s.args())[1], 0,
                                     "holds the state of an earlier run: starting from layer 0", "checkpoint"),
    # broken model folders
    "missing-tensor": (lambda s: (s.edit_weights(lambda t: t.pop("model.layers.0.mlp.up_proj.weight")),
                                  s.args())[1], 2, "the files lack 1 tensor(s): model.layers.0.mlp.up_proj.weight",
                       None),
    "unexpected-tensor": (lambda s: (s.edit_weights(lambda t: t.update(extra=torch.zeros(3))), s.args())[1], 2,
                          "the model has no parameter for 1 tensor(s): extra", None),
    "truncated-weights": (_truncated_weights, 2, "is not a readable safetensors file", None),
    "garbled-weights-header": (_garbled_header, 2, "is not a readable safetensors file", None),
    "invalid-config-json": (lambda s: ((s.model / "config.json").write_text("{"), s.args())[1], 2,
                            "config.json cannot be read", None),
    "nan-in-embeddings": (_nan_in("model.embed_tokens.weight"), 2,
                          "NaN or inf values in 1 parameter(s): model.embed_tokens.weight", None),
    "nan-in-a-weight": (_nan_in("model.layers.0.self_attn.q_proj.weight"), 2,
                        "NaN or inf values in 1 parameter(s): model.layers.0.self_attn.q_proj.weight", None),
    # calibration data
    "empty-data": (_data(""), 2, "holds no text", None),
    "whitespace-data": (_data("  \n\n\t \n"), 2, "holds no text", None),
    "empty-text-fields": (_data('{"text": ""}\n{"text": "  "}\n', ".jsonl"), 2, "holds no text", None),
    "binary-data": (_data(bytes(range(128, 256)) * 64), 2, "not UTF-8 text", None),
    "numbers-as-text": (_data('{"text": 5}\n{"text": 7}\n', ".jsonl"), 2, "holds int values, not text", None),
    "misspelled-data-path": (lambda s: s.args(dataset=s.root / "calib.txtt"), 2, "no such file or folder", None),
    "sequence-beyond-positions": (lambda s: s.args("--max-seq-length", "4096"), 2,
                                  "--max-seq-length 4096 is longer than the 2048 positions", None),
    # numbers
    "zero-bits": (lambda s: s.args("--bits", "0"), 2, "argument --bits: must be positive", None),
    "nine-bits": (lambda s: s.args("--bits", "9"), 2, "num_bits must be in 2..8", None),
    "negative-group-size": (lambda s: s.args("--group-size", "-1"), 2, "--group-size: must be positive or 0", None),
    "infinite-dampening": (lambda s: s.args("--dampening", "inf"), 2, "--dampening: must be positive or 0 and finite",
                           None),
    "absurd-dampening": (lambda s: s.args("--dampening", "5"), 2, "it must be in [0, 1]", None),
    "infinite-timeout": (lambda s: s.args("--timeout", "inf"), 2, "--timeout: must be positive and finite", None),
    # the output location
    "output-dot-in-an-empty-folder": (_output_dot, 0, "saved to", "checkpoint"),
    "output-locked-by-another-run": (_locked, 2, "is writing", None),
    "unwritable-output-location": (lambda s: s.args(output="/proc/gptq-fsdp-out"), 2,
                                   "cannot write beside the output", None),
    "leftovers-of-an-interrupted-save": (_leftovers, 2, "put back the checkpoint an interrupted save had moved aside",
                                         "old checkpoint"),
}  # fmt: skip


# One case of each kind in the fast tier, every case in the full suite.
FAST = {
    "output-is-the-model",
    "missing-tensor",
    "empty-data",
    "zero-bits",
    "nan-in-a-weight",
    "output-locked-by-another-run",
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c in FAST else pytest.mark.slow) for c in CASES])
def test_case(case, scene, monkeypatch, capsys, caplog):
    monkeypatch.chdir(scene.root)
    prepare, code, message, after = CASES[case]
    argv = prepare(scene)
    capsys.readouterr(), caplog.clear()  # what preparing printed
    output = Path(argv[argv.index("--output") + 1]).absolute()
    before = tree_hash(output) if output.exists() else None
    model_hash, data_hash = tree_hash(scene.model), tree_hash(scene.data)
    try:
        got = run(argv)
    finally:
        while _locks:
            _locks.pop().release()
    printed = capsys.readouterr()
    stderr = printed.err + caplog.text
    assert got == code, stderr[-3000:]
    assert message in stderr + printed.out, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if ": error:" in line]
    assert len(errors) == (code == 2), errors  # one line says it
    assert tree_hash(scene.model) == model_hash and tree_hash(scene.data) == data_hash, "the input changed"
    if after is None:  # nothing new at the output
        assert (tree_hash(output) if output.exists() else None) == before, "something was written at the output"
    elif after == "checkpoint":
        assert "quantization_config" in json.loads((output / "config.json").read_text())
    else:  # the old checkpoint is back in place, the half-written one gone
        assert json.loads((output / "config.json").read_text()) == {}
        assert not list(scene.root.glob(".out.tmp-*")) and not list(scene.root.glob(".out.old-*"))
    assert not list(output.parent.glob(f".{output.name}.lock")), "the lock is released"


def test_the_docs_list_every_case():
    """docs/troubleshooting.md has one row per case, with the message the test expects."""
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|(.*)$", DOCS.read_text(), re.M)}
    assert set(rows) == set(CASES) | set(SIGNAL_CASES) | set(DISTRIBUTED_CASES)
    for case, (_, _, message, _) in CASES.items():
        assert message.replace("|", "\\|") in rows[case], case


# ------------------------------------------------------------------------------------- signals


SIGNAL_CASES = {
    "ctrl-c-during-a-layer": "interrupted; the finished layers are kept in",
    "sigterm-during-an-overwrite-save": "interrupted;",
}


def as_from_a_terminal() -> None:
    """SIGINT and SIGTERM as a shell gives them to a command: default, not blocked (a child inherits
    an ignored or blocked signal from its parent, and the test runner's may be either by then)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def cli_process(scene: Scene, fault: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "gptq_fsdp", *scene.args(*extra)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "GPTQ_FSDP_FAULT": fault}, preexec_fn=as_from_a_terminal)  # fmt: skip


def wait_for(condition: Callable[[], bool], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the run did not get there"
        time.sleep(0.2)


@pytest.mark.distributed
def test_ctrl_c_during_a_layer_says_where_the_state_is(scene):
    process = cli_process(scene, "hang:layer=1")
    state = Path(f"{scene.out}.gptq_state") / "rank00000-layer00000.pt"
    lines = []  # signalled once it is waiting at layer 1, not somewhere between two layers
    wait_for(lambda: lines.append(process.stdout.readline()) or "hangs at layer 1" in lines[-1])
    assert state.exists()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert SIGNAL_CASES["ctrl-c-during-a-layer"] in err and "--resume continues" in err, err[-2000:]
    assert "Traceback" not in err
    assert not scene.out.exists() and state.exists()


@pytest.mark.distributed
def test_sigterm_between_the_renames_of_an_overwrite_leaves_a_checkpoint(scene):
    """The old checkpoint has been moved aside when SIGTERM comes: the save still finishes its swap."""
    scene.out.mkdir()
    (scene.out / "config.json").write_text("{}")  # the previous checkpoint
    process = cli_process(scene, "signal:seconds=3", "--overwrite")
    lines = []
    wait_for(lambda: lines.append(process.stdout.readline()) or "between the renames" in lines[-1])
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert SIGNAL_CASES["sigterm-during-an-overwrite-save"] in err and "Traceback" not in err
    assert "quantization_config" in json.loads((scene.out / "config.json").read_text()), "the new checkpoint"
    assert not list(scene.root.glob(".out.old-*")) and not list(scene.root.glob(".out.tmp-*"))


# ------------------------------------------------------------------------------------- 2 ranks

DISTRIBUTED_CASES = {
    "resume-on-another-world-size": "differs in world size (2 -> 1)",
    "missing-tensor-on-2-ranks": "the model files lack 1 tensor(s): model.layers.0.mlp.up_proj.weight",
    "missing-tensor-on-2-ranks-rank0-load": "the files lack 1 tensor(s): model.layers.0.mlp.up_proj.weight",
    "output-is-the-model-on-2-ranks": "is the model folder",
    "fewer-batches-than-ranks": "4 samples in batches of 4 make 1 forward calls, fewer than the 2 ranks",
}


def torchrun_cli(argv: list[str], fault: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptq_fsdp"]
    return subprocess.run([*command, *argv], capture_output=True, text=True, env={**ENV, "GPTQ_FSDP_FAULT": fault},
                          timeout=300)  # fmt: skip


@pytest.mark.distributed
def test_two_rank_cases(scene, capsys):
    model_hash = tree_hash(scene.model)
    interrupted = torchrun_cli(scene.args(), fault="nan:layer=1")
    assert interrupted.returncode != 0
    state = Path(f"{scene.out}.gptq_state")
    assert sorted(p.name for p in state.iterdir()) == ["rank00000-layer00000.pt", "rank00001-layer00000.pt", "run.json"]
    assert run(scene.args("--resume")) == 2
    err = capsys.readouterr().err
    assert DISTRIBUTED_CASES["resume-on-another-world-size"] in err, err[-2000:]

    done = torchrun_cli([*scene.args("--overwrite"), "--batch-size", "4"])
    assert done.returncode != 0 and done.stderr.count(DISTRIBUTED_CASES["fewer-batches-than-ranks"]) == 1
    assert state.exists(), "refused before anything was replaced"

    done = torchrun_cli(scene.args("--overwrite", output=scene.model))
    assert done.returncode != 0 and done.stderr.count(DISTRIBUTED_CASES["output-is-the-model-on-2-ranks"]) == 1
    assert tree_hash(scene.model) == model_hash

    scene.edit_weights(lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    for load, case in (("sharded", "missing-tensor-on-2-ranks"), ("rank0", "missing-tensor-on-2-ranks-rank0-load")):
        done = torchrun_cli(scene.args("--load", load, "--overwrite"))
        assert done.returncode != 0 and DISTRIBUTED_CASES[case] in done.stderr, done.stderr[-3000:]
    assert not scene.out.exists() or not any(scene.out.iterdir())
