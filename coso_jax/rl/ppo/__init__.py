"""RL4VLM's PPO backbone with the soft-RL term of `algo` none | entropy | coso (`PPOTrainer`)."""
