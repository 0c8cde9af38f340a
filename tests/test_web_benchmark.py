"""benchmarks/web.py's command line: wrong flags give one line naming the problem (no browser needed)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from benchmarks import web
from coso_jax.rl.config import ConfigError


def test_set_without_digirl_is_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.web", "--set", "lr=1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --set: only with --digirl (the env-speed benchmark has no config to override)")
    assert "Traceback" not in proc.stderr


def test_set_names_an_unknown_field(monkeypatch, tmp_path):
    monkeypatch.setattr("coso_jax.envs.web.browser_unavailable_reason", lambda: None)
    args = argparse.Namespace(digirl=True, name=None, set=["bogus=1"], budget_min=1.0, workdir=str(tmp_path),
                              online_iterations=1, eval_episodes=1, prompt_elements=None, seeds=[0],
                              algos=["none"], start_eval=False, critic_timing=False)
    with pytest.raises(ConfigError, match="'bogus' is not a DigiRLConfig field"):
        web.run_main(args)
    assert not any(tmp_path.iterdir())  # nothing was built before the error


@pytest.mark.parametrize("item", ["algo=coso", "seed=3", "run.seed=3", "online_iterations=2"])
def test_set_of_a_field_the_script_sets_itself_is_refused(monkeypatch, tmp_path, item):
    monkeypatch.setattr("coso_jax.envs.web.browser_unavailable_reason", lambda: None)
    args = argparse.Namespace(digirl=True, name=None, set=[item], budget_min=1.0, workdir=str(tmp_path),
                              online_iterations=1, eval_episodes=1, prompt_elements=None, seeds=[0],
                              algos=["none"], start_eval=False, critic_timing=False)
    with pytest.raises(ConfigError, match=rf"--set {item.split('=')[0]}: set by this script"):
        web.run_main(args)
