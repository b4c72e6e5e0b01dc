"""The myext command: run as a user runs it (``python -m myext``, the ``myext`` console script)
in a subprocess where that is the point, and through ``myext.cli.main`` for the rest."""

import dataclasses
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import myext
from myext import cli
from article import SimpleNet  # the article's class, verbatim

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = [b for b in myext.available_backends("cpu") if b != "triton"]


def run(*args, command=None, timeout=300):
    """Runs the command in a subprocess from the repository root; returns the CompletedProcess."""
    command = command or [sys.executable, "-m", "myext"]
    # conftest switches the Triton interpreter on for this process; the CLI runs keep to
    # the fast CPU backends (cpp, torch), as a user without that variable gets.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # The models are tiny: one thread keeps OpenMP from spin-waiting on a busy test machine.
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*command, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def console_script(tmp_path):
    """The installed ``myext`` script; where the package was installed before the script was
    declared, the launcher pip writes for pyproject.toml's [project.scripts] entry."""
    installed = shutil.which("myext", path=os.path.dirname(sys.executable))
    if installed:
        return [installed]
    tomllib = pytest.importorskip("tomllib")
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["myext"]
    module, function = entry.split(":")
    script = tmp_path / "myext"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    script.chmod(0o755)
    return [str(script)]


def test_help_lists_the_subcommands():
    help_text = cli.build_parser().format_help()
    assert "check" in help_text and "train" in help_text


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"myext {myext.__version__}")


# ------------------------------------------------------------------ myext check

def test_check_passes_from_the_console_script(tmp_path):
    result = run("check", command=console_script(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("op "))
    assert header.split()[:4] == ["op", "backend", "device", "dtype"] and "max error" in header
    assert not [line for line in lines if " triton " in line]
    assert lines[1].startswith(f"cpu: {myext.machine.cpu_model()}, ")
    assert f"kernels {myext._cpu.CAPABILITY}" in lines[1] and "GEMMs: " in lines[1]
    for backend in CPU_BACKENDS:
        for op in myext.registry.names():
            rows = [line.split() for line in lines if line.split()[:3] == [op, backend, "cpu"]]
            assert {row[3] for row in rows} == {"float64", "float32", "bfloat16"}
            assert all("ok" in row and "FAIL" not in row for row in rows)
    assert "checks passed" in lines[-1]


def test_check_fails_with_exit_code_1(monkeypatch, capsys):
    """An op whose kernels disagree with its reference (here: a reference off by 1e-3) fails."""
    spec = myext.registry.get("linear_relu")
    off = dataclasses.replace(spec, reference=lambda *args: spec.reference(*args) + 1e-3)
    monkeypatch.setitem(myext.registry._SPECS, "linear_relu", off)
    assert cli.main(["check", "--backend", "cpp"]) == 1
    out = capsys.readouterr().out
    failures = [line for line in out.splitlines() if "FAIL" in line]
    assert failures and all("linear_relu" in line for line in failures) and "checks failed" in out


def test_check_unknown_backend_is_a_usage_error(capsys):
    assert cli.main(["check", "--backend", "fortran"]) == 2
    assert "not available" in capsys.readouterr().err


# ------------------------------------------------------------------ myext train

def test_train_defaults(tmp_path):
    """`myext train` with its defaults: at least 95% on the digits, within 0.5 points of plain
    PyTorch from the same seed; and the metrics file, the saved model and the progress bar."""
    metrics, saved = tmp_path / "metrics.json", tmp_path / "model.pt"
    result = run("train", "--metrics-json", metrics, "--save", saved)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "s/epoch" in result.stdout
    assert "myext epoch 10/10" in result.stderr and "torch epoch 10/10" in result.stderr
    data = json.loads(metrics.read_text())
    assert data["myext"]["test_accuracy"] >= 0.95
    assert abs(data["myext"]["test_accuracy"] - data["torch"]["test_accuracy"]) <= 0.005
    assert data["myext"]["seconds_per_epoch"] > 0 and data["torch"]["seconds_per_epoch"] > 0
    assert (data["config"]["model"], data["config"]["epochs"]) == ("simplenet", 10)
    article = SimpleNet()
    article.load_state_dict(torch.load(saved))  # the saved model loads into the article's class


def test_train_multitask(tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    assert cli.main(["train", "--model", "multitask", "--epochs", "1", "--limit", "200", "--backend", "torch",
                     "--seed", "3", "--device", "cpu", "--metrics-json", str(metrics)]) == 0
    assert "MultiTaskNet on digits" in capsys.readouterr().out
    data = json.loads(metrics.read_text())
    for key in ("myext", "torch"):
        heads = data[key]["head_accuracy"]
        assert len(heads) == 2 and 0.0 <= data[key]["test_accuracy"] <= min(heads)
    assert data["config"]["backend"] == "torch" and data["config"]["seed"] == 3
    assert data["config"]["train_samples"] == data["config"]["test_samples"] == 200


@pytest.mark.parametrize("model", ["simplenet", "multitask"])
def test_train_data_parallel(tmp_path, model):
    """`myext train --nproc-per-node 2` (torch's launcher, DDP over gloo) reaches the
    accuracy of one process with the same global batch and seed; its loss differs only
    by the order of the sums."""
    config = ["train", "--model", model, "--epochs", "2", "--limit", "300", "--batch-size", "50", "--device", "cpu"]
    single, parallel = tmp_path / "single.json", tmp_path / "parallel.json"
    for metrics, extra in ((single, []), (parallel, ["--nproc-per-node", "2"])):
        result = run(*config, *extra, "--metrics-json", metrics)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "data-parallel over 2 processes" in result.stdout
    one, two = json.loads(single.read_text()), json.loads(parallel.read_text())
    assert two["config"]["processes"] == 2
    for key in ("myext", "torch"):
        assert two[key]["test_accuracy"] == one[key]["test_accuracy"]
        assert two[key]["train_loss"] == pytest.approx(one[key]["train_loss"], rel=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
    (["--data", "mnist"], "needs --data-dir"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--backend", "cuda"], "cannot run on cpu"),
])
def test_train_usage_errors(capsys, args, message):
    assert cli.main(["train", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_digits_loader():
    pytest.importorskip("sklearn")
    data = cli.load_digits_dataset()
    assert data.train_images.shape[1:] == (1, 28, 28)
    assert len(data.train_labels) + len(data.test_labels) == 1797
    assert set(data.test_labels.tolist()) == set(range(10))
    assert abs(data.train_images.mean().item()) < 1e-5 and abs(data.train_images.std().item() - 1) < 1e-5


# ------------------------------------------------------------------ IDX files and --data mnist

def idx_bytes(tensor, code):
    """An IDX file: magic (0, 0, type code, ndim), big-endian int32 dims, big-endian data."""
    big_endian = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    return header + tensor.numpy().astype(big_endian).tobytes()


@pytest.mark.parametrize("dtype,code", [(torch.uint8, 0x08), (torch.int8, 0x09), (torch.int16, 0x0B),
                                        (torch.int32, 0x0C), (torch.float32, 0x0D), (torch.float64, 0x0E)],
                         ids=str)
@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
def test_read_idx(tmp_path, dtype, code, compressed):
    values = (torch.arange(-12, 12) * 37).reshape(2, 3, 4)
    if dtype.is_floating_point:
        tensor = values.to(dtype) / 3
    else:
        tensor = values.clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)
    raw = idx_bytes(tensor, code)
    path = tmp_path / "file.idx"
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    read = cli.read_idx(path)
    assert read.dtype == dtype and torch.equal(read, tensor)


def test_read_idx_rejects_bad_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        cli.read_idx(path)
    path.write_bytes(idx_bytes(torch.zeros(2, 3, dtype=torch.uint8), 0x08)[:-1])
    with pytest.raises(ValueError, match="needs 18 bytes, the file has 17"):
        cli.read_idx(path)


def write_tiny_mnist(directory, train=40, test=20, size=28):
    """The four MNIST files with random images, the images gzip-compressed and the labels not."""
    generator = torch.Generator().manual_seed(0)

    def images(count):
        return torch.randint(0, 256, (count, size, size), dtype=torch.uint8, generator=generator)

    files = {
        "train-images-idx3-ubyte.gz": images(train),
        "train-labels-idx1-ubyte": torch.arange(train, dtype=torch.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": images(test),
        "t10k-labels-idx1-ubyte": torch.arange(test, dtype=torch.uint8) % 10,
    }
    for name, tensor in files.items():
        raw = idx_bytes(tensor, 0x08)
        (directory / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)


def test_train_on_mnist_idx_files(tmp_path, capsys):
    write_tiny_mnist(tmp_path)
    metrics = tmp_path / "metrics.json"
    assert cli.main(["train", "--data", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--batch-size", "16",
                     "--device", "cpu", "--metrics-json", str(metrics)]) == 0
    assert "MNIST: 40 train / 20 test samples" in capsys.readouterr().out
    config = json.loads(metrics.read_text())["config"]
    assert (config["data"], config["train_samples"], config["test_samples"]) == ("mnist", 40, 20)


def test_mnist_loader_resizes_and_normalises(tmp_path):
    write_tiny_mnist(tmp_path, size=14)
    data = cli.load_mnist_dataset(tmp_path)
    assert data.train_images.shape == (40, 1, 28, 28) and data.test_images.shape == (20, 1, 28, 28)
    assert abs(data.train_images.mean().item()) < 1e-5 and abs(data.train_images.std().item() - 1) < 1e-5
    assert data.train_labels.dtype == torch.int64 and data.train_labels.tolist()[:11] == [*range(10), 0]


def test_train_reports_missing_mnist_files(tmp_path, capsys):
    assert cli.main(["train", "--data", "mnist", "--data-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "myext train: error: no train-images-idx3-ubyte[.gz]" in capsys.readouterr().err
