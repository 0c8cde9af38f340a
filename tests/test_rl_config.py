"""Configs (coso_jax/rl/config.py): sections and flat names, validation that names the field,
presets and per-env defaults, `--set` parsing with type checks, mesh specs, and fingerprints that
still match the starts and checkpoints written before the sections existed."""
from __future__ import annotations

import pytest

from coso_jax.checkpoint import config_fingerprint
from coso_jax.rl.config import (
    GYM_CARDS_ENVS,
    PPO_ENVS,
    CausalConfig,
    ConfigError,
    DigiRLConfig,
    PPOConfig,
    digirl_preset,
    field_differences,
    parse_mesh,
    parse_overrides,
    ppo_preset,
    preset,
)


# ---------------------------------------------------------------------------------------------
# Sections and flat names
def test_sections_compose_and_flat_names_reach_every_field():
    cfg = ppo_preset("tiny_cpu", causal_lr=2e-3, sft_epochs=4, seed=7, alpha=0.3, temperature=0.7)
    assert (cfg.causal.lr, cfg.sft.epochs, cfg.run.seed, cfg.causal.alpha, cfg.model.temperature) == (
        2e-3, 4, 7, 0.3, 0.7)
    assert cfg.get("causal_lr") == cfg.get("causal.lr") == 2e-3
    flat = cfg.to_flat_dict()
    assert flat["causal_lr"] == 2e-3 and flat["sft_dir"] is None and "causal" not in flat
    # Every flat name resolves to one dotted path and back.
    names = PPOConfig.flat_names()
    assert len(set(names.values())) == len(names)
    assert names["alpha"] == "causal.alpha" and names["sft_episodes"] == "sft.episodes" and names["gamma"] == "gamma"
    assert DigiRLConfig.flat_names()["sft_episodes_per_task"] == "sft.episodes"
    assert "sft_imperfect_frac" not in DigiRLConfig.flat_names()  # not a DigiRL setting
    again = cfg.replace(**{"causal.lr": 5e-4, "sft_epochs": 2})
    assert (again.causal.lr, again.sft.epochs, again.causal.alpha) == (5e-4, 2, 0.3)
    assert cfg.replace(causal=CausalConfig(alpha=0.9)).causal.alpha == 0.9
    with pytest.raises(ConfigError, match="'bogus' is not a PPOConfig field"):
        cfg.replace(bogus=1)


@pytest.mark.parametrize("overrides, match", [
    ({"env": "Nope"}, "env must be one of"),
    ({"env": "web/general"}, "DigiRL backbone"),
    ({"alpha": -0.1}, "alpha must be >= 0"),
    ({"mesh": "gpu:2"}, "bad mesh spec"),
    ({"mesh": "data:2,data:2"}, "given twice"),
    ({"algo": "sac"}, "algo must be one of"),
    ({"num_envs": 3}, "multiple of num_envs"),
    ({"minibatch_size": 48}, "minibatch_size"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"causal_window": 0}, "causal.window"),
    ({"total_env_steps": 0}, "less than one update"),
    ({"total_env_steps": 100}, "less than one update"),
    ({"lr": "abc"}, "lr must be a number, got 'abc'"),
    ({"num_envs": 2.5}, "num_envs must be an integer"),
    ({"cot": "maybe"}, "cot must be true or false"),
])
def test_ppo_config_validation_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ppo_preset("tiny_cpu", **overrides)


def test_values_are_coerced_to_the_field_types():
    cfg = ppo_preset("tiny_cpu", lr="3e-4", num_envs="8", cot="false", sft_dir=None, steps_per_update=128.0)
    assert (cfg.lr, cfg.num_envs, cfg.model.cot, cfg.steps_per_update) == (3e-4, 8, False, 128)
    assert isinstance(cfg.steps_per_update, int)


# ---------------------------------------------------------------------------------------------
# Presets and per-env defaults
def test_ppo_presets():
    with pytest.raises(ConfigError, match="unknown preset"):
        ppo_preset("huge")
    paper = ppo_preset("paper", env="Points24")
    assert (paper.gamma, paper.gae_lambda, paper.clip_eps, paper.thought_coef, paper.model.temperature) == (
        0.9, 0.95, 0.1, 0.5, 0.2)
    assert paper.steps_per_update == 1024 and paper.lr == 1e-5
    assert ppo_preset("paper").steps_per_update == 512
    assert ppo_preset("paper", env="Blackjack").run.success_window == 1000
    model = ppo_preset("paper").model  # RL4VLM's real-scale setting
    assert (model.lora_rank, model.lora_alpha, model.lora_dropout, model.param_dtype, model.remat) == (
        128, 256.0, 0.05, "bfloat16", True)
    with pytest.raises(ConfigError, match="param_dtype must be one of"):
        ppo_preset("tiny_cpu", param_dtype="float16")
    with pytest.raises(ConfigError, match="PPO backbone only"):
        digirl_preset("tiny_cpu", lora_rank=8)
    cfg = ppo_preset("tiny_cpu", num_envs=4, steps_per_update=16, minibatch_size=8, total_env_steps=40)
    assert cfg.steps_per_env == 4 and cfg.num_iterations == 2
    assert preset("tiny_cpu", backbone="digirl").backbone == "digirl"


def test_per_env_defaults_apply_to_their_game_only_and_overrides_win():
    assert ppo_preset("tiny_cpu", env="EZPoints").sft.epochs == 3
    assert ppo_preset("tiny_cpu", env="NumberLine").sft.epochs == 10
    assert ppo_preset("tiny_cpu", env="EZPoints", sft_epochs=7).sft.epochs == 7
    assert ppo_preset("paper", env="EZPoints").sft.epochs == 0  # the paper preset's own value (an SFT'd hf_dir)
    assert ppo_preset("tiny_cpu", env="Points24").model.max_new_tokens == 64


def test_alfworld_config_defaults():
    assert PPO_ENVS == GYM_CARDS_ENVS + ("ALFWorld",)
    for name in ("tiny_cpu", "paper"):
        for algo in ("none", "entropy", "coso"):
            assert ppo_preset(name, env="ALFWorld", algo=algo).thought_coef == 0.2
        assert ppo_preset(name, env="NumberLine").thought_coef == 0.5
        assert ppo_preset(name, env="ALFWorld", thought_coef=0.7).thought_coef == 0.7  # overrides win
    tiny = ppo_preset("tiny_cpu", env="ALFWorld", alfworld_task_type="pick")
    assert tiny.model.max_new_tokens == 64 and tiny.env_kwargs == {"task_type": "pick", "pool_size": 100}
    assert ppo_preset("tiny_cpu", env="ALFWorld").env_kwargs["task_type"] is None  # all six task types
    assert ppo_preset("paper", env="ALFWorld").model.max_new_tokens == 256
    assert ppo_preset("tiny_cpu", env="NumberLine").env_kwargs == {}
    with pytest.raises(ConfigError, match="alfworld_task_type"):
        ppo_preset("tiny_cpu", env="ALFWorld", alfworld_task_type="juggle")
    with pytest.raises(ConfigError, match="env must be one of"):
        ppo_preset("tiny_cpu", env="ALFWorld-v1")


def test_reference_env_switches_reach_gym_make_only_where_set():
    assert ppo_preset("tiny_cpu", env="Points24").env_kwargs == {}
    assert ppo_preset("tiny_cpu", env="Points24", points_allow_fractional_powers=True).env_kwargs == {
        "allow_fractional_powers": True}
    assert ppo_preset("tiny_cpu", env="Blackjack", blackjack_reference_render=True).env_kwargs == {
        "reference_render": True}
    assert ppo_preset("tiny_cpu", env="NumberLine", blackjack_reference_render=True).env_kwargs == {}


def test_digirl_presets_and_errors():
    paper = digirl_preset("paper")
    assert (paper.gamma, paper.lr, paper.trajectories_per_iteration, paper.actor_epochs, paper.max_grad_norm,
            paper.model.temperature, paper.replay_capacity) == (0.5, 1e-4, 16, 20, 0.01, 1.0, 2000)
    assert paper.offline_iterations == 30 and paper.num_iterations == 430
    # The reference's offline stage: trajectories ranked by return, no soft-RL bonus offline.
    assert (paper.offline_filter, paper.offline_entropy) == ("reward", False)
    tiny = digirl_preset("tiny_cpu", algo="none", tasks=["click-button"])
    assert tiny.tasks == ("click-button",) and tiny.task_names == ("click-button",)
    for bad, match in [(dict(env="NumberLine"), "PPO backbone"), (dict(algo="ppo"), "algo"),
                       (dict(critic_trunk="big"), "critic_trunk"), (dict(tasks=["login-user"]), "subset"),
                       (dict(filter_quantile=1.5), "filter_quantile"), (dict(actor_batch=0), "actor_batch"),
                       (dict(policy_family="gpt"), "policy_family"), (dict(offline_filter="x"), "offline_filter"),
                       (dict(sft_imperfect_frac=0.1), "not a DigiRLConfig field")]:
        with pytest.raises(ConfigError, match=match):
            digirl_preset("tiny_cpu", **bad)
    with pytest.raises(ConfigError, match="preset"):
        digirl_preset("huge")


# ---------------------------------------------------------------------------------------------
# --set parsing
def test_parse_overrides_types_and_errors():
    got = parse_overrides(["lr=3e-4", "causal.window=3", "cot=false", "sft_dir=null", "ppo_epochs=3"], PPOConfig)
    assert got == {"lr": 3e-4, "causal.window": 3, "cot": False, "sft_dir": None, "ppo_epochs": 3}
    assert parse_overrides(['tasks=["login-user"]', "tasks=a,b"][:1], DigiRLConfig) == {"tasks": ("login-user",)}
    assert parse_overrides(["tasks=click-button,focus-text"], DigiRLConfig) == {"tasks": ("click-button", "focus-text")}
    for item, match in [("lr=abc", "lr must be a number, got 'abc'"), ("bogus=1", "'bogus' is not a PPOConfig"),
                        ("lr", "expected name=value"), ("num_envs=1.5", "num_envs must be an integer"),
                        ("=3", "expected name=value")]:
        with pytest.raises(ConfigError, match=match):
            parse_overrides([item], PPOConfig)
    with pytest.raises(ConfigError, match="ppo_epochs"):
        parse_overrides(["ppo_epochs=3"], DigiRLConfig)


@pytest.mark.parametrize("spec", ["data:8", "data:2,fsdp:4", "fsdp:2", " data:1 , fsdp:1 "])
def test_parse_mesh_accepts(spec):
    axes = parse_mesh(spec)
    assert set(axes) <= {"data", "fsdp"} and all(v >= 1 for v in axes.values())
    assert parse_mesh("data:2,fsdp:4") == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize("spec, match", [
    ("data", "bad mesh spec"), ("data:0", "bad mesh spec"), ("model:2", "bad mesh spec"),
    ("data:x", "bad mesh spec"), ("", "bad mesh spec"), ("data:2,data:2", "given twice"),
    ("data:-1", "bad mesh spec"),
])
def test_parse_mesh_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_mesh(spec)


# ---------------------------------------------------------------------------------------------
# Fingerprints. The expected start hashes were computed by the code at commit d792e9a (before the
# sections: `trainer.sft_fingerprint`, `digirl.start_fingerprint`) for the same presets: a start cached
# then is still found and loaded. (Checkpoints of that code cannot be resumed at all: their layout
# predates `run.CHECKPOINT_FORMAT`, which the run checks first.) The PPO `paper` preset is absent: its
# start settings changed on purpose (no SFT on top of the hf_dir checkpoint, bf16), and it never ran
# before, so no such start exists.
START_FINGERPRINTS_D792E9A = [
    ("ppo", "tiny_cpu", {}, "51a9d1839424dc8d"),
    ("ppo", "tiny_cpu", dict(env="EZPoints", algo="entropy", seed=3), "09f4ded147b1617f"),
    ("ppo", "tiny_cpu", dict(env="ALFWorld", alfworld_task_type="pick"), "0f093a8fa6b7bddc"),
    ("ppo", "tiny_cpu", dict(env="Blackjack", sft_dir="/x", causal_chunk_size=64), "fd239ba659f307ea"),
    # tiny_cpu lists the page's tap targets in the prompt since issue #20 (prompt_elements=8); with the
    # option off its starts are the ones written then.
    ("digirl", "tiny_cpu", dict(prompt_elements=0), "04d69e024aa0c721"),
    ("digirl", "paper", {}, "c958e1f5eb384577"),
    ("digirl", "tiny_cpu", dict(algo="none", tasks=["click-button"], prompt_elements=0), "d8ba55a8ccb9d008"),
]


@pytest.mark.parametrize("backbone, name, overrides, start", START_FINGERPRINTS_D792E9A)
def test_start_fingerprints_match_the_ones_written_before_the_sections(backbone, name, overrides, start):
    assert preset(name, backbone=backbone, **overrides).start_fingerprint() == start


def test_fingerprint_fields():
    cfg = ppo_preset("tiny_cpu", env="Blackjack")
    # Fields added later leave the fingerprints while at their default, and count once set.
    assert not set(PPOConfig._LATER_FIELDS) & set(cfg.resume_fields())
    assert "prompt_margin" in cfg.replace(prompt_margin=8).resume_fields()
    assert cfg.start_fingerprint() != cfg.replace(blackjack_reference_render=True).start_fingerprint()
    # algo, alpha, seed and bookkeeping never change the start; ALFWorld's task type does.
    assert cfg.start_fingerprint() == cfg.replace(algo="none", seed=3, alpha=0.5, progress=False).start_fingerprint()
    alf = ppo_preset("tiny_cpu", env="ALFWorld")
    assert alf.start_fingerprint() != alf.replace(alfworld_task_type="heat").start_fingerprint()
    assert cfg.resume_fingerprint() == cfg.replace(total_env_steps=4096, checkpoint_every=1,
                                                   sft_dir="elsewhere").resume_fingerprint()
    assert cfg.resume_fingerprint() == config_fingerprint(cfg.resume_fields())
    web = digirl_preset("tiny_cpu")
    assert web.start_fingerprint() != web.replace(sft_epochs=web.sft.epochs + 1).start_fingerprint()
    assert web.start_fingerprint() == web.replace(algo="none", seed=3, alpha=0.5).start_fingerprint()
    assert web.start_dir("runs/x").parent.as_posix() == "runs/sft"
    # Listed targets: the offline data's random taps land on them, so such a start records it (and
    # starts cached before, with random screen taps, are not re-used); without offline random taps,
    # nothing changes.
    assert web.prompt_elements > 0 and web.start_fields()["offline_random_taps"] == "listed_targets"
    assert "offline_random_taps" not in web.replace(offline_imperfect_frac=0.0).start_fields()


def test_field_differences_names_fields_and_values():
    assert field_differences({"alpha": 0.01, "env": "NumberLine"}, {"alpha": 0.5, "env": "NumberLine"}) == [
        "alpha: 0.01 -> 0.5"]
    assert field_differences({"a": 1}, {"b": 2}) == ["a: 1 -> '<absent>'", "b: '<absent>' -> 2"]
