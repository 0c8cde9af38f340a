"""Token offsets and thought/action masks of answers (coso_jax/rl/text.py) with a real byte-level BPE."""
from __future__ import annotations

import numpy as np
import pytest

from coso_jax.envs import text_interface
from coso_jax.rl.text import thought_action_masks, token_char_offsets


# ---------------------------------------------------------------------------------------------
# Thought / action token masks with a real byte-level BPE
@pytest.mark.parametrize("variant", ["plain", "multibyte"])
def test_thought_action_masks_on_demo_answer(tokenizer, numberline_records, variant):
    answer = numberline_records[0]["answer"]
    if variant == "multibyte":  # '→' and 'é' split over byte tokens: exercises the prefix fallback
        answer = answer.replace("so I", "so → I é")
    iface = text_interface("NumberLine")
    ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    text, starts, ends = token_char_offsets(tokenizer, ids)
    assert text == answer
    assert np.all(np.diff(ends) >= 0) and np.all(starts <= ends) and ends[-1] == len(answer)
    action_start = iface.spans(text).action[0]
    assert text[action_start:].startswith('"action":')
    width = len(ids) + 5
    thought, action = thought_action_masks(starts, ends, action_start, len(ids), width)
    # Independent: token k is a thought token iff the decoded prefix through k ends before `"action":`.
    prefix_len = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    expected_thought = np.array([n <= action_start for n in prefix_len] + [False] * 5)
    np.testing.assert_array_equal(thought, expected_thought)
    np.testing.assert_array_equal(action[: len(ids)], ~expected_thought[: len(ids)])
    assert not action[len(ids):].any() and not thought[len(ids):].any()  # padding
    assert action[len(ids) - 1]  # EOS closes the action
    n_thought = int(thought.sum())
    assert answer[: action_start].startswith(tokenizer.decode(ids[:n_thought]))
    assert '"action":' in tokenizer.decode(ids[n_thought:], skip_special_tokens=True)
    assert tokenizer.decode(ids[:n_thought]) + tokenizer.decode(ids[n_thought:], skip_special_tokens=True) == answer


def test_thought_action_masks_without_action_key(tokenizer):
    text = "no key here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, starts, ends = token_char_offsets(tokenizer, ids)
    action_start = text_interface("NumberLine").spans(text).action[0]
    assert action_start == len(text)
    thought, action = thought_action_masks(starts, ends, action_start, len(ids), len(ids))
    assert thought.all() and not action.any()


