"""CoSo's soft-RL lemmas (paper Sec. 4: Lemma 4.2, Lemma 4.3, Proposition 4.4) on an enumerable toy.

docs/soft_rl.md describes the toy, the definitions and the measured numbers. In short:

* Two states, a vocabulary of 3 tokens, utterances of 3 tokens (27 of them). ``parse`` maps an
  utterance to one of 3 action types: the first token decides (0, 1) or defers to the last one (2).
  The middle token never changes the type; the last one changes it only after a first token 2.
* Rewards and (stochastic) transitions depend on (state, action type); gamma = 0.9.
* The policy is autoregressive: one logits row per (state, prefix), 1 + 3 + 9 = 13 prefixes per
  state, so pi(y|s), every token's conditional entropy H_i(s, y_<i) and every expectation are
  enumerated exactly.
* Causal weights w_i(y) come from the project's kernel (``counterfactual_effects`` and
  ``causal_weights``) with an exact classifier: P(type | tokens) is the fraction of completions of
  the masked ("null") positions that parse to that type, so it is one-hot on real utterances.
* H_B(y|s) = (1/n) sum_i w_i(y) H_i(s, y_<i), as ``losses.weighted_entropy`` computes it.
* Counterfactual soft Bellman backup of a fixed policy pi:
      Q(s, y) <- r(s, type(y)) + gamma * E_{s'}[V(s')],  V(s) = E_{y~pi(.|s)}[Q(s, y) + alpha H_B(y|s)].
* Soft improvement: pi_new(.|s) maximises J_s(p; Q_pi) = E_{y~p}[Q_pi(s, y) + alpha H_B^p(y|s)] over
  the (autoregressive) policy family (numerically, float64 BFGS with an exact gradient). H_B's
  weights depend on the whole utterance, so J_s has no Boltzmann closed form; with all weights 1
  it does: pi ~ exp(n Q / alpha) (chain rule: E_y[sum_i H_i] = H(pi(.|s))).

The MDP algebra is float64 NumPy; the expected values come from closed forms (np.linalg.solve) or
independent routes (soft value iteration, direct maximisation of the return). The project's JAX
code (float32) supplies the causal weights; ``token_entropy`` / ``weighted_entropy`` and
``soft_value_target`` / ``soft_q_target`` are checked against the float64 algebra.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from scipy.special import logsumexp

from coso_jax import losses
from coso_jax.causal import causal_weights, counterfactual_effects

VOCAB, LENGTH, NUM_TYPES, NUM_STATES = 3, 3, 3, 2
NULL = VOCAB  # the mask ("null") token id the counterfactual kernel writes into ablated positions
GAMMA, ALPHA = 0.9, 0.5
UTTERANCES = np.array(list(itertools.product(range(VOCAB), repeat=LENGTH)))  # [27, 3]
NUM_UTT = len(UTTERANCES)
NUM_PREFIXES = 1 + VOCAB + VOCAB ** 2  # 13 rows of logits per state


def parse(y) -> int:
    """Action type of an utterance: token 0 says 0 or 1, or (token 0 == 2) defers to token 2."""
    return int(y[0]) if y[0] < 2 else int(y[2])


TYPES = np.array([parse(y) for y in UTTERANCES])
# Rewards r[s, type] and transitions P[s, type, s'].
REWARD = np.array([[0.0, 0.1, -0.1],
                   [1.0, 0.3, 0.0]])
TRANSITION = np.array([[[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]],
                       [[1.0, 0.0], [0.0, 1.0], [0.7, 0.3]]])
R_Y = REWARD[:, TYPES]             # [S, 27]
P_Y = TRANSITION[:, TYPES]         # [S, 27, S']
# Row of the logits table used at (utterance, position): () -> 0, (a,) -> 1 + a, (a, b) -> 4 + 3a + b.
PREFIX = np.stack([np.zeros(NUM_UTT, int), 1 + UTTERANCES[:, 0],
                   1 + VOCAB + VOCAB * UTTERANCES[:, 0] + UTTERANCES[:, 1]], axis=1)  # [27, 3]


# ---------------------------------------------------------------------------------------------
# The exact classifier and the project's causal weights.
def _classifier_table() -> np.ndarray:
    """P(type | tokens) for every token triple over vocab + {null}: the fraction of completions of
    the null positions (uniform over the vocabulary) that parse to each type. [4, 4, 4, K]."""
    table = np.zeros((VOCAB + 1,) * LENGTH + (NUM_TYPES,))
    for tokens in itertools.product(range(VOCAB + 1), repeat=LENGTH):
        completions = list(itertools.product(*[range(VOCAB) if t == NULL else [t] for t in tokens]))
        for y in completions:
            table[tokens][parse(y)] += 1.0 / len(completions)
    return table


_LOGIT_TABLE = jnp.asarray(np.log(np.maximum(_classifier_table(), 1e-30)).reshape(-1, NUM_TYPES),
                           jnp.float32)


def exact_classifier(tokens, mask):
    """logits_fn for ``counterfactual_effects``: log P(type | tokens), one-hot on real utterances."""
    del mask  # every position is valid
    index = (tokens[:, 0] * (VOCAB + 1) + tokens[:, 1]) * (VOCAB + 1) + tokens[:, 2]
    return _LOGIT_TABLE[index]


def project_weights(window: int) -> np.ndarray:
    """Causal weights w[27, 3] of every utterance, from the project's kernel (float32 -> float64)."""
    valid = np.ones_like(UTTERANCES)
    effects = counterfactual_effects(exact_classifier, UTTERANCES, valid, TYPES, window=window,
                                     mask_token_id=NULL)
    return np.asarray(causal_weights(effects, valid), np.float64)


@pytest.fixture(scope="module")
def w1():
    """Weights with the paper's single-token null (window 1)."""
    return project_weights(1)


@pytest.fixture(scope="module")
def w4():
    """Weights with the reference code's window of 4 (on 3 tokens: position i..end is nulled)."""
    return project_weights(4)


ONES = np.ones((NUM_UTT, LENGTH))
ZEROS = np.zeros((NUM_UTT, LENGTH))


# ---------------------------------------------------------------------------------------------
# Exact (float64) policy algebra.
def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def random_theta(seed: int, scale: float = 1.0) -> np.ndarray:
    return scale * np.random.default_rng(seed).normal(size=(NUM_STATES, NUM_PREFIXES, VOCAB))


def policy(theta):
    """pi[S, 27] and the token entropies H[S, 27, 3] (nats) of the autoregressive policy."""
    logp = log_softmax(theta)[:, PREFIX]                                     # [S, 27, 3, V]
    chosen = np.take_along_axis(logp, UTTERANCES[None, :, :, None], -1)[..., 0]
    return np.exp(chosen.sum(-1)), -(np.exp(logp) * logp).sum(-1)


def causal_entropy(theta, weights):
    """pi[S, 27] and H_B[S, 27] = (1/n) sum_i w_i(y) H_i(s, y_<i)."""
    pi, entropies = policy(theta)
    return pi, (weights[None] * entropies).mean(-1)


def closed_form_q(pi, h_b, alpha):
    """The backup's fixed point: (I - gamma M Pi) q = r + gamma alpha M Pi H_B over the 54 (s, y)."""
    m = P_Y.reshape(NUM_STATES * NUM_UTT, NUM_STATES)                       # [(s, y), s']
    expect = np.zeros((NUM_STATES, NUM_STATES * NUM_UTT))                   # [s, (s, y)]
    for s in range(NUM_STATES):
        expect[s, s * NUM_UTT:(s + 1) * NUM_UTT] = pi[s]
    lhs = np.eye(NUM_STATES * NUM_UTT) - GAMMA * m @ expect
    rhs = R_Y.reshape(-1) + GAMMA * alpha * m @ expect @ h_b.reshape(-1)
    return np.linalg.solve(lhs, rhs).reshape(NUM_STATES, NUM_UTT)


def closed_form_v(pi, bonus):
    """V = (I - gamma P_pi)^-1 (r_pi + bonus): the state-level linear system (2 x 2)."""
    p_pi = np.einsum("sy,syt->st", pi, P_Y)
    return np.linalg.solve(np.eye(NUM_STATES) - GAMMA * p_pi, (pi * R_Y).sum(1) + bonus)


def backup(q, pi, h_b, alpha):
    """One counterfactual soft Bellman backup (float64)."""
    v = (pi * (q + alpha * h_b)).sum(1)
    return R_Y + GAMMA * P_Y @ v


def evaluate(theta, weights, alpha=ALPHA):
    pi, h_b = causal_entropy(theta, weights)
    q = closed_form_q(pi, h_b, alpha)
    return q, (pi * (q + alpha * h_b)).sum(1)


# ---------------------------------------------------------------------------------------------
# Soft improvement.
_ONE_HOT = np.eye(VOCAB)[UTTERANCES]  # [27, 3, V]


def improvement_objective(theta_s, q_s, weights, alpha):
    """J_s(theta_s) = sum_y pi(y|s) [q(s, y) + alpha H_B(y|s)] and its exact gradient [13, V]."""
    logp = log_softmax(theta_s)
    probs = np.exp(logp)
    node_entropy = -(probs * logp).sum(-1)                                   # [13]
    coeff = alpha * weights / LENGTH                                         # [27, 3]
    pi = np.exp(np.take_along_axis(logp[PREFIX], UTTERANCES[..., None], -1)[..., 0].sum(-1))
    total = q_s + (coeff * node_entropy[PREFIX]).sum(-1)                     # [27]
    token_probs = probs[PREFIX]                                              # [27, 3, V]
    d_entropy = -token_probs * (logp[PREFIX] + node_entropy[PREFIX][..., None])
    per_token = ((pi * total)[:, None, None] * (_ONE_HOT - token_probs)
                 + (pi[:, None] * coeff)[..., None] * d_entropy)
    grad = np.zeros_like(theta_s)
    np.add.at(grad, PREFIX, per_token)
    return pi @ total, grad


def _ascend(theta_s, q_s, weights, alpha):
    def negative(x):
        value, grad = improvement_objective(x.reshape(NUM_PREFIXES, VOCAB), q_s, weights, alpha)
        return -value, -grad.reshape(-1)
    # BFGS (pure NumPy): scipy's L-BFGS-B was ~10x slower on this 39-parameter problem on a busy
    # 2-core machine. Its line search only accepts ascent steps, so J_s never decreases.
    result = scipy.optimize.minimize(negative, theta_s.reshape(-1), jac=True, method="BFGS",
                                     options=dict(gtol=1e-11, maxiter=2000))
    return result.x.reshape(NUM_PREFIXES, VOCAB), -result.fun


def improve(theta, q, weights, alpha=ALPHA):
    """pi_new(.|s) = argmax_p J_s(p; Q_pi): BFGS from pi (monotone, so J_s(new) >= J_s(pi)) and
    from the uniform policy; the better one per state."""
    new = np.empty_like(theta)
    for s in range(NUM_STATES):
        candidates = [_ascend(start, q[s], weights, alpha) for start in (theta[s], np.zeros_like(theta[s]))]
        new[s] = max(candidates, key=lambda c: c[1])[0]
    return new


def boltzmann_theta(q, temperature):
    """Logits table of the utterance-level Boltzmann policy pi(y|s) ~ exp(q(s, y) / temperature)."""
    scores = (q / temperature).reshape(NUM_STATES, VOCAB, VOCAB, VOCAB)
    theta = np.empty((NUM_STATES, NUM_PREFIXES, VOCAB))
    theta[:, 1 + VOCAB:] = scores.reshape(NUM_STATES, VOCAB ** 2, VOCAB)
    theta[:, 1:1 + VOCAB] = logsumexp(scores, axis=3)
    theta[:, 0] = logsumexp(scores, axis=(2, 3))
    return theta


def policy_iteration(theta, weights, alpha=ALPHA, improve_fn=None, tol=1e-12, max_iterations=30):
    """Evaluation + improvement until Q stops changing. Returns the Qs, the Vs and the last theta."""
    improve_fn = improve_fn or (lambda th, q: improve(th, q, weights, alpha))
    qs, vs = [], []
    for _ in range(max_iterations):
        q, v = evaluate(theta, weights, alpha)
        qs.append(q)
        vs.append(v)
        if len(qs) > 1 and np.abs(qs[-1] - qs[-2]).max() < tol:
            break
        theta = improve_fn(theta, q)
    return qs, vs, theta


# ---------------------------------------------------------------------------------------------
# The toy itself.
def test_causal_weights_of_the_toy(w1, w4):
    """The kernel's weights on the toy: the middle token never matters, the last one only after a
    first token 2 (window 1). Derived by hand from the fraction of nulled completions that flip
    the type: e.g. y = (2, *, 0): effects (1/3, 0, 2/3) -> weights (sqrt(1/2), 0, 1)."""
    expected = np.zeros((NUM_UTT, LENGTH))
    for row, y in enumerate(UTTERANCES):
        if y[0] < 2:
            expected[row] = (1, 0, 0)
        else:
            expected[row] = (1, 0, 1) if y[2] == 2 else (np.sqrt(0.5), 0, 1)
    np.testing.assert_allclose(w1, expected, atol=1e-6)
    assert np.all(w1[:, 1] == 0) and np.all(w1[:, 0] > 0.7)
    assert np.any(w1[:, 2] == 0) and np.any(w1[:, 2] == 1)
    # Window 4 nulls i..end: the weights differ (the middle token carries weight after a first 2).
    assert np.all((w4 >= 0) & (w4 <= 1)) and np.any(w4[:, 1] > 0.5) and not np.allclose(w4, w1)


def test_causal_entropy_matches_project_losses(w1):
    """H_B from ``losses.token_entropy`` + ``losses.weighted_entropy`` (float32) equals the float64
    definition; with weights None it is the naive mean entropy, whose expectation is H(pi)/n."""
    theta = random_theta(0)
    logits = jnp.asarray(log_softmax(theta)[:, PREFIX], jnp.float32)       # [S, 27, 3, V]
    mask = jnp.ones(logits.shape[:-1], bool)
    token_h = losses.token_entropy(logits, mask)
    weights = jnp.broadcast_to(jnp.asarray(w1, jnp.float32), mask.shape)
    h_b = np.asarray(losses.weighted_entropy(token_h, weights, mask))
    naive = np.asarray(losses.weighted_entropy(token_h, None, mask))
    pi, expected_h_b = causal_entropy(theta, w1)
    _, expected_naive = causal_entropy(theta, ONES)
    np.testing.assert_allclose(h_b, expected_h_b, atol=2e-6)
    np.testing.assert_allclose(naive, expected_naive, atol=2e-6)
    np.testing.assert_allclose(np.asarray(losses.causal_entropy(logits, weights, mask)), h_b, atol=1e-7)
    # Chain rule: E_y[sum_i H_i] is the entropy of the utterance distribution.
    utterance_entropy = -(pi * np.log(pi)).sum(1)
    np.testing.assert_allclose(LENGTH * (pi * expected_naive).sum(1), utterance_entropy, rtol=1e-12)
    assert np.all((pi * expected_h_b).sum(1) < (pi * expected_naive).sum(1))


# ---------------------------------------------------------------------------------------------
# Lemma 4.2: counterfactual soft policy evaluation.
@pytest.mark.parametrize("window", [1, 4])
def test_lemma_4_2_backup_converges_to_the_linear_solve(window, w1, w4):
    """Iterating the backup from an arbitrary Q contracts by gamma in sup norm each step and reaches
    the closed-form fixed point (np.linalg.solve) to 1e-10."""
    weights = w1 if window == 1 else w4
    pi, h_b = causal_entropy(random_theta(1), weights)
    fixed_point = closed_form_q(pi, h_b, ALPHA)
    q = 10.0 * np.random.default_rng(2).normal(size=fixed_point.shape)
    errors = [np.abs(q - fixed_point).max()]
    while errors[-1] >= 1e-10 and len(errors) <= 300:
        q = backup(q, pi, h_b, ALPHA)
        errors.append(np.abs(q - fixed_point).max())
        assert errors[-1] <= GAMMA * errors[-2] + 1e-12
    assert errors[-1] < 1e-10, (len(errors) - 1, errors[-1])  # 233 iterations (docs/soft_rl.md)
    np.testing.assert_allclose(backup(fixed_point, pi, h_b, ALPHA), fixed_point, atol=1e-12)
    # The state-level system gives the same soft values.
    v = (pi * (fixed_point + ALPHA * h_b)).sum(1)
    np.testing.assert_allclose(v, closed_form_v(pi, ALPHA * (pi * h_b).sum(1)), rtol=1e-12)


def test_lemma_4_2_with_project_targets(w1):
    """The same iteration with ``soft_value_target`` / ``soft_q_target`` (float32) and the project's
    H_B reaches the float64 closed form within float32 accuracy."""
    theta = random_theta(1)
    logits = jnp.asarray(log_softmax(theta)[:, PREFIX], jnp.float32)
    mask = jnp.ones(logits.shape[:-1], bool)
    h_b = losses.weighted_entropy(losses.token_entropy(logits, mask),
                                  jnp.broadcast_to(jnp.asarray(w1, jnp.float32), mask.shape), mask)
    pi64, _ = causal_entropy(theta, w1)
    pi = jnp.asarray(pi64, jnp.float32)
    rewards, transitions = jnp.asarray(R_Y, jnp.float32), jnp.asarray(P_Y, jnp.float32)
    dones = jnp.zeros(rewards.shape, bool)

    @jax.jit
    def step(q):
        # soft_value_target gives Q + alpha H_B per utterance; the exact E_y weights it by pi.
        v = (pi * losses.soft_value_target(q, h_b, ALPHA)).sum(-1)
        return losses.soft_q_target(rewards, dones, transitions @ v, GAMMA)

    q = jnp.zeros_like(rewards)
    for _ in range(300):
        q = step(q)
    expected = closed_form_q(pi64, np.asarray(h_b, np.float64), ALPHA)
    np.testing.assert_allclose(np.asarray(q), expected, rtol=1e-5, atol=1e-5)
    # The float32 H_B differs from the float64 one by rounding only.
    np.testing.assert_allclose(expected, closed_form_q(*causal_entropy(theta, w1), ALPHA), atol=1e-5)


def test_all_weights_one_is_the_ordinary_soft_backup():
    """w = 1: H_B is the naive mean token entropy, and the fixed point is ordinary soft policy
    evaluation with the utterance entropy bonus (alpha / n) H(pi(.|s)) computed from pi alone."""
    theta = random_theta(3)
    pi, h_b = causal_entropy(theta, ONES)
    q = closed_form_q(pi, h_b, ALPHA)
    utterance_entropy = -(pi * np.log(pi)).sum(1)
    v = closed_form_v(pi, ALPHA / LENGTH * utterance_entropy)
    np.testing.assert_allclose(q, R_Y + GAMMA * P_Y @ v, rtol=1e-12)


def test_alpha_zero_or_zero_weights_is_the_plain_bellman_backup(w1):
    """alpha = 0 (any weights) and w = 0 (the 'none' setting, any alpha) give plain Q^pi."""
    theta = random_theta(4)
    pi, _ = policy(theta)
    plain = R_Y + GAMMA * P_Y @ closed_form_v(pi, 0.0)
    for weights, alpha in [(w1, 0.0), (ONES, 0.0), (ZEROS, ALPHA)]:
        _, h_b = causal_entropy(theta, weights)
        np.testing.assert_allclose(closed_form_q(pi, h_b, alpha), plain, rtol=1e-12)
        q = np.zeros_like(plain)
        for _ in range(400):
            q = backup(q, pi, h_b, alpha)
        np.testing.assert_allclose(q, plain, atol=1e-10)
    # And the causal bonus is a real change: with w1 and alpha > 0 the fixed point is larger.
    assert np.all(evaluate(theta, w1)[0] > plain + 1e-3)


def test_improvement_objective_gradient(w4):
    """The improvement objective's exact gradient (used by every improvement step) against central
    differences, and its value against the enumeration: J_s(pi; Q_pi) = V_pi(s)."""
    theta = random_theta(9)
    q, v = evaluate(theta, w4)
    for s in range(NUM_STATES):
        value, grad = improvement_objective(theta[s], q[s], w4, ALPHA)
        assert abs(value - v[s]) < 1e-12
        numeric = np.zeros_like(grad)
        for index in np.ndindex(grad.shape):
            step = np.zeros_like(grad)
            step[index] = 1e-6
            numeric[index] = (improvement_objective(theta[s] + step, q[s], w4, ALPHA)[0]
                              - improvement_objective(theta[s] - step, q[s], w4, ALPHA)[0]) / 2e-6
        np.testing.assert_allclose(grad, numeric, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Lemma 4.3: counterfactual soft policy improvement.
@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_lemma_4_3_improvement_does_not_decrease_soft_q(window, seed, w1, w4):
    """pi_new = argmax_p J_s(p; Q_pi): J_s(pi_new) >= J_s(pi) = V_pi(s), hence Q_new >= Q_pi."""
    weights = w1 if window == 1 else w4
    theta = random_theta(seed)
    q_old, v_old = evaluate(theta, weights)
    theta_new = improve(theta, q_old, weights)
    gains = [improvement_objective(theta_new[s], q_old[s], weights, ALPHA)[0] - v_old[s]
             for s in range(NUM_STATES)]
    assert min(gains) >= -1e-12
    q_new, v_new = evaluate(theta_new, weights)
    assert np.min(q_new - q_old) >= -1e-9
    assert np.min(q_new - q_old) > 1e-3  # a random policy is far from the fixed point
    assert np.all(v_new >= v_old)


def test_lemma_4_3_boltzmann_is_the_improvement_only_for_the_naive_entropy(w1):
    """With w = 1, pi ~ exp(n Q / alpha) (SAC's step at temperature alpha / n) is the exact argmax
    of J_s and improves Q. With causal weights it is not the H_B improvement: applied at the CoSo
    fixed point it lowers Q, while the H_B step leaves the fixed point where it is."""
    temperature = ALPHA / LENGTH
    for seed in (5, 6):
        theta = random_theta(seed)
        q_old, _ = evaluate(theta, ONES)
        theta_new = boltzmann_theta(q_old, temperature)
        assert np.min(evaluate(theta_new, ONES)[0] - q_old) >= -1e-9
        numeric = improve(theta, q_old, ONES)
        for s in range(NUM_STATES):
            assert (improvement_objective(theta_new[s], q_old[s], ONES, ALPHA)[0]
                    >= improvement_objective(numeric[s], q_old[s], ONES, ALPHA)[0] - 1e-10)
    qs, _, theta_star = policy_iteration(random_theta(0), w1)
    q_star = qs[-1]
    boltzmann_q = evaluate(boltzmann_theta(q_star, temperature), w1)[0]
    assert np.min(boltzmann_q - q_star) < -1e-2
    assert np.abs(evaluate(improve(theta_star, q_star, w1), w1)[0] - q_star).max() < 1e-9


# ---------------------------------------------------------------------------------------------
# Proposition 4.4: counterfactual soft policy iteration.
def _direct_optimum(weights, seeds):
    """max over theta of mean_s V_pi(s), by BFGS on the return itself (its exact gradient is the
    discounted occupancy times the improvement objective's gradient)."""
    start = np.full(NUM_STATES, 1.0 / NUM_STATES)

    def negative(x):
        theta = x.reshape(NUM_STATES, NUM_PREFIXES, VOCAB)
        pi, _ = policy(theta)
        q, v = evaluate(theta, weights)
        p_pi = np.einsum("sy,syt->st", pi, P_Y)
        occupancy = np.linalg.solve((np.eye(NUM_STATES) - GAMMA * p_pi).T, start)
        grad = np.stack([occupancy[s] * improvement_objective(theta[s], q[s], weights, ALPHA)[1]
                         for s in range(NUM_STATES)])
        return -(start @ v), -grad.reshape(-1)

    values = []
    for seed in seeds:
        result = scipy.optimize.minimize(negative, random_theta(seed).reshape(-1), jac=True,
                                         method="BFGS", options=dict(gtol=1e-10, maxiter=3000))
        values.append(evaluate(result.x.reshape(NUM_STATES, NUM_PREFIXES, VOCAB), weights)[1])
    return np.array(values)


@pytest.mark.parametrize("window", [1, 4])
def test_prop_4_4_policy_iteration_converges_to_the_optimum(window, w1, w4):
    """Q is monotone non-decreasing, its changes vanish within a few iterations, the limit is a
    fixed point of evaluation + improvement, another start reaches the same values, and they are
    the best a direct maximisation of the return finds from several starts."""
    weights = w1 if window == 1 else w4
    qs, vs, theta = policy_iteration(random_theta(0), weights)
    changes = [np.abs(b - a).max() for a, b in zip(qs, qs[1:])]
    assert min(np.min(b - a) for a, b in zip(qs, qs[1:])) >= -1e-9
    assert len(qs) <= 8 and changes[-1] < 1e-12
    # Faster than linear: each change is at most a tenth of the previous one (until rounding).
    assert all(later < 0.1 * earlier for earlier, later in zip(changes, changes[1:]) if later > 1e-9)
    # A fixed point: one more round changes nothing.
    assert np.abs(evaluate(improve(theta, qs[-1], weights), weights)[0] - qs[-1]).max() < 1e-9
    _, vs_other, _ = policy_iteration(random_theta(1, scale=3.0), weights)
    np.testing.assert_allclose(vs_other[-1], vs[-1], atol=1e-9)
    direct = _direct_optimum(weights, seeds=(10, 11, 12))
    assert np.all(direct.mean(1) <= vs[-1].mean() + 1e-9)
    np.testing.assert_allclose(direct[np.argmax(direct.mean(1))], vs[-1], atol=1e-7)


def test_prop_4_4_naive_entropy_reaches_soft_value_iteration():
    """w = 1: policy iteration (numeric improvement, and the Boltzmann step) converges to the
    closed-form soft optimum: V = (alpha/n) logsumexp(n Q / alpha), Q = r + gamma P V."""
    v_star = np.zeros(NUM_STATES)
    temperature = ALPHA / LENGTH
    for _ in range(2000):
        q_star = R_Y + GAMMA * P_Y @ v_star
        v_star = temperature * logsumexp(q_star / temperature, axis=1)
    qs, vs, _ = policy_iteration(random_theta(2), ONES)
    assert min(np.min(b - a) for a, b in zip(qs, qs[1:])) >= -1e-9
    np.testing.assert_allclose(qs[-1], q_star, atol=1e-9)
    np.testing.assert_allclose(vs[-1], v_star, atol=1e-9)
    qs_b, _, _ = policy_iteration(random_theta(2), ONES,
                                  improve_fn=lambda th, q: boltzmann_theta(q, temperature))
    assert min(np.min(b - a) for a, b in zip(qs_b, qs_b[1:])) >= -1e-9
    np.testing.assert_allclose(qs_b[-1], q_star, atol=1e-9)


def test_causal_entropy_leaves_the_filler_token_free(w1):
    """The motivation in miniature: at the CoSo optimum (window 1) the middle token's conditional
    p(y_1 | s, y_0) can be anything (the value does not move), while under the naive entropy
    making it non-uniform lowers the soft value."""
    rng = np.random.default_rng(8)
    for weights, moves in [(w1, False), (ONES, True)]:
        _, vs, theta = policy_iteration(random_theta(0), weights)
        perturbed = theta.copy()
        perturbed[:, 1:1 + VOCAB] = 3.0 * rng.normal(size=(NUM_STATES, VOCAB, VOCAB))
        drop = vs[-1] - evaluate(perturbed, weights)[1]
        if moves:
            assert np.all(drop > 1e-2)
        else:
            np.testing.assert_allclose(drop, 0.0, atol=1e-12)
