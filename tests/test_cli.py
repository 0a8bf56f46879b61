"""The ``lightning-scl`` command line.

Fit a recipe on an MNIST subset, test, export and report its checkpoint; the demo; clear errors for bad input; the
installed console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_scl.cli import build_demo_parser, build_export_parser, build_report_parser, main
from lightning_scl.data import MNISTDataModule
from lightning_scl.models import ImageClassifier

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "mnist_lenet300_scl.yaml"
CHECKPOINT = Path("scl_runs/mnist_lenet300_scl/checkpoints/last.ckpt")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST fetched once per session (``LIGHTNING_SCL_DATA`` keeps it between sessions); shared with
    test_recipes.py, which uses the same folder."""
    shared = os.environ.get("LIGHTNING_SCL_DATA")
    root = Path(shared) if shared else tmp_path_factory.getbasetemp() / "lightning_scl_data"
    MNISTDataModule(data_dir=str(root)).prepare_data()
    return root


@pytest.fixture(scope="module")
def fitted_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lightning-scl fit`` of the LeNet-300-100 recipe for 1 epoch on 1,024 MNIST images; the run's folder."""
    run_dir = tmp_path_factory.mktemp("cli_run")
    cwd = Path.cwd()
    os.chdir(run_dir)  # the recipe writes to ./scl_runs
    try:
        status = main(
            [
                "fit",
                "--config",
                str(RECIPE),
                "--trainer.max_epochs=1",
                "--trainer.accelerator=cpu",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                f"--data.data_dir={data_dir}",
                "--data.train_subset=1024",
                "--data.val_size=1000",
                "--data.batch_size=64",
                # the idiom the recipe headers document: init_args of the LAST callback (SCL)
                "--trainer.callbacks.init_args.target_density=0.5",
                "--trainer.callbacks.init_args.freeze_masks_at=null",  # 16 steps: keep every one for pruning
                "--trainer.callbacks.init_args.mask_lr=0.2",  # and move the masks fast enough to prune in 16 steps
            ]
        )
    finally:
        os.chdir(cwd)
    assert status == 0
    return run_dir


def test_fit_writes_checkpoint_and_config(fitted_run: Path) -> None:
    checkpoint = torch.load(fitted_run / CHECKPOINT, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 1024 // 64  # one epoch of the subset
    assert any(k.endswith("parametrizations.weight.0.mask") for k in checkpoint["state_dict"])
    # plain constructor arguments, linked from the data module: ImageClassifier(**hparams) rebuilds the model
    hparams = checkpoint["hyper_parameters"]
    assert not any(k.startswith("_") for k in hparams)
    assert hparams["num_classes"] == 10 and tuple(hparams["input_shape"]) == (1, 28, 28)
    ImageClassifier(**hparams)
    # the command-line override reached the SCL callback
    (config_path,) = (fitted_run / "scl_runs" / "mnist_lenet300_scl").glob("version_*/config.yaml")
    callbacks = yaml.safe_load(config_path.read_text())["trainer"]["callbacks"]
    assert callbacks[-1]["class_path"].endswith("SparseConnectivityLearning")
    assert callbacks[-1]["init_args"]["target_density"] == 0.5


def test_test_subcommand_restores_masks(fitted_run: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(fitted_run)
    status = main(
        [
            "test",
            "--config",
            str(RECIPE),
            "--ckpt_path",
            str(CHECKPOINT),
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--data.data_dir={data_dir}",
            "--trainer.limit_test_batches=4",
        ]
    )
    assert status == 0


def test_export_checkpoint(fitted_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_scl.export import load_pruned

    ckpt = fitted_run / CHECKPOINT
    assert main(["export", str(ckpt)]) == 0
    plain_path = ckpt.with_name("last.safetensors")
    assert str(plain_path) in capsys.readouterr().out
    model = ImageClassifier("lenet300")
    model.load_state_dict(load_file(plain_path), strict=True)  # the plain class, no masks

    out = fitted_run / "exports" / "lenet.scl.safetensors"
    out.parent.mkdir()
    assert main(["export", str(ckpt), "--format", "compressed", "--output", str(out)]) == 0
    restored = load_pruned(out)
    assert all(torch.equal(restored[k], v) for k, v in load_file(plain_path).items())
    assert out.stat().st_size < plain_path.stat().st_size


def test_export_never_writes_over_the_checkpoint_and_names_a_wrong_input_shape(
    fitted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run.pt"
    shutil.copy(fitted_run / CHECKPOINT, run)
    assert main(["export", str(run), "--format", "state_dict"]) == 0  # default name: run.pruned.pt, not run.pt
    assert str(tmp_path / "run.pruned.pt") in capsys.readouterr().out
    for argv in (["export", str(run), "--output", str(run)], ["export", str(run), "-f", "compressed", "-o", str(run)]):
        assert main(argv) == 2
        assert "is the checkpoint being exported" in capsys.readouterr().err
    assert main(["export", str(run), "-f", "shrunk", "--input-shape", "1,3,32,32"]) == 2  # LeNet-300-100 takes 1x28x28
    err = capsys.readouterr().err
    assert "cannot run on the example input of shape (1, 3, 32, 32)" in err and "Traceback" not in err
    kept = torch.load(run, map_location="cpu", weights_only=True)
    assert kept["optimizer_states"] and kept["global_step"] == 1024 // 64  # the training state is intact


def test_report_checkpoint(fitted_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = fitted_run / CHECKPOINT
    out_dir = fitted_run / "report"
    assert main(["report", str(ckpt), "--out-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Density" in printed and "FLOPs" in printed
    data = json.loads((out_dir / "last_sparsity.json").read_text())
    masks = {k: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items() if k.endswith(".mask")}
    kept = sum(int((m > 0).sum()) for m in masks.values())
    assert data["totals"]["connections_kept"] == kept
    assert data["totals"]["dense_flops"] > data["totals"]["effective_flops"] > 0
    assert (out_dir / "last_sparsity.csv").read_text().startswith("name,")
    assert (out_dir / "last_sparsity.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_dense_baseline_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = tmp_path / "dense.ckpt"
    model = ImageClassifier("lenet300", input_shape=(1, 28, 28))
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, dense)
    assert main(["report", str(dense), "--out-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    totals = json.loads((tmp_path / "dense_sparsity.json").read_text())["totals"]
    assert totals["density"] == 1.0 and totals["params_total"] == sum(p.numel() for p in model.parameters())
    assert totals["dense_flops"] == totals["effective_flops"] == (784 * 300 + 300 * 100 + 100 * 10)


def test_demo(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--epochs=1", "--train-subset=1024", "--target-density=0.3", "--accelerator=cpu", "--num-threads=2"]
    threads = torch.get_num_threads()
    status = main([*args, f"--data-dir={data_dir}", f"--out-dir={tmp_path}", "--no-progress-bar"])
    assert status == 0
    assert torch.get_num_threads() == threads  # the demo's --num-threads is undone afterwards
    printed = capsys.readouterr().out
    for label in ("test accuracy", "density", "compression", "FLOPs reduction", "export safetensors"):
        assert label in printed
    assert "unavailable" not in printed
    assert (tmp_path / "lenet300_scl.safetensors").is_file()
    assert (tmp_path / "lenet300_scl.scl.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("callbacks", "retained"),
    [
        ([], True),  # a dense baseline pays the same allocator cost as an SCL run
        (["--trainer.callbacks=lightning_scl.callbacks.scl.SparseConnectivityLearning"], True),
        (
            [
                "--trainer.callbacks=lightning_scl.callbacks.scl.SparseConnectivityLearning",
                "--trainer.callbacks.init_args.retain_freed_memory=false",
            ],
            False,
        ),
    ],
)
def test_fit_on_cpu_retains_freed_memory_unless_scl_opts_out(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    callbacks: list[str],
    retained: bool,
) -> None:
    from lightning_scl import cli
    from lightning_scl.callbacks import scl as scl_module

    calls: list[str] = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append("cli") or True)
    monkeypatch.setattr(scl_module, "_retain_freed_memory", lambda: calls.append("scl") or True)
    monkeypatch.chdir(tmp_path)
    argv = [
        "fit",
        "--data=lightning_scl.data.MNISTDataModule",
        f"--data.data_dir={data_dir}",
        "--data.train_subset=256",
        "--data.val_size=256",
        "--model.model=lenet300",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *callbacks,
    ]
    assert main(argv) == 0
    assert ("cli" in calls) is retained
    assert ("scl" in calls) is (retained and bool(callbacks))


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("fit", "test", "export", "report", "demo"):
        assert f"\n  {command} " in text
    for parser in (build_export_parser(), build_report_parser(), build_demo_parser()):
        assert parser.description and parser.format_help()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--trainer.callbacks" in capsys.readouterr().out


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_ckpt = tmp_path / "notes.ckpt"
    not_a_ckpt.write_text("hello")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": ImageClassifier("lenet300").state_dict(), "hyper_parameters": {}}, plain)
    cases = {
        ("export", str(tmp_path / "missing.ckpt")): "does not exist",
        ("report", str(tmp_path / "missing.ckpt")): "does not exist",
        ("export", str(tmp_path)): "is a directory",
        ("export", str(not_a_ckpt)): "not a readable checkpoint",
        ("report", str(not_a_ckpt)): "not a readable checkpoint",
        ("export", str(plain), "--model-class", "no_such_pkg.Model"): "cannot import",
        ("export", str(plain), "--model-class", "Model"): "dotted path",
        ("export", str(plain), "--input-shape", "1,a"): "--input-shape",
        ("demo", "--epochs", "0"): "--epochs must be >= 1",
        ("demo", "--target-density", "1.5"): "--target-density",
        ("demo", "--num-threads", "-1"): "--num-threads",
    }
    cases[("export", str(plain))] = "no connectivity masks"
    for argv, message in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.startswith(f"lightning-scl {argv[0]}: error:")


def test_console_script_entry_point(tmp_path: Path) -> None:
    """The installed ``lightning-scl`` script runs main() and returns its exit status (one real process)."""
    script = shutil.which("lightning-scl", path=str(Path(sys.executable).parent)) or shutil.which("lightning-scl")
    assert script, "the lightning-scl console script is not installed (pip install -e .)"
    done = subprocess.run(
        [script, "report", str(tmp_path / "missing.ckpt")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_a_fresh_fit_does_not_replace_an_earlier_runs_last_checkpoint(
    fitted_run: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The recipes write last.ckpt into a fixed folder: a quick trial run would silently replace days of training.
    monkeypatch.chdir(fitted_run)
    before = (fitted_run / CHECKPOINT).read_bytes()
    argv = ["fit", "--config", str(RECIPE), "--trainer.max_steps=1", f"--data.data_dir={data_dir}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run, and this fit would replace it" in err and "--ckpt_path" in err
    assert "Traceback" not in err
    assert (fitted_run / CHECKPOINT).read_bytes() == before


def _user_module_checkpoint(tmp_path: Path) -> Path:
    from lightning_scl import SparseConnectivityLearning
    from tests.conftest import MLP, loader, quiet_trainer

    trainer = quiet_trainer(max_steps=2, callbacks=[SparseConnectivityLearning(lam=0.5, report=False)])
    trainer.fit(MLP(), loader())
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_export_of_a_user_module_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import MLP

    ckpt = _user_module_checkpoint(tmp_path)
    # weight formats need no class: the default one does not fit, so the tensors alone are exported
    assert main(["export", str(ckpt)]) == 0
    assert "exporting its tensors alone" in capsys.readouterr().err
    assert set(load_file(tmp_path / "run.safetensors")) == set(MLP().state_dict())
    # --model-class names a module in the working directory, which a console script's sys.path lacks
    (tmp_path / "my_cli_net.py").write_text("from tests.conftest import MLP as Net\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_cli_net", raising=False)
    assert main(["export", str(ckpt), "-f", "shrunk", "--model-class", "my_cli_net.Net"]) == 0
    assert (tmp_path / "run.shrunk.pt").is_file()


def test_more_bad_input_is_one_clear_line(
    fitted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    shrunk = tmp_path / "model.shrunk.pt"
    torch.save({"format": "lightning_scl.shrunk", "state_dict": {}}, shrunk)
    recipe = ["--config", str(RECIPE), "--trainer.logger=false"]
    cases = {
        ("demo", "--accelerator", "tpu2"): "--accelerator 'tpu2'",
        ("demo", "--data-dir", str(a_file)): "is a file",
        ("test", *recipe, "--ckpt_path", str(tmp_path / "missing.ckpt")): "does not exist",
        ("test", *recipe, "--ckpt_path", str(shrunk)): "is a lightning_scl export (lightning_scl.shrunk)",
        ("fit", "--config", str(fitted_run / CHECKPOINT)): "is a model file, not a YAML recipe",
        ("export", str(shrunk)): "not a training checkpoint",
        ("report", str(fitted_run / CHECKPOINT), "--input-shape", "1,3,32,32"): "does not run on --input-shape",
        ("fit", *recipe, f"--data.data_dir={tmp_path / 'empty'}", "--data.download=false"): "--data.download=true",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.startswith(f"lightning-scl {argv[0]}: error:"), err
    assert main(["fitt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-scl: error: unknown command 'fitt'") and "export" in err


def test_a_smoke_run_is_refused_too_and_a_sharded_checkpoint_folder_is_not(
    fitted_run: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_scl.cli import _check_ckpt_path

    monkeypatch.chdir(fitted_run)
    before = (fitted_run / CHECKPOINT).read_bytes()
    # Lightning's ModelCheckpoint.on_train_end writes last.ckpt even under fast_dev_run
    argv = ["fit", "--config", str(RECIPE), "--trainer.fast_dev_run=true", f"--data.data_dir={data_dir}"]
    assert main(argv) == 2
    assert (fitted_run / CHECKPOINT).read_bytes() == before
    _check_ckpt_path(["--ckpt_path", str(tmp_path)])  # FSDP/DeepSpeed checkpoints are folders: Lightning's to load


def test_the_ckpt_path_check_maps_the_file_and_reads_the_legacy_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_scl.cli import _check_ckpt_path

    checkpoint = {"state_dict": {"w": torch.ones(4)}, "pytorch-lightning_version": "2.6.6"}
    zipped, legacy = tmp_path / "zipped.ckpt", tmp_path / "legacy.ckpt"
    torch.save(checkpoint, zipped)
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    calls: list[dict] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    # Lightning loads the checkpoint right after: the check maps it, so its tensors are not in memory twice
    _check_ckpt_path(["--ckpt_path", str(zipped)])
    assert calls[-1]["mmap"] is True
    _check_ckpt_path(["--ckpt_path", str(legacy)])  # torch cannot map the legacy format: read, and accepted
    assert calls[-1]["mmap"] is False


def test_model_class_import_appends_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_scl.cli import _import_object

    (tmp_path / "my_cli_net2.py").write_text("class Net:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_cli_net2", raising=False)
    assert _import_object("my_cli_net2.Net", "--model-class").__name__ == "Net"
    assert sys.path[-1] == str(tmp_path)  # last: a file here never shadows an installed package the command imports
    path_before = list(sys.path)
    _import_object("lightning_scl.models.ImageClassifier", "--model-class", user_given=False)
    assert sys.path == path_before
