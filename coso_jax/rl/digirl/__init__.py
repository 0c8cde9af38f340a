"""DigiRL's backbone (filtered policy gradient, double step critic, trajectory critic; off2on) on the
web suites, with the soft-RL term of `algo` none | entropy | coso (`DigiRLTrainer`).

  losses.py   MC returns, trajectory filters, the double-critic advantage and losses, the actor loss
  critics.py  the separate (or policy-sharing) critic networks
  replay.py   the transition replay
  web.py      browsers, prompts, episodes -> transitions, the scripted solver actor
  families.py the policy families behind one sampler protocol: tiny LLaVA, T5 / AutoUI
  start.py    the cached behaviour-cloned start and the offline trajectories
  steps.py    the jitted phases (module level)
  trainer.py  DigiRLTrainer
"""
