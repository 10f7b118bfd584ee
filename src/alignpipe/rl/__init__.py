"""Online RL: the PPO trainer (`ppo_trainer`), its maths, policy + value head, rollouts, rewards and checkpoints."""
