"""The recipes run end to end with ``--tiny`` (every profile, offline, CPU), their real profiles fit the planner's
GPUs, a profile that cannot fit is refused before anything loads, YAML configs work, and one recipe runs under
a real two-process ``accelerate launch``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

RECIPES = Path(__file__).parents[1] / "recipes"
PROFILES = {
    "code_14b.py": ["h100_80gb", "rtx_24gb", "node_8xh100"],
    "chat_24gb.py": ["rtx_24gb", "h100_80gb"],
    "reasoning.py": ["h100_80gb", "rtx_24gb"],
    "prune_and_distill.py": ["coder14b_to_7b", "llama8b_to_4b"],
}
CASES = [(script, profile) for script, profiles in PROFILES.items() for profile in profiles]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def _recipe(script: str) -> ModuleType:
    """Import a recipe file as a module (it puts ``recipes/`` on ``sys.path`` for its ``common``)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{Path(script).stem}", RECIPES / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _planner_or_skip() -> None:
    if importlib.util.find_spec("distill.planning") is None:
        pytest.skip("distill.planning (the memory planner) is not in this version of distill")


@pytest.mark.parametrize("script, profile", CASES)
def test_recipe_runs_tiny(script: str, profile: str, tmp_path: Path) -> None:
    """The profile's structure (teacher cache, 4-bit teacher, QLoRA, sharding flag) runs with tiny models."""
    pytest.importorskip("bitsandbytes")
    command = [sys.executable, str(RECIPES / script), "--tiny", "--profile", profile, "--output_dir", str(tmp_path)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "heldout_metrics.json").read_text())
    assert metrics["trainer_eval"]["eval_loss_tokens"] > 0
    assert list(tmp_path.glob("*.safetensors")), sorted(p.name for p in tmp_path.iterdir())
    if (script, profile) == ("code_14b.py", "rtx_24gb"):  # the cache was built, and trained from
        assert json.loads((tmp_path / "teacher_cache" / "manifest.json").read_text())["complete"]
        assert "heldout" not in metrics  # no teacher model in the process: only the cached-teacher eval
    else:
        assert 0.0 <= metrics["heldout"]["top1_agreement"] <= 1.0
        assert (tmp_path / "report" / "report.md").exists()
    if script == "reasoning.py":
        assert (tmp_path / "traces" / "manifest.json").exists()
        assert "traces:" in result.stdout


@pytest.mark.parametrize("script, profile", CASES)
def test_real_profile_fits_its_gpu(script: str, profile: str) -> None:
    """With the real models, every profile fits the GPU it is named for, by the planner (no weights loaded)."""
    _planner_or_skip()
    plan = _recipe(script).main(["--profile", profile, "--plan_only"])["plan"]
    assert plan["fits"], plan["message"]


def test_profile_that_cannot_fit_is_refused_before_loading(tmp_path: Path) -> None:
    """Sequences 16x longer and batches 16x bigger on a 24 GB card: refused with what to change, nothing loaded."""
    _planner_or_skip()
    argv = ["--profile", "rtx_24gb", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    argv += ["--max_length", "32768", "--per_device_train_batch_size", "16"]
    with pytest.raises(SystemExit) as refused:
        _recipe("code_14b.py").main(argv)  # real model names, offline: any load would fail differently
    message = str(refused.value)
    assert "does not fit" in message and "nothing was loaded" in message and "GiB" in message
    assert not (tmp_path / "out").exists()


def test_recipe_reads_a_yaml_config(tmp_path: Path) -> None:
    """``python recipes/code_14b.py run.yaml``: YAML keys override the profile, as flags do."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"profile: node_8xh100\ntiny: true\noutput_dir: {out}\nmax_steps: 2\nbeta: 0.25\n")
    metrics = _recipe("code_14b.py").main([str(config)])
    assert metrics["trainer_eval"]["epoch"] > 0
    trainer_state = json.loads((out / "heldout_metrics.json").read_text())
    assert trainer_state == json.loads(json.dumps(metrics, default=float))


@pytest.mark.slow
def test_code_recipe_under_accelerate_launch_two_processes(tmp_path: Path) -> None:
    """``accelerate launch`` with 2 processes (gloo, CPU) runs the node profile: teacher sharded, DDP student."""
    env = dict(ENV, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    launcher = Path(sys.executable).parent / "accelerate"
    port = str(20000 + (os.getpid() * 7 + hash(str(tmp_path))) % 20000)
    # --multi_gpu picks the torchrun launcher; without CUDA every process falls back to the CPU and gloo.
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    command += [str(RECIPES / "code_14b.py"), "--tiny", "--profile", "node_8xh100", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "heldout_metrics.json").read_text())
    assert metrics["trainer_eval"]["eval_loss_tokens"] > 0
    assert "heldout" not in metrics  # two processes: evaluate() only
    assert list(tmp_path.glob("*.safetensors"))
