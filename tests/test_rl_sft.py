"""Demonstrations and supervised fine-tuning (coso_jax/rl/sft.py): the tiny_cpu preset's answers fit
`max_new_tokens` for every game (a Points24 grid run once died at SFT on a 50-token answer), and the
SFT loss is the masked mean NLL of the scorer it is given."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from coso_jax.rl import sft as sft_lib
from coso_jax.rl.config import GYM_CARDS_ENVS, ppo_preset
from coso_jax.rl.ppo.start import DEMO_SEED
from coso_jax.tokenizer import build_bpe


@pytest.mark.parametrize("env", GYM_CARDS_ENVS)
def test_tiny_cpu_demonstrations_fit_max_new_tokens(env):
    config = ppo_preset("tiny_cpu", env=env)
    demos = sft_lib.collect_demos(env, config.sft.episodes, DEMO_SEED, config.sft.imperfect_frac,
                                  cot=config.model.cot, brief=config.model.brief_prompt)
    tokenizer = build_bpe(demos.prompts + demos.answers, config.model.vocab_size)
    tokens, mask = sft_lib.encode_answers(tokenizer, demos.answers, config.model.max_new_tokens)  # raises if too long
    assert tokens.shape == (len(demos.answers), config.model.max_new_tokens)
    assert mask.sum(axis=1).max() <= config.model.max_new_tokens


def test_sft_loss_with_a_given_scorer_ignores_masked_slots():
    logprobs = np.array([[-1.0, -2.0, np.nan], [-0.5, -np.inf, -np.inf]], np.float32)
    mask = np.array([[True, True, False], [True, False, False]])
    loss = sft_lib.sft_loss(None, {"response_mask": jnp.asarray(mask)}, score=lambda model, batch: jnp.asarray(logprobs))
    assert float(loss) == pytest.approx((1.0 + 2.0 + 0.5) / 3)


def test_encode_answers_errors_name_the_fix():
    tokenizer = build_bpe(["a b c d e f g"] * 4, 300)
    with pytest.raises(ValueError, match="raise max_new_tokens"):
        sft_lib.encode_answers(tokenizer, ["a b c d e f g"], 3)
