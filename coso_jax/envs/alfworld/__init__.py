"""ALFWorld-style household text worlds, generated offline from the installed `alfworld` package.

- `game`: the `Game` record and the task-type / split names every module below shares.
- `generator.generate(seed, task_type, split) -> Game`: a scene from ALFWorld's layouts, objects
  placed by its canContain table, a goal from its goal library; planner-checked (walkthrough kept).
- `pools`: fixed train / test / unseen pools, cached on disk.
- `engine.Engine`: TextWorld's PDDL engine, plain or with the memoised fast path; `engine.progress`.
- `env.ALFWorldEnv` (`coso_jax/ALFWorld-v0`) and `text.ALFWorldText` (prompt / parse / labels).
- `demos`: expert walkthroughs as chain-of-thought answers for SFT.
- `official`: ALFWorld's official game files (`$ALFWORLD_DATA`) for the same env (`ALFWorldEnv(data_dir=...)`).

Needs `alfworld==0.4.2` (the `alfworld` and `test` extras of pyproject.toml). Importing this package
does not import alfworld; the modules that need it raise an ImportError with the install hint.
"""
from coso_jax.envs.alfworld.game import SPLITS, TASK_ALIASES, TASK_TYPES, Game
from coso_jax.envs.alfworld.generator import GenerationError, generate

__all__ = ["SPLITS", "TASK_ALIASES", "TASK_TYPES", "Game", "GenerationError", "generate"]
