"""The launch config decides device, mixed precision and engine; sharded engines' configs resolve; saves gather."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from imagebert_hf.training import build_accelerator
from imagebert_hf.training.checkpointing import save_model

from .testing_utils import PROJECT_ROOT


CONFIGS = PROJECT_ROOT / "examples" / "configs"
TINY_RECIPE = CONFIGS / "pretrain_tiny_synthetic.yaml"


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_model():
    from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining

    config = ImageBERTConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        region_feature_size=8, num_object_classes=5, max_regions=4, max_text_length=8,
    )  # fmt: skip
    return ImageBERTForPreTraining(config)


def test_the_environment_of_accelerate_launch_decides_unless_a_flag_overrides(
    tmp_path, monkeypatch, fresh_accelerate_state
):
    # What `accelerate launch --mixed_precision bf16` (or a launch config saying bf16) sets for the script.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert build_accelerator(tmp_path, report_to="none").mixed_precision == "bf16"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert build_accelerator(tmp_path, mixed_precision="no", report_to="none").mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision must be"):
        build_accelerator(tmp_path, mixed_precision="fp32")


def test_a_launch_config_reaches_the_forward_of_two_gloo_processes(tmp_path):
    launch_config = yaml.safe_load((CONFIGS / "accelerate_2cpu.yaml").read_text())
    launch_config["mixed_precision"] = "bf16"
    config_file = tmp_path / "launch.yaml"
    config_file.write_text(yaml.safe_dump(launch_config))
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        str(PROJECT_ROOT / "tests" / "launch_probe.py"), "--config", str(TINY_RECIPE), "--output_dir", str(output_dir),
        "--report_to", "none", "--per_device_train_batch_size", "4", "--checkpointing_steps", "2",
        "--set", "stages=[{name: one, max_steps: 3, sources: [{name: s, type: synthetic, num_images: 16, regions: annotations}]}]",
    ]  # fmt: skip
    from .test_pretraining import script_env

    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes, MULTI_CPU on cpu, mixed precision bf16" in result.stdout
    probes = [json.loads((output_dir / f"probe-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, probe in enumerate(probes):
        assert (probe["rank"], probe["world_size"], probe["backend"]) == (rank, 2, "gloo")
        assert probe["forward"], "the model never ran"
        # Every training forward ran under bf16 autocast, on the CPU, as the launch config said.
        assert all(entry == [True, "torch.bfloat16", "cpu"] for entry in probe["forward"]), probe["forward"]
    stage = output_dir / "stage1-one"
    assert (stage / "checkpoints" / "step_00000002").is_dir()
    from imagebert_hf import ImageBERTForPreTraining

    model = ImageBERTForPreTraining.from_pretrained(stage / "final")
    assert model.dtype == torch.float32  # autocast computes in bf16; the weights stay fp32


def _launch_env(config_file: Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file FILE` would set for the script (no process is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--main_process_port", "0", "x.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_the_fsdp_launch_config_wraps_our_transformer_layers(monkeypatch):
    env = _launch_env(CONFIGS / "accelerate_fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_VERSION"] == "2" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(tiny_model())  # raises when the layer class named in the config is not in the model
    from imagebert_hf.models.imagebert.modeling_imagebert import ImageBERTLayer

    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {ImageBERTLayer}


@pytest.mark.parametrize("stage", [2, 3])
def test_the_deepspeed_launch_configs_name_their_zero_settings(stage):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"accelerate_deepspeed_zero{stage}.yaml"))
    assert config.distributed_type.value == "DEEPSPEED" and config.mixed_precision == "bf16"
    ds_file = PROJECT_ROOT / config.deepspeed_config["deepspeed_config_file"]
    ds_config = json.loads(ds_file.read_text())
    assert ds_config["zero_optimization"]["stage"] == stage
    # accelerate fills these from the run, so a stage's batch size and accumulation are the recipe's.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds_config[key] == "auto", key


class DeepSpeedStub:
    """What accelerate's DeepSpeed prepare reads of `deepspeed`, which needs CUDA to install: its `initialize`, the
    last call, stops here, so the code run up to it is accelerate's own."""

    class Initialized(RuntimeError):
        pass

    @classmethod
    def install(cls, monkeypatch):
        import importlib.machinery
        import types

        stub = types.ModuleType("deepspeed")
        stub.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
        stub.runtime = types.SimpleNamespace(lr_schedules=types.SimpleNamespace(VALID_LR_SCHEDULES=[]))

        def initialize(**kwargs):
            raise cls.Initialized(kwargs["config_params"])

        stub.initialize = initialize
        monkeypatch.setitem(sys.modules, "deepspeed", stub)
        import accelerate.accelerator
        from accelerate.utils.deepspeed import DummyOptim, DummyScheduler

        # Imported by accelerate only where deepspeed was importable when it loaded.
        for name, value in (("DummyOptim", DummyOptim), ("DummyScheduler", DummyScheduler)):
            monkeypatch.setattr(accelerate.accelerator, name, value, raising=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_each_stage_tells_deepspeed_its_own_batch_and_accumulation(stage, monkeypatch):
    """The stage runner prepares its dataloader first (for the scheduler's length) and its model, optimizer and
    scheduler in a second call, which holds no dataloader to fill the shipped config's "auto" micro-batch from; and
    accelerate fills the "auto" values once. Each stage writes its own before the second call: accelerate's DeepSpeed
    prepare then goes through to `deepspeed.initialize` with the stage's values, stage after stage."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.commands.config.config_args import load_config_from_file

    from imagebert_hf.training.runner import Schedule, fit_deepspeed_to_stage

    DeepSpeedStub.install(monkeypatch)
    from accelerate.utils import DeepSpeedPlugin

    launch = load_config_from_file(str(CONFIGS / f"accelerate_deepspeed_zero{stage}.yaml"))
    ds_file = PROJECT_ROOT / launch.deepspeed_config["deepspeed_config_file"]
    plugin = DeepSpeedPlugin(hf_ds_config=json.loads(ds_file.read_text()))
    plugin.set_mixed_precision(launch.mixed_precision)  # as accelerate's state does when the launch starts
    for micro, accumulation in ((12, 1), (4, 3)):
        accelerator = SimpleNamespace(
            state=SimpleNamespace(deepspeed_plugin=plugin),
            deepspeed_plugin=plugin,
            parallelism_config=None,
            gradient_accumulation_steps=accumulation,
            num_processes=8,
            split_batches=False,
            _prepare_one=lambda obj, first_pass=False, device_placement=None: obj,
            _get_named_parameters=lambda model: {},
            fp8_backend=None,
            te_recipe_handler=None,
            device=torch.device("cpu"),
        )
        fit_deepspeed_to_stage(
            accelerator, Schedule(1e-4, gradient_accumulation_steps=accumulation, per_device_train_batch_size=micro)
        )
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        with pytest.raises(DeepSpeedStub.Initialized) as initialized:
            Accelerator._prepare_deepspeed(accelerator, model, optimizer, scheduler)
        config = initialized.value.args[0]
        assert config["train_micro_batch_size_per_gpu"] == micro
        assert config["gradient_accumulation_steps"] == accumulation
        assert config["train_batch_size"] == micro * accumulation * 8


def test_save_model_writes_the_gathered_weights_of_a_wrapped_model(tmp_path, fresh_accelerate_state):
    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    model = tiny_model()
    wrapper = accelerator.prepare(Wrapper(model))
    save_model(accelerator, wrapper, tmp_path / "inner", submodule="model")
    save_model(accelerator, accelerator.prepare(model), tmp_path / "plain")
    from imagebert_hf import ImageBERTForPreTraining

    for folder in ("inner", "plain"):
        loaded = ImageBERTForPreTraining.from_pretrained(tmp_path / folder)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], value, msg=f"{folder}: {name}")
