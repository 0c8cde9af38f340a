"""The launcher (experiments/train.py): every user error is one line on stderr, a non-zero exit and no
new file, checked before anything costly is built; flags become the backbone's config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _launch(*flags, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("COSO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "experiments.train", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(result, message):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]


@pytest.mark.parametrize("flag, message", [
    ("--env=Nope", "--env"),
    ("--alpha=-0.5", "--alpha must be >= 0"),
    ("--mesh=data:2,gpu:4", "bad mesh spec"),
    ("--resume_step=3", "--resume_step needs --resume"),
])
def test_launcher_rejects_bad_flags(tmp_path, flag, message):
    result = _launch(flag, f"--workdir={tmp_path / 'x'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr[-2000:]
    if flag.startswith("--env"):
        assert "NumberLine" in result.stderr  # names the valid choices
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, message", [
    (["--mesh=data:16"], "mesh 'data:16' needs 16 devices"),
    (["--hf_dir=/nonexistent"], "--hf_dir /nonexistent: no such directory"),
    (["--set=lr=abc"], "lr must be a number, got 'abc'"),
    (["--set=bogus=1"], "'bogus' is not a PPOConfig field"),
    (["--total_env_steps=0"], "less than one update"),
    (["--backbone=digirl", "--env=web/general", "--set=ppo_epochs=3"], "'ppo_epochs' is not a DigiRLConfig field"),
])
def test_user_errors_are_one_line_and_leave_nothing(tmp_path, flags, message):
    result = _launch(*flags, f"--workdir={tmp_path / 'x'}", f"--sft_dir={tmp_path / 'sft'}")
    _one_line_error(result, message)
    assert not (tmp_path / "x").exists() and not (tmp_path / "sft").exists()


def test_hf_dir_without_weights(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    result = _launch(f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'x'}")
    _one_line_error(result, "holds no model.safetensors")
    assert not (tmp_path / "x").exists()


def test_finished_run_without_resume_and_start_of_another_game(tmp_path):
    work = tmp_path / "w"
    (work / "checkpoints" / "4").mkdir(parents=True)
    _one_line_error(_launch(f"--workdir={work}"), "already holds checkpoints; pass --resume")
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints"]  # nothing added
    # --sft_dir holding another game's start: refused before any env or model is built, naming the field.
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "summary.json").write_text(json.dumps({"fingerprint": "0" * 16, "fields": {"env": "Blackjack"}}))
    result = _launch(f"--workdir={tmp_path / 'new'}", f"--sft_dir={sft}")
    _one_line_error(result, "env: 'Blackjack' -> 'NumberLine'")
    assert not (tmp_path / "new").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = _launch("--set=lr=abc", "--debug", f"--workdir={tmp_path / 'x'}")
    assert result.returncode != 0 and "Traceback" in result.stderr and "lr must be a number" in result.stderr


def test_config_from_flags(tmp_path):
    from experiments import train

    flags_ = train.FLAGS
    try:
        flags_(["train", f"--workdir={tmp_path}", "--env=Blackjack", "--algo=entropy", "--alpha=0.2",
                "--mesh=data:2,fsdp:4", "--set=ppo_epochs=3", "--set=temperature=0.5", "--set=causal.lr=2e-3"])
        cfg = train.config_from_flags()
        assert (cfg.env, cfg.algo, cfg.causal.alpha, cfg.mesh, cfg.ppo_epochs, cfg.model.temperature,
                cfg.causal.lr) == ("Blackjack", "entropy", 0.2, "data:2,fsdp:4", 3, 0.5, 2e-3)
        flags_.unparse_flags()
        flags_(["train", f"--workdir={tmp_path}", "--backbone=digirl", "--env=web/shopping", "--algo=entropy",
                "--preset=tiny_cpu", "--alpha=0.2", "--set=actor_epochs=3", '--set=tasks=["login-user"]'])
        cfg = train.config_from_flags()
        assert (cfg.env, cfg.algo, cfg.causal.alpha, cfg.actor_epochs, cfg.tasks) == (
            "web/shopping", "entropy", 0.2, 3, ("login-user",))
    finally:
        flags_.unparse_flags()


def test_digirl_flag_combinations(tmp_path):
    from absl import flags

    from experiments import train

    f = train.FLAGS
    try:
        for argv, match in [(["--env=web/general"], "needs --backbone=digirl"),
                            (["--backbone=digirl", "--env=NumberLine"], "web suites"),
                            (["--backbone=digirl", "--env=web/general", "--total_env_steps=10"], "PPO setting")]:
            with pytest.raises(flags.IllegalFlagValueError, match=match):
                f(["train", f"--workdir={tmp_path}", *argv])
            f.unparse_flags()
    finally:
        f.unparse_flags()


def test_closing_summary_reads_the_first_iteration_from_the_log(tmp_path):
    """After a resume, history[0] is a later iteration; the SFT start's own rollout is step 1 of the log."""
    from coso_jax.metrics import MetricsWriter
    from experiments import train

    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step, success in [(1, 0.923), (2, 0.5), (3, 0.143)]:
            w.write(step, {"iteration_success_rate": success})
    assert train._first_iteration_success(str(tmp_path)) == 0.923
