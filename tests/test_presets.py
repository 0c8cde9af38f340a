"""The tiny_cpu preset fits every gym_cards game: its demonstrations fit `max_new_tokens` with the
tokenizer the SFT start builds (a Points24 grid run once died at SFT on a 50-token answer)."""
from __future__ import annotations

import pytest

from coso_jax.rl import policy as policy_lib
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.config import GYM_CARDS_ENVS, preset
from coso_jax.tokenizer import build_bpe


@pytest.mark.parametrize("env", GYM_CARDS_ENVS)
def test_tiny_cpu_demonstrations_fit_max_new_tokens(env):
    config = preset("tiny_cpu", env=env)
    demos = sft_lib.collect_demos(env, config.sft_episodes, policy_lib._DEMO_SEED, config.sft_imperfect_frac,
                                  cot=config.cot, brief=config.brief_prompt)
    tokenizer = build_bpe(demos.prompts + demos.answers, config.vocab_size)
    tokens, mask = sft_lib.encode_answers(tokenizer, demos.answers, config.max_new_tokens)  # raises if too long
    assert tokens.shape == (len(demos.answers), config.max_new_tokens)
    assert mask.sum(axis=1).max() <= config.max_new_tokens


def test_per_env_defaults_apply_to_their_game_only_and_overrides_win():
    assert preset("tiny_cpu", env="EZPoints").sft_epochs == 3
    assert preset("tiny_cpu", env="NumberLine").sft_epochs == 10
    assert preset("tiny_cpu", env="EZPoints", sft_epochs=7).sft_epochs == 7
    assert preset("paper", env="EZPoints").sft_epochs == 3  # the paper preset's own value
    assert preset("tiny_cpu", env="Points24").max_new_tokens == 64
