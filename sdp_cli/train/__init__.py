"""The trainer side: advantages, the decoupled PPO loss, batches, the actor, weight export and
checkpoints. The training loop that ties them to the rollout executor lives beside them."""
