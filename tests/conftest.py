"""Test configuration: 8 fake host CPU devices for sharding tests.

XLA reads the flag when the backend initialises, so it must be set before jax is imported
anywhere in the test session; conftest.py is imported by pytest before any test module.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="module")
def numberline_records():
    """Six NumberLine oracle episodes (records with prompt / answer / action)."""
    from coso_jax.envs.gym_cards import demos as gym_cards_demos

    return list(gym_cards_demos.generate("NumberLine", 6, 0, 0.0))


@pytest.fixture(scope="module")
def tokenizer(numberline_records):
    """A small byte-level BPE built from those episodes' prompts and answers."""
    from coso_jax.tokenizer import build_bpe

    corpus = [r["prompt"] for r in numberline_records] + [r["answer"] for r in numberline_records]
    return build_bpe(corpus, 400)


@pytest.fixture(scope="session")
def rl_sft_dir(tmp_path_factory):
    """Where the tiny PPO tests cache their one SFT start (built by the first test that needs it)."""
    return tmp_path_factory.mktemp("rl_sft") / "sft"
