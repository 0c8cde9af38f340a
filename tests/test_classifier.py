"""The action-type classifier: shapes, pad invariance, training, and CoSo's idea end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax.causal import causal_weights, counterfactual_effects
from coso_jax.causal.classifier import (
    CausalClassifier,
    ClassifierConfig,
    logits_fn,
    make_optimizer,
    make_train_step,
    predict_proba,
)

PAD, UNK = 0, 1
KEYWORDS = (2, 3, 4, 5)  # keyword k decides the label: KEYWORDS.index(k) % 2
NOISE = np.arange(6, 40)
VOCAB, NUM_LABELS, LENGTH = 40, 2, 20


@nnx.jit
def forward(model, tokens, mask, dropout_key=None):
    # Jitted: eager op-by-op calls compile every primitive separately and are slow on CPU.
    return model(tokens, mask, dropout_key=dropout_key)


@pytest.fixture(scope="module")
def tiny_model():
    return CausalClassifier(ClassifierConfig.tiny(VOCAB, NUM_LABELS), rngs=nnx.Rngs(1))


def keyword_texts(num, seed):
    """Noise tokens with exactly one keyword at a random position; right padded."""
    rng = np.random.default_rng(seed)
    tokens = np.full((num, LENGTH), PAD, np.int32)
    mask = np.zeros((num, LENGTH), bool)
    labels = np.zeros(num, np.int32)
    where = np.zeros(num, np.int32)
    for i in range(num):
        n = rng.integers(8, LENGTH + 1)
        tokens[i, :n] = rng.choice(NOISE, n)
        where[i] = rng.integers(0, n)
        k = rng.integers(len(KEYWORDS))
        tokens[i, where[i]] = KEYWORDS[k]
        labels[i] = k % 2
        mask[i, :n] = True
    return tokens, mask, labels, where


def test_forward_shapes_and_config_checks(tiny_model):
    cfg = ClassifierConfig(vocab_size=VOCAB, num_labels=3)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.ffn_size, cfg.max_positions) == (
        128, 4, 3, 512, 512)
    model = tiny_model
    tokens, mask, _, _ = keyword_texts(4, 0)
    logits = forward(model, tokens, mask)
    assert logits.shape == (4, NUM_LABELS) and logits.dtype == jnp.float32
    probs = predict_proba(model, tokens, mask)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        ClassifierConfig(vocab_size=10, num_labels=2, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="max_positions"):
        forward(model, jnp.zeros((1, 200), jnp.int32), jnp.ones((1, 200), bool))


def test_pad_invariance_and_logits_fn_adapter(tiny_model):
    model = tiny_model
    tokens, mask, _, _ = keyword_texts(5, 1)
    base = np.asarray(forward(model, tokens, mask))
    # Other tokens at padded positions and extra padded length change nothing.
    noisy = np.where(mask, tokens, 7)
    longer_t = np.concatenate([noisy, np.full((5, 9), 9, np.int32)], 1)
    longer_m = np.concatenate([mask, np.zeros((5, 9), bool)], 1)
    np.testing.assert_allclose(forward(model, longer_t, longer_m), base, atol=1e-5)
    fn = logits_fn(model)
    np.testing.assert_allclose(jax.jit(lambda f, t, m: f(t, m))(fn, tokens, mask), base,
                               atol=1e-6)
    # Dropout only with a key.
    a = forward(model, tokens, mask, jax.random.key(0))
    assert not np.allclose(a, base)


def test_kernel_pad_invariant_path_equals_full_length_path():
    model = CausalClassifier(ClassifierConfig.tiny(VOCAB, NUM_LABELS, initializer_range=0.3),
                             rngs=nnx.Rngs(2))
    tokens, mask, labels, _ = keyword_texts(6, 2)
    fn = logits_fn(model)
    full = counterfactual_effects(fn, tokens, mask, labels, mask_token_id=UNK, pad_invariant=False)
    short = counterfactual_effects(fn, tokens, mask, labels, mask_token_id=UNK, pad_invariant=True,
                                   chunk_size=7)
    assert np.asarray(full).max() > 1e-4
    np.testing.assert_allclose(short, full, atol=1e-5, rtol=0)


def test_trained_classifier_finds_the_keyword():
    cfg = ClassifierConfig.tiny(VOCAB, NUM_LABELS, dropout_rate=0.0)
    model = CausalClassifier(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, learning_rate=3e-3)  # 1e-5 is the online default
    step = make_train_step()
    tokens, mask, labels, _ = keyword_texts(2048, seed=1)
    key = jax.random.key(0)
    for epoch in range(8):
        order = np.random.default_rng(epoch).permutation(len(tokens))
        for start in range(0, len(tokens), 128):
            idx = order[start:start + 128]
            key, sub = jax.random.split(key)
            loss, _ = step(model, optimizer, tokens[idx], mask[idx], labels[idx], sub)
    assert float(loss) < 0.2

    test_tokens, test_mask, test_labels, where = keyword_texts(200, seed=99)
    accuracy = float((np.asarray(predict_proba(model, test_tokens, test_mask)).argmax(-1)
                      == test_labels).mean())
    assert accuracy >= 0.95, accuracy

    window = 4
    effects = counterfactual_effects(logits_fn(model), test_tokens[:64], test_mask[:64],
                                     test_labels[:64], window=window, mask_token_id=UNK,
                                     pad_invariant=True)
    weights = np.asarray(causal_weights(effects, test_mask[:64]))
    argmax = weights.argmax(1)
    # The windows that cover the keyword start at keyword - window + 1 .. keyword.
    hits = (argmax <= where[:64]) & (argmax > where[:64] - window)
    assert hits.mean() >= 0.8, hits.mean()


def test_train_step_serves_new_classifiers_without_recompiling():
    # A grid builds a new classifier and optimizer per run; one compiled step must serve them all
    # (the optimizers share their optax transformation; a fresh one per run recompiled the step).
    compiles = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    step = make_train_step()
    tokens, mask, labels, _ = keyword_texts(16, seed=3)
    keys = [jax.random.key(i) for i in range(2)]
    counts = []  # compiles during each classifier's two train steps
    for seed in range(3):
        model = CausalClassifier(ClassifierConfig.tiny(VOCAB, NUM_LABELS), rngs=nnx.Rngs(seed))
        optimizer = make_optimizer(model, learning_rate=1e-3)
        jax.monitoring.register_event_duration_secs_listener(on_event)
        try:
            for key in keys:
                step(model, optimizer, tokens, mask, labels, key)
        finally:
            jax.monitoring.unregister_event_duration_listener(on_event)
        counts.append(len(compiles))
        compiles.clear()
    assert counts[0] >= 1, counts  # the listener sees compiles at all
    assert counts[1:] == [0, 0], counts
    assert make_optimizer(model, 1e-3).tx is make_optimizer(model, 1e-3).tx
    assert make_optimizer(model, 1e-3).tx is not make_optimizer(model, 1e-4).tx
