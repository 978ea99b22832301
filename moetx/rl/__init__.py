"""Value-based reinforcement learning: gymnax environments and normalised returns (envs), the
loss language of Evolving RL (losses) and a JAX DQN agent whose loss is a program of it (dqn)."""
