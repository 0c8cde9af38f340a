"""LoRA through qwix (coso_jax.models.lora), functional per-layer remat, bf16 models, the tiny NeXT preset.

Torch-free: every model is a tiny `llava.random_init` LLaVA. Tolerances (float32 unless stated):
  * adapter forward vs merged forward: 1e-5 absolute on log-probs of magnitude up to ~8 (measured 1e-6);
  * remat on vs off, the trainer's scanned update: 1e-6 + 1e-5 * scale per leaf (loss, gradients,
    updated parameters);
  * bf16 vs float32 model with the same (bf16-representable) weights: logits within 3e-2 * max|logit|
    (bf16 keeps 8 significant bits: ~4e-3 relative per rounding, accumulated over 2 decoder layers and
    the vision tower; measured 7.5e-3 on logits up to 0.98).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("qwix")
# qwix 0.1.8 still uses flax APIs that flax 0.12 deprecates (`Variable.value`, `VariableState`).
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:qwix\..*")

from coso_jax import sampling  # noqa: E402
from coso_jax.models import image_processing as ip  # noqa: E402
from coso_jax.models import llava, lora  # noqa: E402
from coso_jax.models.llama import DecoderModel  # noqa: E402
from coso_jax.models.value_head import ValueHead  # noqa: E402

RANK, ALPHA = 4, 8.0
CFG = llava.LlavaConfig.tiny()
LAYERS = CFG.text.num_layers


class ActorCritic(nnx.Module):
    """The trainer's layout: `policy` (a Llava) and `value_head`."""

    def __init__(self, policy, value_head):
        self.policy = policy
        self.value_head = value_head


def randomize_b(model, seed=0, scale=0.05):
    """Non-zero B matrices (in place), so that the adapters change the outputs."""
    rs = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        b = getattr(module, "kernel_lora_b", None)
        if isinstance(b, nnx.LoRAParam):
            b.set_value(jnp.asarray(rs.normal(size=b.shape) * scale, b.dtype))
    return model


def make_batch(cfg=CFG, lead=(), b=2, text=5, n=4, seed=0):
    """A scorer batch (the trainer's layout) for a LLaVA-1.5 config; `lead` adds leading axes."""
    rng = np.random.default_rng(seed)
    k = cfg.num_image_tokens()
    shape = lead + (b,)
    ids = rng.integers(8, cfg.text.vocab_size, shape + (1 + k + text,))
    ids[..., 1:1 + k] = cfg.image_token_id
    mask = np.ones(ids.shape, np.int32)
    mask[..., 0, :2] = 0  # left padding in row 0
    s = cfg.vision.image_size
    return dict(prompt_ids=jnp.asarray(ids * mask), prompt_mask=jnp.asarray(mask),
                response_ids=jnp.asarray(rng.integers(8, cfg.text.vocab_size, shape + (n,))),
                response_mask=jnp.asarray(np.broadcast_to(np.arange(n) < np.where(np.arange(b) == 1, n - 1, n)[:, None],
                                                          shape + (n,))),
                pixel_values=jnp.asarray(rng.normal(size=shape + (3, s, s)).astype(np.float32)))


@pytest.fixture(scope="module")
def base():
    return llava.random_init(CFG, seed=0)


@pytest.fixture(scope="module")
def adapted(base):
    """The base with rank-4 adapters (random B) on all 7 projections, no dropout."""
    return randomize_b(lora.apply_lora(base, rank=RANK, alpha=ALPHA, dropout=0.0, rngs=nnx.Rngs(1)))


score = jax.jit(lambda gd, st, batch: sampling.score_batch_fn(nnx.merge(gd, st), None, batch, temperature=1.0),
                static_argnums=0)


def run_score(model, batch):
    return score(*nnx.split(model), batch)


# --------------------------------------------------------------------------------------------------
# apply_lora, the trainable filter
# --------------------------------------------------------------------------------------------------
def test_apply_lora_adds_adapters_to_the_language_model_only(base):
    model = lora.apply_lora(base, rank=RANK, alpha=ALPHA, dropout=0.05, rngs=nnx.Rngs(1))
    leaves = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    assert len(leaves) == LAYERS * 7 * 2
    for path, var in leaves:
        assert path[0] == "language_model" and path[-1] in ("kernel_lora_a", "kernel_lora_b")
        assert var.get_value().dtype == jnp.float32
    q = model.language_model.layers[0].self_attn.q_proj
    d = CFG.text.hidden_size
    assert q.kernel_lora_a.shape == (d, RANK)
    assert q.kernel_lora_b.shape == (RANK, CFG.text.num_heads * CFG.text.head_dim)
    # A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's default), B = 0.
    a = np.asarray(q.kernel_lora_a[...])
    assert np.abs(a).max() <= d ** -0.5 and a.std() > 0.3 * d ** -0.5
    assert not np.asarray(q.kernel_lora_b[...]).any()
    cfg = lora.lora_config(model)
    assert cfg == lora.LoraConfig(RANK, ALPHA, 0.05, lora.LM_LINEARS, jnp.dtype(jnp.float32)) and cfg.scale == 2.0
    # The caller's model is untouched; a fresh adapter leaves the outputs exactly unchanged.
    assert lora.lora_config(base) is None and not jax.tree.leaves(nnx.state(base, nnx.LoRAParam))
    assert type(base.language_model) is DecoderModel
    batch = make_batch()
    ours, ref = run_score(model, batch), run_score(base, batch)
    np.testing.assert_array_equal(np.asarray(ours.logprobs), np.asarray(ref.logprobs))


def test_apply_lora_on_an_actor_critic_and_a_bare_decoder(base):
    ac = ActorCritic(base, ValueHead.tiny(CFG.text.hidden_size, rngs=nnx.Rngs(0)))
    wrapped = lora.apply_lora(ac, rank=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj"),
                              rngs=nnx.Rngs(0))
    assert len(jax.tree.leaves(nnx.state(wrapped, nnx.LoRAParam))) == LAYERS * 2 * 2
    assert lora.lora_config(wrapped.policy).target_modules == ("q_proj", "v_proj")
    decoder = lora.apply_lora(base.language_model, rank=2, alpha=4.0, dropout=0.0, rngs=nnx.Rngs(0))
    assert isinstance(decoder, DecoderModel) and lora.lora_config(decoder).rank == 2


def test_two_adapted_copies_share_one_program(base):
    """Two trainers in one process (a sweep, a benchmark) must not compile their programs twice: qwix makes
    a new class per call, so apply_lora reuses one class per (base class, LoRA config)."""
    kw = dict(rank=RANK, alpha=ALPHA, dropout=0.05)
    first = lora.apply_lora(base, rngs=nnx.Rngs(1), **kw)
    second = lora.apply_lora(base, rngs=nnx.Rngs(2), **kw)
    other = lora.apply_lora(base, rngs=nnx.Rngs(1), **{**kw, "rank": RANK + 1})
    (gd1, st1), gd2 = nnx.split(first), nnx.graphdef(second)
    assert gd1 == gd2 and nnx.graphdef(other) != gd1
    # The reused class behaves as its own: dropout switches to the train class of the same config.
    lora.enable_dropout(second, jax.random.key(0))
    assert type(second.language_model) is type(lora.enable_dropout(first, jax.random.key(0)).language_model)
    lora.disable_dropout(first)
    lora.disable_dropout(second)
    batch = make_batch()
    fresh = jax.jit(lambda gd, st, b: sampling.score_batch_fn(nnx.merge(gd, st), None, b, temperature=1.0).logprobs,
                    static_argnums=0)
    fresh(gd1, st1, batch)
    fresh(*nnx.split(second), batch)
    assert fresh._cache_size() == 1
    # Different A draws: the copies are distinct models behind one program.
    a1 = first.language_model.layers[0].self_attn.q_proj.kernel_lora_a[...]
    a2 = second.language_model.layers[0].self_attn.q_proj.kernel_lora_a[...]
    assert np.abs(np.asarray(a1) - np.asarray(a2)).max() > 0


def test_apply_lora_errors(base, adapted):
    kw = dict(rank=RANK, alpha=ALPHA, dropout=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(base, **{**kw, "rank": 0})
    with pytest.raises(ValueError, match="dropout"):
        lora.apply_lora(base, **{**kw, "dropout": 1.0})
    with pytest.raises(ValueError, match=r"\['c_attn'\] name no linear layer"):
        lora.apply_lora(base, target_modules=("q_proj", "c_attn"), **kw)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(adapted, **kw)
    with pytest.raises(ValueError, match="exactly one llama.DecoderModel"):
        lora.apply_lora(ValueHead.tiny(8, rngs=nnx.Rngs(0)), **kw)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.merge_lora(base)


def test_trainable_filter_selects_adapters_and_value_head(adapted):
    ac = ActorCritic(adapted, ValueHead.tiny(CFG.text.hidden_size, rngs=nnx.Rngs(0)))
    _, trainable, frozen = nnx.split(ac, lora.trainable_filter(), ...)
    paths = [p for p, _ in nnx.to_flat_state(trainable)]
    assert sum(p[0] == "value_head" for p in paths) == 6  # 3 linears x (kernel, bias)
    assert all(p[0] == "value_head" or p[-1].endswith(("_lora_a", "_lora_b")) for p in paths)
    assert len(paths) == 6 + LAYERS * 14
    assert not jax.tree.leaves(nnx.state(frozen, nnx.LoRAParam))
    # The pitfall the filter avoids: LoRAParam subclasses Param, so a Param split trains the base too.
    _, params = nnx.split(ac, nnx.Param)
    assert len(jax.tree.leaves(params)) == len(paths) + len(jax.tree.leaves(frozen))
    _, more, _ = nnx.split(ac, lora.trainable_filter(train_projector=True, train_vision=True), ...)
    names = {p[1] for p, _ in nnx.to_flat_state(more) if p[0] == "policy"}
    assert {"multi_modal_projector", "vision_tower", "language_model"} <= names


# --------------------------------------------------------------------------------------------------
# The adapters are live in decode (sampler, scorer); merging
# --------------------------------------------------------------------------------------------------
def test_merged_weights_equal_the_adapter_forward(base, adapted):
    merged = lora.merge_lora(adapted)
    assert type(merged.language_model) is DecoderModel and lora.lora_config(merged) is None
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert [p for p, _ in nnx.to_flat_state(nnx.state(merged))] == [p for p, _ in nnx.to_flat_state(nnx.state(base))]
    assert jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam))  # merging copies; the adapter model keeps its own
    batch = make_batch()
    with_adapters, folded, plain = run_score(adapted, batch), run_score(merged, batch), run_score(base, batch)
    np.testing.assert_allclose(np.asarray(with_adapters.logprobs), np.asarray(folded.logprobs), atol=1e-5, rtol=0)
    # The adapters matter far beyond that tolerance: the scorer (decode) goes through them.
    assert np.abs(np.asarray(with_adapters.logprobs) - np.asarray(plain.logprobs)).max() > 1e-2
    # HF-style __call__ and decode agree; the sampler's prefill + KV-cache loop also uses the adapters.
    ids, mask, pixels = batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"]
    fwd = nnx.jit(lambda m: m(ids, mask, pixels))
    np.testing.assert_allclose(np.asarray(fwd(adapted)), np.asarray(fwd(merged)), atol=1e-5, rtol=0)
    kw = dict(pixel_values=pixels, max_new_tokens=4, temperature=1.0, eos_id=2, pad_id=0, greedy=True)
    out = sampling.sample(adapted, None, ids, mask, jax.random.key(0), **kw)
    ref = sampling.sample(merged, None, ids, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_one_optax_step_changes_only_the_adapters(adapted):
    ac = ActorCritic(adapted, ValueHead.tiny(CFG.text.hidden_size, rngs=nnx.Rngs(0)))
    graphdef, trainable, frozen = nnx.split(ac, lora.trainable_filter(), ...)
    batch = make_batch()

    def loss(trainable, frozen):
        model = nnx.merge(graphdef, trainable, frozen)
        out = sampling.score_batch_fn(model.policy, model.value_head, batch, temperature=1.0)
        return -out.logprobs.sum() / batch["response_mask"].sum() + jnp.mean(out.values ** 2)

    tx = optax.adam(1e-2)
    grads = jax.jit(jax.grad(loss))(trainable, frozen)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    new = optax.apply_updates(trainable, updates)
    assert all(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(trainable)))
    stepped = nnx.merge(graphdef, new, frozen)
    _, new_frozen = nnx.split(stepped, lora.trainable_filter(), ...)[1:]
    for a, b in zip(jax.tree.leaves(new_frozen), jax.tree.leaves(frozen), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))  # bit-identical base


# --------------------------------------------------------------------------------------------------
# Remat inside the trainer's scanned update
# --------------------------------------------------------------------------------------------------
def make_update(graphdef, frozen, tx, *, remat, dropout):
    """The trainer's pattern: `lax.scan` over minibatches of `value_and_grad` of a loss that merges
    (graphdef, trainable, frozen) and calls the scorer; `jax.eval_shape` of the loss first, as
    `ppo.make_update_fn` does (with `nnx.remat` that combination raised TraceContextError)."""

    def loss(trainable, minibatch, key):
        model = nnx.merge(graphdef, trainable, frozen)
        if dropout:
            lora.enable_dropout(model.policy, key)
        out = sampling.score_batch_fn(model.policy, model.value_head, minibatch, temperature=1.0, remat=remat)
        return -out.logprobs.sum() / minibatch["response_mask"].sum() + jnp.mean(out.values ** 2)

    def step(carry, xs):
        trainable, opt_state = carry
        minibatch, key = xs
        jax.eval_shape(lambda: loss(trainable, minibatch, key))
        value, grads = jax.value_and_grad(loss)(trainable, minibatch, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), (value, grads)

    return jax.jit(lambda trainable, opt_state, batch, keys: jax.lax.scan(step, (trainable, opt_state), (batch, keys)))


@pytest.mark.parametrize("variant", ["full", "lora", "lora_dropout"])
def test_remat_gives_the_same_scanned_update(base, variant):
    if variant == "full":
        model, filt = base, nnx.Param
    else:
        dropout = 0.1 if variant == "lora_dropout" else 0.0
        model = randomize_b(lora.apply_lora(base, rank=RANK, alpha=ALPHA, dropout=dropout, rngs=nnx.Rngs(1)))
        filt = lora.trainable_filter()
    ac = ActorCritic(model, ValueHead.tiny(CFG.text.hidden_size, rngs=nnx.Rngs(0)))
    graphdef, trainable, frozen = nnx.split(ac, filt, ...)
    # Plain SGD: Adam's m / sqrt(v) would amplify float32 rounding of near-zero gradients into
    # lr-sized parameter differences, hiding what is compared (the gradients of the two programs).
    tx = optax.sgd(0.05)
    batch = make_batch(lead=(2,))
    keys = jax.random.split(jax.random.key(3), 2)
    results = []
    for remat in (False, True):
        update = make_update(graphdef, frozen, tx, remat=remat, dropout=variant == "lora_dropout")
        results.append(update(trainable, tx.init(trainable), batch, keys))
    ((p0, _), (loss0, g0)), ((p1, _), (loss1, g1)) = results
    assert np.isfinite(np.asarray(loss0)).all() and loss0.shape == (2,)
    assert float(jnp.abs(loss0[1] - loss0[0])) > 1e-3  # the second minibatch saw updated parameters
    # float32 reassociation in the recomputed layers: |a - b| <= 1e-6 + 1e-5 * max|b| per leaf (measured:
    # 9e-6 on embedding gradients of scale ~3, 5e-7 on a kernel gradient of scale 0.3, 6e-9 on LoRA ones).
    for a, b in zip(jax.tree.leaves((loss1, g1, p1)), jax.tree.leaves((loss0, g0, p0)), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-6 + 1e-5 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


# --------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------
def test_dropout_is_off_until_enabled_and_follows_the_key(base):
    model = randomize_b(lora.apply_lora(base, rank=RANK, alpha=ALPHA, dropout=0.5, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model)
    batch = make_batch()

    @functools.partial(jax.jit, static_argnums=2)
    def logprobs(state, key, remat):
        m = nnx.merge(graphdef, state)
        if key is not None:
            lora.enable_dropout(m, key)
        out = sampling.score_batch_fn(m, None, batch, temperature=1.0, remat=remat)
        draws = m.language_model.qwix_rngs.dropout.count[...] if key is not None else jnp.int32(0)
        return out.logprobs, draws

    ref = run_score(lora.merge_lora(model), batch).logprobs
    off, _ = logprobs(state, None, False)
    np.testing.assert_allclose(np.asarray(off), np.asarray(ref), atol=1e-5)  # no dropout by default
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, draws = logprobs(state, k1, False)
    a_remat, draws_remat = logprobs(state, k1, True)
    b, _ = logprobs(state, k2, False)
    # One dropout draw per adapted projection and layer, counted through the functional layer calls.
    assert int(draws) == int(draws_remat) == LAYERS * 7
    assert np.abs(np.asarray(a) - np.asarray(off)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(a_remat), np.asarray(a), atol=1e-6)
    # disable_dropout restores the eval behaviour.
    m = nnx.merge(graphdef, state)
    lora.enable_dropout(m, k1)
    lora.disable_dropout(m)
    np.testing.assert_allclose(np.asarray(run_score(m, batch).logprobs), np.asarray(off), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------
def test_bf16_model_close_to_float32():
    bf16 = llava.random_init(CFG, seed=0, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    assert bf16.config.text.dtype == bf16.config.vision.dtype == jnp.bfloat16
    # The float32 model with the very same (bf16-representable) weights.
    f32 = llava.random_init(CFG, seed=0)
    graphdef, state = nnx.split(f32)
    f32 = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(bf16)))
    batch = make_batch()
    ids, mask, pixels = batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"]
    fwd = nnx.jit(lambda m: m(ids, mask, pixels))
    lo, ref = fwd(bf16), fwd(f32)
    assert lo.dtype == jnp.float32  # logits come out of an f32-accumulating projection
    valid = np.asarray(mask, bool)
    diff = np.abs(np.asarray(lo) - np.asarray(ref))[valid].max()
    assert 0 < diff <= 3e-2 * np.abs(np.asarray(ref)).max(), diff  # measured: 7.5e-3 on logits up to 0.98
    # param_dtype alone: bf16 storage, float32 compute.
    mixed = llava.random_init(CFG, seed=0, param_dtype=jnp.bfloat16)
    assert mixed.config.text.dtype == jnp.float32 and mixed.language_model.norm.weight.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(fwd(mixed)), np.asarray(ref), atol=1e-5)


def test_lora_on_a_bf16_base_trains_float32_adapters():
    model = randomize_b(lora.apply_lora(llava.random_init(CFG, seed=0, dtype=jnp.bfloat16), rank=RANK, alpha=ALPHA,
                                        dropout=0.0, rngs=nnx.Rngs(1)))
    ac = ActorCritic(model, ValueHead.tiny(CFG.text.hidden_size, rngs=nnx.Rngs(0)))
    graphdef, trainable, frozen = nnx.split(ac, lora.trainable_filter(), ...)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    batch = make_batch()

    def loss(trainable, remat):
        m = nnx.merge(graphdef, trainable, frozen)
        out = sampling.score_batch_fn(m.policy, m.value_head, batch, temperature=1.0, remat=remat)
        return -out.logprobs.sum() / batch["response_mask"].sum() + jnp.mean(out.values ** 2), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(trainable, True)
    assert out.logprobs.dtype == out.values.dtype == jnp.float32 and np.isfinite(float(value))
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # The decoder computes in bf16 (adapters cast inside the layer), not promoted to float32.
    decode = jax.jit(lambda tr, e, k, p: nnx.merge(graphdef, tr, frozen).policy.decode(e, k, p))
    logits, hidden, _ = decode(trainable, jnp.zeros((1, 3, CFG.text.hidden_size), jnp.bfloat16),
                               jnp.ones((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32))
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_lora_under_eval_shape_allocates_nothing():
    """The real-size plan, abstractly: llava-v1.6-mistral-7b's shapes with RL4VLM's adapters. Two of the 32
    decoder layers (and of the 24 ViT layers) keep the test fast; per layer the adapters hold
    128 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)) = 10,485,760 parameters, 335.5 M in all."""
    full = llava.LlavaConfig.llava_1_6_mistral_7b().with_dtype(jnp.bfloat16)
    cfg = full.replace(text=full.text.replace(num_layers=2), vision=full.vision.replace(num_layers=2))
    abstract = nnx.eval_shape(lambda: lora.apply_lora(
        llava.Llava(cfg, rngs=nnx.Rngs(0)), rank=lora.RL4VLM_RANK, alpha=lora.RL4VLM_ALPHA,
        dropout=lora.RL4VLM_DROPOUT, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.LoRAParam))
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.float32 for x in leaves)
    assert sum(x.size for x in leaves) == 2 * 10_485_760 and 32 * 10_485_760 == 335_544_320
    base = jax.tree.leaves(nnx.state(abstract, nnx.Not(nnx.LoRAParam)))
    assert {x.dtype for x in base} == {jnp.dtype(jnp.bfloat16)}


# --------------------------------------------------------------------------------------------------
# The tiny LLaVA-NeXT preset
# --------------------------------------------------------------------------------------------------
def test_tiny_next_with_lora_scores_with_image_sizes_and_needs_them():
    cfg = llava.LlavaConfig.tiny_next()
    model = randomize_b(lora.apply_lora(llava.random_init(cfg, seed=0), rank=RANK, alpha=ALPHA, dropout=0.0,
                                        rngs=nnx.Rngs(1)))
    proc = ip.LlavaImageProcessor.from_config(cfg)
    rng = np.random.default_rng(0)
    images = proc([rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), rng.integers(0, 256, (120, 300, 3), np.uint8)])
    counts = [int(c) for c in images.num_image_tokens]
    assert counts[0] == cfg.num_image_tokens((300, 300)) == 16 + 8 * 9
    length = max(counts) + 4
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int32)
    for row, c in enumerate(counts):
        toks = [1] + [cfg.image_token_id] * c + [9, 10]
        ids[row, length - len(toks):], mask[row, length - len(toks):] = toks, 1
    batch = dict(prompt_ids=jnp.asarray(ids), prompt_mask=jnp.asarray(mask),
                 response_ids=jnp.asarray(rng.integers(8, 100, (2, 3))), response_mask=jnp.ones((2, 3), bool),
                 pixel_values=jnp.asarray(images.pixel_values), image_sizes=jnp.asarray(images.image_sizes))
    assert batch["pixel_values"].shape == (2, cfg.max_patches, 3, 32, 32)
    out = run_score(model, batch)
    assert np.isfinite(np.asarray(out.logprobs)).all() and out.logprobs.shape == (2, 3)
    merged = run_score(lora.merge_lora(model), batch)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(merged.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="LLaVA-NeXT needs image_sizes"):
        run_score(model, {k: v for k, v in batch.items() if k != "image_sizes"})
